"""minidiff: denoising diffusion from scratch in NumPy/CuPy, every backward written by hand."""

__version__ = "0.1.0"
