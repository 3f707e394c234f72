"""Text-to-image sampling from exported weights, and image grids."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deco.model.deco import DeCo
from deco.model.flow import interpolate
from deco.model.sampling import SamplerConfig, initial_noise, sample
from deco.model.text_encoder import TextEncoder


@torch.no_grad()
def generate(model: DeCo, encoder: TextEncoder, prompts: list[str], sampler: SamplerConfig,
             seed: int, resolution: int | None = None, size: tuple[int, int] | None = None,
             init_images: torch.Tensor | None = None) -> torch.Tensor:
    """Images in [-1, 1], (len(prompts), 3, H, W): `size` (H, W), else R x R at `resolution` (the
    model's by default); the same seed gives the same images. Any size of whole patches works: the
    DiT's RoPE and the decoder take any token grid.

    `init_images` ((len(prompts), 3, H, W) in [-1, 1]) with `sampler.start_time` t0 > 0: start from
    them noised to t0 with the seed's noise (SDEdit) instead of from pure noise."""
    if (init_images is not None) != (sampler.start_time > 0):
        raise ValueError("init_images and sampler.start_time > 0 go together: starting later than t = 0 "
                         "needs images to noise, and images need a start time to be noised to")
    asked = size or ((resolution, resolution) if resolution else None)
    height, width = asked or (model.cfg.resolution, model.cfg.resolution)
    if init_images is not None:
        if init_images.ndim != 4 or init_images.shape[0] != len(prompts) or init_images.shape[1] != 3:
            raise ValueError(f"init_images must be ({len(prompts)}, 3, H, W), got {tuple(init_images.shape)}")
        if asked is not None and tuple(asked) != tuple(init_images.shape[-2:]):
            raise ValueError(f"size {tuple(asked)} differs from the init_images' {tuple(init_images.shape[-2:])}")
        height, width = init_images.shape[-2:]
    patch = model.cfg.dit.patch_size
    if height % patch or width % patch:
        raise ValueError(f"size {height}x{width} (HxW) is not a multiple of the model's patch size {patch}")
    device = next(model.parameters()).device
    text, mask = encoder.encode(prompts)
    empty_text, empty_mask = encoder.empty_encoding()
    uncond = (empty_text.expand_as(text).to(device), empty_mask.expand_as(mask).to(device))
    noise = initial_noise((len(prompts), 3, height, width), seed, device, torch.float32)
    if init_images is not None:
        start = torch.full((len(prompts),), sampler.start_time)
        noise = interpolate(init_images.to(device=device, dtype=torch.float32), noise, start.to(device))

    def velocity(x, t, cond):
        return model(x, t, cond[0], cond[1]).float()

    images = sample(velocity, noise, sampler, (text.to(device), mask.to(device)), uncond)
    return images.clamp(-1, 1)


def to_pil(image: torch.Tensor) -> Image.Image:
    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def save_grid(images: torch.Tensor, path: str | Path, columns: int | None = None, pad: int = 2) -> Path:
    """Tile (N, 3, H, W) images in [-1, 1] into one PNG."""
    count, _, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    grid = Image.new("RGB", (columns * (width + pad) + pad, rows * (height + pad) + pad), (255, 255, 255))
    for index in range(count):
        row, col = divmod(index, columns)
        grid.paste(to_pil(images[index]), (pad + col * (width + pad), pad + row * (height + pad)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
