"""PyTorch stand-ins for the two flash-attn functions that the original MDLM's DiT calls.

``bench/vs_original.py`` runs the original code (github kuleshov-group/mdlm) on machines
without flash-attn (or on CPU, where its CUDA kernels cannot run). :func:`install` registers
this module's functions under the names the original imports:

- ``flash_attn.flash_attn_interface.flash_attn_varlen_qkvpacked_func``: attention over
  sequences of different lengths packed into one tensor, through
  :func:`torch.nn.functional.scaled_dot_product_attention`;
- ``flash_attn.layers.rotary.apply_rotary_emb_qkv_``: rotary position embedding applied in
  place to the queries and keys of a packed (B, L, 3, H, D) tensor.

Written from the functions' documented semantics (arguments, shapes, the formula), not from
their code. Only what MDLM uses is supported; the other options raise NotImplementedError.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch
import torch.nn.functional as F
from torch import Tensor

# The module names the original imports (``import flash_attn``, ``import flash_attn.layers.rotary``,
# ``flash_attn.flash_attn_interface.<function>``), each with the functions it must hold.
MODULES: dict[str, tuple[str, ...]] = {
    "flash_attn": (),
    "flash_attn.flash_attn_interface": ("flash_attn_varlen_qkvpacked_func",),
    "flash_attn.layers": (),
    "flash_attn.layers.rotary": ("apply_rotary_emb_qkv_",),
}
NO_WINDOW = (-1, -1)  # flash-attn's window_size for unlimited (full) attention


# --------------------------------------------------------------------------- attention


def flash_attn_varlen_qkvpacked_func(
    qkv: Tensor,
    cu_seqlens: Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
) -> Tensor:
    """Softmax attention within each of the sequences packed in ``qkv``; no attention across them.

    Sequence b holds the rows ``cu_seqlens[b] : cu_seqlens[b + 1]``; for each of them and each
    head, ``out = softmax(q k^T * scale [+ causal mask]) v`` with ``scale = softmax_scale`` or
    ``1 / sqrt(D)``. Sequences of equal length run as one batched SDPA call, others one by one.

    Args:
        qkv: (total, 3, H, D) packed queries, keys and values of all sequences.
        cu_seqlens: (B + 1,) int, cumulative sequence lengths, starting at 0 and ending at total.
        max_seqlen: the longest sequence (flash-attn sizes its grid by it; checked here).
        dropout_p: attention dropout probability.
        softmax_scale: the scale of q k^T; None = 1 / sqrt(D).
        causal: if True, position i of a sequence attends only to positions <= i of it.
        deterministic: accepted and ignored (SDPA's backward is deterministic on CPU).

    Returns:
        (total, H, D) attention output.
    """
    if window_size != NO_WINDOW or softcap != 0.0 or alibi_slopes is not None or return_attn_probs:
        raise NotImplementedError("the SDPA stand-in of flash_attn_varlen_qkvpacked_func supports full attention "
                                  "only (no window_size, softcap, alibi_slopes or return_attn_probs)")
    if qkv.ndim != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must be (total, 3, H, D), got shape {tuple(qkv.shape)}")
    bounds = [int(b) for b in cu_seqlens.tolist()]  # (B + 1,)
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    if not bounds or bounds[0] != 0 or bounds[-1] != qkv.shape[0] or min(lengths, default=0) < 0:
        raise ValueError(f"cu_seqlens must rise from 0 to total = {qkv.shape[0]}, got {bounds}")
    if max(lengths, default=0) > max_seqlen:
        raise ValueError(f"max_seqlen = {max_seqlen} is shorter than the longest sequence ({max(lengths)})")

    def attend(packed: Tensor) -> Tensor:  # (N, L, 3, H, D) -> (N, L, H, D)
        q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, H, L, D)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=softmax_scale)
        return out.transpose(1, 2)  # (N, L, H, D)

    if len(set(lengths)) == 1:  # equal lengths (MDLM's case): one batched call
        batch, length = len(lengths), lengths[0]
        return attend(qkv.reshape(batch, length, *qkv.shape[1:])).reshape(qkv.shape[0], *qkv.shape[2:])
    segments = [attend(qkv[start:end][None])[0] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    return torch.cat(segments, dim=0)  # (total, H, D)


# --------------------------------------------------------------------------- rotary


def rotate_(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> None:
    """Rotate the first ``2 * cos.shape[-1]`` features of ``x`` (B, L, H, D) in place; cos, sin (B or 1, L, R/2).

    Non-interleaved (GPT-NeoX style): ``x1 = x[..., :R/2]``, ``x2 = x[..., R/2:R]`` and
    ``(x1, x2) <- (x1 cos - x2 sin, x1 sin + x2 cos)``. Interleaved (GPT-J style): the pairs
    ``(x[..., 2j], x[..., 2j + 1])`` rotate the same way. Computed in float32, written back in
    the dtype of ``x``; features past R are left alone.
    """
    half = cos.shape[-1]
    cos, sin = cos.float()[:, :, None], sin.float()[:, :, None]  # (B or 1, L, 1, R/2)
    part = x[..., : 2 * half]  # (B, L, H, R), a view: written in place
    pairs = part.float().unflatten(-1, (half, 2)) if interleaved else part.float().unflatten(-1, (2, half))
    x1, x2 = (pairs[..., 0], pairs[..., 1]) if interleaved else (pairs[..., 0, :], pairs[..., 1, :])
    out1, out2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos  # each (B, L, H, R/2)
    rotated = torch.stack([out1, out2], dim=-1 if interleaved else -2).flatten(-2)  # (B, L, H, R)
    part.copy_(rotated.to(x.dtype))


def apply_rotary_emb_qkv_(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    cos_k: Tensor | None = None,
    sin_k: Tensor | None = None,
    interleaved: bool = False,
    seqlen_offsets: int | Tensor = 0,
    num_heads_q: int | None = None,
) -> Tensor:
    """Apply the rotary embedding in place to the queries and keys of ``qkv``; values untouched.

    Position ``p = seqlen_offsets + l`` of token l is rotated by the angles whose cosines and
    sines are ``cos[p]``, ``sin[p]`` (see :func:`rotate_`); keys use ``cos_k``, ``sin_k`` when given.

    Args:
        qkv: (B, L, 3, H, D) packed queries, keys and values; modified in place.
        cos, sin: (L_ro, R/2) tables with ``R <= D`` the rotated features and ``L_ro >= L + offset``.
        cos_k, sin_k: optional tables for the keys (default: ``cos``, ``sin``).
        interleaved: rotate pairs of adjacent features instead of the two halves.
        seqlen_offsets: int, or (B,) int tensor, the position of each sequence's first token.

    Returns:
        ``qkv`` itself.
    """
    if num_heads_q is not None or qkv.ndim != 5 or qkv.shape[2] != 3:
        raise NotImplementedError(f"the stand-in of apply_rotary_emb_qkv_ takes qkv of shape (B, L, 3, H, D) "
                                  f"only, got {tuple(qkv.shape)} (num_heads_q={num_heads_q})")
    batch, length, _, _, head_dim = qkv.shape
    if 2 * cos.shape[-1] > head_dim or cos.shape != sin.shape:
        raise ValueError(f"cos and sin must be (L_ro, R/2) with R <= D = {head_dim}, got {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    positions = torch.arange(length, device=qkv.device)[None] + torch.as_tensor(
        seqlen_offsets, device=qkv.device).reshape(-1, 1)  # (B or 1, L)
    if int(positions.max()) >= cos.shape[0]:
        raise ValueError(f"the rotary tables cover {cos.shape[0]} positions; position {int(positions.max())} "
                         "was asked for")
    cos_k = cos if cos_k is None else cos_k
    sin_k = sin if sin_k is None else sin_k
    rotate_(qkv[:, :, 0], cos[positions], sin[positions], interleaved)  # queries
    rotate_(qkv[:, :, 1], cos_k[positions], sin_k[positions], interleaved)  # keys
    return qkv


# --------------------------------------------------------------------------- registration


def real_flash_attn_importable() -> bool:
    """Whether the real flash-attn package and the two submodules the original uses import here."""
    if isinstance(sys.modules.get("flash_attn"), StandIn):
        return False
    try:
        for name in MODULES:
            importlib.import_module(name)
    except ImportError:
        return False
    return True


class StandIn(types.ModuleType):
    """A module object registered in place of a flash-attn module (its type marks it as ours)."""


def install(only_if_missing: bool = True) -> bool:
    """Register this module's functions as ``flash_attn`` and the submodules of :data:`MODULES`.

    With ``only_if_missing`` the real package is kept when it imports. Returns True when the
    stand-in is (now) registered. Registering replaces any flash-attn modules already imported
    in this process for every later ``import flash_attn...``.
    """
    if only_if_missing and real_flash_attn_importable():
        return False
    this = sys.modules[__name__]
    modules = {name: StandIn(name, f"SDPA stand-in from {__file__}") for name in MODULES}
    for name, functions in MODULES.items():
        module = modules[name]
        for function in functions:
            setattr(module, function, getattr(this, function))
        if name == "flash_attn" or name == "flash_attn.layers":
            module.__path__ = []  # a package: its submodules are found in sys.modules
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    sys.modules.update(modules)
    return True


def uninstall() -> None:
    """Remove the stand-in's modules from ``sys.modules`` (the real package, if any, imports again)."""
    for name in MODULES:
        if isinstance(sys.modules.get(name), StandIn):
            del sys.modules[name]
