"""The shipped demo pipeline (configs/pipelines/demo.yaml) holds together before a 10-minute run finds
out: every stage's config and overrides load, the 64 px stage can start from the 32 px one, and the
text features curation stores are the ones training and the gates compute."""
from pathlib import Path

from deco.model.config import identity_differences
from deco.pipeline.config import load_config, to_dict
from deco.pipeline.curate.job import load_curate_config
from deco.pipeline.stages import load_pipeline
from deco.pipeline.train.config import TrainConfig

DEMO = Path(__file__).resolve().parents[1] / "configs" / "pipelines" / "demo.yaml"


def train_config(pipeline, name: str) -> TrainConfig:
    stage = pipeline.stage(name)
    overrides = [*stage.overrides, f"model.resolution={stage.resolution}", f"data.resolution={stage.resolution}"]
    return load_config(TrainConfig, pipeline.resolve(stage.config), overrides)


def test_every_demo_stage_loads_and_the_64px_stage_can_start_from_the_32px_one(tmp_path):
    pipeline = load_pipeline(DEMO)
    low, high = train_config(pipeline, "stage_32"), train_config(pipeline, "stage_64")
    assert pipeline.stage("stage_64").init_from == "stage_32"
    assert identity_differences(to_dict(low.model), to_dict(high.model)) == []
    # The variants the demo was measured with (README, "What the demo shows").
    assert high.model.dit.pooled_text and high.model.decoder.predicts == "data"
    curated = pipeline.stage("curated")
    curate = load_curate_config(pipeline.resolve(curated.config), list(curated.overrides), [str(tmp_path / "in")],
                                str(tmp_path / "out"))
    # The cached features are the training text encoder's own (kind, weights, length, precision).
    cached = curate.text_emb.encoder_config()
    assert curate.text_emb.enabled and cached == low.text_encoder == high.text_encoder
    assert curate.transform.resolutions == [32, 64]
