"""Sampling from a noised image (SDEdit, what benchmarks/demo_denoise.py measures) and the training
time distribution: the public front-ends, with a real tiny DeCo and the real MiniLM encoder."""
import pytest
import torch

from deco.model.sampling import SamplerConfig
from deco.pipeline.config import ConfigError, load_config
from deco.pipeline.evaluate.gate_config import load_gate_config
from deco.pipeline.sample import generate
from deco.pipeline.train.config import TrainConfig
from deco.pipeline.weights import load_weights

from geneval_helpers import ROOT, tiny_weights

PROMPTS = ["a photo of a red circle", "a photo of two squares"]


@pytest.fixture(scope="module")
def model_and_encoder(tmp_path_factory):
    model, text_cfg = load_weights(tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors"))
    return model.eval(), text_cfg.build()


def test_a_late_start_keeps_the_image_and_a_start_at_zero_ignores_it(model_and_encoder):
    model, encoder = model_and_encoder
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    late = SamplerConfig(method="euler", steps=4, cfg_scale=1.0, start_time=0.98)
    kept = generate(model, encoder, PROMPTS, late, seed=3, init_images=images)
    # From t0 = 0.98 the image carries 2% noise and the ODE moves it for 0.02 of its time.
    assert (kept - images).abs().mean().item() < 0.05
    assert torch.equal(kept, generate(model, encoder, PROMPTS, late, seed=3, init_images=images))
    fresh = generate(model, encoder, PROMPTS, SamplerConfig(method="euler", steps=4, cfg_scale=1.0), seed=3)
    assert (fresh - images).abs().mean().item() > 0.3


def test_start_time_and_init_images_go_together(model_and_encoder):
    model, encoder = model_and_encoder
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="go together"):
        generate(model, encoder, PROMPTS, SamplerConfig(cfg_scale=1.0), seed=0, init_images=images)
    with pytest.raises(ValueError, match="go together"):
        generate(model, encoder, PROMPTS, SamplerConfig(cfg_scale=1.0, start_time=0.5), seed=0)
    with pytest.raises(ValueError, match=r"init_images must be \(2, 3, H, W\)"):
        generate(model, encoder, PROMPTS, SamplerConfig(cfg_scale=1.0, start_time=0.5), seed=0,
                 init_images=images[:1])
    with pytest.raises(ValueError, match="differs from the init_images"):
        generate(model, encoder, PROMPTS, SamplerConfig(cfg_scale=1.0, start_time=0.5), seed=0,
                 init_images=images, size=(32, 64))
    with pytest.raises(ValueError, match="differs from the init_images"):
        generate(model, encoder, PROMPTS, SamplerConfig(cfg_scale=1.0, start_time=0.5), seed=0,
                 init_images=images, resolution=64)


def test_geneval_refuses_a_late_start_and_training_an_unknown_time_distribution():
    with pytest.raises(ConfigError, match="start_time must be 0"):
        load_gate_config("demo_64", ["generation.sampler.start_time=0.5"])
    train = ROOT / "configs" / "train" / "tiny_cpu.yaml"
    assert load_config(TrainConfig, train, ["objective.time_distribution=uniform"]).objective.time_distribution == "uniform"
    with pytest.raises(ConfigError, match="logit_normal"):
        load_config(TrainConfig, train, ["objective.time_distribution=beta"])


def test_training_draws_times_from_the_configured_distribution():
    from deco.model.objective import ObjectiveConfig, draw_times

    n = 100_000
    uniform = draw_times(ObjectiveConfig(time_shift=1.0, time_distribution="uniform"), n, torch.Generator().manual_seed(0))
    paper = draw_times(ObjectiveConfig(time_shift=1.0), n, torch.Generator().manual_seed(0))
    assert (uniform < 0.1).float().mean().item() == pytest.approx(0.10, abs=0.005)
    assert (paper < 0.1).float().mean().item() < 0.02  # logit-normal: z < logit(0.1) = -2.2, about 1.4%
