"""Llama-style decoder-only transformer, in one file with no distributed code.

Design choices:
- Pre-norm blocks: RMSNorm -> attention -> residual, RMSNorm -> SwiGLU MLP -> residual.
  RMSNorm normalises in fp32 and casts back before the weight multiply, as HF Llama does,
  so bf16 training and an exported checkpoint compute the same thing.
- Module names match Hugging Face `LlamaForCausalLM` (`embed_tokens`, `layers.N.self_attn.q_proj`,
  ...), so export is a rename: prefix `model.` on everything but `lm_head`. No biases, except
  on q/k/v for the qwen2 family (`cfg.qkv_bias`), as Qwen2 has them; they start at zero.
- RoPE uses HF's convention (rotate_half over the two halves of the head dim). cos/sin are
  computed in fp32 on every forward rather than stored: DeepSpeed casts every floating
  buffer to bf16, and bf16 angles are visibly wrong at long positions. The table is
  T x head_dim/2 values, negligible next to the matmuls. Scaled RoPE (`rope_scaling`:
  linear, llama3) only changes the frequencies, so the RoPE kernels are untouched.
- Grouped-query attention (`n_kv_heads` divides `n_heads`) goes straight to
  `F.scaled_dot_product_attention`, which picks FlashAttention on GPU when it can.
- `forward` takes labels already aligned with the inputs (labels[t] is the target for
  position t; the data loader shifts) and returns the loss, so the logits never leave the
  model in training. Without labels it returns the logits.
- A preallocated `KVCache` serves sampling; positions start at `cache.length`, so a prompt
  prefill and one-token steps take the same path.
- Document masking (`model.doc_mask`, training and evaluation of packed windows): given
  `positions` (B, T), each token's position within its document, RoPE turns by them and
  attention is causal within each document (query q sees keys q - positions[q] .. q), so
  a packed window computes what each of its documents would alone. On CUDA the mask is a
  FlexAttention BlockMask (fully masked blocks are skipped); elsewhere, and with attention
  dropout (which flex lacks), SDPA takes a dense (B, 1, T, T) boolean mask, the
  reference. Without `positions` nothing changes: plain causal SDPA.
- The elementwise ops and the LM-head loss go through `dsfm.model.ops`, one function each
  with a Triton kernel and a PyTorch fallback; `cfg.kernels` picks per call (auto: Triton
  for CUDA tensors when installed). The fallbacks are the expressions this file always
  used, so `kernels=torch` computes what it always did.
- Training never materialises the (B*T, V) fp32 logits: `LMHead` computes the loss in
  token chunks (`ops.linear_cross_entropy`). The loss runs inside the lm_head module's own
  forward so ZeRO-3 gathers its weight through the usual module hooks.
- `activation_checkpointing` recomputes each block in backward (non-reentrant
  torch.utils.checkpoint, which replays dropout's RNG), trading ~1/3 more compute for
  keeping only the block inputs.
- Init: normal(0, init_std) everywhere, with the two projections that write into the
  residual stream (`o_proj`, `down_proj`) scaled by 1/sqrt(2 * n_layers) so the residual
  variance does not grow with depth (GPT-2). Each module draws from its own generator,
  seeded by the global seed and the module's name (`init_module`): the weights do not
  depend on the order modules are built in, so a model built partitioned across ranks
  (ZeRO-3, `dsfm.train.engine.build_model`) and initialised module by module equals one
  built whole.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from dsfm.model import ops
from dsfm.model.config import ModelConfig
from dsfm.model.sizes import flops_per_token

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: document masks stay dense (SDPA)
    create_block_mask = flex_attention = None

    class BlockMask:  # never built (use_flex is False); keeps isinstance checks valid
        pass


IGNORE_INDEX = -100


class KVCache:
    """Preallocated keys/values per layer, shape (B, n_kv_heads, max_len, head_dim).

    `length` is the number of positions filled; the model writes new keys at
    [length, length + T) in every layer and advances `length` once after the last layer.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v (B, n_kv_heads, T, hd) at the current position; return all keys so far."""
        end = self.length + k.shape[2]
        self.k[layer_idx][:, :, self.length : end] = k
        self.v[layer_idx][:, :, self.length : end] = v
        return self.k[layer_idx][:, :, :end], self.v[layer_idx][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        self.length = 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kernels: str = "torch"):
        super().__init__()
        self.eps = eps
        self.kernels = kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, ops.resolve(self.kernels, x))


def rope_frequencies(
    head_dim: int, theta: float, scaling: ModelConfig | None = None, device=None
) -> torch.Tensor:
    """The (head_dim/2,) fp32 rotation frequencies, rescaled as `scaling.rope_scaling` says."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    kind = scaling.rope_scaling if scaling is not None else None
    if kind == "linear":  # positions divided by the factor
        return inv_freq / scaling.rope_factor
    if kind != "llama3":
        return inv_freq
    # Llama 3.1: long wavelengths (low frequencies) slow down by the factor, short ones are
    # kept, and the band between is blended linearly in original_len / wavelength.
    factor = scaling.rope_factor
    orig = scaling.rope_original_max_len
    lo, hi = scaling.rope_low_freq_factor, scaling.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > orig / lo, inv_freq / factor, inv_freq)
    medium = (wavelen >= orig / hi) & (wavelen <= orig / lo)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, scaling: ModelConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables in fp32 for integer positions (T,) or (B, T): (T, hd) or (B, T, hd).

    `scaling`: a model config whose `rope_scaling` fields rescale the frequencies."""
    inv_freq = rope_frequencies(head_dim, theta, scaling, positions.device)
    freqs = positions.float()[..., None] * inv_freq  # (..., T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd): both halves turn by one angle
    return emb.cos(), emb.sin()


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels: str = "torch"
) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by the angles in cos/sin: (T, hd) for the whole batch, or
    (B, T, hd) per sample (document positions). The multiply runs in x's dtype."""
    if cos.dim() == 2:
        return ops.apply_rope(x, cos, sin, ops.resolve(kernels, x))
    B, H, T, hd = x.shape
    # The op takes one (T, hd) table: fold the batch into time. q and k are transposed
    # views of (B, T, H, hd) memory, so the fold is a view, not a copy.
    flat = x.transpose(1, 2).reshape(1, B * T, H, hd).transpose(1, 2)  # (1, H, B*T, hd)
    cos, sin = cos.reshape(B * T, hd), sin.reshape(B * T, hd)
    y = ops.apply_rope(flat, cos, sin, ops.resolve(kernels, x))  # (1, H, B*T, hd)
    return y.transpose(1, 2).reshape(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)


def use_flex(x: torch.Tensor, dropout: float) -> bool:
    """FlexAttention for document masks on CUDA; the dense SDPA mask elsewhere and with
    attention dropout, which flex_attention does not have."""
    return flex_attention is not None and x.is_cuda and dropout == 0.0


def doc_attention_mask(positions: torch.Tensor, flex: bool) -> torch.Tensor | BlockMask:
    """Causal attention within each document, from document positions (B, T).

    Query q sees key k when q - positions[q] <= k <= q: from the start of its own document
    up to itself. Dense: a boolean (B, 1, T, T) mask for SDPA, True = attend. Flex: the
    same predicate as a BlockMask.
    """
    B, T = positions.shape
    idx = torch.arange(T, device=positions.device)
    start = idx - positions  # (B, T): where each token's document begins in the window
    if flex:
        # Built outside any compiled graph (a graph break under train.compile): flex then
        # gets the mask's tensors as inputs, the form inductor lowers.
        return torch.compiler.disable(_flex_block_mask)(start)
    causal = idx[None, :] <= idx[:, None]  # (T, T) [query, key]
    same_doc = idx[None, None, :] >= start[:, :, None]  # (B, T, T)
    return (causal & same_doc).unsqueeze(1)  # (B, 1, T, T)


def _flex_block_mask(start: torch.Tensor) -> BlockMask:
    B, T = start.shape

    def same_doc_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx >= start[b, q_idx])

    return _fused(create_block_mask, start)(same_doc_causal, B, None, T, T, device=start.device)


def _fused(fn, x: torch.Tensor):
    """`fn` compiled for CUDA tensors: eager flex_attention materialises the (T, T) scores
    and eager create_block_mask the (B, T, T) mask, compiled each is fused. Inside a
    compiled model (train.compile) `fn` itself, which the model's graph compiles; on CPU
    (tests only) `fn` eagerly, the unfused reference."""
    if x.is_cuda and not torch.compiler.is_compiling():
        return _compiled(fn)
    return fn


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)  # once per function, not per call


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.kernels = cfg.kernels
        d, hd = cfg.d_model, cfg.head_dim
        bias = cfg.qkv_bias
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        doc_mask: torch.Tensor | BlockMask | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        hd = self.head_dim
        q = self.q_proj(x).view(B, T, self.n_heads, hd).transpose(1, 2)  # (B, n_heads, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, hd).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rope(q, cos, sin, self.kernels), apply_rope(k, cos, sin, self.kernels)

        mask, is_causal = None, True
        if cache is not None:
            past = cache.length
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, past + T, hd)
            if T == 1:
                is_causal = False  # one new query may see every cached key
            elif past > 0:
                # SDPA's is_causal aligns the triangle top-left, which is wrong once there
                # are more keys than queries; query i sits at position past + i.
                is_causal = False
                q_pos = torch.arange(past, past + T, device=x.device)
                k_pos = torch.arange(past + T, device=x.device)
                mask = k_pos[None, :] <= q_pos[:, None]  # (T, past + T), True = attend
        if doc_mask is not None:  # never with a cache (GPT.forward refuses both)
            mask, is_causal = doc_mask, False

        if isinstance(mask, BlockMask):
            y = _fused(flex_attention, q)(
                q, k, v, block_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads
            )  # (B, n_heads, T, hd)
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal,
                enable_gqa=self.n_kv_heads != self.n_heads,
            )  # (B, n_heads, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * hd)  # (B, T, n_heads * hd)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)
        self.kernels = cfg.kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ops.swiglu(self.gate_proj(x), self.up_proj(x), ops.resolve(self.kernels, x))
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache | None = None,
        doc_mask: torch.Tensor | BlockMask | None = None,
    ) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, cache, doc_mask)
        x = x + self.resid_dropout(h)
        x = x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))
        return x


class LMHead(nn.Linear):
    """The output projection; given labels it returns the chunked cross-entropy instead.

    An `nn.Linear` (same weight name and type for export, LoRA and resizing) whose forward
    also owns the loss, so ZeRO-3's module hooks gather the weight for it.
    """

    def __init__(self, d_model: int, vocab_size: int, kernels: str = "torch"):
        super().__init__(d_model, vocab_size, bias=False)
        self.kernels = kernels

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return F.linear(x, self.weight)
        # Logits in fp32 per chunk for the softmax: bf16 log-probs over a large vocabulary
        # are too coarse. Sum / count: an all-masked batch (a prompt-only window of
        # instruction data) gives 0 instead of NaN.
        return ops.linear_cross_entropy(
            x, self.weight, labels, ignore_index=IGNORE_INDEX, impl=ops.resolve(self.kernels, x)
        )


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg = cfg.checked()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, cfg.kernels)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-draw every weight (deterministic under torch.manual_seed; see `init_module`)."""
        for name, module in self.named_modules():
            self.init_module(name, module)

    @torch.no_grad()
    def init_module(self, name: str, module: nn.Module) -> None:
        """Draw `module`'s own weights (not its children's) from a generator seeded by the
        global seed (`torch.initial_seed()`) and `name`."""
        if isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        if not isinstance(module, (nn.Linear, nn.Embedding)) or module.weight.is_meta:
            return
        key = hashlib.sha256(f"{torch.initial_seed()}/{name}".encode()).digest()
        g = torch.Generator(module.weight.device).manual_seed(int.from_bytes(key[:8], "big") >> 1)
        std = self.cfg.init_std
        if name.endswith(("o_proj", "down_proj")):
            std /= math.sqrt(2 * self.cfg.n_layers)
        module.weight.normal_(0.0, std, generator=g)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss (scalar, mean over labels != -100) when `labels` is given, else logits (B, T, V).

        `labels[b, t]` is the target for position t (already shifted by the caller). With a
        `cache`, the inputs continue the cached sequence and their keys/values are appended.
        `positions` (B, T) turns on document masking: each token's position within its
        document, 0 where one starts (`dsfm.data.dataset.doc_positions`); RoPE uses them
        and each token attends only to its own document's earlier tokens.
        """
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        self._check_inputs(input_ids, past, cache)

        doc_mask = None
        if positions is None:
            positions = torch.arange(past, past + T, device=input_ids.device)  # (T,)
        else:
            if cache is not None or positions.shape != input_ids.shape:
                raise ValueError(
                    f"positions must match input_ids {tuple(input_ids.shape)} and come without "
                    f"a KV cache (document masking is for training and evaluation); got "
                    f"{tuple(positions.shape)}{' with a cache' if cache is not None else ''}"
                )
            dropout = self.cfg.dropout if self.training else 0.0
            doc_mask = doc_attention_mask(positions, flex=use_flex(positions, dropout))
        # (T, hd), or (B, T, hd) per document
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.cfg)

        x = self.embed_tokens(input_ids)  # (B, T, d)
        recompute = self.cfg.activation_checkpointing and self.training and cache is None
        for layer in self.layers:
            if recompute and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, doc_mask=doc_mask, use_reentrant=False
                )
            else:
                x = layer(x, cos, sin, cache, doc_mask)
        x = self.norm(x)
        if cache is not None:
            cache.advance(T)
        return self.lm_head(x, labels)  # logits (B, T, V), or the loss given labels

    def _check_inputs(self, input_ids: torch.Tensor, past: int, cache: KVCache | None) -> None:
        B, T = input_ids.shape
        if past + T > self.cfg.max_seq_len:
            raise ValueError(
                f"sequence of {past + T} tokens ({past} cached + {T} new) exceeds "
                f"max_seq_len={self.cfg.max_seq_len}"
            )
        if cache is not None:
            if past + T > cache.max_len:
                raise ValueError(
                    f"KV cache holds {cache.max_len} positions; {past} used + {T} new do not fit"
                )
            if cache.batch_size != B:
                raise ValueError(f"batch size {B} does not match the cache's {cache.batch_size}")
        if input_ids.device.type != "cpu" or input_ids.numel() == 0:
            # On an accelerator the check would wait for the device on every forward; training
            # data is checked on the host as it is read (`TokenDataset.batch`).
            return
        lo, hi = torch.aminmax(input_ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {self.cfg.vocab_size}) (vocab_size); "
                f"got min {lo}, max {hi}"
            )

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache on the model's device and dtype (max_len defaults to max_seq_len)."""
        p = next(self.parameters())
        return KVCache(
            self.cfg.n_layers,
            batch_size,
            self.cfg.n_kv_heads,
            max_len if max_len is not None else self.cfg.max_seq_len,
            self.cfg.head_dim,
            device=p.device,
            dtype=p.dtype,
        )

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors counted once).

        non_embedding drops the token embedding and, when untied, the lm_head: the
        convention of the scaling-law papers and of `flops_per_token`.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token at this context length (`sizes.flops_per_token`)."""
        return flops_per_token(self.cfg, seq_len)
