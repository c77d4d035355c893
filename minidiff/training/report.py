"""What a user sees: a progress bar, PNG sample grids with their prompts, a PNG loss curve.

Pillow only (no matplotlib). Shape legend: N images, C channels (1 or 3), H W pixels.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from PIL import Image, ImageDraw

from ..backend import to_numpy


def to_uint8(x) -> np.ndarray:
    """Map model-space images in [-1, 1], (N, C, H, W), to uint8 (N, H, W, C): u = round((x + 1) * 127.5)."""
    x = to_numpy(x).astype(np.float64)
    u = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return u.transpose(0, 2, 3, 1)


def save_grid(images, path, labels=None, ncol: int = 8, scale: int = 0) -> None:
    """Save images (N, C, H, W) in [-1, 1] as one PNG grid, each tile captioned with labels[i].

    Tiles are enlarged by an integer factor (default: to about 64 px) so small images stay readable.
    """
    u = to_uint8(images)
    n, h, w, c = u.shape
    if c == 1:
        u = np.repeat(u, 3, axis=3)
    scale = scale or max(1, 64 // max(h, w))
    th, tw = h * scale, w * scale
    per_line = max(4, tw // 6)  # characters of Pillow's default font that fit on a tile
    lines = [_wrap(str(s), per_line) for s in labels] if labels is not None else None
    label_h = 11 * max(len(ls) for ls in lines) + 1 if lines else 0
    ncol = max(1, min(ncol, n))
    nrow = (n + ncol - 1) // ncol
    pad = 2
    canvas = Image.new("RGB", (ncol * (tw + pad) + pad, nrow * (th + label_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, col = divmod(i, ncol)
        x0, y0 = pad + col * (tw + pad), pad + r * (th + label_h + pad)
        tile = Image.fromarray(u[i]).resize((tw, th), Image.NEAREST)
        canvas.paste(tile, (x0, y0 + label_h))
        for k, line in enumerate(lines[i] if lines else ()):
            draw.text((x0 + 1, y0 + 11 * k), line, fill=(0, 0, 0))
    canvas.save(path, format="PNG")  # path may be an open file (files.write_atomic)


def _wrap(text: str, width: int, max_lines: int = 3) -> list:
    """Split text into at most max_lines lines of at most width characters, at spaces where possible."""
    out, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    out.append(line)
    return [ln[:width] for ln in out[:max_lines]] or [""]


def save_loss_curve(steps, losses, path, width: int = 480, height: int = 240) -> None:
    """Plot loss against step as a PNG on a log axis (raw values in light grey, a running mean of
    len / 50 steps in blue); the axis labels are the losses themselves."""
    steps = np.asarray(steps, np.float64)
    losses = np.asarray(losses, np.float64)
    losses = np.where(losses > 0, losses, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        losses = np.log10(losses)  # plotted as log10(loss); labels below undo it
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    m = 30  # margin for the axis labels
    draw.rectangle([m, 5, width - 5, height - m], outline=(0, 0, 0))
    ok = np.isfinite(losses)
    if ok.sum() >= 2:
        s, l = steps[ok], losses[ok]
        k = max(1, len(l) // 50)
        smooth = np.convolve(l, np.ones(k) / k, mode="valid")
        lo, hi = float(min(l.min(), smooth.min())), float(np.percentile(l, 99))
        hi = hi if hi > lo else lo + 1e-12
        sx = lambda v: m + (v - s[0]) / max(s[-1] - s[0], 1e-12) * (width - 5 - m)  # noqa: E731
        sy = lambda v: height - m - (min(v, hi) - lo) / (hi - lo) * (height - m - 5)  # noqa: E731
        draw.line([(sx(a), sy(b)) for a, b in zip(s, l)], fill=(190, 190, 190))
        draw.line([(sx(a), sy(b)) for a, b in zip(s[k - 1:], smooth)], fill=(30, 80, 200), width=2)
        draw.text((2, 5), f"{10 ** hi:.3g}", fill=(0, 0, 0))
        draw.text((2, height - m - 10), f"{10 ** lo:.3g}", fill=(0, 0, 0))
        draw.text((m, height - m + 4), f"step {int(s[0])}", fill=(0, 0, 0))
        draw.text((width - 80, height - m + 4), f"step {int(s[-1])}", fill=(0, 0, 0))
    draw.text((m + 5, height - 14), "training loss (log axis)", fill=(0, 0, 0))
    img.save(path, format="PNG")  # path may be an open file (files.write_atomic)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    mnt, s = divmod(rem, 60)
    return f"{h}:{mnt:02d}:{s:02d}" if h else f"{mnt}:{s:02d}"


class ProgressBar:
    """A one-line progress bar on stderr: step, loss, images/s and ETA (redrawn at most 10x a second).

    When the stream is not a terminal (a log file, a pipe) there are no \\r frames: one line every
    `every` steps (default: total / 20, at least 1) and one at the last step."""

    def __init__(self, total: int, start: int = 0, width: int = 24, stream=None, unit: str = "img",
                 every: int = 0):
        self.total, self.start, self.width, self.unit = total, start, width, unit
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.every = every or max(1, total // 20)
        self.t0 = time.perf_counter()
        self.last_draw = 0.0
        self.last_line = start
        self.items = 0

    def update(self, step: int, items: int = 0, force: bool = False, **fields) -> None:
        """Record that `step` is done (items processed since the last call) and redraw."""
        self.items += items
        now = time.perf_counter()
        if not self.tty:
            if not force and step < self.total and step - self.last_line < self.every:
                return
            self.last_line = step
        elif not force and now - self.last_draw < 0.1 and step < self.total:
            return
        self.last_draw = now
        elapsed = now - self.t0
        done = step - self.start
        rate = self.items / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) * elapsed / done if done > 0 else 0.0
        frac = step / max(self.total, 1)
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        line = f"step {step}/{self.total} [{bar}] {extra} | {rate:.1f} {self.unit}/s | ETA {_fmt_time(eta)} "
        self.stream.write("\r" + line if self.tty else line.rstrip() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line (a terminal's; other streams end each line already)."""
        self.stream.write("\n" if self.tty else "")
        self.stream.flush()
