"""Caption and image filters: each a small unit that returns None (pass) or a Reject with its reason.

Every reason code the curation job can record is listed in REASONS; the curation report counts
samples per code and rejects.parquet names the code of every rejected sample. A sample gets the
first reason that applies, in the order: source and fetch errors, caption checks (cheap), image
decode and geometry checks, the optional CLIP score, then the job-wide duplicate pass.
"""
from __future__ import annotations

import html
import io
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from deco.data.captions import LanguageConfig, LanguageRule, SpamConfig, SpamRules
from deco.data.image_modes import WHITE, to_rgb

REASONS: dict[str, str] = {
    "source_unreadable": "an input file could not be read past this point (one row per file)",
    "source_truncated": "an input file ends early (no end-of-archive marker, or cut inside a member): one row per file",
    "bad_name": "the sample's name is not printable UTF-8 text (its id shows the bytes escaped)",
    "bad_value": "an image or caption value of a type or size the readers do not take (detail has it)",
    "fetch_failed": "the image URL could not be fetched (HTTP error, timeout, too large)",
    "duplicate_id": "another sample earlier in the job has the same id",
    "caption_missing": "no caption for the image",
    "caption_undecodable": "caption bytes are not valid UTF-8 (or hold U+FFFD replacement characters)",
    "caption_empty": "caption empty or whitespace only",
    "caption_too_few_words": "fewer words than captions.min_words",
    "caption_too_many_words": "more words than captions.max_words",
    "caption_too_few_chars": "fewer characters than captions.min_chars",
    "caption_too_many_chars": "more characters than captions.max_chars",
    "caption_boilerplate": "caption matches a boilerplate pattern (file names, 'image may contain', ...)",
    "caption_blocklisted": "caption contains a blocklisted word or phrase",
    "caption_language": "caption confidently identified as a language not in captions.language.allowed",
    # captions.spam.rules (patterns in data/captions.py SPAM_PATTERNS)
    "caption_screenshot": "an operating system's screenshot name ('Screenshot 2021-03-04 at 10.22.11')",
    "caption_filename": "a camera or image file name inside the caption (IMG_1234, DSC01234, beach.jpg)",
    "caption_url": "a URL or web domain inside the caption (http://..., www..., shop.com)",
    "caption_stock_photo": "a stock-photo agency or phrase ('stock photo', 'royalty free', Shutterstock): a watermarked preview",
    "caption_shopping": "shop text: 'click here', 'buy now', 'add to cart', 'free shipping', '70% off', 'promo code'",
    "caption_price": "a price ($50, €49.99, 120 EUR): a product listing",
    "caption_shouting": "every cased letter upper case, in at least captions.spam.shouting_min_words words",
    "image_missing": "no image for the caption",
    "image_undecodable": "image bytes cannot be decoded",
    "image_truncated": "image data ends early",
    "image_too_large": "more pixels than images.max_pixels (decompression bomb guard)",
    "image_too_small": "shortest side below images.min_side",
    "image_aspect_ratio": "long side / short side above images.max_aspect_ratio",
    "clip_score_low": "image-caption CLIP similarity below clip.min_score",
    "clip_score_missing": "clip.stored_score / stored_embeddings: the sample has no stored score (data/metadata.py)",
    "duplicate_exact": "same pixels (of the smallest output image) and normalised caption as a kept sample",
    "duplicate_near": "perceptual hash within dedup.hamming_threshold bits of a kept sample",
    "processing_error": "an unexpected error while processing this sample (detail has it)",
    "takedown": "named by a takedown request (id or URL): removed, or never written (pipeline/curate/takedown.py)",
}
# Reason families: one code per configured metadata filter, `meta_<column>_<outcome>` (data/metadata.py).
REASON_FAMILIES: dict[str, str] = {
    "meta_<column>_below_min": "the sample's <column> value is below its metadata_filters min",
    "meta_<column>_above_max": "the sample's <column> value is above its metadata_filters max",
    "meta_<column>_missing": "the sample has no numeric <column> value and its filter says missing: reject",
}
_FAMILY_PATTERN = re.compile(r"meta_.+_(below_min|above_max|missing)")


@dataclass(frozen=True)
class Reject:
    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REASONS and not _FAMILY_PATTERN.fullmatch(self.reason):
            raise ValueError(f"unknown reject reason {self.reason!r}")


# ------------------------------------------------------------------------------------------------
# Captions
# ------------------------------------------------------------------------------------------------

DEFAULT_BOILERPLATE = (
    r"^(img|dsc[nf]?|dcim|pict|sam|gopr|pxl|mvimg|photo|image|picture)[\s_-]*\d+(\.\w{2,4})?$",  # camera names
    r"^[\w\s.-]*\.(jpe?g|png|gif|webp|bmp|tiff?|heic)$",                   # a file name
    r"^(this\s+)?(image|photo|picture)\s+may\s+contain\b",                  # generated alt text
    r"^(https?://|www\.)\S+$",                                              # a bare URL
    r"^(untitled(\s+\d+)?|no\s+(description|caption|title)(\s+available)?|image\s+not\s+(found|available)|"
    r"placeholder(\s+image)?|thumbnail|click\s+(here\s+)?to\s+(enlarge|view|zoom)(\s+image)?)[.!]?$",  # the whole caption
)


@dataclass(kw_only=True)
class CaptionFilterConfig:
    normalise: bool = True  # unescape HTML, Unicode NFC, control characters to spaces, collapse spaces
    min_words: int = 2
    max_words: int = 256
    min_chars: int = 5
    max_chars: int = 2000
    boilerplate: bool = True
    boilerplate_patterns: list[str] = field(default_factory=list)  # extra regexes, case-insensitive
    blocklist: list[str] = field(default_factory=list)  # words or phrases, matched on word boundaries
    blocklist_file: str = ""  # a local text file, one word or phrase a line (# comments)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    spam: SpamConfig = field(default_factory=SpamConfig)

    def validate(self) -> None:
        self.language.validate()
        self.spam.validate()


def decode_caption(raw: bytes | str | None) -> str | Reject:
    if raw is None:
        return Reject("caption_missing")
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as err:
            return Reject("caption_undecodable", f"invalid UTF-8 at byte {err.start}")
        text = text.removeprefix("\ufeff")
    else:
        text = raw
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return Reject("caption_undecodable", "lone surrogate characters")
    if "\ufffd" in text:  # an upstream lossy decode already destroyed part of the text
        return Reject("caption_undecodable", "contains U+FFFD replacement characters")
    return text


def normalise_caption(text: str) -> str:
    text = unicodedata.normalize("NFC", html.unescape(text))
    text = "".join(" " if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in text)
    return re.sub(r"\s+", " ", text).strip()


def check_empty(text: str) -> Reject | None:
    return Reject("caption_empty") if not text.strip() else None


def check_length(text: str, cfg: CaptionFilterConfig) -> Reject | None:
    words, chars = len(text.split()), len(text.strip())
    if words < cfg.min_words:
        return Reject("caption_too_few_words", f"{words} < {cfg.min_words}")
    if words > cfg.max_words:
        return Reject("caption_too_many_words", f"{words} > {cfg.max_words}")
    if chars < cfg.min_chars:
        return Reject("caption_too_few_chars", f"{chars} < {cfg.min_chars}")
    if chars > cfg.max_chars:
        return Reject("caption_too_many_chars", f"{chars} > {cfg.max_chars}")
    return None


class BoilerplateFilter:
    def __init__(self, patterns: list[str] | tuple[str, ...]):
        self.patterns = [re.compile(p, re.IGNORECASE) for p in patterns]

    def __call__(self, text: str) -> Reject | None:
        stripped = text.strip()
        for pattern in self.patterns:
            if pattern.search(stripped):
                return Reject("caption_boilerplate", pattern.pattern[:60])
        return None


def read_blocklist(path: str) -> list[str]:
    try:
        lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"captions.blocklist_file {path!r} not found") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class BlocklistFilter:
    def __init__(self, terms: list[str]):
        terms = sorted({t.strip().casefold() for t in terms if t.strip()}, key=len, reverse=True)
        # \b fails next to non-word characters, so look around for "not a word character" instead.
        body = "|".join(r"\s+".join(map(re.escape, t.split())) for t in terms)
        self.pattern = re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE) if terms else None

    def __call__(self, text: str) -> Reject | None:
        if self.pattern is None:
            return None
        match = self.pattern.search(unicodedata.normalize("NFKC", text).casefold())
        return Reject("caption_blocklisted", match.group(0)) if match else None


class LanguageFilter(LanguageRule):
    """caption_language: langid with evidence rules for short captions (data/captions.py says why)."""

    def __call__(self, text: str) -> Reject | None:
        why = self.judge(text)
        return Reject("caption_language", why) if why else None


class SpamFilter(SpamRules):
    """caption_<rule> for the first of captions.spam.rules that matches (data/captions.py)."""

    def __call__(self, text: str) -> Reject | None:
        hit = self.first_match(text)
        return Reject(*hit) if hit else None


class CaptionFilters:
    """All caption checks in order; `check(raw)` -> (caption to keep, None) or (None, Reject)."""

    def __init__(self, cfg: CaptionFilterConfig):
        self.cfg = cfg
        terms = list(cfg.blocklist) + (read_blocklist(cfg.blocklist_file) if cfg.blocklist_file else [])
        # Specific reasons before generic ones: "IMG_0042.jpg" is boilerplate, not merely one word.
        self.steps: list[Callable[[str], Reject | None]] = [
            check_empty,
            BoilerplateFilter((DEFAULT_BOILERPLATE if cfg.boilerplate else ()) + tuple(cfg.boilerplate_patterns)),
            BlocklistFilter(terms),
            SpamFilter(cfg.spam),
            lambda text: check_length(text, cfg),
            LanguageFilter(cfg.language),
        ]

    def check(self, raw: bytes | str | None) -> tuple[str | None, Reject | None]:
        text = decode_caption(raw)
        if isinstance(text, Reject):
            return None, text
        if self.cfg.normalise:
            text = normalise_caption(text)
        for step in self.steps:
            reject = step(text)
            if reject is not None:
                return None, reject
        return text, None


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class ImageFilterConfig:
    # DeCo skips images smaller than the target resolution: None means the largest output resolution.
    min_side: int | None = None
    max_aspect_ratio: float = 3.0  # DataComp's limit
    max_pixels: int = 89_478_485   # PIL's decompression-bomb limit
    # Transparent pixels are composited over this RGB colour (data/image_modes.py), not dropped: the
    # colour stored under alpha 0 is often garbage. White, as most text-to-image sets do.
    background: tuple[int, int, int] = WHITE

    def validate(self) -> None:
        if len(self.background) != 3 or any(not 0 <= int(c) <= 255 for c in self.background):
            raise ValueError(f"images.background must be three values in 0..255, got {list(self.background)}")


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose does)
ORIENTATION_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                         6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_SWAPS_SIDES = (Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE,
                Image.Transpose.ROTATE_90)


@dataclass
class DecodedImage:
    """A decoded image as stored, and what it takes to show it as the original.

    `image` is RGB in the file's stored orientation, decoded at 1/`scale` of the stored size when a
    JPEG was decoded in draft mode (DCT scaling). `width` x `height` is the ORIGINAL size, EXIF
    orientation applied: what the size filters check and the shards record as orig_width/height.
    `transpose` (from the EXIF orientation) still has to be applied to show it upright.
    """

    image: Image.Image
    width: int
    height: int
    scale: float = 1.0
    transpose: Image.Transpose | None = None

    @property
    def size(self) -> tuple[int, int]:
        return self.width, self.height

    @property
    def stored_size(self) -> tuple[int, int]:
        """The original size in the stored orientation."""
        return (self.height, self.width) if self.transpose in _SWAPS_SIDES else (self.width, self.height)

    def oriented(self) -> Image.Image:
        """The decoded image upright (at 1/scale of the original when drafted)."""
        return self.image if self.transpose is None else self.image.transpose(self.transpose)


def draft_scale(short_side: int, target: int | None) -> int:
    """JPEG DCT-scaling factor (1, 2, 4 or 8) for a stored short side and the largest target size.

    1/2 when the source is at least twice the target (the decode keeps at least the target's
    pixels); 1/4 and 1/8 only while the decode keeps at least twice the target's pixels: their
    block-wise scaling aliases more (measured on photo-like JPEGs against a full decode + Lanczos:
    >= 43 dB PSNR at 1/2, 38-39 dB at 1/4 with under 2x left, >= 41 dB with 2x). The target is
    then resampled from the reduced decode with the configured filter."""
    if not target:
        return 1
    return next((s for s in (8, 4, 2) if short_side // s >= target * (1 if s == 2 else 2)), 1)


def open_image(raw: bytes | None, max_pixels: int, draft_side: int | None = None,
               background: tuple[int, int, int] = WHITE) -> DecodedImage | Reject:
    """Bytes -> DecodedImage (any mode to 8-bit RGB, transparency over `background`: image_modes.to_rgb),
    or the reason not.

    With `draft_side`, a JPEG whose short side is at least twice `draft_side` is decoded at a
    reduced scale (Image.draft: 1/2, 1/4 or 1/8, never below draft_side on the short side), which
    skips most of the inverse DCT, upsampling and colour conversion work.
    """
    if raw is None:
        return Reject("image_missing")
    if not raw:
        return Reject("image_undecodable", "zero bytes")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            stored = image.size
            if stored[0] * stored[1] > max_pixels:
                return Reject("image_too_large", f"{stored[0]}x{stored[1]}")
            scale = 1.0
            wanted = draft_scale(min(stored), draft_side)
            if wanted > 1 and image.format == "JPEG":
                drafted = image.draft(image.mode, (stored[0] // wanted, stored[1] // wanted))
                if drafted is not None:  # (mode, box): the original spans box in decoded pixels
                    scale = stored[0] / drafted[1][2]
            image.load()
            transpose = ORIENTATION_TRANSPOSE.get(image.getexif().get(0x0112, 1))
            width, height = (stored[1], stored[0]) if transpose in _SWAPS_SIDES else stored
            return DecodedImage(to_rgb(image, background), width, height, scale, transpose)
    except Image.DecompressionBombError as err:
        return Reject("image_too_large", str(err)[:120])
    except (OSError, SyntaxError, ValueError, Image.UnidentifiedImageError) as err:
        # Reasons must be reproducible: drop object addresses such as "<_io.BytesIO object at 0x...>".
        message = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "<bytes>", str(err))
        if "truncated" in message.lower():
            return Reject("image_truncated", message[:120])
        return Reject("image_undecodable", f"{type(err).__name__}: {message[:120]}")


def decode_image(raw: bytes | None, max_pixels: int) -> Image.Image | Reject:
    """Bytes -> RGB image (EXIF orientation applied, transparency over white), or the reason not."""
    decoded = open_image(raw, max_pixels)
    return decoded if isinstance(decoded, Reject) else decoded.oriented()


def check_min_side(image: Image.Image, min_side: int) -> Reject | None:
    side = min(image.size)
    return Reject("image_too_small", f"{image.width}x{image.height} < {min_side}") if side < min_side else None


def check_aspect_ratio(image: Image.Image, max_ratio: float) -> Reject | None:
    ratio = max(image.size) / max(1, min(image.size))
    return Reject("image_aspect_ratio", f"{ratio:.2f} > {max_ratio}") if ratio > max_ratio else None


class ImageFilters:
    def __init__(self, cfg: ImageFilterConfig, min_side: int):
        self.cfg, self.min_side = cfg, min_side

    def check(self, raw: bytes | None) -> tuple[Image.Image | None, Reject | None]:
        decoded, reject = self.check_decoded(raw)
        return (None, reject) if reject else (decoded.oriented(), None)

    def check_decoded(self, raw: bytes | None, draft_side: int | None = None) -> tuple[DecodedImage | None, Reject | None]:
        """As check, without orienting the image: curation resamples the stored image and orients
        only its small outputs. Sizes are checked on the original (EXIF-oriented) size, also when
        `draft_side` lets a large JPEG decode at reduced scale (open_image)."""
        decoded = open_image(raw, self.cfg.max_pixels, draft_side, self.cfg.background)
        if isinstance(decoded, Reject):
            return None, decoded
        reject = check_min_side(decoded, self.min_side) or check_aspect_ratio(decoded, self.cfg.max_aspect_ratio)
        return (None, reject) if reject else (decoded, None)
