"""Shared pieces of the GenEval and gate tests: a tiny generator, checkpoints that follow the
manifest contract, official-layout directories of drawn scenes, and fast gate settings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from deco.data.checksum import file_checksum
from deco.data.object_store import join, open_store
from deco.data.synthetic import make_scene
from deco.model.config import ModelConfig
from deco.model.text_encoder import TextEncoderConfig
from deco.pipeline.train.manifest import Manifest, step_dir, write_manifest
from deco.pipeline.config import load_config
from deco.pipeline.evaluate.geneval.layout import write_prompt_folder
from deco.pipeline.weights import save_weights

ROOT = Path(__file__).resolve().parents[1]
TEXT = TextEncoderConfig(kind="encoder", path="minilm", max_length=32, dtype="float32")


def tiny_weights(path: Path, seed: int = 0, overrides: tuple[str, ...] = (), as_initialised: bool = False) -> Path:
    """The CPU-sized DeCo with random weights (non-zero output so images depend on the prompt), or
    with `as_initialised` exactly as training starts it (zero output layer)."""
    torch.manual_seed(seed)
    model = load_config(ModelConfig, ROOT / "configs" / "model" / "tiny.yaml", list(overrides)).build()
    if not as_initialised:
        with torch.no_grad():
            model.decoder.out.weight.normal_(0, 0.1)
    return save_weights(path, model, TEXT)


def write_checkpoint(stage_uri: str, step: int, weights: Path, manifest: bool = True, missing_file: bool = False) -> str:
    """A checkpoint holding a weights file (key weights.safetensors) and, last, its manifest."""
    uri = join(stage_uri, "checkpoints", step_dir(step))
    store = open_store(uri)
    store.put_file("weights.safetensors", weights)
    files = {"weights.safetensors": weights.stat().st_size}
    checksums = {"weights.safetensors": file_checksum(weights)}
    if missing_file:
        files["model/shard_0.pt"] = 123  # listed, never written: a corrupt checkpoint
        checksums["model/shard_0.pt"] = "xxh3_128:0"
    if manifest:
        write_manifest(uri, Manifest(step=step, world_size=1, files=files, checksums=checksums))
    return uri


def scene_layout(outdir: Path, size: int, count: int, seed: int, images_per_prompt: int = 1) -> list:
    """Drawn scenes of every task written as an official-layout directory (their captions as prompts)."""
    import random

    rng = random.Random(seed)
    scenes = []
    for index in range(count):
        task = ("single_object", "two_object", "counting", "colors", "position", "color_attr")[index % 6]
        drawn = [make_scene(rng, size, task) for _ in range(images_per_prompt)]
        metadata = drawn[0].metadata()
        # Every image of a prompt shows that prompt's scene (redrawn elsewhere with its own texture).
        images = [drawn[0].image()] + [_redraw(d, drawn[0]) for d in drawn[1:]]
        write_prompt_folder(outdir, index, metadata, images)
        scenes.append(drawn[0])
    return scenes


def _redraw(other, scene):
    from deco.data.synthetic import render

    return render(list(scene.objects), (scene.width, scene.height), scene.background, other.texture_seed)


# A gate that runs in seconds on a CPU: few prompts, 2 images each, 4 sampler steps, no wandb.
# The demo gates' minimums reject an untrained or barely trained model (test_gate.py checks that);
# tests of the gate's plumbing (claims, verdicts, reports, promotion) take any score.
ANY_SCORE = ["thresholds.min_overall=0.0", "thresholds.min_task.single_object=0.0"]
FAST_GATE = ANY_SCORE + ["synthetic_per_task=2", "generation.images_per_prompt=2", "generation.sampler.steps=4",
             "generation.batch_size=16", "weights.source=file", "report.wandb=false", "poll_s=0.2"]


def run_deco(*args, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deco.pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def read_store_json(uri: str, key: str) -> dict | None:
    try:
        return json.loads(open_store(uri).get_bytes(key))
    except FileNotFoundError:
        return None
