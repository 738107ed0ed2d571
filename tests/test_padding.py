"""Padding is hidden from attention: it never changes the logits, or the loss, at real tokens.

Data items carry ``attention_mask`` (B, L), 1 = real token and 0 = padding. The loss already
scores padding 0; these tests pin that the backbones also ignore padding keys when given the
mask (and that the tests would notice if they did not), that an all-ones mask is exactly the
unmasked fast path, and that every parameterization hands the mask to its backbone.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_autoregressive import make_model as make_ar
from test_dit import make_inputs
from test_dit import make_model as make_dit
from torch import Tensor, nn

from algorithms import AR, D3PM, MDLM, SEDD, Algorithm
from models import dit
from models.dit import padding_attn_mask
from noise_schedule import LogLinear

# One row per padding pattern: right (the data's), left, in the middle, none.
PADDING = torch.tensor([
    [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    [0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
    [1, 1, 1, 0, 0, 0, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
])
RIGHT_PADDING = torch.tensor([
    [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
])


def change_padding(indices: Tensor, attention_mask: Tensor, high: int, seed: int = 7) -> Tensor:
    """``indices`` with every padding position set to a different token id in [0, high)."""
    gen = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, high, indices.shape, generator=gen)
    return torch.where(attention_mask.bool(), indices, (indices + shift) % high)


def dit_logits(model: nn.Module, indices: Tensor, attention_mask: Tensor | None) -> Tensor:
    """DiT logits (B, L, V) at fixed non-zero noise levels."""
    sigma = make_inputs(batch=indices.shape[0], length=indices.shape[1])[1]
    with torch.no_grad():
        return model(indices, sigma, attention_mask=attention_mask)


def ar_logits(model: nn.Module, indices: Tensor, attention_mask: Tensor | None) -> Tensor:
    """ARTransformer logits (B, L, V)."""
    with torch.no_grad():
        return model(indices, attention_mask=attention_mask)


BACKBONES = {
    'dit': (lambda: make_dit(), dit_logits),
    'ar': (lambda: make_ar(), ar_logits),
}


# ---- the backbones ---------------------------------------------------------------------------

@pytest.mark.parametrize('name', BACKBONES)
def test_padding_never_changes_the_logits_at_real_tokens(name: str) -> None:
    make, logits_of = BACKBONES[name]
    model = make()
    indices = torch.randint(0, model.vocab_size, PADDING.shape, generator=torch.Generator().manual_seed(1))
    changed = change_padding(indices, PADDING, model.vocab_size)
    real = PADDING.bool()

    before, after = logits_of(model, indices, PADDING), logits_of(model, changed, PADDING)
    torch.testing.assert_close(after[real], before[real], rtol=0.0, atol=1e-6)
    assert before.isfinite().all() and after.isfinite().all()  # a query with no real key is no NaN

    # Without the mask the same change does reach real tokens: the check above can fail.
    leaked = (logits_of(model, changed, None) - logits_of(model, indices, None)).abs().amax(-1)  # (B, L)
    assert (leaked[real] > 1e-6).any()


@pytest.mark.parametrize('name', BACKBONES)
def test_all_ones_mask_is_the_unmasked_path(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make, logits_of = BACKBONES[name]
    model = make()
    indices = torch.randint(0, model.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    expected = logits_of(model, indices, None)

    sdpa = F.scaled_dot_product_attention
    sdpa_masks: list[Tensor | None] = []

    def spy(*args: Tensor, **kwargs: object) -> Tensor:
        sdpa_masks.append(kwargs.get('attn_mask'))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(dit.F, 'scaled_dot_product_attention', spy)
    ones = torch.ones_like(indices)
    assert torch.equal(logits_of(model, indices, ones), expected)
    assert torch.equal(logits_of(model, indices, ones.bool()), expected)
    assert sdpa_masks and all(mask is None for mask in sdpa_masks)  # no mask built: the fast path


def test_right_padding_is_the_same_as_a_shorter_sequence() -> None:
    model = make_dit()
    indices, sigma = make_inputs(batch=RIGHT_PADDING.shape[0], length=RIGHT_PADDING.shape[1])
    with torch.no_grad():
        padded = model(indices, sigma, attention_mask=RIGHT_PADDING)
        for b, n in enumerate(RIGHT_PADDING.sum(-1).tolist()):
            alone = model(indices[b : b + 1, :n], sigma[b : b + 1])  # (1, n, V)
            torch.testing.assert_close(padded[b, :n], alone[0], rtol=1e-5, atol=1e-5)


def test_padding_attn_mask_hides_padding_keys_from_real_queries() -> None:
    real = torch.cat([PADDING, torch.zeros(1, PADDING.shape[1], dtype=torch.long)]).bool()  # + all padding
    bidirectional = padding_attn_mask(real, causal=False)
    assert bidirectional.shape == (real.shape[0], 1, 1, real.shape[1])
    causal = padding_attn_mask(real, causal=True)
    assert causal.shape == (real.shape[0], 1, real.shape[1], real.shape[1])
    for mask in (bidirectional.expand_as(causal), causal):
        seen_by_real = mask[:, 0][real]  # (N_real, L): the keys each real query attends to
        assert not (seen_by_real & ~real.repeat_interleave(real.sum(-1), dim=0)).any()
        assert mask.any(-1).all()  # every query attends to something: no softmax over nothing
    tril = torch.ones(real.shape[1], real.shape[1]).tril().bool()
    assert not (causal[:, 0] & ~tril).any()  # and still causal


def test_attention_mask_shape_is_checked() -> None:
    model = make_dit()
    indices, sigma = make_inputs(batch=2, length=6)
    with pytest.raises(ValueError, match='attention_mask must be'):
        model(indices, sigma, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match='attention_mask must be'):
        make_ar()(indices, attention_mask=torch.ones(6))


# ---- the losses --------------------------------------------------------------------------------

ALGORITHM_KWARGS = {'subs': {}, 'd3pm': {'T': 1000}, 'sedd': {}, 'ar': {}}


def padded_loss(algorithm: Algorithm, backbone: nn.Module, x0: Tensor, attention_mask: Tensor) -> Tensor:
    """Per-token nll of one loss call with the random numbers fixed."""
    torch.manual_seed(0)
    with torch.no_grad():
        return algorithm.loss(backbone, x0, attention_mask).nll


@pytest.mark.parametrize('parameterization', ALGORITHM_KWARGS)
def test_loss_ignores_padding(parameterization: str, monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = make_ar() if parameterization == 'ar' else make_dit()
    mask_index = backbone.vocab_size - 1
    if parameterization == 'ar':
        algorithm = AR(mask_index)
    else:
        cls = {'subs': MDLM, 'd3pm': D3PM, 'sedd': SEDD}[parameterization]
        algorithm = cls(LogLinear(), mask_index, time_conditioning=True, **ALGORITHM_KWARGS[parameterization])
    x0 = torch.randint(0, mask_index, RIGHT_PADDING.shape, generator=torch.Generator().manual_seed(3))
    changed = change_padding(x0, RIGHT_PADDING, mask_index)
    scored = RIGHT_PADDING[:, 1:] if parameterization == 'ar' else RIGHT_PADDING  # (B, L')

    nll = padded_loss(algorithm, backbone, x0, RIGHT_PADDING)
    assert nll.shape == scored.shape and nll.isfinite().all()
    assert (nll[~scored.bool()] == 0).all() and (nll[scored.bool()] > 0).any()
    torch.testing.assert_close(padded_loss(algorithm, backbone, changed, RIGHT_PADDING), nll, rtol=0.0, atol=1e-6)

    if parameterization != 'ar':  # causality alone hides right padding from the AR model
        # The check can fail: with the mask not handed to the backbone, padding leaks into the loss.
        unmasked = staticmethod(lambda backbone, attention_mask, padded=None: backbone)
        monkeypatch.setattr(Algorithm, 'with_padding_mask', unmasked)
        leaked = padded_loss(algorithm, backbone, changed, RIGHT_PADDING) - padded_loss(
            algorithm, backbone, x0, RIGHT_PADDING)
        assert (leaked.abs() > 1e-6).any()


def test_with_padding_mask_binds_the_mask_only_when_there_is_padding() -> None:
    backbone = nn.Identity()
    assert Algorithm.with_padding_mask(backbone, torch.ones(2, 5, dtype=torch.long)) is backbone
    bound = Algorithm.with_padding_mask(backbone, RIGHT_PADDING)
    assert bound.func is backbone and bound.keywords['attention_mask'] is RIGHT_PADDING
