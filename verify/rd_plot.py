"""A small rate-distortion plot drawn with Pillow (matplotlib is not a dependency).

:func:`draw` writes one PNG with a panel per metric (e.g. PSNR and MS-SSIM in dB against bpp): axes,
ticks with labels, each series as a line through its points with its own marker and colour, and a
legend.  Points are sorted by bpp; a series with no finite point is left out of its panel.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

PANEL_W, PANEL_H = 460, 360
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 62, 16, 30, 46
#: (colour, marker) per series, in order
STYLES = (((31, 119, 180), "circle"), ((214, 39, 40), "square"), ((44, 160, 44), "triangle"))

Series = tuple[str, Sequence[tuple[float, float]]]  # label, (x, y) points


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    ticks, value = [], first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(value, 12))
    return ticks


def _label(value: float, ticks: list[float]) -> str:
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step))) if step > 0 else 0
    return f"{value:.{min(decimals, 6)}f}"


def _marker(draw: ImageDraw.ImageDraw, kind: str, x: float, y: float, colour, r: int = 5) -> None:
    if kind == "circle":
        r += 2  # hollow and larger: a point of another series under it stays visible
        draw.ellipse((x - r, y - r, x + r, y + r), outline=colour, width=2)
    elif kind == "square":
        draw.rectangle((x - r + 1, y - r + 1, x + r - 1, y + r - 1), fill=colour)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)


def _panel(draw: ImageDraw.ImageDraw, font, left: int, title: str, xlabel: str, ylabel: str,
           series: Sequence[Series]) -> None:
    x0, y0 = left + MARGIN_L, MARGIN_T
    x1, y1 = left + PANEL_W - MARGIN_R, PANEL_H - MARGIN_B
    pts = [(x, y) for _, points in series for x, y in points if math.isfinite(x) and math.isfinite(y)]
    draw.text((left + PANEL_W // 2, 8), title, fill="black", font=font, anchor="mt")
    draw.rectangle((x0, y0, x1, y1), outline="black")
    draw.text(((x0 + x1) // 2, PANEL_H - 14), xlabel, fill="black", font=font, anchor="mm")
    draw.text((x0, y0 - 4), ylabel, fill="black", font=font, anchor="lb")
    if not pts:
        draw.text(((x0 + x1) // 2, (y0 + y1) // 2), "no data", fill="gray", font=font, anchor="mm")
        return
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    pad = 0.05 * (max(ys) - min(ys))  # no point on the frame
    xt, yt = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys) - pad, max(ys) + pad)
    xlo, xhi, ylo, yhi = xt[0], xt[-1], yt[0], yt[-1]

    def px(x: float) -> float:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

    def py(y: float) -> float:
        return y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    for t in xt:
        draw.line((px(t), y1, px(t), y1 + 4), fill="black")
        draw.line((px(t), y0, px(t), y1), fill=(230, 230, 230))
        draw.text((px(t), y1 + 6), _label(t, xt), fill="black", font=font, anchor="mt")
    for t in yt:
        draw.line((x0 - 4, py(t), x0, py(t)), fill="black")
        draw.line((x0, py(t), x1, py(t)), fill=(230, 230, 230))
        draw.text((x0 - 6, py(t)), _label(t, yt), fill="black", font=font, anchor="rm")
    draw.rectangle((x0, y0, x1, y1), outline="black")
    for (label, points), (colour, kind) in reversed(list(zip(series, STYLES))):  # the first on top
        ok = sorted((x, y) for x, y in points if math.isfinite(x) and math.isfinite(y))
        if len(ok) > 1:
            draw.line([(px(x), py(y)) for x, y in ok], fill=colour, width=2)
        for x, y in ok:
            _marker(draw, kind, px(x), py(y), colour)
    # legend inside the axes, in the corner whose box covers the fewest points (bottom right first)
    width, height = max(int(draw.textlength(label, font=font)) for label, _ in series) + 34, 16 * len(series)
    corners = [(x1 - width - 6, y1 - height - 6), (x0 + 10, y1 - height - 6), (x0 + 10, y0 + 10),
               (x1 - width - 6, y0 + 10)]
    lx, ly = min(corners, key=lambda c: sum(c[0] - 12 <= px(x) <= c[0] + width + 8 and c[1] - 12 <= py(y) <= c[1] + height + 8
                                            for x, y in pts))
    draw.rectangle((lx - 4, ly - 4, lx + width, ly + 16 * len(series)), fill="white", outline=(160, 160, 160))
    for i, ((label, _), (colour, kind)) in enumerate(zip(series, STYLES)):
        cy = ly + 6 + 16 * i
        draw.line((lx, cy, lx + 20, cy), fill=colour, width=2)
        _marker(draw, kind, lx + 10, cy, colour, r=4)
        draw.text((lx + 26, cy), label, fill="black", font=font, anchor="lm")


def draw(path: Path, panels: Sequence[tuple[str, str, str, Sequence[Series]]]) -> Path:
    """Write a PNG with one panel per ``(title, x label, y label, series)``, side by side (atomically)."""
    from lic_checkpoints.convert.writer import atomic_path

    image = Image.new("RGB", (PANEL_W * len(panels), PANEL_H), "white")
    canvas = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for i, (title, xlabel, ylabel, series) in enumerate(panels):
        _panel(canvas, font, i * PANEL_W, title, xlabel, ylabel, series)
    with atomic_path(Path(path)) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
