"""Every bad request to the PyTorch reference pipeline fails with an explicit error type and a message naming the
field and the allowed range; the unusual-but-valid inputs next to each limit are accepted.

Failures are checked through :class:`DynaIPPipeline`; the validation (:mod:`dynaip_trt.request`) is the one every
runtime backend runs too, so these checks hold for the engines as well.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import dynaip_trt.images as images_mod
from dynaip_trt.errors import ConfigError, DynaIPError, ImageError, InputError, SubjectLimitError
from dynaip_trt.images import load_image, preprocess_clip
from dynaip_trt.pipeline import DynaIPPipeline
from dynaip_trt.request import TextBranchSchedule, normalize_granularity, normalize_masks

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def pipe(tiny_models) -> DynaIPPipeline:
    return DynaIPPipeline(tiny_models)


@pytest.fixture()
def ref_image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))


def generate(pipe: DynaIPPipeline, references, **kw) -> torch.Tensor:
    """One cheap request (1 step, latents out) with overridable arguments."""
    args = dict(prompt="a photo", references=references, steps=1, output_type="latent", progress=False)
    args.update(kw)
    return pipe(**args)


def png_bytes(width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    """A noise PNG (incompressible, so cutting the file loses pixel data)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` but which holds no pixel data (nothing large is allocated)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def test_error_hierarchy():
    """One ``except DynaIPError`` catches all of them; input errors stay ``ValueError`` for existing handlers."""
    assert issubclass(ImageError, InputError) and issubclass(SubjectLimitError, InputError)
    assert issubclass(InputError, ValueError) and issubclass(InputError, DynaIPError)
    assert issubclass(ConfigError, DynaIPError)


# ------------------------------------------------------------------------------------------------------- images
def _palette_with_transparency() -> Image.Image:
    im = Image.new("P", (40, 40), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    im.paste(1, (0, 0, 20, 40))  # left half: opaque red (index 1); right half: index 0, transparent
    im.info["transparency"] = 0
    return im


ODD_MODES = {
    "L": lambda: Image.new("L", (40, 40), 100),
    "RGBA": lambda: Image.new("RGBA", (40, 40), (255, 0, 0, 0)),
    "P+transparency": _palette_with_transparency,
    "I;16": lambda: Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16)),
}


@pytest.mark.parametrize("mode", sorted(ODD_MODES))
def test_non_rgb_modes_are_accepted_and_converted(mode, tiny_cfg):
    src = ODD_MODES[mode]()
    assert src.mode == mode.split("+")[0]
    rgb = load_image(src)
    assert rgb.mode == "RGB" and rgb.size == src.size
    pixels = preprocess_clip([rgb], tiny_cfg.vision)
    size = tiny_cfg.vision.image_size
    assert pixels.shape == (1, 3, size, size) and pixels.dtype == np.float32 and np.isfinite(pixels).all()


def test_converted_pixel_values():
    """L is replicated, 16-bit is rescaled to 8-bit, alpha (RGBA, transparent palette) is composited on white."""
    assert load_image(ODD_MODES["L"]()).getpixel((5, 5)) == (100, 100, 100)
    assert load_image(ODD_MODES["I;16"]()).getpixel((5, 5)) == (255, 255, 255)
    mid16 = load_image(Image.fromarray(np.full((40, 40), 32896, dtype=np.uint16)))  # 32896 / 65535 * 255 = 128.0
    assert mid16.getpixel((5, 5)) == (128, 128, 128)
    assert load_image(ODD_MODES["RGBA"]()).getpixel((5, 5)) == (255, 255, 255)  # fully transparent red -> white
    half = np.asarray(load_image(Image.new("RGBA", (40, 40), (0, 0, 0, 128))), dtype=np.int32)
    assert np.abs(half - 127).max() <= 1  # black at alpha 128/255 over white
    pal = load_image(_palette_with_transparency())
    assert pal.getpixel((5, 5)) == (255, 0, 0) and pal.getpixel((35, 5)) == (255, 255, 255)


def test_odd_modes_through_the_pipeline(pipe):
    """All four odd modes as four subjects of one request encode to finite reference K/V."""
    ref = pipe.encode_references([ODD_MODES[m]() for m in sorted(ODD_MODES)])
    assert ref.num_subjects == 4 and torch.isfinite(ref.img_k).all() and torch.isfinite(ref.img_v).all()


@pytest.mark.parametrize("size", [(31, 64), (64, 31), (8, 8)])
def test_tiny_image(pipe, size):
    with pytest.raises(ImageError, match=rf"references\[0\]: image is {size[0]}x{size[1]}; both sides must be at "
                                         r"least 32 px"):
        generate(pipe, [Image.new("RGB", size)])
    load_image(Image.new("RGB", (32, 32)))  # the limit itself is accepted


def test_huge_image_file_header(tmp_path):
    """A 9000x8000 PNG is refused from its header alone, before any pixel is decoded."""
    path = png_header_only(tmp_path / "huge.png", 9000, 8000)
    with Image.open(path) as im:
        assert im.size == (9000, 8000)
    with pytest.raises(ImageError, match=r"references\[1\]: image is 9000x8000; at most 67108864 pixels"):
        load_image(path, field="references[1]")


def test_decompression_bomb_header(tmp_path):
    """Beyond PIL's own bomb limit the message still names our pixel limit."""
    path = png_header_only(tmp_path / "bomb.png", 20000, 20000)
    with pytest.raises(ImageError, match=r"reference: .*bomb.png is too large; at most 67108864 pixels"):
        load_image(str(path))


def test_huge_pil_image(pipe, ref_image, monkeypatch):
    monkeypatch.setattr(images_mod, "MAX_IMAGE_PIXELS", 40 * 40)
    with pytest.raises(ImageError, match=r"references\[0\]: image is 48x40; at most 1600 pixels are accepted"):
        generate(pipe, [ref_image])
    load_image(Image.new("RGB", (40, 40)))  # exactly at the limit


def test_truncated_png(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    data = png_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(ImageError, match=r"references\[0\]: .*cut.png is not a readable image"):
        generate(pipe, [str(path)])
    lazy = Image.open(path)  # header fine, pixels missing: must fail as ImageError, not OSError inside the models
    with pytest.raises(ImageError, match=r"references\[0\]: the image cannot be decoded"):
        generate(pipe, [lazy])
    full = tmp_path / "full.png"
    full.write_bytes(data)
    assert load_image(full).size == (64, 64)


@pytest.mark.parametrize("content", [b"this is not an image\n", b""], ids=["text", "empty"])
def test_non_image_file(pipe, tmp_path, content):
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=r"references\[0\]: .*notes.png is not a readable image"):
        generate(pipe, [path])


def test_missing_path_and_directory(pipe, tmp_path):
    with pytest.raises(ImageError, match=r"references\[0\]: image file .*nope.png does not exist"):
        generate(pipe, [str(tmp_path / "nope.png")])
    with pytest.raises(ImageError, match=r"references\[0\]: image file .* is not a file"):
        generate(pipe, [tmp_path])


@pytest.mark.parametrize("bad", [5, 2.5, b"\x89PNG", np.zeros((40, 40, 3), np.uint8)],
                         ids=["int", "float", "bytes", "ndarray"])
def test_wrong_image_type(pipe, bad):
    with pytest.raises(ImageError, match=rf"references\[0\]: expected a PIL image or a path, got {type(bad).__name__}"):
        generate(pipe, [bad])
    with pytest.raises(ImageError, match=r"references\[1\]: expected a PIL image"):  # a view of a subject
        generate(pipe, [Image.new("RGB", (40, 40)), [Image.new("RGB", (40, 40)), bad]])


@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_float_image_with_nan(pipe, value):
    arr = np.full((40, 40), 10.0, dtype=np.float32)
    arr[3, 7] = value
    with pytest.raises(ImageError, match=r"references\[0\]: float image contains NaN or Inf; pixel values must be "
                                         r"finite"):
        generate(pipe, [Image.fromarray(arr, mode="F")])
    assert load_image(Image.fromarray(np.full((40, 40), 10.0, dtype=np.float32), mode="F")).getpixel((0, 0)) == (
        10, 10, 10)


def test_unconvertible_mode():
    with pytest.raises(ImageError, match=r"references\[2\]: image mode 'La' cannot be converted to RGB"):
        load_image(Image.new("La", (40, 40)), field="references[2]")


# ------------------------------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_empty_prompt(pipe, ref_image, prompt):
    with pytest.raises(InputError, match="prompt is empty; give at least one non-space character"):
        generate(pipe, [ref_image], prompt=prompt)


@pytest.mark.parametrize("prompt", [5, None, b"a photo", {"text": "a"}])
def test_non_str_prompt(pipe, ref_image, prompt):
    with pytest.raises(InputError, match="prompt must be a str or a non-empty list of str"):
        generate(pipe, [ref_image], prompt=prompt)


def test_non_str_prompt_in_list(pipe, ref_image):
    with pytest.raises(InputError, match=r"prompt\[1\] must be a str, got int"):
        generate(pipe, [ref_image], prompt=["a photo", 7])
    with pytest.raises(InputError, match=r"prompt\[0\] is empty"):
        generate(pipe, [ref_image], prompt=[" ", "a photo"])


def test_empty_prompt_list(pipe, ref_image):
    with pytest.raises(InputError, match=r"prompt must be a str or a non-empty list of str, got \[\]"):
        generate(pipe, [ref_image], prompt=[])


def test_prompt_longer_than_text_length_is_truncated_with_a_warning(pipe, ref_image, tiny_cfg, caplog):
    """As diffusers does: tokens beyond the text length are dropped and the warning names them; truncate_prompt=False
    refuses instead. An ordinary prompt fits the default text length (77 tokens)."""
    limit = tiny_cfg.text.max_text_length
    assert limit >= 77
    ordinary = "two friends playing with toys on a sunny beach"
    with caplog.at_level("WARNING", logger="dynaip_trt.text"):
        generate(pipe, [ref_image], prompt=ordinary)
    assert not caplog.records
    fits = "a" * (limit - 1)  # bytes + EOS = limit tokens: fits exactly
    long = fits + " and a long tail"
    with caplog.at_level("WARNING", logger="dynaip_trt.text"):
        out = generate(pipe, [ref_image], prompt=long)
    assert "prompt is longer than the text length of 77 tokens: 'and a long tail' was dropped" in caplog.text
    assert torch.equal(out, generate(pipe, [ref_image], prompt=fits + "a")), "the kept tokens are the same"
    with pytest.raises(InputError, match=r"prompt is longer than the text length of 77 tokens; it would lose "
                                         r"'and a long tail'"):
        generate(pipe, [ref_image], prompt=long, truncate_prompt=False)
    with pytest.raises(InputError, match=r"prompt\[1\] is longer than the text length"):
        generate(pipe, [ref_image], prompt=["short", "é" * 40], truncate_prompt=False)  # 2 UTF-8 bytes each


def test_prompt_that_is_not_unicode(pipe, ref_image):
    with pytest.raises(InputError, match="prompt is not valid Unicode text"):
        generate(pipe, [ref_image], prompt="a \ud800 photo")


def test_bad_prompt_fails_before_any_model_runs(pipe, ref_image, monkeypatch):
    def fail(*_):
        raise AssertionError("CLIP ran for a request with an invalid prompt")

    monkeypatch.setattr(pipe, "_encode_subjects", fail)
    with pytest.raises(InputError, match="would lose"):
        generate(pipe, [Image.new("RGB", (40, 40), (1, 2, 3))], prompt="b" * 80, truncate_prompt=False)


# ----------------------------------------------------------------------------------------------------- subjects
def test_zero_subjects(pipe):
    with pytest.raises(SubjectLimitError, match=r"references: 0 subjects given; this engine allows 1\.\.4 subjects"):
        generate(pipe, [])


def test_too_many_subjects(pipe, make_images):
    with pytest.raises(SubjectLimitError, match=r"references: 5 subjects given; this engine allows 1\.\.4 subjects"):
        generate(pipe, make_images(5))
    assert pipe.encode_references(make_images(4)).num_subjects == 4  # the limit itself


def test_encoded_references_beyond_the_engine_limit(tiny_models, pipe, make_images):
    """A :class:`ReferenceKV` encoded elsewhere with more subjects than this engine allows is refused too."""
    import dataclasses

    small = DynaIPPipeline(dataclasses.replace(tiny_models, config=dataclasses.replace(tiny_models.config,
                                                                                       max_subjects=2)))
    three = pipe.encode_references(make_images(3))
    with pytest.raises(SubjectLimitError, match=r"3 subjects given; this engine allows 1\.\.2 subjects"):
        generate(small, three)


def test_empty_subject(pipe, ref_image):
    with pytest.raises(InputError, match=r"references\[1\]: empty list; give at least one image per subject"):
        generate(pipe, [ref_image, []])


@pytest.mark.parametrize("bad", ["ref.png", Path("ref.png"), None, 3, "image"], ids=["str", "path", "none", "int",
                                                                                   "pil"])
def test_references_not_a_list(pipe, ref_image, bad):
    bad = ref_image if bad == "image" else bad
    with pytest.raises(InputError, match=r"references must be a list with one image \(or list of images\) per "
                                         rf"subject, got {type(bad).__name__}"):
        generate(pipe, bad)


# ------------------------------------------------------------------------------------------------------- scales
@pytest.mark.parametrize("scales", [NAN, INF, -0.5, 10.5, [1.0, NAN], [1.0, -INF]])
def test_bad_scale_values(pipe, make_images, scales):
    with pytest.raises(InputError, match=r"scales=.* must be finite numbers in \[0, 10\]"):
        generate(pipe, make_images(2), scales=scales)


@pytest.mark.parametrize("scales", [[1.0], [1.0, 1.0, 1.0], [[1.0, 1.0]]])
def test_wrong_scale_count(pipe, make_images, scales):
    with pytest.raises(InputError, match=r"scales has shape .*; expected one number or 2 numbers \(one per subject\)"):
        generate(pipe, make_images(2), scales=scales)


@pytest.mark.parametrize("scales", [None, "1.0", ["a", "b"]])
def test_non_numeric_scales(pipe, make_images, scales):
    with pytest.raises(InputError, match="scales must be numbers"):
        generate(pipe, make_images(2), scales=scales)


def test_scale_forms_accepted(pipe, make_images):
    """A Python number, a numpy scalar and one value per subject (list or array) give the same request."""
    outs = [generate(pipe, make_images(2), scales=s) for s in (0.5, np.float32(0.5), [0.5, 0.5], np.full(2, 0.5))]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert not torch.equal(outs[0], generate(pipe, make_images(2), scales=[0.5, 0.0]))


# -------------------------------------------------------------------------------------------------- granularity
@pytest.mark.parametrize("granularity", [[NAN, 1, 1], [1, INF, 1], [[1, 1, 1], [1, -INF, 1]]])
def test_granularity_not_finite(pipe, make_images, granularity):
    with pytest.raises(InputError, match=r"granularity=.*: level weights must be finite and >= 0, with a positive sum"):
        generate(pipe, make_images(2), granularity=granularity)


@pytest.mark.parametrize("granularity", [[1, 1], [1, 1, 1, 1], [[1, 1, 1]] * 3, 0.5, [[[1, 1, 1]] * 2]])
def test_granularity_wrong_shape(pipe, make_images, granularity):
    with pytest.raises(InputError, match=r"granularity has shape .*; expected \(3,\) or \(2, 3\) level weights"):
        generate(pipe, make_images(2), granularity=granularity)


@pytest.mark.parametrize("granularity", [[0, 0, 0], [[1, 0, 0], [0, 0, 0]]], ids=["all", "one-subject"])
def test_granularity_all_zero(pipe, make_images, granularity):
    with pytest.raises(InputError, match="with a positive sum for every subject"):
        generate(pipe, make_images(2), granularity=granularity)


def test_granularity_negative(pipe, make_images):
    with pytest.raises(InputError, match=r"granularity=\[\[1\.0, -0\.5, 1\.0\].*must be finite and >= 0"):
        generate(pipe, make_images(2), granularity=[1, -0.5, 1])


@pytest.mark.parametrize("granularity", [["a", "b", "c"], [[1, 2, 3], [1, 2]]], ids=["text", "ragged"])
def test_granularity_not_numbers(pipe, make_images, granularity):
    with pytest.raises(InputError, match="granularity must be numbers"):
        generate(pipe, make_images(2), granularity=granularity)


# -------------------------------------------------------------------------------------------------------- masks
def test_wrong_mask_count(pipe, make_images):
    with pytest.raises(InputError, match="masks has 1 entries for 2 subjects; give one per subject"):
        generate(pipe, make_images(2), masks=[np.ones((4, 4))])
    with pytest.raises(InputError, match="masks has 3 entries for 2 subjects"):
        generate(pipe, make_images(2), masks=np.ones((3, 4, 4)))


@pytest.mark.parametrize("shape", [(5, 5), (4,), (32, 64), (64, 64, 1)])
def test_wrong_mask_shape(pipe, ref_image, shape):
    with pytest.raises(InputError, match=rf"masks\[0\] has shape \({', '.join(map(str, shape))},?\); expected "
                                         r"\(64, 64\) pixels or \(4, 4\) tokens"):
        generate(pipe, [ref_image], masks=[np.ones(shape)])



def test_mask_shape_follows_the_requested_size(pipe, ref_image):
    with pytest.raises(InputError, match=r"masks\[0\] has shape \(64, 64\); expected \(128, 96\) pixels or \(8, 6\) "
                                         r"tokens"):
        generate(pipe, [ref_image], masks=[np.ones((64, 64))], height=128, width=96)
    assert generate(pipe, [ref_image], masks=[np.ones((8, 6))], height=128, width=96).shape == (1, 48, 64)


@pytest.mark.parametrize("value", [1.5, -0.1, 255.0], ids=["above", "below", "uint8-as-array"])
def test_mask_values_out_of_range(pipe, ref_image, value):
    m = np.zeros((4, 4))
    m[1, 2] = value
    with pytest.raises(InputError, match=r"masks\[0\] values must be finite and in \[0, 1\]"):
        generate(pipe, [ref_image], masks=[m])


@pytest.mark.parametrize("value", [NAN, INF])
def test_mask_not_finite(pipe, ref_image, value):
    m = np.ones((64, 64))
    m[10, 10] = value
    with pytest.raises(InputError, match=r"masks\[0\] values must be finite and in \[0, 1\]"):
        generate(pipe, [ref_image], masks=[m])


@pytest.mark.parametrize("masks", [Image.new("L", (64, 64)), "text", 1.0, np.float64(1.0)],
                         ids=["single-pil", "str", "float", "0-d"])
def test_masks_not_a_list(pipe, ref_image, masks):
    with pytest.raises(InputError, match="masks must be a list with one mask per subject, got "):
        generate(pipe, [ref_image], masks=masks)


@pytest.mark.parametrize("entry", [None, "mask", [[1, 1], [1]]], ids=["none", "str", "ragged"])
def test_mask_entry_not_numbers(pipe, ref_image, entry):
    with pytest.raises(InputError, match=r"masks\[0\] must be numbers"):
        generate(pipe, [ref_image], masks=[entry])


def test_pixel_and_token_masks_agree(pipe, make_images, tiny_cfg):
    """A pixel-space (H, W) mask, its token-space (H/16, W/16) area average and the 8-bit PIL form give the same
    request; a different mask gives a different one."""
    rng = np.random.default_rng(3)
    tokens = [rng.integers(0, 2, (4, 4)).astype(np.float64), rng.random((4, 4))]
    pixels = [np.kron(t, np.ones((16, 16))) for t in tokens]
    vf = tiny_cfg.vae.spatial_factor
    assert np.allclose(normalize_masks(tokens, 2, 64, 64, vf), normalize_masks(pixels, 2, 64, 64, vf), atol=1e-7)
    pil = [Image.fromarray((p * 255).astype(np.uint8), mode="L") for p in pixels[:1]] + [pixels[1]]
    refs = make_images(2)
    out_tokens = generate(pipe, refs, masks=tokens)
    out_pixels = generate(pipe, refs, masks=pixels)
    out_pil = generate(pipe, refs, masks=pil)
    out_torch = generate(pipe, refs, masks=torch.tensor(np.stack(tokens)))
    assert torch.allclose(out_tokens, out_pixels, atol=1e-6) and torch.allclose(out_tokens, out_pil, atol=1e-6)
    assert torch.allclose(out_tokens, out_torch, atol=1e-6)
    assert not torch.allclose(out_tokens, generate(pipe, refs, masks=[1 - tokens[0], tokens[1]]), atol=1e-4)


# ------------------------------------------------------------------------------------- size, steps, guidance, ...
@pytest.mark.parametrize("field,value", [("height", 72), ("width", 40), ("height", 0), ("width", -16),
                                         ("height", 4112), ("width", 8)])
def test_size_out_of_range(pipe, ref_image, field, value):
    with pytest.raises(InputError, match=rf"{field}={value} must be a multiple of 16 in \[16, 4096\]"):
        generate(pipe, [ref_image], **{field: value})


@pytest.mark.parametrize("value", [64.0, "64", True, np.int64(64)])
def test_size_not_int(pipe, ref_image, value):
    with pytest.raises(InputError, match=rf"width must be an int, got {type(value).__name__}"):
        generate(pipe, [ref_image], width=value)


def test_non_square_size_accepted(pipe, ref_image):
    assert generate(pipe, [ref_image], height=16, width=48).shape == (1, 3, 64)


@pytest.mark.parametrize("steps", [0, -1, 1001, 1.5, "4", True])
def test_bad_steps(pipe, ref_image, steps):
    with pytest.raises(InputError, match=r"steps=.* must be an int in \[1, 1000\]"):
        generate(pipe, [ref_image], steps=steps)


@pytest.mark.parametrize("guidance", [NAN, INF, -1.0, 100.5, "3.5", True])
def test_bad_guidance(pipe, ref_image, guidance):
    with pytest.raises(InputError, match=r"guidance=.* must be a finite number in \[0, 100\]"):
        generate(pipe, [ref_image], guidance=guidance)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, "7", True])
def test_bad_seed(pipe, ref_image, seed):
    with pytest.raises(InputError, match=r"seed=.* must be an int in \[0, 2\*\*63 - 1\]"):
        generate(pipe, [ref_image], seed=seed)


@pytest.mark.parametrize("output_type", ["np", "PIL", None])
def test_unknown_output_type(pipe, ref_image, output_type):
    with pytest.raises(InputError, match=rf"output_type={output_type!r} must be 'pil' or 'latent'"):
        generate(pipe, [ref_image], output_type=output_type)


def test_unknown_config_name():
    with pytest.raises(ConfigError, match=r"unknown config 'flux-huge'; choose one of \['flux-dev', .*'tiny-random'"):
        DynaIPPipeline.from_config("flux-huge")


@pytest.mark.parametrize("cache_bytes", [-1, 2.0, None])
def test_bad_cache_size(tiny_models, cache_bytes):
    from runtime import DynaIPEngine

    with pytest.raises(ConfigError, match=r"cache size .* must be an int >= 0"):
        DynaIPEngine.from_models(tiny_models, cache_bytes=cache_bytes)


def test_granularity_is_renormalised_to_sum_one():
    """User level weights are a mix like the router's softmax: [1, 1, 1] means equal levels, not three times the
    reference tokens; per-subject rows are renormalised separately."""
    assert np.allclose(normalize_granularity([1, 1, 1], 2, 3), np.full((2, 3), 1 / 3))
    assert np.allclose(normalize_granularity([[2, 0, 2], [0, 0, 5]], 2, 3), [[0.5, 0, 0.5], [0, 0, 1]])


def test_granularity_scale_does_not_change_the_request(pipe, make_images):
    refs = make_images(2)
    a = generate(pipe, refs, granularity=[0.2, 0.3, 0.5])
    assert torch.equal(a, generate(pipe, refs, granularity=[2, 3, 5]))


@pytest.mark.parametrize("block_scales,match", [
    ([1.0], r"block_scales has shape \(1,\); expected \(2,\): one number per injected block"),
    ([1.0, NAN], r"block_scales=\[1\.0, nan\] must be finite numbers in \[0, 10\]"),
    ([1.0, -1.0], r"must be finite numbers in \[0, 10\]"),
    ("1,1", r"block_scales must be numbers"),
])
def test_bad_block_scales(pipe, ref_image, block_scales, match):
    with pytest.raises(InputError, match=match):
        generate(pipe, [ref_image], block_scales=block_scales)


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=-1), r"text_branch\.steps=-1 must be an int >= 0"),
    (dict(steps=1.5), r"text_branch\.steps=1\.5 must be an int >= 0"),
    (dict(steps=2, scale=NAN), r"text_branch: scale=nan .* must be finite numbers in \[0, 10\]"),
    (dict(steps=2, block_scales=(1.0, -1.0)), r"block_scales=\(1\.0, -1\.0\) must be finite numbers in \[0, 10\]"),
])
def test_bad_text_branch_schedule(kwargs, match):
    with pytest.raises(InputError, match=match):
        TextBranchSchedule(**kwargs)


def test_text_branch_wrong_type_and_block_count(pipe, ref_image):
    with pytest.raises(InputError, match="text_branch must be a TextBranchSchedule or None, got int"):
        generate(pipe, [ref_image], text_branch=2)
    with pytest.raises(InputError, match=r"text_branch\.block_scales has 3 values; expected 2"):
        generate(pipe, [ref_image], text_branch=TextBranchSchedule(steps=1, block_scales=(1.0, 1.0, 1.0)))
    out = generate(pipe, [ref_image], text_branch=TextBranchSchedule(steps=1, block_scales=(1.0, 0.5)))
    assert torch.isfinite(out).all()
