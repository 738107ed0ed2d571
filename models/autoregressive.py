"""Autoregressive (AR) baseline backbone of MDLM: the DiT without time conditioning, causal.

Every block is ``x = x + dropout(attn_out(causal_attention(rotary(attn_qkv(norm1(x))))))``
followed by ``x = x + dropout(mlp(norm2(x)))``; the head is ``linear(norm_final(x))``. There is
no adaLN modulation and no noise-level embedding. Given tokens (B, L) the model returns raw
next-token logits (B, L, V): position i scores token i + 1 from tokens 0..i. The algorithm
applies the log-softmax and removes the mask token.

Parameter names follow the original AR checkpoint (``ar.ckpt`` after stripping its
``backbone.`` prefix), so it loads with ``strict=True``. The building blocks (weight-only
float32 layer norm, rotary tables, token embedding, flash-attn/SDPA dispatch) are those of
:mod:`models.dit`. Like the DiT, the model does not enable autocast itself: mixed precision is
the caller's choice (the original ran the blocks under bf16 autocast).

For generation, :meth:`ARTransformer.forward_step` feeds tokens chunk by chunk against a
key/value cache (:class:`KVCache`, from :meth:`ARTransformer.new_cache`), so that sampling L
tokens costs O(L^2) attention work instead of O(L^3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.dit import (
    LayerNorm,
    Rotary,
    TokenEmbedding,
    apply_rotary,
    attention,
    check_transformer_sizes,
    to_key_padding_mask,
)

# --------------------------------------------------------------------------- KV cache


@dataclass
class KVCache:
    """Rotated keys and values of the tokens fed so far, one pair of tensors per block.

    Attributes:
        keys: per block (B, H, max_length, D_head); positions ``< length`` are filled.
        values: per block (B, H, max_length, D_head), likewise.
        cos: (max_length, D_head/2) rotary cosine table for absolute positions.
        sin: (max_length, D_head/2) rotary sine table.
        length: number of positions filled (the absolute position of the next token).
    """

    keys: list[Tensor]
    values: list[Tensor]
    cos: Tensor
    sin: Tensor
    length: int = 0

    @property
    def batch_size(self) -> int:
        """B, the number of sequences generated in parallel."""
        return self.keys[0].shape[0]

    @property
    def max_length(self) -> int:
        """Capacity of the cache in positions."""
        return self.keys[0].shape[2]


def cached_attention(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Causal attention of a chunk of n new queries over all cached keys (new ones included).

    The queries sit at absolute positions ``S - n, ..., S - 1`` with ``S = keys.shape[2]``;
    query i may attend to key positions ``<= S - n + i``. With n = 1 every key is visible
    and no mask is built.

    Args:
        q: (B, H, n, D) rotated queries.
        keys: (B, H, S, D) rotated keys of positions 0..S-1.
        values: (B, H, S, D) values of positions 0..S-1.

    Returns:
        (B, n, H * D) attention output with the heads concatenated.
    """
    batch, n_heads, n, head_dim = q.shape
    total = keys.shape[2]
    mask = None
    if n > 1:
        query_pos = torch.arange(total - n, total, device=q.device)  # (n,)
        key_pos = torch.arange(total, device=q.device)  # (S,)
        mask = key_pos[None, :] <= query_pos[:, None]  # (n, S), True = may attend
    keys, values = keys.to(q.dtype), values.to(q.dtype)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, H, n, D)
    return out.transpose(1, 2).reshape(batch, n, n_heads * head_dim)


# --------------------------------------------------------------------------- layers


class ARBlock(nn.Module):
    """Pre-norm causal transformer block, as :class:`models.dit.DiTBlock` without adaLN.

    ``x = x + dropout(attn_out(attention(rotary(attn_qkv(norm1(x))))))``,
    ``x = x + dropout(mlp(norm2(x)))`` with ``mlp = Linear-GELU(tanh)-Linear``.
    """

    def __init__(self, dim: int, n_heads: int, mlp_ratio: int = 4, dropout: float = 0.1) -> None:
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

    def rotated_qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, L, D), cos/sin (L, D_head/2) -> rotated packed qkv (B, L, 3, H, D_head)."""
        batch, length, dim = x.shape
        qkv = self.attn_qkv(self.norm1(x)).view(batch, length, 3, self.n_heads, dim // self.n_heads)
        return apply_rotary(qkv, cos, sin)

    def residuals(self, x: Tensor, attn: Tensor) -> Tensor:
        """Both residual updates, given the attention output attn (B, L, D) -> (B, L, D)."""
        x = x + self.dropout(self.attn_out(attn))  # (B, L, D)
        return x + self.dropout(self.mlp(self.norm2(x)))  # (B, L, D)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """x (B, L, D), cos/sin (L, D_head/2) for positions 0..L-1 -> (B, L, D).

        ``key_padding_mask`` (B, L) bool, True at real tokens, or None (no padding).
        """
        qkv = self.rotated_qkv(x, cos, sin)  # (B, L, 3, H, D_head)
        return self.residuals(x, attention(qkv, causal=True, key_padding_mask=key_padding_mask))

    def forward_step(
        self, x: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, start: int
    ) -> Tensor:
        """Run a chunk of n tokens at positions start..start+n-1 against this block's cache.

        Args:
            x: (B, n, D) hidden states of the chunk.
            cos, sin: (n, D_head/2) rotary tables at the chunk's absolute positions.
            keys, values: (B, H, max_length, D_head) this block's cache; positions
                start..start+n-1 are written in place.
            start: number of positions already cached.

        Returns:
            (B, n, D) hidden states after the block.
        """
        end = start + x.shape[1]
        q, k, v = self.rotated_qkv(x, cos, sin).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, n, D_head)
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        return self.residuals(x, cached_attention(q, keys[:, :, :end], values[:, :, :end]))


class ARFinalLayer(nn.Module):
    """Output head ``linear(norm_final(x))``; ``linear`` is zero-initialised (logits start at 0)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = LayerNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, D) -> (B, L, out_dim)."""
        return self.linear(self.norm_final(x))


# --------------------------------------------------------------------------- model


class ARTransformer(nn.Module):
    """Causal transformer of the AR baseline: ``indices (B, L) -> next-token logits (B, L, V)``.

    Args:
        vocab_size: number of token ids (the mask token included, so that the AR and
            diffusion models share a tokenizer and the original checkpoint loads).
        hidden_size: model width D.
        n_blocks: number of transformer blocks.
        n_heads: attention heads; ``hidden_size / n_heads`` must be even.
        dropout: dropout on both residual branches of every block.
        mlp_ratio: MLP hidden width as a multiple of D.
        cond_dim: accepted and ignored, so that one model-size config (which names the DiT's
            noise-embedding width) serves both backbones; the AR model has no time input.
    """

    causal: ClassVar[bool] = True  # next-token model: for algorithm=ar (algorithms.Algorithm.causal)

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        n_blocks: int,
        n_heads: int,
        dropout: float = 0.1,
        mlp_ratio: int = 4,
        cond_dim: int | None = None,
    ) -> None:
        super().__init__()
        del cond_dim  # no time conditioning
        head_dim = check_transformer_sizes(
            vocab_size=vocab_size, hidden_size=hidden_size, n_blocks=n_blocks, n_heads=n_heads,
            mlp_ratio=mlp_ratio, dropout=dropout)

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.vocab_embed = TokenEmbedding(vocab_size, hidden_size)
        self.rotary_emb = Rotary(head_dim)
        self.blocks = nn.ModuleList(
            ARBlock(hidden_size, n_heads, mlp_ratio, dropout) for _ in range(n_blocks))
        self.output_layer = ARFinalLayer(hidden_size, vocab_size)

    def forward(
        self, indices: Tensor, sigma: Tensor | None = None, attention_mask: Tensor | None = None
    ) -> Tensor:
        """indices (B, L) long -> logits (B, L, vocab_size); logits[:, i] predict token i + 1.

        ``sigma`` is ignored (accepted so that the AR model has the denoiser's signature).
        ``attention_mask`` (B, L), 1 = real token and 0 = padding, hides padding keys from
        every query on top of the causal mask, so that padding never changes the logits at
        real tokens wherever it sits (with right padding causality alone already ensures
        it). None or all ones: no mask, the fast path. :meth:`forward_step` takes no mask.
        """
        if indices.ndim != 2:
            raise ValueError(f'indices must be (B, L), got shape {tuple(indices.shape)}')
        padding = to_key_padding_mask(attention_mask, indices)  # (B, L) bool or None
        x = self.vocab_embed(indices)  # (B, L, D)
        cos, sin = self.rotary_emb(indices.shape[1], x.device)  # each (L, D_head/2)
        for block in self.blocks:
            x = block(x, cos, sin, padding)  # (B, L, D)
        return self.output_layer(x)  # (B, L, V)

    def new_cache(
        self,
        batch_size: int,
        max_length: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty key/value cache for ``batch_size`` sequences of up to ``max_length`` tokens.

        ``device`` and ``dtype`` default to those of the parameters; under bf16 autocast pass
        ``dtype=torch.bfloat16`` to halve the cache's memory (keys and values are bf16 then).
        Memory: ``2 * n_blocks * batch_size * max_length * hidden_size`` elements.
        """
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(
                f'batch_size and max_length must be positive, got {batch_size}, {max_length}')
        device = self.vocab_embed.embedding.device if device is None else torch.device(device)
        dtype = self.vocab_embed.embedding.dtype if dtype is None else dtype
        shape = (batch_size, self.n_heads, max_length, self.head_dim)
        cos, sin = self.rotary_emb(max_length, device)  # each (max_length, D_head/2)
        return KVCache(
            keys=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks],
            values=[torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks],
            cos=cos,
            sin=sin,
        )

    def forward_step(self, indices: Tensor, cache: KVCache) -> Tensor:
        """Feed the next chunk of tokens and return their logits, updating ``cache`` in place.

        The chunk sits at absolute positions ``cache.length, ..., cache.length + n - 1``; its
        keys and values are appended to the cache and each token attends causally to all
        cached positions up to its own. A prompt is prefilled with one call (n = its length);
        generation then feeds one token per call. Equal to :meth:`forward` on the whole
        sequence so far, restricted to the chunk's positions. Eval mode only (no dropout).

        Args:
            indices: (B, n) long, the next n tokens.
            cache: from :meth:`new_cache`; ``cache.length`` grows by n.

        Returns:
            (B, n, vocab_size) logits; the last position scores the token after the chunk.
        """
        if self.training:
            raise RuntimeError('forward_step is for generation: call model.eval() first '
                               '(dropout is not applied in cached decoding)')
        if indices.ndim != 2:
            raise ValueError(f'indices must be (B, n), got shape {tuple(indices.shape)}')
        if len(cache.keys) != len(self.blocks):
            raise ValueError(
                f'cache has {len(cache.keys)} blocks, the model {len(self.blocks)}: '
                'make it with this model\'s new_cache')
        batch, n = indices.shape
        start, end = cache.length, cache.length + n
        if batch != cache.batch_size:
            raise ValueError(f'indices batch size {batch} != cache batch size {cache.batch_size}')
        if n == 0 or end > cache.max_length:
            raise ValueError(
                f'cannot feed {n} tokens at position {start}: cache holds {cache.max_length}')
        x = self.vocab_embed(indices)  # (B, n, D)
        cos, sin = cache.cos[start:end], cache.sin[start:end]  # each (n, D_head/2)
        for block, keys, values in zip(self.blocks, cache.keys, cache.values, strict=True):
            x = block.forward_step(x, cos, sin, keys, values, start)  # (B, n, D)
        cache.length = end
        return self.output_layer(x)  # (B, n, V)
