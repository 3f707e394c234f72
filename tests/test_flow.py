"""Flow-matching conventions: t = 1 is data, x_t = t x + (1 - t) noise, v = x - noise."""

import pytest
import torch

from deco.model.flow import interpolate, sample_train_t, time_shift, velocity_target


def _pair(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)


def test_interpolate_endpoints():
    x, noise = _pair()
    torch.testing.assert_close(interpolate(x, noise, torch.zeros(4)), noise)
    torch.testing.assert_close(interpolate(x, noise, torch.ones(4)), x)


def test_interpolate_uses_one_time_per_sample():
    x, noise = _pair()
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = interpolate(x, noise, t)
    for i in range(4):
        torch.testing.assert_close(out[i], t[i] * x[i] + (1 - t[i]) * noise[i])


def test_velocity_target_is_time_derivative_of_x_t():
    x, noise = _pair(1)
    x, noise = x.double(), noise.double()
    t = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.1
    eps = 1e-6
    finite_difference = (interpolate(x, noise, t + eps) - interpolate(x, noise, t - eps)) / (2 * eps)
    torch.testing.assert_close(finite_difference, velocity_target(x, noise), rtol=1e-7, atol=1e-7)


def test_time_shift_values_and_monotonicity():
    assert time_shift(0.5, 3.0) == pytest.approx(0.25)
    assert time_shift(0.0, 3.0) == 0.0 and time_shift(1.0, 3.0) == 1.0
    assert time_shift(0.3, 1.0) == pytest.approx(0.3)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    shifted = time_shift(t, 3.0)
    assert torch.all(shifted[1:] > shifted[:-1])
    assert torch.all(shifted[1:-1] < t[1:-1])  # shift > 1 moves every interior time towards noise


def test_sample_train_t_is_logit_normal_in_unit_interval():
    t = sample_train_t(200_000, shift=1.0, generator=torch.Generator().manual_seed(0))
    assert t.shape == (200_000,) and t.dtype == torch.float32
    assert t.min() > 0 and t.max() < 1
    # sigmoid(N(0, 1)) is symmetric about 1/2, and its logit is standard normal.
    assert t.mean().item() == pytest.approx(0.5, abs=0.005)
    logits = torch.logit(t.double())
    assert logits.std().item() == pytest.approx(1.0, abs=0.01)


def test_sample_train_t_shift_lowers_mean_time():
    n = 200_000
    plain = sample_train_t(n, shift=1.0, generator=torch.Generator().manual_seed(0))
    shifted = sample_train_t(n, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert shifted.mean() < plain.mean() - 0.1
    # Same seed: the shifted draw is exactly the shift applied to the plain draw.
    torch.testing.assert_close(shifted, time_shift(plain, 3.0))


def test_sample_train_t_is_deterministic_for_a_generator_seed():
    a = sample_train_t(16, shift=2.0, generator=torch.Generator().manual_seed(5))
    b = sample_train_t(16, shift=2.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sample_train_t_uniform_covers_the_ends_that_logit_normal_rarely_trains():
    n = 200_000
    uniform = sample_train_t(n, generator=torch.Generator().manual_seed(0), distribution="uniform")
    logit_normal = sample_train_t(n, generator=torch.Generator().manual_seed(0))
    assert uniform.min() >= 0 and uniform.max() < 1
    assert (uniform < 0.15).float().mean().item() == pytest.approx(0.15, abs=0.005)
    # sigmoid(N(0, 1)) < 0.15 only for z < logit(0.15) = -1.73: about 4% of draws.
    assert (logit_normal < 0.15).float().mean().item() == pytest.approx(0.042, abs=0.003)
    shifted = sample_train_t(n, shift=3.0, generator=torch.Generator().manual_seed(0), distribution="uniform")
    torch.testing.assert_close(shifted, time_shift(uniform, 3.0))
    with pytest.raises(ValueError, match="logit_normal, uniform"):
        sample_train_t(4, distribution="beta")
