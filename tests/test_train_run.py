"""A stage that starts from the previous stage's weights (`init_from`) at a new resolution with REPA,
the EMA as saved with the checkpoints, and non-finite losses, under ZeRO-3 as a user runs them
(`python -m deco.pipeline.cli train ...`)."""
import pytest
import torch
import transformers

from deco.data.object_store import open_store
from deco.model.config import ModelConfig
from deco.model.text_encoder import TextEncoderConfig
from deco.orchestration.zero3.ema import EmaConfig
from deco.pipeline.config import load_config
from deco.pipeline.weights import load_weights, save_weights

from train_helpers import ROOT, TINY_CPU, checkpoint_tensors, read_jsonl, run_deco, write_mds

TEXT = TextEncoderConfig(kind="encoder", path="minilm", max_length=32, dtype="float32")
COMMON = ["--set", "logging.wandb=false", "--set", "logging.sample_every=0", "--set", "data.num_workers=1",
          "--set", "global_batch=8"]


@pytest.fixture(scope="module")
def stage_weights(tmp_path_factory):
    """What the previous (16 px, no REPA) stage exports: generator weights with their configs."""
    torch.manual_seed(123)
    model = load_config(ModelConfig, ROOT / "configs" / "model" / "tiny.yaml", ["resolution=16"]).build()
    with torch.no_grad():
        model.decoder.out.weight.normal_(0, 0.05)  # a trained model's decoder is not zero
    return save_weights(tmp_path_factory.mktemp("weights") / "stage32.safetensors", model, TEXT)


@pytest.fixture(scope="module")
def data_32(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards32")
    write_mds(root, 24, 32, seed=7, prefix="h")
    return root


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, patch_size=14, image_size=56)
    transformers.Dinov2Model(config).save_pretrained(path)
    return path


def next_stage(run_dir, data, init, teacher, *extra):
    return ["train", "--config", str(TINY_CPU), "--run-dir", str(run_dir), "--data", str(data), "--nproc", "2",
            "--set", "model.repa.enabled=true", "--set", "model.repa.teacher_dim=32",
            "--set", f"repa_teacher.path={teacher}", "--set", "repa_teacher.dtype=float32",
            "--set", f"init_from={init}", "--set", "ema.decay=0.5", *COMMON, *extra]


def test_a_stage_starts_from_the_previous_stages_weights_and_keeps_an_ema(stage_weights, data_32, teacher_dir, tmp_path,
                                                                         s3_bucket):
    init_uri = f"{s3_bucket}/stage_32/ema.safetensors"  # where the previous stage's export was promoted
    open_store(s3_bucket).put_file("stage_32/ema.safetensors", stage_weights)
    result = run_deco(*next_stage(tmp_path, data_32, init_uri, teacher_dir, "--max-steps", "3",
                                "--checkpoint-every", "1", "--set", "checkpoint.keep_last=0",
                                "--set", "logging.wandb=true", "--set", "logging.sample_every=3",
                                "--set", "logging.sample_steps=2"), timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Observability: an EMA sample grid every 3 steps, and an offline wandb run beside metrics.jsonl.
    assert (tmp_path / "samples" / "step_00000003.png").is_file()
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(m["repa"] > 0 for m in metrics)
    ckpt = {s: checkpoint_tensors(str(tmp_path / "checkpoints" / f"step_{s:08d}"), tmp_path) for s in (1, 2, 3)}
    init, _ = load_weights(stage_weights)
    # The EMA's decay warms up: d_s = min(0.5, (1 + s) / (10 + s)). EMA(1) = d_1 w0 + (1 - d_1) w1,
    # so the step-0 weights the run started from are (EMA(1) - (1 - d_1) w1) / d_1: they are the
    # previous stage's 16 px weights, now on a 4 x 4 token grid (RoPE positions are computed per grid).
    decay = EmaConfig(decay=0.5).decay_at
    assert [decay(s) for s in (1, 2, 3)] == [2 / 11, 3 / 12, 4 / 13]
    for name, tensor in init.generator_state_dict().items():
        started = (ckpt[1]["ema"][name] - (1 - decay(1)) * ckpt[1]["weights"][name]) / decay(1)
        torch.testing.assert_close(started, tensor, rtol=0, atol=1e-5, msg=name)
    # The REPA projector the previous stage did not have was created fresh and trains.
    assert "repa_projector.0.weight" in ckpt[3]["weights"]
    assert not torch.equal(ckpt[3]["weights"]["repa_projector.0.weight"], ckpt[1]["weights"]["repa_projector.0.weight"])
    # The sharded EMA follows ema = d_s ema + (1 - d_s) w after every optimizer step s.
    for name, ema_3 in ckpt[3]["ema"].items():
        ema_2 = decay(2) * ckpt[1]["ema"][name] + (1 - decay(2)) * ckpt[2]["weights"][name]
        expected = decay(3) * ema_2 + (1 - decay(3)) * ckpt[3]["weights"][name]
        torch.testing.assert_close(ema_3, expected, rtol=0, atol=1e-6, msg=name)
    assert ckpt[3]["adam_step"]["state"]["step"].item() == 3  # the optimizer started fresh at step 1


def test_non_finite_losses_are_skipped_then_stop_the_run(stage_weights, data_32, tmp_path):
    model, _ = load_weights(stage_weights)
    with torch.no_grad():
        model.decoder.out.bias[0] = float("nan")
    broken = save_weights(tmp_path / "nan.safetensors", model, TEXT)
    args = ["train", "--config", str(TINY_CPU), "--run-dir", str(tmp_path), "--data", str(data_32), "--max-steps", "10",
            "--set", f"init_from={broken}", "--set", "max_nonfinite_steps=3", *COMMON]
    result = run_deco(*args, timeout=300)
    assert result.returncode == 1
    assert "3 steps in a row had a non-finite loss (last at step 3); stopping" in result.stderr
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(m["step"], m["skipped_nonfinite"], m["loss"], m["nonfinite_steps"]) for m in metrics] == \
        [(1, True, None, 1), (2, True, None, 2), (3, True, None, 3)]
    assert not list((tmp_path / "checkpoints").glob("step_*"))  # nothing non-finite is ever saved
