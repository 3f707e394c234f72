"""Metadata that web-scale datasets ship (LAION's punsafe / pwatermark / similarity / WIDTH / HEIGHT
columns, img2dataset's and DataComp's per-sample .json and .npz members): numeric filters applied
before any image is fetched or decoded, each with its own reason code, and provenance (url, licence,
scores, the source file) carried into every shard row and the kept index. Real URL parquets served
by a real HTTP server on 127.0.0.1, real tars, the job run in-process (execution=local), the shards
read back with streaming's own StreamingDataset."""
import io
import json
import math
import tarfile
import threading
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deco.data.shards import read_table
from deco.data.synthetic_faults import synthetic_samples
from deco.pipeline.config import ConfigError
from deco.pipeline.curate.job import curate, load_curate_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "data" / "curate_demo.yaml")
LOCAL = ["progress=false", "execution=local", "captions.language.enabled=false"]
LAION_FILTERS = ('metadata_filters=[{column: punsafe, max: 0.1}, {column: similarity, min: 0.28}, '
                 '{column: pwatermark, max: 0.5}, {column: WIDTH, min: 64}, {column: HEIGHT, min: 64}]')


def run(inputs, output, *overrides):
    return curate(load_curate_config(DEMO, [*LOCAL, *overrides], [str(i) for i in inputs], str(output)))


def streamed(output: Path, resolution: int, cache: Path) -> list[dict]:
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    dataset = StreamingDataset(remote=str(output / str(resolution)), local=str(cache / uuid.uuid4().hex),
                               shuffle=False, batch_size=1)
    return list(dataset)


@pytest.fixture(scope="module")
def pool():
    return synthetic_samples(16, seed=5)


class ImageServer:
    """Serves /img/<n>: the pool's n-th image; counts every path asked for."""

    def __init__(self, images: list[bytes]):
        self.hits: Counter = Counter()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.hits[self.path] += 1
                body = images[int(self.path.rsplit("/", 1)[1])]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, n: int) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/img/{n}"


@pytest.fixture
def image_server(pool):
    server = ImageServer([s.image for s in pool])
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def laion_parquet(path: Path, server: ImageServer, pool) -> list[dict]:
    """A LAION-style URL parquet: row n points at /img/n. Rows 0-5 pass every filter; 6 is unsafe, 7
    watermarked, 8 a low CLIP score, 9 too narrow by its WIDTH column, 10 has no punsafe value."""
    rows = [{"url": server.url(n), "caption": pool[n].caption.decode(), "punsafe": 0.01, "pwatermark": 0.1,
             "similarity": 0.33, "WIDTH": 96, "HEIGHT": 96, "LICENSE": "cc-by" if n % 2 else "?"}
            for n in range(11)]
    rows[6]["punsafe"], rows[7]["pwatermark"], rows[8]["similarity"] = 0.93, 0.8, 0.12
    rows[9]["WIDTH"], rows[10]["punsafe"] = 40, None
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return rows


HTTP = 'sources.http.allow_networks=["127.0.0.1/32"]'


def test_laion_url_parquet_is_filtered_on_its_columns_before_any_fetch(image_server, pool, tmp_path):
    rows = laion_parquet(tmp_path / "laion" / "part-0.parquet", image_server, pool)
    report = run([tmp_path / "laion"], tmp_path / "out", "sources.format=urls", HTTP, LAION_FILTERS,
                 "provenance.columns=['url:str', license, punsafe, 'similarity:float64']")
    assert report["rejected"] == {"meta_punsafe_above_max": 1, "meta_pwatermark_above_max": 1,
                                  "meta_similarity_below_min": 1, "meta_WIDTH_below_min": 1,
                                  "meta_punsafe_missing": 1}
    assert report["samples_in"] == 11 == report["samples_kept"] + sum(report["rejected"].values())
    assert sorted(image_server.hits) == sorted(f"/img/{n}" for n in range(6))  # rejected rows never fetched
    rejects = {r["id"]: (r["reason"], r["detail"]) for r in read_table((tmp_path / "out" / "rejects.parquet").read_bytes()).to_pylist()}
    assert rejects["part-0:6"] == ("meta_punsafe_above_max", "0.93 > 0.1")
    assert rejects["part-0:10"] == ("meta_punsafe_missing", "no value")
    source = str((tmp_path / "laion" / "part-0.parquet").resolve())
    for resolution in (32, 64):
        samples = streamed(tmp_path / "out", resolution, tmp_path)
        assert [s["id"] for s in samples] == [f"part-0:{n}" for n in range(6)]
        for n, sample in enumerate(samples):
            assert (sample["url"], sample["source"]) == (rows[n]["url"], source)
            assert sample["license"] == rows[n]["LICENSE"]  # found as LICENSE: names match in any case
            assert sample["punsafe"] == 0.01 and sample["similarity"] == 0.33
    kept = read_table((tmp_path / "out" / "kept" / "p00000.parquet").read_bytes()).to_pylist()
    assert [(k["id"], k["url"], json.loads(k["license"]), k["similarity"], k["source"]) for k in kept] == [
        (f"part-0:{n}", rows[n]["url"], rows[n]["LICENSE"], 0.33, source) for n in range(6)]  # json columns as JSON text


def test_missing_values_can_be_kept(image_server, pool, tmp_path):
    laion_parquet(tmp_path / "laion" / "part-0.parquet", image_server, pool)
    report = run([tmp_path / "laion"], tmp_path / "out", "sources.format=urls", HTTP,
                 "metadata_filters=[{column: punsafe, max: 0.1, missing: keep}]")
    assert report["rejected"] == {"meta_punsafe_above_max": 1} and report["samples_kept"] == 10


def write_tar(path: Path, samples: list[tuple[str, bytes, bytes, dict, bytes | None]]) -> None:
    """An img2dataset / DataComp shard: <key>.png, <key>.txt, <key>.json (+ <key>.npz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, image, caption, meta, npz in samples:
            members = [(f"{key}.png", image), (f"{key}.txt", caption), (f"{key}.json", json.dumps(meta).encode())]
            if npz is not None:
                members.append((f"{key}.npz", npz))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def embeddings(similarity: float) -> bytes:
    """A DataComp-style .npz: l14 image and text embeddings (float16) with the given cosine."""
    image = np.zeros(768, np.float32)
    image[0] = 1.0
    text = np.zeros(768, np.float32)
    text[0], text[1] = similarity, math.sqrt(1 - similarity ** 2)
    buffer = io.BytesIO()
    np.savez(buffer, l14_img=image.astype(np.float16), l14_txt=text.astype(np.float16))
    return buffer.getvalue()


def test_img2dataset_and_datacomp_tars_filter_on_their_json_and_npz_members(pool, tmp_path):
    samples = []
    for n in range(10):
        meta = {"key": f"{n:09d}", "url": f"https://example.com/{n}.png", "uid": f"uid{n:04d}", "status": "success",
                "width": 96, "height": 96, "clip_l14_similarity_score": 0.35}
        samples.append([f"{n:09d}", pool[n].image, pool[n].caption, meta, embeddings(0.35)])
    samples[2][3]["clip_l14_similarity_score"] = 0.1   # a low stored score
    samples[3][4] = embeddings(0.05)                   # stored embeddings that do not match
    samples[4][3]["width"] = 32                        # img2dataset's json says too small
    del samples[5][3]["clip_l14_similarity_score"]     # no stored score
    write_tar(tmp_path / "datacomp" / "00000.tar", [tuple(s) for s in samples])
    report = run([tmp_path / "datacomp"], tmp_path / "out",
                 "metadata_filters=[{column: clip_l14_similarity_score, min: 0.3}, {column: width, min: 64}]",
                 "clip.enabled=true", "clip.stored_embeddings=[l14_img, l14_txt]", "clip.min_score=0.28",
                 "provenance.columns=[url, uid, 'clip_l14_similarity_score:float64']")
    # clip.path is empty: the stored embeddings are scored, no CLIP model is loaded
    assert report["rejected"] == {"meta_clip_l14_similarity_score_below_min": 1, "meta_width_below_min": 1,
                                  "meta_clip_l14_similarity_score_missing": 1, "clip_score_low": 1}
    rejects = {r["id"]: r for r in read_table((tmp_path / "out" / "rejects.parquet").read_bytes()).to_pylist()}
    assert rejects["000000003"]["reason"] == "clip_score_low"
    assert rejects["000000003"]["detail"].startswith("0.05") and "stored" in rejects["000000003"]["detail"]
    kept = [n for n in range(10) if n not in (2, 3, 4, 5)]
    samples_64 = streamed(tmp_path / "out", 64, tmp_path)
    assert [s["id"] for s in samples_64] == [f"{n:09d}" for n in kept]
    assert [(s["url"], s["uid"], s["clip_l14_similarity_score"]) for s in samples_64] == [
        (f"https://example.com/{n}.png", f"uid{n:04d}", 0.35) for n in kept]
    tar = str((tmp_path / "datacomp" / "00000.tar").resolve())
    assert all(s["source"] == tar and "license" not in s for s in samples_64)  # the columns named, and source


def test_default_provenance_is_url_licence_and_source(pool, tmp_path):
    write_tar(tmp_path / "in" / "a.tar", [(f"k{n}", pool[n].image, pool[n].caption,
                                           {"url": f"https://example.com/{n}"}, None) for n in range(3)])
    run([tmp_path / "in"], tmp_path / "out")
    samples = streamed(tmp_path / "out", 32, tmp_path)
    assert [(s["url"], s["license"], Path(s["source"]).name) for s in samples] == [
        (f"https://example.com/{n}", None, "a.tar") for n in range(3)]  # a field the dataset lacks: null


def test_filter_on_a_column_the_parquet_lacks_is_one_line(image_server, pool, tmp_path):
    laion_parquet(tmp_path / "laion" / "part-0.parquet", image_server, pool)
    with pytest.raises(ConfigError) as err:
        run([tmp_path / "laion"], tmp_path / "out", "sources.format=urls", HTTP,
            "metadata_filters=[{column: p_unsafe, max: 0.1}]")
    message = str(err.value)
    assert "\n" not in message and "'p_unsafe'" in message and "punsafe" in message and "pwatermark" in message
    assert not (tmp_path / "out").exists() and not image_server.hits


@pytest.mark.parametrize("override, words", [
    ("metadata_filters=[{column: punsafe}]", ["metadata_filters[0]", "min or max"]),
    ("metadata_filters=[{column: punsafe, min: 0.5, max: 0.1}]", ["metadata_filters[0]", "min 0.5 > max 0.1"]),
    ("metadata_filters=[{column: punsafe, max: 0.1, missing: drop}]", ["missing", "reject", "keep"]),
    ("metadata_filters=[{colum: punsafe, max: 0.1}]", ["colum", "column"]),
    ("provenance.columns=[caption]", ["provenance.columns", "'caption'"]),
    ("provenance.columns=['punsafe:float32']", ["punsafe:float32", "float64"]),
    ("clip.stored_embeddings=[l14_img]", ["clip.stored_embeddings", "two"]),
])
def test_bad_metadata_settings_are_one_line(override, words, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_curate_config(DEMO, [*LOCAL, override], [str(tmp_path)], str(tmp_path / "out"))
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_the_training_loader_passes_provenance_through(pool, tmp_path):
    from deco.data.streaming import DataConfig, StreamConfig, TrainLoader

    write_tar(tmp_path / "in" / "a.tar", [(f"k{n}", pool[n].image, pool[n].caption,
                                           {"url": f"https://example.com/{n}", "LICENSE": "cc0"}, None) for n in range(4)])
    run([tmp_path / "in"], tmp_path / "out")
    cfg = DataConfig(streams=[StreamConfig(uri=str(tmp_path / "out"))], shuffle=False, num_workers=0,
                     clean_stale_shared_memory=False)
    batch = next(TrainLoader(cfg, 32, 4, tmp_path / "cache"))
    assert batch["ids"] == [f"k{n}" for n in range(4)]
    assert [(p["url"], p["license"], Path(p["source"]).name) for p in batch["provenance"]] == [
        (f"https://example.com/{n}", "cc0", "a.tar") for n in range(4)]


def test_a_corrupt_or_misnamed_npz_member_counts_as_no_stored_embeddings():
    """Crawled bytes: a cut .npz (BadZipFile) or a lone .npy under the .npz name must not stop a
    partition; the sample simply has no stored score (clip_score_missing)."""
    from deco.data.metadata import NPZ_FIELD, stored_cosine

    good = io.BytesIO()
    np.savez(good, l14_img=np.array([1.0, 0.0]), l14_txt=np.array([1.0, 1.0]))
    assert stored_cosine({NPZ_FIELD: good.getvalue()}, "l14_img", "l14_txt") == pytest.approx(2 ** -0.5)
    lone = io.BytesIO()
    np.save(lone, np.array([1.0, 2.0]))
    for raw in (good.getvalue()[:40], good.getvalue()[:-30], lone.getvalue(), b"not an npz at all"):
        assert stored_cosine({NPZ_FIELD: raw}, "l14_img", "l14_txt") is None
