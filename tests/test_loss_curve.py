"""The loss curve picture: <run_dir>/loss_curve.png drawn from the trainer's metrics (MetricsLogger
redraws it on demand, as the trainer asks at each checkpoint, and when it closes), in bounded memory,
across a resumed launch."""
import io
import json
import math

from PIL import Image

from deco.pipeline.charts import PALETTE
from deco.pipeline.train.loss_curve import LOSS_CURVE, LossHistory, write_loss_curve
from deco.pipeline.train.metrics import LoggingConfig, MetricsLogger


def record(step: int, loss: float | None) -> dict:
    """A step record with the fields the trainer writes (pipeline/train/trainer.py train_step)."""
    return {"step": step, "loss": loss, "mse": None if loss is None else 0.6 * loss,
            "freq": None if loss is None else 0.4 * loss, "grad_norm": 1.0, "lr": 1e-3, "samples_per_s": 30.0,
            "samples_seen": 16 * step, "step_time_s": 0.5, "data_wait_share": 0.01, "mfu": None, "memory_gib": 1.0,
            "skipped_nonfinite": loss is None, "first_step": 1}


def colour_rows(image: Image.Image, colour, x_from: int, x_to: int, y_from: int = 0) -> list[int]:
    return [y for x in range(x_from, x_to) for y in range(y_from, image.height) if image.getpixel((x, y)) == colour]


def test_a_falling_loss_is_drawn_falling_with_its_terms(tmp_path):
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    losses = {s: 2.0 * 0.97 ** s for s in range(1, 201)}
    losses[120] = None  # a skipped non-finite step: a gap, not a crash
    metrics.write_text("".join(json.dumps(record(s, loss)) + "\n" for s, loss in losses.items()) + '{"step": 20')
    path = write_loss_curve(metrics)
    assert path == metrics.with_name(LOSS_CURVE)
    image = Image.open(io.BytesIO(path.read_bytes()))
    assert image.format == "PNG" and image.size == (900, 480)
    image = image.convert("RGB")
    # The plot spans x 72..876; the legend sits top right, so the right end is read below it.
    left = colour_rows(image, PALETTE[0], 80, 160)
    right = colour_rows(image, PALETTE[0], 700, 860, y_from=120)
    assert left and right and sum(left) / len(left) < sum(right) / len(right) - 150  # higher on the left
    for term in (PALETTE[1], PALETTE[2]):  # mse and freq have their own lines
        assert colour_rows(image, term, 80, 160)


def test_history_stays_bounded_and_keeps_the_mean():
    history = LossHistory(points=50)
    for step in range(1, 10_001):
        history.add({"step": step, "loss": float(step % 7), "mse": 1.0})
    assert len(history.buckets) < 100 and history.stride & (history.stride - 1) == 0
    loss = history.series()["loss"]
    weights = [b["n"] for b in history.buckets]
    mean = sum(w * y for w, (_, y) in zip(weights, loss)) / sum(weights)
    assert math.isclose(mean, sum(s % 7 for s in range(1, 10_001)) / 10_000)
    assert history.buckets[-1]["last"] == 10_000 and sum(weights) == 10_000
    assert set(history.series()) == {"loss", "mse"}  # terms never recorded are not drawn


def test_the_logger_draws_the_whole_curve_across_a_resume(tmp_path):
    cfg = LoggingConfig(wandb=False)
    first = MetricsLogger(cfg, tmp_path, rank=0, config={}, max_steps=40, start_step=1)
    for step in range(1, 31):
        first.log_step(record(step, 1.0 / step))
    assert first.write_loss_curve() == tmp_path / LOSS_CURVE  # what the trainer calls at a checkpoint
    first.close()
    drawn = (tmp_path / LOSS_CURVE).stat().st_mtime_ns
    # Resumed from the checkpoint of step 20: steps 21-30 of the dead launch are dropped.
    second = MetricsLogger(cfg, tmp_path, rank=0, config={}, max_steps=40, start_step=21)
    for step in range(21, 41):
        second.log_step(record(step, 0.5 / step))
    second.close()
    assert (tmp_path / LOSS_CURVE).stat().st_mtime_ns >= drawn
    # The same picture as one drawn from the kept metrics alone (steps 1-20, then 21-40 of the new
    # launch): the logger's curve held the earlier launch and dropped the abandoned steps.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 41))
    again = write_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "again.png", name=tmp_path.name)
    assert again.read_bytes() == (tmp_path / LOSS_CURVE).read_bytes()
    assert MetricsLogger(cfg, tmp_path / "rank1", rank=1, config={}, max_steps=40, start_step=1).write_loss_curve() is None
