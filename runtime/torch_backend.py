"""PyTorch stages for the runtime: the reference :class:`~dynaip_trt.pipeline.TorchStages`, plus CUDA graphs of the
DiT step on a GPU (one graph per bucket of input shapes, see :mod:`runtime.cuda_graphs`)."""

from __future__ import annotations

import logging

import torch

from dynaip_trt.attention import ReferenceInputs
from dynaip_trt.models import DynaIPModels
from dynaip_trt.pipeline import TorchStages

from .cuda_graphs import CapturedGraph, GraphCache, capture_graph, ensure_free_memory, shape_key, tensor_bytes

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


def place_models(models: DynaIPModels, device: torch.device, dtype: torch.dtype | None = None) -> DynaIPModels:
    """Move ``models`` to ``device`` (and ``dtype``) after checking that the GPU has room for them."""
    if models.device == device and dtype in (None, models.dtype):
        return models
    ensure_free_memory(device, model_bytes(models, dtype), f"the {models.config.name} models")
    return models.to(device, dtype)


class TorchGraphStages(TorchStages):
    """PyTorch stages whose DiT step is replayed from a CUDA graph per bucket when the models are on a GPU.

    Steps with the text branch active or per-block scales (DDS schedules) run eagerly; everything else is
    captured once per bucket of input shapes (batch, resolution, subject count, mask presence) and replayed.

    Args:
        models: the model family (already on its device).
        max_subjects: subject limit (default: the config's).
        cuda_graphs: capture/replay the DiT step on CUDA (``False``: always eager).
        max_graphs: buckets kept captured at once (LRU).
    """

    def __init__(self, models: DynaIPModels, max_subjects: int | None = None, cuda_graphs: bool = True,
                 max_graphs: int = 8):
        super().__init__(models, max_subjects)
        self.graphs = GraphCache(max_graphs) if cuda_graphs and self.device.type == "cuda" else None

    @torch.no_grad()
    def dit(self, latents: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor, timestep: torch.Tensor,
            guidance: torch.Tensor, img_ids: torch.Tensor, txt_ids: torch.Tensor, ref: ReferenceInputs
            ) -> torch.Tensor:
        """Packed latents ``[B, N, 64]`` -> velocity ``[B, N, 64]`` float32 (a fresh tensor)."""
        if self.graphs is None or ref.txt_k is not None or ref.block_scales is not None:
            return super().dit(latents, text, pooled, timestep, guidance, img_ids, txt_ids, ref)
        feeds = {"latents": latents, "text": text, "pooled": pooled, "timestep": timestep, "guidance": guidance,
                 "img_ids": img_ids, "txt_ids": txt_ids, "img_k": ref.img_k, "img_v": ref.img_v,
                 "scales": ref.scales, "masks": ref.masks}
        key = (shape_key(feeds), ref.mode, ref.image_tokens)
        feeds = {k: v for k, v in feeds.items() if v is not None}
        graph = self.graphs.get(key)
        if graph is not None:
            return graph.replay(feeds).clone()
        graph = self._capture(feeds, ref.mode, ref.image_tokens)
        self.graphs.put(key, graph)
        logger.info("captured the DiT step for bucket %s (%d bucket(s) cached)", key[0], len(self.graphs))
        return graph.output.clone()

    def _capture(self, feeds: dict[str, torch.Tensor], mode: str, image_tokens: int | None) -> CapturedGraph:
        """Static copies of ``feeds`` (model dtype, on device) and a graph of one step over them."""
        dtype = self.models.dtype
        static = {k: v.to(self.device, dtype if v.is_floating_point() else v.dtype).clone() for k, v in feeds.items()}
        b, n = static["latents"].shape[:2]
        width = self.models.config.transformer.inner_dim
        act = ACTIVATION_FACTOR * b * (n + static["text"].shape[1]) * width * static["latents"].element_size()
        needed = act + sum(t.numel() * t.element_size() for t in static.values())
        ensure_free_memory(self.device, needed, f"capturing the DiT step for batch {b}, {n} image tokens")

        def step() -> torch.Tensor:
            ref = ReferenceInputs(img_k=static["img_k"], img_v=static["img_v"], scales=static["scales"],
                                  masks=static.get("masks"), mode=mode, image_tokens=image_tokens)
            return self.models.transformer(
                hidden_states=static["latents"], encoder_hidden_states=static["text"],
                pooled_projections=static["pooled"], timestep=static["timestep"], guidance=static["guidance"],
                img_ids=static["img_ids"], txt_ids=static["txt_ids"], joint_attention_kwargs={"dynaip": ref},
                return_dict=False,
            )[0].float()

        return capture_graph(static, step)
