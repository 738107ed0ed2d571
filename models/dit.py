"""Diffusion Transformer (DiT) denoiser backbone of MDLM.

A bidirectional transformer with rotary position embeddings whose residual branches are
modulated by the noise level (adaLN). Given tokens ``x_t`` (B, L) and the total noise
``sigma`` (B,) it returns unnormalised logits (B, L, V) over the clean tokens; the diffusion
algorithm turns them into ``log p_theta(x0 | x_t)``.

Parameter names and numerics follow the released MDLM checkpoints (``kuleshov-group/mdlm-owt``
and the Lightning ``mdlm.ckpt`` after stripping their ``backbone.`` prefix), so those weights
load with ``strict=True`` and give the same logits: bit for bit in float32; under bf16
autocast within bf16 rounding (the original fused its elementwise ops with TorchScript,
whose rounding cannot be reproduced exactly without it).

Attention runs through flash-attn when it is installed and the inputs are fp16/bf16 CUDA
tensors, and through :func:`torch.nn.functional.scaled_dot_product_attention` otherwise.
An optional ``attention_mask`` (B, L) (1 = real token, 0 = padding) hides padding keys from
every query; batches with padding always take the SDPA path, since the packed flash-attn
function used here has no key-padding mask.

An ``attn_mask`` (L, L) (block diffusion's) runs through SDPA with a dense boolean mask, or
through FlexAttention, which skips the 128 x 128 tiles the mask leaves empty: the DiT's
:attr:`DiT.attn_backend` (``"auto"``, ``"sdpa"``, ``"flex"``; :func:`set_attention_backend`)
picks the kernel at run time, see :func:`attention_kernel`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from functools import cache
from typing import ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:  # optional CUDA kernel, detected once; everything works without it
    from flash_attn import flash_attn_qkvpacked_func as _flash_attn_qkvpacked_func
except ImportError:
    _flash_attn_qkvpacked_func = None

FLASH_ATTN_AVAILABLE: bool = _flash_attn_qkvpacked_func is not None
_FLASH_DTYPES = (torch.float16, torch.bfloat16)  # the dtypes flash-attn kernels accept

try:  # FlexAttention (PyTorch >= 2.5), detected once: block-sparse attention under an attn_mask
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
except ImportError:
    BlockMask = create_block_mask = _flex_attention = None

FLEX_ATTN_AVAILABLE: bool = _flex_attention is not None
AttnBackend = Literal['auto', 'sdpa', 'flex']  # DiT.attn_backend: a kernel choice, not architecture
ATTN_BACKENDS: tuple[str, ...] = get_args(AttnBackend)
# 'auto' takes FlexAttention (on CUDA) for masks over at least this many tokens: 8 x 8 tiles of 128,
# enough empty tiles to repay building the BlockMask (a guess, not measured: no GPU at hand).
FLEX_AUTO_MIN_LENGTH = 1024
FLEX_MIN_HEAD_DIM_CUDA = 16  # FlexAttention's Triton kernel (tl.dot) needs a head size of at least 16
BLOCK_MASK_CACHE_SIZE = 8  # BlockMasks kept (a few block sizes / lengths; each holds its dense mask)

FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal features of sigma fed to the conditioning MLP
MAX_PERIOD = 10_000.0  # longest period of the sigma features
ROTARY_BASE = 10_000.0  # rotary embedding base


# --------------------------------------------------------------------------- attention


def padding_attn_mask(key_padding_mask: Tensor, causal: bool) -> Tensor:
    """Boolean SDPA mask (True = attend) that hides padding keys from every query.

    Bidirectional: ``keep[b, 0, 0, j] = real[b, j]``, shape (B, 1, 1, L), broadcast over heads
    and queries. Causal: ``keep[b, 0, i, j] = real[b, j] and j <= i``, shape (B, 1, L, L).

    A query with no key left would take a softmax over nothing. Such rows exist only where no
    real token can be affected: a sequence that is all padding (bidirectional; it then attends
    to every key) or a padding query before the first real token (causal; it then also attends
    to itself). Real queries never see a padding key.

    Args:
        key_padding_mask: (B, L) bool, True at real tokens.
        causal: if True, also hide the future.

    Returns:
        (B, 1, 1, L) or (B, 1, L, L) bool mask for ``scaled_dot_product_attention``.
    """
    keep = key_padding_mask[:, None, None, :]  # (B, 1, 1, L)
    if not causal:
        return keep | ~key_padding_mask.any(dim=-1)[:, None, None, None]
    positions = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)  # (L,)
    past = positions[None, :] <= positions[:, None]  # (L, L), key j <= query i
    itself = positions[None, :] == positions[:, None]  # (L, L)
    return (keep & past) | itself  # (B, 1, L, L)


def sdpa_attention(qkv: Tensor, causal: bool, key_padding_mask: Tensor | None = None,
                   attn_mask: Tensor | None = None) -> Tensor:
    """Multi-head softmax attention ``softmax(q k^T / sqrt(D)) v`` with PyTorch SDPA.

    Args:
        qkv: (B, L, 3, H, D) packed queries, keys and values.
        causal: if True, position i attends only to positions <= i.
        key_padding_mask: optional (B, L) bool, True at real tokens; padding keys are then
            hidden from every query (see :func:`padding_attn_mask`). None: no mask is built.
        attn_mask: optional (L, L) bool, True where query i may attend to key j (e.g. the block
            diffusion mask); combined with the padding mask. Not with ``causal``.

    Returns:
        (B, L, H * D) attention output with the heads concatenated.
    """
    batch, length, _, n_heads, head_dim = qkv.shape
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
    if attn_mask is not None:
        if causal:
            raise ValueError('attn_mask replaces causal attention: pass one of them')
        if key_padding_mask is not None:
            attn_mask = attn_mask & padding_attn_mask(key_padding_mask, False)  # (B, 1, L, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L, D)
    elif key_padding_mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, L, D)
    else:
        mask = padding_attn_mask(key_padding_mask, causal)  # (B, 1, 1 or L, L)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, D)
    return out.transpose(1, 2).reshape(batch, length, n_heads * head_dim)


def flash_attention(qkv: Tensor, causal: bool) -> Tensor:
    """Same as :func:`sdpa_attention` with the flash-attn kernel (CUDA, fp16/bf16 only), no padding mask.

    Args:
        qkv: (B, L, 3, H, D) packed queries, keys and values.
        causal: if True, position i attends only to positions <= i.

    Returns:
        (B, L, H * D) attention output with the heads concatenated.
    """
    if _flash_attn_qkvpacked_func is None:
        raise RuntimeError('flash_attention needs the optional flash-attn package')
    batch, length, _, n_heads, head_dim = qkv.shape
    out = _flash_attn_qkvpacked_func(qkv, dropout_p=0.0, causal=causal)  # (B, L, H, D)
    return out.reshape(batch, length, n_heads * head_dim)


def check_attn_backend(name: str) -> str:
    """``name`` if it is an attention backend (:data:`ATTN_BACKENDS`), else a ValueError listing them."""
    if name not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be one of {', '.join(ATTN_BACKENDS)}; got {name!r}")
    return name


# key -> (the dense mask, kept alive so that its address is not reused; its BlockMask), least recently used first
_BLOCK_MASKS: OrderedDict[tuple, tuple[Tensor, BlockMask]] = OrderedDict()


def dense_block_mask(attn_mask: Tensor, device: torch.device) -> BlockMask:
    """The FlexAttention BlockMask of a dense (L, L) bool mask on ``device``, built once and cached.

    The mask_mod indexes the dense mask, ``mask_mod(b, h, q, k) = attn_mask[q, k]``;
    :func:`create_block_mask` evaluates it once and lists, for each 128-row tile of queries,
    the 128-column tiles of keys that hold an allowed entry (full ones apart): the kernel
    skips the others. The cache (:data:`BLOCK_MASK_CACHE_SIZE` entries, least recently used
    dropped) is keyed on the mask's address, shape, strides, version counter and device, and
    holds the mask itself, so a hit is the same tensor with the same contents.
    """
    version = -1 if attn_mask.is_inference() else attn_mask._version  # inference tensors have no counter
    key = (attn_mask.data_ptr(), tuple(attn_mask.shape), attn_mask.stride(), attn_mask.device, version,
           torch.device(device))
    if key in _BLOCK_MASKS:
        _BLOCK_MASKS.move_to_end(key)
        return _BLOCK_MASKS[key][1]
    dense = attn_mask.to(device=device, dtype=torch.bool)  # (L, L)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return dense[q_idx, kv_idx]

    length = attn_mask.shape[0]
    block_mask = create_block_mask(mask_mod, None, None, length, length, device=device)
    _BLOCK_MASKS[key] = (attn_mask, block_mask)
    if len(_BLOCK_MASKS) > BLOCK_MASK_CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return block_mask


@cache
def _compiled_flex_attention() -> Callable[..., Tensor]:
    """FlexAttention compiled (its fused, block-sparse kernel), made on first use: no compile at import."""
    return torch.compile(_flex_attention)


def flex_masked_attention(qkv: Tensor, attn_mask: Tensor) -> Tensor:
    """Same as :func:`sdpa_attention` under ``attn_mask`` (no padding mask), with FlexAttention.

    Compiled on CUDA (the fused kernel that skips empty tiles); eager elsewhere, where PyTorch
    evaluates the mask densely (as SDPA does; no speed-up, for checking the numbers).

    Args:
        qkv: (B, L, 3, H, D) packed queries, keys and values.
        attn_mask: (L, L) bool, True = query i may attend to key j; every query needs one key.

    Returns:
        (B, L, H * D) attention output with the heads concatenated.
    """
    batch, length, _, n_heads, head_dim = qkv.shape
    if attn_mask.shape != (length, length):
        raise ValueError(f'attn_mask must be (L, L) = ({length}, {length}), got shape {tuple(attn_mask.shape)}')
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D)
    block_mask = dense_block_mask(attn_mask, qkv.device)
    kernel = _compiled_flex_attention() if qkv.is_cuda else _flex_attention
    out = kernel(q, k, v, block_mask=block_mask)  # (B, H, L, D)
    return out.transpose(1, 2).reshape(batch, length, n_heads * head_dim)


def flex_problem(device: torch.device, head_dim: int, padding: bool, mask_shape: tuple[int, ...],
                 needs_grad: bool) -> str | None:
    """Why FlexAttention cannot run this masked attention, or None if it can."""
    if not FLEX_ATTN_AVAILABLE:
        return f'torch {torch.__version__} has no torch.nn.attention.flex_attention (PyTorch >= 2.5 has)'
    if padding:
        return 'the batch has padding, and the flex path takes no key-padding mask'
    if len(mask_shape) != 2:
        return f'it takes one (L, L) attn_mask for the whole batch, got shape {mask_shape}'
    if device.type not in ('cuda', 'cpu'):
        return f'it runs here on CUDA (and on CPU without gradients), not on {device.type}'
    if device.type == 'cpu' and needs_grad:
        return (f'FlexAttention has no backward on CPU (torch {torch.__version__}); on CPU it runs only '
                'without gradients (torch.no_grad)')
    if device.type == 'cuda' and head_dim < FLEX_MIN_HEAD_DIM_CUDA:
        return f'its CUDA kernel needs a head size >= {FLEX_MIN_HEAD_DIM_CUDA}, got {head_dim}'
    return None


def attention_kernel(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, padding: bool,
                     mask_shape: tuple[int, ...] | None, needs_grad: bool) -> str:
    """The kernel :func:`attention` runs: ``"flash"``, ``"flex"`` or ``"sdpa"``.

    - No ``attn_mask`` (``mask_shape`` None): flash-attn when usable (installed, CUDA, fp16/bf16,
      no padding; not with ``backend="sdpa"``), else SDPA, whatever the backend: FlexAttention
      has no tile to skip there (and the KV cache's attention is always SDPA).
    - With an ``attn_mask``: ``"sdpa"`` runs SDPA with the dense mask; ``"flex"`` runs
      FlexAttention, or raises a ValueError saying why it cannot (:func:`flex_problem`) and to use
      ``attn_backend=sdpa``; ``"auto"`` runs FlexAttention on CUDA when it can and the mask is
      at least :data:`FLEX_AUTO_MIN_LENGTH` long, else SDPA. Both compute the same attention, so
      the choice changes results only by float rounding.

    ``flash_attn_qkvpacked_func`` takes no key-padding mask (that would need the varlen kernel
    and unpadding) and no arbitrary mask, so a batch with padding or an ``attn_mask`` never
    runs through it.

    Args:
        backend: one of :data:`ATTN_BACKENDS`.
        device, dtype, head_dim: of the queries.
        padding: whether a key-padding mask is given.
        mask_shape: the ``attn_mask``'s shape, or None when there is none.
        needs_grad: whether the attention will be differentiated.
    """
    check_attn_backend(backend)
    if mask_shape is None:
        flash = not padding and FLASH_ATTN_AVAILABLE and device.type == 'cuda' and dtype in _FLASH_DTYPES
        return 'flash' if flash and backend != 'sdpa' else 'sdpa'
    if backend == 'sdpa':
        return 'sdpa'
    problem = flex_problem(device, head_dim, padding, mask_shape, needs_grad)
    if backend == 'flex':
        if problem is not None:
            raise ValueError(f'attn_backend=flex cannot run this attention: {problem}. '
                             'Use attn_backend=sdpa (or auto).')
        return 'flex'
    long_enough = mask_shape[-1] >= FLEX_AUTO_MIN_LENGTH
    return 'flex' if problem is None and device.type == 'cuda' and long_enough else 'sdpa'


def attention(qkv: Tensor, causal: bool, key_padding_mask: Tensor | None = None,
              attn_mask: Tensor | None = None, backend: str = 'auto') -> Tensor:
    """Softmax attention through the kernel :func:`attention_kernel` picks: flash-attn, FlexAttention or SDPA.

    Args:
        qkv: (B, L, 3, H, D) packed queries, keys and values.
        causal: if True, position i attends only to positions <= i.
        key_padding_mask: optional (B, L) bool, True at real tokens; None = no padding.
        attn_mask: optional (L, L) bool, True = query i may attend to key j.
        backend: ``"auto"``, ``"sdpa"`` or ``"flex"`` (:data:`ATTN_BACKENDS`).

    Returns:
        (B, L, H * D) attention output.
    """
    if causal and attn_mask is not None:
        raise ValueError('attn_mask replaces causal attention: pass one of them')
    kernel = attention_kernel(
        backend, qkv.device, qkv.dtype, qkv.shape[-1], key_padding_mask is not None,
        None if attn_mask is None else tuple(attn_mask.shape), torch.is_grad_enabled() and qkv.requires_grad)
    if kernel == 'flash':
        return flash_attention(qkv, causal)
    if kernel == 'flex':
        return flex_masked_attention(qkv, attn_mask)
    return sdpa_attention(qkv, causal, key_padding_mask, attn_mask)


def to_key_padding_mask(attention_mask: Tensor | None, indices: Tensor) -> Tensor | None:
    """The padding mask the attention layers need: None when there is no padding.

    Args:
        attention_mask: None, or (B, L) with 1 at real tokens and 0 at padding (any dtype).
        indices: (B, L) the tokens it belongs to (for the shape check).

    Returns:
        None if ``attention_mask`` is None or all ones (then attention runs exactly as without
        it), else (B, L) bool, True at real tokens. A CUDA mask is taken as it is: checking it
        would synchronise with the GPU every step, and the losses pass one only when the batch
        has padding (:meth:`algorithms.Algorithm.with_padding_mask`).
    """
    if attention_mask is None:
        return None
    if attention_mask.shape != indices.shape:
        raise ValueError(f'attention_mask must be (B, L) = {tuple(indices.shape)}, '
                         f'got shape {tuple(attention_mask.shape)}')
    real = attention_mask.bool()
    return None if not real.is_cuda and bool(real.all()) else real


class LayerCache:
    """One block's keys and values of a clean prefix, after rotary: (B, H, P, D) each.

    :meth:`attend` runs the queries of new tokens against the cached keys and their own, with
    full attention (the new tokens see the whole prefix and each other), and with ``store``
    appends their keys and values, keeping the last ``window`` (None: all).
    """

    def __init__(self, window: int | None = None) -> None:
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.window = window

    def attend(self, qkv: Tensor, store: bool) -> Tensor:
        """qkv (B, S, 3, H, D) of the new tokens, rotary applied -> (B, S, H * D)."""
        batch, length, _, n_heads, head_dim = qkv.shape
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, S, D)
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)  # (B, H, P + S, D)
        if store:
            keep = k.shape[2] if self.window is None else self.window
            self.keys, self.values = k[:, :, -keep:], v[:, :, -keep:]
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, S, D)
        return out.transpose(1, 2).reshape(batch, length, n_heads * head_dim)


class KVCache:
    """The keys and values of a clean prefix in every block, for block-by-block sampling.

    A forward pass with the cache runs only the new tokens (positions continue after the
    prefix); with ``store = True`` their keys and values join the prefix. ``window`` caps the
    cached tokens (the oldest are dropped): rotary attention depends on relative positions
    only, so positions may grow past the trained length.
    """

    def __init__(self, n_layers: int, window: int | None = None) -> None:
        self.layers = [LayerCache(window) for _ in range(n_layers)]
        self.position = 0  # the position of the next token
        self.store = False

    @property
    def length(self) -> int:
        """Number of cached tokens."""
        keys = self.layers[0].keys
        return 0 if keys is None else keys.shape[2]


# --------------------------------------------------------------------------- rotary


class Rotary(nn.Module):
    """Rotary position embedding tables.

    ``inv_freq[j] = 1 / base^(2j / D)`` for ``j < D/2`` (a persistent buffer, as in the
    released checkpoints); ``cos, sin = cos(p inv_freq[j]), sin(p inv_freq[j])`` at position p.
    """

    inv_freq: Tensor

    def __init__(self, head_dim: int, base: float = ROTARY_BASE) -> None:
        super().__init__()
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim  # (D/2,)
        self.register_buffer('inv_freq', 1.0 / (base**exponents))

    def forward(self, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Return ``(cos, sin)`` at positions 0..L-1, each (L, D/2) in float32."""
        return self.at(torch.arange(seq_len, device=device))

    def at(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``(cos, sin)`` at the given positions (S,) (any integers, e.g. repeated), each (S, D/2) float32."""
        freqs = torch.outer(positions.float(), self.inv_freq.float())  # (S, D/2)
        return freqs.cos(), freqs.sin()


def apply_rotary(qkv: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate queries and keys (not values) by position, non-interleaved halves.

    With ``x1 = x[..., :D/2]`` and ``x2 = x[..., D/2:]``:
    ``out = cat(x1 cos - x2 sin, x1 sin + x2 cos)``. The tables are first rounded to the
    dtype of ``qkv`` (as the released model does), the rotation is computed in float32 and
    the result is cast back to the dtype of ``qkv``.

    Args:
        qkv: (B, L, 3, H, D) packed queries, keys and values.
        cos: (L, D/2) cosine table.
        sin: (L, D/2) sine table.

    Returns:
        (B, L, 3, H, D) with q and k rotated.
    """
    half = qkv.shape[-1] // 2
    cos = cos.to(qkv.dtype).float()[None, :, None, None, :]  # (1, L, 1, 1, D/2)
    sin = sin.to(qkv.dtype).float()[None, :, None, None, :]  # (1, L, 1, 1, D/2)
    qk = qkv[:, :, :2].float()  # (B, L, 2, H, D)
    x1, x2 = qk[..., :half], qk[..., half:]
    rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([rotated.to(qkv.dtype), qkv[:, :, 2:]], dim=2)  # (B, L, 3, H, D)


# --------------------------------------------------------------------------- layers


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift``; x (B, L, D), shift/scale (B, 1, D).

    Computed in float32 (at least): in bf16, ``1 + scale`` would round scale to steps of
    2^-7; the released model's fused kernel kept it in float32 too.
    """
    return x * (1 + scale.float()) + shift.float()


def gated_residual(x: Tensor, gate: Tensor, h: Tensor) -> Tensor:
    """Residual update ``x + gate * h`` with the product in float32 (at least).

    Args:
        x: (B, L, D) residual stream (float32 after the first layer norm).
        gate: (B, 1, D) adaLN gate.
        h: (B, L, D) branch output (bf16 under autocast).
    """
    return x + gate.float() * h.float()


class LayerNorm(nn.Module):
    """Layer norm with a weight and no bias, always computed in float32.

    ``y = (x - mean(x)) / sqrt(var(x) + 1e-5) * weight`` over the last dimension, with
    autocast disabled for the normalisation; the output is float32 (or wider).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, D) -> (B, L, D)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.layer_norm(x.float(), [self.dim])
        return x * self.weight


class TokenEmbedding(nn.Module):
    """Token embedding table ``embedding`` (V, D), looked up by indexing."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, indices: Tensor) -> Tensor:
        """indices (B, L) long -> (B, L, D)."""
        return self.embedding[indices]

    def mix(self, weights: Tensor) -> Tensor:
        """weights (B, L, V) -> ``weights @ embedding`` (B, L, D), computed in float32 (autocast off) and
        returned in the table's dtype, as the lookup. A one-hot row gives exactly its token's row of the
        table (products by 0 and 1 are exact)."""
        with torch.autocast(device_type=weights.device.type, enabled=False):
            return (weights.float() @ self.embedding.float()).to(self.embedding.dtype)


class TimestepEmbedder(nn.Module):
    """Embed the noise level: sinusoidal features of sigma through Linear-SiLU-Linear.

    ``f_j = exp(-log(10000) j / 128)`` for ``j < 128``; features
    ``[cos(sigma f), sin(sigma f)]`` (256,) -> ``mlp`` -> (cond_dim,).
    """

    def __init__(self, cond_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, cond_dim),
            nn.SiLU(),
            nn.Linear(cond_dim, cond_dim),
        )

    @staticmethod
    def sinusoidal_features(sigma: Tensor) -> Tensor:
        """sigma (B,) -> (B, 256) float32 features ``[cos(sigma f), sin(sigma f)]``."""
        half = FREQUENCY_EMBEDDING_SIZE // 2
        steps = torch.arange(half, dtype=torch.float32, device=sigma.device)  # (half,)
        freqs = torch.exp(-math.log(MAX_PERIOD) * steps / half)  # (half,)
        args = sigma[:, None].float() * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 256)

    def forward(self, sigma: Tensor) -> Tensor:
        """sigma (B,) -> (B, cond_dim)."""
        return self.mlp(self.sinusoidal_features(sigma))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-modulated, gated residual branches.

    With ``(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)`` = chunks of
    ``adaLN_modulation(c)``:
    ``h = modulate(norm1(x), shift_msa, scale_msa)``,
    ``x = x + gate_msa * dropout(attn_out(attention(rotary(attn_qkv(h)))))``,
    ``x = x + gate_mlp * dropout(mlp(modulate(norm2(x), shift_mlp, scale_mlp)))``.
    ``adaLN_modulation`` is zero-initialised, so every block starts as the identity.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        cond_dim: int,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = LayerNorm(dim)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_ratio * dim),
            nn.GELU(approximate='tanh'),
            nn.Linear(mlp_ratio * dim, dim),
        )
        self.dropout = nn.Dropout(dropout)
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * dim)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, c: Tensor, key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None, cache: LayerCache | None = None, store: bool = False,
        attn_backend: str = 'auto',
    ) -> Tensor:
        """x (B, L, D), cos/sin (L, D_head/2), c (B, cond_dim) -> (B, L, D).

        ``key_padding_mask`` (B, L) bool, True at real tokens, or None (no padding);
        ``attn_mask`` (L, L) bool, True = may attend, or None (full attention); ``cache``: the
        prefix's keys and values, attended to as well (``store``: add these tokens' to it; always
        SDPA); ``attn_backend``: the kernel choice (:func:`attention_kernel`).
        """
        batch, length, dim = x.shape
        modulation = self.adaLN_modulation(c)[:, None]  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=2)

        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, L, D)
        qkv = self.attn_qkv(h).view(batch, length, 3, self.n_heads, dim // self.n_heads)
        qkv = apply_rotary(qkv, cos, sin)  # (B, L, 3, H, D_head)
        if cache is not None:
            h = cache.attend(qkv, store)  # (B, L, D)
        else:
            h = attention(qkv, False, key_padding_mask, attn_mask, attn_backend)  # (B, L, D)
        x = gated_residual(x, gate_msa, self.dropout(self.attn_out(h)))  # (B, L, D)

        h = modulate(self.norm2(x), shift_mlp, scale_mlp)  # (B, L, D)
        return gated_residual(x, gate_mlp, self.dropout(self.mlp(h)))  # (B, L, D)


class FinalLayer(nn.Module):
    """Output head ``linear(modulate(norm_final(x), shift, scale))``, (shift, scale) from c.

    Both ``adaLN_modulation`` and ``linear`` are zero-initialised: logits start at 0.
    """

    def __init__(self, dim: int, out_dim: int, cond_dim: int) -> None:
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
        for layer in (self.linear, self.adaLN_modulation):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor, batch_index: Tensor | None = None) -> Tensor:
        """x (B, L, D), c (B, cond_dim) -> (B, L, out_dim).

        With ``batch_index`` (N,): x holds N rows (N, D), row n of sequence ``batch_index[n]``;
        returns (N, out_dim), each row as the full call computes it.
        """
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # each (B, D)
        if batch_index is None:
            shift, scale = shift[:, None], scale[:, None]  # each (B, 1, D)
        else:
            shift, scale = shift[batch_index], scale[batch_index]  # each (N, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------- model


def check_transformer_sizes(hidden_size: int, n_heads: int, dropout: float, **sizes: int) -> int:
    """Validate a transformer's sizes (all positive, even head size, dropout in [0, 1)); return the head size."""
    for name, value in {'hidden_size': hidden_size, 'n_heads': n_heads, **sizes}.items():
        if value <= 0:
            raise ValueError(f'{name} must be positive, got {value}')
    if hidden_size % n_heads != 0:
        raise ValueError(
            f'hidden_size ({hidden_size}) must be divisible by n_heads ({n_heads})')
    head_dim = hidden_size // n_heads
    if head_dim % 2 != 0:
        raise ValueError(
            f'head dimension hidden_size / n_heads = {head_dim} must be even for rotary')
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f'dropout must be in [0, 1), got {dropout}')
    return head_dim


class DiT(nn.Module):
    """MDLM's DiT denoiser: ``(indices (B, L), sigma (B,)) -> logits (B, L, vocab_size)``.

    ``c = SiLU(sigma_map(sigma))`` conditions every block and the output layer.

    Args:
        vocab_size: number of token ids, mask token included.
        hidden_size: model width D.
        cond_dim: width of the noise-level embedding c.
        n_blocks: number of transformer blocks.
        n_heads: attention heads; ``hidden_size / n_heads`` must be even.
        dropout: dropout on both residual branches of every block.
        mlp_ratio: MLP hidden width as a multiple of D.

    :attr:`attn_backend` (``"auto"``, ``"sdpa"`` or ``"flex"``; default ``"auto"``) picks the
    attention kernel under an ``attn_mask`` (:func:`attention_kernel`). It is a run-time choice,
    not architecture: set it after construction (:func:`set_attention_backend`); it is not a
    constructor argument, so checkpoints do not record it.
    """

    _attn_backend: str = 'auto'  # class default: also for DiTs pickled before the attribute existed
    causal: ClassVar[bool] = False  # bidirectional: for the diffusion algorithms (algorithms.Algorithm.causal)
    block_attention: ClassVar[bool] = True  # takes attn_mask / positions / a KV cache (block diffusion)
    selects_outputs: ClassVar[bool] = True  # takes output_mask: logits only where asked (algorithms.py)

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        cond_dim: int,
        n_blocks: int,
        n_heads: int,
        dropout: float = 0.1,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        head_dim = check_transformer_sizes(
            vocab_size=vocab_size, hidden_size=hidden_size, cond_dim=cond_dim, n_blocks=n_blocks,
            n_heads=n_heads, mlp_ratio=mlp_ratio, dropout=dropout)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.n_heads = n_heads
        self.vocab_embed = TokenEmbedding(vocab_size, hidden_size)
        self.sigma_map = TimestepEmbedder(cond_dim)
        self.rotary_emb = Rotary(head_dim)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, n_heads, cond_dim, mlp_ratio, dropout)
            for _ in range(n_blocks)
        )
        self.output_layer = FinalLayer(hidden_size, vocab_size, cond_dim)

    @property
    def attn_backend(self) -> str:
        """The attention kernel choice under an ``attn_mask``: ``"auto"``, ``"sdpa"`` or ``"flex"``."""
        return self._attn_backend

    @attn_backend.setter
    def attn_backend(self, name: str) -> None:
        self._attn_backend = check_attn_backend(name)

    def forward(self, indices: Tensor, sigma: Tensor, attention_mask: Tensor | None = None,
                attn_mask: Tensor | None = None, positions: Tensor | None = None,
                cache: KVCache | None = None, output_mask: Tensor | None = None,
                soft_inputs: Tensor | None = None) -> Tensor:
        """indices (B, L) long, sigma (B,) float -> logits (B, L, vocab_size).

        ``soft_inputs`` (B, L, vocab_size): weights over the vocabulary in place of the one-hot
        ``indices`` (DUO's curriculum feeds ``softmax(w / tau)``); the input embedding is then
        ``soft_inputs @ embedding`` in float32, and a one-hot row gives exactly its token's logits.
        ``indices`` still give the batch shape (and ``output_mask`` / padding refer to it).

        ``output_mask`` (B, L) bool: the logits (N, vocab_size) of the N positions where it is
        True only, in row-major order (``logits[output_mask]`` of the full call). The output
        layer is most of a small model's FLOPs with a 50k vocabulary, and SUBS needs logits only
        at masked positions.

        ``attention_mask`` (B, L), 1 = real token and 0 = padding, hides padding keys from
        every query, so that padding never changes the logits at real tokens (the logits at
        padding positions are meaningless). None or all ones: no mask, the fast path.
        ``attn_mask`` (L, L) bool, True where query i may attend to key j (block diffusion's
        mask, :func:`block_diffusion.block_diffusion_mask`); None = full attention.
        ``positions`` (L,) the rotary positions; None = 0..L-1 (block diffusion's x_t + x_0
        input repeats 0..L/2-1). ``cache`` (:class:`KVCache`): ``indices`` follow its prefix and
        attend to it and to each other (no mask, no padding); with ``cache.store`` they join it.
        """
        if indices.ndim != 2:
            raise ValueError(f'indices must be (B, L), got shape {tuple(indices.shape)}')
        if sigma.shape != indices.shape[:1]:
            raise ValueError(
                f'sigma must be (B,) = ({indices.shape[0]},), got shape {tuple(sigma.shape)}')
        padding = to_key_padding_mask(attention_mask, indices)  # (B, L) bool or None
        if soft_inputs is None:
            x = self.vocab_embed(indices)  # (B, L, D)
        elif soft_inputs.shape != (*indices.shape, self.vocab_size):
            raise ValueError(f'soft_inputs must be (B, L, vocab_size) = {(*indices.shape, self.vocab_size)}, '
                             f'got {tuple(soft_inputs.shape)}')
        else:
            x = self.vocab_embed.mix(soft_inputs)  # (B, L, D)
        c = F.silu(self.sigma_map(sigma))  # (B, cond_dim)
        if cache is not None:
            if padding is not None or attn_mask is not None or positions is not None:
                raise ValueError('a forward pass with a KV cache takes no attention_mask, attn_mask or positions')
            positions = cache.position + torch.arange(indices.shape[1], device=x.device)
        if positions is None:
            cos, sin = self.rotary_emb(indices.shape[1], x.device)  # each (L, D_head/2)
        else:
            cos, sin = self.rotary_emb.at(positions)  # each (L, D_head/2)
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layers[i]
            x = block(x, cos, sin, c, padding, attn_mask, layer_cache, cache is not None and cache.store,
                      self.attn_backend)  # (B, L, D)
        if cache is not None and cache.store:
            cache.position += indices.shape[1]
        if output_mask is not None:
            if output_mask.shape != indices.shape:
                raise ValueError(f'output_mask must be (B, L) = {tuple(indices.shape)}, got {tuple(output_mask.shape)}')
            rows = output_mask.nonzero(as_tuple=True)  # one host sync (N is data-dependent)
            return self.output_layer(x[rows], c, rows[0])  # (N, V)
        return self.output_layer(x, c)  # (B, L, V)

    def new_cache(self, window: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for this model (``window``: the most tokens it keeps)."""
        return KVCache(len(self.blocks), window)


def set_attention_backend(module: nn.Module, name: str) -> int:
    """Set ``attn_backend = name`` on every :class:`DiT` inside ``module`` (itself included).

    Args:
        module: a DiT, or a module holding some (the LightningModule, an EMA copy, a wrapper).
        name: ``"auto"``, ``"sdpa"`` or ``"flex"``; anything else is a ValueError listing them.

    Returns:
        The number of DiTs set. None with a name other than ``"auto"`` is a ValueError: the
        setting would do nothing.
    """
    check_attn_backend(name)
    dits = [m for m in module.modules() if isinstance(m, DiT)]
    if not dits and name != 'auto':
        raise ValueError(f'attn_backend={name} applies to the DiT (backbone=dit); {type(module).__name__} holds '
                         'none: leave attn_backend=auto')
    for dit in dits:
        dit.attn_backend = name
    return len(dits)
