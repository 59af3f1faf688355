"""Registers, stack and shared memory of every Triton kernel, compiled for sm_80 and sm_90 without a GPU.

    python bench/kernel_resources.py            # -> bench/results/kernel-resources-sm80-sm90.md
    python bench/kernel_resources.py --plain    # also the plain-typed compiles (see SPECS)

triton compiles for a GPU target on a CPU-only machine (ptxas and cuobjdump ship inside the wheel), so every
launch configuration the kernels use for the shipped model configs (``recipes/models`` plus SmolLM2-135M) is
compiled here, for each dtype, and ``cuobjdump --dump-resource-usage`` reads its registers and stack. A stack
frame (``STACK`` > 0) means spills to local memory. ``tests/kernels/test_aot_compile.py`` asserts there are none,
using the same case list and compile function as this script.

The block sizes and ``num_warps`` come from each kernel module's ``launch_config`` (what the launch code calls),
so the compiles are the kernels that really run. Arguments are specialised as Triton's JIT does at launch
(``SPECS``): tensors from torch's allocator are 16-byte aligned and every shipped hidden size, head dim and vocab
is a multiple of 16, which the JIT marks as ``tt.divisibility=16`` (vectorised loads); an int equal to 1 becomes a
constant. Sizes that depend on the batch (rows, tokens, sequence length) are compiled as plain ints.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as dt
import importlib
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for source in (ROOT / "kernels", ROOT):  # importable without installing ftlaunch (`ftkernels` lives in kernels/)
    if str(source) not in sys.path:
        sys.path.insert(0, str(source))

MODELS_DIR = ROOT / "recipes" / "models"
RESULTS_DIR = ROOT / "bench" / "results"
TARGETS: tuple[int, ...] = (80, 90)  # compute capabilities: A100, H100/H200
DTYPES: tuple[str, ...] = ("bf16", "fp16", "fp32")
# "runtime": what the JIT builds for the shipped shapes (aligned pointers, dims divisible by 16 marked as such).
# "plain": bare types, no alignment or divisibility: what the JIT builds for unaligned views or odd sizes.
SPECS: tuple[str, ...] = ("runtime", "plain")
# A representative token count (rows, or batch x sequence) for sizes that depend on the batch; odd on purpose so
# it gets no divisibility attribute (the JIT would give one to a multiple of 16, which only helps).
TOKENS = 4097

# SmolLM2-135M (the demo model) is not in recipes/models: its dimensions, from its config.json.
SMOLLM2_135M = {"name": "smollm2-135m", "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int


def model_shapes(models_dir: Path = MODELS_DIR) -> list[ModelShape]:
    """The shipped model configs plus SmolLM2-135M, with the dimensions the kernels see."""
    cfgs = [SMOLLM2_135M]
    for path in sorted(models_dir.glob("*/config.json")):
        cfgs.append({"name": path.parent.name, **json.loads(path.read_text())})
    shapes = []
    for c in cfgs:
        heads = c["num_attention_heads"]
        shapes.append(ModelShape(
            name=c["name"], hidden=c["hidden_size"], intermediate=c["intermediate_size"], n_heads=heads,
            n_kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            vocab=c["vocab_size"]))
    return shapes


# ---- arguments, and how the JIT specialises them -------------------------------------------------------------

@dataclass(frozen=True)
class Ptr:
    """A tensor argument of the given element type (e.g. ``bf16``), allocated by torch (16-byte aligned)."""
    dtype: str


@dataclass(frozen=True)
class Int:
    """An int argument with a representative value."""
    value: int


def _int_type(v: int) -> str:
    if -2**31 <= v < 2**31:
        return "i32"
    return "i64" if v < 2**63 else "u64"


@dataclass(frozen=True)
class CompileKey:
    """One compile: identical keys are one binary, whichever models launch it."""
    module: str  # ftkernels.rmsnorm
    attr: str  # the LazyKernel's name in the module, _RMS_BWD
    kernel: str  # the kernel function's name, _rms_bwd
    dtype: str  # label of the tensor dtypes, e.g. bf16 or bf16/w-fp32
    spec: str  # runtime or plain
    arch: int  # 80 or 90
    num_warps: int
    signature: tuple[tuple[str, str], ...]  # every argument in order: (name, type or "constexpr")
    constexprs: tuple[tuple[str, object], ...]
    divisible: tuple[str, ...]  # arguments marked tt.divisibility=16

    def describe_constexprs(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.constexprs)

    def describe_args(self) -> str:
        """Non-pointer runtime arguments with their type, ``/16`` where marked divisible by 16."""
        return " ".join(f"{n}:{t}{'/16' if n in self.divisible else ''}" for n, t in self.signature
                        if t != "constexpr" and not t.startswith("*"))

    def label(self) -> str:
        return (f"{self.kernel} {self.dtype} sm_{self.arch} {self.spec} [{self.describe_constexprs()}] "
                f"num_warps={self.num_warps}")


def make_key(module: str, attr: str, kernel: str, dtype: str, spec: str, arch: int, num_warps: int,
             args: Sequence[tuple[str, object]], constexprs: dict[str, object]) -> CompileKey:
    """The compile the JIT would do for these argument values (``spec="runtime"``), or its bare-typed version."""
    signature: list[tuple[str, str]] = []
    consts = dict(constexprs)
    divisible: list[str] = []
    for name, arg in args:
        if isinstance(arg, Ptr):
            ty, div = f"*{arg.dtype}", True
        elif isinstance(arg, Int):
            if spec == "runtime" and arg.value == 1:  # the JIT turns an int equal to 1 into a constant
                signature.append((name, "constexpr"))
                consts[name] = 1
                continue
            ty, div = _int_type(arg.value), arg.value % 16 == 0
        elif isinstance(arg, float):
            ty, div = "fp32", False
        elif arg == "constexpr":
            signature.append((name, "constexpr"))
            continue
        else:
            raise TypeError(f"{name}: unsupported argument {arg!r}")
        signature.append((name, ty))
        if div and spec == "runtime":
            divisible.append(name)
    missing = [n for n in consts if n not in dict(signature)]
    if missing:
        raise ValueError(f"{kernel}: constexprs {missing} are not arguments")
    ordered = tuple((n, consts[n]) for n, t in signature if t == "constexpr")
    return CompileKey(module, attr, kernel, dtype, spec, arch, num_warps, tuple(signature), ordered,
                      tuple(divisible))


# ---- the launches of each kernel for a model ------------------------------------------------------------------
# Each returns (module, attr, kernel, dtype label, num_warps, args in kernel order, constexprs) for one model and
# input dtype, taking block sizes and warps from the module's launch_config, as the launch code does.

Launch = tuple[str, str, str, str, int, list[tuple[str, object]], dict[str, object]]
CX = "constexpr"


def rmsnorm_launches(m: ModelShape, dt: str) -> list[Launch]:
    from ftkernels import rmsnorm

    n = m.hidden
    # the weight has the activations' dtype, or fp32 where prepare_model_for_kbit_training upcast the norms
    # (then the output, and so the incoming gradient, is fp32 by type promotion)
    combos = [(dt, dt, dt)] + ([(dt, "fp32", "fp32")] if dt != "fp32" else [])
    out: list[Launch] = []
    for x_t, w_t, y_t in combos:
        label = x_t if w_t == x_t else f"{x_t}/w-fp32"
        block, warps = rmsnorm.launch_config(n)
        out.append(("ftkernels.rmsnorm", "_RMS_FWD", "_rms_fwd", label, warps,
                    [("X", Ptr(x_t)), ("W", Ptr(w_t)), ("Y", Ptr(y_t)), ("RSTD", Ptr("fp32")),
                     ("stride_x", Int(n)), ("stride_y", Int(n)), ("n_cols", Int(n)), ("eps", 1e-5),
                     ("offset", 0.0), ("CAST_FIRST", CX), ("BLOCK", CX)],
                    {"CAST_FIRST": True, "BLOCK": block}))
        cfg = rmsnorm.bwd_launch_config(n, wide_dy=y_t != x_t)
        out.append(("ftkernels.rmsnorm", "_RMS_BWD", "_rms_bwd", label, cfg["num_warps"],
                    [("DY", Ptr(y_t)), ("X", Ptr(x_t)), ("W", Ptr(w_t)), ("RSTD", Ptr("fp32")), ("DX", Ptr(x_t)),
                     ("DW", Ptr("fp32")), ("stride_dy", Int(n)), ("stride_x", Int(n)), ("stride_dx", Int(n)),
                     ("n_rows", Int(TOKENS)), ("n_cols", Int(n)), ("offset", 0.0), ("rows_per_prog", Int(31)),
                     ("CAST_FIRST", CX), ("BLOCK", CX), ("RELOAD_W", CX), ("RELOAD_X", CX)],
                    {"CAST_FIRST": True, **{k: v for k, v in cfg.items() if k != "num_warps"}}))
    return out


def rope_launches(m: ModelShape, dt: str) -> list[Launch]:
    from ftkernels import rope

    cfg = dict(rope.launch_config(m.n_heads, m.n_kv_heads, m.head_dim))
    warps = cfg.pop("num_warps")
    hd, s = m.head_dim, TOKENS
    # transformers hands over [bs, seq, heads, dim] projections viewed as [bs, heads, seq, dim]; cos/sin are
    # [1, seq, dim] expanded over the batch (batch stride 0)
    q_str = [Int(s * m.n_heads * hd), Int(hd), Int(m.n_heads * hd)]
    k_str = [Int(s * m.n_kv_heads * hd), Int(hd), Int(m.n_kv_heads * hd)]
    args: list[tuple[str, object]] = [(n, Ptr(dt)) for n in ("Q", "K", "QO", "KO", "COS", "SIN")]
    args += [("seq_len", Int(s)), ("n_q", Int(m.n_heads)), ("n_k", Int(m.n_kv_heads))]
    args += list(zip(("sq_b", "sq_h", "sq_s"), q_str)) + list(zip(("sk_b", "sk_h", "sk_s"), k_str))
    args += list(zip(("sqo_b", "sqo_h", "sqo_s"), q_str)) + list(zip(("sko_b", "sko_h", "sko_s"), k_str))
    args += [("sc_b", Int(0)), ("sc_s", Int(hd))]
    args += [(n, CX) for n in ("BACKWARD", "HALF", "BLOCK_HQ", "BLOCK_HK", "BLOCK_D")]
    return [("ftkernels.rope", "_ROPE", "_rope_kernel", dt, warps, args, {"BACKWARD": bwd, **cfg})
            for bwd in (False, True)]


def swiglu_launches(m: ModelShape, dt: str) -> list[Launch]:
    from ftkernels import swiglu

    cfg = dict(swiglu.launch_config())
    warps = cfg.pop("num_warps")
    out: list[Launch] = []
    # n = tokens x intermediate: an i64 once it passes 2**31 (e.g. 41k tokens of Llama-405B's 53248)
    for n in (TOKENS * m.intermediate, 2**31 + m.intermediate):
        out.append(("ftkernels.swiglu", "_FWD", "_swiglu_fwd", dt, warps,
                    [("A", Ptr(dt)), ("B", Ptr(dt)), ("C", Ptr(dt)), ("n", Int(n)), ("BLOCK", CX)], cfg))
        out.append(("ftkernels.swiglu", "_BWD", "_swiglu_bwd", dt, warps,
                    [("DC", Ptr(dt)), ("A", Ptr(dt)), ("B", Ptr(dt)), ("DA", Ptr(dt)), ("DB", Ptr(dt)),
                     ("n", Int(n)), ("BLOCK", CX)], cfg))
    return out


def fused_ce_launches(m: ModelShape, dt: str) -> list[Launch]:
    from ftkernels import fused_ce

    block, warps = fused_ce.launch_config(m.vocab, cuda=True)
    # logits rows of one chunk (F.linear output: contiguous, row stride = vocab); labels int64 as transformers'
    args: list[tuple[str, object]] = [
        ("X", Ptr(dt)), ("stride", Int(m.vocab)), ("LABELS", Ptr("i64")), ("LOSS", Ptr("fp32")),
        ("n_cols", Int(m.vocab)), ("ignore_index", Int(-100)), ("smoothing", 0.0), ("z_coef", 0.0),
        ("GRAD", CX), ("BLOCK", CX)]
    return [("ftkernels.fused_ce", "_CE_ROWS", "_ce_rows", dt, warps, args, {"GRAD": grad, "BLOCK": block})
            for grad in (True, False)]


LAUNCHES = (rmsnorm_launches, rope_launches, swiglu_launches, fused_ce_launches)


def enumerate_cases(shapes: Iterable[ModelShape] | None = None, targets: Sequence[int] = TARGETS,
                    dtypes: Sequence[str] = DTYPES, specs: Sequence[str] = ("runtime",)
                    ) -> dict[CompileKey, list[str]]:
    """Every distinct compile, with the models that launch it (same BLOCK/warps/specialisation: one compile)."""
    cases: dict[CompileKey, list[str]] = {}
    for m in shapes if shapes is not None else model_shapes():
        for fn in LAUNCHES:
            for dt_ in dtypes:
                for module, attr, kernel, label, warps, args, consts in fn(m, dt_):
                    for spec in specs:
                        for arch in targets:
                            key = make_key(module, attr, kernel, label, spec, arch, warps, args, consts)
                            names = cases.setdefault(key, [])
                            if m.name not in names:
                                names.append(m.name)
    return cases


# ---- compiling ------------------------------------------------------------------------------------------------

@dataclass
class Resources:
    key: CompileKey
    regs: int
    stack: int
    shared: int  # static shared memory in the cubin (sm_90 reserves 1 KiB)
    triton_shared: int  # dynamic shared memory Triton allocates (reductions, layout conversions)
    seconds: float
    models: list[str] = field(default_factory=list)


_RESOURCE_RE = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)")


def _worker_init(cache_dir: str) -> None:
    # Compiled mode (triton.jit picks the interpreter at decoration time) and a private, throw-away cache.
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, set to silence its warning


_JITTED: dict[tuple[str, str], object] = {}


def compile_case(key: CompileKey) -> tuple[int, int, int, int, float]:
    """Compile one case for its GPU target; (registers, stack, cubin shared, Triton shared, seconds)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    if (key.module, key.attr) not in _JITTED:
        lazy = getattr(importlib.import_module(key.module), key.attr)
        _JITTED[key.module, key.attr] = triton.jit(lazy.fn)
    fn = _JITTED[key.module, key.attr]
    names = [n for n, _ in key.signature]
    if names != list(fn.arg_names):
        raise ValueError(f"{key.kernel}: case arguments {names} != kernel arguments {fn.arg_names}")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in key.divisible}
    src = ASTSource(fn, dict(key.signature), dict(key.constexprs), attrs)
    t0 = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", key.arch, 32), options={"num_warps": key.num_warps})
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
    match = _RESOURCE_RE.search(out)
    if match is None:
        raise RuntimeError(f"no resource usage for {key.label()} in cuobjdump output:\n{out}")
    return int(match[2]), int(match[3]), int(match[4]), int(kernel.metadata.shared), seconds


def _cuobjdump() -> str:
    import triton

    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump
        if tool is not None:
            return tool.path
    except (ImportError, AttributeError):
        pass
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def compile_all(cases: dict[CompileKey, list[str]], workers: int | None = None) -> list[Resources]:
    """Compile every case in ``workers`` fresh processes (default: one per CPU, at most 4), caching nothing."""
    workers = workers or default_workers()
    keys = list(cases)
    with tempfile.TemporaryDirectory(prefix="triton-aot-") as cache_dir:
        # spawn: a clean interpreter (no inherited TRITON_INTERPRET, torch threads or CUDA state)
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                    initargs=(cache_dir,)) as pool:
            results = list(pool.map(compile_case, keys, chunksize=4))
    return [Resources(k, *r, models=cases[k]) for k, r in zip(keys, results)]


# ---- the table ------------------------------------------------------------------------------------------------

def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "kernels"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + (" + uncommitted changes in kernels/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_table(results: list[Resources], path: Path, wall: float, workers: int) -> None:
    import triton

    results = sorted(results, key=lambda r: (r.key.module, r.key.kernel, r.key.spec, r.key.dtype, r.key.arch,
                                             r.key.describe_constexprs(), r.key.describe_args()))
    spills = {spec: sum(1 for r in results if r.stack and r.key.spec == spec) for spec in SPECS}
    done = sorted({r.key.spec for r in results}, key=SPECS.index)
    lines = [
        "# Triton kernel resources, sm_80 and sm_90",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}",
        f"- commit: {_git_commit()}",
        f"- triton {triton.__version__}, compiled on a CPU-only machine with `triton.compile(ASTSource(...), "
        "target=GPUTarget(\"cuda\", cc, 32))`; registers / stack / shared from `cuobjdump --dump-resource-usage`",
        f"- {len(results)} distinct compiles in {wall:.1f} s ({workers} worker processes on "
        f"{os.cpu_count()} CPUs); with a stack frame (spills): "
        + ", ".join(f"{spills[s]} of the `{s}` compiles" for s in done),
        "- spec `runtime`: arguments specialised as the JIT does for these shapes (16-byte aligned tensors, sizes "
        "divisible by 16 marked `/16`): the binaries that run, asserted spill-free by "
        "`tests/kernels/test_aot_compile.py`; `plain` (with `--plain`): bare types, what the JIT would build for "
        "unaligned views or sizes not divisible by 16 (none of the shipped configs), for reference",
        "- shared: static shared memory in the cubin (sm_90 reserves 1 KiB); triton smem: dynamic shared memory "
        "Triton requests at launch",
        "- generated by `python bench/kernel_resources.py`",
        "",
        "| kernel | dtype | target | spec | constexprs | other args | num_warps | registers | stack | shared | "
        "triton smem | models |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        k = r.key
        lines.append(f"| {k.kernel} | {k.dtype} | sm_{k.arch} | {k.spec} | {k.describe_constexprs()} | "
                     f"{k.describe_args()} | {k.num_warps} | {r.regs} | {r.stack} | {r.shared} | "
                     f"{r.triton_shared} | {', '.join(r.models)} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", action="store_true", help="also compile with bare types (no specialisation)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "kernel-resources-sm80-sm90.md")
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not installed: nothing to compile", file=sys.stderr)
        return 2
    cases = enumerate_cases(specs=SPECS if args.plain else ("runtime",))
    t0 = time.perf_counter()
    workers = args.workers or default_workers()
    results = compile_all(cases, workers)
    wall = time.perf_counter() - t0
    write_table(results, args.out, wall, workers)
    for r in results:
        if r.stack:
            print(f"SPILLS: {r.key.label()}: {r.regs} registers, {r.stack}-byte stack", file=sys.stderr)
    print(f"{len(results)} compiles in {wall:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
