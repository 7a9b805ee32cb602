"""Reference-image validation and CLIP preprocessing (numpy/PIL only, shared by the pipeline and the runtime)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .configs import VisionConfig
from .errors import ImageError

MIN_IMAGE_SIDE = 32
MAX_IMAGE_PIXELS = 8192 * 8192

ImageLike = Image.Image | str | Path


def load_image(image: ImageLike, field: str = "reference") -> Image.Image:
    """Open and fully decode an image (path or PIL), check its size, and return it as 8-bit RGB.

    Greyscale and 16-bit images are converted, RGBA/LA/P with transparency are composited on white.
    Raises :class:`ImageError` naming ``field`` for missing, truncated, non-image, tiny or huge inputs, float
    images with NaN/Inf, and modes that cannot be converted to RGB.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ImageError(f"{field}: image file {path} does not exist or is not a file")
        try:
            with Image.open(path) as im:
                _check_size(im.size, field)
                im.load()
                image = im.copy()
        except Image.DecompressionBombError as e:
            raise ImageError(f"{field}: {path} is too large; at most {MAX_IMAGE_PIXELS} pixels are accepted ({e})"
                             ) from e
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ImageError(f"{field}: {path} is not a readable image ({e})") from e
    elif isinstance(image, Image.Image):
        _check_size(image.size, field)
        try:
            image.load()  # a lazily opened PIL image decodes here: a truncated file fails now, not in the models
        except (OSError, SyntaxError) as e:
            raise ImageError(f"{field}: the image cannot be decoded ({e})") from e
    else:
        raise ImageError(f"{field}: expected a PIL image or a path, got {type(image).__name__}")
    return to_rgb(image, field)


def _check_size(size: tuple[int, int], field: str) -> None:
    w, h = size
    if min(w, h) < MIN_IMAGE_SIDE:
        raise ImageError(f"{field}: image is {w}x{h}; both sides must be at least {MIN_IMAGE_SIDE} px")
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(f"{field}: image is {w}x{h}; at most {MAX_IMAGE_PIXELS} pixels are accepted")


def to_rgb(image: Image.Image, field: str = "reference") -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (16-bit greyscale rescaled, alpha composited on white).

    Float (``F``) images are read as 0..255 and must be finite; :class:`ImageError` names ``field`` otherwise, and
    for modes PIL cannot convert to RGB.
    """
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageError(f"{field}: float image contains NaN or Inf; pixel values must be finite (0..255)")
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    try:
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{field}: image mode {image.mode!r} cannot be converted to RGB ({e}); use an RGB, RGBA, "
                         f"L, LA, P, I;16 or F image") from e


def preprocess_clip(images: list[Image.Image], cfg: VisionConfig) -> np.ndarray:
    """RGB images -> image-encoder pixel values ``[M, 3, S, S]`` float32, normalised: shorter side resized and
    centre-cropped (CLIP), or the whole image resized to ``S x S`` when ``cfg.crop`` is off (SigLIP)."""
    size = cfg.image_size
    mean = np.asarray(cfg.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.image_std, dtype=np.float32)[:, None, None]
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    for i, im in enumerate(images):
        if not cfg.crop:
            im = im.resize((size, size), Image.BICUBIC)
        else:
            w, h = im.size
            r = size / min(w, h)
            nw, nh = max(size, round(w * r)), max(size, round(h * r))
            im = im.resize((nw, nh), Image.BICUBIC)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
        out[i] = (arr - mean) / std
    return out


def image_hash(image: Image.Image) -> str:
    """Content hash of an RGB image (cache key for reference encodings)."""
    h = hashlib.sha256(f"{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def latents_to_pil(images: np.ndarray) -> list[Image.Image]:
    """Decoded images ``[B, 3, H, W]`` in [-1, 1] -> PIL RGB."""
    arr = np.clip((images.transpose(0, 2, 3, 1) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
