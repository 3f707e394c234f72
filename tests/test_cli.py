"""The `deco` CLI: a frozen flag set, and each command run as a user runs it (a subprocess)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from deco.model.config import ModelConfig
from deco.model.text_encoder import TextEncoderConfig
from deco.pipeline.cli import build_parser
from deco.pipeline.config import load_config
from deco.pipeline.weights import load_weights, save_weights

ROOT = Path(__file__).resolve().parents[1]

# New capabilities add config fields, not flags: changing this table is a deliberate CLI change.
FROZEN_FLAGS = {
    ("model", "summary"): {"--config", "--set"},
    ("model", "import-reference"): {"--checkpoint", "--out", "--ema", "--set"},
    ("sample",): {"--weights", "--prompt", "--n", "--steps", "--cfg", "--seed", "--sampler", "--time-shift", "--size",
                  "--out"},
    ("demo",): {"--out", "--set"},
    ("pipeline", "run"): {"--set"},
    ("pipeline", "status"): {"--set", "--json"},
    ("train",): {"--config", "--nproc", "--run-dir", "--data", "--max-steps", "--checkpoint-every", "--resume", "--set"},
    ("launch",): {"--config", "--hostfile", "--slurm", "--nodes", "--gpus-per-node", "--partition", "--time",
                  "--run-dir", "--dry-run", "--set"},
    ("export",): {"--checkpoint", "--out", "--ema"},
    ("data", "synth"): {"--out", "--n", "--seed", "--format", "--bad-fraction"},
    ("curate",): {"--config", "--input", "--output", "--ray-address", "--set", "--takedown"},
    ("geneval", "generate"): {"--weights", "--checkpoint", "--prompts", "--out", "--config", "--set"},
    ("geneval", "score"): {"--images", "--out", "--detector", "--detections", "--save-detections", "--config", "--set"},
    ("geneval", "summary"): {"--out"},
    ("geneval", "report"): {"--results", "--out"},
    ("geneval", "synthetic-prompts"): {"--out", "--per-task", "--seed"},
    ("gate", "run"): {"--checkpoint", "--force", "--config", "--set"},
    ("gate", "watch"): {"--stage", "--stage-uri", "--watcher-id", "--once", "--max-polls", "--config", "--set"},
}


def _subparsers(parser):
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action.choices
    return {}


def _leaf_flags(parser, path=()):
    children = _subparsers(parser)
    if not children:
        yield path, {s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    for name, child in children.items():
        yield from _leaf_flags(child, path + (name,))


def test_cli_flags_are_frozen():
    assert dict(_leaf_flags(build_parser())) == FROZEN_FLAGS


def run_deco(*args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "deco.pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_model_summary_prints_one_json_object():
    result = run_deco("model", "summary", "--config", "configs/model/t2i_xxl16.yaml")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {"params_total", "params_dit", "params_decoder", "train_flops_per_sample"} <= summary.keys()
    assert abs(summary["params_total"] - 1_133.8e6) / 1_133.8e6 < 0.01


def test_bad_config_key_exits_nonzero_with_the_fix():
    result = run_deco("model", "summary", "--config", "configs/model/tiny.yaml", "--set", "decoder.widht=8")
    assert result.returncode == 2
    assert "decoder.widht" in result.stderr and "decoder.width" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = load_config(ModelConfig, ROOT / "configs" / "model" / "tiny.yaml", ["repa.enabled=true"]).build()
    with torch.no_grad():
        model.decoder.out.weight.normal_(0, 0.1)  # non-zero velocity so samples depend on the prompt
    text_cfg = TextEncoderConfig(kind="encoder", path="minilm", max_length=32, dtype="float32")
    return model, save_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors", model, text_cfg)


def test_weights_round_trip_without_the_training_only_projector(tiny_weights):
    model, path = tiny_weights
    loaded, text_cfg = load_weights(path)
    assert text_cfg.path == "minilm" and loaded.repa_projector is None
    x, t = torch.randn(1, 3, 32, 32), torch.rand(1)
    text, mask = torch.randn(1, 4, 384), torch.ones(1, 4, dtype=torch.bool)
    assert torch.equal(loaded(x, t, text, mask), model.eval()(x, t, text, mask))


def test_sample_writes_a_deterministic_grid(tiny_weights, tmp_path):
    _, path = tiny_weights
    outputs = []
    for name, seed in (("a.png", "3"), ("b.png", "3"), ("c.png", "4")):
        result = run_deco("sample", "--weights", str(path), "--prompt", "a red circle", "--n", "4",
                          "--steps", "4", "--seed", seed, "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
        outputs.append(Image.open(tmp_path / name).convert("RGB"))
    assert outputs[0].size == (2 * 34 + 2, 2 * 34 + 2)  # 2x2 grid of 32 px images, 2 px padding
    assert outputs[0].tobytes() == outputs[1].tobytes()
    assert outputs[0].tobytes() != outputs[2].tobytes()


def test_sample_size_generates_that_height_and_width(tiny_weights, tmp_path):
    _, path = tiny_weights  # patch 8
    result = run_deco("sample", "--weights", str(path), "--prompt", "a red circle", "--n", "2", "--steps", "2",
                      "--size", "24x40", "--out", str(tmp_path / "wide.png"))
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "wide.png").size == (2 * (40 + 2) + 2, 24 + 2 + 2)  # 2 columns of 40 x 24
    result = run_deco("sample", "--weights", str(path), "--prompt", "x", "--size", "30x40", "--out", str(tmp_path / "g.png"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("--size 30x40: height and width must be multiples of the "
                                                           "model's patch size 8")


def test_sample_with_missing_weights_is_a_clear_error(tmp_path):
    result = run_deco("sample", "--weights", str(tmp_path / "none.safetensors"), "--prompt", "x", "--out", str(tmp_path / "g.png"))
    assert result.returncode == 2 and "weights file not found" in result.stderr
