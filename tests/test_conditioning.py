"""Prefix / infilling templates: exact contents, errors, and sampling from them end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

import synthetic
from conditioning import infill_template, kept_positions, prefix_template
from noise_schedule import LogLinear
from samplers import DDPMSampler, Denoiser, semi_ar_sample
from synthetic import BOS_ID, EOS_ID, MASK_ID, WORD_OFFSET

SOURCE = synthetic.MarkovSource.from_seed(0)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    """The word-level tokenizer of the synthetic corpus: [BOS]=1, [EOS]=2, [MASK]=3, words from 5."""
    return synthetic.build_tokenizer(SOURCE)


def ids(text: str) -> list[int]:
    """Expected token ids of whitespace-separated known words."""
    return [WORD_OFFSET + SOURCE.words.index(word) for word in text.split()]


# ---- template contents ----------------------------------------------------------------------

def test_prefix_template(tokenizer: PreTrainedTokenizerBase) -> None:
    template = prefix_template(tokenizer, "the old cat saw", 9, MASK_ID, BOS_ID)
    assert template.dtype == torch.long
    assert template.tolist() == [[BOS_ID, *ids("the old cat saw"), *[MASK_ID] * 4]]
    # The prefix may fill the length exactly; trailing whitespace is dropped.
    full = prefix_template(tokenizer, "the old cat saw  ", 5, MASK_ID, BOS_ID)
    assert full.tolist() == [[BOS_ID, *ids("the old cat saw")]]


def test_infill_template(tokenizer: PreTrainedTokenizerBase) -> None:
    text = "the [MASK] cat [MASK:3] the dog ."
    expected = [BOS_ID, *ids("the"), MASK_ID, *ids("cat"), *[MASK_ID] * 3, *ids("the dog ."), EOS_ID]
    assert infill_template(tokenizer, text, None, MASK_ID, BOS_ID, EOS_ID).tolist() == [expected]
    padded = infill_template(tokenizer, text, len(expected) + 4, MASK_ID, BOS_ID, EOS_ID)
    assert padded.tolist() == [expected + [MASK_ID] * 4]
    # Markers next to each other, at the start and at the end.
    edges = infill_template(tokenizer, "[MASK:2][MASK] dog [MASK]", None, MASK_ID, BOS_ID, EOS_ID)
    assert edges.tolist() == [[BOS_ID, *[MASK_ID] * 3, *ids("dog"), MASK_ID, EOS_ID]]


def test_infill_without_a_marker_is_an_error(tokenizer: PreTrainedTokenizerBase) -> None:
    """No marker: nothing to fill in. (It used to become [BOS] text [EOS] [MASK]..., a new document
    written after the user's text, with the summary computed on the user's tokens.)"""
    with pytest.raises(ValueError, match=r"no \[MASK\] or \[MASK:n\] marker.*use sampling.prefix"):
        infill_template(tokenizer, "the dog", 6, MASK_ID, BOS_ID, EOS_ID)


@pytest.mark.parametrize("count", [1, 3, 12])
def test_mask_n_gives_n_masks(tokenizer: PreTrainedTokenizerBase, count: int) -> None:
    template = infill_template(tokenizer, f"the [MASK:{count}] .", None, MASK_ID, BOS_ID, EOS_ID)
    assert template.shape == (1, count + 4)
    assert int((template == MASK_ID).sum()) == count
    assert template[0, 2 : 2 + count].eq(MASK_ID).all()


def test_kept_positions(tokenizer: PreTrainedTokenizerBase) -> None:
    template = infill_template(tokenizer, "[MASK] cat [MASK:2]", 7, MASK_ID, BOS_ID, EOS_ID)
    kept = kept_positions(template, MASK_ID)
    assert kept.dtype == torch.bool
    assert kept.tolist() == [[True, False, True, False, False, True, False]]


# ---- errors -----------------------------------------------------------------------------------

def test_too_long(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="does not fit in length 4"):
        prefix_template(tokenizer, "the old cat saw", 4, MASK_ID, BOS_ID)  # 5 tokens with BOS
    with pytest.raises(ValueError, match="does not fit in length 6"):
        infill_template(tokenizer, "the [MASK:3] cat", 6, MASK_ID, BOS_ID, EOS_ID)  # 7 tokens


@pytest.mark.parametrize(
    "text", ["the [MASK:0] cat", "the [MASK:x]", "[MASK:]", "[MASK:-2]", "[MASK:03]", "[MASK: 2]", "[MASK:2.0]",
             "the [MASK", "the [MASK:2 cat", "the [MASKED] cat"],
)
def test_bad_marker(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    with pytest.raises(ValueError, match="marker"):
        infill_template(tokenizer, text, 16, MASK_ID, BOS_ID, EOS_ID)


def test_kept_text_must_not_be_the_mask(tokenizer: PreTrainedTokenizerBase) -> None:
    # The mask token itself in a prefix would be generated instead of kept.
    with pytest.raises(ValueError, match="mask id"):
        prefix_template(tokenizer, "the [MASK] cat", 8, MASK_ID, BOS_ID)


# ---- real tokenizers (shared data) ------------------------------------------------------------

def test_gpt2_space_goes_with_the_next_word(shared_data: Path) -> None:
    """Byte-level BPE: no lone " " token before a generated span; the text after it keeps its space."""
    gpt2 = AutoTokenizer.from_pretrained(shared_data / "gpt2_tokenizer")
    eot, mask = 50256, 50257  # <|endoftext|> delimits blocks; the model's mask id follows the vocabulary
    template = infill_template(gpt2, "The cat [MASK:2] on the mat.", 16, mask, eot, eot)
    before, after = gpt2.encode("The cat"), gpt2.encode(" on the mat.")
    expected = [eot, *before, mask, mask, *after, eot]
    assert template.tolist() == [expected + [mask] * (16 - len(expected))]
    assert gpt2.decode(template[0, 1 + len(before) + 2 : -1 - (16 - len(expected))]) == " on the mat."
    prefix = prefix_template(gpt2, "Once upon a time ", 8, mask, eot)
    assert prefix[0, :5].tolist() == [eot, *gpt2.encode("Once upon a time")]


def test_bert_template(shared_data: Path) -> None:
    bert = AutoTokenizer.from_pretrained(shared_data / "bert_base_uncased")
    template = infill_template(bert, "The cat [MASK] on the mat.", None, 103, 101, 102)  # [MASK], [CLS], [SEP]
    tokens = bert.convert_ids_to_tokens(template[0])
    assert tokens == ["[CLS]", "the", "cat", "[MASK]", "on", "the", "mat", ".", "[SEP]"]


# ---- end to end: sampling keeps the given tokens ----------------------------------------------

def uniform_denoiser(vocab: int, mask_index: int) -> Denoiser:
    """A SUBS denoiser: uniform over every id but the mask, one-hot on given tokens."""

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        log_p = torch.full((*x.shape, vocab), -torch.log(torch.tensor(vocab - 1.0)).item())  # (B, L, V)
        log_p[..., mask_index] = -torch.inf
        carry = torch.nn.functional.one_hot(x, vocab).log()  # (B, L, V)
        return torch.where((x == mask_index)[..., None], log_p, carry)

    return denoiser


def test_sampling_from_templates_keeps_the_given_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    denoiser = uniform_denoiser(len(tokenizer), MASK_ID)
    sampler = DDPMSampler(LogLinear(), MASK_ID, steps=8, noise_removal=True)
    templates = [
        prefix_template(tokenizer, "the old cat", 12, MASK_ID, BOS_ID),
        infill_template(tokenizer, "the [MASK:2] saw [MASK] dog .", 12, MASK_ID, BOS_ID, EOS_ID),
    ]
    for template in templates:
        out = sampler.sample(denoiser, template.expand(8, -1), generator=torch.Generator().manual_seed(0))
        kept = kept_positions(template, MASK_ID)[0]  # (L,)
        assert torch.equal(out.tokens[:, kept], template[:, kept].expand(8, -1))
        assert not (out.tokens == MASK_ID).any()
        assert (out.tokens[:, ~kept] != out.tokens[0, ~kept]).any()  # generated, not copied


def test_semi_ar_continues_a_prefix(tokenizer: PreTrainedTokenizerBase) -> None:
    denoiser = uniform_denoiser(len(tokenizer), MASK_ID)
    sampler = DDPMSampler(LogLinear(), MASK_ID, steps=4)
    template = prefix_template(tokenizer, "the old cat", 6, MASK_ID, BOS_ID)
    out = semi_ar_sample(sampler, denoiser, template.expand(3, -1), stride_length=2, num_strides=3)
    assert out.tokens.shape == (3, 12)
    assert torch.equal(out.tokens[:, :4], template[:, :4].expand(3, -1))
    assert not (out.tokens == MASK_ID).any()
