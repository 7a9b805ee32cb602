"""Parity metrics used by the tests, ``export.parity`` and the benchmark: relative L2, max abs, cosine, PSNR."""

from __future__ import annotations

import math

import numpy as np


def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_l2(actual, expected) -> float:
    """``||actual - expected|| / ||expected||``"""
    a, b = _f64(actual), _f64(expected)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_abs(actual, expected) -> float:
    a, b = _f64(actual), _f64(expected)
    return float(np.abs(a - b).max())


def cosine(actual, expected) -> float:
    a, b = _f64(actual).ravel(), _f64(expected).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def psnr(actual, expected, peak: float = 255.0) -> float:
    """PSNR in dB of two images (uint8 arrays or PIL images); ``inf`` when identical."""
    a, b = _f64(actual), _f64(expected)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(peak**2 / mse)


def report(actual, expected) -> dict[str, float]:
    """All tensor metrics at once (for logs and parity reports)."""
    return {"rel_l2": rel_l2(actual, expected), "max_abs": max_abs(actual, expected),
            "cosine": cosine(actual, expected)}
