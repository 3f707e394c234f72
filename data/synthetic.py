"""Synthetic image-caption pairs: coloured shapes on textured backgrounds, deterministic for a seed.

The offline stand-in for a crawl: small enough to train on a CPU, structured enough that colour,
count and position in the caption are visible in the pixels. Captions follow GenEval's six task
styles over our own vocabulary (SHAPES x COLORS):

    single_object  "a photo of a circle"              counting    "a photo of three triangles"
    two_object     "a photo of a circle and a square" colors      "a photo of a red circle"
    position       "a photo of a circle left of a square"  (also right of / above / below)
    color_attr     "a photo of a red circle and a blue square"

Guarantees a detector can rely on (and tests pin down):
- objects never overlap: boxes are at least `gap(size)` pixels apart;
- every object's sides are at least a fifth of the scene's square region, so objects stay
  detectable after the curation resize to 32 px;
- objects lie inside the central square of the canvas, so a centre crop keeps all of them;
- every background pixel differs from each of the 10 COLORS by at least MIN_BACKGROUND_DISTANCE
  (L1 over RGB), and objects are drawn with their exact COLORS value (no anti-aliasing);
- position scenes satisfy GenEval's relation rule for the stated relation and no other.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

# GenEval's ten colours, as drawn. FROZEN: the synthetic detector keys on these values.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "blue": (40, 80, 220), "purple": (130, 50, 170), "pink": (245, 150, 190), "brown": (120, 75, 35),
    "black": (15, 15, 15), "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")  # FROZEN vocabulary
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
# Background base colours: each at L1 distance >= 135 from every colour in COLORS.
BACKGROUNDS = [(45, 75, 95), (70, 100, 120), (90, 110, 130), (140, 180, 210), (100, 200, 200),
               (150, 180, 160), (160, 150, 120), (180, 210, 210)]
# Every background pixel (texture included) stays at least this far (L1 over RGB) from every colour
# in COLORS, so a pixel of an object colour is never background.
MIN_BACKGROUND_DISTANCE = 90
# Texture: a 6x6 grid of random offsets, bilinearly upsampled. The amplitude per background is what
# its distance to the nearest object colour allows above MIN_BACKGROUND_DISTANCE (at most 30): strong
# enough that no two scenes share a perceptual hash, weak enough to keep the guarantee above.
TEXTURE_GRID = 6
MAX_TEXTURE_AMPLITUDE = 30


@dataclass(frozen=True)
class DrawnObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1: the object fills pixels x0 <= x < x1, y0 <= y < y1


def draw_object(draw: ImageDraw.ImageDraw, obj: DrawnObject) -> None:
    x0, y0, x1, y1 = obj.box
    fill = COLORS[obj.color]
    inclusive = (x0, y0, x1 - 1, y1 - 1)  # PIL's shapes include their end pixel
    if obj.shape == "circle":
        draw.ellipse(inclusive, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(inclusive, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {SHAPES}")


def article(word: str) -> str:
    """GenEval's prompts say "an orange ...": the same article in captions keeps train and eval text alike."""
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def nearest_color_distance(rgb: tuple[int, int, int]) -> int:
    return min(sum(abs(a - b) for a, b in zip(color, rgb)) for color in COLORS.values())


def texture_amplitude(base: tuple[int, int, int]) -> float:
    # An offset of a in every channel moves a pixel by at most 3a in L1.
    return max(0.0, min(MAX_TEXTURE_AMPLITUDE, (nearest_color_distance(base) - MIN_BACKGROUND_DISTANCE) / 3))


def textured_background(width: int, height: int, base: tuple[int, int, int], texture_seed: int | None) -> Image.Image:
    """Base colour plus smooth low-frequency noise (plain when texture_seed is None)."""
    if texture_seed is None:
        return Image.new("RGB", (width, height), base)
    rng = np.random.default_rng(texture_seed)
    shared, per_channel = rng.uniform(-1, 1, (TEXTURE_GRID, TEXTURE_GRID, 1)), rng.uniform(-1, 1, (TEXTURE_GRID, TEXTURE_GRID, 3))
    coarse = texture_amplitude(base) * (0.75 * shared + 0.25 * per_channel)
    # Bilinear upsampling interpolates between grid values, so the amplitude bound holds per pixel.
    last = TEXTURE_GRID - 1
    ys, xs = np.linspace(0, last, height), np.linspace(0, last, width)
    y0, x0 = np.minimum(ys.astype(int), last - 1), np.minimum(xs.astype(int), last - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    offsets = np.trunc(top * (1 - fy) + bottom * fy)  # toward zero: never past the amplitude
    pixels = np.clip(np.asarray(base, dtype=np.float64) + offsets, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def render(objects: list[DrawnObject], size: int | tuple[int, int], background: tuple[int, int, int],
           texture_seed: int | None = None) -> Image.Image:
    width, height = (size, size) if isinstance(size, int) else size
    image = textured_background(width, height, background, texture_seed)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_object(draw, obj)
    return image


def geneval_relations(subject: tuple[float, ...], reference: tuple[float, ...]) -> set[str]:
    """Relations of `subject` to `reference` (boxes x0,y0,x1,y1) under GenEval's position rule."""
    centre = lambda b: ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)  # noqa: E731
    extent = lambda b: (b[2] - b[0], b[3] - b[1])  # noqa: E731
    (cx_s, cy_s), (cx_r, cy_r) = centre(subject), centre(reference)
    offset = (cx_s - cx_r, cy_s - cy_r)
    sizes = [a + b for a, b in zip(extent(subject), extent(reference))]
    revised = [math.copysign(max(abs(o) - 0.1 * s, 0.0), o) for o, s in zip(offset, sizes)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    norm = math.hypot(*offset)
    dx, dy = revised[0] / norm, revised[1] / norm
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


@dataclass(frozen=True)
class Scene:
    """One drawn scene with its caption and its ground truth (GenEval-style clauses included)."""

    tag: str
    caption: str
    objects: tuple[DrawnObject, ...]
    width: int
    height: int
    background: tuple[int, int, int]
    texture_seed: int
    include: tuple[dict, ...] = field(default_factory=tuple)
    exclude: tuple[dict, ...] = field(default_factory=tuple)

    def image(self) -> Image.Image:
        return render(list(self.objects), (self.width, self.height), self.background, self.texture_seed)

    def metadata(self) -> dict:
        """The scene as a GenEval `evaluation_metadata.jsonl` object."""
        meta = {"tag": self.tag, "include": [dict(c) for c in self.include], "prompt": self.caption}
        if self.exclude:
            meta["exclude"] = [dict(c) for c in self.exclude]
        return meta


def box_at_resolution(box: tuple[float, ...], width: int, height: int, resolution: int) -> tuple[float, ...]:
    """A box of a width x height image mapped through curation's transform: the central square
    resampled to resolution x resolution (data/transforms.py)."""
    scale = resolution / min(width, height)
    left, top = (width - min(width, height)) / 2, (height - min(width, height)) / 2
    x0, y0, x1, y1 = box
    return ((x0 - left) * scale, (y0 - top) * scale, (x1 - left) * scale, (y1 - top) * scale)


def ground_truth(scene: Scene, resolution: int | None = None) -> list[dict]:
    """Objects as drawn: [{"class", "color", "rgb", "box"}], boxes half-open (x0, y0, x1, y1).

    With `resolution`, boxes are where the objects land in the curated image (box_at_resolution).
    """
    truth = []
    for obj in scene.objects:
        box = obj.box if resolution is None else box_at_resolution(obj.box, scene.width, scene.height, resolution)
        truth.append({"class": obj.shape, "color": obj.color, "rgb": COLORS[obj.color], "box": tuple(box)})
    return truth


def min_object_side(square: int) -> int:
    return math.ceil(square / 5)


def gap(square: int) -> int:
    return max(2, square // 16)


def _square_region(width: int, height: int) -> tuple[int, int, int]:
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side


def _separated(a: tuple[int, ...], b: tuple[int, ...], space: int) -> bool:
    return a[2] + space <= b[0] or b[2] + space <= a[0] or a[3] + space <= b[1] or b[3] + space <= a[1]


def _place(rng: random.Random, sides: list[int], region: tuple[int, int, int]) -> list[tuple[int, int, int, int]]:
    """Non-overlapping boxes of the given sides inside the square region (rejection, then a grid)."""
    left, top, square = region
    margin, space = max(1, square // 32), gap(square)
    for _ in range(200):
        boxes: list[tuple[int, int, int, int]] = []
        for side in sides:
            x = rng.randint(left + margin, left + square - margin - side)
            y = rng.randint(top + margin, top + square - margin - side)
            box = (x, y, x + side, y + side)
            if not all(_separated(box, other, space) for other in boxes):
                break
            boxes.append(box)
        if len(boxes) == len(sides):
            return boxes
    # Dense cases (four objects): one object per cell of a 2x2 grid, jittered within its cell.
    cell = square // 2
    cells = rng.sample([(0, 0), (1, 0), (0, 1), (1, 1)], len(sides))
    boxes = []
    for side, (cx, cy) in zip(sides, cells):
        side = min(side, cell - space - margin)
        x0 = left + cx * cell + (margin if cx == 0 else space)
        y0 = top + cy * cell + (margin if cy == 0 else space)
        x = rng.randint(x0, max(x0, left + (cx + 1) * cell - side - (space if cx == 0 else margin)))
        y = rng.randint(y0, max(y0, top + (cy + 1) * cell - side - (space if cy == 0 else margin)))
        boxes.append((x, y, x + side, y + side))
    return boxes


def _place_relation(rng: random.Random, relation: str, region: tuple[int, int, int]) -> tuple[tuple, tuple]:
    """(subject box, reference box) such that `relation` is the only GenEval relation that holds."""
    left, top, square = region
    lo, hi = min_object_side(square), max(min_object_side(square), square * 2 // 5)
    while True:
        subject, reference = _place(rng, [rng.randint(lo, hi), rng.randint(lo, hi)], region)
        if geneval_relations(subject, reference) == {relation}:
            return subject, reference


def make_scene(rng: random.Random, size: int, task: str | None = None,
               canvas: tuple[int, int] | None = None) -> Scene:
    """One scene of `task` (random when None) on a `size`-square canvas, or on `canvas` (w, h) with
    the objects inside its central min(w, h) square."""
    task = task or rng.choice(TASKS)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    width, height = canvas or (size, size)
    region = _square_region(width, height)
    square = region[2]
    background = rng.choice(BACKGROUNDS)
    palette = list(COLORS)
    lo = min_object_side(square)
    include: list[dict] = []
    exclude: list[dict] = []
    if task in ("single_object", "colors"):
        shape, color = rng.choice(SHAPES), rng.choice(palette)
        (box,) = _place(rng, [rng.randint(max(lo, square * 3 // 10), square * 3 // 5)], region)
        objects = [DrawnObject(shape, color, box)]
        clause = {"class": shape, "count": 1, **({"color": color} if task == "colors" else {})}
        include = [clause]
        caption = f"a photo of {article(color)} {color} {shape}" if task == "colors" else f"a photo of a {shape}"
    elif task in ("two_object", "color_attr"):
        shapes, colors = rng.sample(SHAPES, 2), rng.sample(palette, 2)
        hi = max(lo, square * 2 // 5)
        boxes = _place(rng, [rng.randint(lo, hi), rng.randint(lo, hi)], region)
        objects = [DrawnObject(s, c, b) for s, c, b in zip(shapes, colors, boxes)]
        if task == "color_attr":
            include = [{"class": s, "count": 1, "color": c} for s, c in zip(shapes, colors)]
            caption = f"a photo of {article(colors[0])} {colors[0]} {shapes[0]} and {article(colors[1])} {colors[1]} {shapes[1]}"
        else:
            include = [{"class": s, "count": 1} for s in shapes]
            caption = f"a photo of a {shapes[0]} and a {shapes[1]}"
    elif task == "counting":
        count, shape = rng.randint(1, 4), rng.choice(SHAPES)
        hi = max(lo, square // 4 if count > 2 else square * 2 // 5)
        boxes = _place(rng, [rng.randint(lo, hi) for _ in range(count)], region)
        objects = [DrawnObject(shape, rng.choice(palette), b) for b in boxes]
        include, exclude = [{"class": shape, "count": count}], [{"class": shape, "count": count + 1}]
        caption = f"a photo of {NUMBER_WORDS[count]} {plural(shape, count)}"
    else:  # position
        (subject_shape, reference_shape), colors = rng.sample(SHAPES, 2), rng.sample(palette, 2)
        relation = rng.choice(RELATIONS)
        subject_box, reference_box = _place_relation(rng, relation, region)
        objects = [DrawnObject(reference_shape, colors[1], reference_box), DrawnObject(subject_shape, colors[0], subject_box)]
        include = [{"class": reference_shape, "count": 1},
                   {"class": subject_shape, "count": 1, "position": [relation, 0]}]
        caption = f"a photo of a {subject_shape} {relation} a {reference_shape}"
    return Scene(tag=task, caption=caption, objects=tuple(objects), width=width, height=height,
                 background=background, texture_seed=rng.getrandbits(63), include=tuple(include),
                 exclude=tuple(exclude))


def random_scene(rng: random.Random, size: int) -> tuple[Image.Image, str, list[DrawnObject]]:
    """One square scene of a random task: (image, caption, objects)."""
    scene = make_scene(rng, size)
    return scene.image(), scene.caption, list(scene.objects)


def synthetic_scenes(count: int, size: int, seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [make_scene(rng, size) for _ in range(count)]


def synthetic_pairs(count: int, size: int, seed: int) -> list[tuple[Image.Image, str]]:
    return [(scene.image(), scene.caption) for scene in synthetic_scenes(count, size, seed)]


def geneval_prompts() -> list[dict]:
    """A GenEval prompt set (evaluation_metadata.jsonl objects) over SHAPES x COLORS, for the gates.

    Every combination for the small tasks; color_attr takes each ordered shape pair with a fixed,
    seeded choice of colour pairs so the set stays a few hundred prompts.
    """
    prompts: list[dict] = []
    pairs = [(a, b) for a in SHAPES for b in SHAPES if a != b]
    for shape in SHAPES:
        prompts.append({"tag": "single_object", "include": [{"class": shape, "count": 1}], "prompt": f"a photo of a {shape}"})
    for a, b in pairs:
        prompts.append({"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
                        "prompt": f"a photo of a {a} and a {b}"})
    for shape in SHAPES:
        for count in (2, 3, 4):
            prompts.append({"tag": "counting", "include": [{"class": shape, "count": count}],
                            "exclude": [{"class": shape, "count": count + 1}],
                            "prompt": f"a photo of {NUMBER_WORDS[count]} {plural(shape, count)}"})
    for shape in SHAPES:
        for color in COLORS:
            prompts.append({"tag": "colors", "include": [{"class": shape, "count": 1, "color": color}],
                            "prompt": f"a photo of {article(color)} {color} {shape}"})
    for subject, reference in pairs:
        for relation in RELATIONS:
            prompts.append({"tag": "position", "include": [{"class": reference, "count": 1},
                                                           {"class": subject, "count": 1, "position": [relation, 0]}],
                            "prompt": f"a photo of a {subject} {relation} a {reference}"})
    rng = random.Random(0)
    color_pairs = [(a, b) for a in COLORS for b in COLORS if a != b]
    for a, b in pairs:
        for ca, cb in rng.sample(color_pairs, 5):
            prompts.append({"tag": "color_attr", "include": [{"class": a, "count": 1, "color": ca},
                                                             {"class": b, "count": 1, "color": cb}],
                            "prompt": f"a photo of {article(ca)} {ca} {a} and {article(cb)} {cb} {b}"})
    return prompts


# ------------------------------------------------------------------------------------------------
# Photo-like JPEGs: the throughput benchmark's input (benchmarks/curate_throughput.py)
# ------------------------------------------------------------------------------------------------

PHOTO_SUBJECTS = ("an old red barn", "a small wooden boat", "a brown dog", "a tall lighthouse", "a yellow taxi",
                  "a stone bridge", "a white horse", "a cup of coffee", "a mountain cabin", "a young woman",
                  "a bicycle", "a flock of birds", "a green tractor", "a city street", "an orange cat")
PHOTO_PLACES = ("next to a quiet lake", "in a snowy forest", "on a sandy beach", "under a cloudy sky",
                "in front of an old house", "on a busy market square", "at the edge of a wheat field",
                "beside a winding country road", "on a wooden table", "near the harbour")
PHOTO_TIMES = ("at sunset", "in the early morning", "on a rainy afternoon", "during a summer evening",
               "in the soft light of dawn", "on a bright winter day")


def photo_like_image(seed: int, width: int = 768, height: int = 576) -> Image.Image:
    """A deterministic stand-in for a natural photo: smooth colour gradients, soft-edged objects,
    a mid-frequency texture and sensor-like noise (what a JPEG encoder and a Lanczos resize see in
    real photos; flat synthetic scenes compress and resample unrealistically cheaply)."""
    from PIL import ImageFilter

    rng = np.random.default_rng(seed)
    grid = rng.uniform(30, 225, size=(int(rng.integers(3, 6)), int(rng.integers(4, 8)), 3)).astype(np.uint8)
    image = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 8))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(width / 25, width / 3), rng.uniform(height / 20, height / 3)
        colour = tuple(int(c) for c in rng.integers(10, 246, size=3))
        if rng.random() < 0.5:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=colour)
        else:
            angles = np.sort(rng.uniform(0, 2 * np.pi, 5))
            draw.polygon([(float(cx + rx * np.cos(a)), float(cy + ry * np.sin(a))) for a in angles], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.7, 1.6))))
    texture = Image.fromarray(rng.normal(128, 40, size=(max(1, height // 6), max(1, width // 6))).clip(0, 255).astype(np.uint8))
    texture = np.asarray(texture.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16) - 128
    noise = rng.normal(0, float(rng.uniform(1.5, 3.5)), size=(height, width)).astype(np.int16)
    pixels = np.asarray(image, dtype=np.int16) + ((texture * int(rng.integers(2, 6))) // 10 + noise)[..., None]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def photo_like_jpeg(seed: int, width: int = 768, height: int = 576, quality: int = 90) -> bytes:
    """photo_like_image as a baseline JPEG (4:2:0): about 60-110 KB at 768x576, q90."""
    import io

    buffer = io.BytesIO()
    photo_like_image(seed, width, height).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def photo_caption(seed: int) -> str:
    """A short English caption, e.g. "a stone bridge beside a winding country road at sunset"."""
    rng = random.Random(seed)
    return f"{rng.choice(PHOTO_SUBJECTS)} {rng.choice(PHOTO_PLACES)} {rng.choice(PHOTO_TIMES)}"
