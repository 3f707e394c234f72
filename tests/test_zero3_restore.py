"""Restoring full tensors into a live ZeRO-3 engine (the elastic path, orchestration/zero3):
the optimizer keeps its own state tensors, so their device and dtype stay the optimizer's.

Reported: with torch's fused AdamW (the fallback when DeepSpeed's FusedAdam does not build) an
elastic restore put Adam's `step` on the CPU, as read from the checkpoint, while the parameters were
on the GPU. The restore now lets the optimizer create its state (a zero-gradient step at learning
rate 0) and copies the checkpoint's values into it. On this CPU every device is the CPU, so the
mismatch itself cannot show: the test pins that the restored state is the optimizer's own (on the
flat group's device), holds the checkpoint's values, leaves the weights alone, and steps on.
"""
import subprocess
import sys

from train_helpers import ROOT, TINY_CPU, run_deco, write_mds

SCRIPT = r'''
import os, sys, json
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=sys.argv[2])
import torch
from deco.model.config import ModelConfig
from deco.orchestration.zero3.engine import (EngineConfig, OptimizerConfig, build_model, build_optimizer,
                                             deepspeed_config, init_distributed, parallelize)
from deco.orchestration.zero3.files import ZeroCheckpointReader
from deco.orchestration.zero3.partitions import set_full_state
from deco.pipeline.config import load_config
from deco.pipeline.train.manifest import read_manifest

checkpoint = sys.argv[1]
engine_cfg = EngineConfig(precision="fp32", param_persistence_threshold=100_000)
init_distributed(engine_cfg, torch.device("cpu"))
ds_config = deepspeed_config(engine_cfg, 4, "fp32")
model = build_model(load_config(ModelConfig, "configs/model/tiny.yaml"), ds_config, engine_cfg)
optimizer = build_optimizer(model.parameters(), OptimizerConfig(impl="torch_fused"), torch.device("cpu"))
engine = parallelize(model, optimizer, ds_config, engine_cfg)
inner = engine.optimizer.optimizer
flats = engine.optimizer.fp32_partitioned_groups_flat
assert not any(inner.state.get(flat) for flat in flats)  # torch creates Adam's state at its first step
manifest = read_manifest(checkpoint)
reader = ZeroCheckpointReader(checkpoint, manifest.files, manifest.world_size)
set_full_state(engine, reader, rank=0)
restored = [inner.state[flat] for flat in flats]
restored_steps = [float(state["step"]) for state in restored]
weights_equal = all(torch.equal(tensor, reader.tensors(name, ("fp32",))["fp32"])
                    for name, tensor in ((n, p.ds_tensor[:p.ds_numel].view(p.ds_shape)) for n, p in model.named_parameters()))
x = torch.rand(4, 3, 32, 32) * 2 - 1
loss = engine(x, torch.rand(4), torch.randn(4, 32, 384), torch.ones(4, 32, dtype=torch.bool)).square().mean()
engine.backward(loss)
engine.step()
print(json.dumps({"fused": bool(inner.defaults.get("fused")), "saved": float(reader.step_state["state"]["step"]),
                  "steps": restored_steps, "weights_equal": weights_equal,
                  "devices_match": all(state[key].device == flat.device for state, flat in zip(restored, flats)
                                       for key in ("step", "exp_avg", "exp_avg_sq")),
                  "after_step": sorted({float(inner.state[flat]["step"]) for flat in flats})}))
'''


def test_an_elastic_restore_writes_into_the_optimizers_own_state(tmp_path):
    import json

    from deco.orchestration.launch import free_port

    data = write_mds(tmp_path / "data", 16, 32, seed=2).parent
    result = run_deco("train", "--config", str(TINY_CPU), "--run-dir", str(tmp_path / "run"), "--data", str(data),
                      "--max-steps", "3", "--set", "global_batch=4", "--set", "data.num_workers=0",
                      "--set", "logging.wandb=false", "--set", "logging.sample_every=0")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000003"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(checkpoint), str(free_port())], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["fused"] and report["saved"] == 3.0
    assert set(report["steps"]) == {3.0} and report["devices_match"] and report["weights_equal"], report
    assert report["after_step"] == [4.0]  # the fused optimizer took the restored state and stepped on
