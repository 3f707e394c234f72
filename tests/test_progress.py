"""Progress of long work: a tqdm bar on a terminal, plain periodic lines with rate and ETA in a log,
nothing when disabled or off rank 0; and real curation, training and GenEval runs reporting through it."""
import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import termios

import pytest

from deco.orchestration.progress import Progress, format_duration, format_rate


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def terminal():
    """A real pseudo-terminal, 200 columns wide: (the stream a program writes to, read all written)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    stream = open(slave, "w", encoding="utf-8")

    def written() -> str:
        stream.flush()
        chunks = []
        while select.select([master], [], [], 0.1)[0]:
            chunks.append(os.read(master, 65536))
        return b"".join(chunks).decode("utf-8", "replace")

    yield stream, written
    stream.close()
    os.close(master)


def test_log_lines_every_period_with_rate_eta_and_a_final_line():
    clock, log = FakeClock(), io.StringIO()
    bar = Progress("train", 360, unit="step", every_s=30, stream=log, clock=clock)
    for _ in range(59):  # 2 steps a second, 29.5 s: no line yet
        clock.now += 0.5
        bar.update(1)
    assert log.getvalue() == ""
    clock.now += 0.5
    bar.update(1, note="loss 0.4121")
    assert log.getvalue() == "[train] step 60/360 (16%) 2.0 steps/s, ETA 2m30s | loss 0.4121\n"
    clock.now += 10
    bar.update(1)  # 10 s after the last line: none
    assert log.getvalue().count("\n") == 1
    clock.now += 120
    bar.update(299)
    bar.close()
    bar.close()  # a second close prints nothing more
    lines = log.getvalue().splitlines()
    assert lines[1:] == ["[train] step 360/360 (100%) 2.2 steps/s, done in 2m40s | loss 0.4121"]
    assert "\r" not in log.getvalue()


def test_resumed_run_counts_done_steps_in_percent_not_rate_and_sums_counts():
    clock, log = FakeClock(), io.StringIO()
    bar = Progress("curate stage", 10, unit="partition", initial=4, every_s=0, stream=log, clock=clock)
    clock.now += 5
    bar.update(1, samples=600)
    bar.update(1, samples=200)
    assert log.getvalue().splitlines() == [
        "[curate stage] partition 5/10 (50%) 0.20 partitions/s, ETA 25s | 600 samples (120.0/s)",
        "[curate stage] partition 6/10 (60%) 0.40 partitions/s, ETA 10s | 800 samples (160.0/s)"]


def test_units_and_durations_read_well():
    assert format_rate(2.14, "step") == "2.1 steps/s" and format_rate(250, "image") == "250 images/s"
    assert format_rate(0.02, "prompt") == "50.0 s/prompt" and format_rate(0, "step") == "? steps/s"
    assert (format_duration(45), format_duration(114), format_duration(7380)) == ("45s", "1m54s", "2h03m")
    line = Progress("x", None, unit="item", stream=io.StringIO(), clock=FakeClock()).line()
    assert line == "[x] item 0 ? items/s"  # unknown total: no percentage, no ETA


def test_a_terminal_gets_a_tqdm_bar_not_lines(terminal):
    term, written = terminal
    with Progress("geneval score", 8, unit="image", stream=term) as bar:
        for _ in range(8):
            bar.update(1, note="ok")
        bar.print("a message of the caller's own", file=term)
    out = written()
    assert "\r" in out and re.search(r"geneval score: 100%\|[^\n]*\| 8/8 \[", out)
    assert "image/s" in out and "ok" in out and "a message of the caller's own" in out
    assert "[geneval score]" not in out


def test_a_terminal_of_no_size_gets_lines():  # where tqdm would cut its bar to nothing
    master, slave = pty.openpty()  # nobody set its window size: 0 columns
    with open(slave, "w", encoding="utf-8") as term, Progress("train", 2, unit="step", every_s=0, stream=term) as bar:
        bar.update(2)
    assert os.read(master, 65536).decode().startswith("[train] step 2/2 (100%) ")
    os.close(master)


def test_disabled_rank_nonzero_and_environment_off_print_nothing(monkeypatch, terminal):
    term, written = terminal
    for options in ({"enabled": False}, {"rank": 1}):
        log = io.StringIO()
        for stream in (log, term):
            with Progress("train", 5, unit="step", every_s=0, stream=stream, **options) as bar:
                bar.update(5)
        assert written() == "" and log.getvalue() == ""
    monkeypatch.setenv("DECO_PROGRESS", "0")
    log = io.StringIO()
    with Progress("train", 5, every_s=0, stream=log) as bar:
        bar.update(5)
    assert log.getvalue() == ""


def test_training_metrics_show_steps_with_rate_eta_and_loss(tmp_path, monkeypatch, capsys):
    from deco.pipeline.train.metrics import LoggingConfig, MetricsLogger

    monkeypatch.setenv("DECO_PROGRESS_EVERY", "0")
    record = {"loss": 0.5, "mse": 0.3, "freq": 0.2, "grad_norm": 1.0, "lr": 1e-3, "samples_per_s": 30.0,
              "data_wait_share": 0.01, "memory_gib": 1.5, "first_step": 3}
    for rank in (1, 0):
        metrics = MetricsLogger(LoggingConfig(wandb=False), tmp_path, rank, {}, max_steps=4, start_step=3)
        for step in (3, 4):
            metrics.log_step({**record, "step": step})
        metrics.close()
    out, err = capsys.readouterr()
    assert out == ""  # no per-step lines by default: a log gets the periodic ones
    lines = [line for line in err.splitlines() if line.startswith("[train]")]  # rank 0's only
    assert len(lines) == 2 and lines[0].startswith("[train] step 3/4 (75%) ") and ", ETA " in lines[0]
    assert re.match(r"\[train\] step 4/4 \(100%\) [\d.]+ steps/s, done in \d+s \| loss 0\.5000 \| mse", lines[1])
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [3, 4]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from geneval_helpers import tiny_weights

    return tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


def test_geneval_generation_and_scoring_print_periodic_lines_in_a_log(tmp_path, weights, monkeypatch, capsys):
    from deco.pipeline.evaluate.geneval.detectors.synthetic import SyntheticDetector
    from deco.pipeline.evaluate.geneval.generate import GenerationConfig, generate_layout
    from deco.pipeline.evaluate.geneval.prompts import parse_prompts
    from deco.pipeline.evaluate.geneval.score import score_images
    from deco.pipeline.evaluate.geneval.synthetic_prompts import synthetic_prompts

    monkeypatch.setenv("DECO_PROGRESS_EVERY", "0")  # every batch, so that a short run shows several
    prompts = parse_prompts([json.dumps(r) for r in synthetic_prompts(per_task=1)], "synthetic")[:3]
    cfg = GenerationConfig(images_per_prompt=2, batch_size=2, autocast="none")  # one prompt a batch
    cfg.sampler.steps, cfg.sampler.time_shift = 1, 1.0
    generate_layout(weights, prompts, tmp_path / "images", cfg)
    score_images(tmp_path / "images", SyntheticDetector())
    err = capsys.readouterr().err
    generated = [line for line in err.splitlines() if line.startswith("[geneval generate]")]
    assert generated[0].startswith("[geneval generate] prompt 1/3 (33%) ") and ", ETA " in generated[0]
    assert "| 2 images (" in generated[0] and ", done in " in generated[-1] and len(generated) == 3
    scored = [line for line in err.splitlines() if line.startswith("[geneval score]")]
    assert scored and scored[-1].startswith("[geneval score] image 6/6 (100%) ") and "\r" not in err
