"""`deco export`: a training checkpoint -> one portable .safetensors that `deco sample` and the GenEval
gate load (deco.pipeline.weights.load_weights): the generator's full fp32 weights, or their EMA,
with the model and text-encoder configs in the header. The REPA projector is left out.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from deco.data.object_store import is_s3, join, open_store
from deco.orchestration.parallelize import ZeroCheckpointReader
from deco.pipeline.checkpoint import CONFIG, DS_TAG, TRAINER, ds_key, ds_optim_keys
from deco.pipeline.checkpoint_manifest import MANIFEST, CheckpointError, CheckpointRef, latest_complete, read_manifest
from deco.pipeline.ema import ShardedEma
from deco.pipeline.train_config import train_config_from_yaml
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
    import json

    ref = resolve_checkpoint(checkpoint_uri)
    manifest = read_manifest(ref.uri)
    world_size = manifest.world_size
    ema_keys = sorted(k for k in manifest.files if k.startswith("ema/"))
    if ema and not ema_keys:
        raise CheckpointError(f"{ref.uri} holds no EMA (ema.enabled was false): export it without --ema")
    keys = [CONFIG, TRAINER] + (ema_keys if ema else [ds_key(0, "model"), *ds_optim_keys(manifest.files)])
    with tempfile.TemporaryDirectory(prefix="deco-export-") as tmp:
        root = Path(tmp) if is_s3(ref.uri) else Path(ref.uri)
        if is_s3(ref.uri):
            store = open_store(ref.uri)
            for key in keys:
                store.get_file(key, root / key)
        cfg = train_config_from_yaml((root / CONFIG).read_text(), join(ref.uri, CONFIG))
        trainer_state = json.loads((root / TRAINER).read_text())
        if ema:
            state = ShardedEma.read_full([root / k for k in ema_keys])
        else:
            state = ZeroCheckpointReader(root / DS_TAG, world_size, moments=()).weights()
        model = cfg.model.build()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{ref.uri}: weights do not match its config (missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]})")
        extra = {"step": ref.step, "checkpoint": ref.uri, "ema": ema, "samples_seen": trainer_state["samples_seen"]}
        return save_weights(out_path, model.eval(), cfg.text_encoder, extra=extra)
