"""Aspect-ratio buckets end to end, short of training (tests/test_train_resume.py trains on them):
bucket sizes and assignment, the cover-and-crop geometry of the fast resize path, a bucketed
curation run writing one MDS dataset per bucket (provenance included) that the training loader
reads back one bucket per batch, and the model on a non-square token grid."""
import io
import json
from collections import Counter

import pytest
import torch
from PIL import Image

from deco.data.buckets import BucketConfig, bucket_sizes, nearest_bucket, parse_size
from deco.data.errors import DatasetError
from deco.data.filters import decode_image, open_image
from deco.data.synthetic import photo_caption, photo_like_image
from deco.data.transforms import TransformConfig, centre_square, cover_box, render, resize_cover_crop

from image_helpers import jpeg, psnr
from train_helpers import ROOT

SHAPES = ("wide", "square", "tall")
BUCKETS = TransformConfig(resolutions=[256, 512], crop="buckets", jpeg_quality=95)


def area(box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def test_buckets_are_whole_patches_of_about_the_resolutions_pixels():
    for resolution in (256, 512):
        sizes = bucket_sizes(resolution, BucketConfig())
        assert len(sizes) == 9 and (resolution, resolution) in sizes
        assert all(h % 16 == 0 and w % 16 == 0 for h, w in sizes)
        assert all(abs(h * w / resolution**2 - 1) < 0.04 for h, w in sizes)
        assert sizes == sorted(sizes, key=lambda hw: hw[1] / hw[0])  # tallest first, widest last
        assert {(w, h) for h, w in sizes} == set(sizes)                # every shape in both orientations
    assert bucket_sizes(256, BucketConfig())[-1] == (160, 400)
    explicit = BucketConfig(sizes={256: ["256x256", "224x288", "288x224", "192x320", "320x192", "160x384", "384x160"]})
    assert bucket_sizes(256, explicit)[-1] == (160, 384) and bucket_sizes(512, explicit)[-1] == (336, 800)
    # nearest by log aspect ratio: 2:1 and 1:2 are equally far from 1:1, the first listed wins a tie
    assert nearest_bucket(200, 100, [(100, 100), (100, 400)]) == (100, 100)
    assert nearest_bucket(100, 200, [(100, 100), (400, 100)]) == (100, 100)
    assert parse_size("224x288") == (224, 288)
    with pytest.raises(ValueError, match="not HxW"):
        parse_size("224:288")
    with pytest.raises(ValueError, match="multiple of transform.buckets.multiple=16"):
        TransformConfig(resolutions=[256], crop="buckets", buckets=BucketConfig(sizes={256: ["250x256"]})).validate()


def test_a_wide_image_goes_to_the_widest_bucket_and_keeps_most_of_its_area():
    # The 1500x520 photo: the square centre crop keeps 35% of it, the widest bucket 87%.
    assert BUCKETS.target(1500, 520, 256) == (160, 400) and BUCKETS.target(1500, 520, 512) == (336, 800)
    square = area(centre_square(1500, 520)) / (1500 * 520)
    bucket = area(cover_box(1500, 520, 400, 160)) / (1500 * 520)
    assert square == pytest.approx(520 / 1500) and bucket == pytest.approx(1300 / 1500)
    # the cut is centred and only along the long side: all 520 rows, 1300 of the 1500 columns
    assert cover_box(1500, 520, 400, 160) == (100.0, 0.0, 1400.0, 520.0)
    assert cover_box(300, 900, 160, 400) == (0.0, 75.0, 300.0, 825.0)
    for size, scale in (((1500, 520), 1), ((3000, 1040), 2)):  # a full decode, and a 1/2 draft
        data = jpeg(photo_like_image(7, *size))
        decoded = open_image(data, 10**9, draft_side=512)
        assert decoded.scale == scale
        out = render(decoded, BUCKETS)
        assert out[256].size == (400, 160) and out[512].size == (800, 336)
        for r, (h, w) in ((256, (160, 400)), (512, (336, 800))):
            assert psnr(out[r], resize_cover_crop(decode_image(data, 10**9), h, w)) >= 40.0, (size, r)


def test_exif_rotation_picks_the_bucket_of_the_upright_image():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1600x600 landscape, shown as a 600x1600 portrait
    data = jpeg(photo_like_image(4, 1600, 600), exif=exif.tobytes())
    decoded = open_image(data, 10**9, draft_side=256)
    assert decoded.size == (600, 1600) and decoded.scale == 2
    out = render(decoded, TransformConfig(resolutions=[256], crop="buckets"))[256]
    assert out.size == (160, 400)  # the tallest bucket, 400 high
    assert psnr(out, resize_cover_crop(decode_image(data, 10**9), 400, 160)) >= 40.0


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """A bucketed curation (local execution) of 4 wide, 4 square and 4 tall photos at 32 and 64 px."""
    from deco.pipeline.curate.job import curate, load_curate_config

    root = tmp_path_factory.mktemp("buckets")
    (root / "in").mkdir()
    for n in range(12):
        name = SHAPES[n % 3]
        photo_like_image(n, *{"wide": (300, 104), "square": (96, 96), "tall": (80, 128)}[name]).save(
            root / "in" / f"{name}{n:02d}.png")
        (root / "in" / f"{name}{n:02d}.txt").write_text(photo_caption(n))
    overrides = ["execution=local", "progress=false", "transform.crop=buckets", "transform.buckets.multiple=8"]
    cfg = load_curate_config(str(ROOT / "configs" / "data" / "curate_demo.yaml"), overrides, [str(root / "in")],
                             str(root / "out"))
    return root / "out", curate(cfg)


def test_curation_writes_one_stream_per_bucket_with_an_index_that_lists_them(curated, tmp_path):
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    out, report = curated
    assert report["samples_kept"] == 12
    clean_stale_shared_memory()
    for resolution, expected in ((32, {(24, 48): "wide", (32, 32): "square", (40, 24): "tall"}),
                                 (64, {(40, 96): "wide", (64, 64): "square", (80, 56): "tall"})):
        index = json.loads((out / str(resolution) / "buckets.json").read_text())["buckets"]
        sizes = bucket_sizes(resolution, BucketConfig(multiple=8))
        assert [(b["height"], b["width"]) for b in index] == sizes  # every bucket, an empty one too
        assert {(b["height"], b["width"]): b["samples"] for b in index if b["samples"]} == {hw: 4 for hw in expected}
        for (h, w), shape in expected.items():
            assert report["shards"][f"{resolution}/b{h}x{w}"]["samples"] == 4
            rows = list(StreamingDataset(remote=str(out / str(resolution) / f"b{h}x{w}"),
                                         local=str(tmp_path / f"{resolution}-{h}x{w}"), shuffle=False, batch_size=1))
            assert [r["id"] for r in rows] == [f"{shape}{n:02d}" for n in range(12) if SHAPES[n % 3] == shape]
            for row in rows:
                assert (row["height"], row["width"]) == (h, w) and Image.open(io.BytesIO(row["image"])).size == (w, h)
                assert row["source"] == str(out.parent / "in") and "url" in row  # provenance on every bucket
        assert not (out / str(resolution) / "index.json").exists()  # no square dataset beside the buckets


def test_the_loader_reads_the_buckets_back_one_bucket_per_batch(curated, tmp_path, caplog):
    from deco.data.streaming import DataConfig, StreamConfig, TrainLoader, resolve_stream_uri

    out, _ = curated
    cfg = DataConfig(streams=[StreamConfig(uri=str(out))], crop="buckets", num_workers=0,
                     clean_stale_shared_memory=False)
    with caplog.at_level("WARNING", logger="deco.data.streaming"):
        loader = TrainLoader(cfg, 32, 2, tmp_path / "cache", multiple=8)
    assert "fewer samples than a global batch of 2" in caplog.text  # the empty buckets
    assert sorted(loader.sizes) == [(24, 48), (32, 32), (40, 24)]
    batches = [next(loader) for _ in range(6)]  # one epoch
    for batch in batches:
        shapes = {sample_id.rstrip("0123456789") for sample_id in batch["ids"]}
        assert len(shapes) == 1 and batch["images"].shape[0] == 2
        assert batch["images"].shape[2:] == {"wide": (24, 48), "square": (32, 32), "tall": (40, 24)}[shapes.pop()]
    assert Counter(i for b in batches for i in b["ids"]) == Counter(p.stem for p in (out.parent / "in").glob("*.png"))
    state = loader.state_dict()
    ahead = [next(loader)["ids"] for _ in range(4)]
    resumed = TrainLoader(cfg, 32, 2, tmp_path / "cache2", multiple=8)
    resumed.load_state_dict(state)
    assert [next(resumed)["ids"] for _ in range(4)] == ahead
    with pytest.raises(FileNotFoundError, match="holds aspect-ratio buckets .*set data.crop=buckets"):
        resolve_stream_uri(str(out), 32)
    with pytest.raises(DatasetError, match=r"images of 24x48, 40x24 \(HxW\) are not whole patches of 16 px"):
        TrainLoader(cfg, 32, 2, tmp_path / "cache3", multiple=16)


def test_the_model_runs_on_a_non_square_grid_with_rope_along_each_axis():
    from deco.model.config import ModelConfig
    from deco.model.dit import patchify, unpatchify
    from deco.model.layers import rope_2d, rope_positions
    from deco.pipeline.config import load_config

    x = torch.randn(2, 3, 24, 40)
    assert torch.equal(unpatchify(patchify(x, 8), 8, 24, 40), x)
    # a 3 x 5 token grid: x positions along each row, y positions down each column
    xs, ys = rope_positions(3, 5, "arange")
    assert xs.tolist() == [0, 1, 2, 3, 4] and ys.tolist() == [0, 1, 2]
    xs, ys = rope_positions(3, 5, "reference")  # the authors' code: each axis ends at the other's count
    assert xs.tolist() == pytest.approx([0, 0.75, 1.5, 2.25, 3]) and ys.tolist() == pytest.approx([0, 2.5, 5])
    xs, ys = rope_positions(3, 5, "per_axis")   # even steps on both axes, the reference on squares
    assert xs.tolist() == pytest.approx([0, 1.25, 2.5, 3.75, 5]) and ys.tolist() == pytest.approx([0, 1.5, 3])
    assert torch.equal(rope_positions(4, 4, "per_axis")[0], rope_positions(4, 4, "reference")[0])
    cos, _ = rope_2d(3, 5, 64, 10000.0, positions="arange")
    grid = cos.reshape(3, 5, 16, 2)  # (rows, columns, frequency, axis x|y)
    assert torch.equal(grid[0, :, :, 1], grid[0, :1, :, 1].expand(5, -1))       # a row shares its y angles
    assert torch.equal(grid[:, 0, :, 0], grid[:1, 0, :, 0].expand(3, -1))       # a column shares its x angles
    assert not torch.equal(grid[0, 1, :, 0], grid[0, 0, :, 0]) and not torch.equal(grid[1, 0, :, 1], grid[0, 0, :, 1])
    torch.manual_seed(0)
    model = load_config(ModelConfig, ROOT / "configs" / "model" / "tiny.yaml").build().eval()
    with torch.no_grad():
        model.decoder.out.weight.normal_(0, 0.1)
        text, mask = torch.randn(2, 4, 384), torch.ones(2, 4, dtype=torch.bool)
        wide = model(x, torch.rand(2), text, mask)
        tall = model(x.transpose(-1, -2), torch.rand(2), text, mask)
    assert wide.shape == x.shape and tall.shape == (2, 3, 40, 24)
    assert torch.isfinite(wide).all() and torch.isfinite(tall).all()


def test_a_takedown_on_a_bucketed_output_recounts_each_bucket(curated, tmp_path):
    """Counts stay per bucket stream (as curation writes them) in the report, buckets.json and the
    written markers that a later extension of the output sums."""
    import shutil

    from deco.pipeline.curate.takedown import takedown

    out = tmp_path / "out"
    shutil.copytree(curated[0], out)
    (tmp_path / "request.txt").write_text("wide00\n")
    assert takedown(str(out), str(tmp_path / "request.txt"))["removed"] == 1
    report = json.loads((out / "curation_report.json").read_text())
    assert report["samples_kept"] == 11 and report["shards"]["32/b24x48"]["samples"] == 3
    assert "32" not in report["shards"] and report["shards"]["32/b32x32"]["samples"] == 4
    index = json.loads((out / "32" / "buckets.json").read_text())["buckets"]
    assert {(b["height"], b["width"]): b["samples"] for b in index if b["samples"]} == {(24, 48): 3, (32, 32): 4, (40, 24): 4}
    markers = [json.loads(p.read_text()) for p in (out / "_work").rglob("*.json") if '"resolutions"' in p.read_text()]
    assert markers and all("32" not in m["resolutions"] for m in markers)
    assert sum(m["resolutions"]["32/b24x48"]["samples"] for m in markers) == 3
