"""A calibration directory on disk: prompts, synthetic reference images, recorded DiT inputs and amax tables.

    <calib>/dit_inputs.npz   recorded DiT inputs, keys "{record:04d}/{input}" (names of MODEL_IO["dit"])
    <calib>/amax.json        {"format", "version", "config", "source", "fp8_max", "samples", "records",
                              "layers": {linear name in the transformer: {"input": float, "weight": float}}}

Every file is written atomically (temp name, then rename).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from dynaip_trt.configs import DynaIPConfig
from dynaip_trt.errors import ConfigError
from dynaip_trt.files import atomic_path
from dynaip_trt.manifest import FP8_E4M3_MAX

if TYPE_CHECKING:
    import torch

PROMPTS_FILE = Path(__file__).parent / "data" / "prompts.txt"
RECORDS_FILE = "dit_inputs.npz"
AMAX_FILE = "amax.json"
QUALITY_FILE = "quality.json"
AMAX_FORMAT = "dynaip-trt-fp8-amax"
AMAX_VERSION = 1


def load_prompts(path: str | Path = PROMPTS_FILE) -> list[str]:
    """The calibration prompts: one per line, ``#`` comments and blank lines skipped."""
    lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ConfigError(f"{path} has no prompts")
    return prompts


def synthetic_reference(seed: int, size: int = 96) -> Image.Image:
    """A deterministic ``size x size`` RGB "subject": a coloured ellipse and a bar on a two-colour gradient."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1, fg, bar = (rng.uniform(0, 255, 3) for _ in range(4))
    t = (xx * rng.uniform(0.2, 1.0) + yy * rng.uniform(0.2, 1.0))[..., None] / 2.0
    img = c0 * (1 - t) + c1 * t
    cx, cy, rx, ry = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3), rng.uniform(0.15, 0.3)
    img[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1] = fg
    y0 = rng.integers(0, size - size // 8)
    img[y0 : y0 + size // 8, size // 8 : -size // 8] = bar
    img += rng.normal(0, 4, img.shape)  # sensor-like noise
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def save_records(directory: str | Path, records: list[dict[str, torch.Tensor]]) -> Path:
    """Write recorded DiT inputs (one ``{input: tensor}`` dict per step) to ``<directory>/dit_inputs.npz``."""
    arrays = {f"{i:04d}/{name}": t.detach().cpu().numpy() for i, rec in enumerate(records) for name, t in rec.items()}
    path = Path(directory) / RECORDS_FILE
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_records(directory: str | Path) -> list[dict[str, torch.Tensor]]:
    """The recorded DiT inputs of a calibration directory, in recording order (torch tensors)."""
    from torch import from_numpy as torch_from_numpy

    path = Path(directory) / RECORDS_FILE
    if not path.is_file():
        raise ConfigError(f"{directory} has no {RECORDS_FILE}: run python -m calibration.collect --out {directory}")
    records: dict[int, dict[str, torch.Tensor]] = {}
    with np.load(path) as data:
        for key in data.files:
            index, name = key.split("/", 1)
            records.setdefault(int(index), {})[name] = torch_from_numpy(data[key])
    return [records[i] for i in sorted(records)]


def owned_files(directory: str | Path) -> set[str]:
    """The files calibration wrote in ``directory`` (none unless it holds a valid amax table of ours), for
    :func:`dynaip_trt.files.claim_dir`."""
    try:
        AmaxTable.load(directory)
    except ConfigError:
        return set()
    return {AMAX_FILE, RECORDS_FILE, QUALITY_FILE}


@dataclass
class AmaxTable:
    """Per-layer FP8 ranges: ``layers = {name: {"input": amax, "weight": amax}}`` (names relative to the
    transformer, e.g. ``transformer_blocks.0.attn.to_q``)."""

    config: str
    source: str
    samples: int
    records: int
    layers: dict[str, dict[str, float]]
    fp8_max: float = FP8_E4M3_MAX
    format: str = AMAX_FORMAT
    version: int = AMAX_VERSION

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / AMAX_FILE
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, directory: str | Path, config: DynaIPConfig | None = None) -> "AmaxTable":
        """Read ``<directory>/amax.json``; with ``config``, it must have been calibrated for that config."""
        path = Path(directory) / AMAX_FILE
        if not path.is_file():
            raise ConfigError(f"{directory} has no {AMAX_FILE}: run python -m calibration.collect --out {directory}")
        try:
            table = cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"{path} is not a valid amax table: {e}") from e
        if table.format != AMAX_FORMAT or table.version != AMAX_VERSION:
            raise ConfigError(f"{path}: unsupported amax table {table.format!r} v{table.version}")
        if config is not None and table.config != config.name:
            raise ConfigError(f"{path} was calibrated for config {table.config!r}, not {config.name!r}; "
                              f"re-run python -m calibration.collect")
        return table
