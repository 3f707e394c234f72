"""Charts for people, drawn without a plotting library (none is installed where the pipeline runs):
line charts as PNG with PIL (loss curves), grouped bar charts as inline SVG (the gate report's
per-task accuracy), and the one font they share.
"""
from __future__ import annotations

import functools
import html
import math

from PIL import Image, ImageDraw, ImageFont

# Colour-blind-safe (Okabe-Ito): the first series is the one the chart is about.
PALETTE = ((0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0))
AXIS, GRID, TEXT = (90, 90, 90), (228, 228, 228), (34, 34, 34)


@functools.lru_cache(maxsize=8)
def font(size: int = 13) -> ImageFont.ImageFont:
    """PIL's bundled scalable font (no system fonts needed); its bitmap font where FreeType is absent."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def text_width(text: str, size: int = 13) -> float:
    return font(size).getlength(text)


def wrap(text: str, width: float, size: int = 13) -> list[str]:
    """`text` broken at spaces into lines no wider than `width` pixels (a long word stands alone)."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_width(f"{lines[-1]} {word}", size) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if not math.isfinite(low) or not math.isfinite(high):
        return [0.0, 1.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 12))
    return ticks


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 10000:
        return f"{value / 1000:g}k"
    return f"{value:.4g}"


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str = "", x_label: str = "",
               y_label: str = "", size: tuple[int, int] = (900, 480)) -> Image.Image:
    """One line per named series of (x, y) points on shared axes, with ticks, labels and a legend.
    Non-finite y values leave a gap; series without points are listed in the legend only."""
    width, height = size
    left, right, top, bottom = 72, 24, 44 if title else 20, 52
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    points = [(x, y) for pts in series.values() for x, y in pts if math.isfinite(x) and math.isfinite(y)]
    xs, ys = [p[0] for p in points] or [0.0, 1.0], [p[1] for p in points] or [0.0, 1.0]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float, y: float) -> tuple[float, float]:
        return left + (x - x0) / (x1 - x0) * plot_w, top + (1 - (y - y0) / (y1 - y0)) * plot_h

    for y in y_ticks:
        _, py = px(x0, y)
        draw.line([(left, py), (left + plot_w, py)], fill=GRID)
        label = _label(y)
        draw.text((left - 8 - text_width(label, 12), py - 7), label, fill=AXIS, font=font(12))
    for x in x_ticks:
        qx, _ = px(x, y0)
        draw.line([(qx, top), (qx, top + plot_h)], fill=GRID)
        label = _label(x)
        draw.text((qx - text_width(label, 12) / 2, top + plot_h + 6), label, fill=AXIS, font=font(12))
    draw.line([(left, top), (left, top + plot_h), (left + plot_w, top + plot_h)], fill=AXIS, width=1)
    if title:
        draw.text(((width - text_width(title, 16)) / 2, 12), title, fill=TEXT, font=font(16))
    if x_label:
        draw.text((left + (plot_w - text_width(x_label)) / 2, height - 22), x_label, fill=TEXT, font=font(13))
    if y_label:
        label = Image.new("RGBA", (int(text_width(y_label)) + 4, 18), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((2, 1), y_label, fill=TEXT, font=font(13))
        label = label.rotate(90, expand=True)
        image.paste(label, (6, int(top + (plot_h - label.height) / 2)), label)

    legend_x = left + plot_w - 12 - max((text_width(name) for name in series), default=0) - 30
    for i, (name, pts) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        run: list[tuple[float, float]] = []
        for x, y in list(pts) + [(math.nan, math.nan)]:
            if math.isfinite(x) and math.isfinite(y):
                run.append(px(x, y))
                continue
            if len(run) > 1:
                draw.line(run, fill=color, width=2, joint="curve")
            elif run:
                draw.ellipse([run[0][0] - 2, run[0][1] - 2, run[0][0] + 2, run[0][1] + 2], fill=color)
            run = []
        ly = top + 10 + 18 * i
        draw.line([(legend_x, ly + 7), (legend_x + 22, ly + 7)], fill=color, width=3)
        draw.text((legend_x + 28, ly), name, fill=TEXT, font=font(13))
    return image


def bar_chart_svg(categories: list[str], series: list[tuple[str, dict[str, float | None]]], *,
                  title: str = "", height: int = 260, bar: int = 18, percent: bool = True) -> str:
    """A grouped bar chart as inline SVG: a group per category, a bar per series, values in [0, 1]
    (drawn as percentages) on a fixed 0-100% axis so charts of different checkpoints compare by eye.
    Every bar carries data-series / data-category / data-value and a hover title; a missing value is
    drawn as a dash, not as a zero."""
    left, top, bottom, gap = 44, 30 if title else 10, 54, 22
    group = bar * max(1, len(series)) + gap
    width = left + group * len(categories) + 10
    legend_w = sum(24 + text_width(name) + 14 for name, _ in series)
    width = int(max(width, left + legend_w + 10))
    plot_h = height - top - bottom
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="system-ui,sans-serif" font-size="11">']
    if title:
        out.append(f'<text x="{left}" y="18" font-size="13" font-weight="600">{html.escape(title)}</text>')
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        y = top + plot_h * (1 - tick)
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        label = f"{tick:.0%}" if percent else f"{tick:g}"
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#5a5a5a">{label}</text>')
    for c, category in enumerate(categories):
        gx = left + gap / 2 + c * group
        for s, (name, values) in enumerate(series):
            value = values.get(category)
            color = "#%02x%02x%02x" % PALETTE[s % len(PALETTE)]
            x = gx + s * bar
            text = "–" if value is None else (f"{value:.0%}" if percent else f"{value:.2f}")
            if value is None:
                out.append(f'<text x="{x + bar / 2:.1f}" y="{top + plot_h - 3:.1f}" text-anchor="middle" '
                           f'fill="#999">–</text>')
                continue
            h = max(1.0, plot_h * min(max(value, 0.0), 1.0))  # a zero still shows as a line
            y = top + plot_h - h
            hover = html.escape(f"{category} · {name}: {text}", quote=True)
            out.append(f'<rect class="bar" data-series="{html.escape(name, quote=True)}" data-category="{html.escape(category, quote=True)}" '
                       f'data-value="{value:.6g}" x="{x:.1f}" y="{y:.1f}" width="{bar - 2}" height="{h:.1f}" '
                       f'fill="{color}"><title>{hover}</title></rect>')
            out.append(f'<text x="{x + (bar - 2) / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle" font-size="9" '
                       f'fill="#333">{text}</text>')
        out.append(f'<text x="{gx + group / 2 - gap / 2:.1f}" y="{top + plot_h + 15:.1f}" text-anchor="middle">'
                   f'{html.escape(category)}</text>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="#5a5a5a"/>')
    lx = left
    for s, (name, _) in enumerate(series):
        color = "#%02x%02x%02x" % PALETTE[s % len(PALETTE)]
        out.append(f'<rect x="{lx}" y="{height - 20}" width="14" height="12" fill="{color}"/>'
                   f'<text x="{lx + 19}" y="{height - 10}">{html.escape(name)}</text>')
        lx += 24 + text_width(name) + 14
    out.append("</svg>")
    return "".join(out)
