"""What a build directory serves, read from its manifest alone (no model is loaded): the summary behind the HTTP
API's ``GET /v1/info`` and the limits the server needs before it starts (batch profile, subjects, resolutions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dynaip_trt.manifest import Manifest, max_batch_of, max_subjects_of


def summarize_build(directory: str | Path, manifest: Manifest | None = None) -> dict[str, Any]:
    """The build's summary: config name, models (precision, other precisions, whether a TensorRT engine exists),
    max subjects, max batch, image resolutions (min/opt/max of the VAE profile, in pixels), the config's sampling
    defaults, and the TensorRT section (version, GPU, compute capability) when engines were built."""
    manifest = manifest or Manifest.load(directory)
    cfg = manifest.dynaip_config
    factor = cfg.vae.spatial_factor
    vae = manifest.models.get("vae")
    resolutions = ({k: f"{v[2] * factor}x{v[3] * factor}" for k, v in vae.profile["latents"].items()}
                   if vae is not None and "latents" in vae.profile else {})
    trt = manifest.tensorrt or {}
    return {
        "config": cfg.name,
        "models": {name: {"precision": e.precision, "variants": sorted(e.variants), "engine": e.engine is not None}
                   for name, e in sorted(manifest.models.items())},
        "max_subjects": max_subjects_of(manifest),
        "max_batch": max_batch_of(manifest),
        "resolutions": resolutions,
        "defaults": {"steps": cfg.steps, "guidance": cfg.guidance, "height": cfg.height, "width": cfg.width},
        "tensorrt": {k: trt[k] for k in ("version", "gpu", "compute_capability", "precision") if k in trt} or None,
        "opset": manifest.opset,
    }
