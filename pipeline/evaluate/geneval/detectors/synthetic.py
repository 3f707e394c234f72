"""A real detector, over pixels, for the synthetic dataset's classes (circle, square, triangle) and its
ten colours: it never knows how an image was drawn.

1. Background: scenes are shapes on a plain or smoothly textured background that keeps its distance
   from every palette colour. Pixels far from all palette colours seed it; the median of the seeds
   in each cell of a coarse grid, upsampled, gives the background colour at every pixel.
2. Segmentation: a pixel is foreground when it is more than `foreground_delta_e` (CIELAB) from the
   local background and nearer some palette colour than to it. Noisy (generated) images get a 3x3
   median first.
3. Connected components (8-neighbour) of the foreground; tiny ones are noise. A component whose
   pixels fall into several large regions of different palette colours is split into them (two
   touching objects of different colours), which leaves thin blended edges aside.
4. Shape from geometry: how much of its box the object fills (square 1, circle pi/4, triangle 1/2),
   how much of the circle around its centroid it fills (1, 2/pi, 0.36), the width of its top and
   bottom quarters (a triangle is narrow on top and wide below, a circle narrow at both), its
   corners (vertices of its simplified convex hull) and its aspect. Each class scores exp(-d^2/2)
   over these standardised distances; the detection score is the best class's probability times
   how well it fits at all, so clean shapes score above 0.9 and blobs stay below the thresholds.
5. Colour: the median CIELAB colour of the object's interior, nearest of the ten palette colours.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from deco.data.synthetic import COLORS, SHAPES
from deco.pipeline.evaluate.geneval.detections import Detection, mask_to_box
from deco.pipeline.evaluate.geneval.detectors.base import Detector, SyntheticDetectorConfig

# Feature prototypes (ideal continuous shapes) and spreads: bbox fill, circle fill, top-quarter width,
# bottom-quarter width, corners, aspect (short / long side: the dataset draws every shape in a square),
# solidity (area / area with holes filled: drawn shapes have no holes, noise blobs do).
# Spreads were set from the features of shapes drawn at 7-200 px; pixelation spreads the features of
# small shapes, so spreads widen by (1 + SMALL / side in pixels).
FEATURES = ("bbox_fill", "radial_fill", "top_width", "bottom_width", "corners", "aspect", "solidity")
PROTOTYPES = {
    "circle": (np.pi / 4, 1.0, 0.614, 0.614, 8.0, 1.0, 1.0),
    "square": (1.0, 2 / np.pi, 1.0, 1.0, 4.0, 1.0, 1.0),
    "triangle": (0.5, 0.358, 0.125, 0.875, 3.0, 1.0, 1.0),
}
SPREADS = np.array((0.07, 0.12, 0.14, 0.14, 1.5, 0.1, 0.05))
SMALL = 8.0
# Detection score = P(best shape | features) x fit, fit = exp(-d^2 / FIT_SCALE) with d the standardised
# distance to the best prototype: a clean shape fits (score > 0.9, it counts), a blob that is no
# shape at all scores low however much it resembles one shape more than the others.
FIT_SCALE = 40.0


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0-255, any leading shape) -> CIELAB under D65."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ m.T / np.array([0.95047, 1.0, 1.08883])
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


PALETTE_NAMES = tuple(COLORS)
PALETTE_LAB = rgb_to_lab(np.array([COLORS[c] for c in PALETTE_NAMES]))


def palette_distances(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index into PALETTE_NAMES of the nearest palette colour, its CIELAB distance), per value."""
    best = np.full(lab.shape[:-1], np.inf)
    index = np.zeros(lab.shape[:-1], dtype=np.int64)
    for i, color in enumerate(PALETTE_LAB):  # a loop of 10 keeps memory at one (H, W) plane
        distance = ((lab - color) ** 2).sum(axis=-1)
        closer = distance < best
        best[closer], index[closer] = distance[closer], i
    return index, np.sqrt(best)


def nearest_color(lab: np.ndarray) -> np.ndarray:
    return palette_distances(lab)[0]


def noise_level(rgb: np.ndarray, candidates: np.ndarray) -> float:
    """Median per-pixel deviation from the 3x3 median over background candidates: about 0 on a
    render (plain or smoothly textured background), several units on a noisy generated image."""
    if not candidates.any():
        return 0.0
    deviation = np.abs(rgb.astype(np.float64) - ndimage.median_filter(rgb, size=(3, 3, 1))).mean(axis=-1)
    return float(np.median(deviation[candidates]))


def background_surface(rgb: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """A smooth estimate of the background colour at every pixel (scenes are shapes on a plain or
    low-frequency textured background): the median of the candidate background pixels in each cell
    of a coarse grid, cells without any filled from their neighbours, bilinearly upsampled."""
    height, width, _ = rgb.shape
    cells = int(np.clip(min(height, width) // 8, 2, 12))
    ys = np.linspace(0, height, cells + 1).astype(int)
    xs = np.linspace(0, width, cells + 1).astype(int)
    grid = np.full((cells, cells, 3), np.nan)
    for i in range(cells):
        for j in range(cells):
            pick = candidates[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
            if pick.sum() >= max(1, pick.size // 8):
                grid[i, j] = np.median(rgb[ys[i]:ys[i + 1], xs[j]:xs[j + 1]][pick], axis=0)
    if np.isnan(grid).all():
        grid[:] = np.median(rgb.reshape(-1, 3), axis=0)
    while np.isnan(grid).any():  # grow known cells into unknown ones (cells covered by objects)
        known = ~np.isnan(grid[..., 0])
        padded = np.pad(np.where(known[..., None], grid, 0.0), ((1, 1), (1, 1), (0, 0)))
        weight = np.pad(known.astype(float), 1)
        total = sum(padded[1 + dy:1 + dy + cells, 1 + dx:1 + dx + cells] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        count = sum(weight[1 + dy:1 + dy + cells, 1 + dx:1 + dx + cells] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
        grow = ~known & (count > 0)
        grid[grow] = total[grow] / count[grow][:, None]
    # Cell centres -> pixel centres, bilinear.
    gy = np.clip((np.arange(height) + 0.5) / height * cells - 0.5, 0, cells - 1)
    gx = np.clip((np.arange(width) + 0.5) / width * cells - 0.5, 0, cells - 1)
    y0, x0 = np.minimum(gy.astype(int), cells - 2), np.minimum(gx.astype(int), cells - 2)  # cells >= 2
    y1, x1 = y0 + 1, x0 + 1
    fy, fx = (gy - y0)[:, None, None], (gx - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x1] * fx
    bottom = grid[y1][:, x0] * (1 - fx) + grid[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def _hull_corners(mask: np.ndarray) -> int:
    """Vertices of the convex hull of the mask's pixel corners, after dropping vertices that lie
    within a tolerance of the line through their neighbours (pixel staircases, round arcs)."""
    ys, xs = np.nonzero(mask & ~ndimage.binary_erosion(mask))  # the outline is enough for the hull
    points = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    try:
        hull = points[ConvexHull(points).vertices].astype(np.float64)
    except QhullError:
        return 4
    # Remove the flattest vertex (smallest distance to the chord of its neighbours) until every
    # remaining one bends the outline by more than the tolerance.
    tolerance = max(1.0, 0.05 * max(mask.shape))
    while len(hull) > 3:
        prev, nxt = np.roll(hull, 1, axis=0), np.roll(hull, -1, axis=0)
        chord = nxt - prev
        cross = np.abs(chord[:, 0] * (hull[:, 1] - prev[:, 1]) - chord[:, 1] * (hull[:, 0] - prev[:, 0]))
        distance = cross / np.maximum(np.hypot(chord[:, 0], chord[:, 1]), 1e-9)
        flattest = int(distance.argmin())
        if distance[flattest] >= tolerance:
            break
        hull = np.delete(hull, flattest, axis=0)
    return min(len(hull), 8)


def shape_features(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    height, width = crop.shape
    area = float(crop.sum())
    rows = crop.sum(axis=1) / width
    quarter = max(1, height // 4)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    radius = np.sqrt((ys + 0.5 - cy) ** 2 + (xs + 0.5 - cx) ** 2).max() + 0.5
    return np.array([area / (height * width), area / (np.pi * radius ** 2), rows[:quarter].mean(),
                     rows[-quarter:].mean(), _hull_corners(crop), min(height, width) / max(height, width),
                     area / ndimage.binary_fill_holes(crop).sum()])


def classify_shape(features: np.ndarray, side: float) -> tuple[str, float, dict[str, float]]:
    """(best shape, detection score, probability of each shape) for an object `side` pixels wide."""
    spreads = SPREADS * (1 + SMALL / max(side, 1.0))
    distances = {name: float((((features - np.array(proto)) / spreads) ** 2).sum()) for name, proto in PROTOTYPES.items()}
    best = min(distances, key=distances.get)
    weights = {k: np.exp(-0.5 * (v - distances[best])) for k, v in distances.items()}
    total = sum(weights.values())
    probabilities = {k: float(w / total) for k, w in weights.items()}
    return best, probabilities[best] * float(np.exp(-distances[best] / FIT_SCALE)), probabilities


class SyntheticDetector(Detector):
    name = "synthetic"
    classes = tuple(SHAPES)
    batch_size = 16

    def __init__(self, cfg: SyntheticDetectorConfig | None = None):
        self.cfg = cfg or SyntheticDetectorConfig()

    def detect(self, images: list[Image.Image]) -> list[dict[str, list[Detection]]]:
        return [self.detect_one(image) for image in images]

    def _objects(self, rgb: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, float]:
        """Object masks, the CIELAB image they were found in, and the scene's background coherence."""
        # Background candidates: pixels far (L1 over RGB) from every palette colour. On a render
        # that is exactly the background (objects are drawn in their exact colours and the
        # background keeps its distance from them); on a generated image it is a robust start.
        signed = rgb.astype(np.int16)
        palette_l1 = np.min([np.abs(signed - np.array(COLORS[c], dtype=np.int16)).sum(axis=-1)
                             for c in PALETTE_NAMES], axis=0)
        candidates = palette_l1 >= self.cfg.background_palette_l1
        if noise_level(rgb, candidates) > self.cfg.denoise_above:
            # A 3x3 median removes speckle (generated images) but would clip the corners of clean
            # renders, so it runs only when the background itself is noisy.
            rgb = ndimage.median_filter(rgb, size=(3, 3, 1))
        lab = rgb_to_lab(rgb)
        background = rgb_to_lab(background_surface(rgb, candidates))
        from_background = np.linalg.norm(lab - background, axis=-1)
        residual = float(np.median(from_background[candidates])) if candidates.any() else np.inf
        ok, worst = self.cfg.background_residual_ok, self.cfg.background_residual_max
        coherence = float(np.clip((worst - residual) / max(worst - ok, 1e-9), 0.0, 1.0))
        palette, from_palette = palette_distances(lab)
        # Foreground: clearly off the local background, and nearer some object colour than to it.
        foreground = (from_background > self.cfg.foreground_delta_e) & (from_palette < from_background)
        min_area = max(self.cfg.min_area_pixels, self.cfg.min_area_fraction * rgb.shape[0] * rgb.shape[1])
        eight = np.ones((3, 3), dtype=bool)
        components, count = ndimage.label(foreground, structure=eight)
        objects = []
        for index, window in enumerate(ndimage.find_objects(components), start=1):
            component = components[window] == index
            area = component.sum()
            if area < min_area or max(component.shape) < self.cfg.min_side_fraction * min(rgb.shape[:2]):
                continue
            # Blended edges between an object and the background (or another object) form thin
            # rings of some third colour; a real object is thick: its inscribed radius is a fair
            # share of the component's.
            depth = ndimage.distance_transform_edt(np.pad(component, 1))[1:-1, 1:-1]
            regions = []
            local_palette = palette[window]
            for color in np.unique(local_palette[component]):
                parts, n_parts = ndimage.label(component & (local_palette == color), structure=eight)
                for part in range(1, n_parts + 1):
                    region = parts == part
                    region_depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1].max()
                    if (region.sum() >= max(min_area, self.cfg.split_fraction * area)
                            and region_depth >= self.cfg.split_depth * depth.max()):
                        regions.append(region)
            for region in (regions if len(regions) > 1 else [component]):
                if not self._solid(region, local_palette, from_palette[window], rgb.shape[0] * rgb.shape[1]):
                    continue
                full = np.zeros(foreground.shape, dtype=bool)
                full[window] = region
                objects.append(full)
        return objects, lab, coherence

    def _solid(self, region: np.ndarray, palette: np.ndarray, from_palette: np.ndarray, image_area: int) -> bool:
        """Whether a region is one object: mostly a single palette colour, and not the whole image."""
        if region.sum() > self.cfg.max_area_fraction * image_area:
            return False
        colors, counts = np.unique(palette[region], return_counts=True)
        dominant = colors[np.argmax(counts)]
        pure = (palette[region] == dominant) & (from_palette[region] < self.cfg.purity_delta_e)
        return pure.mean() >= self.cfg.min_color_purity

    def detect_one(self, image: Image.Image) -> dict[str, list[Detection]]:
        rgb = np.asarray(image.convert("RGB"))
        found: dict[str, list[Detection]] = {name: [] for name in self.classes}
        masks, lab, coherence = self._objects(rgb)
        for mask in masks:
            box = mask_to_box(mask)
            shape, score, _ = classify_shape(shape_features(mask), max(box[2] - box[0], box[3] - box[1]))
            found[shape].append(Detection(box=box, score=score * coherence, mask=mask, color=self._color(lab, mask)))
        for detections in found.values():
            detections.sort(key=lambda d: d.score, reverse=True)
        return found

    @staticmethod
    def _color(lab: np.ndarray, mask: np.ndarray) -> str:
        interior = ndimage.binary_erosion(mask) if mask.sum() >= 25 else mask
        if not interior.any():
            interior = mask
        return PALETTE_NAMES[int(nearest_color(np.median(lab[interior], axis=0)))]

    def classify_color(self, image: Image.Image, class_name: str, detection: Detection) -> str:
        lab = rgb_to_lab(np.asarray(image.convert("RGB")))
        if detection.mask is not None and detection.mask.any():
            return self._color(lab, detection.mask)
        x1, y1, x2, y2 = (int(round(v)) for v in detection.box)
        mask = np.zeros(lab.shape[:2], dtype=bool)
        mask[y1:y2, x1:x2] = True
        return self._color(lab, mask)
