"""torch.compile per transformer block, applied by the engine after activation checkpointing and
before ZeRO-3 (orchestration/zero3/engine.py).

A whole-model compile of the tiny config takes about 110 s on this CPU, so: each block kind is
traced by dynamo alone (graph breaks counted: none allowed), and the tiny model trains 2 steps under
the real engine compiled (with activation checkpointing) and eager, through `deco train`, where
the compiled run must match the eager one to float rounding.
"""
import pytest
import torch

from deco.model.config import ModelConfig
from deco.model.layers import AdaLNBlock, rope_2d
from deco.pipeline.config import load_config

from train_helpers import ROOT, TINY_CPU, checkpoint_tensors, read_jsonl, run_deco, write_mds


def block_inputs(cfg, batch=2, grid=4, text_len=6):
    gen = torch.Generator().manual_seed(0)
    hidden = cfg.dit.hidden
    x = torch.randn(batch, grid * grid, hidden, generator=gen)
    cond = torch.randn(batch, hidden, generator=gen)
    text = torch.randn(batch, text_len, hidden, generator=gen)
    rope = rope_2d(grid, grid, cfg.dit.head_dim, cfg.dit.rope_theta)
    valid = torch.ones(batch, text_len, dtype=torch.bool)
    valid[0, 3:] = False
    mask = torch.cat([torch.ones(batch, grid * grid, dtype=torch.bool), valid], dim=1)[:, None, None, :]
    return x, cond, rope, text, mask


@pytest.mark.parametrize("attends_text", [False, True], ids=["text_refine_block", "image_block"])
def test_a_block_compiles_to_one_graph_without_breaks(attends_text):
    cfg = load_config(ModelConfig, ROOT / "configs" / "model" / "tiny.yaml")
    block = AdaLNBlock(cfg.dit.hidden, cfg.dit.heads, cfg.dit.mlp_hidden, attends_text=attends_text)
    x, cond, rope, text, mask = block_inputs(cfg)
    args = (x, cond, rope, text, mask) if attends_text else (text, cond, None, None, None)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block.forward)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_under_zero3(tmp_path):
    """2 steps, 1 rank, ZeRO-3: compiled blocks (inductor) with activation checkpointing against eager
    without: losses within 1e-5 relative, weights within 1e-5 absolute after the two updates."""
    data = write_mds(tmp_path / "data", 16, 32, seed=5).parent
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--set", "engine.compile=true",
                                                     "--set", "engine.activation_checkpointing=true"])):
        run_dir = tmp_path / name
        result = run_deco("train", "--config", str(TINY_CPU), "--run-dir", str(run_dir), "--data", str(data),
                          "--nproc", "1", "--max-steps", "2", "--set", "global_batch=8", "--set", "data.num_workers=0",
                          "--set", "logging.wandb=false", "--set", "logging.sample_every=0", *extra, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        runs[name] = ([r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")],
                      checkpoint_tensors(str(run_dir / "checkpoints" / "step_00000002"), run_dir)["weights"])
    (eager_loss, eager_w), (compiled_loss, compiled_w) = runs["eager"], runs["compiled"]
    assert len(eager_loss) == 2 and compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    for name, tensor in eager_w.items():
        torch.testing.assert_close(compiled_w[name], tensor, rtol=0, atol=1e-5, msg=name)
