"""Every Triton kernel, compiled for sm_80 and sm_90 on this CPU-only machine, keeps its data in registers.

The cases are the launches the kernels make for the shipped model configs (``recipes/models`` plus SmolLM2-135M):
block sizes and ``num_warps`` from each module's ``launch_config``, for bf16, fp16 and fp32 (and RMSNorm's fp32
weight under bf16/fp16 activations), specialised as Triton's JIT does at launch. Each distinct compile runs once, in
fresh processes with a throw-away Triton cache; ``cuobjdump --dump-resource-usage`` (shipped in the triton wheel)
reads registers and stack, and a stack frame means spills. ``python bench/kernel_resources.py`` writes the same
compiles as a table to ``bench/results/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
for source in (ROOT / "kernels", ROOT):  # bench/ is not an installed package; spawned workers inherit this sys.path
    if str(source) not in sys.path:
        sys.path.insert(0, str(source))

from bench import kernel_resources as kr  # noqa: E402

try:
    import triton  # noqa: F401

    _TRITON_ERROR = ""
except ImportError as exc:  # pragma: no cover - the venv pins triton
    _TRITON_ERROR = f"triton is not importable ({exc}): nothing to compile"

requires_triton = pytest.mark.skipif(bool(_TRITON_ERROR), reason=_TRITON_ERROR or "triton is importable")

# The RMSNorm backward as it was launched at hidden 16384 (Llama-3.1-405B) before the fix: weight held in
# registers, 16 warps; it spilled. Compiled alongside, to prove the check sees spills.
_PRE_FIX_RMS_BWD = {"BLOCK": 16384, "RELOAD_W": False, "RELOAD_X": False, "num_warps": 16}


def _pre_fix_key(arch: int) -> kr.CompileKey:
    (m,) = [m for m in kr.model_shapes() if m.hidden == 16384]
    (launch,) = [launch for launch in kr.rmsnorm_launches(m, "bf16") if launch[2] == "_rms_bwd" and launch[3] == "bf16"]
    module, attr, kernel, label, _, args, consts = launch
    consts = {**consts, **{k: v for k, v in _PRE_FIX_RMS_BWD.items() if k != "num_warps"}}
    return kr.make_key(module, attr, kernel, label, "runtime", arch, _PRE_FIX_RMS_BWD["num_warps"], args, consts)


@pytest.fixture(scope="module")
def resources() -> dict[kr.CompileKey, kr.Resources]:
    cases = kr.enumerate_cases()
    for arch in kr.TARGETS:
        cases.setdefault(_pre_fix_key(arch), ["llama-3.1-405b (launch before the fix)"])
    return {r.key: r for r in kr.compile_all(cases)}


def test_cases_cover_every_kernel_model_dtype_and_target() -> None:
    cases = kr.enumerate_cases()
    kernels = {k.kernel for k in cases}
    assert kernels == {"_rms_fwd", "_rms_bwd", "_rope_kernel", "_swiglu_fwd", "_swiglu_bwd", "_ce_rows"}
    models = {name for names in cases.values() for name in names}
    assert models == {m.name for m in kr.model_shapes()}
    assert len(models) == 8 and "smollm2-135m" in models
    for kernel in kernels:
        keys = [k for k in cases if k.kernel == kernel]
        assert {k.arch for k in keys} == {80, 90}
        assert {"bf16", "fp16", "fp32"} <= {k.dtype for k in keys}
    # hidden 576 .. 16384 and vocab up to 152064 all reach the compiles, deduplicated by what they compile to
    rms_fwd_blocks = {dict(k.constexprs)["BLOCK"] for k in cases if k.kernel == "_rms_fwd"}
    assert rms_fwd_blocks == {1024, 4096, 8192, 16384}
    big = [k for k, names in cases.items() if k.kernel == "_rms_bwd" and "llama-3.1-405b" in names]
    launched = {(k.dtype, dict(k.constexprs)["BLOCK"], dict(k.constexprs)["RELOAD_W"], dict(k.constexprs)["RELOAD_X"],
                 k.num_warps) for k in big}
    assert {(b, rw, warps) for _, b, rw, _, warps in launched} == {(16384, True, 32)}
    assert {dt for dt, *_, reload_x, _ in launched if reload_x} == {"bf16/w-fp32", "fp16/w-fp32"}
    assert any("qwen2.5-72b" in names for k, names in cases.items() if k.kernel == "_ce_rows")
    assert len(cases) == len(set(cases))


@requires_triton
def test_launch_config_is_what_the_launch_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward launch at hidden 16384 goes through bwd_launch_config (under the interpreter, a few rows)."""
    import torch

    from ftkernels import rmsnorm
    from ftkernels._triton import LazyKernel

    seen: list[tuple[str, tuple, dict]] = []
    original = LazyKernel.__getitem__

    def spy(self: LazyKernel, grid):  # type: ignore[no-untyped-def]
        launch = original(self, grid)

        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            seen.append((self.fn.__name__, grid, {k: v for k, v in kwargs.items() if k.isupper() or k == "num_warps"}))
            return launch(*args, **kwargs)

        return call

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(LazyKernel, "__getitem__", spy)
    x = torch.randn(2, 16384, requires_grad=True)
    rmsnorm.rms_norm(x, torch.ones(16384)).sum().backward()
    cfg = rmsnorm.bwd_launch_config(16384)
    block, warps = rmsnorm.launch_config(16384)
    assert seen[0] == ("_rms_fwd", (2,), {"CAST_FIRST": True, "BLOCK": block, "num_warps": warps})
    name, grid, kwargs = seen[1]
    assert name == "_rms_bwd" and len(grid) == 1
    assert kwargs == {"CAST_FIRST": True, **cfg} and cfg["RELOAD_W"] and cfg["num_warps"] == 32


@requires_triton
@pytest.mark.slow  # ~180 compiles: about a minute on 2 cores
def test_no_kernel_spills_on_sm80_or_sm90(resources: dict[kr.CompileKey, kr.Resources]) -> None:
    shipped = [r for k, r in resources.items() if k not in {_pre_fix_key(a) for a in kr.TARGETS}]
    assert len(shipped) > 100
    spills = [r for r in shipped if r.stack]
    assert not spills, "kernels with a stack frame (register spills):\n" + "\n".join(
        f"  {r.key.kernel} dtype={r.key.dtype} target=sm_{r.key.arch} {r.key.describe_constexprs()} "
        f"num_warps={r.key.num_warps} ({r.key.spec}: {r.key.describe_args()}): {r.regs} registers, "
        f"{r.stack}-byte stack; models: {', '.join(r.models)}"
        for r in spills)
    # every compile has a sane register count (a parse that always said 0 would pass the check above)
    assert all(16 <= r.regs <= 255 for r in shipped)


@requires_triton
@pytest.mark.slow
def test_the_check_sees_spills(resources: dict[kr.CompileKey, kr.Resources]) -> None:
    """The RMSNorm backward launch at hidden 16384 before the fix spills: the compile/parse path reports stack."""
    for arch in kr.TARGETS:
        r = resources[_pre_fix_key(arch)]
        assert r.stack > 0, (arch, r.regs, r.stack)
