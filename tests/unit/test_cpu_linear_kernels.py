"""Which kernel a packed CPU linear weight runs (cpu_packed.py): ``auto`` and ``panel`` the panel
GEMM at every token count, ``onednn`` oneDNN's, one layout per weight; half-precision storage
the panels; and without a C compiler the same plans still serve, on oneDNN, with the
half-precision weights' values."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from stagekit.kernels.panel_gemm import native_available, pack_panels, panel_gemm
from stagekit.layers.cpu_packed import CpuLinearWeight, CpuWeightPlan

needs_native = pytest.mark.skipif(not native_available(), reason="no C compiler: the kernel is not built")


def _weights() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(70, 48, generator=g), torch.randn(70, generator=g)


@needs_native
def test_auto_takes_the_panel_kernel_at_every_count() -> None:
    w, b = _weights()
    lin = CpuLinearWeight(w, CpuWeightPlan("auto"))
    assert lin.onednn is None and lin.panels is not None  # one copy of the weight
    panels = pack_panels(w)[0]
    for m in (1, 8, 40, 130):
        x = torch.randn(m, 48)
        y = lin(x, b)
        torch.testing.assert_close(y, F.linear(x, w, b))
        assert torch.equal(y, panel_gemm(x, panels, 70, b)), m


@needs_native
@pytest.mark.parametrize("kernel", ["panel", "onednn"])
def test_one_kernel_at_every_count(kernel: str) -> None:
    w, b = _weights()
    lin = CpuLinearWeight(w, CpuWeightPlan(kernel))
    assert (lin.panels is None, lin.onednn is None) == ((True, False) if kernel == "onednn" else (False, True))
    for m in (1, 3, 40):
        x = torch.randn(m, 48)
        torch.testing.assert_close(lin(x, b), F.linear(x, w, b))


@needs_native
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_storage_runs_panels_at_every_count(dtype: torch.dtype) -> None:
    w, b = _weights()
    lin = CpuLinearWeight(w, CpuWeightPlan("auto", dtype))
    assert lin.onednn is None and lin.panels is not None and lin.panels.dtype == dtype
    for m in (1, 40):
        x = torch.randn(m, 48)
        torch.testing.assert_close(lin(x, b), F.linear(x, w.to(dtype).float(), b), rtol=1e-5, atol=1e-5)


def test_plans_that_cannot_run_are_refused() -> None:
    with pytest.raises(ValueError, match="panel kernel"):
        CpuWeightPlan("onednn", torch.float16)
    with pytest.raises(ValueError, match="unknown linear kernel"):
        CpuWeightPlan("fast")


_NO_COMPILER = """
import json, torch, torch.nn.functional as F
from stagekit.kernels.panel_gemm import native_available
from stagekit.layers.cpu_packed import CpuLinearWeight, CpuWeightPlan
w = torch.randn(40, 24, generator=torch.Generator().manual_seed(2))
w[0, 0] = 1e6
x = torch.randn(5, 24)
out = {"native": native_available()}
for name, dtype in (("auto", None), ("panel", torch.float16)):
    lin = CpuLinearWeight(w, CpuWeightPlan(name, dtype))
    ref = F.linear(x, w if dtype is None else w.to(dtype).float().clamp(-65504, 65504))
    out[name] = [lin.panels is None, lin.onednn is not None, ((lin(x) - ref).abs().max() / ref.abs().max()).item(),
                 lin.stats.overflowed]
print(json.dumps(out))
"""


def test_without_a_compiler_plans_fall_back_to_onednn(tmp_path) -> None:
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), STAGEMESH_KERNEL_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", _NO_COMPILER], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["native"] is False
    for name in ("auto", "panel"):
        no_panels, has_onednn, err, overflowed = out[name]
        assert no_panels and has_onednn and err < 1e-6, (name, out[name])
    assert out["panel"][3] == 1  # the fp16 rounding (and its count) happened all the same
