"""Parameter and FLOP counts from the model config alone: no torch, so `dsfm plan` starts fast.

`GPT.num_params` counts the built module; these count the same tensors from the sizes
(tests check they agree exactly). `flops_per_token` is the one training-FLOPs formula
(metrics' MFU, benchmarks and the planner all use it).
"""

from __future__ import annotations

from dsfm.model.config import ModelConfig


def block_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer block (attention, SwiGLU MLP, two RMSNorms)."""
    cfg = cfg.checked()
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # q, o + k, v
    if cfg.qkv_bias:
        attn += (cfg.n_heads + 2 * cfg.n_kv_heads) * hd
    mlp = 3 * d * cfg.ffn_hidden
    return attn + mlp + 2 * d


def embedding_params(cfg: ModelConfig) -> int:
    """Token embedding plus, when untied, the lm_head."""
    return cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)


def non_embedding_params(cfg: ModelConfig) -> int:
    """Parameter count without the token embedding and lm_head, from the config alone."""
    return cfg.n_layers * block_params(cfg) + cfg.d_model  # + final norm


def num_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """What `GPT(cfg).num_params(non_embedding)` returns, without building the model."""
    n = non_embedding_params(cfg)
    return n if non_embedding else n + embedding_params(cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM appendix B.

    6N for the weight matmuls (N = non-embedding parameters) plus 12 * L * d * T for the
    attention scores and weighted sum, which grow with the context length T.
    """
    return 6.0 * non_embedding_params(cfg) + 12.0 * cfg.n_layers * cfg.d_model * seq_len
