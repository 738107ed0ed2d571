"""Prefix and infilling templates: text -> a partially masked (1, L) input for a sampler.

The samplers keep every position of their input that is not the mask id and generate the
others, so conditioning is only a matter of building the input:

    template = infill_template(tokenizer, "The cat [MASK:3] on the mat.", 32, mask_index, bos, eos)
    out = sampler.sample(denoiser, template.expand(batch, -1))  # (batch, 32)
    kept = kept_positions(template, mask_index)[0]  # (32,) bool
    assert (out.tokens[:, kept] == template[:, kept]).all()

Templates follow the layout of the training blocks, ``[BOS] text [EOS]``
(:func:`dataloader.block_special_ids` gives the ids). Text is tokenized without special
tokens. Whitespace right before a generated span is dropped: byte-level BPE (GPT-2) attaches
a space to the *following* word, here the generated one, so "a [MASK] b" becomes the
tokens of "a", the mask, then those of " b". Word-level and WordPiece tokenizers ignore it.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

# "[MASK]" (one token) or "[MASK:n]" (n tokens); anything after the colon is checked below.
MASK_MARKER = re.compile(r"\[MASK(?::([^\]]*))?\]")
COUNT = re.compile(r"[1-9][0-9]*")  # a positive integer, no sign, no leading zero


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, mask_index: int) -> list[int]:
    """Token ids of ``text`` without special tokens; ``ValueError`` if one is the mask id."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if mask_index in ids:
        raise ValueError(
            f"the text {text!r} tokenizes to the mask id {mask_index}, which the sampler would "
            "generate instead of keeping; mark generated spans with [MASK] / [MASK:n] in infill_template."
        )
    return ids


def _as_template(ids: list[int], length: int | None, mask_index: int, what: str) -> Tensor:
    """``ids`` padded with ``mask_index`` to ``length`` (unless None), as a (1, L) long tensor."""
    if length is not None and len(ids) > length:
        raise ValueError(f"{what} takes {len(ids)} tokens and does not fit in length {length}.")
    padding = [] if length is None else [mask_index] * (length - len(ids))
    return torch.tensor([ids + padding], dtype=torch.long)  # (1, L)


def prefix_template(
    tokenizer: PreTrainedTokenizerBase, prefix: str, length: int, mask_index: int, bos_id: int
) -> Tensor:
    """``[BOS] prefix-tokens [MASK] ... [MASK]``, (1, length) long: a prompt to continue.

    The prefix may fill the whole length (nothing to generate here, e.g. as the first window
    of :func:`samplers.semi_ar_sample`). Trailing whitespace of the prefix is dropped.

    Raises:
        ValueError: if ``1 + len(prefix tokens) > length``, or a prefix token is the mask id.
    """
    ids = [bos_id, *_encode(tokenizer, prefix.rstrip(), mask_index)]
    return _as_template(ids, length, mask_index, f"[BOS] + prefix {prefix!r}")


def _marker_count(marker: re.Match[str]) -> int:
    """Number of masks a ``[MASK]`` / ``[MASK:n]`` marker stands for; ``ValueError`` if malformed."""
    count = marker.group(1)
    if count is None:
        return 1
    if not COUNT.fullmatch(count):
        raise ValueError(f"bad marker {marker.group(0)!r}: use [MASK] or [MASK:n] with an integer n >= 1.")
    return int(count)


def infill_template(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    length: int | None,
    mask_index: int,
    bos_id: int,
    eos_id: int,
) -> Tensor:
    """``[BOS] text [EOS]`` with ``[MASK]`` / ``[MASK:n]`` markers as 1 / n mask ids, (1, L) long.

    The text between markers is tokenized (no special tokens) and kept. The result is padded
    with masks to ``length`` (positions after EOS to generate too), or has exactly the template's
    length when ``length`` is None.

    Raises:
        ValueError: for text without a marker (nothing to fill in: the model would write a new
            document after it; continuing a text is ``sampling.prefix``), a malformed marker
            (``[MASK:0]``, ``[MASK:x]``, an unclosed ``[MASK``), a template longer than ``length``,
            or kept text that tokenizes to the mask id.
    """
    if not MASK_MARKER.search(text):
        raise ValueError(
            f"sampling.infill={text!r} has no [MASK] or [MASK:n] marker, so there is nothing to fill in (the "
            "model would only write a new document after the text). Mark the gaps, e.g. 'The [MASK:3] sat.', "
            "or use sampling.prefix to continue the text."
        )
    ids, start = [bos_id], 0
    for marker in MASK_MARKER.finditer(text):
        ids += _encode_piece(tokenizer, text[start : marker.start()].rstrip(), mask_index)
        ids += [mask_index] * _marker_count(marker)
        start = marker.end()
    ids += [*_encode_piece(tokenizer, text[start:], mask_index), eos_id]
    return _as_template(ids, length, mask_index, f"[BOS] + infilling text {text!r} + [EOS]")


def _encode_piece(tokenizer: PreTrainedTokenizerBase, piece: str, mask_index: int) -> list[int]:
    """Tokens of a piece of text between markers; ``ValueError`` if it holds a broken marker."""
    if "[MASK" in piece:
        raise ValueError(f"malformed mask marker in {piece!r}: use [MASK] or [MASK:n] with an integer n >= 1.")
    return _encode(tokenizer, piece, mask_index)


def kept_positions(template: Tensor, mask_index: int) -> Tensor:
    """(B, L) bool, True where ``template`` holds a given token (kept by the sampler)."""
    return template != mask_index
