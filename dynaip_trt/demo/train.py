"""Train the tiny DynaIP default on the synthetic world, end to end, seeded, checkpointed and resumable.

    python -m dynaip_trt.demo.train --out runs/tiny                 # every stage, in order (the full recipe)
    python -m dynaip_trt.demo.train --out runs/proxy --proxy        # a short proxy run for iterating
    python -m dynaip_trt.demo.train --out runs/tiny --stage adapter # rerun one stage alone (earlier ones done)

Stages (each writes ``OUT/<stage>.safetensors`` when it finishes; an interrupted stage resumes from
``OUT/checkpoints/<stage>.safetensors``; a stage already finished is skipped by a full run and rerun from scratch
by ``--stage``):

- ``text``: the frozen text encoders (CLIP text for the pooled vector, T5 for the sequence) with seeded random
  weights, and the word-level tokenizer over the world's vocabulary. Instant.
- ``vae``: ``AutoencoderKL`` with two blocks (spatial factor 2, 16 latent channels) trained to reconstruct scene
  renders from the posterior mean (+ a small KL term); then the latent shift and scale are measured (FLUX's
  ``shift_factor``/``scaling_factor``).
- ``vision``: the ``CLIPVisionModel`` tower trained to name the shape, colour and pattern of augmented reference
  views of the training subjects (a stand-in for CLIP's pretraining on a world where nothing else exists); the
  classification heads are dropped afterwards.
- ``base``: ``FluxTransformer2DModel`` text-to-image on scenes of training subjects, captioned half of the time
  with the generic prompt the adapter sees (so adapter scale 0 is a fair baseline) and half of the time with the
  attribute-naming caption (so the base knows how to draw every shape, colour and pattern).
- ``adapter``: the DynaIP adapter (HMoE fusion over the tapped CLIP levels + decoupled reference K/V) with the base
  frozen, injected into both branches (image and text) as DDS prescribes for training; one or two subjects per
  scene, each with an independently augmented reference. ``--attention-weight W`` adds MM-Diff's attention constraint
  (docs/dci-mmdiff.md; a short fine-tune of the shipped adapter with it: ``python -m
  dynaip_trt.demo.finetune_constraint``).
- ``package``: the final weights, tokenizer and config in ``OUT/package/`` (the layout of ``dynaip_trt/data/tiny``).

Every batch is drawn from ``numpy.random.default_rng([seed, stage, step])`` and a torch generator seeded the same
way, so a resumed run computes exactly what an uninterrupted one would. Losses go to ``OUT/logs/<stage>.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from tqdm.auto import tqdm

from ..adapter import install_processors
from ..attention import ReferenceInputs
from ..conditioning import ReferenceKV
from ..configs import DynaIPConfig, VaeConfig, get_config
from ..cli import cli_main, configure_logging
from ..errors import ConfigError, DynaIPError
from ..files import atomic_path
from ..images import preprocess_clip
from ..models import (
    DynaIPModels,
    build_adapter,
    build_text_encoders,
    build_transformer,
    build_vae,
    build_vision,
    clip_levels,
    dit_forward,
    encode_text,
    finalize,
)
from ..sampling import flux_mu, latent_image_ids, pack_latents, text_ids
from ..text import Tokenizer
from ..training import attention_constraint_loss, check_constraint_mode
from ..weights import save_embedded
from .world import COLOURS, PATTERNS, SHAPES, World

logger = logging.getLogger(__name__)

STAGES = ("text", "vae", "vision", "base", "adapter", "package")
STAGE_IDS = {name: i for i, name in enumerate(STAGES)}
NEEDS = {"text": (), "vae": (), "vision": (), "base": ("text", "vae"), "adapter": ("text", "vae", "vision", "base"),
         "package": ("text", "vae", "vision", "base", "adapter")}
CONFIG_NAME = "tiny"


@dataclass(frozen=True)
class StageRecipe:
    """Optimisation settings of one trained stage (AdamW, linear warm-up then cosine decay to 10%)."""

    steps: int
    batch: int
    lr: float
    warmup: int = 100
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: none); the EMA is the output
    checkpoint_every: int = 250
    log_every: int = 25


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights besides the seed.

    ``base_subject_odds``: probabilities of 1, 2, 3 subjects in base scenes; ``two_subject_every``: every k-th
    adapter batch has two subjects per scene (the others one); ``kl_weight``: the VAE's KL term;
    ``measure_samples``: images behind the VAE's latent statistics and the vision tower's held-out accuracy;
    ``vision_hue_odds``: share of the vision stage's references whose hues are turned at random (colour label
    ignored), so shape and pattern are learnt apart from colour (without it the tower reads shape off the training
    combinations: 36% right on held-out subjects after 1500 steps; 86% with half the references turned);
    ``subject_weight``: extra flow-matching loss weight of image tokens covered by subjects (``1 + w * coverage``),
    so the textured backgrounds do not drown the subjects' shapes; ``base_describe_odds``: share of base scenes
    captioned with their subjects' attributes ("a red striped circle on the left in a forest") instead of the
    generic prompt, so the base learns to draw each shape, colour and pattern on demand (the generic wording stays
    in its training, and carries no attribute: adapter scale 0 remains a fair baseline); ``attention_weight``:
    weight of MM-Diff's attention constraint in the adapter stage
    (:func:`~dynaip_trt.training.attention_constraint_loss`, each subject's region from the world's masks; 0: off,
    as the shipped adapter was trained; needs ``concat`` mode).
    """

    vae: StageRecipe
    vision: StageRecipe
    base: StageRecipe
    adapter: StageRecipe
    base_subject_odds: tuple[float, float, float] = (0.5, 0.3, 0.2)
    two_subject_every: int = 4
    kl_weight: float = 1e-6
    measure_samples: int = 256
    vision_hue_odds: float = 0.75
    subject_weight: float = 4.0
    base_describe_odds: float = 0.5
    attention_weight: float = 0.0

    def stage(self, name: str) -> StageRecipe:
        return getattr(self, name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FULL = Recipe(
    vae=StageRecipe(steps=1500, batch=32, lr=1e-3, warmup=50),
    vision=StageRecipe(steps=1500, batch=64, lr=1e-3, warmup=50),
    base=StageRecipe(steps=3000, batch=32, lr=1e-3, warmup=200, ema=0.999),
    adapter=StageRecipe(steps=2500, batch=32, lr=1e-3, warmup=200, ema=0.999),
)
PROXY = Recipe(
    vae=StageRecipe(steps=300, batch=32, lr=1e-3, warmup=30),
    vision=StageRecipe(steps=300, batch=64, lr=1e-3, warmup=30),
    base=StageRecipe(steps=600, batch=32, lr=1e-3, warmup=50, ema=0.99),
    adapter=StageRecipe(steps=400, batch=32, lr=1e-3, warmup=50, ema=0.99),
)


# ------------------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """One training run: output folder, config, recipe, seed and the world."""

    out: Path
    config: DynaIPConfig
    recipe: Recipe
    seed: int
    world: World
    progress: bool = True

    def path(self, name: str) -> Path:
        return self.out / f"{name}.safetensors"

    def done(self, stage: str) -> bool:
        return (self.out / "package" / "config.json").is_file() if stage == "package" else self.path(stage).is_file()

    def rng(self, stage: str, step: int) -> tuple[np.random.Generator, torch.Generator]:
        """The generators of one batch: a pure function of (seed, stage, step)."""
        seq = np.random.SeedSequence([self.seed, STAGE_IDS[stage], step])
        torch_seed = int(seq.generate_state(2, np.uint64)[1] % (2**63))
        return np.random.default_rng(seq), torch.Generator().manual_seed(torch_seed)


def build_tokenizer(world: World, max_length: int) -> Tokenizer:
    """A word-level tokenizer over the world's vocabulary (+ ``,`` ``.``) padded/truncated to ``max_length``:
    ``[PAD]`` 0, ``[EOS]`` 1 (appended), ``[UNK]`` 2 (the ``tiny`` config's ``clip_pad_id``/``clip_eos_id``)."""
    from tokenizers import Tokenizer as HFTokenizer, models, normalizers, pre_tokenizers, processors

    words = ["[PAD]", "[EOS]", "[UNK]", ",", ".", *world.vocabulary()]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A [EOS]", special_tokens=[("[EOS]", 1)])
    return Tokenizer(tok, max_length, pad_id=0)


# --------------------------------------------------------------------------------------------- saving / loading
def save_module(module: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """A module's state as safetensors (tied weights stored once), written atomically."""
    with atomic_path(path) as tmp:
        save_model(module, str(tmp), metadata=metadata)


def load_module(module: nn.Module, path: Path) -> nn.Module:
    load_model(module, str(path), strict=True)
    return module


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(seed)
    return build()


def vae_config(run: Run) -> VaeConfig:
    """The VAE config with the latent shift/scale the ``vae`` stage measured."""
    meta = _metadata(run.path("vae"))
    return dataclasses.replace(run.config.vae, scaling_factor=float(meta["scaling_factor"]),
                               shift_factor=float(meta["shift_factor"]))


def trained_config(run: Run) -> DynaIPConfig:
    return dataclasses.replace(run.config, vae=vae_config(run))


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def load_family(run: Run, with_adapter: bool = True) -> DynaIPModels:
    """The models of a run's finished stages (``finalize``d: processors installed, eval mode, base frozen).
    Without ``with_adapter`` (or before the adapter stage) the adapter is the zero-initialised one."""
    cfg = trained_config(run)
    clip_text, t5 = build_text_encoders(cfg)
    load_module(clip_text, run.path("clip_text"))
    load_module(t5, run.path("text"))
    vae = load_module(build_vae(cfg), run.path("vae"))
    vision = load_module(build_vision(cfg), run.path("vision"))
    transformer = load_module(build_transformer(cfg), run.path("base"))
    adapter = build_adapter(cfg)
    if with_adapter and run.done("adapter"):
        load_module(adapter, run.path("adapter"))
    tok = Tokenizer.load(run.out, cfg.text.max_text_length)
    return finalize(DynaIPModels(cfg, transformer, vision, clip_text, t5, vae, adapter, tok, tok))


# ------------------------------------------------------------------------------------------------- checkpoints
def _save_checkpoint(path: Path, step: int, modules: dict[str, nn.Module], ema: dict[str, torch.Tensor],
                     opt: torch.optim.Optimizer) -> None:
    """Model, EMA and AdamW state as one safetensors file (no pickle), written atomically."""
    tensors = {f"model.{name}.{k}": v.detach().contiguous().clone()
               for name, m in modules.items() for k, v in m.state_dict().items()}
    tensors.update({f"ema.{k}": v.contiguous().clone() for k, v in ema.items()})
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).contiguous().clone()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"step": str(step)})


def _load_checkpoint(path: Path, modules: dict[str, nn.Module], ema: dict[str, torch.Tensor],
                     opt: torch.optim.Optimizer) -> int:
    tensors = load_file(str(path))
    step = int(_metadata(path)["step"])
    for name, m in modules.items():
        prefix = f"model.{name}."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    for k in ema:
        ema[k].copy_(tensors[f"ema.{k}"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return step


def _truncate_log(path: Path, step: int) -> None:
    """Keep the loss-log lines up to ``step`` (a stage resumed there logs the rest again)."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in lines))


def _lr(recipe: StageRecipe, step: int) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def optimise(run: Run, stage: str, modules: dict[str, nn.Module], loss_fn: Callable[[int], torch.Tensor],
             stop_after: int | None = None) -> dict[str, torch.Tensor] | None:
    """The training loop shared by every stage: AdamW over the trainable parameters of ``modules``, gradient
    clipping at 1, optional EMA, a checkpoint every ``checkpoint_every`` steps, a JSONL loss log.

    ``loss_fn(step)`` draws its own batch (from :meth:`Run.rng`). Returns the weights to keep (the EMA when the
    recipe has one, else the modules' own), or ``None`` when stopped early by ``stop_after`` (tests).
    """
    recipe = run.recipe.stage(stage)
    params = {f"{name}.{k}": p for name, m in modules.items() for k, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=recipe.lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = {k: p.detach().clone() for k, p in params.items()} if recipe.ema else {}
    ckpt = run.out / "checkpoints" / f"{stage}.safetensors"
    log_path = run.out / "logs" / f"{stage}.jsonl"
    start = _load_checkpoint(ckpt, modules, ema, opt) if ckpt.is_file() else 0
    if start:
        logger.info("%s: resuming at step %d from %s", stage, start, ckpt)
    _truncate_log(log_path, start)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for m in modules.values():
        m.train()
    window: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(start, recipe.steps), desc=stage, initial=start, total=recipe.steps, disable=not run.progress)
    for step in bar:
        lr = _lr(recipe, step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = loss_fn(step)
        if not torch.isfinite(loss):
            raise DynaIPError(f"{stage}: the loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        if ema:
            decay = min(recipe.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, p in params.items():
                    ema[k].lerp_(p.detach(), 1 - decay)
        window.append(loss.item())
        done = step + 1
        if done % recipe.log_every == 0 or done == recipe.steps:
            elapsed = time.perf_counter() - t0
            entry = {"step": done, "loss": float(np.mean(window)), "lr": lr,
                     "s_per_step": elapsed / len(window)}
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            bar.set_postfix(loss=f"{entry['loss']:.4f}")
            window, t0 = [], time.perf_counter()
        if done % recipe.checkpoint_every == 0 or done == recipe.steps:
            _save_checkpoint(ckpt, done, modules, ema, opt)
        if stop_after is not None and done >= stop_after and done < recipe.steps:
            return None
    for m in modules.values():
        m.eval()
    if ema:
        return ema
    return {k: p.detach().clone() for k, p in params.items()}


def keep(module: nn.Module, weights: dict[str, torch.Tensor], prefix: str) -> nn.Module:
    """Load the weights :func:`optimise` kept (``prefix.name`` keys) into ``module``'s parameters."""
    with torch.no_grad():
        for k, p in module.named_parameters():
            p.copy_(weights[f"{prefix}.{k}"])
    return module


def finish(run: Run, stage: str, module: nn.Module, metadata: dict[str, str] | None = None) -> None:
    """Write ``OUT/<stage>.safetensors`` (the stage is done) and drop its checkpoint."""
    save_module(module, run.path(stage), {"stage": stage, "seed": str(run.seed), **(metadata or {})})
    (run.out / "checkpoints" / f"{stage}.safetensors").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- batches
def to_pixels(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` images -> ``[B, 3, H, W]`` float in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def clip_pixels(images: list[np.ndarray], cfg: DynaIPConfig) -> torch.Tensor:
    """uint8 references -> CLIP pixel values ``[M, 3, S, S]`` (the runtime's own preprocessing)."""
    return torch.from_numpy(preprocess_clip([Image.fromarray(im) for im in images], cfg.vision))


def sample_sigmas(n: int, image_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """Training noise levels ``[n]``: logit-normal, shifted like FLUX's schedule for this token count."""
    s = torch.sigmoid(torch.randn(n, generator=gen))
    mu = math.exp(flux_mu(image_tokens))
    return mu / (mu + (1 / s - 1))


class Encoders:
    """Frozen encoders the DiT stages share: text and the VAE (images -> packed latents)."""

    def __init__(self, run: Run, clip_text: nn.Module, t5: nn.Module, tokenizer: Tokenizer,
                 vae: nn.Module | None = None):
        self.cfg = run.config
        self.clip_text, self.t5, self.tokenizer, self.vae = clip_text, t5, tokenizer, vae

    @torch.no_grad()
    def text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (``[B, L, t5_dim]``, ``[B, clip_dim]``)."""
        t = self.cfg.text
        ids = torch.from_numpy(self.tokenizer.encode_batch(prompts))  # both encoders take max_text_length tokens
        return encode_text(self.clip_text, self.t5, ids, ids)

    @torch.no_grad()
    def latents(self, images: list[np.ndarray]) -> torch.Tensor:
        """Images -> normalised packed latents ``[B, N, 64]`` (the VAE posterior's mean)."""
        z = self.vae.encode(to_pixels(images)).latent_dist.mode()
        z = (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor
        return torch.from_numpy(pack_latents(z.numpy()))


def velocity(transformer: nn.Module, cfg: DynaIPConfig, x_t: torch.Tensor, sigmas: torch.Tensor,
             text: torch.Tensor, pooled: torch.Tensor, ref: ReferenceInputs | None) -> torch.Tensor:
    """The transformer's velocity in training: packed ``x_t [B, N, 64]`` at noise levels ``sigmas [B]`` ->
    ``[B, N, 64]`` (:func:`~dynaip_trt.models.dit_forward` with the config's guidance and position ids)."""
    return dit_forward(transformer, x_t, text, pooled, sigmas, torch.full((x_t.shape[0],), cfg.guidance),
                       torch.from_numpy(latent_image_ids(cfg.height, cfg.width, cfg.vae.spatial_factor)),
                       torch.from_numpy(text_ids(text.shape[1])), ref)


def token_coverage(masks: list[np.ndarray], patch: int) -> torch.Tensor:
    """Per-subject image-token coverage ``[B, S, N]`` in [0, 1]: the share of each token's ``patch x patch`` pixels
    covered by each subject (from the world's masks ``[S, H, W]`` per scene, all scenes with ``S`` subjects)."""
    out = []
    for m in masks:
        s, h, w = m.shape
        out.append(m.reshape(s, h // patch, patch, w // patch, patch).mean(axis=(2, 4)).reshape(s, -1))
    return torch.from_numpy(np.stack(out)).float()


def token_weights(masks: list[np.ndarray], patch: int, subject_weight: float) -> torch.Tensor:
    """Per-image-token loss weights ``[B, N]``: ``1 + subject_weight * coverage``, where coverage is the share of
    the token's ``patch x patch`` pixels covered by any subject (from the world's masks ``[S, H, W]``)."""
    return 1.0 + subject_weight * torch.stack([token_coverage([m], patch)[0].sum(0) for m in masks])


def flow_loss(transformer: nn.Module, cfg: DynaIPConfig, x0: torch.Tensor, text: torch.Tensor,
              pooled: torch.Tensor, gen: torch.Generator, weights: torch.Tensor, ref: ReferenceInputs | None = None
              ) -> torch.Tensor:
    """Rectified-flow loss: MSE between the predicted and the true velocity ``noise - x0``, each image token
    weighted by ``weights [B, N]`` (normalised by their mean)."""
    sigmas = sample_sigmas(x0.shape[0], x0.shape[1], gen)
    noise = torch.randn(x0.shape, generator=gen)
    t = sigmas[:, None, None]
    pred = velocity(transformer, cfg, (1 - t) * x0 + t * noise, sigmas, text, pooled, ref)
    per_token = (pred - (noise - x0)).square().mean(-1)  # [B, N]
    return (per_token * weights).mean() / weights.mean()


# ----------------------------------------------------------------------------------------------------- stages
def stage_text(run: Run, stop_after: int | None = None) -> None:
    tok = build_tokenizer(run.world, run.config.text.max_text_length)
    t = run.config.text
    if tok.vocab_size > min(t.clip_vocab_size, t.t5_vocab_size):
        raise ConfigError(f"the world's vocabulary has {tok.vocab_size} tokens; the text encoders hold "
                          f"{min(t.clip_vocab_size, t.t5_vocab_size)}")
    clip_text, t5 = _seeded(run.seed, lambda: build_text_encoders(run.config))  # type: ignore[arg-type]
    tok.save(run.out)
    save_module(clip_text, run.path("clip_text"), {"stage": "text", "seed": str(run.seed)})
    finish(run, "text", t5)  # OUT/text.safetensors: the T5 encoder, written last


def _scene_images(run: Run, rng: np.random.Generator, n: int, odds: tuple[float, ...], describe_odds: float = 0.0
                  ) -> tuple[list[np.ndarray], list[str], list[np.ndarray]]:
    """``n`` scenes of training subjects (1..3 subjects with ``odds``) -> (images, prompts, masks). Each prompt is
    the generic one, or with probability ``describe_odds`` the caption naming every subject's attributes."""
    counts = rng.choice(len(odds), n, p=np.asarray(odds) / sum(odds)) + 1
    scenes = [run.world.sample_scene(rng, int(c)) for c in counts]
    rendered = [run.world.render(s) for s in scenes]
    prompts = [run.world.describe(s) if rng.random() < describe_odds else run.world.prompt(s) for s in scenes]
    return [r[0] for r in rendered], prompts, [r[1] for r in rendered]


def stage_vae(run: Run, stop_after: int | None = None) -> None:
    cfg, recipe = run.config, run.recipe
    vae = _seeded(run.seed + STAGE_IDS["vae"], lambda: build_vae(cfg))

    def loss_fn(step: int) -> torch.Tensor:
        # the posterior mean is what the DiT stages encode to and decode from: train the decoder on it (sharper than
        # on posterior samples); the KL term keeps the latents' scale in check
        rng, _ = run.rng("vae", step)
        x = to_pixels(_scene_images(run, rng, recipe.vae.batch, (1, 1, 1))[0])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample
        return F.mse_loss(rec, x) + recipe.kl_weight * post.kl().mean()

    weights = optimise(run, "vae", {"vae": vae}, loss_fn, stop_after)
    if weights is None:
        return
    keep(vae, weights, "vae")
    # latent statistics of training scenes -> FLUX's shift/scale (rounded: they become config constants)
    rng, _ = run.rng("vae", recipe.vae.steps)
    with torch.no_grad():
        x = to_pixels(_scene_images(run, rng, recipe.measure_samples, (1, 1, 1))[0])
        z = vae.encode(x).latent_dist.mode()
        psnr = float(-10 * torch.log10(F.mse_loss(vae.decode(z).sample, x) / 4))
    shift, scale = float(z.mean()), 1.0 / float(z.std())
    logger.info("vae: latent shift %.4f, scale %.4f, reconstruction PSNR %.1f dB", shift, scale, psnr)
    finish(run, "vae", vae, {"shift_factor": f"{shift:.4f}", "scaling_factor": f"{scale:.4f}",
                             "psnr_db": f"{psnr:.2f}"})


class VisionPretrainer(nn.Module):
    """The CLIP vision tower + attribute heads on its pooled output (the heads are dropped after the stage)."""

    def __init__(self, vision: nn.Module, width: int):
        super().__init__()
        self.vision = vision
        self.heads = nn.Linear(width, len(SHAPES) + len(COLOURS) + len(PATTERNS))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits = self.heads(self.vision(pixel_values=pixels).pooler_output)
        return logits.split([len(SHAPES), len(COLOURS), len(PATTERNS)], dim=-1)


def rotate_hue(image: np.ndarray, turn: float) -> np.ndarray:
    """uint8 RGB ``[H, W, 3]`` with every hue turned by ``turn`` (a fraction of the colour wheel); saturation and
    value are kept."""
    x = image.astype(np.float64) / 255.0
    v, c_min = x.max(-1), x.min(-1)
    chroma = v - c_min
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    safe = np.maximum(chroma, 1e-12)
    h = np.where(v == r, ((g - b) / safe) % 6, np.where(v == g, (b - r) / safe + 2, (r - g) / safe + 4)) / 6
    h = (h + turn) % 1.0
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6) % 6  # [H, W, 3]
    out = v[..., None] - chroma[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)
    return np.clip(np.round(out * 255), 0, 255).astype(np.uint8)


def _reference_batch(run: Run, rng: np.random.Generator, n: int, split: str, hue_odds: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` augmented references of random subjects of ``split`` -> (CLIP pixels, labels ``[n, 3]``). With
    probability ``hue_odds`` a reference's hues are turned at random and its colour label becomes -1 (ignored)."""
    pool = run.world.split(split)
    subjects = [pool[i] for i in rng.integers(0, len(pool), n)]
    images, labels = [], []
    for s in subjects:
        image, label = run.world.reference(s, rng), list(s.labels)
        if rng.random() < hue_odds:
            image, label[1] = rotate_hue(image, rng.uniform(0.05, 0.95)), -1
        images.append(image)
        labels.append(label)
    return clip_pixels(images, run.config), torch.tensor(labels)


def stage_vision(run: Run, stop_after: int | None = None) -> None:
    cfg = run.config
    model = _seeded(run.seed + STAGE_IDS["vision"],
                    lambda: VisionPretrainer(build_vision(cfg), cfg.vision.hidden_size))

    def loss_fn(step: int) -> torch.Tensor:
        rng, _ = run.rng("vision", step)
        pixels, labels = _reference_batch(run, rng, run.recipe.vision.batch, "train", run.recipe.vision_hue_odds)
        return sum(F.cross_entropy(lg, labels[:, i], ignore_index=-1)  # type: ignore
                   for i, lg in enumerate(model(pixels)) if (labels[:, i] >= 0).any())  # a batch may lack colours

    weights = optimise(run, "vision", {"vision": model}, loss_fn, stop_after)
    if weights is None:
        return
    keep(model, weights, "vision")
    with torch.no_grad():
        rng, _ = run.rng("vision", run.recipe.vision.steps)
        pixels, labels = _reference_batch(run, rng, run.recipe.measure_samples, "heldout")
        acc = [float((lg.argmax(-1) == labels[:, i]).float().mean()) for i, lg in enumerate(model(pixels))]
    logger.info("vision: held-out reference accuracy shape %.3f colour %.3f pattern %.3f", *acc)
    finish(run, "vision", model.vision, {"heldout_accuracy": json.dumps(dict(zip(("shape", "colour", "pattern"),
                                                                                 acc)))})


def _encoders(run: Run) -> Encoders:
    cfg = trained_config(run)
    clip_text, t5 = build_text_encoders(cfg)
    load_module(clip_text, run.path("clip_text")).eval().requires_grad_(False)
    load_module(t5, run.path("text")).eval().requires_grad_(False)
    vae = load_module(build_vae(cfg), run.path("vae")).eval().requires_grad_(False)
    return Encoders(dataclasses.replace(run, config=cfg), clip_text, t5,
                    Tokenizer.load(run.out, cfg.text.max_text_length), vae)


def stage_base(run: Run, stop_after: int | None = None) -> None:
    cfg = trained_config(run)
    enc = _encoders(run)
    transformer = _seeded(run.seed + STAGE_IDS["base"], lambda: build_transformer(cfg))
    install_processors(transformer, cfg.adapter)  # train with the exact processors inference runs
    patch = cfg.pixel_multiple  # pixels per image token side

    def loss_fn(step: int) -> torch.Tensor:
        rng, gen = run.rng("base", step)
        images, prompts, masks = _scene_images(run, rng, run.recipe.base.batch, run.recipe.base_subject_odds,
                                               run.recipe.base_describe_odds)
        text, pooled = enc.text(prompts)
        weights = token_weights(masks, patch, run.recipe.subject_weight)
        return flow_loss(transformer, cfg, enc.latents(images), text, pooled, gen, weights)

    weights = optimise(run, "base", {"transformer": transformer}, loss_fn, stop_after)
    if weights is not None:
        finish(run, "base", keep(transformer, weights, "transformer"))


def adapter_loss(run: Run, cfg: DynaIPConfig, enc: Encoders, transformer: nn.Module, vision: nn.Module,
                 adapter: nn.Module) -> Callable[[int], torch.Tensor]:
    """The adapter stage's ``loss_fn(step)`` (base, vision tower and encoders frozen): the flow-matching loss of a
    batch of one- or two-subject scenes (every ``two_subject_every``-th batch two), plus ``attention_weight`` times
    MM-Diff's attention constraint on the image-to-reference attention, each subject's region from the world."""
    world, recipe = run.world, run.recipe
    patch = cfg.pixel_multiple
    if recipe.attention_weight:
        check_constraint_mode(cfg.adapter.attention_mode)

    def loss_fn(step: int) -> torch.Tensor:
        rng, gen = run.rng("adapter", step)
        n_subj = 2 if step % recipe.two_subject_every == recipe.two_subject_every - 1 else 1
        b = recipe.adapter.batch
        scenes = [world.sample_scene(rng, n_subj) for _ in range(b)]
        refs = [world.reference(p.subject, rng) for s in scenes for p in s.placements]  # [B*S] subject-major
        text, pooled = enc.text([world.prompt(s) for s in scenes])
        rendered = [world.render(s) for s in scenes]
        x0 = enc.latents([r[0] for r in rendered])
        masks = [r[1] for r in rendered]
        weights = token_weights(masks, patch, recipe.subject_weight)
        with torch.no_grad():
            levels = clip_levels(vision, clip_pixels(refs, cfg), cfg.adapter.tap_layers)  # [B*S, L, P, C]
        tokens = adapter.reference_tokens(levels.unflatten(0, (b, n_subj)))  # [B, S, N, W]
        img_k, img_v = adapter.image_kv(tokens)
        txt_k, txt_v = adapter.text_kv(tokens)
        maps: list[torch.Tensor] | None = [] if recipe.attention_weight else None
        ref = ReferenceInputs(kv=ReferenceKV(img_k, img_v, txt_k, txt_v), scales=torch.ones(b, n_subj),
                              txt_block_scales=torch.ones(txt_k.shape[0]), mode=cfg.adapter.attention_mode,
                              image_tokens=x0.shape[1], attention_maps=maps)
        loss = flow_loss(transformer, cfg, x0, text, pooled, gen, weights, ref)
        if maps is not None:
            loss = loss + recipe.attention_weight * attention_constraint_loss(maps, token_coverage(masks, patch))
        return loss

    return loss_fn


def stage_adapter(run: Run, stop_after: int | None = None) -> None:
    cfg = trained_config(run)
    enc = _encoders(run)
    transformer = load_module(build_transformer(cfg), run.path("base"))
    install_processors(transformer, cfg.adapter)
    transformer.eval().requires_grad_(False)
    vision = load_module(build_vision(cfg), run.path("vision")).eval().requires_grad_(False)
    adapter = _seeded(run.seed + STAGE_IDS["adapter"], lambda: build_adapter(cfg))
    weights = optimise(run, "adapter", {"adapter": adapter},
                       adapter_loss(run, cfg, enc, transformer, vision, adapter), stop_after)
    if weights is not None:
        finish(run, "adapter", keep(adapter, weights, "adapter"))


def stage_package(run: Run, stop_after: int | None = None) -> None:
    """Write the final family to ``OUT/package`` (what ships as ``dynaip_trt/data/tiny``)."""
    models = load_family(run)
    measured = models.config.vae
    shipped = run.config.vae
    if (measured.scaling_factor, measured.shift_factor) != (shipped.scaling_factor, shipped.shift_factor):
        logger.warning("the VAE latent scale/shift measured here (%s, %s) differ from the %r config's (%s, %s): "
                       "update dynaip_trt/configs.py before shipping these weights", measured.scaling_factor,
                       measured.shift_factor, run.config.name, shipped.scaling_factor, shipped.shift_factor)
    save_embedded(models, run.out / "package")


RUNNERS: dict[str, Callable[[Run, int | None], None]] = {
    "text": stage_text, "vae": stage_vae, "vision": stage_vision, "base": stage_base, "adapter": stage_adapter,
    "package": stage_package,
}


def _check_recipe(run: Run) -> None:
    """A run folder belongs to one recipe, seed and config: resuming with others would mix two runs."""
    path = run.out / "recipe.json"
    config = run.config.to_dict()
    for k in ("scaling_factor", "shift_factor"):  # measured by the vae stage, then copied into configs.py
        del config["vae"][k]
    mine = {"recipe": run.recipe.to_dict(), "seed": run.seed, "config": config,
            "world": {"size": run.world.size, "reference_size": run.world.reference_size}}
    if path.is_file():
        theirs = json.loads(path.read_text())
        theirs.get("recipe", {}).setdefault("attention_weight", 0.0)  # runs from before the option had it off
        if theirs != json.loads(json.dumps(mine)):
            raise ConfigError(f"{run.out} holds a run with another recipe, seed or config ({path}); use a new --out "
                              f"or the same options")
        return
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(mine, indent=1))


def train(out: str | Path, stages: tuple[str, ...] = STAGES, recipe: Recipe = FULL, seed: int = 0,
          config: DynaIPConfig | None = None, progress: bool = True, rerun: bool = False,
          stop_after: int | None = None) -> Run:
    """Run ``stages`` in order into ``out``.

    A finished stage is skipped unless ``rerun`` (then it is trained again from scratch); an interrupted one
    resumes from its checkpoint. ``stop_after`` stops every trained stage after that many steps, checkpointed
    (to test resuming). Returns the :class:`Run`.
    """
    cfg = config or get_config(CONFIG_NAME)
    world = World(size=cfg.height, reference_size=cfg.vision.image_size)
    if cfg.height != cfg.width:
        raise ConfigError(f"the world renders square images; the config is {cfg.height}x{cfg.width}")
    run = Run(Path(out), cfg, recipe, seed, world, progress)
    try:
        run.out.mkdir(parents=True, exist_ok=True)
        _check_recipe(run)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from e
    for stage in stages:
        needs = [s for s in NEEDS[stage] if not run.done(s)]
        if needs:
            raise ConfigError(f"stage {stage!r} needs the stages {needs} finished first in {run.out}")
        if run.done(stage) and not rerun:
            logger.info("%s: already finished in %s (rerun it alone with --stage %s)", stage, run.out, stage)
            continue
        if rerun and stage != "package":
            run.path(stage).unlink(missing_ok=True)
        t0 = time.perf_counter()
        RUNNERS[stage](run, stop_after)
        logger.info("%s: %s in %.1f min", stage, "finished" if run.done(stage) else "stopped",
                    (time.perf_counter() - t0) / 60)
        if not run.done(stage):
            break
    return run


def with_attention_weight(recipe: Recipe, weight: float) -> Recipe:
    """``recipe`` with the attention constraint's weight (``--attention-weight``: finite, >= 0)."""
    if not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"--attention-weight {weight:g} must be a finite number >= 0 (0: no constraint)")
    return dataclasses.replace(recipe, attention_weight=weight)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dynaip_trt.demo.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, stage outputs, package/)")
    p.add_argument("--stage", choices=("all",) + STAGES, default="all",
                   help="run one stage alone (trained again if finished); default: every unfinished stage")
    p.add_argument("--proxy", action="store_true", help="the short proxy recipe (minutes), for iterating")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention-weight", type=float, default=0.0, metavar="W",
                   help="adapter stage: weight of MM-Diff's attention constraint (each subject's attention confined "
                        "to its region; part of the recipe; default 0: off, as the shipped adapter was trained)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


@cli_main(logger)
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    one = args.stage != "all"
    recipe = with_attention_weight(PROXY if args.proxy else FULL, args.attention_weight)
    train(args.out, (args.stage,) if one else STAGES, recipe, args.seed,
          progress=not args.no_progress, rerun=one)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
