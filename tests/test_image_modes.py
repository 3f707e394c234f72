"""Every image mode PIL opens comes out of curation as faithful 8-bit RGB: real files in the format each
mode lives in (PNG, TIFF, JPEG, GIF, WebP), through the curation image path (ImageFilters.check_decoded
then the transforms, PNG out), compared with hand-computed pixels. The per-mode rules are in
data/image_modes.py."""
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deco.data.filters import ImageFilterConfig, ImageFilters
from deco.data.image_modes import to_rgb
from deco.data.transforms import TransformConfig, transform_image

WHITE = (255, 255, 255)


def encoded(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def curated(raw: bytes, background=WHITE) -> np.ndarray:
    """The pixels curation stores for a square image, at its own size (so no resampling touches them)."""
    decoded, reject = ImageFilters(ImageFilterConfig(background=background), min_side=1).check_decoded(raw)
    assert reject is None, reject
    side = decoded.width
    png = transform_image(decoded, TransformConfig(resolutions=[side], format="png"))[side]
    out = Image.open(io.BytesIO(png))
    assert out.mode == "RGB" and out.size == (side, decoded.height)
    return np.asarray(out).astype(int)


def grey(values) -> np.ndarray:
    """Expected RGB of grey levels."""
    return np.repeat(np.asarray(values, dtype=int)[..., None], 3, axis=-1)


RAMP16 = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)  # 0, 257, ..., 65535
ODD16 = np.arange(256, dtype=np.uint16).reshape(16, 16) * 251 + 7  # hits rounding at every remainder


def round257(values) -> np.ndarray:
    return np.floor(np.asarray(values, dtype=np.float64) / 257 + 0.5).astype(int)


# ------------------------------------------------------------------------------------------------
# 16- and 32-bit integer, float
# ------------------------------------------------------------------------------------------------

def test_16_bit_grey_png_ramp_scales_instead_of_clipping():
    raw = encoded(Image.fromarray(RAMP16), "PNG")
    assert Image.open(io.BytesIO(raw)).mode == "I;16"  # how this PIL opens a 16-bit grey PNG
    out = curated(raw)
    assert (out == grey(np.arange(256).reshape(16, 16))).all()  # round(v / 257) of 0, 257, ... is 0, 1, ...
    assert (curated(encoded(Image.fromarray(ODD16), "PNG")) == grey(round257(ODD16))).all()


@pytest.mark.parametrize("mode,dtype", [("I;16", "<u2"), ("I;16B", ">u2"), ("I;16L", "<u2")])
def test_16_bit_tiff_in_either_byte_order(mode, dtype):
    image = Image.frombytes(mode, (16, 16), ODD16.astype(dtype).tobytes())
    assert (curated(encoded(image, "TIFF")) == grey(round257(ODD16))).all()


def test_32_bit_int_tiff_is_read_as_16_bit_data_and_clamped():
    values = ODD16.astype(np.int32)
    values[0, :3] = (-5, 65536, 10**6)  # outside the 16-bit range: clamped
    raw = encoded(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(raw)).mode == "I"
    expected = round257(np.clip(values, 0, 65535))
    assert tuple(expected[0, :3]) == (0, 255, 255)
    assert (curated(raw) == grey(expected)).all()


def test_float_tiff_maps_0_to_1_onto_0_to_255_clamped():
    values = np.linspace(0.0, 1.0, 256, dtype=np.float32).reshape(16, 16)
    values[0, :4] = (-0.5, 1.5, np.nan, 0.5)
    out = curated(encoded(Image.fromarray(values), "TIFF"))
    expected = np.floor(np.nan_to_num(np.clip(values.astype(np.float64), 0, 1), nan=0.0) * 255 + 0.5).astype(int)
    assert tuple(expected[0, :4]) == (0, 255, 0, 128)
    assert (out == grey(expected)).all()


def png_16_bit_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one): IHDR, one IDAT of unfiltered rows, IEND."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_16_bit_rgb_png_keeps_the_high_byte_as_pil_decodes_it():
    pixels = np.stack([ODD16, ODD16[::-1], RAMP16], axis=-1)
    raw = png_16_bit_rgb(pixels)
    assert Image.open(io.BytesIO(raw)).mode == "RGB"  # PIL strips to 8 bits while decoding
    out = curated(raw)
    assert (out == pixels >> 8).all()
    assert np.abs(out - round257(pixels)).max() <= 1  # never more than a level from round(v / 257)


# ------------------------------------------------------------------------------------------------
# 1, L, P (palette, transparency), 8-bit colour keys
# ------------------------------------------------------------------------------------------------

def test_bilevel_and_grey_png():
    checker = (np.indices((16, 16)).sum(axis=0) % 2).astype(bool)
    assert (curated(encoded(Image.fromarray(checker), "PNG")) == grey(checker * 255)).all()
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert (curated(encoded(Image.fromarray(levels), "PNG")) == grey(levels)).all()


def palette_image() -> Image.Image:
    """Indices 0, 1, 2 in three horizontal bands: red, green, blue."""
    image = Image.fromarray(np.repeat(np.arange(3, dtype=np.uint8), [5, 5, 6])[:, None].repeat(16, 1), "P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    return image


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_a_transparent_index_shows_the_background(fmt):
    out = curated(encoded(palette_image(), fmt, transparency=1), background=(10, 20, 30))
    assert (out[:5] == (255, 0, 0)).all() and (out[5:10] == (10, 20, 30)).all() and (out[10:] == (0, 0, 255)).all()
    assert (curated(encoded(palette_image(), fmt))[5:10] == (0, 255, 0)).all()


def test_palette_with_alpha_per_entry_blends_over_the_background():
    raw = encoded(palette_image(), "PNG", transparency=bytes([255, 0, 100]))  # PNG tRNS: alpha of entries 0..2
    out = curated(raw)
    blue = (round(255 * 155 / 255), round(255 * 155 / 255), round((255 * 100 + 255 * 155) / 255))
    assert (out[:5] == (255, 0, 0)).all() and (out[5:10] == WHITE).all() and (out[10:] == blue).all()


def test_colour_keyed_grey_rgb_and_16_bit_png():
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = grey(levels).reshape(-1, 3)
    expected[7] = (1, 2, 3)  # the keyed level shows the background
    out = curated(encoded(Image.fromarray(levels), "PNG", transparency=7), background=(1, 2, 3))
    assert (out.reshape(-1, 3) == expected).all()
    rgb = np.stack([levels, 255 - levels, np.full_like(levels, 9)], axis=-1)  # pixel 7 is the key (7, 248, 9)
    expected = rgb.reshape(-1, 3).astype(int)
    expected[7] = WHITE
    out = curated(encoded(Image.fromarray(rgb), "PNG", transparency=(7, 248, 9)))
    assert (out.reshape(-1, 3) == expected).all()
    out = curated(encoded(Image.fromarray(RAMP16), "PNG", transparency=257), background=(0, 0, 0))
    expected = grey(np.arange(256).reshape(16, 16))
    expected[0, 1] = 0  # the keyed level (257 -> 1) is the black background
    assert (out == expected).all()


# ------------------------------------------------------------------------------------------------
# Alpha: straight (LA, RGBA, PA) and premultiplied (La, RGBa), composited on the background
# ------------------------------------------------------------------------------------------------

def over(colour, alpha, background):
    """Straight alpha over an opaque background, as PIL's alpha_composite rounds it."""
    return tuple(int((c * alpha + b * (255 - alpha)) / 255 + 0.5) for c, b in zip(colour, background))


@pytest.mark.parametrize("fmt,params", [("PNG", {}), ("TIFF", {}), ("WEBP", {"lossless": True})])
def test_half_transparent_red_over_white_and_over_a_configured_background(fmt, params):
    raw = encoded(Image.new("RGBA", (16, 16), (255, 0, 0, 128)), fmt, **params)
    assert over((255, 0, 0), 128, WHITE) == (255, 127, 127)
    assert (curated(raw) == (255, 127, 127)).all()
    assert (curated(raw, background=(0, 0, 0)) == (128, 0, 0)).all()


def test_background_must_be_an_rgb_colour():
    ImageFilterConfig(background=(0, 128, 255)).validate()
    for bad in ((256, 0, 0), (0, 0), (-1, 0, 0)):
        with pytest.raises(ValueError, match="images.background"):
            ImageFilterConfig(background=bad).validate()


def test_transparent_pixels_hide_the_colour_stored_under_them():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = (0, 255, 0)  # garbage colour with alpha 0: dropping alpha would show green
    rgba[8:, :, 3] = 255
    rgba[8:, :, :3] = (10, 20, 30)
    out = curated(encoded(Image.fromarray(rgba), "PNG"))
    assert (out[:8] == WHITE).all() and (out[8:] == (10, 20, 30)).all()


def test_grey_alpha_png_and_palette_alpha_tiff():
    la = Image.fromarray(np.stack([np.zeros((16, 16), np.uint8), np.full((16, 16), 64, np.uint8)], -1), "LA")
    assert (curated(encoded(la, "PNG"), background=(200, 100, 0)) == over((0, 0, 0), 64, (200, 100, 0))).all()
    pa = palette_image().convert("PA")
    pa.putalpha(Image.new("L", (16, 16), 128))
    raw = encoded(pa, "TIFF")
    assert Image.open(io.BytesIO(raw)).mode == "PA"
    out = curated(raw)
    assert (out[:5] == over((255, 0, 0), 128, WHITE)).all() and (out[10:] == over((0, 0, 255), 128, WHITE)).all()


def test_premultiplied_alpha_tiff_and_premultiplied_modes():
    # A TIFF with associated (premultiplied) alpha: PIL's RGBA writer, ExtraSamples patched from 2 to 1.
    raw = encoded(Image.new("RGBA", (16, 16), (64, 0, 32, 128)), "TIFF")
    entry = struct.pack("<HHIH", 338, 3, 1, 2)
    assert raw.count(entry) == 1
    raw = raw.replace(entry, struct.pack("<HHIH", 338, 3, 1, 1))
    # premultiplied 64 at alpha 128 over white: 64 + 255 * 127 / 255 (PIL un-premultiplies on read: +-1)
    assert np.abs(curated(raw) - (64 + 127, 127, 32 + 127)).max() <= 1
    # In memory the premultiplied modes composite directly: colour + (255 - alpha) * background / 255.
    rgba = Image.frombytes("RGBa", (1, 1), bytes([64, 0, 32, 128]))
    assert to_rgb(rgba, (0, 0, 255)).getpixel((0, 0)) == (64, 0, 32 + 127)
    la = Image.frombytes("La", (1, 1), bytes([100, 200]))
    assert to_rgb(la).getpixel((0, 0)) == (100 + 55,) * 3


# ------------------------------------------------------------------------------------------------
# CMYK, YCbCr, LAB, HSV
# ------------------------------------------------------------------------------------------------

CMYK = [(0, 255, 255, 0), (0, 0, 0, 255), (128, 0, 0, 0), (0, 0, 0, 0)]


def cmyk_rgb(c, m, y, k):
    """PIL's CMYK -> RGB (no ICC profile): each channel (255 - K) * (255 - ink) / 255."""
    return tuple(int((255 - k) * (255 - ink) / 255 + 0.5) for ink in (c, m, y))


def bands(colours, side=16) -> np.ndarray:
    """Horizontal bands of equal height, one per colour."""
    return np.repeat(np.asarray(colours, np.uint8), side // len(colours), axis=0)[:, None].repeat(side, 1)


def test_cmyk_tiff_and_adobe_inverted_cmyk_jpeg():
    expected = bands([cmyk_rgb(*c) for c in CMYK]).astype(int)
    assert tuple(expected[0, 0]) == (255, 0, 0) and tuple(expected[8, 0]) == (127, 255, 255)
    image = Image.fromarray(bands(CMYK), "CMYK")
    assert (curated(encoded(image, "TIFF")) == expected).all()
    raw = encoded(image, "JPEG", quality=100, subsampling="4:4:4")
    opened = Image.open(io.BytesIO(raw))
    assert opened.mode == "CMYK" and opened.info.get("adobe") is not None  # PIL writes and un-inverts Adobe CMYK
    assert np.abs(curated(raw)[2::4] - expected[2::4]).max() <= 3  # band centres, away from JPEG's edges


def test_ycbcr_tiff():
    raw = encoded(Image.fromarray(bands([(128, 128, 128), (76, 85, 255)]), "YCbCr"), "TIFF")
    assert Image.open(io.BytesIO(raw)).mode == "YCbCr"
    out = curated(raw)
    # JFIF: R = Y + 1.402 (Cr - 128), G = Y - 0.344 (Cb - 128) - 0.714 (Cr - 128), B = Y + 1.772 (Cb - 128)
    assert (out[:8] == 128).all() and np.abs(out[8:] - (254, 0, 0)).max() <= 1


def test_cielab_tiff_is_colour_converted_not_band_copied():
    # PIL's LAB: L* 0..100 as 0..255, a* and b* offset by 128; sRGB red is L* 54.29 a* 80.81 b* 69.89 (D50)
    lab = [(255, 128, 128), (0, 128, 128), (138, 209, 198), (136, 128, 128)]  # white, black, red, L* 53.4 grey
    # Built band by band: fromarray's "LAB" reads a* and b* as signed bytes, as the TIFF stores them.
    image = Image.merge("LAB", [Image.fromarray(np.ascontiguousarray(band)) for band in np.moveaxis(bands(lab), -1, 0)])
    raw = encoded(image, "TIFF")
    assert Image.open(io.BytesIO(raw)).mode == "LAB"
    out = curated(raw)[::4, 0]
    # 8-bit LAB steps (L* 0.39, a* and b* 1) and LittleCMS 8-bit precision move sRGB a few levels
    assert np.abs(out - [(255, 255, 255), (0, 0, 0), (255, 0, 0), (128, 128, 128)]).max() <= 6


def test_hsv_in_memory():
    # No file format stores HSV (PIL converts on save), so only images built in memory have it.
    hsv = Image.fromarray(bands([(0, 255, 255), (85, 255, 255), (170, 255, 128), (0, 0, 200)]), "HSV")
    out = np.asarray(to_rgb(hsv)).astype(int)[::4, 0]
    assert np.abs(out - [(255, 0, 0), (0, 255, 0), (0, 0, 128), (200, 200, 200)]).max() <= 1


# ------------------------------------------------------------------------------------------------
# The common case, orientation, the job
# ------------------------------------------------------------------------------------------------

def test_rgb_is_passed_through_without_a_copy():
    image = Image.new("RGB", (4, 4), (1, 2, 3))
    assert to_rgb(image) is image


def test_exif_orientation_still_applied_to_converted_modes():
    values = np.zeros((16, 16), np.uint16)
    values[0, 15] = 65535  # top right stored; orientation 6 shows the stored image turned 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    out = curated(encoded(Image.fromarray(values), "PNG", exif=exif.tobytes()))
    assert tuple(out[15, 15]) == WHITE and out.sum() == 255 * 3


def test_curation_job_keeps_the_16_bit_ramp_faithfully(tmp_path):
    """The reported case end to end (in-process job, webdataset output: no torch import, ~4 s)."""
    from deco.pipeline.curate.job import curate, load_curate_config

    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "ramp.png").write_bytes(encoded(Image.fromarray(ramp), "PNG"))
    (tmp_path / "raw" / "ramp.txt").write_text("a smooth grey gradient from black to white")
    demo = str(Path(__file__).resolve().parents[1] / "configs" / "data" / "curate_demo.yaml")
    overrides = ["progress=false", "execution=local", "output.format=webdataset"]
    report = curate(load_curate_config(demo, overrides, [str(tmp_path / "raw")], str(tmp_path / "out")))
    assert report["samples_kept"] == 1
    [shard] = (tmp_path / "out" / "64").glob("*.tar")  # the demo's 64 px output: the ramp at its own size
    with tarfile.open(shard) as tar:
        [member] = [m for m in tar.getmembers() if m.name.endswith(".png")]
        stored = Image.open(io.BytesIO(tar.extractfile(member).read()))
    assert (np.asarray(stored).astype(int) == grey(round257(ramp))).all()
