"""The range of requests a build serves (batch, subjects, views, resolutions): what the engine profiles span."""

from __future__ import annotations

from dataclasses import dataclass

from dynaip_trt.errors import ConfigError


@dataclass(frozen=True)
class Envelope:
    """The range of requests an export/engine must serve.

    Attributes:
        batch: (min, opt, max) images per call.
        subjects: (min, opt, max) subjects per request.
        views: maximum reference images per subject (CLIP batch = batch * subjects * views).
        resolutions: (height, width) pairs; min/max are taken over them, opt is the first.
    """

    batch: tuple[int, int, int] = (1, 1, 4)
    subjects: tuple[int, int, int] = (1, 2, 4)
    views: int = 2
    resolutions: tuple[tuple[int, int], ...] = ((1024, 1024),)

    def __post_init__(self) -> None:
        for name in ("batch", "subjects"):
            lo, opt, hi = getattr(self, name)
            if not 1 <= lo <= opt <= hi:
                raise ConfigError(f"{name} range {getattr(self, name)} must satisfy 1 <= min <= opt <= max")
        if not self.resolutions:
            raise ConfigError("at least one resolution is needed")

    def points(self) -> dict[str, tuple[int, int, int, int]]:
        """(batch, subjects, height, width) at min, opt and max."""
        hs = [r[0] for r in self.resolutions]
        ws = [r[1] for r in self.resolutions]
        return {
            "min": (self.batch[0], self.subjects[0], min(hs), min(ws)),
            "opt": (self.batch[1], self.subjects[1], *self.resolutions[0]),
            "max": (self.batch[2], self.subjects[2], max(hs), max(ws)),
        }
