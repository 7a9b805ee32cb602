"""The HTTP API's request schema, derived from :class:`~dynaip_trt.request.GenerationRequest`, and its conversions.

Every field of ``GenerationRequest`` becomes a JSON field of ``POST /v1/generate`` with the same default, its type
translated to JSON (``Sequence[float]`` -> array of numbers, ``X | None`` -> nullable), so an option added to the
dataclass appears in the API (and in the OpenAPI page at ``/docs``) without touching this module. Two fields have
a wire form of their own (images travel base64-encoded) and one is left out:

- ``references``: one entry per subject, a base64-encoded image file or a list of them (views of the subject);
- ``masks``: one entry per subject, a base64-encoded image (grey levels 0..255) or an ``h x w`` array in [0, 1];
- ``text_branch`` is not served: DDS text-branch schedules run on the torch backend only, and a served build runs
  exported graphs (ONNX Runtime, TensorRT) that contain the image branch alone.

Plus ``response_format``: ``"png"`` (an ``image/png`` body) or ``"b64_json"`` (``{"images": [base64 PNG]}``).

This module needs pydantic and PIL only (no Ray), so the schema is testable and importable anywhere.
"""

from __future__ import annotations

import base64
import binascii
import collections.abc
import dataclasses
import io
import re
import types
import typing
from typing import Any, Literal, Union

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, create_model

from dynaip_trt.errors import ImageError
from dynaip_trt.images import MAX_IMAGE_PIXELS, load_image
from dynaip_trt.request import GenerationRequest

RESPONSE_FORMATS = ("png", "b64_json")

# Fields whose JSON form differs from the Python type: (JSON type, description).
WIRE_FIELDS: dict[str, tuple[Any, str]] = {
    "references": (list[Union[str, list[str]]],
                   "One entry per subject: a base64-encoded image file (PNG, JPEG, WebP...; a data: URL works too), "
                   "or a list of them for several views of the subject."),
    "masks": (Union[list[Union[str, list[list[float]]]], None],
              "One entry per subject: a base64-encoded image (grey levels 0..255) or an h x w array of numbers in "
              "[0, 1], at pixel (height x width) or token (height/16 x width/16) resolution; null: no masks."),
}
# Fields of GenerationRequest the HTTP API leaves out, and why (the docs say so too).
EXCLUDED_FIELDS: dict[str, str] = {
    "text_branch": "DDS text-branch schedules need the torch backend; served builds run exported graphs (image "
                   "branch only)",
}


def _field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Attributes:`` section of a dataclass's docstring (``a, b: text`` lines
    document several fields; indented lines continue the previous one)."""
    doc = (cls.__doc__ or "").split("Attributes:", 1)
    docs: dict[str, str] = {}
    names: list[str] = []
    for line in doc[1].splitlines() if len(doc) > 1 else []:
        m = re.match(r"^\s{8}([\w, ]+):\s*(.*)$", line)
        if m:
            names = [n.strip() for n in m.group(1).split(",")]
            for n in names:
                docs[n] = m.group(2)
        elif line.startswith(" " * 12) and names:
            for n in names:
                docs[n] += " " + line.strip()
    return {k: v.replace("``", "") for k, v in docs.items()}


def wire_type(tp: Any, field: str) -> Any:
    """The JSON-schema type of a Python annotation: ``int``, ``float``, ``str``, ``bool``, ``None``, ``Literal``,
    unions of them and sequences (as lists). Anything else needs an entry in :data:`WIRE_FIELDS` or
    :data:`EXCLUDED_FIELDS` (``TypeError`` names the field)."""
    origin = typing.get_origin(tp)
    if tp in (int, float, str, bool, type(None)) or origin is Literal:
        return tp
    if origin in (Union, types.UnionType):
        return Union[tuple(wire_type(a, field) for a in typing.get_args(tp))]
    if origin in (list, tuple, collections.abc.Sequence):
        args = typing.get_args(tp)
        return list[wire_type(args[0], field) if args else Any]
    raise TypeError(f"GenerationRequest.{field} has type {tp!r}, which has no JSON form: add it to "
                    f"runtime.http_api.WIRE_FIELDS or EXCLUDED_FIELDS")


def request_model(cls: type = GenerationRequest) -> type[BaseModel]:
    """The pydantic model of ``POST /v1/generate``'s JSON body: every field of the dataclass ``cls`` (minus
    :data:`EXCLUDED_FIELDS`) with its default, plus ``response_format``. Unknown fields are refused; values are
    not coerced (``"5"`` is not a number)."""
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in EXCLUDED_FIELDS:
            continue
        tp, doc = WIRE_FIELDS.get(f.name, (None, docs.get(f.name, "")))
        tp = wire_type(hints[f.name], f.name) if tp is None else tp
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = ...
        fields[f.name] = (tp, Field(default, description=doc))
    fields["response_format"] = (Literal["png", "b64_json"], Field(
        "png", description="png: an image/png body; b64_json: a JSON body {\"images\": [base64 PNG]}"))
    return create_model("GenerateRequest", __config__=ConfigDict(extra="forbid", strict=True), **fields)


GenerateRequest = request_model()


def _b64_bytes(data: str, field: str) -> bytes:
    """base64 text (or a ``data:...;base64,`` URL) -> bytes; :class:`ImageError` naming ``field`` otherwise."""
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if not head.endswith(";base64"):
            raise ImageError(f"{field}: a data: URL must be base64-encoded (data:image/png;base64,...)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{field}: not valid base64 ({e})") from None
    if not raw:
        raise ImageError(f"{field}: empty image (no bytes after base64 decoding)")
    return raw


def open_image(data: str, field: str) -> Image.Image:
    """A base64-encoded image file -> a lazily opened PIL image (format recognised, nothing decoded yet)."""
    try:
        return Image.open(io.BytesIO(_b64_bytes(data, field)))
    except Image.DecompressionBombError as e:
        raise ImageError(f"{field}: image is too large; at most {MAX_IMAGE_PIXELS} pixels are accepted ({e})"
                         ) from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"{field}: the decoded bytes are not a readable image file ({e})") from None


def decode_references(references: list[str | list[str]]) -> list[list[Image.Image]]:
    """The ``references`` field -> RGB images per subject, checked as the Python API checks them (the same
    messages: ``references[i]: ...``)."""
    subjects = []
    for s, entry in enumerate(references):
        views = [entry] if isinstance(entry, str) else entry
        field = f"references[{s}]"
        subjects.append([load_image(open_image(v, field if len(views) == 1 else f"{field} view {i}"), field)
                         for i, v in enumerate(views)])
    return subjects


def decode_masks(masks: list[str | list[list[float]]] | None) -> list[Image.Image | list[list[float]]] | None:
    """The ``masks`` field -> greyscale PIL masks (from base64 images) or the arrays as given (the engine checks
    shapes and ranges)."""
    if masks is None:
        return None
    out: list[Image.Image | list[list[float]]] = []
    for s, m in enumerate(masks):
        if isinstance(m, str):
            im = open_image(m, f"masks[{s}]")
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise ImageError(f"masks[{s}]: image is {im.width}x{im.height}; at most {MAX_IMAGE_PIXELS} pixels")
            try:
                m = im.convert("L")
            except (OSError, SyntaxError, ValueError) as e:
                raise ImageError(f"masks[{s}]: the image cannot be decoded ({e})") from None
        out.append(m)
    return out


def to_generation_request(body: BaseModel) -> tuple[GenerationRequest, str]:
    """A validated :data:`GenerateRequest` -> (the :class:`GenerationRequest` for the engine, the response format).
    Images are decoded here: bad base64 or a file that is not an image raises :class:`ImageError`."""
    values = {k: getattr(body, k) for k in type(body).model_fields if k != "response_format"}
    values["references"] = decode_references(values["references"])
    values["masks"] = decode_masks(values.get("masks"))
    return GenerationRequest(**values), body.response_format


def encode_png(image: Image.Image) -> bytes:
    """A PIL image -> PNG file bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64_json(png: bytes) -> dict[str, list[str]]:
    """The ``b64_json`` response body for one PNG image."""
    return {"images": [base64.b64encode(png).decode("ascii")]}
