"""REPA: the frozen DINOv2 teacher's token grid, register dropping, the projector and the loss."""

import pytest
import torch
import transformers

from deco.model.repa import RepaTeacher, RepaTeacherConfig, repa_loss, repa_projector
from deco.model.text_encoder import WeightsNotFoundError

TINY_DINOV2 = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=56
)


@pytest.fixture(scope="module")
def tiny_dinov2_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_dinov2")
    torch.manual_seed(0)
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY_DINOV2)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def teacher(tiny_dinov2_path) -> RepaTeacher:
    return RepaTeacherConfig(path=tiny_dinov2_path, dtype="float32").build()


def test_teacher_tokens_align_with_dit_grid(teacher):
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    tokens = teacher.features(images, dit_patch=16)  # 64 px / 16 -> 4x4 grid <- 56 px / 14
    assert tokens.shape == (2, 16, 32) and tokens.dtype == torch.float32
    # Another resolution interpolates the teacher's position embedding: 128 px -> 112 px -> 8x8.
    assert teacher.features(torch.zeros(1, 3, 128, 128)).shape == (1, 64, 32)
    with pytest.raises(ValueError, match="divisible"):
        teacher.features(torch.zeros(1, 3, 60, 60))


def test_teacher_drops_cls_token(teacher):
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    tokens = teacher.features(images)
    # Reproduce the preprocessing to compare with the raw model output.
    # The reference's order: normalise, then bicubic resize without antialiasing.
    pixels = (images + 1) / 2
    pixels = torch.nn.functional.interpolate((pixels - teacher.mean) / teacher.std, size=(56, 56), mode="bicubic")
    with torch.no_grad():
        full = teacher.model(pixel_values=pixels).last_hidden_state
    assert full.shape[1] == 17
    torch.testing.assert_close(tokens, full[:, 1:])
    # antialias: true low-passes before resizing: another teacher input, so other targets.
    smooth = RepaTeacher.from_modules(teacher.model, antialias=True).features(images)
    assert not torch.allclose(smooth, tokens, atol=1e-3)


def test_teacher_with_registers_drops_register_tokens(tmp_path):
    if not hasattr(transformers, "Dinov2WithRegistersModel"):
        pytest.skip(f"transformers {transformers.__version__} has no Dinov2WithRegistersModel")
    config = transformers.Dinov2WithRegistersConfig(**TINY_DINOV2, num_register_tokens=4)
    transformers.Dinov2WithRegistersModel(config).save_pretrained(tmp_path)
    teacher = RepaTeacherConfig(path=str(tmp_path), dtype="float32").build()
    assert teacher.num_prefix_tokens == 5
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    tokens = teacher.features(images)
    assert tokens.shape == (2, 16, 32)
    pixels = torch.nn.functional.interpolate((images + 1) / 2, size=(56, 56), mode="bicubic")
    with torch.no_grad():
        full = teacher.model(pixel_values=(pixels - teacher.mean) / teacher.std).last_hidden_state
    assert full.shape[1] == 1 + 4 + 16
    torch.testing.assert_close(tokens, full[:, 5:])


def test_repa_loss_values():
    x = torch.randn(2, 16, 8)
    assert repa_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert repa_loss(x, -x).item() == pytest.approx(2.0, abs=1e-6)
    a = torch.zeros(1, 3, 4)
    b = torch.zeros(1, 3, 4)
    a[..., 0] = 1.0
    b[..., 1] = 3.0
    assert repa_loss(a, b).item() == pytest.approx(1.0, abs=1e-6)
    assert repa_loss(x.bfloat16(), x.bfloat16()).dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(2, 16, 8\).*\(2, 16, 9\)"):
        repa_loss(x, torch.randn(2, 16, 9))


def test_projector_shape():
    projector = repa_projector(48, out_dim=32)
    assert projector(torch.randn(2, 16, 48)).shape == (2, 16, 32)
    linears = [m for m in projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(48, 48), (48, 48), (48, 32)]
    assert repa_projector(48)(torch.randn(1, 48)).shape == (1, 768)


def test_gradient_reaches_student_not_teacher(teacher):
    assert not any(p.requires_grad for p in teacher.parameters())
    student_tokens = torch.randn(2, 16, 48, requires_grad=True)
    projector = repa_projector(48, out_dim=teacher.feature_dim)
    loss = repa_loss(projector(student_tokens), teacher.features(torch.rand(2, 3, 64, 64) * 2 - 1))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    assert student_tokens.grad is not None


def test_teacher_config_errors(tmp_path, tiny_dinov2_path):
    with pytest.raises(WeightsNotFoundError, match=str(tmp_path / "missing")):
        RepaTeacherConfig(path=str(tmp_path / "missing")).build()
    with pytest.raises(ValueError, match="patch size 14"):
        RepaTeacherConfig(path=tiny_dinov2_path, patch_size=16, dtype="float32").build()
