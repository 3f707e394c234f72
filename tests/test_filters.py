"""Each caption and image filter on its own: the reason code it gives and what it lets through."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from deco.data.clip_filter import ClipFilterConfig, ClipScoreFilter, build_scorer, register_scorer
from deco.data.filters import (REASONS, BlocklistFilter, BoilerplateFilter, CaptionFilterConfig, CaptionFilters,
                               ImageFilterConfig, ImageFilters, LanguageConfig,
                               LanguageFilter, Reject, decode_caption, decode_image, normalise_caption,
                               DEFAULT_BOILERPLATE)
from deco.data.synthetic import synthetic_scenes
from deco.data.synthetic_faults import BOILERPLATE, FOREIGN


def reason(result):
    return result[1].reason if result[1] is not None else None


@pytest.fixture(scope="module")
def captions():
    return CaptionFilters(CaptionFilterConfig(blocklist=["nsfw", "red panda"], min_words=2, max_words=12,
                                              min_chars=5, max_chars=80))


def test_caption_decoding():
    assert decode_caption("a photo".encode()) == "a photo"
    assert decode_caption("\ufeffa photo".encode()) == "a photo"
    assert decode_caption(None).reason == "caption_missing"
    assert decode_caption(b"a caf\xe9 photo").reason == "caption_undecodable"
    assert decode_caption("a photo \ufffd of").reason == "caption_undecodable"
    assert decode_caption("lone \udc80 surrogate").reason == "caption_undecodable"


def test_normalisation_unescapes_and_collapses_space():
    assert normalise_caption("  a &amp; b\u200b\tc\n\nd ") == "a & b c d"
    assert normalise_caption("cafe\u0301") == "café"


@pytest.mark.parametrize("raw, expected", [
    (b"", "caption_empty"),
    ("  \t\u3000 ", "caption_empty"),
    ("circle", "caption_too_few_words"),
    ("a b", "caption_too_few_chars"),
    (" ".join(["word"] * 13), "caption_too_many_words"),
    ("a " + "x" * 90, "caption_too_many_chars"),
    ("IMG_0042.JPG", "caption_boilerplate"),
    ("Image may contain: 2 people, outdoor", "caption_boilerplate"),
    ("a photo of a circle NSFW!", "caption_blocklisted"),
    ("a photo of a red   Panda", "caption_blocklisted"),
    ("ein Foto von einem roten Kreis und einem blauen Quadrat", "caption_language"),
    ("a photo of a red circle", None),
])
def test_caption_reasons(captions, raw, expected):
    assert reason(captions.check(raw)) == expected


def test_boilerplate_catches_crawl_junk_but_not_real_captions():
    check = BoilerplateFilter(DEFAULT_BOILERPLATE)
    for junk in [b.format(n=42) for b in BOILERPLATE] + ["DSCN0042", "untitled", "www.example.com/a.png", "photo 3"]:
        assert check(junk) is not None, junk
    for fine in ["a photo of a red circle", "image processing on a laptop", "Untitled painting by a child, oil",
                 "a dog sitting next to photo 3 of the album"]:
        assert check(fine) is None, fine


def test_blocklist_matches_whole_words_only():
    check = BlocklistFilter(["ass", "hot dog"])
    assert check("a classic brass bassoon") is None
    assert check("a donkey, or ass, in a field").detail == "ass"
    assert check("a HOT\n DOG stand") is not None
    assert check("a hot dogma") is None


def test_language_rule_spares_every_clean_synthetic_caption():
    check = LanguageFilter(LanguageConfig())
    clean = {scene.caption for scene in synthetic_scenes(1500, 32, 0)}
    assert len(clean) > 150
    assert [c for c in clean if check(c) is not None] == []
    assert all(check(sentence) is not None for sentence in FOREIGN)
    # Short captions carry too little evidence to judge: they pass whatever langid would say.
    assert check("ein Foto") is None
    assert LanguageFilter(LanguageConfig(enabled=False))(FOREIGN[0]) is None
    assert LanguageFilter(LanguageConfig(allowed=["de"]))("a photo of a red circle and a blue square") is not None


def test_language_probabilities_are_langids_own():
    from deco.data.captions import _langid

    every, candidates = LanguageFilter(LanguageConfig(candidates=[])), LanguageFilter(LanguageConfig())
    for text in ["a photo of a red circle and a blue square", *FOREIGN]:
        ours, theirs = every.probabilities(text), dict(_langid().rank(text))
        assert ours.keys() == theirs.keys() and max(abs(ours[k] - theirs[k]) for k in theirs) < 1e-9
        # Restricted to candidates: langid's probabilities renormalised over them (its set_languages).
        restricted, total = candidates.probabilities(text), sum(theirs[k] for k in candidates.candidates)
        assert max(abs(restricted[k] - theirs[k] / total) for k in candidates.candidates) < 1e-9


def png(image, **kw):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kw)
    return buffer.getvalue()


def jpeg(image, exif=None):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95, **({"exif": exif} if exif else {}))
    return buffer.getvalue()


def test_image_decoding_reasons():
    image = Image.new("RGB", (80, 60), (10, 200, 30))
    assert decode_image(None, 10**8).reason == "image_missing"
    assert decode_image(b"", 10**8).reason == "image_undecodable"
    assert decode_image(b"<html>404</html>", 10**8).reason == "image_undecodable"
    assert decode_image(jpeg(image)[:200], 10**8).reason == "image_truncated"
    assert decode_image(png(image), 1000).reason == "image_too_large"
    assert decode_image(png(image), 10**8).size == (80, 60)


def test_transparency_goes_over_white_and_exif_orientation_is_applied():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    assert decode_image(png(rgba), 10**8).getpixel((5, 5)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    assert decode_image(jpeg(Image.new("RGB", (80, 40)), exif=exif.tobytes()), 10**8).size == (40, 80)


@pytest.mark.parametrize("size, expected", [((64, 64), None), ((63, 200), "image_too_small"),
                                            ((192, 64), None), ((194, 64), "image_aspect_ratio")])
def test_geometry_reasons(size, expected):
    filters = ImageFilters(ImageFilterConfig(max_aspect_ratio=3.0), min_side=64)
    assert reason(filters.check(png(Image.new("RGB", size)))) == expected


def test_reasons_are_a_closed_set():
    assert "duplicate_near" in REASONS
    with pytest.raises(ValueError, match="unknown reject reason"):
        Reject("looks_odd")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIPModel built in code, saved with a real tokenizer (MiniLM's) as local weights."""
    import transformers

    from deco.model.text_encoder import minilm_path

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path())
    config = transformers.CLIPConfig(
        text_config={"vocab_size": tokenizer.vocab_size, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 32,
                     "eos_token_id": tokenizer.sep_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    transformers.CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_clip_scorer_from_local_weights_scores_pairs(tiny_clip_dir):
    scorer = build_scorer(ClipFilterConfig(enabled=True, path=tiny_clip_dir))
    images = [scene.image() for scene in synthetic_scenes(6, 48, 1)]
    captions = [scene.caption for scene in synthetic_scenes(6, 48, 1)]
    scores = scorer.score(images, captions)
    assert scores.shape == (6,) and np.all(np.abs(scores) <= 1.0 + 1e-6)
    assert np.allclose(scores, scorer.score(images, captions))
    assert not np.allclose(scores, scores[0])  # depends on the pair
    threshold = float(np.median(scores))
    verdicts = ClipScoreFilter(scorer, threshold, batch_size=4).check_batch(images, captions)
    assert [v is not None for v in verdicts] == list(scores < threshold)
    assert {v.reason for v in verdicts if v} == {"clip_score_low"}


def test_missing_clip_weights_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights not found"):
        build_scorer(ClipFilterConfig(enabled=True, path=str(tmp_path / "nowhere")))


def test_another_scorer_plugs_in_by_name():
    class Brightness:
        def score(self, images, captions):
            return np.array([np.asarray(i, dtype=np.float64).mean() / 255 for i in images])

    register_scorer("brightness", lambda cfg: Brightness())
    check = ClipScoreFilter(build_scorer(ClipFilterConfig(scorer="brightness")), 0.5)
    dark, light = Image.new("RGB", (8, 8), (20, 20, 20)), Image.new("RGB", (8, 8), (240, 240, 240))
    assert [v is None for v in check.check_batch([dark, light], ["x", "y"])] == [False, True]
    with pytest.raises(ValueError, match="not registered"):
        build_scorer(ClipFilterConfig(scorer="nope"))
