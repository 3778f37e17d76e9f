"""The panel GEMM kernel (stagekit/kernels/panel_gemm.c) against a float64 reference, for the
token counts of decode and small prefill chunks, odd shapes and all three panel dtypes; the
invariants it promises (1 and 2 threads bitwise equal, a row's result independent of the
batch, NaN propagation, padding never stored, the caller's FP mode kept); its portable scalar
build; and the rounding to half precision."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from stagekit.kernels import panel_gemm as pg
from stagekit.kernels.panel_gemm import PackStats, native_available, pack_panels, panel_gemm, unpack_panels

pytestmark = pytest.mark.skipif(not native_available(), reason="no C compiler: the kernel is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MS = [*range(1, 17), 31, 32, 33, 63, 64, 100]
NK = [(1, 1), (15, 3), (17, 7), (33, 8), (257, 576), (48, 768)]


def _case(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)


def _check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """Within the bound of an fp32 dot product of length K: (K + 2) * 2^-24 * sum |x_k w_k|."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T + (0 if b is None else b.double())
    bound = (x.shape[1] + 2) * 2.0**-24 * (xd.abs() @ wd.abs().T + (0 if b is None else b.double().abs())) + 1e-30
    err = (y.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g} beyond the fp32 bound"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_float64_reference(dtype: torch.dtype) -> None:
    for n, k in NK:
        _, w, b = _case(1, n, k)
        panels, _ = pack_panels(w, dtype)
        assert panels.shape == (-(-n // 16), k, 16)
        wq = w.to(dtype).float()  # the weights the kernel holds
        for m in MS:
            x, _, _ = _case(m, n, k, seed=m)
            _check(panel_gemm(x, panels, n), x, wq, None)
            _check(panel_gemm(x, panels, n, b), x, wq, b)


def test_lm_head_shape() -> None:
    x, w, _ = _case(8, 32001, 768)
    panels, _ = pack_panels(w)
    _check(panel_gemm(x, panels, 32001), x, w, None)
    _check(panel_gemm(x[:1], panels, 32001), x[:1], w, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_and_two_threads_bitwise_equal_and_rows_independent(dtype: torch.dtype) -> None:
    threads = torch.get_num_threads()
    try:
        for n in (1, 16, 17, 257):
            _, w, b = _case(1, n, 96)
            panels, _ = pack_panels(w, dtype)
            x, _, _ = _case(33, n, 96)
            out = {}
            for t in (1, 2):
                torch.set_num_threads(t)
                out[t] = [panel_gemm(x[:m], panels, n, b) for m in (1, 2, 5, 8, 13, 33)]
            for a, c in zip(out[1], out[2], strict=True):
                assert torch.equal(a, c)
            # a row's result does not depend on the batch it is computed in
            for y in out[2]:
                assert torch.equal(y, out[2][-1][: y.shape[0]])
    finally:
        torch.set_num_threads(threads)


def test_nan_and_inf_propagate_to_their_outputs_only() -> None:
    x, w, _ = _case(9, 37, 20)
    x[2, 5] = float("nan")
    x[4, 0] = float("inf")
    w[3, 7] = float("nan")
    y = panel_gemm(x, pack_panels(w)[0], 37)
    assert bool(y[2].isnan().all()) and not bool(y[4].isfinite().any())
    assert bool(y[:, 3].isnan().all())
    finite = torch.ones_like(y, dtype=torch.bool)
    finite[[2, 4]] = False
    finite[:, 3] = False
    assert bool(y[finite].isfinite().all())


def test_strided_rows_and_padding_never_written() -> None:
    x_big, w, b = _case(5, 17, 30)
    x = x_big[:, :19]  # rows with a stride wider than K
    w = w[:, :19]
    y_big = torch.full((5, 40), 12345.0)
    y = panel_gemm(x, pack_panels(w)[0], 17, b, out=y_big[:, :17])
    assert y.data_ptr() == y_big.data_ptr()
    _check(y_big[:, :17], x, w, b)
    assert bool((y_big[:, 17:] == 12345.0).all())  # the padded panel rows 17..31 were not stored
    # column-strided and broadcast rows are copied first
    _check(panel_gemm(x.T.contiguous().T, pack_panels(w)[0], 17), x, w, None)
    xb = x[:1].expand(4, 19)
    _check(panel_gemm(xb, pack_panels(w)[0], 17), xb, w, None)


def test_callers_denormal_mode_is_kept() -> None:
    x, w, _ = _case(2, 20, 8)
    panel_gemm(x, pack_panels(w)[0], 20)
    tiny = torch.tensor([1e-39]) * torch.tensor([1.0])
    assert tiny.item() != 0.0  # FTZ/DAZ were set for the kernel only


def test_bad_shapes_are_rejected() -> None:
    x, w, b = _case(3, 20, 8)
    panels, _ = pack_panels(w)
    with pytest.raises(ValueError):
        panel_gemm(x[:, :7], panels, 20)
    with pytest.raises(ValueError):
        panel_gemm(x, panels, 33)
    with pytest.raises(ValueError):
        panel_gemm(x, panels, 20, b[:5])
    with pytest.raises(ValueError):
        panel_gemm(x.double(), panels, 20)
    assert panel_gemm(x[:0], panels, 20).shape == (0, 20)


def test_concurrent_callers_get_their_own_results() -> None:
    x, w, _ = _case(4, 300, 256)
    panels, _ = pack_panels(w)
    expect = panel_gemm(x, panels, 300)
    results: list[bool] = []

    def call() -> None:
        results.extend(torch.equal(panel_gemm(x, panels, 300), expect) for _ in range(20))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [True] * 60


def test_half_rounding_saturates_and_counts() -> None:
    w = torch.tensor([[70000.0, -1e6, 1e-9, 0.0, 1.5, float("inf")]])
    panels, stats = pack_panels(w, torch.float16)
    back = unpack_panels(panels, 1)
    assert stats == PackStats(overflowed=2, flushed=1)
    assert back.tolist() == [[65504.0, -65504.0, 0.0, 0.0, 1.5, float("inf")]]
    # bf16 has fp32's range: nothing saturates; a bf16 weight is stored unchanged
    wb = torch.randn(33, 7).to(torch.bfloat16)
    panels, stats = pack_panels(wb, torch.bfloat16)
    assert stats == PackStats() and torch.equal(unpack_panels(panels, 33), wb)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_portable_scalar_build(tmp_path: Path) -> None:
    """The version compiled for CPUs without AVX2/FMA/F16C gives the same products."""
    lib_path = tmp_path / "panel_gemm_scalar.so"
    src = Path(pg.__file__).with_name("panel_gemm.c")
    subprocess.run(["cc", "-O2", "-DPANEL_NO_SIMD", "-fopenmp", "-shared", "-fPIC", "-std=c11", str(src), "-o",
                    str(lib_path)], check=True, capture_output=True, timeout=120)
    lib = ctypes.CDLL(str(lib_path))
    lib.panel_gemm.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                               ctypes.c_void_p, ctypes.c_long] + [ctypes.c_int] * 4
    for dtype in DTYPES:
        for m, n, k in ((1, 17, 7), (7, 33, 64), (13, 5, 3)):
            x, w, b = _case(m, n, k)
            panels, _ = pack_panels(w, dtype)
            y = torch.full((m, n), float("nan"))
            assert lib.panel_gemm(x.data_ptr(), k, panels.data_ptr(), pg.DTYPE_CODES[dtype], b.data_ptr(),
                                  y.data_ptr(), n, m, n, k, 2) == 0
            _check(y, x, w.to(dtype).float(), b)
