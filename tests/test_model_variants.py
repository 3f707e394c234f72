"""The model's optional variants: pooled-text AdaLN conditioning and clean-image (data) prediction,
and older config trees that predate them still describing the reference variant."""
import pytest
import torch

from deco.model.config import identity_differences
from deco.model.deco import data_to_velocity
from deco.model.dit import pooled_text
from deco.model.flow import interpolate, velocity_target
from deco.model.objective import ObjectiveConfig, training_loss
from deco.pipeline.config import ConfigError, to_dict
from test_model import inputs, tiny_config, tiny_model


def test_pooled_text_is_the_mean_over_valid_tokens():
    text = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(pooled_text(text, torch.tensor([[True, True, False]])), torch.tensor([[2.0, 3.0]]))
    assert torch.allclose(pooled_text(text, None), text.mean(dim=1))
    # All padding (an empty caption whose tokens are all masked): zeros, not NaN.
    assert torch.equal(pooled_text(text, torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 2))


def test_pooled_text_conditions_the_time_embedding_on_the_caption():
    x, t, text, mask = inputs(valid=(8, 5))
    plain, pooled = tiny_model().eval(), tiny_model("dit.pooled_text=true").eval()
    other = text.clone()
    other[1, :5] = torch.randn(5, text.shape[-1])
    assert plain.dit.text_pool is None
    # The reference model's time embedding ignores the caption; the pooled variant's does not, and
    # only for the sample whose caption changed.
    assert torch.equal(plain.dit(x, t, text, mask)[1], plain.dit(x, t, other, mask)[1])
    base, changed = pooled.dit(x, t, text, mask)[1], pooled.dit(x, t, other, mask)[1]
    assert torch.equal(base[0], changed[0]) and not torch.allclose(base[1], changed[1], atol=1e-4)
    # Padded slots do not enter the pooled vector.
    garbage = text.clone()
    garbage[1, 5:] += 10.0
    assert torch.allclose(pooled.dit(x, t, garbage, mask)[1], base, atol=1e-6)


def test_data_prediction_velocity_is_exact_for_the_clean_image():
    gen = torch.Generator().manual_seed(0)
    x, noise = torch.rand(4, 3, 8, 8, generator=gen) * 2 - 1, torch.randn(4, 3, 8, 8, generator=gen)
    t = torch.tensor([0.0, 0.3, 0.7, 0.94])
    x_t = interpolate(x, noise, t)
    assert torch.allclose(data_to_velocity(x, x_t, t, 0.05), velocity_target(x, noise), atol=1e-5)
    # At t -> 1 the division is bounded by min_noise_level: finite, and (x - x_t) / 0.05.
    t_end = torch.ones(4)
    end = data_to_velocity(x, x_t, t_end, 0.05)
    assert torch.isfinite(end).all() and torch.allclose(end, (x - x_t) / 0.05)


def test_data_prediction_model_starts_at_the_velocity_towards_zero_and_trains():
    model = tiny_config("decoder.predicts=data").build()
    x, t, text, mask = inputs()
    # The zero-initialised output layer predicts a black-grey (0) image: velocity (0 - x_t) / (1 - t).
    expected = -x / (1 - t).clamp(min=0.05).reshape(-1, 1, 1, 1)
    assert torch.allclose(model(x, t, text, mask), expected, atol=1e-5)
    objective = ObjectiveConfig(text_dropout=0.0)
    loss = training_loss(model, x.clamp(-1, 1), text, mask, objective, generator=torch.Generator().manual_seed(1))
    loss["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_trees_written_before_the_variants_read_as_the_reference():
    ours = to_dict(tiny_config())
    older = {section: dict(value) if isinstance(value, dict) else value for section, value in ours.items()}
    del older["dit"]["pooled_text"], older["decoder"]["predicts"], older["decoder"]["min_noise_level"]
    assert identity_differences(older, ours) == []
    assert identity_differences(older, to_dict(tiny_config("dit.pooled_text=true"))) == \
        ["dit.pooled_text: False vs True"]
    assert identity_differences(older, to_dict(tiny_config("decoder.predicts=data"))) == \
        ["decoder.predicts: velocity vs data"]


@pytest.mark.parametrize("override, message", [("decoder.predicts=noise", "decoder.predicts='noise' is not one of"),
                                               ("decoder.min_noise_level=0", "min_noise_level=0")])
def test_bad_variant_values_are_refused(override, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        tiny_config(override).build()


def test_data_to_velocity_divides_in_float32_under_bfloat16():
    # Under bf16 autocast the prediction is bf16; t must not be: 0.95 in bf16 is 0.9492, which would
    # make 1 - t 1.6% too large and every velocity near the data end that much too small.
    x_t = torch.full((1, 3, 2, 2), 0.5, dtype=torch.bfloat16)
    data = torch.full((1, 3, 2, 2), 0.50390625, dtype=torch.bfloat16)  # 0.5 + 2^-8, both exact in bf16
    got = data_to_velocity(data, x_t, torch.full((1,), 0.95), 0.05)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), torch.full((1, 3, 2, 2), 2**-8 / 0.05), rtol=5e-3)
