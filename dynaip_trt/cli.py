"""What every command line of dynaip-trt shares (lean: no torch): one vocabulary of flags, logging that reads
cleanly in a terminal and in a log file, progress bars, output-path checks before any work, and one error-to-exit
mapping.

The flags (the README has the table):

=====================  ====================================================================================
``--engine-dir DIR``   a build folder (manifest, ONNX graphs, TensorRT engines): written by ``export.*``,
                       read by ``runtime.*`` and ``export.parity``
``--config NAME``      a named config with embedded or seeded weights (when no ``--base``/``--clip``)
``--base DIR``         a local diffusers-format FLUX folder
``--clip DIR``         a local image-encoder folder (transformers CLIP vision)
``--adapter FILE``     a DynaIP adapter ``.safetensors``
``--calib DIR``        an FP8 calibration folder
``--precision P``      fp32, fp16, bf16 or fp8
``--out FILE``         an output file (image)
``--json FILE``        a JSON report
=====================  ====================================================================================
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from tqdm.auto import tqdm

from .errors import DynaIPError, InputError, OutputError
from .files import atomic_path

T = TypeVar("T")
MARKER = "dynaip-trt"  # in the images (PNG text, JPEG comment) and JSON reports we write: a rerun may replace them
WEIGHTS_CONFIG_FILE = "dynaip_config.json"  # saved beside a base model folder by dynaip_trt.weights.save_models
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
# third-party loggers that only show errors unless --verbose (the exporters, optimizers and polygraphy are chatty)
QUIET_LOGGERS = ("torch.onnx", "torch._export", "torch.fx", "onnx_ir", "onnxscript", "polygraphy", "diffusers",
                 "transformers")


class TqdmLoggingHandler(logging.StreamHandler):
    """Writes log records through ``tqdm.write`` so a line never glues onto a progress bar in a terminal."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never raise
            self.handleError(record)


def configure_logging(verbose: bool = False, quiet: Iterable[str] = QUIET_LOGGERS) -> None:
    """INFO (DEBUG with ``verbose``) to stderr through tqdm; the loggers in ``quiet`` (third-party chatter) only
    show errors unless ``verbose``."""
    handler = TqdmLoggingHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, TqdmLoggingHandler)]:  # ours, from an earlier call
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        for name in quiet:
            logging.getLogger(name).setLevel(logging.ERROR)


def progress(iterable: Iterable[T], desc: str, enabled: bool = True, total: int | None = None) -> Iterable[T]:
    """A tqdm bar over ``iterable`` when ``enabled`` and stderr is a terminal (in a log file or pipe the bar would
    garble the lines: logging reports progress there)."""
    return tqdm(iterable, desc=desc, total=total, disable=None if enabled else True, leave=False, file=sys.stderr)


def cli_main(logger: logging.Logger) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorate a CLI's ``main(argv) -> exit code``: a :class:`DynaIPError` or an ``OSError`` (a path the OS refused:
    permissions, a missing folder, a full disk) is logged as one line naming the problem and becomes exit code 2;
    Ctrl-C exits 130. Never a traceback."""

    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> int:
            try:
                return main(argv)
            except DynaIPError as e:
                logger.error("%s", e)
                return EXIT_BAD_INPUT
            except OSError as e:
                where = f"{e.filename}: " if e.filename else ""
                logger.error("%s%s", where, e.strerror or e)
                return EXIT_BAD_INPUT
            except KeyboardInterrupt:
                logger.error("interrupted")
                return EXIT_INTERRUPTED

        return wrapped

    return decorate


def add_source_args(p: argparse.ArgumentParser, default_config: str) -> None:
    """``--config``/``--base``/``--clip``/``--adapter``/``--weights-seed``: which weights a command runs."""
    p.add_argument("--config", default=default_config,
                   help=f"named config when no --base/--clip are given (default {default_config})")
    p.add_argument("--base", metavar="DIR", help="local diffusers-format FLUX folder")
    p.add_argument("--clip", metavar="DIR", help="local image-encoder folder (transformers CLIP vision)")
    p.add_argument("--adapter", metavar="FILE", help="DynaIP adapter .safetensors")
    p.add_argument("--weights-seed", type=int, default=0, metavar="SEED",
                   help="seed of the random weights of seeded configs (default 0)")


def check_source_args(args: argparse.Namespace) -> None:
    """Fail fast on the weight flags: --base and --clip together, existing folders and adapter file."""
    if (args.base is None) != (args.clip is None):
        raise InputError("--base and --clip must be given together (a FLUX folder and an image-encoder folder)")
    for flag, value, kind in (("--base", args.base, "folder"), ("--clip", args.clip, "folder"),
                              ("--adapter", args.adapter, "file")):
        if value is None:
            continue
        path = Path(value)
        ok = path.is_dir() if kind == "folder" else path.is_file()
        if not ok:
            raise InputError(f"{flag} {value}: no such {kind}")


def family_name(config: str, base: str | Path | None = None) -> str:
    """The name of the models :func:`load_family` gives (cheap: no weights are read): the config's, or that saved
    with a base folder (``dynaip_config.json``), else the folder's name. Default output folders use it."""
    if base is None:
        return config
    saved = Path(base) / WEIGHTS_CONFIG_FILE
    try:
        return str(json.loads(saved.read_text())["name"]) if saved.is_file() else Path(base).name
    except (json.JSONDecodeError, KeyError, TypeError):
        return Path(base).name


def check_writable_file(path: str | Path, flag: str, is_ours: Callable[[Path], bool] | None = None) -> Path:
    """Check before any work that ``path`` can be written (atomically, beside itself): its folder exists and takes
    a new file, it is not a folder or a special file, and an existing file there was written by us (``is_ours``;
    without it any existing file is refused). Raises :class:`OutputError` naming ``flag``, the path and the reason.
    """
    path = Path(path)
    label = f"{flag} {path}"
    if path.is_dir():
        raise OutputError(f"{label} is a folder; give a file name")
    if path.exists() or path.is_symlink():
        if not path.is_file() or path.is_symlink():
            raise OutputError(f"{label} exists and is not a regular file; give a new file name")
        if is_ours is None or not is_ours(path):
            raise OutputError(f"{label} exists and was not written by dynaip-trt; give a new file name or remove it")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as e:
        reason = "no such folder" if not parent.exists() else (
            "not a folder" if not parent.is_dir() else (e.strerror or str(e)))
        raise OutputError(f"{label}: cannot write there ({reason})") from e
    os.close(fd)
    os.unlink(probe)
    return path


def write_json_report(path: str | Path, data: dict) -> Path:
    """Write ``data`` as JSON atomically, marked as ours (``"generator": "dynaip-trt"``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"generator": MARKER, **data}, indent=1))
    return path


def written_json_report(path: Path) -> bool:
    """Whether ``path`` is a JSON report we wrote (:func:`write_json_report`)."""
    try:
        return json.loads(path.read_text()).get("generator") == MARKER
    except (OSError, ValueError, AttributeError):
        return False


def image_format(path: Path, flag: str) -> str:
    """The PIL format of an output image from its suffix; :class:`InputError` naming ``flag`` otherwise."""
    from PIL import Image

    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{flag} {path}: unknown image suffix {path.suffix!r}; use e.g. .png or .jpg")
    return fmt


def save_image(image, path: str | Path, flag: str = "--out") -> Path:
    """Write a PIL image atomically (format from the suffix), marked as ours in its PNG text or JPEG comment. An
    ``OSError`` (disk full, file too large...) becomes :class:`OutputError` naming ``flag`` and the path."""
    from PIL import PngImagePlugin

    path = Path(path)
    fmt = image_format(path, flag)
    extra: dict = {}
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("Software", MARKER)
        extra["pnginfo"] = info
    elif fmt == "JPEG":
        extra["comment"] = MARKER
    try:
        with atomic_path(path) as tmp:
            image.save(tmp, format=fmt, **extra)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write it ({e.strerror or e}); nothing was written") from e
    return path


def written_image(path: Path) -> bool:
    """Whether ``path`` is an image we wrote (:func:`save_image`'s marker)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            text = im.info.get("Software") or im.info.get("comment") or b""
    except OSError:
        return False
    return (text.decode(errors="replace") if isinstance(text, bytes) else str(text)).startswith(MARKER)
