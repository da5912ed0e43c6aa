"""Every Triton kernel compiles for A100, RTX 4090 and H100 in every launch dsfm can make.

Triton compiles for a `GPUTarget` without a GPU (its wheel ships ptxas and cuobjdump). For
each kernel x launch x dtype x architecture this test compiles real cubin and checks what
the hardware needs for the kernel to launch and to run from registers: at most 1024
threads, 255 registers per thread and 64 K per block, no more spilling than a few
registers, and shared memory within the architecture's per-block limit.

What is compiled is what the launchers pick: the test calls the real launchers (`forward`,
`backward`, `rotate`) on CPU tensors shaped like the model's calls, with the kernels swapped
for a recorder, so BLOCK, num_warps and every argument come from the launch code itself
(`block_size`, `num_warps`/`NUM_WARPS` in each kernel module). The shapes reach every block
those choices give over the sizes dsfm uses, in the dtypes the model trains in:
- RMSNorm: every block from 64 columns (the test suite's 48- and 64-wide models) to the
  documented maximum width `_rmsnorm_triton.MAX_D` = 8192 (the presets: 128 to 2048).
  RoPE: every block from 8 columns (head sizes 12 and 16 of those models) to head size
  `_rope_triton.MAX_HEAD_DIM` = 8192 (the presets: 64 and 128). Narrower blocks give each
  of the 128 threads of 4 warps at most one column, like these: the same code, more lanes
  masked. SwiGLU: its one fixed block.
- Cross-entropy (fp32 logits, int64 labels): the byte tokenizer's 257 and a 512 vocabulary
  (block 512), and 32000, 50257 and 128256 (Llama 2, GPT-2, Llama 3; block 1024). The
  tokenizers make nothing below 257, and every vocabulary above 512 runs the 1024 block.
- Triton compiles a separate variant when sizes are multiples of 16 and pointers 16-byte
  aligned (it vectorises on that), so each block is compiled both ways where both exist:
  "x16" shapes (the presets') and "odd" ones (sizes not multiples of 16, tensors starting
  one element into their storage); the odd ones take up to half again as many registers. Sizes equal
  to 1 (one token, one KV head), which Triton folds into constants, only remove code and
  are not compiled separately.

Identical compilations are compiled once, in two worker processes that run without
TRITON_INTERPRET (tests/conftest.py sets it without a GPU; under it `triton.jit` returns an
interpreted function that never reaches the compiler); each worker checks it compiled a
JITFunction.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# The test process may run under Triton's interpreter (tests/conftest.py sets it where there
# is no GPU) and only records launches; the compiles run in workers (this file run as a
# script) without TRITON_INTERPRET.
import pytest

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

import torch  # noqa: E402

from dsfm.model.ops import _cross_entropy_triton as ce  # noqa: E402
from dsfm.model.ops import _rmsnorm_triton as rmsnorm  # noqa: E402
from dsfm.model.ops import _rope_triton as rope  # noqa: E402
from dsfm.model.ops import _swiglu_triton as swiglu  # noqa: E402

MODULES = {"rmsnorm": rmsnorm, "swiglu": swiglu, "rope": rope, "ce": ce}


@dataclass(frozen=True)
class Arch:
    cc: int  # compute capability x 10
    gpus: str
    max_shared: int  # bytes of shared memory one block may use (opt-in maximum)


# NVIDIA CUDA C++ Programming Guide, "Technical Specifications per Compute Capability":
# shared memory per block 163 KB (8.0), 99 KB (8.9), 227 KB (9.0); for all three, 255
# registers per thread, 64 K registers and 1024 threads per block.
ARCHS = (
    Arch(80, "A100", 163 * 1024),
    Arch(89, "RTX 4060/4090, L4", 99 * 1024),
    Arch(90, "H100", 227 * 1024),
)
# Triton tells ptxas the block size (.reqntid), so ptxas spills rather than exceed the two
# register limits: the spill bound below is the one that bites. The register checks state
# the hardware's limits all the same, in case a Triton release stops doing so.
MAX_REGS_PER_THREAD = 255
MAX_REGS_PER_BLOCK = 64 * 1024
MAX_THREADS_PER_BLOCK = 1024
REG_ALLOC_UNIT = 8  # registers are allocated per warp in units of 256 = 8 per thread
# ptxas sometimes parks a loop-invariant value or two in local memory (e.g. 4 bytes in the
# RMSNorm backward on sm_80), an L1 hit per row; a row that no longer fits in registers
# spills hundreds of bytes per thread and turns a bandwidth-bound kernel into a spill-bound one.
MAX_SPILL_BYTES = 16

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRITON_TYPES = {
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.float32: "fp32",
    torch.int64: "i64",
    torch.int32: "i32",
}
WORKERS = 2
WORKER_TIMEOUT_S = 300  # the whole file takes ~30 s on 2 idle cores from a cold cache

# ---------------------------------------------------------------- the shapes


def _sizes(block_size, smallest_block: int, largest: int) -> list[tuple[int, str]]:
    """(size, variant) for every block `block_size` returns on even sizes up to `largest`,
    from `smallest_block` up: one size that is a multiple of 16 ("x16") and one that is not
    ("odd"), the largest of each (the size itself is a runtime argument)."""
    sizes = {}
    for size in range(2, largest + 1, 2):
        block = block_size(size)
        if block >= smallest_block:
            kind = "x16" if size % 16 == 0 else "odd"
            sizes[(block, kind)] = max(size, sizes.get((block, kind), 0))
    return sorted((size, kind) for (_, kind), size in sizes.items())


# From the blocks of the test suite's tiny models (see the module docstring) up.
RMSNORM_WIDTHS = _sizes(rmsnorm.block_size, 64, rmsnorm.MAX_D)
ROPE_HEAD_DIMS = _sizes(rope.block_size, 8, rope.MAX_HEAD_DIM)
SWIGLU_SIZES = [(256 * 5632, "x16"), (3 * 37, "odd")]  # 256 tokens of the 1.4b's MLP; odd
CE_VOCABS = [(257, "odd"), (512, "x16"), (32000, "x16"), (50257, "odd"), (128256, "x16")]


@dataclass(frozen=True)
class Case:
    op: str  # rmsnorm, swiglu, rope, ce
    kernel: str  # the kernel's name in its module
    direction: str  # which launch: forward/backward (rope: forward/inverse)
    size: int  # width, elements, head size or vocabulary
    variant: str  # x16 or odd
    dtype: str
    arch: Arch

    @property
    def id(self) -> str:
        return (
            f"{self.op}.{self.direction}-{self.size}-{self.variant}-{self.dtype}-sm_{self.arch.cc}"
        )


SIZE_NAMES = {"rmsnorm": "d_model", "swiglu": "elements", "rope": "head_dim", "ce": "vocab"}


def _cases() -> list[Case]:
    cases = []
    for arch in ARCHS:
        for dtype in DTYPES:
            for d, kind in RMSNORM_WIDTHS:
                cases.append(Case("rmsnorm", "_fwd", "forward", d, kind, dtype, arch))
                cases.append(Case("rmsnorm", "_bwd", "backward", d, kind, dtype, arch))
            for n, kind in SWIGLU_SIZES:
                cases.append(Case("swiglu", "_fwd", "forward", n, kind, dtype, arch))
                cases.append(Case("swiglu", "_bwd", "backward", n, kind, dtype, arch))
            for hd, kind in ROPE_HEAD_DIMS:
                cases.append(Case("rope", "_rotate", "forward", hd, kind, dtype, arch))
                cases.append(Case("rope", "_rotate", "inverse", hd, kind, dtype, arch))
        for v, kind in CE_VOCABS:  # logits are always fp32
            cases.append(Case("ce", "_fwd", "forward", v, kind, "fp32", arch))
            cases.append(Case("ce", "_bwd", "backward", v, kind, "fp32", arch))
    return cases


CASES = _cases()

# ---------------------------------------------------------------- recording the launches


class _Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self) -> None:
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, variant: str) -> torch.Tensor:
    """A tensor 16-byte aligned ("x16") or starting one element into its storage ("odd")."""
    numel = 1
    for s in shape:
        numel *= s
    skip = 0 if variant == "x16" else 1
    t = torch.zeros(numel + skip, dtype=dtype)[skip:].view(shape)
    assert (t.data_ptr() % 16 == 0) == (variant == "x16")
    return t


def _launch(case: Case, module, dtype: torch.dtype) -> None:
    """Call the launcher for `case` as the model would (kernels swapped for recorders)."""
    v = case.variant
    if case.op == "rmsnorm":
        rows = 256 if v == "x16" else 273  # many rows per program in backward either way
        x = _tensor((rows, case.size), dtype, v)
        w = _tensor((case.size,), dtype, v)
        if case.direction == "forward":
            module.forward(x, w, 1e-5)
        else:
            module.backward(_tensor(x.shape, dtype, v), x, w, _tensor((rows,), torch.float32, v))
    elif case.op == "swiglu":
        g, u = _tensor((case.size,), dtype, v), _tensor((case.size,), dtype, v)
        if case.direction == "forward":
            module.forward(g, u)
        else:
            module.backward(_tensor((case.size,), dtype, v), g, u)
    elif case.op == "rope":
        B, T, H, hd = (1, 16, 16, case.size) if v == "x16" else (1, 5, 3, case.size)
        q = _tensor((B, T, H, hd), dtype, v).transpose(1, 2)  # (B, H, T, hd) view, as in gpt
        cos, sin = torch.ones(T, hd), torch.zeros(T, hd)  # fp32 tables (rope.py makes them so)
        module.rotate(q, cos, sin, inverse=case.direction == "inverse")
    else:
        n = 16 if v == "x16" else 5
        logits, labels = _tensor((n, case.size), torch.float32, v), _tensor((n,), torch.int64, v)
        if case.direction == "forward":
            module.forward(logits, labels, -100)
        else:
            lse, grad = _tensor((n,), torch.float32, v), torch.ones(())
            module.backward(logits, labels, lse, grad, -100)


def _describe(value) -> list:
    """A launch argument as far as Triton specialises on it (so equal compiles dedupe):
    pointers by element type and 16-byte alignment, ints by width, being 1 and being a
    multiple of 16, floats not at all (they are always fp32)."""
    if isinstance(value, torch.Tensor):
        return ["ptr", TRITON_TYPES[value.dtype], value.data_ptr() % 16 == 0]
    if isinstance(value, bool):
        raise TypeError("bool kernel arguments are not handled")
    if isinstance(value, int):
        width = "i32" if -(2**31) <= value < 2**31 else "i64"
        return ["int", width, value % 16 == 0, value == 1]
    if isinstance(value, float):
        return ["float"]
    raise TypeError(f"unexpected kernel argument {value!r}")


def _job(case: Case) -> dict:
    """The compile job for a case: kernel, described arguments, options and target."""
    module = MODULES[case.op]
    recorder = _Recorder()
    real = getattr(module, case.kernel)
    setattr(module, case.kernel, recorder)
    try:
        _launch(case, module, DTYPES[case.dtype])
    finally:
        setattr(module, case.kernel, real)
    assert len(recorder.launches) == 1, f"{case.id}: expected one launch"
    args, kwargs = recorder.launches[0]
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    return {
        "module": module.__name__,
        "kernel": case.kernel,
        "args": [_describe(a) for a in args],
        "kwargs": kwargs,
        "options": options,
        "arch": case.arch.cc,
    }


# ---------------------------------------------------------------- compiling (worker side)


def _signature(kernel, job: dict) -> tuple[dict, dict, dict]:
    """Triton's (signature, constexprs, attrs) for the described arguments, by the JIT's
    own rules: ints equal to 1 become constants, ints that are multiples of 16 and 16-byte
    aligned pointers get `tt.divisibility` 16; floats are fp32 and never specialised."""
    values = dict(zip(kernel.arg_names, job["args"]))
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", job["kwargs"][p.name]
            continue
        kind, *rest = values[p.name]
        divisible = False
        if kind == "ptr":
            signature[p.name], divisible = "*" + rest[0], rest[1]
        elif kind == "int":
            width, multiple_of_16, is_one = rest
            if is_one and not p.do_not_specialize:
                signature[p.name], constexprs[p.name] = "constexpr", 1
                continue
            signature[p.name], divisible = width, multiple_of_16 and not p.do_not_specialize
        else:
            signature[p.name] = "fp32"
        if divisible and not p.do_not_specialize_on_alignment:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _resources(cubin: bytes) -> dict:
    """Registers, stack (spill) bytes and static shared memory from cuobjdump."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        cmd = [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", str(path)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED):(\d+)", out)}
    return {"regs": usage["REG"], "stack": usage["STACK"], "static_shared": usage["SHARED"]}


def _compile(job: dict) -> dict:
    from triton.backends.compiler import GPUTarget

    kernel = getattr(importlib.import_module(job["module"]), job["kernel"])
    if not isinstance(kernel, triton.runtime.JITFunction):
        raise TypeError(f"{job['kernel']} is a {type(kernel).__name__}, not a JITFunction")
    signature, constexprs, attrs = _signature(kernel, job)
    src = triton.compiler.ASTSource(kernel, signature, constexprs, attrs)
    compiled = triton.compile(
        src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"]
    )
    target = re.search(r"^\.target (sm_\w+)", compiled.asm["ptx"], re.M).group(1)
    return {
        "ptx_target": target,
        "cubin_bytes": len(compiled.asm["cubin"]),
        "num_warps": compiled.metadata.num_warps,
        "shared": compiled.metadata.shared,
        **_resources(compiled.asm["cubin"]),
    }


def _worker(jobs_path: str, out_path: str) -> None:
    """Compile the jobs in `jobs_path`; write one result (or error) per job to `out_path`."""
    import warnings

    warnings.simplefilter("ignore")
    results = []
    for job in json.loads(Path(jobs_path).read_text()):
        try:
            results.append(_compile(job))
        except Exception as e:  # reported by the test that needs this compile
            results.append({"error": f"{type(e).__name__}: {e}"[-4000:]})
    Path(out_path).write_text(json.dumps(results))


# ---------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def compiled() -> dict[str, tuple[dict, dict]]:
    """case id -> (job, result), each distinct job compiled once across the workers."""
    jobs = {case.id: _job(case) for case in CASES}
    unique = sorted({json.dumps(j, sort_keys=True) for j in jobs.values()})
    # Widest blocks first, dealt round-robin, so the two workers finish together.
    unique.sort(key=lambda j: -json.loads(j)["kwargs"].get("BLOCK", 0))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        try:
            for w in range(WORKERS):
                mine = unique[w::WORKERS]
                jobs_path, out_path = Path(tmp) / f"jobs{w}.json", Path(tmp) / f"out{w}.json"
                jobs_path.write_text(json.dumps([json.loads(j) for j in mine]))
                log = Path(tmp) / f"log{w}.txt"  # a file, not a pipe: ptxas errors print PTX
                cmd = [sys.executable, __file__, str(jobs_path), str(out_path)]
                with open(log, "w") as f:
                    proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
                procs.append((proc, log, mine, out_path))
            for proc, log, mine, out_path in procs:
                try:
                    code = proc.wait(timeout=WORKER_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"compiling took over {WORKER_TIMEOUT_S} s:\n{log.read_text()}")
                assert code == 0, f"compile worker exited {code}:\n{log.read_text()[-6000:]}"
                results.update(zip(mine, json.loads(out_path.read_text())))
        finally:
            for proc, *_ in procs:
                proc.kill()  # only ours, and a no-op for those that finished
                proc.wait()
    return {cid: (job, results[json.dumps(job, sort_keys=True)]) for cid, job in jobs.items()}


def _problems(case: Case, job: dict, r: dict) -> list[str]:
    if "error" in r:
        return [f"does not compile: {r['error']}"]
    arch = case.arch
    threads = 32 * r["num_warps"]
    regs_per_block = -(-r["regs"] // REG_ALLOC_UNIT) * REG_ALLOC_UNIT * threads
    shared = r["shared"] + r["static_shared"]
    p = []
    if not r["ptx_target"].startswith(f"sm_{arch.cc}") or r["cubin_bytes"] == 0:
        p.append(f"no cubin for sm_{arch.cc} (PTX targets {r['ptx_target']})")
    if "num_warps" not in job["options"]:
        p.append("the launch leaves num_warps to Triton's default; name the choice")
    elif r["num_warps"] != job["options"]["num_warps"]:
        p.append(f"compiled with {r['num_warps']} warps, launched with {job['options']}")
    if threads > MAX_THREADS_PER_BLOCK:
        p.append(f"{threads} threads per block > {MAX_THREADS_PER_BLOCK}")
    if r["regs"] > MAX_REGS_PER_THREAD:
        p.append(f"{r['regs']} registers per thread > {MAX_REGS_PER_THREAD}")
    if regs_per_block > MAX_REGS_PER_BLOCK:
        p.append(f"{regs_per_block} registers per block > {MAX_REGS_PER_BLOCK}")
    if r["stack"] > MAX_SPILL_BYTES:
        p.append(
            f"{r['stack']} bytes of stack per thread (register spills) > {MAX_SPILL_BYTES} "
            f"at {r['regs']} registers"
        )
    if shared > arch.max_shared:
        p.append(f"{shared} bytes of shared memory > {arch.max_shared} per block")
    return p


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_kernel_compiles_and_fits(case: Case, compiled) -> None:
    job, r = compiled[case.id]
    problems = _problems(case, job, r)
    config = ", ".join(f"{k}={v}" for k, v in {**job["kwargs"], **job["options"]}.items())
    assert not problems, (
        f"{case.op}.{case.kernel} ({case.direction}) {SIZE_NAMES[case.op]}={case.size} "
        f"({case.variant}): {config}, {case.dtype}, on sm_{case.arch.cc} "
        f"({case.arch.gpus}): " + "; ".join(problems) + f"\nresources: {r}"
    )


if __name__ == "__main__":  # a compile worker (see `compiled`)
    _worker(*sys.argv[1:3])
