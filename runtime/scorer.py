"""The world's scorer with ONNX Runtime: reads generated images for the quality evaluation (no torch).

The scorer is the ONNX graph trained by ``python -m dynaip_trt.demo.scorer`` and shipped as package data
(``dynaip_trt/data/scorer/``: ``scorer.onnx`` and ``scorer.json``, which records the training command, the accuracy
on fresh renders and the graph's SHA-256, checked at load). What it outputs and how outputs become readings and
verdicts: :mod:`dynaip_trt.demo.verdicts`.

    scorer = WorldScorer()
    readings = scorer.read(images, num_subjects=1)      # one Reading per image (setting, position, attributes)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from dynaip_trt.demo.verdicts import INPUT, OUTPUTS, SCORER_DIR, SCORER_FILE, SCORER_METADATA, Reading, read, \
    run_scorer
from dynaip_trt.errors import WeightsError
from dynaip_trt.manifest import sha256_file

from .ort_backend import import_onnxruntime

logger = logging.getLogger(__name__)


class WorldScorer:
    """The scorer graph in an ONNX Runtime CPU session.

    Args:
        folder: a folder with ``scorer.onnx`` and ``scorer.json`` (default: the shipped scorer).
        threads: intra-op threads (0: ONNX Runtime's default).
        what: how the folder is named in errors (e.g. ``"--scorer DIR"`` for a CLI user).
    """

    def __init__(self, folder: str | Path | None = None, threads: int = 0, what: str | None = None):
        self.folder = Path(folder) if folder is not None else SCORER_DIR
        label = what or f"scorer folder {self.folder}"
        graph, meta_path = self.folder / SCORER_FILE, self.folder / SCORER_METADATA
        if not graph.is_file() or not meta_path.is_file():
            raise WeightsError(f"{label}: needs {SCORER_FILE} and {SCORER_METADATA} (train a scorer with python -m "
                               f"dynaip_trt.demo.scorer --out DIR)")
        try:
            self.metadata = json.loads(meta_path.read_text())
            expected = self.metadata["sha256"]
        except (ValueError, KeyError, TypeError) as e:
            raise WeightsError(f"{label}: {SCORER_METADATA} is not a scorer description ({e})") from None
        self.sha256 = sha256_file(graph)
        if self.sha256 != expected:
            raise WeightsError(f"{label}: {SCORER_FILE} does not match the SHA-256 in {SCORER_METADATA} (changed or "
                               f"truncated); retrain it with python -m dynaip_trt.demo.scorer")
        ort = import_onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(graph), sess_options=options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own exception types
            raise WeightsError(f"{label}: ONNX Runtime cannot load {SCORER_FILE}: {e}") from e
        names = {o.name for o in self.session.get_outputs()}
        if [i.name for i in self.session.get_inputs()] != [INPUT] or not set(OUTPUTS) <= names:
            raise WeightsError(f"{label}: {SCORER_FILE} is not a world scorer (input {INPUT!r}, outputs "
                               f"{list(OUTPUTS)} expected)")

    def outputs(self, images: Sequence[np.ndarray | Image.Image]) -> dict[str, np.ndarray]:
        """Raw outputs (:data:`~dynaip_trt.demo.verdicts.OUTPUTS`) for square RGB images of any size."""
        return run_scorer(self.session, images)

    def read(self, images: Sequence[np.ndarray | Image.Image], num_subjects: int) -> list[Reading]:
        """One :class:`~dynaip_trt.demo.verdicts.Reading` per image of ``num_subjects`` subjects."""
        return read(self.outputs(images), num_subjects)
