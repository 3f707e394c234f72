"""Any image PIL opens -> 8-bit RGB: the one place curation turns stored pixels into what shards hold.

PIL's own convert("RGB") is right for most modes but clips 16-bit grey at 255 (a 0..65535 ramp comes
out almost all white), drops alpha (showing whatever colour sits under transparent pixels) and
refuses premultiplied grey. What each mode gets here:

    RGB                   returned as is, no copy (every JPEG photo: no work added to the common case)
    1, L, P, CMYK, YCbCr, PIL's convert("RGB"). CMYK is PIL's naive inversion, R = (255 - K)(255 - C)
      HSV, LAB            / 255, without the ICC profile; PIL's JPEG decoder already un-inverts Adobe
                          CMYK JPEGs. LAB (TIFF CIELab): PIL converts through LittleCMS, D50 LAB ->
                          sRGB (tests pin it: a PIL that copied bands would fail them). HSV is
                          in-memory only: no file format stores it.
    I;16, I;16B, I;16L,   round(v / 257): 0..65535 onto 0..255 (65535 / 257 = 255 exactly).
      I;16N
    I                     read as 16-bit data: clamped to 0..65535, then round(v / 257). Older Pillows
                          open 16-bit grey PNGs as I (this one, 13, as I;16); I also holds 32-bit int
                          TIFFs, whose range a file rarely says: values above 65535 clamp to white.
    F                     0.0..1.0 onto 0..255 (round), clamped, NaN -> 0: the normalised range float
                          TIFFs conventionally hold. Linear-light HDR is not tone-mapped.
    RGBA, LA, PA          composited over `background` (straight alpha, PIL's alpha_composite rounding).
    La, RGBa              premultiplied: colour + (255 - alpha) * background / 255, rounded.
    any mode with a       (a PNG tRNS colour key on L, RGB, I;16; a transparent palette index on P, or
      "transparency" key  per-entry alpha): keyed pixels are transparent, then composited as above.

16-bit RGB PNGs never reach here as 16-bit: PIL decodes them to RGB keeping each sample's
high byte (v >> 8, at most one level below round(v / 257)), and 16-bit grey+alpha / RGBA PNGs to 8-bit
RGBA the same way. A mode not listed goes to convert("RGB"), whose ValueError curation records as
image_undecodable.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

WHITE = (255, 255, 255)
_STRAIGHT_ALPHA = ("RGBA", "LA", "PA")
_PREMULTIPLIED = ("La", "RGBa")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """`image` as 8-bit RGB, transparency composited over `background` (the table above)."""
    mode, key = image.mode, image.info.get("transparency")
    if mode == "RGB" and key is None:
        return image
    if mode in _PREMULTIPLIED:
        return _premultiplied_over(image, background)
    if mode == "F" or mode.startswith("I"):
        grey = Image.fromarray(_wide_to_8_bit(image), "L")
        if key is None or mode == "F":
            return grey.convert("RGB")
        alpha = np.where(np.asarray(image) == key, 0, 255).astype(np.uint8)
        image, mode, key = Image.merge("LA", (grey, Image.fromarray(alpha, "L"))), "LA", None
    if mode in _STRAIGHT_ALPHA or key is not None:
        # PIL's convert turns a colour key, palette index or palette alpha into the alpha band.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _wide_to_8_bit(image: Image.Image) -> np.ndarray:
    """A 16/32-bit int (I, I;16*) or float (F) image's values as uint8 grey levels (the table above)."""
    values = np.asarray(image)  # native dtype and byte order (I;16B arrives as big-endian uint16)
    if image.mode == "F":
        scaled = np.nan_to_num(np.clip(values.astype(np.float64), 0.0, 1.0), nan=0.0) * 255.0
        return np.floor(scaled + 0.5).astype(np.uint8)
    # (v + 128) // 257 is round(v / 257): 257 is odd, so no value sits half way.
    return ((values.astype(np.int32).clip(0, 65535) + 128) // 257).astype(np.uint8)


def _premultiplied_over(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """La / RGBa hold colour already multiplied by alpha: only the background's share is added."""
    values = np.asarray(image).astype(np.float64)
    colour, alpha = values[..., :-1], values[..., -1:]
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    out = colour + (255.0 - alpha) * np.asarray(background, np.float64) / 255.0
    return Image.fromarray(np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8), "RGB")
