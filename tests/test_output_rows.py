"""The output layer only where the loss and the samplers need it (masked positions): same numbers.

Under SUBS an unmasked position carries its token over and scores 0, so the DiT's 50k-vocabulary
output layer runs only at masked positions (``output_mask``). The loss and the denoisers must not
change: losses and log-probabilities equal to 1e-6, gradients too, against the full output layer.
"""

from __future__ import annotations

import pytest
import torch

from algorithms import MDLM, Draws, subs_log_probs, subs_log_probs_at_masks
from block_diffusion import BD3LM
from models.dit import DiT
from noise_schedule import LogLinear

VOCAB, MASK = 37, 36


def random_dit(seed: int) -> DiT:
    torch.manual_seed(seed)
    model = DiT(VOCAB, hidden_size=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def full_output(model: DiT):
    """The same network without ``selects_outputs``: the full output layer, as before."""
    return lambda *args, **kwargs: model(*args, **kwargs)


def test_rows_equal_the_full_logits_at_the_chosen_positions() -> None:
    model = random_dit(0)
    x = torch.randint(0, VOCAB, (3, 10))
    sigma = torch.rand(3)
    wanted = torch.rand(3, 10) < 0.5
    torch.testing.assert_close(model(x, sigma, output_mask=wanted), model(x, sigma)[wanted], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="output_mask must be"):
        model(x, sigma, output_mask=wanted[:, :5])


def grads(model: DiT) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out


@pytest.mark.parametrize("algorithm", [MDLM(LogLinear(), MASK), MDLM(LogLinear(), MASK, T=1000),
                                       BD3LM(LogLinear(), MASK, block_size=4)], ids=["mdlm", "mdlm-T1000", "bd3lm"])
def test_the_loss_and_its_gradients_do_not_change(algorithm) -> None:
    model = random_dit(1)
    x0 = torch.randint(0, MASK, (4, 12))
    attention_mask = torch.ones(4, 12)
    attention_mask[1, 9:] = 0  # padding in one row
    draws = Draws(time=torch.rand(4), mask=torch.rand(4, 12))
    fast = algorithm.loss(model, x0, attention_mask, draws=draws).nll
    fast.sum().backward()
    fast_grads = grads(model)
    slow = algorithm.loss(full_output(model), x0, attention_mask, draws=draws).nll
    slow.sum().backward()
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-6)
    for a, b in zip(fast_grads, grads(model), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert (fast > 0).any() and (fast == 0).any()  # masked positions score, carried ones do not


def test_denoisers_give_the_same_log_probabilities() -> None:
    model = random_dit(2).eval()
    xt = torch.randint(0, MASK, (2, 12))
    xt[torch.rand(2, 12) < 0.6] = MASK
    sigma = torch.zeros(2)
    fast = subs_log_probs_at_masks(model, xt, sigma, MASK)
    slow = subs_log_probs(model(xt, sigma), xt, MASK)
    finite = slow > -1e5
    assert torch.equal(fast > -1e5, finite)
    torch.testing.assert_close(fast[finite], slow[finite], atol=1e-6, rtol=1e-6)
    algorithm = BD3LM(LogLinear(), MASK, block_size=4)  # the block denoiser with and without the cache
    prefix, block = xt[:, :8].clone(), xt[:, 8:].clone()
    prefix[prefix == MASK] = 0
    uncached = algorithm.block_denoiser(model, prefix)(block, sigma)
    reference = algorithm.block_denoiser(full_output(model), prefix)(block, sigma)
    torch.testing.assert_close(uncached, reference, atol=1e-6, rtol=1e-6)
    cache = model.new_cache()
    cache.store = True
    for b in range(2):  # block by block, as the sampler fills it
        model(prefix[:, 4 * b:4 * (b + 1)], sigma, cache=cache)
    cache.store = False
    torch.testing.assert_close(algorithm.cached_denoiser(model, cache)(block, sigma), reference, atol=1e-5, rtol=1e-5)


def test_denoisers_selecting_rows_give_those_rows_only() -> None:
    """``rows=`` (some masked positions): the (N, V) log-probs of those positions, equal to the full output's."""
    model = random_dit(3).eval()
    xt = torch.randint(0, MASK, (2, 12))
    xt[torch.rand(2, 12, generator=torch.Generator().manual_seed(0)) < 0.6] = MASK
    rows = (xt == MASK) & (torch.rand(2, 12, generator=torch.Generator().manual_seed(1)) < 0.5)
    assert rows.sum() >= 2 and (rows != (xt == MASK)).any()
    sigma = torch.full((2,), 0.7)
    for algorithm in (MDLM(LogLinear(), MASK), MDLM(LogLinear(), MASK, time_conditioning=True)):
        denoiser = algorithm.denoiser(model)
        assert denoiser.selects_rows
        fast = denoiser(xt, sigma, rows=rows)
        assert fast.shape == (int(rows.sum()), VOCAB)
        torch.testing.assert_close(fast, algorithm.denoiser(full_output(model))(xt, sigma)[rows], atol=1e-6,
                                   rtol=1e-6)
    algorithm = BD3LM(LogLinear(), MASK, block_size=4)
    prefix, block, block_rows = xt[:, :8].clone(), xt[:, 8:].clone(), rows[:, 8:]
    prefix[prefix == MASK] = 0
    reference = algorithm.block_denoiser(full_output(model), prefix)(block, sigma)[block_rows]
    torch.testing.assert_close(algorithm.block_denoiser(model, prefix)(block, sigma, rows=block_rows), reference,
                               atol=1e-6, rtol=1e-6)
    cache = model.new_cache()
    cache.store = True
    for b in range(2):  # BD3-LM's network reads sigma = 0
        model(prefix[:, 4 * b:4 * (b + 1)], torch.zeros(2), cache=cache)
    cache.store = False
    torch.testing.assert_close(algorithm.cached_denoiser(model, cache)(block, sigma, rows=block_rows), reference,
                               atol=1e-5, rtol=1e-5)
