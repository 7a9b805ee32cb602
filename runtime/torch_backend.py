"""PyTorch stages of the runtime: the flat modules of :mod:`dynaip_trt.stage_modules` (the very modules the graphs
are exported from) on the models' device, and CUDA graphs of the denoising step on a GPU (one graph per bucket of
input shapes, see :mod:`runtime.cuda_graphs`). The only runtime module that imports torch and the model code.

Text-branch steps (DDS schedules) run the full model eagerly; every other step is the flat DiT step (DBIM's mixing
steps: the flat DBIM step, with its own CUDA graphs).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dynaip_trt.attention import ReferenceInputs
from dynaip_trt.conditioning import DiTCondition, ReferenceKV, dit_feeds
from dynaip_trt.configs import DEFAULT_CONFIG
from dynaip_trt.dbim import DBIMCondition
from dynaip_trt.errors import BackendUnavailableError
from dynaip_trt.fp8 import quantize_fp8
from dynaip_trt.models import DynaIPModels, dit_forward
from dynaip_trt.sampling import euler_step, image_token_count, latent_image_ids, text_ids, true_cfg_velocity
from dynaip_trt.stage_modules import ClipLevels, DiTDBIMStep, DiTStep, FusionKV, TextEncoders, VaeDecode
from dynaip_trt.weights import load_adapter, load_family, read_adapter_config

from .cuda_graphs import CapturedGraph, GraphCache, capture_graph, ensure_free_memory, shape_key, tensor_bytes
from .stages import DBIMDenoiseSession

logger = logging.getLogger(__name__)

# Rough peak activation memory of one DiT step, in units of (batch * (image + text tokens) * width * element
# size): attention projections, the 4x MLP and the residual stream of one block live at the same time.
ACTIVATION_FACTOR = 24


def model_bytes(models: DynaIPModels, dtype: torch.dtype | None = None) -> int:
    """Bytes the parameters and buffers of every model take (in ``dtype`` if given)."""
    total = 0
    for m in (models.transformer, models.vision, models.clip_text, models.t5, models.vae, models.adapter):
        for t in [*m.parameters(), *m.buffers()]:
            total += tensor_bytes(t.shape, dtype if dtype is not None and t.is_floating_point() else t.dtype)
    return total


def with_adapter_file(models: DynaIPModels, path: str | Path) -> DynaIPModels:
    """``models`` with the adapter weights of ``path`` loaded (in place) and attending in the mode the file's header
    records (an adapter trained with the attention constraint attends in ``concat`` mode)."""
    mode = read_adapter_config(path).attention_mode
    cfg = models.config
    models = dataclasses.replace(models, config=dataclasses.replace(cfg, adapter=dataclasses.replace(
        cfg.adapter, attention_mode=mode)))
    load_adapter(path, models.adapter)
    return models


def load_models_on(device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                   config: str = DEFAULT_CONFIG, seed: int = 0, base: str | Path | None = None,
                   clip: str | Path | None = None, adapter: str | Path | None = None) -> DynaIPModels:
    """:func:`dynaip_trt.weights.load_family` moved to ``device`` (and ``dtype``) after checking that the GPU has
    room for the models."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device} requested but CUDA is not available (no GPU, or a CPU "
                                      f"build of torch)")
    models = load_family(config, base, clip, adapter, seed)
    if models.device != device or dtype not in (None, models.dtype):
        ensure_free_memory(device, model_bytes(models, dtype), f"the {models.config.name} models")
        models.to(device, dtype)
    return models


class TorchStages:
    """:class:`~runtime.stages.Stages` over a :class:`DynaIPModels` family (on its device and dtype).

    Args:
        models: the model family (never modified: FP8 works on a converted copy of the transformer).
        cuda_graphs: on CUDA, capture the denoising step once per shape bucket and replay it.
        fp8: run the DiT's block linear layers as FP8 GEMMs (``torch._scaled_mm``, dynamic input scales).
        max_graphs: buckets kept captured at once (LRU).
    """

    backend = "torch"
    supports_text_branch = True
    dbim_unavailable = None  # the torch backend runs DBIM's mixing steps with the same model code

    def __init__(self, models: DynaIPModels, cuda_graphs: bool = True, fp8: bool = False, max_graphs: int = 8):
        cfg = models.config
        self.models = models
        self.device = models.device
        self.dtype = models.dtype
        self.max_subjects = cfg.max_subjects
        if fp8 and self.device.type == "cuda" and torch.cuda.get_device_capability(self.device) < (8, 9):
            raise BackendUnavailableError(f"fp8 needs FP8 tensor cores (compute capability 8.9+, e.g. L40S, H100); "
                                          f"{torch.cuda.get_device_name(self.device)} has none")
        self.transformer = quantize_fp8(models.transformer, "scaled_mm") if fp8 else models.transformer
        self.mode = cfg.adapter.attention_mode
        self.clip = ClipLevels(models.vision, cfg.adapter.tap_layers, self.dtype, cfg.adapter.encoder)
        self.fusion = FusionKV(models.adapter, self.dtype)
        self.text = TextEncoders(models.clip_text, models.t5, self.dtype)
        self.dit = DiTStep(self.transformer, self.mode, self.dtype)
        self.dbim_dit = DiTDBIMStep(self.dit.transformer, self.mode, self.dtype)  # DBIM's mixing steps
        self.vae = VaeDecode(models.vae, self.dtype)
        self.graphs = GraphCache(max_graphs) if cuda_graphs and self.device.type == "cuda" else None
        if fp8:
            logger.info("fp8: the DiT's block linear layers run torch._scaled_mm")

    def tensor(self, a: np.ndarray) -> torch.Tensor:
        """A copy of ``a`` on the device (never a view of the caller's array: sessions write their buffers)."""
        return torch.tensor(np.ascontiguousarray(a), device=self.device)

    @torch.no_grad()
    def clip_levels(self, pixels: np.ndarray) -> np.ndarray:
        return self.clip(self.tensor(pixels)).cpu().numpy()

    @torch.no_grad()
    def reference_kv(self, levels: np.ndarray, level_weights: np.ndarray | None, text_branch: bool) -> ReferenceKV:
        b, s, n_levels = levels.shape[:3]
        override = torch.zeros(b, s) if level_weights is None else torch.ones(b, s)
        weights = torch.zeros(b, s, n_levels) if level_weights is None else torch.from_numpy(level_weights)
        tokens = self.fusion.tokens(self.tensor(levels), weights.to(self.device), override.to(self.device))
        a = self.fusion.adapter
        kv = [*a.image_kv(tokens), *(a.text_kv(tokens) if text_branch else (None, None))]
        return ReferenceKV(*(None if t is None else t.float().cpu().numpy() for t in kv))

    @torch.no_grad()
    def encode_text(self, clip_ids: np.ndarray, t5_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        seq, pooled = self.text(self.tensor(clip_ids), self.tensor(t5_ids))
        return seq.cpu().numpy(), pooled.cpu().numpy()

    @torch.no_grad()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.vae(self.tensor(latents)).cpu().numpy()

    def denoise_session(self, noise: np.ndarray, cond: DiTCondition, true_cfg: np.ndarray | None = None,
                        dbim: DBIMCondition | None = None) -> "TorchDenoiseSession | DBIMDenoiseSession":
        if dbim is not None:
            return DBIMDenoiseSession(noise, cond, dbim, lambda x, c, model, extra: TorchDenoiseSession(
                self, x, c, None, model, extra))
        return TorchDenoiseSession(self, noise, cond, true_cfg)

    @torch.no_grad()
    def step_times(self, batch: int, height: int, width: int, subjects: int,
                   timer: Callable[[Callable[[], object]], float]) -> tuple[float, float]:
        """Seconds of one DiT step of the bare base model and of the same step with ``subjects`` subjects' reference
        attention (random inputs), each measured by ``timer`` (the benchmark's adapter overhead)."""
        cfg, dev, dt = self.models.config, self.device, self.dtype
        vf, t = cfg.vae.spatial_factor, cfg.transformer
        n, length = image_token_count(height, width, vf), cfg.text.max_text_length
        args = (torch.randn(batch, n, t.in_channels, device=dev, dtype=dt),
                torch.randn(batch, length, t.joint_attention_dim, device=dev, dtype=dt),
                torch.randn(batch, t.pooled_projection_dim, device=dev, dtype=dt),
                torch.full((batch,), 0.5, device=dev), torch.full((batch,), cfg.guidance, device=dev),
                torch.from_numpy(latent_image_ids(height, width, vf)).to(dev),
                torch.from_numpy(text_ids(length)).to(dev))
        kv = torch.randn(cfg.injected_blocks, batch, subjects, cfg.adapter.num_tokens, t.inner_dim, device=dev,
                         dtype=dt)
        ref = ReferenceInputs(kv=ReferenceKV(kv, kv), scales=torch.ones(batch, subjects, device=dev, dtype=dt),
                              mode=self.mode, image_tokens=n)
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        base = timer(lambda: (dit_forward(self.transformer, *args, None), sync()))
        return base, timer(lambda: (dit_forward(self.transformer, *args, ref), sync()))

    def dit_module(self, model: str):
        """The flat DiT step of graph ``model``: ``dit`` (:class:`DiTStep`) or ``dit_dbim`` (:class:`DiTDBIMStep`)."""
        return self.dit if model == "dit" else self.dbim_dit

    def captured(self, feeds: dict[str, torch.Tensor], output: int = 1, model: str = "dit") -> CapturedGraph:
        """The CUDA graph of one step of DiT module ``model`` (``dit`` or ``dit_dbim``) for the bucket of ``feeds``
        (captured on first use): its static inputs are ``feeds``' names, its output the DiT step's output number
        ``output`` (1: ``latents_next``, 0: ``velocity`` for true CFG)."""
        key = (model, shape_key(feeds), output)
        graph = self.graphs.get(key)
        if graph is None:
            static = {k: v.clone() for k, v in feeds.items()}
            b, n = static["latents"].shape[:2]
            width = self.models.config.transformer.inner_dim
            act = ACTIVATION_FACTOR * b * (n + static["text_embeds"].shape[1]) * width * self.dtype.itemsize
            needed = act + sum(t.numel() * t.element_size() for t in static.values())
            ensure_free_memory(self.device, needed, f"capturing the DiT step for batch {b}, {n} image tokens")
            graph = capture_graph(static, lambda: self.dit_module(model)(**static)[output])
            self.graphs.put(key, graph)
            logger.info("captured the DiT step for bucket %s (%d bucket(s) cached)", key, len(self.graphs))
        return graph


class TorchDenoiseSession:
    """The denoising loop on the models' device: eager flat DiT steps, or replays of the bucket's CUDA graph that
    feed ``latents_next`` back as ``latents`` on the device. With ``true_cfg`` (see
    :meth:`runtime.stages.Stages.denoise_session`) the step's ``velocity`` of the ``2B`` rows gives the guided Euler
    step of the ``B`` latents, on the device."""

    def __init__(self, stages: TorchStages, noise: np.ndarray, cond: DiTCondition, true_cfg: np.ndarray | None = None,
                 model: str = "dit", extra: dict[str, np.ndarray] | None = None):
        self.stages = stages
        self.cond = cond
        self.module = stages.dit_module(model)
        self.true_cfg = None if true_cfg is None else stages.tensor(np.asarray(true_cfg, np.float32)[:, None, None])
        self.x = None if true_cfg is None else stages.tensor(noise).float()  # the guided latents [B, N, C]
        latents = noise if true_cfg is None else np.concatenate([noise, noise])
        t = np.zeros(latents.shape[0], dtype=np.float32)
        feeds = {**dit_feeds(latents, t, t, cond), **(extra or {})}
        self.feeds = {k: stages.tensor(v) for k, v in feeds.items()}  # copies: two buffers
        self.output = 1 if true_cfg is None else 0  # latents_next, or the velocity of the guided step
        self.graph = None if stages.graphs is None else stages.captured(self.feeds, self.output, model)
        if self.graph is not None:
            for name, value in self.feeds.items():
                self.graph.inputs[name].copy_(value)

    @torch.no_grad()
    def step(self, timestep: float, timestep_next: float, text_branch: bool = False) -> None:
        if text_branch:
            self._text_branch_step(timestep, timestep_next)
            return
        inputs = self.graph.inputs if self.graph is not None else self.feeds
        inputs["timestep"].fill_(timestep)
        inputs["timestep_next"].fill_(timestep_next)
        if self.graph is not None:
            self.graph.graph.replay()
            out = self.graph.output
        else:
            out = self.module(**inputs)[self.output]
        if self.true_cfg is not None:
            t, t_next = (torch.tensor(np.float32(v), device=self.stages.device) for v in (timestep, timestep_next))
            self.x = euler_step(self.x, true_cfg_velocity(out, self.true_cfg), t, t_next)
            out = torch.cat([self.x, self.x])
        if self.graph is not None:
            self.graph.inputs["latents"].copy_(out)
        else:
            self.feeds["latents"] = out

    def _latents(self) -> torch.Tensor:
        if self.x is not None:
            return self.x
        return self.graph.inputs["latents"] if self.graph is not None else self.feeds["latents"]

    def _text_branch_step(self, timestep: float, timestep_next: float) -> None:
        """A DDS step injecting both branches: the full model, eagerly."""
        s, f, cond = self.stages, self.feeds, self.cond
        c = lambda a: s.tensor(a).to(s.dtype)  # noqa: E731
        kv = cond.kv
        ref = ReferenceInputs(kv=ReferenceKV(c(kv.img_k), c(kv.img_v), c(kv.txt_k), c(kv.txt_v)),
                              scales=c(cond.scales), masks=c(cond.masks), block_scales=c(cond.block_scales),
                              txt_block_scales=c(cond.txt_block_scales), mode=s.mode, image_tokens=cond.image_tokens)
        x = self._latents()
        b = x.shape[0]
        t = torch.full((b,), timestep, device=s.device)
        t_next = torch.full((b,), timestep_next, device=s.device)
        v = dit_forward(s.transformer, x.to(s.dtype), f["text_embeds"].to(s.dtype), f["pooled"].to(s.dtype), t,
                        f["guidance"], f["img_ids"], f["txt_ids"], ref).float()
        x.copy_(euler_step(x, v, t[:, None, None], t_next[:, None, None]))

    def latents(self) -> np.ndarray:
        return self._latents().float().cpu().numpy()
