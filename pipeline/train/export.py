"""`deco export`: a training checkpoint -> one portable .safetensors that `deco sample` and the GenEval
gate load (deco.pipeline.weights.load_weights): the generator's full fp32 weights, or their EMA,
with the model and text-encoder configs in the header. The REPA projector is left out. Every file
read is checked against the manifest's checksum first.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from deco.data.object_store import is_s3, join, open_store
from deco.orchestration.zero3 import state as zero_state
from deco.pipeline.train.checkpoint import CONFIG, TRAINER
from deco.pipeline.train.config import train_config_from_yaml
from deco.pipeline.train.manifest import (MANIFEST, CheckpointError, CheckpointRef, latest_complete, read_manifest,
                                          verify_file)
from deco.pipeline.weights import save_weights


def resolve_checkpoint(uri: str) -> CheckpointRef:
    """A checkpoint prefix (with its manifest), or a stage URI: its newest complete checkpoint."""
    uri = str(uri).rstrip("/")
    manifest = read_manifest(uri)
    if manifest is not None:
        return CheckpointRef(manifest.step, uri)
    ref = latest_complete(uri)
    if ref is None:
        raise CheckpointError(f"{uri} is neither a complete checkpoint (no {MANIFEST}) nor a stage with one")
    return ref


def export_checkpoint(checkpoint_uri: str, out_path: str | Path, ema: bool = True) -> Path:
    """Write the checkpoint's generator weights (EMA when `ema`) to `out_path`; returns the path."""
    ref = resolve_checkpoint(checkpoint_uri)
    manifest = read_manifest(ref.uri)
    if ema and not zero_state.has_ema(manifest.files):
        raise CheckpointError(f"{ref.uri} holds no EMA (ema.enabled was false): export it without --ema")
    keys = [CONFIG, TRAINER, *zero_state.state_keys(manifest.files, weights=not ema, ema=ema)]
    with tempfile.TemporaryDirectory(prefix="deco-export-") as tmp:
        root = Path(tmp) if is_s3(ref.uri) else Path(ref.uri)
        store = open_store(ref.uri)
        for key in keys:
            if is_s3(ref.uri):
                store.get_file(key, root / key)
            verify_file(manifest, ref.uri, key, root / key)
        cfg = train_config_from_yaml((root / CONFIG).read_text(), join(ref.uri, CONFIG))
        trainer_state = json.loads((root / TRAINER).read_text())
        tensors = zero_state.full_state(root, manifest.files, manifest.world_size, weights=not ema, ema=ema)
        state = tensors["ema"] if ema else tensors["weights"]
        model = cfg.model.build()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{ref.uri}: weights do not match its config (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]})")
        extra = {"step": ref.step, "checkpoint": ref.uri, "ema": ema, "samples_seen": trainer_state["samples_seen"]}
        return save_weights(out_path, model.eval(), cfg.text_encoder, extra=extra)
