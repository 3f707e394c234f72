"""The training data path: real MDS shards (written as curation writes them) read back through
mosaicml-streaming, decoded in loader workers, mixed by proportion, resumed exactly, from a local
directory or from S3 (moto's server on 127.0.0.1) through a local cache."""
import logging
from collections import Counter

import pytest
import torch

from deco.data.shard_schema import decode_text_emb, encode_text_emb, image_to_tensor
from deco.data import streaming
from deco.data.streaming import DataConfig, StreamConfig, TrainLoader, resolve_stream_uri
from deco.data.synthetic import synthetic_pairs
from deco.model.text_encoder import TextEncoderConfig

from train_helpers import TINY_CPU, read_jsonl, run_deco, upload_dir, write_mds

RES = 32
BAD = (2, 8, 9, 10, 11, 30, 47)
# The stand-in of each bad sample: the next good one of its stream; a run of bad samples takes the
# next good ones in order, and the stream's last sample wraps to its first.
STAND_IN = {2: 3, 8: 12, 9: 13, 10: 14, 11: 15, 30: 31, 47: 0}


@pytest.fixture(scope="module")
def encoder():
    return TextEncoderConfig(kind="encoder", path="minilm", max_length=32, dtype="float32").build()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, encoder):
    root = tmp_path_factory.mktemp("shards")
    write_mds(root / "plain", 48, RES, seed=1, prefix="p", corrupt_ids=("p00007",))
    write_mds(root / "cached", 16, RES, seed=2, prefix="c", text_encoder=encoder)
    write_mds(root / "other", 48, RES, seed=3, prefix="o")
    # 4 shards of 14, 14, 14, 6 samples; b00008-b00011 fill one whole unshuffled batch of 4.
    write_mds(root / "bad", 48, RES, seed=4, prefix="b", corrupt_ids=tuple(f"b{i:05d}" for i in BAD))
    write_mds(root / "rotten", 10, RES, seed=5, prefix="r", corrupt_ids=tuple(f"r{i:05d}" for i in range(10)))
    return root


def loader(tmp_path, streams, batch=4, workers=0, **overrides):
    cfg = DataConfig(streams=streams, num_workers=workers, clean_stale_shared_memory=False, **overrides)
    cfg.validate()
    return TrainLoader(cfg, RES, batch, tmp_path / "cache")


def epoch_ids(train_loader, batches):
    return [sample_id for _ in range(batches) for sample_id in next(train_loader)["ids"]]


def test_images_are_decoded_in_workers_to_the_model_range_with_their_captions(shards, tmp_path):
    pairs = {f"p{i:05d}": pair for i, pair in enumerate(synthetic_pairs(48, RES, 1))}
    batches = loader(tmp_path, [StreamConfig(uri=str(shards / "plain"))], batch=8, workers=1)
    batch = next(batches)
    assert batch["images"].shape == (8, 3, RES, RES) and batch["images"].dtype == torch.float32
    for index, sample_id in enumerate(batch["ids"]):
        image, caption = pairs[sample_id]
        assert torch.equal(batch["images"][index], image_to_tensor(image))  # PNG is lossless
        assert batch["captions"][index] == caption
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    assert all(emb is None for emb in batch["text_emb"])  # no cache: the trainer encodes captions


def test_cached_text_embeddings_come_from_the_shards(shards, tmp_path, encoder):
    batch = next(loader(tmp_path, [StreamConfig(uri=str(shards / "cached"))], batch=4))
    for caption, emb in zip(batch["captions"], batch["text_emb"]):
        features, mask = encoder.encode([caption])
        expected = decode_text_emb(encode_text_emb(features[0][mask[0]]), features.shape[-1]).float()
        assert emb.shape == (int(mask.sum()), 384) and torch.equal(emb, expected)


def test_an_undecodable_sample_is_skipped_and_the_next_good_one_drawn(shards, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(streaming, "_WARNED_SHARDS", set())  # once per shard per process: start afresh
    pairs = {f"b{i:05d}": pair for i, pair in enumerate(synthetic_pairs(48, RES, 4))}
    stream = [StreamConfig(uri=str(shards / "bad"), name="bad")]
    with caplog.at_level(logging.WARNING, logger="deco.data.streaming"):
        batches = loader(tmp_path / "shuffled", stream, batch=4, shuffle_seed=11)
        seen = [next(batches) for _ in range(12)]  # one epoch of 48
        first_epoch_warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        [next(batches) for _ in range(12)]  # a second epoch meets the same bad samples
    bad_ids = {f"b{i:05d}" for i in BAD}
    delivered = [sid for b in seen for sid in b["ids"]]
    # (a) + (b): no bad sample is delivered, no slot is a copy of another (the stand-in is drawn
    # from the data, not from the batch: with this seed none shares a batch with its stand-in), and
    # every image is the one its id names.
    assert not bad_ids & set(delivered)
    assert all(len(set(b["ids"])) == len(b["ids"]) for b in seen)
    for b in seen:
        assert b["images"].shape == (4, 3, RES, RES)
        for index, sample_id in enumerate(b["ids"]):
            image, caption = pairs[sample_id]
            assert torch.equal(b["images"][index], image_to_tensor(image)) and b["captions"][index] == caption
    # Each bad sample's slot holds its stand-in: the good samples once, the stand-ins once more.
    good = Counter(f"b{i:05d}" for i in range(48) if i not in BAD)
    assert Counter(delivered) == good + Counter(f"b{j:05d}" for j in STAND_IN.values())
    # (d) counted per shard, and one warning per shard that names it and its stream.
    skipped = sorted(zip((sid for b in seen for sid in b["skipped"]), (s for b in seen for s in b["skipped_shards"])))
    shard = {i: str(shards / "bad" / str(RES) / f"shard.0000{i}.mds.zstd") for i in range(4)}
    assert skipped == sorted((f"b{i:05d}", shard[0 if i < 14 else 2 if i < 42 else 3]) for i in BAD)
    assert Counter(s for _, s in skipped) == {shard[0]: 5, shard[2]: 1, shard[3]: 1}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == first_epoch_warnings and len(warnings) == 3  # the second epoch warns no more
    for index in (0, 2, 3):
        assert sum(f"shard.0000{index}.mds.zstd" in w for w in warnings) == 1
    assert all("stream bad" in w for w in warnings)


def test_a_batch_of_only_bad_samples_is_filled_with_the_next_good_ones(shards, tmp_path):
    batches = loader(tmp_path, [StreamConfig(uri=str(shards / "bad"))], batch=4, shuffle=False,
                     num_canonical_nodes=1)
    seen = [next(batches) for _ in range(12)]  # in order: the stand-in of b00002 is the b00003 beside it
    assert seen[0]["skipped"] == ["b00002"] and seen[0]["ids"] == ["b00000", "b00001", "b00003", "b00003"]
    assert seen[2]["skipped"] == ["b00008", "b00009", "b00010", "b00011"]
    assert seen[2]["ids"] == ["b00012", "b00013", "b00014", "b00015"]
    assert seen[11]["skipped"] == ["b00047"] and seen[11]["ids"] == ["b00044", "b00045", "b00046", "b00000"]


def test_skipping_is_deterministic_and_resumes_exactly(shards, tmp_path):
    stream = [StreamConfig(uri=str(shards / "bad"))]

    def batches(train_loader, count):
        return [(b["ids"], b["skipped"], b["skipped_shards"]) for b in (next(train_loader) for _ in range(count))]

    first = loader(tmp_path / "a", stream, batch=4, shuffle_seed=3)
    head = batches(first, 5)
    state = first.state_dict()
    rest = batches(first, 15)  # into the second epoch
    assert batches(loader(tmp_path / "b", stream, batch=4, shuffle_seed=3), 20) == head + rest
    resumed = loader(tmp_path / "c", stream, batch=4, shuffle_seed=3)
    resumed.load_state_dict(state)
    assert batches(resumed, 15) == rest
    assert any(skipped for _, skipped, _ in head + rest)


def test_a_run_of_bad_samples_is_one_clear_error_naming_the_shard(shards, tmp_path):
    batches = loader(tmp_path, [StreamConfig(uri=str(shards / "rotten"))], batch=2, shuffle=False)
    with pytest.raises(RuntimeError, match=r"rotten/32/shard.00000.mds.zstd is corrupt from sample r00000"):
        next(batches)


def test_streams_mix_by_proportion(shards, tmp_path):
    streams = [StreamConfig(uri=str(shards / "plain"), proportion=3.0), StreamConfig(uri=str(shards / "other"), proportion=1.0)]
    batches = loader(tmp_path, streams, batch=8)
    assert batches.samples_per_epoch == 96
    counts = Counter(sid[0] for sid in epoch_ids(batches, 12))
    assert counts == {"p": 72, "o": 24}


def test_loader_state_resumes_at_the_exact_next_sample_across_epochs(shards, tmp_path):
    streams = [StreamConfig(uri=str(shards / "other"))]
    first = loader(tmp_path / "a", streams, batch=8, shuffle_seed=5)
    before = epoch_ids(first, 4)
    state = first.state_dict()
    assert state["sample_in_epoch"] == 32 and state["epoch"] == 0
    expected = epoch_ids(first, 6)  # crosses into the second epoch (48 per epoch)
    resumed = loader(tmp_path / "b", streams, batch=8, shuffle_seed=5)
    resumed.load_state_dict(state)
    assert epoch_ids(resumed, 6) == expected
    assert sorted(before + expected[:16]) == sorted(f"o{i:05d}" for i in range(48))  # one epoch: each once
    assert expected[16:] != (before + expected[:16])[:32]  # the next epoch is reshuffled


def test_streams_from_s3_through_a_local_cache_in_the_same_order(shards, tmp_path, s3_bucket):
    upload_dir(shards / "other", f"{s3_bucket}/curated")
    streams_s3 = [StreamConfig(uri=f"{s3_bucket}/curated")]
    from_s3 = epoch_ids(loader(tmp_path / "s3", streams_s3, batch=8, workers=1), 6)
    local = epoch_ids(loader(tmp_path / "local", [StreamConfig(uri=str(shards / "other"))], batch=8), 6)
    assert from_s3 == local
    assert any((tmp_path / "s3" / "cache").rglob("shard.*.mds*"))


def test_a_location_without_a_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"32/index.json"):
        resolve_stream_uri(str(tmp_path), 32)
    with pytest.raises(ValueError, match="proportion"):
        DataConfig(streams=[StreamConfig(uri="a", proportion=1.0), StreamConfig(uri="b")]).validate()
    with pytest.raises(ValueError, match="streams is empty"):
        DataConfig().validate()


@pytest.mark.slow
def test_training_counts_skipped_samples_per_shard_over_all_ranks(tmp_path):
    """2 ranks, 2 epochs of 24: every bad sample is met twice, counted once per meeting on whichever
    rank met it, per shard, in metrics.jsonl; no bad id reaches the model; the worker warns."""
    bad = ("h00003", "h00004", "h00020")
    data = write_mds(tmp_path / "data", 24, RES, seed=7, prefix="h", corrupt_ids=bad)  # shards of 14 + 10
    result = run_deco("train", "--config", str(TINY_CPU), "--run-dir", str(tmp_path / "run"), "--data",
                      str(data.parent), "--nproc", "2", "--max-steps", "6", "--set", "global_batch=8",
                      "--set", "data.num_workers=1", "--set", "logging.wandb=false", "--set", "logging.sample_every=0",
                      "--set", "logging.record_sample_ids=true", "--set", "checkpoint.every=0", timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    shard = {i: str(data / f"shard.0000{i}.mds.zstd") for i in range(2)}
    assert metrics[-1]["corrupt_samples"] == 6 and metrics[-1]["corrupt_by_shard"] == {shard[0]: 4, shard[1]: 2}
    seen = [sid for record in read_jsonl(tmp_path / "run" / "samples.jsonl") for sid in record["ids"]]
    assert len(seen) == 48 and not set(bad) & set(seen)
    logs = result.stdout + result.stderr
    assert "shard.00000.mds.zstd: sample h0000" in logs and "shard.00001.mds.zstd: sample h00020" in logs
