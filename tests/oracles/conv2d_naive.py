"""2-D convolution by explicit loops: a test oracle, slow and obviously right (llm.c's matmul_forward_naive).

Same signatures, same validation and the same cache layout as minidiff/nn/conv2d.py's conv2d_forward /
conv2d_backward; tests check that both give the same numbers (tests/nn/test_conv2d.py).

Shape legend: N batch, C_in / C_out channels, H W input size, kh kw kernel size, s stride,
(pt, pb, pl, pr) zero padding, Ho Wo output size.
"""

from __future__ import annotations

from minidiff.backend import get_array_module
from minidiff.nn.conv2d import check_conv2d, check_conv2d_dy


def conv2d_naive_forward(x, w, b=None, stride=1, padding=0):
    """Loop version of conv2d_forward (same signature, same cache layout): one output at a time,

        y[n, o, oh, ow] = b[o] + sum(w[o] * x_pad[n, :, s*oh : s*oh + kh, s*ow : s*ow + kw])
    """
    s, pads, Ho, Wo = check_conv2d(x, w, b, stride, padding)
    xp = get_array_module(x)
    N, C_in, H, W = x.shape
    C_out, _, kh, kw = w.shape
    pt, pb, pl, pr = pads
    x_pad = xp.zeros((N, C_in, H + pt + pb, W + pl + pr), dtype=x.dtype)
    x_pad[:, :, pt:pt + H, pl:pl + W] = x
    y = xp.zeros((N, C_out, Ho, Wo), dtype=x.dtype)
    for n in range(N):
        for o in range(C_out):
            for oh in range(Ho):
                for ow in range(Wo):
                    window = x_pad[n, :, s * oh:s * oh + kh, s * ow:s * ow + kw]  # (C_in, kh, kw)
                    y[n, o, oh, ow] = xp.sum(window * w[o]) + (b[o] if b is not None else 0)
    cache = (
        x,  # (N, C_in, H, W) the input
        w,  # (C_out, C_in, kh, kw) the weight
        b is not None,  # whether there was a bias
        s,  # the stride
        pads,  # (pt, pb, pl, pr) the zero padding
    )
    return y, cache


def conv2d_naive_backward(dy, cache):
    """Loop version of conv2d_backward: each output y[n, o, oh, ow] sends its gradient back

        dw[o]      += dy[n, o, oh, ow] * window,   d(window) += dy[n, o, oh, ow] * w[o],   db[o] += dy[n, o, oh, ow]
    """
    x, w, has_bias, s, pads = cache
    Ho, Wo = check_conv2d_dy(dy, cache)
    xp = get_array_module(dy, x)
    N, C_in, H, W = x.shape
    C_out, _, kh, kw = w.shape
    pt, pb, pl, pr = pads
    x_pad = xp.zeros((N, C_in, H + pt + pb, W + pl + pr), dtype=x.dtype)
    x_pad[:, :, pt:pt + H, pl:pl + W] = x
    dx_pad = xp.zeros_like(x_pad)
    dw = xp.zeros_like(w)
    db = xp.zeros(C_out, dtype=w.dtype) if has_bias else None
    for n in range(N):
        for o in range(C_out):
            for oh in range(Ho):
                for ow in range(Wo):
                    g = dy[n, o, oh, ow]
                    rows, cols = slice(s * oh, s * oh + kh), slice(s * ow, s * ow + kw)
                    dw[o] += g * x_pad[n, :, rows, cols]
                    dx_pad[n, :, rows, cols] += g * w[o]
                    if has_bias:
                        db[o] += g
    dx = dx_pad[:, :, pt:pt + H, pl:pl + W].copy()  # (N, C_in, H, W)
    return dx, dw, db
