"""Decode attention over a paged KV cache: the native CPU kernel and the torch version
both equal scaled_dot_product_attention over each sequence's gathered keys/values."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from stagekit.kernels.paged_decode import _batched, native_available, paged_decode


def _reference(q, kc, vc, tables, lens, scale):
    out = []
    for i in range(q.shape[0]):
        n = int(lens[i])
        k = torch.cat([kc[b] for b in tables[i].tolist()], dim=1)[:, :n]  # [Hk, n, D]
        v = torch.cat([vc[b] for b in tables[i].tolist()], dim=1)[:, :n]
        out.append(F.scaled_dot_product_attention(q[i][:, None], k, v, scale=scale, enable_gqa=True)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("hq, hk, d, bs", [(12, 4, 64, 16), (4, 4, 32, 1), (8, 1, 16, 5), (6, 2, 128, 32)])
@pytest.mark.parametrize("impl", ["native", "per_sequence", "batched"])
def test_paged_decode_matches_sdpa(hq: int, hk: int, d: int, bs: int, impl: str) -> None:
    g = torch.Generator().manual_seed(hq * 100 + bs)
    nb, b = 64, 5
    kc, vc = torch.randn(nb, hk, bs, d, generator=g), torch.randn(nb, hk, bs, d, generator=g)
    lens = torch.tensor([1, bs, bs + 1, 3 * bs - 1, 4 * bs], dtype=torch.int32)[:b]
    width = int(-(-lens.max() // bs))
    tables = torch.randperm(nb, generator=g)[: b * width].view(b, width).to(torch.int32)  # scattered blocks
    q = torch.randn(b, hq, d, generator=g)
    if impl == "batched":  # the CUDA path, run on the CPU here
        got = _batched(q, kc, vc, tables, lens, d ** -0.5)
    else:
        got = paged_decode(q, kc, vc, tables, lens, d ** -0.5, use_native=impl == "native")
    torch.testing.assert_close(got, _reference(q, kc, vc, tables, lens, d ** -0.5), atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")
def test_native_kernel_builds_where_a_compiler_is_present() -> None:
    assert native_available()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("native", [True, False])
def test_half_precision_caches(dtype: torch.dtype, native: bool) -> None:
    g = torch.Generator().manual_seed(1)
    kc, vc = torch.randn(8, 2, 4, 8, generator=g).to(dtype), torch.randn(8, 2, 4, 8, generator=g).to(dtype)
    q = torch.randn(2, 4, 8, generator=g).to(dtype)
    tables = torch.tensor([[3, 1], [0, 7]], dtype=torch.int32)
    lens = torch.tensor([6, 8], dtype=torch.int32)
    ref = _reference(q.float(), kc.float(), vc.float(), tables, lens, 0.3)  # same inputs, fp32 math
    got = paged_decode(q, kc, vc, tables, lens, 0.3, use_native=native)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, atol=1e-2, rtol=1e-2)
