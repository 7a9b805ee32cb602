"""The fp32 PyTorch outputs saved with every build (``reference/<model>.npz``): what ``export.parity`` compares
every graph and engine with.

``export.onnx`` runs every fp32 flat module once on inputs at the envelope's opt point (batch 2) and saves inputs
and outputs, hashed in the manifest like every other file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dynaip_trt.errors import ManifestError
from dynaip_trt.files import atomic_path
from dynaip_trt.manifest import MODEL_IO, ModelEntry, safe_join, sha256_file

from .envelope import Envelope
from .specs import get_spec

if TYPE_CHECKING:
    from dynaip_trt.models import DynaIPModels

REFERENCE_DIR = "reference"
REFERENCE_SEED = 0

Arrays = dict[str, np.ndarray]


def reference_file(name: str) -> str:
    """Path of a model's saved PyTorch inputs and outputs, relative to the build directory."""
    return f"{REFERENCE_DIR}/{name}.npz"


def reference_point(envelope: Envelope) -> tuple[int, int, int, int]:
    """(batch, subjects, height, width) of the saved references: the envelope's opt point, batch 2 where the
    envelope allows it (sizes >= 2 exercise the batch axis)."""
    _, subjects, height, width = envelope.points()["opt"]
    return max(envelope.batch[0], min(2, envelope.batch[2])), subjects, height, width


def save_references(directory: str | Path, models: DynaIPModels, names: tuple[str, ...], envelope: Envelope
                    ) -> dict[str, str]:
    """Run the fp32 PyTorch module of each model of ``names`` on valid sample inputs at :func:`reference_point`
    and write ``reference/<name>.npz`` in ``directory`` (atomically): ``inputs/<input>`` and ``outputs/<output>``
    arrays, names from :data:`MODEL_IO` (e.g. the DiT's ``inputs/latents`` ``[B, N, 64]`` and
    ``outputs/velocity`` ``[B, N, 64]``). Returns ``{relpath: sha256}`` of the files written."""
    point = reference_point(envelope)
    files = {}
    for name in names:
        spec = get_spec(name, models)
        inputs = spec.sample_inputs(*point, seed=REFERENCE_SEED)
        import torch

        with torch.no_grad():
            outputs = spec.module().eval()(*(inputs[n] for n in spec.input_names))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        arrays = {f"inputs/{n}": inputs[n].numpy() for n in spec.input_names}
        arrays.update({f"outputs/{n}": o.float().numpy() for n, o in zip(spec.output_names, outputs)})
        rel = reference_file(name)
        path = Path(directory) / rel
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        files[rel] = sha256_file(path)
    return files


def load_references(directory: str | Path, name: str, entry: ModelEntry) -> tuple[Arrays, Arrays]:
    """The saved ``(inputs, outputs)`` of model ``name`` (``{tensor name: array}``, :data:`MODEL_IO` order).

    Raises :class:`ManifestError` when the manifest lists no reference for it (a build exported before
    references existed) or the file lacks a tensor."""
    rel = reference_file(name)
    if rel not in entry.files:
        raise ManifestError(f"{directory}: model {name} has no saved PyTorch reference ({rel} is not in the "
                            f"manifest); re-export the build with python -m export.onnx")
    inputs, outputs = MODEL_IO[name]
    with np.load(safe_join(directory, rel)) as z:
        missing = [k for k in [*(f"inputs/{n}" for n in inputs), *(f"outputs/{n}" for n in outputs)]
                   if k not in z.files]
        if missing:
            raise ManifestError(f"{directory}: {rel} lacks {missing}; re-export the build with python -m export.onnx")
        return {n: z[f"inputs/{n}"] for n in inputs}, {n: z[f"outputs/{n}"] for n in outputs}
