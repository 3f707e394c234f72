"""Synthetic image-caption pairs: coloured shapes on plain backgrounds, deterministic for a seed.

The offline stand-in for a crawl: small enough to train on a CPU, structured enough that colour,
count and position in the caption are visible in the pixels.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

# GenEval's ten colours, as drawn.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "blue": (40, 80, 220), "purple": (130, 50, 170), "pink": (245, 150, 190), "brown": (120, 75, 35),
    "black": (15, 15, 15), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
BACKGROUNDS = [(200, 200, 190), (90, 110, 130), (170, 190, 160), (60, 60, 70), (210, 190, 160)]


@dataclass(frozen=True)
class DrawnObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


def draw_object(draw: ImageDraw.ImageDraw, obj: DrawnObject) -> None:
    x0, y0, x1, y1 = obj.box
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse(obj.box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(obj.box, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {SHAPES}")


def plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def render(objects: list[DrawnObject], size: int, background: tuple[int, int, int]) -> Image.Image:
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_object(draw, obj)
    return image


def random_scene(rng: random.Random, size: int) -> tuple[Image.Image, str, list[DrawnObject]]:
    """One scene: a single object, or a pair left/right of each other, with its caption."""
    background = rng.choice(BACKGROUNDS)
    colors = [c for c in COLORS if sum(abs(a - b) for a, b in zip(COLORS[c], background)) > 120]
    if rng.random() < 0.5:
        shape, color = rng.choice(SHAPES), rng.choice(colors)
        side = rng.randint(size * 2 // 5, size * 3 // 4)
        x0, y0 = rng.randint(0, size - side), rng.randint(0, size - side)
        objects = [DrawnObject(shape, color, (x0, y0, x0 + side, y0 + side))]
        caption = f"a photo of a {color} {shape}"
    else:
        (shape_a, shape_b), (color_a, color_b) = rng.sample(SHAPES, 2), rng.sample(colors, 2)
        side = rng.randint(size // 4, size * 2 // 5)
        ya, yb = rng.randint(0, size - side), rng.randint(0, size - side)
        xa = rng.randint(0, size // 2 - side)
        xb = rng.randint(size // 2, size - side)
        objects = [DrawnObject(shape_a, color_a, (xa, ya, xa + side, ya + side)),
                   DrawnObject(shape_b, color_b, (xb, yb, xb + side, yb + side))]
        caption = f"a photo of a {color_a} {shape_a} left of a {color_b} {shape_b}"
    return render(objects, size, background), caption, objects


def synthetic_pairs(count: int, size: int, seed: int) -> list[tuple[Image.Image, str]]:
    rng = random.Random(seed)
    return [random_scene(rng, size)[:2] for _ in range(count)]
