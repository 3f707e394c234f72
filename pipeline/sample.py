"""Text-to-image sampling from exported weights, and image grids."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deco.model.deco import DeCo
from deco.model.sampling import SamplerConfig, initial_noise, sample
from deco.model.text_encoder import TextEncoder


@torch.no_grad()
def generate(model: DeCo, encoder: TextEncoder, prompts: list[str], sampler: SamplerConfig,
             seed: int, resolution: int | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Images in [-1, 1], (len(prompts), 3, H, W): `size` (H, W), else R x R at `resolution` (the
    model's by default); the same seed gives the same images. Any size of whole patches works: the
    DiT's RoPE and the decoder take any token grid."""
    resolution = resolution or model.cfg.resolution
    height, width = size or (resolution, resolution)
    patch = model.cfg.dit.patch_size
    if height % patch or width % patch:
        raise ValueError(f"size {height}x{width} (HxW) is not a multiple of the model's patch size {patch}")
    device = next(model.parameters()).device
    text, mask = encoder.encode(prompts)
    empty_text, empty_mask = encoder.empty_encoding()
    uncond = (empty_text.expand_as(text).to(device), empty_mask.expand_as(mask).to(device))
    noise = initial_noise((len(prompts), 3, height, width), seed, device, torch.float32)

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
