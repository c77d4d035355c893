"""The built-in dataset: one colored shape on a plain dark background, drawn on the fly.

Shape legend: N images, S image side (H = W = S), s supersampling factor, K = 3 shapes.

Each image shows a circle, square or upright triangle in red, green or blue, small or large,
at a random position, fully inside the frame. Every shape fits the box [cx-r, cx+r] x [cy-r, cy+r]:

    circle    (u - cx)^2 + (v - cy)^2 <= r^2                          area pi r^2
    square    |u - cx| <= r  and  |v - cy| <= r                      area 4 r^2
    triangle  v <= cy + r  and  |u - cx| <= (v - cy + r) / 2          area 2 r^2  (apex up)

(u, v) are continuous pixel coordinates: pixel (i, j) covers [j, j+1) x [i, i+1). Edges are
anti-aliased by supersampling: the coverage alpha of a pixel is the fraction of its s x s
sub-pixel centres inside the shape, and  image = bg + alpha (fg - bg).

    label   = shape_index * 3 + color_index     (9 classes, CLASS_NAMES[label] = "red circle")
    caption = "red circle", or with probability 1/2 the size word first: "small red circle"

The checker (classify_shape_images) reads pixels only, never a network, and is deterministic:
  1. background bg = median of the border pixels; foreground = pixels farther than 60 from bg
  2. color = the PALETTE entry nearest the mean core-foreground color (None if farther than 100)
  3. soft coverage a = clip((p - bg).(c - bg) / |c - bg|^2, 0, 1) near the foreground
  4. for each shape, the template T with the same area and centroid as a is rendered (sharp, and
     softened by a [1,2,1]/4 or [1,1,1]/3 blur, as samples are often soft); the shape whose
     template has the highest soft IoU  sum(min(a, T)) / sum(max(a, T))  wins (None if < 0.5).
The area/centroid fit uses  A = pi r^2 | 4 r^2 | 2 r^2,  centroid (cx, cy) | (cx, cy) | (cx, cy + r/3).
"""

from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue")
SIZE_WORDS = ("small", "large")
CLASS_NAMES = tuple(f"{c} {s}" for s in SHAPES for c in COLORS)  # label = shape * 3 + color
NUM_CLASSES = len(CLASS_NAMES)
ALL_CAPTIONS = tuple(f"{z}{c} {s}" for s in SHAPES for c in COLORS for z in ("", "small ", "large "))

PALETTE = np.array([[220, 50, 50], [50, 200, 50], [50, 70, 230]], np.float64)  # (3 colors, RGB)
BACKGROUND = np.array([24, 24, 28], np.float64)  # dark gray-blue, RGB
FG_JITTER = 20.0  # fg = PALETTE[c] + U(-20, 20) per channel
BG_JITTER = 6.0  # bg = BACKGROUND + U(-6, 6) per channel
RADIUS_FRAC = ((0.17, 0.22), (0.28, 0.37))  # r / S for small, large
MARGIN = 1.0  # pixels kept free between the shape's box and the frame
SUPERSAMPLE = 4

FG_THRESHOLD = 60.0  # |p - bg| (0..255 units) above which a pixel is foreground
COLOR_TOL = 100.0  # farthest a mean color may be from its palette entry
IOU_MIN = 0.5  # lowest template IoU that still names a shape
MIN_AREA = 3.0  # fewer foreground pixels than this: no shape
BLUR_121, BLUR_BOX = (0.25, 0.5, 0.25), (1 / 3, 1 / 3, 1 / 3)  # template softenings tried


def check_size(size) -> int:
    """Raise ValueError unless size is an int >= 16 (the checker is tested at 16 and 32)."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 16:
        raise ValueError(f"size must be an integer >= 16 (16 and 32 are the tested sizes), got {size!r}")
    return int(size)


def render_coverage(kind, cx, cy, r, size: int, ss: int = SUPERSAMPLE) -> np.ndarray:
    """alpha[n, i, j] = fraction of pixel (i, j)'s ss x ss sub-pixel centres inside shape n.

    kind (N,) int shape index, cx cy r (N,) float pixel units, returns (N, S, S) float32 in [0, 1].
    """
    kind, cx, cy, r = (np.asarray(a) for a in (kind, cx, cy, r))
    if not 1 <= ss <= 15:
        raise ValueError(f"ss must be an integer in [1, 15] (uint8 sub-pixel counts), got {ss}")
    n = kind.shape[0]
    sub = (np.arange(size * ss) + 0.5) / ss  # (S*s,) sub-pixel centre coordinates
    inside = np.zeros((n, size * ss, size * ss), bool)  # (N, S*s, S*s)
    for k in range(len(SHAPES)):
        sel = np.flatnonzero(kind == k)
        if sel.size == 0:
            continue
        du = sub[None, None, :] - cx[sel, None, None]  # (n_k, 1, S*s) u - cx
        dv = sub[None, :, None] - cy[sel, None, None]  # (n_k, S*s, 1) v - cy
        rr = r[sel, None, None]
        if k == 0:  # circle
            inside[sel] = du * du + dv * dv <= rr * rr
        elif k == 1:  # square
            inside[sel] = (np.abs(du) <= rr) & (np.abs(dv) <= rr)
        else:  # triangle, apex (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r)
            inside[sel] = (dv <= rr) & (np.abs(du) <= (dv + rr) / 2)
    sub_px = inside.view(np.uint8).reshape(n, size, ss, size, ss)  # (N, S, s, S, s)
    rows = sum(sub_px[:, :, i] for i in range(ss))  # (N, S, S, s) uint8; slice sums beat .sum(axis)
    cover = sum(rows[..., j] for j in range(ss))  # (N, S, S) uint8, at most s*s <= 255
    return cover.astype(np.float32) / np.float32(ss * ss)  # (N, S, S)


def sample_shapes(rng: np.random.Generator, n: int, size: int = 16) -> dict:
    """Draw n fresh images from rng (vectorized; ~4 ms for 64 images at 16x16, ~10 ms at 32x32).

    Returns dict(images uint8 (N, S, S, 3), labels int64 (N,), captions list[str],
    shape (N,), color (N,), large (N,) bool, cx cy r (N,) float64 pixel units).
    """
    size = check_size(size)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    shape = rng.integers(0, len(SHAPES), n)  # (N,)
    color = rng.integers(0, len(COLORS), n)  # (N,)
    large = rng.random(n) < 0.5  # (N,)
    lo = np.where(large, RADIUS_FRAC[1][0], RADIUS_FRAC[0][0]) * size
    hi = np.where(large, RADIUS_FRAC[1][1], RADIUS_FRAC[0][1]) * size
    r = lo + (hi - lo) * rng.random(n)  # (N,)
    cx = r + MARGIN + (size - 2 * (r + MARGIN)) * rng.random(n)  # box inside the frame
    cy = r + MARGIN + (size - 2 * (r + MARGIN)) * rng.random(n)
    fg = PALETTE[color] + rng.uniform(-FG_JITTER, FG_JITTER, (n, 3))  # (N, 3)
    bg = BACKGROUND + rng.uniform(-BG_JITTER, BG_JITTER, (n, 3))  # (N, 3)
    say_size = rng.random(n) < 0.5  # (N,) caption includes the size word
    alpha = render_coverage(shape, cx, cy, r, size)[..., None]  # (N, S, S, 1)
    img = bg[:, None, None, :] + alpha * (fg - bg)[:, None, None, :]  # image = bg + alpha (fg - bg)
    images = np.clip(np.rint(img), 0, 255).astype(np.uint8)  # (N, S, S, 3)
    labels = (shape * len(COLORS) + color).astype(np.int64)
    captions = [
        (SIZE_WORDS[int(z)] + " " if s else "") + CLASS_NAMES[lab]
        for lab, z, s in zip(labels.tolist(), large, say_size)
    ]
    return dict(images=images, labels=labels, captions=captions, shape=shape, color=color,
                large=large, cx=cx, cy=cy, r=r)


def make_shapes(n: int, size: int = 16, seed: int = 0) -> dict:
    """A fixed set of n images, deterministic from seed: dict(images, labels, captions) as sample_shapes."""
    out = sample_shapes(np.random.default_rng(seed), n, size)
    return {k: out[k] for k in ("images", "labels", "captions")}


# ----------------------------------------------------------------------------- the checker


def to_hwc255(images) -> np.ndarray:
    """Bring images to float64 (N, H, W, 3) in 0..255.

    Accepts one image or a batch, channels last (..., H, W, 3) or first (..., 3, H, W);
    uint8 as is, floats as the model's [-1, 1] range: p = (x + 1) * 127.5.
    """
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or 3 not in (x.shape[-1], x.shape[1]):
        raise ValueError(f"images must be RGB (N, H, W, 3) or (N, 3, H, W), got shape {x.shape}")
    if x.shape[-1] != 3:
        x = x.transpose(0, 2, 3, 1)  # (N, 3, H, W) -> (N, H, W, 3)
    if x.dtype == np.uint8:
        return x.astype(np.float64)
    if np.issubdtype(x.dtype, np.floating):
        return (x.astype(np.float64) + 1.0) * 127.5
    raise ValueError(f"images must be uint8 (0..255) or float ([-1, 1]), got dtype {x.dtype}")


def _dilate(mask):
    """3 x 3 binary dilation of (N, H, W) bool masks."""
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    h, w = mask.shape[1:]
    out = np.zeros_like(mask)
    for di in range(3):
        for dj in range(3):
            out |= p[:, di:di + h, dj:dj + w]
    return out


def _blur(t, k):
    """Separable blur of (N, H, W) with the 1-D kernel k (length 3), zero padding (dark border)."""
    p = np.pad(t, ((0, 0), (1, 1), (1, 1)))
    rows = k[0] * p[:, :-2] + k[1] * p[:, 1:-1] + k[2] * p[:, 2:]  # (N, H, W + 2)
    return k[0] * rows[:, :, :-2] + k[1] * rows[:, :, 1:-1] + k[2] * rows[:, :, 2:]


def _classify_chunk(p):
    """p (N, H, W, 3) float 0..255 -> (shape idx (N,), color idx (N,)), -1 meaning None."""
    n, h = p.shape[:2]  # square images, H = W = h
    border = np.concatenate([p[:, 0], p[:, -1], p[:, 1:-1, 0], p[:, 1:-1, -1]], axis=1)
    bg = np.median(border, axis=1)  # (N, 3)
    diff = p - bg[:, None, None, :]  # (N, H, W, 3) p - bg
    fg = np.linalg.norm(diff, axis=-1) > FG_THRESHOLD  # (N, H, W)
    cnt = fg.sum((1, 2))  # (N,)
    c0 = (diff * fg[..., None]).sum((1, 2)) / np.maximum(cnt, 1)[:, None]  # (N, 3) mean fg - bg
    proj0 = (diff * c0[:, None, None, :]).sum(-1) / np.maximum((c0 * c0).sum(-1), 1e-9)[:, None, None]
    core = fg & (proj0 > 0.75)  # (N, H, W) fully covered pixels
    ccnt = core.sum((1, 2))
    c = np.where((ccnt > 0)[:, None], (diff * core[..., None]).sum((1, 2)) / np.maximum(ccnt, 1)[:, None], c0)
    dist = np.linalg.norm((c + bg)[:, None, :] - PALETTE[None], axis=-1)  # (N, 3 colors)
    color = np.where((cnt > 0) & (dist.min(1) <= COLOR_TOL), dist.argmin(1), -1)
    cc = np.maximum((c * c).sum(-1), 1e-9)[:, None, None]
    a = np.clip((diff * c[:, None, None, :]).sum(-1) / cc, 0.0, 1.0) * _dilate(fg)  # (N, H, W)
    area = a.sum((1, 2))  # (N,)
    coords = np.arange(h) + 0.5
    my = (a.sum(2) * coords).sum(1) / np.maximum(area, 1e-9)  # centroid row
    mx = (a.sum(1) * coords).sum(1) / np.maximum(area, 1e-9)  # centroid column
    ious = np.empty((len(SHAPES), n))
    for k, (area_per_r2, dy) in enumerate(((np.pi, 0.0), (4.0, 0.0), (2.0, 1.0 / 3.0))):
        r = np.sqrt(area / area_per_r2)  # A = area_per_r2 r^2
        t = render_coverage(np.full(n, k), mx, my - dy * r, r, h)  # (N, H, W) template
        for tb in (t, _blur(t, BLUR_121), _blur(t, BLUR_BOX)):  # sharp, or as soft as a sample
            iou = np.minimum(a, tb).sum((1, 2)) / np.maximum(np.maximum(a, tb).sum((1, 2)), 1e-9)
            ious[k] = iou if tb is t else np.maximum(ious[k], iou)
    shape = np.where((area >= MIN_AREA) & (ious.max(0) >= IOU_MIN), ious.argmax(0), -1)
    return shape, color


def classify_shape_images(images, chunk: int = 256) -> list[tuple[str | None, str | None]]:
    """(shape_name or None, color_name or None) for each image; see the module docstring."""
    p = to_hwc255(images)
    if p.shape[1] != p.shape[2] or p.shape[1] < 4:
        raise ValueError(f"images must be square and at least 4x4 pixels, got {p.shape[1]}x{p.shape[2]}")
    out = []
    for i in range(0, p.shape[0], chunk):
        shape, color = _classify_chunk(p[i:i + chunk])
        out += [(SHAPES[s] if s >= 0 else None, COLORS[c] if c >= 0 else None)
                for s, c in zip(shape.tolist(), color.tolist())]
    return out


def classify_shape_image(img) -> tuple[str | None, str | None]:
    """(shape_name or None, color_name or None) of one image (H, W, 3) uint8 or (3, H, W) float."""
    if np.ndim(img) != 3:
        raise ValueError(f"img must be one image (H, W, 3) or (3, H, W), got shape {np.shape(img)}")
    return classify_shape_images(img)[0]


def parse_prompt(prompt) -> tuple[str, str]:
    """(shape, color) named by a prompt such as "small red circle", or by a class id (int)."""
    if isinstance(prompt, (int, np.integer)) and not isinstance(prompt, bool):
        if not 0 <= prompt < NUM_CLASSES:
            raise ValueError(f"class id must lie in [0, {NUM_CLASSES}), got {prompt}")
        prompt = CLASS_NAMES[prompt]
    words = str(prompt).lower().split()
    shapes = [w for w in words if w in SHAPES]
    colors = [w for w in words if w in COLORS]
    if len(shapes) != 1 or len(colors) != 1:
        raise ValueError(f"prompt {prompt!r} must name exactly one shape {SHAPES} and one color {COLORS}")
    return shapes[0], colors[0]


def prompt_accuracy(images, prompts) -> float:
    """Fraction of images whose checked (shape, color) both match their prompt's words.

    images (N, H, W, 3) uint8 or (N, 3, H, W) float in [-1, 1]; prompts N strings or class ids.
    """
    wanted = [parse_prompt(p) for p in prompts]
    got = classify_shape_images(images)
    if len(got) != len(wanted):
        raise ValueError(f"prompts must have one entry per image: {len(wanted)} prompts, {len(got)} images")
    if not wanted:
        raise ValueError("images must hold at least one image")
    return sum(g == w for g, w in zip(got, wanted)) / len(wanted)
