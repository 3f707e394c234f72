"""The training data path: real MDS shards (written as curation writes them) read back through
mosaicml-streaming, decoded in loader workers, mixed by proportion, resumed exactly, from a local
directory or from S3 (moto's server on 127.0.0.1) through a local cache."""
from collections import Counter

import pytest
import torch

from deco.data.shard_schema import decode_text_emb, encode_text_emb, image_to_tensor
from deco.data.streaming import DataConfig, StreamConfig, TrainLoader, resolve_stream_uri
from deco.data.synthetic import synthetic_pairs
from deco.model.text_encoder import TextEncoderConfig

from train_helpers import upload_dir, write_mds

RES = 32


@pytest.fixture(scope="module")
def encoder():
    return TextEncoderConfig(kind="encoder", path="minilm", max_length=32, dtype="float32").build()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, encoder):
    root = tmp_path_factory.mktemp("shards")
    write_mds(root / "plain", 48, RES, seed=1, prefix="p", corrupt_ids=("p00007",))
    write_mds(root / "cached", 16, RES, seed=2, prefix="c", text_encoder=encoder)
    write_mds(root / "other", 48, RES, seed=3, prefix="o")
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
        if sample_id in batch["skipped"]:
            continue
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


def test_an_undecodable_image_is_counted_and_replaced_not_dropped(shards, tmp_path):
    batches = loader(tmp_path, [StreamConfig(uri=str(shards / "plain"))], batch=8)
    seen = [next(batches) for _ in range(6)]  # one epoch of 48
    skipped = [sid for b in seen for sid in b["skipped"]]
    assert skipped == ["p00007"]
    assert all(b["images"].shape[0] == 8 for b in seen)
    assert sorted(sid for b in seen for sid in b["ids"]) == [f"p{i:05d}" for i in range(48)]


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
