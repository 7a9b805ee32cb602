"""Attention processors for diffusers' ``FluxTransformer2DModel`` with DynaIP image-prompt injection.

Installed with :func:`dynaip_trt.adapter.install_processors` (no fork of diffusers). Compared with diffusers'
``FluxAttnProcessor`` they (a) keep attention 4-D ``[batch, heads, tokens, head_dim]`` and call
``F.scaled_dot_product_attention`` directly, so the graph exports cleanly to ONNX/TensorRT, (b) read RoPE from
:class:`FluxPosEmbedFP32` (no float64 ops), and (c) add the decoupled reference attention of DynaIP:

    img += s_img * Attn(q_img, K_img(R), V_img(R))       # image branch, always (scales / masks per subject)
    txt += s_txt * Attn(q_txt, K_txt(R), V_txt(R))       # text branch, training or a DDS schedule only

``q_*`` are each branch's queries after QK-norm and before RoPE. The reference K/V ``K(R), V(R)`` arrive already
projected (computed once per request by the fusion engine) through the ``dynaip`` joint-attention kwarg.

Where the image-branch term enters a double-stream block is configurable (``AdapterConfig.injection``): after
``to_out`` (DynaIP), before ``to_out`` (InstantX), or returned as a third output that diffusers'
``FluxTransformerBlock`` adds to the image stream after its feed-forward, ungated (XLabs, as diffusers'
``FluxIPAdapterAttnProcessor`` does). Single-stream blocks add it to the attention output (before their output
projection) on the image rows or on every row (InstantX).

With :class:`DBIMInputs` (DCI's dual-branch integration, :mod:`dynaip_trt.dbim`) the batch holds ``B`` concept rows
then their ``B`` auxiliary rows, and every double-stream block mixes the concept rows' image-token attention output
with the auxiliary rows' (:func:`dbim_mix`). Training can record each block's image-to-reference attention mass
per subject (``ReferenceInputs.attention_maps``, MM-Diff's attention constraint).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import ReferenceKV


class FluxPosEmbedFP32(nn.Module):
    """FLUX's 3-axis RoPE computed in float32 (diffusers' ``FluxPosEmbed`` uses float64, which TensorRT lacks).

    Forward: ``ids [tokens, 3]`` -> ``(cos, sin)``, each ``[tokens, head_dim]`` float32.
    """

    def __init__(self, theta: int, axes_dim: list[int] | tuple[int, ...]):
        super().__init__()
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = ids.float()
        cos_out, sin_out = [], []
        for i, dim in enumerate(self.axes_dim):
            exponent = torch.arange(0, dim, 2, dtype=torch.float32, device=ids.device) / dim
            freqs = 1.0 / (self.theta**exponent)  # [dim/2]
            angles = pos[:, i : i + 1] * freqs[None, :]  # [tokens, dim/2]
            # repeat_interleave(2) written as stack+flatten: [c0, c0, c1, c1, ...]
            cos_out.append(torch.stack([angles.cos(), angles.cos()], dim=-1).flatten(-2))
            sin_out.append(torch.stack([angles.sin(), angles.sin()], dim=-1).flatten(-2))
        return torch.cat(cos_out, dim=-1), torch.cat(sin_out, dim=-1)


class FP32TimeEmbedding:
    """Feed FLUX's timestep/guidance embedding float32 ``timestep * 1000`` and ``guidance * 1000``.

    diffusers' ``FluxTransformer2DModel.forward`` computes ``timestep.to(dtype) * 1000`` in the model's dtype: in
    bf16 guidance 3.5 becomes 3504 (bf16's spacing at 2048-4096 is 16), which moves the high frequencies of the
    sinusoidal embedding (measured: a bf16 DiT step's rel L2 error drops from ~5e-2 to ~1.5e-2 with this). A
    forward pre-hook on the transformer keeps the call's ``timestep``/``guidance``; one on ``time_text_embed``
    replaces its rounded inputs by float32 products (its sinusoidal projection runs in float32 anyway). Identical
    in float32. The hooks hold the last call's tensors: one transformer serves one call at a time.
    """

    def __init__(self, transformer: nn.Module):
        self.values: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
        transformer.register_forward_pre_hook(self.capture, with_kwargs=True)
        transformer.time_text_embed.register_forward_pre_hook(self.replace)

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.values = (kwargs.get("timestep"), kwargs.get("guidance"))

    def replace(self, module: nn.Module, args: tuple) -> tuple | None:
        timestep, guidance = self.values
        if timestep is None:  # called positionally: leave diffusers' inputs alone
            return None
        fixed = (timestep.float() * 1000,) + ((guidance.float() * 1000,) if guidance is not None else ())
        return fixed + args[len(fixed):]


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Apply FLUX RoPE in float32 to ``x [B, H, S, D]`` with ``cos, sin [S, D]`` (interleaved pairs).

    Same math as diffusers' ``apply_rotary_emb(use_real=True, use_real_unbind_dim=-1)`` but written with strided
    slices instead of ``unbind``, which the dynamo exporter lowers to sequence ops TensorRT cannot parse.
    """
    cos, sin = rope
    xf = x.float()
    x_real, x_imag = xf[..., 0::2], xf[..., 1::2]  # [B, H, S, D/2]
    rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)  # [B, H, S, D]
    return (xf * cos + rotated * sin).to(x.dtype)


@dataclass(frozen=True)
class DBIMConstants:
    """The constants of DCI's integration (adopted from the authors' code, docs/dci-mmdiff.md).

    Attributes:
        token_temperature: the renormalised token probabilities are softmaxed again at this temperature over the
            prompt's tokens before the token set is summed (``softmax(10 * p)``).
        spatial_temperature: the spatial softmax runs over ``spatial_temperature * map``.
        spatial_mean: the spatial map is scaled to this mean over the image tokens: the authors' ``500 *
            softmax`` over Stable Diffusion's 64 x 64 = 4096 tokens has mean 500 / 4096; a DiT has one resolution
            per image, so the mean is kept instead of the constant 500.
    """

    token_temperature: float = 10.0
    spatial_temperature: float = 10.0
    spatial_mean: float = 500.0 / 4096.0


DBIM = DBIMConstants()


@dataclass
class DBIMInputs:
    """The per-row DBIM inputs of a ``2B``-row batch (concept rows, then their auxiliary rows; ``L`` text tokens):
    ``prompt_tokens``, ``map_tokens`` ``[2B, L]``, ``reference_map``, ``dbim_lambda`` ``[2B]``
    (:class:`~dynaip_trt.dbim.DBIMCondition` of torch tensors)."""

    prompt_tokens: torch.Tensor
    map_tokens: torch.Tensor
    reference_map: torch.Tensor
    dbim_lambda: torch.Tensor


@dataclass
class ReferenceInputs:
    """Per-step DynaIP inputs handed to every processor through ``joint_attention_kwargs={"dynaip": ...}``.

    Attributes:
        kv: the request's reference K/V (:class:`~dynaip_trt.conditioning.ReferenceKV` of torch tensors): image
            branch ``[blocks, batch, subjects, ref_tokens, inner_dim]`` (double-stream blocks first, then
            single-stream blocks if enabled), text branch ``[double_blocks, ...]`` or ``None``.
        scales: per-subject scales ``[batch, subjects]``.
        masks: optional per-subject spatial masks over image tokens ``[batch, subjects, image_tokens]`` (0..1).
        block_scales: optional per-block multiplier of the image branch ``[blocks]``.
        txt_block_scales: text-branch multiplier per double block ``[double_blocks]`` (the DDS schedule value of
            the current step); the text branch is injected only when this is given and ``kv`` has text K/V
            (Dynamic Decoupling Strategy: dropped, and never computed, at inference by default).
        mode: ``"sum"`` (per-subject attention, gated and summed) or ``"concat"`` (one softmax over all subjects).
        image_tokens: number of image tokens N (needed only for single-stream injection).
        dbim: DBIM's inputs (the batch is concept rows, then auxiliary rows), or ``None``.
        attention_maps: a list to record, per injected double-stream block, the image tokens' attention mass on
            each subject's reference tokens ``[B, H, N, S]`` (one softmax over all subjects' tokens, as ``concat``
            attends; training losses read it), or ``None``.
    """

    kv: ReferenceKV
    scales: torch.Tensor
    masks: torch.Tensor | None = None
    block_scales: torch.Tensor | None = None
    txt_block_scales: torch.Tensor | None = None
    mode: str = "sum"
    image_tokens: int | None = None
    dbim: DBIMInputs | None = None
    attention_maps: list[torch.Tensor] | None = None

    @property
    def text_branch(self) -> bool:
        return self.txt_block_scales is not None and self.kv.txt_k is not None


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scales: torch.Tensor,
    masks: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    """Attention of one branch's queries to the subjects' reference tokens.

    Args:
        q: queries after QK-norm, before RoPE ``[B, H, N, D]``.
        k, v: reference keys/values ``[B, S, T, H*D]``.
        scales: ``[B, S]``.
        masks: ``[B, S, N]`` or ``None``.
        mode: ``"sum"``: each subject attended separately (subject axis folded into batch, attention stays 4-D),
            multiplied by ``scale * mask`` and summed over subjects. ``"concat"``: one softmax over all
            ``S*T`` tokens; values scaled per subject, masks become an additive bias and gate the output.

    Returns:
        ``[B, N, H*D]``
    """
    heads, head_dim = q.shape[1], q.shape[3]
    num_subjects, ref_tokens = k.shape[1], k.shape[2]
    if mode == "sum":
        k4 = k.flatten(0, 1).unflatten(-1, (heads, head_dim)).transpose(1, 2)  # [B*S, H, T, D]
        v4 = v.flatten(0, 1).unflatten(-1, (heads, head_dim)).transpose(1, 2)
        q4 = q.unsqueeze(1).expand(-1, num_subjects, -1, -1, -1).flatten(0, 1)  # [B*S, H, N, D]
        out = F.scaled_dot_product_attention(q4, k4, v4, scale=head_dim**-0.5)  # [B*S, H, N, D]
        out = out.unflatten(0, (-1, num_subjects)).permute(0, 1, 3, 2, 4).flatten(3)  # [B, S, N, H*D]
        gate = scales[:, :, None]  # [B, S, 1]
        if masks is not None:
            gate = gate * masks  # [B, S, N]
        return (out * gate.unsqueeze(-1)).sum(dim=1)
    if mode == "concat":
        v = v * scales[:, :, None, None]
        v4 = v.flatten(1, 2).unflatten(-1, (heads, head_dim)).transpose(1, 2)  # [B, H, S*T, D]
        bias = _concat_bias(scales, masks, ref_tokens, q.dtype)
        out = F.scaled_dot_product_attention(q, _concat_keys(k, heads), v4, attn_mask=bias,
                                             scale=head_dim**-0.5)  # [B, H, N, D]
        out = out.transpose(1, 2).flatten(2)  # [B, N, H*D]
        if masks is not None:
            out = out * masks.amax(dim=1).unsqueeze(-1)
        return out
    raise ValueError(f"unknown reference attention mode {mode!r}; expected 'sum' or 'concat'")


def _concat_keys(k: torch.Tensor, heads: int) -> torch.Tensor:
    """Reference keys ``[B, S, T, H*D]`` -> ``[B, H, S*T, D]`` (every subject's tokens in one sequence)."""
    return k.flatten(1, 2).unflatten(-1, (heads, -1)).transpose(1, 2)


def _concat_bias(scales: torch.Tensor, masks: torch.Tensor | None, ref_tokens: int, dtype: torch.dtype
                 ) -> torch.Tensor:
    """The additive attention bias of ``concat`` mode ``[B, 1, N or 1, S*T]``: a subject with scale 0 takes no
    softmax mass from the others, and masks ``[B, S, N]`` restrict each subject's tokens to its region."""
    keep = (scales > 0).to(dtype)[:, None, :]  # [B, 1, S]
    if masks is not None:
        keep = keep * masks.transpose(1, 2)  # [B, N, S]
    m = keep.unsqueeze(-1).expand(-1, -1, -1, ref_tokens).flatten(2)  # [B, N or 1, S*T]
    return ((1.0 - m) * -1.0e4).to(dtype).unsqueeze(1)


def subject_attention_mass(q: torch.Tensor, k: torch.Tensor, scales: torch.Tensor, masks: torch.Tensor | None
                           ) -> torch.Tensor:
    """Each image query's attention mass on each subject's reference tokens when all subjects' tokens share one
    softmax (how ``concat`` mode attends): queries ``[B, H, N, D]``, keys ``[B, S, T, H*D]``, ``scales [B, S]``,
    ``masks [B, S, N]`` or ``None`` -> ``[B, H, N, S]``, summing to 1 over the subjects (differentiable: what
    MM-Diff's attention constraint trains, :func:`dynaip_trt.training.attention_constraint_loss`)."""
    heads, head_dim = q.shape[1], q.shape[3]
    num_subjects, ref_tokens = k.shape[1], k.shape[2]
    logits = q @ _concat_keys(k, heads).transpose(-1, -2) * head_dim**-0.5 + _concat_bias(scales, masks, ref_tokens,
                                                                                           q.dtype)
    return logits.softmax(dim=-1).unflatten(-1, (num_subjects, ref_tokens)).sum(dim=-1)


def _token_set_map(logits: torch.Tensor, allowed: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """DCI's map of a token set: image queries' logits ``[R, H, N, K]`` restricted to the ``allowed`` keys ``[R, K]``
    (softmax over them), softmaxed again at :attr:`DBIMConstants.token_temperature` over the same keys, summed over
    the ``members`` keys ``[R, K]`` -> ``[R, H, N]`` (float32)."""
    bias = ((allowed - 1.0) * 1.0e9)[:, None, None, :]  # 0 on allowed keys, -1e9 elsewhere
    p = (logits + bias).softmax(dim=-1)
    t = (DBIM.token_temperature * p + bias).softmax(dim=-1)
    return (t * members[:, None, None, :]).sum(dim=-1)


def dbim_mix(out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, txt_len: int, r: ReferenceInputs,
             img_query: torch.Tensor, ref_index: int | None) -> torch.Tensor:
    """DCI's integration in one double-stream block (docs/dci-mmdiff.md): the joint attention output
    ``out [2B, H, L+N, D]`` of ``B`` concept rows and their ``B`` auxiliary rows, with the RoPE'd ``query`` and
    ``key`` ``[2B, H, L+N, D]`` it came from -> the same output with each concept row's image tokens replaced by
    ``w_c * out_c + w_a * out_a``, where per head and image token ``(w_c, w_a) = softmax(S(M_c), lambda * S(M_a))``,
    ``S(M) = spatial_mean * N * softmax(spatial_temperature * M)`` over the image tokens and ``M`` the row's
    token-set map (:func:`_token_set_map`; the concept rows may add the subjects' reference tokens, attended by the
    pre-RoPE ``img_query`` as the reference attention does). The auxiliary rows are returned unchanged.
    SDPA hides its probabilities, so only the image-to-text logits (and image-to-reference logits) are formed:
    ``[2B, H, N, L]``, a fraction of the attention's own ``N x (L+N)``."""
    d = r.dbim
    b, scale = out.shape[0] // 2, query.shape[-1] ** -0.5
    logits = query[:, :, txt_len:].float() @ key[:, :, :txt_len].float().transpose(-1, -2) * scale  # [2B, H, N, L]
    allowed, members = d.prompt_tokens.float(), d.map_tokens.float()  # [2B, L]
    c_logits, c_allowed, c_members = logits[:b], allowed[:b], members[:b]
    if ref_index is not None:  # the subjects' reference tokens join the concept map where reference_map is 1
        k_ref = r.kv.img_k[ref_index][:b]  # [B, S, T, H*D]
        ref_logits = img_query[:b].float() @ _concat_keys(k_ref, query.shape[1]).float().transpose(-1, -2) * scale
        on = (d.reference_map[:b, None, None].float() * (r.scales[:b] > 0).float()[:, :, None])  # [B, S, 1]
        on = on.expand(-1, -1, k_ref.shape[2]).flatten(1)  # [B, S*T]
        c_logits = torch.cat([c_logits, ref_logits], dim=-1)
        c_allowed, c_members = torch.cat([c_allowed, on], dim=-1), torch.cat([c_members, on], dim=-1)
    maps = [_token_set_map(c_logits, c_allowed, c_members), _token_set_map(logits[b:], allowed[b:], members[b:])]
    n = maps[0].shape[-1]
    spatial = [DBIM.spatial_mean * n * (DBIM.spatial_temperature * m).softmax(dim=-1) for m in maps]  # [B, H, N]
    w = torch.stack([spatial[0], d.dbim_lambda[:b, None, None].float() * spatial[1]]).softmax(dim=0)
    img_c, img_a = out[:b, :, txt_len:], out[b:, :, txt_len:]
    mixed = (w[0].unsqueeze(-1) * img_c.float() + w[1].unsqueeze(-1) * img_a.float()).to(out.dtype)
    return torch.cat([torch.cat([out[:b, :, :txt_len], mixed], dim=2), out[b:]], dim=0)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, N, H*D]`` -> ``[B, N, H, D]``"""
    return x.unflatten(-1, (-1, head_dim))


class DynaIPAttnProcessor:
    """Flux attention (double- or single-stream) with optional DynaIP reference injection.

    Args:
        ref_index: index of this block in ``ReferenceInputs.img_k`` (``None``: this block gets no injection).
        txt_index: index in ``ReferenceInputs.txt_k`` for double-stream blocks (``None`` for single blocks).
        injection: ``"after_out"``, ``"before_out"`` or ``"after_block"`` (double-stream blocks; see the module).
        single_rows: ``"image"`` or ``"all"``: the rows of a single-stream block that get the injection.
    """

    def __init__(self, ref_index: int | None = None, txt_index: int | None = None, injection: str = "after_out",
                 single_rows: str = "image"):
        self.ref_index = ref_index
        self.txt_index = txt_index
        self.injection = injection
        self.single_rows = single_rows

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        dynaip: ReferenceInputs | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        hd = attn.head_dim
        # [B, N, H, D] -> QK-norm -> [B, H, N, D]
        query = attn.norm_q(_heads(attn.to_q(hidden_states), hd)).transpose(1, 2)
        key = attn.norm_k(_heads(attn.to_k(hidden_states), hd)).transpose(1, 2)
        value = _heads(attn.to_v(hidden_states), hd).transpose(1, 2)
        img_query, txt_query = query, None  # pre-RoPE queries of each branch

        if encoder_hidden_states is not None:  # double-stream block: text tokens come first
            txt_query = attn.norm_added_q(_heads(attn.add_q_proj(encoder_hidden_states), hd)).transpose(1, 2)
            txt_key = attn.norm_added_k(_heads(attn.add_k_proj(encoder_hidden_states), hd)).transpose(1, 2)
            txt_value = _heads(attn.add_v_proj(encoder_hidden_states), hd).transpose(1, 2)
            query = torch.cat([txt_query, query], dim=2)
            key = torch.cat([txt_key, key], dim=2)
            value = torch.cat([txt_value, value], dim=2)

        if image_rotary_emb is not None:
            query = apply_rope(query, image_rotary_emb)
            key = apply_rope(key, image_rotary_emb)

        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=hd**-0.5)
        if dynaip is not None and dynaip.dbim is not None and encoder_hidden_states is not None:
            out = dbim_mix(out, query, key, encoder_hidden_states.shape[1], dynaip, img_query, self.ref_index)
        out = out.transpose(1, 2).flatten(2).to(query.dtype)  # [B, L+N, H*D]

        if encoder_hidden_states is None:  # single-stream block: [txt; img] tokens, no output projection here
            if dynaip is not None and self.ref_index is not None:
                out = out + self._single_stream_term(img_query, dynaip)
            return out

        txt_len = encoder_hidden_states.shape[1]
        txt_out, img_out = out[:, :txt_len], out[:, txt_len:]
        if dynaip is not None and self.ref_index is not None and dynaip.attention_maps is not None:
            dynaip.attention_maps.append(subject_attention_mass(img_query, dynaip.kv.img_k[self.ref_index],
                                                                dynaip.scales, dynaip.masks))
        term = self._image_term(img_query, dynaip) if dynaip is not None and self.ref_index is not None else None
        if term is not None and self.injection == "before_out":
            img_out = img_out + term
        img_out = attn.to_out[1](attn.to_out[0](img_out.contiguous()))
        txt_out = attn.to_add_out(txt_out.contiguous())
        if term is not None and self.injection == "after_out":
            img_out = img_out + term
        if dynaip is not None and self.txt_index is not None and dynaip.text_branch:
            txt_out = txt_out + self._text_term(txt_query, dynaip)
        if term is not None and self.injection == "after_block":  # FluxTransformerBlock adds it after its FF
            return img_out, txt_out, term
        return img_out, txt_out

    def _image_term(self, img_query: torch.Tensor, r: ReferenceInputs, masks: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """``s_img * Attn(q_img, K_img, V_img)``: ``[B, N_img, C]`` (``masks``: ``[B, S, N_img]`` instead of
        ``r.masks``)."""
        i = self.ref_index
        masks = r.masks if masks is None else masks
        term = reference_attention(img_query, r.kv.img_k[i], r.kv.img_v[i], r.scales, masks, r.mode)
        if r.block_scales is not None:
            term = term * r.block_scales[i]
        return term

    def _text_term(self, txt_query: torch.Tensor, r: ReferenceInputs) -> torch.Tensor:
        """``s_txt * Attn(q_txt, K_txt, V_txt)``: ``[B, L_txt, C]`` (masks are over image tokens: not applied)."""
        i = self.txt_index
        term = reference_attention(txt_query, r.kv.txt_k[i], r.kv.txt_v[i], r.scales, None, r.mode)
        return term * r.txt_block_scales[i]

    def _single_stream_term(self, query: torch.Tensor, r: ReferenceInputs) -> torch.Tensor:
        """Injection in a single-stream block ``[B, L+N, C]``: image tokens only (zero on the text tokens), or every
        row (``single_rows="all"``; masks cover image tokens, so text rows are gated by the scales alone)."""
        if self.single_rows == "all":
            masks = r.masks
            if masks is not None:
                txt_len = query.shape[2] - masks.shape[2]
                masks = torch.cat([masks.new_ones(masks.shape[0], masks.shape[1], txt_len), masks], dim=2)
            return self._image_term(query, r, masks)
        if r.image_tokens is None:
            raise ValueError("single-stream injection needs ReferenceInputs.image_tokens")
        txt_len = query.shape[2] - r.image_tokens
        term = self._image_term(query[:, :, txt_len:], r)
        return torch.cat([term.new_zeros(term.shape[0], txt_len, term.shape[2]), term], dim=1)
