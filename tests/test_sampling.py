"""Samplers: convergence order on an analytic ODE, guidance placement and batching, determinism."""

import math

import pytest
import torch

from deco.model.sampling import SamplerConfig, initial_noise, sample, time_grid

# dx/dt = a * cos(B t) * x has the closed form x(1) = x(0) * exp(a * sin(B) / B). The velocity
# depends on both x and t, so errors from the time grid and from x both show up.
FREQ = 3.0


def analytic_velocity(x, t, cond):
    (rate,) = cond
    return rate.view(-1, 1) * torch.cos(FREQ * t).view(-1, 1) * x


X0 = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
RATE = torch.tensor([1.5, -0.8], dtype=torch.float64)
EXACT = X0 * torch.exp(RATE.view(-1, 1) * math.sin(FREQ) / FREQ)


def _error(method: str, steps: int, shift: float, heun_variant: str = "reference") -> float:
    cfg = SamplerConfig(method=method, steps=steps, cfg_scale=1.0, time_shift=shift, heun_variant=heun_variant)
    return (sample(analytic_velocity, X0, cfg, (RATE,)) - EXACT).abs().max().item()


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize(
    ("method", "low", "high"),
    [("euler", 0.8, 1.3), ("heun", 1.7, 2.4), ("heun/textbook", 1.7, 2.4), ("adams2", 1.7, 2.4)],
)
def test_convergence_order(method, low, high, shift):
    method, _, variant = method.partition("/")
    variant = variant or "reference"
    coarse, fine = _error(method, 40, shift, variant), _error(method, 80, shift, variant)
    observed_order = math.log2(coarse / fine)
    assert low < observed_order < high, f"{method} shift={shift}: order {observed_order:.2f}"
    assert fine < 0.05


def test_time_grid_is_shifted_linspace():
    grid = time_grid(SamplerConfig(steps=4, time_shift=3.0))
    expected = [u / (u + 3.0 * (1 - u)) for u in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert grid == pytest.approx(expected, abs=1e-15)
    assert grid[0] == 0.0 and grid[-1] == 1.0


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_a_late_start_keeps_the_shifted_grid_from_there(shift):
    full = time_grid(SamplerConfig(steps=8, time_shift=shift))
    late = time_grid(SamplerConfig(steps=4, time_shift=shift, start_time=full[4]))
    assert late == pytest.approx(full[4:], abs=1e-12)
    assert late[0] == full[4] and late[-1] == 1.0
    # A late start integrates only the rest of the way: on the analytic ODE, starting at t0 from
    # the exact solution there lands on the exact end point.
    t0 = 0.4
    at_t0 = X0 * torch.exp(RATE.view(-1, 1) * math.sin(FREQ * t0) / FREQ)
    cfg = SamplerConfig(method="adams2", steps=80, cfg_scale=1.0, time_shift=shift, start_time=t0)
    torch.testing.assert_close(sample(analytic_velocity, at_t0, cfg, (RATE,)), EXACT, atol=2e-3, rtol=0)


class ConstantVelocity:
    """Returns each sample's condition value as its velocity and records every call."""

    def __init__(self):
        self.calls: list[tuple[int, list[float]]] = []

    def __call__(self, x, t, cond):
        value, unused = cond
        assert unused is None  # None elements of the cond tuple pass through untouched
        assert t.shape == (x.shape[0],) and value.shape[0] == x.shape[0]
        self.calls.append((x.shape[0], t.tolist()))
        return value.view(-1, 1).expand_as(x).clone()


C_VALUE, U_VALUE, SCALE = 2.0, -1.0, 4.0


def _run_constant(interval, method="euler", steps=6, shift=3.0, scale=SCALE, heun_variant="reference"):
    cfg = SamplerConfig(method=method, steps=steps, cfg_scale=scale, cfg_interval=interval, time_shift=shift,
                        heun_variant=heun_variant)
    fn = ConstantVelocity()
    batch = 3
    cond = (torch.full((batch,), C_VALUE, dtype=torch.float64), None)
    uncond = (torch.full((batch,), U_VALUE, dtype=torch.float64), None)
    out = sample(fn, torch.zeros(batch, 2, dtype=torch.float64), cfg, cond, uncond)
    return cfg, fn, out


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.3, 0.8)])
def test_guidance_applied_only_inside_interval(interval):
    cfg, fn, out = _run_constant(interval)
    grid = time_grid(cfg)
    lo, hi = interval
    guided = U_VALUE + SCALE * (C_VALUE - U_VALUE)
    expected = sum(
        (t1 - t0) * (guided if lo < t0 <= hi else C_VALUE) for t0, t1 in zip(grid[:-1], grid[1:])
    )
    torch.testing.assert_close(out, torch.full_like(out, expected))

    # Euler: one call per step, at the step's start time, doubled batch exactly when guided.
    assert len(fn.calls) == cfg.steps
    for (batch, times), t0 in zip(fn.calls, grid[:-1]):
        assert times == pytest.approx([t0] * batch)
        assert batch == (6 if lo < t0 <= hi else 3)
    if interval == (0.0, 1.0):
        assert fn.calls[0][0] == 3  # the first step, at t = 0, is never guided
        assert all(batch == 6 for batch, _ in fn.calls[1:])
    else:
        assert {batch for batch, _ in fn.calls} == {3, 6}


@pytest.mark.parametrize(("method", "calls_per_step"), [("euler", 1), ("heun/textbook", 2), ("adams2", 1)])
def test_one_model_call_per_evaluation_even_when_guided(method, calls_per_step):
    method, _, variant = method.partition("/")
    cfg, fn, out = _run_constant((0.0, 1.0), method=method, steps=5, heun_variant=variant or "reference")
    assert len(fn.calls) == calls_per_step * cfg.steps
    assert [batch for batch, _ in fn.calls].count(3) == 1  # only the evaluation at t = 0 is unguided

    # The velocity is C at t = 0 and the guided constant afterwards; each method's update rule
    # applied to that sequence gives the exact expected output.
    grid = time_grid(cfg)
    guided = U_VALUE + SCALE * (C_VALUE - U_VALUE)
    velocity = [C_VALUE] + [guided] * cfg.steps  # at grid[0], grid[1], ...
    steps = [t1 - t0 for t0, t1 in zip(grid[:-1], grid[1:])]
    if method == "euler":
        expected = sum(h * v for h, v in zip(steps, velocity))
    elif method == "heun":
        expected = sum(0.5 * h * (velocity[i] + velocity[i + 1]) for i, h in enumerate(steps))
    else:
        expected = steps[0] * velocity[0]
        for i in range(1, cfg.steps):
            r = steps[i] / (2 * steps[i - 1])
            expected += steps[i] * ((1 + r) * velocity[i] - r * velocity[i - 1])
    torch.testing.assert_close(out, torch.full_like(out, expected))


def test_reference_heun_reuses_the_corrector_velocity_and_ends_with_euler():
    # The reference's default Heun (spec section 8; their HeunSampler with exact_henu=False), traced
    # on a velocity that records its calls: steps calls in all, no call at the last step's start,
    # the corrector at t1 guided by t0 (so the first corrector, after t = 0, is unguided), and the
    # update rule written out here from their sampler's description.
    steps = 5
    cfg, fn, out = _run_constant((0.0, 1.0), method="heun", steps=steps)
    grid = time_grid(cfg)
    assert len(fn.calls) == steps
    assert [times[0] for _, times in fn.calls] == pytest.approx([grid[0], *grid[1:steps]])
    assert [batch for batch, _ in fn.calls] == [3, 3, 6, 6, 6]
    guided = U_VALUE + SCALE * (C_VALUE - U_VALUE)
    v_hat = [C_VALUE, C_VALUE, guided, guided, guided]   # predictor at t0, then each corrector
    h = [t1 - t0 for t0, t1 in zip(grid[:-1], grid[1:])]
    expected = sum(0.5 * h[i] * (v_hat[i] + v_hat[i + 1]) for i in range(steps - 1)) + h[-1] * v_hat[-1]
    torch.testing.assert_close(out, torch.full_like(out, expected))
    with pytest.raises(ValueError, match="reference, textbook"):
        SamplerConfig(method="heun", heun_variant="exact")


def test_adams2_uses_variable_step_coefficients():
    # For a velocity linear in t, every AB2 step after the first is exact on any grid (the
    # extrapolated line is the velocity itself); only the first, Euler, step misses beta*h0^2/2.
    # Fixed-step coefficients (3/2, -1/2) would be wrong on the shifted, non-uniform grid.
    alpha, beta = 0.7, -2.0
    cfg = SamplerConfig(method="adams2", steps=7, cfg_scale=1.0, time_shift=3.0)
    fn = lambda x, t, cond: (alpha + beta * t).view(-1, 1).expand_as(x)  # noqa: E731
    out = sample(fn, torch.zeros(1, 1, dtype=torch.float64), cfg, None)
    first_step = time_grid(cfg)[1]
    expected = alpha + beta / 2 - beta * first_step**2 / 2
    torch.testing.assert_close(out, torch.full_like(out, expected), rtol=0, atol=1e-12)


def test_cfg_scale_one_equals_plain_conditional_run():
    noise = initial_noise((2, 2), seed=0, dtype=torch.float64)

    def fn(x, t, cond):
        (rate,) = cond
        return analytic_velocity(x, t, cond) + rate.view(-1, 1) * t.view(-1, 1)

    counted = []

    def counting_fn(x, t, cond):
        counted.append(x.shape[0])
        return fn(x, t, cond)

    cfg = SamplerConfig(method="adams2", steps=10, cfg_scale=1.0)
    plain = sample(counting_fn, noise, cfg, (RATE,))
    with_uncond = sample(counting_fn, noise, cfg, (RATE,), (torch.zeros(2, dtype=torch.float64),))
    torch.testing.assert_close(plain, with_uncond, rtol=0, atol=0)
    assert set(counted) == {2}  # no wasted unconditional half when guidance is a no-op

    # A real guidance weight changes the result, with the same inputs.
    guided = sample(fn, noise, SamplerConfig(method="adams2", steps=10, cfg_scale=3.0), (RATE,), (-RATE,))
    assert not torch.allclose(guided, plain)


def test_guidance_accepts_plain_tensor_conditions():
    cfg = SamplerConfig(method="euler", steps=4, cfg_scale=2.0, time_shift=1.0)
    fn = lambda x, t, cond: cond.view(-1, 1).expand_as(x)  # noqa: E731
    out = sample(fn, torch.zeros(2, 1), cfg, torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
    # Step at t = 0 unguided (velocity 1), the other three guided (0 + 2 * (1 - 0) = 2).
    torch.testing.assert_close(out, torch.full((2, 1), 0.25 * 1 + 0.75 * 2))


def test_invalid_configs_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="euler, heun, adams2"):
        SamplerConfig(method="rk4")
    with pytest.raises(ValueError, match="steps"):
        SamplerConfig(steps=0)
    with pytest.raises(ValueError, match="cfg_interval"):
        SamplerConfig(cfg_interval=(0.8, 0.2))
    for start in (-0.1, 1.0):
        with pytest.raises(ValueError, match="start_time"):
            SamplerConfig(start_time=start)
    with pytest.raises(ValueError, match="uncond"):
        sample(analytic_velocity, X0, SamplerConfig(cfg_scale=4.0), (RATE,))
    with pytest.raises(TypeError, match="None in both"):
        sample(analytic_velocity, X0, SamplerConfig(cfg_scale=4.0), (RATE, None), (RATE, RATE))


def test_initial_noise_is_seeded_and_device_independent_by_construction():
    a = initial_noise((2, 3, 8, 8), seed=7, device="cpu")
    b = initial_noise((2, 3, 8, 8), seed=7, device="cpu")
    c = initial_noise((2, 3, 8, 8), seed=8, device="cpu")
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    assert a.dtype == torch.float32
    # Other dtypes are the same float32 draw, cast: a seed means the same image at any precision.
    torch.testing.assert_close(initial_noise((2, 3, 8, 8), seed=7, dtype=torch.bfloat16), a.bfloat16())


@pytest.mark.parametrize("method", ["euler", "heun", "adams2"])
def test_sampling_is_deterministic_for_a_seed(method):
    def fn(x, t, cond):
        (scale,) = cond
        return -torch.tanh(x) * torch.cos(t).view(-1, 1, 1, 1) + scale.view(-1, 1, 1, 1)

    cfg = SamplerConfig(method=method, steps=8, cfg_scale=2.5, cfg_interval=(0.1, 1.0))
    cond, uncond = (torch.tensor([0.5, -0.5]),), (torch.zeros(2),)

    def run(seed):
        return sample(fn, initial_noise((2, 3, 8, 8), seed=seed), cfg, cond, uncond)

    first, second, other = run(11), run(11), run(12)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not torch.allclose(first, other)
    assert torch.isfinite(first).all()
