"""Curation's fast resize path (one decode, JPEG draft mode, Image.reduce, upright only at the end)
against the plain reference: a full decode, EXIF transpose and one Lanczos resize per resolution."""
import io

import pytest
from PIL import Image

from deco.data.filters import ImageFilterConfig, ImageFilters, decode_image, draft_scale, open_image
from deco.data.synthetic import photo_like_image, photo_like_jpeg
from deco.data.transforms import TransformConfig, encode_image, reduce_factor, render, resize_centre_crop, transform_image
from image_helpers import jpeg, psnr

CFG = TransformConfig(resolutions=[256, 512], jpeg_quality=95)
MIN_PSNR_DB = 40.0


def reference(data: bytes, resolution: int) -> Image.Image:
    return resize_centre_crop(decode_image(data, 10**9), resolution)


@pytest.mark.parametrize("size, resolutions, scale", [
    ((768, 576), [256, 512], 1), ((600, 1000), [256, 512], 1), ((1536, 1152), [256, 512], 2),
    ((1100, 1030), [64, 128], 4), ((1030, 1024), [32, 64], 8)])
def test_fast_path_matches_full_decode_lanczos(size, resolutions, scale):
    cfg = TransformConfig(resolutions=resolutions, jpeg_quality=95)
    for seed in range(2):
        data = photo_like_jpeg(seed, *size)
        decoded = open_image(data, 10**9, draft_side=max(resolutions))
        assert decoded.size == size and decoded.scale == scale  # the original size, also when drafted
        fast = render(decoded, cfg)
        for r in resolutions:
            assert fast[r].size == (r, r) and fast[r].mode == "RGB"
            assert psnr(fast[r], reference(data, r)) >= MIN_PSNR_DB, (size, r)
            # and after the q95 encode, what the shards hold
            encoded = Image.open(io.BytesIO(encode_image(fast[r], cfg))).convert("RGB")
            assert psnr(encoded, Image.open(io.BytesIO(encode_image(reference(data, r), cfg)))) >= MIN_PSNR_DB


def test_no_reduction_needed_means_the_reference_exactly():
    data = photo_like_jpeg(3)  # 768x576 -> 512: neither draft nor reduce applies
    assert open_image(data, 10**9, draft_side=512).scale == 1
    assert reduce_factor(576, 512) == 1
    assert render(open_image(data, 10**9, 512), CFG)[512].tobytes() == reference(data, 512).tobytes()


def test_draft_only_when_the_source_is_at_least_twice_the_target():
    # 1/2 from twice the target; 1/4 and 1/8 only while the decode keeps twice the target
    assert [draft_scale(side, 512) for side in (511, 1023, 1024, 2048, 4095, 4096, 8191, 8192)] == [1, 1, 2, 2, 2, 4, 4, 8]
    assert draft_scale(4000, None) == 1
    for (w, h), target, scale in [((1364, 1023), 512, 1), ((1366, 1024), 512, 2), ((1030, 1023), 128, 2),
                                  ((1030, 1024), 128, 4), ((1030, 1024), 64, 8)]:
        decoded = open_image(jpeg(photo_like_image(1, w, h)), 10**9, draft_side=target)
        assert decoded.scale == scale and decoded.size == (w, h)
        assert decoded.image.size == (-(-w // scale), -(-h // scale))  # decoded at reduced scale
        assert min(decoded.image.size) >= target
    # never for other formats, nor without a target
    png = io.BytesIO()
    photo_like_image(1, 1366, 1024).save(png, format="PNG")
    assert open_image(png.getvalue(), 10**9, draft_side=512).scale == 1
    assert open_image(jpeg(photo_like_image(1, 1366, 1024)), 10**9).scale == 1


def test_size_filters_see_the_original_size_when_drafted():
    data = jpeg(photo_like_image(2, 2100, 1400))  # drafted to 1050x700 for 512 px outputs
    assert open_image(data, 10**9, draft_side=512).image.size == (1050, 700)
    _, why = ImageFilters(ImageFilterConfig(), min_side=1401).check_decoded(data, draft_side=512)
    assert why.reason == "image_too_small" and why.detail == "2100x1400 < 1401"  # not 1050x700
    decoded, why = ImageFilters(ImageFilterConfig(), min_side=1400).check_decoded(data, draft_side=512)
    assert why is None and decoded.scale == 2 and decoded.size == (2100, 1400)
    _, why = ImageFilters(ImageFilterConfig(max_aspect_ratio=1.4), min_side=512).check_decoded(data, draft_side=512)
    assert why.reason == "image_aspect_ratio" and why.detail == "1.50 > 1.4"


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_applied_to_the_outputs(orientation):
    image = photo_like_image(4, 1600, 1100)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(image, exif=exif.tobytes())
    decoded = open_image(data, 10**9, draft_side=512)
    upright = decode_image(data, 10**9)
    assert decoded.size == upright.size and decoded.scale == 2
    fast = render(decoded, CFG)
    for r in CFG.resolutions:
        assert psnr(fast[r], resize_centre_crop(upright, r)) >= MIN_PSNR_DB


def test_deterministic_and_same_api_for_plain_images():
    data = photo_like_jpeg(5, 1536, 1152)
    first = transform_image(open_image(data, 10**9, 512), CFG)
    assert first == transform_image(open_image(data, 10**9, 512), CFG)
    plain = transform_image(decode_image(data, 10**9), CFG)  # an upright PIL image: full decode, reduce only
    assert set(plain) == {256, 512}
    assert psnr(Image.open(io.BytesIO(plain[512])).convert("RGB"),
                 Image.open(io.BytesIO(first[512])).convert("RGB")) >= MIN_PSNR_DB
