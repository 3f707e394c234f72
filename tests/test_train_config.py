"""Training configs (the paper's recipe), the DeepSpeed config they generate, the ZeRO-3 partition
layout, and the multi-node launch commands (`deco launch --dry-run`)."""
import json
from pathlib import Path

import pytest
import torch

from deco.orchestration.launch import read_hostfile
from deco.orchestration.zero3.engine import EngineConfig, OptimizerConfig, deepspeed_config, resolve_precision
from deco.orchestration.zero3.files import partition_numel
from deco.orchestration.zero3.partitions import partition_of
from deco.pipeline.train.checkpoint import resolve_resume
from deco.pipeline.train.manifest import CheckpointError
from deco.pipeline.cli import main
from deco.pipeline.config import ConfigError
from deco.pipeline.train.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "configs" / "train"


def test_stage_configs_follow_the_papers_recipe():
    stage_256 = load_train_config(TRAIN / "t2i_256.yaml")
    stage_512 = load_train_config(TRAIN / "t2i_512.yaml")
    finetune = load_train_config(TRAIN / "t2i_finetune.yaml")
    table = [  # spec/deco.md section 9: res, global batch, steps, lr, betas, time shift
        (stage_256, (256, 1536, 200_000, 2e-4, (0.9, 0.95), 2.0)),
        (stage_512, (512, 512, 80_000, 1e-4, (0.9, 0.95), 4.0)),
        (finetune, (512, 512, 40_000, 1e-5, (0.9, 0.999), 4.0)),
    ]
    for cfg, (res, batch, steps, lr, betas, shift) in table:
        assert (cfg.resolution, cfg.global_batch, cfg.max_steps, cfg.optimizer.lr) == (res, batch, steps, lr)
        assert tuple(cfg.optimizer.betas) == betas and cfg.objective.time_shift == shift
        assert cfg.optimizer.weight_decay == 0.0 and cfg.optimizer.warmup_steps == 0
        assert cfg.engine.grad_clip == 1.0 and cfg.engine.precision == "bf16" and cfg.ema.decay == 0.9999
        assert cfg.objective.text_dropout == 0.1 and cfg.model.dit.hidden == 1536 and cfg.model.repa.enabled
        assert cfg.text_encoder.max_length == 128 and cfg.text_encoder.dtype == "bfloat16"
        assert cfg.micro_batch(8) * 8 * cfg.engine.grad_accum == batch
    assert finetune.data.streams[0].name == "blip3o_60k"


def test_tiny_cpu_runs_two_ranks_on_the_tiny_model():
    cfg = load_train_config(TRAIN / "tiny_cpu.yaml")
    assert cfg.model.dit.hidden == 192 and cfg.resolution == 32 and cfg.max_steps == 20
    assert cfg.micro_batch(2) == 8 and cfg.run_dir == "runs/tiny_cpu"
    assert cfg.engine.param_persistence_threshold == 0


def test_cli_shortcuts_override_the_file():
    cfg = load_train_config(TRAIN / "tiny_cpu.yaml", ["optimizer.lr=0.5"], data="s3://b/x", max_steps=7,
                            checkpoint_every=3, run_dir="elsewhere")
    assert [s.uri for s in cfg.data.streams] == ["s3://b/x"]
    assert (cfg.max_steps, cfg.checkpoint.every, cfg.run_dir, cfg.optimizer.lr) == (7, 3, "elsewhere", 0.5)


def test_config_mistakes_are_clear_errors():
    with pytest.raises(ConfigError, match=r"optimizer\.lrr.*did you mean 'optimizer\.lr'"):
        load_train_config(TRAIN / "tiny_cpu.yaml", ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match="not divisible by 3 ranks"):
        load_train_config(TRAIN / "tiny_cpu.yaml").micro_batch(3)
    with pytest.raises(ConfigError, match="repa_teacher.path"):
        load_train_config(TRAIN / "tiny_cpu.yaml", ["model.repa.enabled=true"])
    with pytest.raises(ConfigError, match="text_len"):
        load_train_config(TRAIN / "tiny_cpu.yaml", ["text_encoder.max_length=64"])


def test_deepspeed_config_is_generated_from_the_engine_config():
    engine = EngineConfig(precision="bf16", grad_clip=0.5, grad_accum=3, overlap_comm=False,
                          contiguous_gradients=True, param_persistence_threshold=0)
    ds = deepspeed_config(engine, micro_batch=16, precision="bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["overlap_comm"] is False and zero["contiguous_gradients"] is True
    assert zero["stage3_param_persistence_threshold"] == 0 and ds["zero_allow_untested_optimizer"]
    assert deepspeed_config(EngineConfig(), 1, "fp32")["bf16"] == {"enabled": False}
    assert resolve_precision(EngineConfig(), torch.device("cpu")) == "fp32"
    assert resolve_precision(EngineConfig(), torch.device("cuda", 0)) == "bf16"


def test_learning_rate_is_constant_after_an_optional_linear_warmup():
    assert [OptimizerConfig(lr=1.0).lr_at(s) for s in (1, 100)] == [1.0, 1.0]
    assert [OptimizerConfig(lr=1.0, warmup_steps=4).lr_at(s) for s in (1, 2, 4, 5)] == [0.25, 0.5, 1.0, 1.0]


@pytest.mark.parametrize("numel", [1, 7, 8, 101])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_zero3_partitions_cover_a_tensor_exactly_once(numel, world):
    full = torch.arange(numel, dtype=torch.float32)
    size = partition_numel(numel, world)
    parts = [partition_of(full, rank, size) for rank in range(world)]
    assert all(p.numel() == size for p in parts)
    assert torch.equal(torch.cat(parts)[:numel], full)
    assert torch.count_nonzero(torch.cat(parts)[numel:]) == 0  # padding is zeros


def test_resume_names_a_complete_checkpoint_or_fails_clearly(tmp_path):
    assert resolve_resume("", str(tmp_path)) == [] and resolve_resume("auto", str(tmp_path)) == []
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoints" / "step_00000004"), str(tmp_path))


def test_launch_with_a_hostfile_builds_the_deepspeed_launcher_command(tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    assert read_hostfile(str(hostfile)) == {"node-a": 8, "node-b": 8}
    code = main(["launch", "--config", str(TRAIN / "t2i_256.yaml"), "--hostfile", str(hostfile), "--dry-run",
                 "--set", "max_steps=10"])
    command = capsys.readouterr().out.split()
    assert code == 0
    assert command[1:3] == ["-m", "deepspeed.launcher.runner"] and "--no_local_rank" in command
    assert command[command.index("--hostfile") + 1] == str(hostfile) and "--no_ssh_check" not in command
    tail = command[command.index("--module") + 1:]
    assert tail[:4] == ["deco.pipeline.cli", "train", "--config", str(TRAIN / "t2i_256.yaml")]
    assert tail[tail.index("--resume") + 1] == "auto" and "max_steps=10" in tail


def test_launch_on_slurm_writes_one_torchrun_per_node(capsys):
    code = main(["launch", "--config", str(TRAIN / "t2i_512.yaml"), "--slurm", "--nodes", "4", "--gpus-per-node", "8",
                 "--time", "48:00:00", "--partition", "gpu", "--dry-run"])
    script = capsys.readouterr().out
    assert code == 0 and script.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --time=48:00:00", "#SBATCH --partition=gpu", "#SBATCH --requeue"):
        assert line in script
    assert "#SBATCH --signal=TERM@" in script  # SIGTERM before the time limit: the run checkpoints
    run = script.strip().splitlines()[-1]
    assert "-m torch.distributed.run --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d" in run
    assert run.endswith(f"-m deco.pipeline.cli train --config {TRAIN / 't2i_512.yaml'} --run-dir runs/t2i_512 --resume auto")


def test_launch_rejects_a_bad_hostfile(tmp_path, capsys):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a 8\n")
    assert main(["launch", "--config", str(TRAIN / "tiny_cpu.yaml"), "--hostfile", str(hostfile), "--dry-run"]) == 2
    assert "expected 'hostname slots=N'" in capsys.readouterr().err


def test_train_config_round_trips_through_the_checkpoint_yaml():
    from deco.pipeline.train.config import train_config_from_yaml

    cfg = load_train_config(TRAIN / "t2i_512.yaml")
    again = train_config_from_yaml(cfg.to_yaml(), "test")
    assert again == cfg and again.digest() == cfg.digest()
    assert json.loads(json.dumps(again.optimizer.betas)) == [0.9, 0.95]
