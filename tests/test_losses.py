"""Frequency-aware loss: each piece checked against an independent implementation (scipy, PIL)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.fft import dctn

from deco.model.losses import (
    JPEG_CHROMA_BASE_TABLE,
    JPEG_LUMA_BASE_TABLE,
    LossConfig,
    block_dct_8x8,
    deco_loss,
    frequency_aware_loss,
    frequency_weights,
    jpeg_quant_table,
    rgb_to_ycbcr,
    velocity_mse,
)


def _zigzag_order(n: int = 8) -> list[int]:
    """Natural (row-major) indices in JPEG zigzag scan order, built from the anti-diagonal walk."""
    cells = [(r, c) for r in range(n) for c in range(n)]
    # Along each anti-diagonal d = r + c the scan goes up-right for even d, down-left for odd d.
    cells.sort(key=lambda rc: (rc[0] + rc[1], rc[1] if (rc[0] + rc[1]) % 2 == 0 else rc[0]))
    return [r * n + c for r, c in cells]


def _pil_quant_tables(quality: int) -> dict[int, list[int]]:
    image = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return {k: list(v) for k, v in Image.open(buffer).quantization.items()}


def _blockwise_dct_reference(x: np.ndarray) -> np.ndarray:
    """scipy's orthonormal DCT-II on each 8x8 block, laid out as (B, C, H/8, W/8, 8, 8)."""
    b, c, h, w = x.shape
    out = np.empty((b, c, h // 8, w // 8, 8, 8))
    for bi in range(b):
        for ci in range(c):
            for i in range(h // 8):
                for j in range(w // 8):
                    out[bi, ci, i, j] = dctn(x[bi, ci, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8], norm="ortho")
    return out


def test_zigzag_helper_matches_the_jpeg_scan():
    # First entries of the standard scan: (0,0) (0,1) (1,0) (2,0) (1,1) (0,2) (0,3) ...
    assert _zigzag_order()[:10] == [0, 1, 8, 16, 9, 2, 3, 10, 17, 24]
    assert _zigzag_order()[-3:] == [55, 62, 63]


def test_block_dct_matches_scipy_per_block():
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = block_dct_8x8(x).numpy()
    assert ours.shape == (2, 3, 2, 3, 8, 8)
    np.testing.assert_allclose(ours, _blockwise_dct_reference(x.numpy()), rtol=0, atol=1e-12)


def test_block_dct_rejects_sizes_not_multiple_of_8():
    with pytest.raises(ValueError, match=r"\(1, 3, 12, 16\)"):
        block_dct_8x8(torch.zeros(1, 3, 12, 16))
    with pytest.raises(ValueError, match="multiples of 8"):
        frequency_aware_loss(torch.zeros(1, 3, 16, 20), torch.zeros(1, 3, 16, 20))


def test_rgb_to_ycbcr_matches_pil_jpeg_conversion():
    rgb = np.random.default_rng(0).integers(0, 256, size=(32, 40, 3), dtype=np.uint8)
    pil = np.asarray(Image.fromarray(rgb, "RGB").convert("YCbCr"), dtype=np.float64)
    pil = pil - np.array([0.0, 128.0, 128.0])  # PIL stores Cb/Cr with the +128 offset
    ours = rgb_to_ycbcr(torch.from_numpy(rgb.astype(np.float64)).permute(2, 0, 1)[None])
    ours = ours[0].permute(1, 2, 0).numpy()
    # PIL's fixed-point conversion truncates towards minus infinity, so ours - pil lies in
    # [0, 1) up to PIL's fixed-point error, averaging about 0.5 for every channel.
    diff = ours - pil
    assert diff.min() > -0.1 and diff.max() < 1.01
    np.testing.assert_allclose(diff.mean(axis=(0, 1)), 0.5, atol=0.1)


def test_quant_tables_match_what_pil_writes_at_quality_85():
    pil = _pil_quant_tables(85)
    ours_luma = jpeg_quant_table(torch.tensor(JPEG_LUMA_BASE_TABLE), 85).flatten().tolist()
    ours_chroma = jpeg_quant_table(torch.tensor(JPEG_CHROMA_BASE_TABLE), 85).flatten().tolist()
    # The DQT segment stores tables in zigzag order; Pillow (>= 6) un-zigzags them on read, so
    # `quantization` is in natural row-major order. Check that explicitly, and that the zigzag
    # order would NOT match (the comparison can tell the two orders apart).
    assert pil[0] == ours_luma
    assert pil[1] == ours_chroma
    zigzag = _zigzag_order()
    assert pil[0] != [ours_luma[i] for i in zigzag]


@pytest.mark.parametrize("quality", [10, 49, 50, 95, 100])
def test_quant_tables_match_pil_at_other_qualities(quality):
    pil = _pil_quant_tables(quality)
    assert pil[0] == jpeg_quant_table(torch.tensor(JPEG_LUMA_BASE_TABLE), quality).flatten().tolist()
    assert pil[1] == jpeg_quant_table(torch.tensor(JPEG_CHROMA_BASE_TABLE), quality).flatten().tolist()


def test_frequency_weights_span_the_spec_ranges():
    w = frequency_weights(85)
    assert w.shape == (3, 8, 8) and w.dtype == torch.float32
    assert w[0].min().item() == pytest.approx(0.28, abs=0.005)
    assert w[0].max().item() == pytest.approx(3.36, abs=0.01)
    assert w[1].min().item() == pytest.approx(0.65, abs=0.005)
    assert w[1].max().item() == pytest.approx(3.87, abs=0.01)
    torch.testing.assert_close(w[1], w[2])
    torch.testing.assert_close(w.mean(dim=(1, 2)), torch.ones(3))
    # Low frequencies matter more than high ones.
    assert w[0, 0, 1] > w[0, 7, 7] and w[1, 0, 0] > w[1, 7, 7]


def test_frequency_loss_zero_for_equal_inputs_positive_otherwise():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    assert frequency_aware_loss(x, x.clone()).item() == 0.0
    assert frequency_aware_loss(x, x + 1e-3 * torch.randn(x.shape, generator=gen)).item() > 0.0


def test_frequency_loss_matches_float64_numpy_recomputation():
    gen = torch.Generator().manual_seed(2)
    pred = torch.randn(2, 3, 16, 24, generator=gen)
    target = torch.randn(2, 3, 16, 24, generator=gen)

    # Independent reference: PIL's own q=85 tables, numpy colour matrix, scipy DCT, all float64.
    tables = _pil_quant_tables(85)
    luma_inv = 1.0 / np.array(tables[0], dtype=np.float64).reshape(8, 8)
    chroma_inv = 1.0 / np.array(tables[1], dtype=np.float64).reshape(8, 8)
    luma_w, chroma_w = luma_inv / luma_inv.mean(), chroma_inv / chroma_inv.mean()
    weights = np.stack([luma_w, chroma_w, chroma_w])
    matrix = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])

    def transform(x: torch.Tensor) -> np.ndarray:
        return _blockwise_dct_reference(np.einsum("oc,bchw->bohw", matrix, x.double().numpy()))

    diff = transform(pred) - transform(target)
    expected = np.mean(weights[None, :, None, None] * diff**2)

    got = frequency_aware_loss(pred, target)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_frequency_loss_computes_in_float32_for_bf16_inputs():
    gen = torch.Generator().manual_seed(3)
    pred = torch.randn(1, 3, 8, 8, generator=gen).bfloat16()
    target = torch.randn(1, 3, 8, 8, generator=gen).bfloat16()
    got = frequency_aware_loss(pred, target)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(frequency_aware_loss(pred.float(), target.float()).item(), rel=1e-6)


def test_frequency_loss_compiles_without_graph_breaks():
    # The eager backend only runs Dynamo's tracing: enough to prove fullgraph-compatibility cheaply.
    compiled = torch.compile(frequency_aware_loss, fullgraph=True, backend="eager")
    pred, target = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(compiled(pred, target), frequency_aware_loss(pred, target))


def test_frequency_loss_after_inference_mode_still_supports_backward():
    # Cached constants built under inference_mode must not poison later training steps.
    with torch.inference_mode():
        frequency_aware_loss(torch.randn(1, 3, 8, 8, dtype=torch.float64), torch.zeros(1, 3, 8, 8))
    pred = torch.randn(1, 3, 8, 8, requires_grad=True)
    frequency_aware_loss(pred, torch.zeros(1, 3, 8, 8)).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_deco_loss_combines_the_parts_with_their_weights():
    gen = torch.Generator().manual_seed(4)
    pred, target = torch.randn(2, 3, 16, 16, generator=gen), torch.randn(2, 3, 16, 16, generator=gen)
    repa = torch.tensor(0.7)
    cfg = LossConfig(freq_weight=2.0, repa_weight=0.25, jpeg_quality=50)

    out = deco_loss(pred, target, cfg, repa_loss=repa)
    assert set(out) == {"loss", "mse", "freq", "repa"}
    torch.testing.assert_close(out["mse"], velocity_mse(pred, target))
    torch.testing.assert_close(out["mse"], ((pred - target) ** 2).mean())
    torch.testing.assert_close(out["freq"], frequency_aware_loss(pred, target, quality=50))
    torch.testing.assert_close(out["loss"], out["mse"] + 2.0 * out["freq"] + 0.25 * repa)

    without_repa = deco_loss(pred, target, LossConfig())
    assert set(without_repa) == {"loss", "mse", "freq"}
    torch.testing.assert_close(without_repa["loss"], without_repa["mse"] + 1.0 * without_repa["freq"])
