"""DeCo model behaviour: shapes, padding masks, REPA path, checkpointing, compile, FLOPs, overfitting."""
import copy
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from deco.model.config import ModelConfig
from deco.model.flops import deco_flops
from deco.model.objective import ObjectiveConfig, training_loss
from deco.pipeline.config import load_config
from deco.pipeline.summary import model_summary

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_config(*overrides: str) -> ModelConfig:
    return load_config(ModelConfig, CONFIGS / "model" / "tiny.yaml", list(overrides))


def tiny_model(*overrides: str, seed: int = 0):
    """The tiny model with its zero-initialised decoder parts randomised, so outputs depend on inputs."""
    torch.manual_seed(seed)
    model = tiny_config(*overrides).build()
    with torch.no_grad():
        for block in model.decoder.blocks:
            block.adaln.weight.normal_(0, 0.2)
        model.decoder.out.weight.normal_(0, 0.2)
    return model


def inputs(batch=2, res=32, text_len=8, text_dim=384, valid=(8, 5), seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, res, res, generator=gen)
    t = torch.rand(batch, generator=gen)
    text = torch.randn(batch, text_len, text_dim, generator=gen)
    mask = torch.zeros(batch, text_len, dtype=torch.bool)
    for row, count in enumerate(valid):
        mask[row, :count] = True
    return x, t, text, mask


@pytest.mark.parametrize("res", [32, 64])
def test_shapes_through_every_path(res):
    model = tiny_model("repa.enabled=true", "repa.block=3")
    x, t, text, mask = inputs(res=res)
    velocity = model(x, t, text, mask)
    assert velocity.shape == x.shape and torch.isfinite(velocity).all()
    velocity_repa, projected = model(x, t, text, mask, return_repa=True)
    assert torch.equal(velocity_repa, velocity)
    assert projected.shape == (2, (res // 8) ** 2, model.cfg.repa.teacher_dim)
    assert model(x, t, text, None).shape == x.shape                     # no mask at all
    wide = torch.randn(2, 3, res, res + 16)
    assert model(wide, t, text, mask).shape == wide.shape                # non-square grids


def test_zero_initialised_decoder_starts_at_zero_velocity():
    model = tiny_config().build()
    x, t, text, mask = inputs()
    assert torch.count_nonzero(model(x, t, text, mask)) == 0


def test_padding_mask_hides_padded_text_only():
    model = tiny_model("dit.mask_text_padding=true").eval()
    x, t, text, mask = inputs(valid=(8, 5))
    base = model(x, t, text, mask)
    garbage = text.clone()
    garbage[1, 5:] = torch.randn(3, text.shape[-1]) * 10
    assert torch.allclose(model(x, t, garbage, mask), base, atol=1e-5)        # padded slots ignored
    changed_valid = text.clone()
    changed_valid[1, 0] += 1.0
    out = model(x, t, changed_valid, mask)
    assert torch.allclose(out[0], base[0], atol=1e-6) and not torch.allclose(out[1], base[1], atol=1e-4)
    # More right padding on the same prompt changes nothing: positions of valid tokens are unchanged.
    longer = torch.cat([text, torch.randn(2, 4, text.shape[-1])], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    assert torch.allclose(model(x, t, longer, longer_mask), base, atol=1e-5)


def test_default_attends_to_padding_as_the_reference():
    model = tiny_model().eval()
    assert model.cfg.dit.mask_text_padding is False
    x, t, text, mask = inputs(valid=(8, 5))
    garbage = text.clone()
    garbage[1, 5:] += 5.0
    out, base = model(x, t, garbage, mask), model(x, t, text, mask)
    assert torch.allclose(out[0], base[0], atol=1e-6) and not torch.allclose(out[1], base[1], atol=1e-4)


def test_empty_caption_with_all_padding_is_finite():
    model = tiny_model("dit.mask_text_padding=true").eval()
    x, t, text, mask = inputs(valid=(0, 0))
    assert torch.isfinite(model(x, t, text, mask)).all()


def test_activation_checkpointing_gives_identical_gradients():
    model = tiny_model()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_activation_checkpointing(True)
    x, t, text, mask = inputs()
    grads = []
    for m in (model, checkpointed):
        m.zero_grad()
        m(x, t, text, mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    checkpointed.set_activation_checkpointing([0, 2])
    assert [b.checkpointing for b in checkpointed.dit.blocks] == [True, False, True, False, False, False]
    with pytest.raises(ValueError, match="no image blocks"):
        checkpointed.set_activation_checkpointing([7])


def test_compiles_without_graph_breaks():
    model = tiny_model().eval()
    x, t, text, mask = inputs()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph raises on any graph break
    assert torch.allclose(compiled(x, t, text, mask), model(x, t, text, mask), atol=1e-5)


def test_bfloat16_forward_is_finite():
    model = tiny_model().to(torch.bfloat16)
    x, t, text, mask = inputs()
    out = model(x, t, text, mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("variant", [(), ("dit.pooled_text=true", "decoder.predicts=data")])
def test_analytic_flops_match_counted_matmul_flops(variant):
    cfg = tiny_config(*variant)
    model = cfg.build().eval()
    x, t, text, mask = inputs(res=cfg.resolution, text_len=cfg.dit.text_len, valid=(32, 32))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, text, mask)
    counted = counter.get_total_flops() / x.shape[0]
    analytic = deco_flops(cfg).forward
    assert abs(counted - analytic) / analytic < 0.02, (counted, analytic)


def test_xxl_summary_matches_paper_parameter_count():
    summary = model_summary(load_config(ModelConfig, CONFIGS / "model" / "t2i_xxl16.yaml"))
    assert summary["params_total"] == 1_133_759_395       # the reference's PixNerDiT at these settings, counted
    assert summary["params_decoder"] == 12_610_467       # its NerfEmbedder + SimpleMLPAdaLN
    assert summary["params_total"] == summary["params_dit"] + summary["params_decoder"]
    assert abs(summary["params_decoder"] - 12.6e6) / 12.6e6 < 0.01          # spec section 4
    assert abs(summary["forward_flops_per_sample"] - 3.88e11) / 3.88e11 < 0.01  # spec section 10
    assert abs(summary["train_flops_per_sample"] - 1.165e12) / 1.165e12 < 0.02


def test_tiny_model_overfits_one_fixed_batch():
    torch.manual_seed(0)
    model = tiny_config().build()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1
    noise = torch.randn(2, 3, 32, 32, generator=gen)
    t = torch.rand(2, generator=gen) * 0.8 + 0.1
    text, mask = torch.randn(2, 8, 384, generator=gen), torch.ones(2, 8, dtype=torch.bool)
    objective = ObjectiveConfig(text_dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for _ in range(120):
        loss = training_loss(model, images, text, mask, objective, t=t, noise=noise)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
