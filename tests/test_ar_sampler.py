"""AR sampling: KV-cache parity, temperature / top-p, and the exact law of a toy AR model."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from models.autoregressive import ARTransformer
from samplers import ARSampler

MASK = 11
VOCAB = 12


def random_model(seed: int = 0) -> ARTransformer:
    torch.manual_seed(seed)
    model = ARTransformer(VOCAB, hidden_size=32, n_blocks=2, n_heads=4, dropout=0.0).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    return model


def prompt(batch: int, length: int, prefix: int = 1) -> torch.Tensor:
    x = torch.full((batch, length), MASK)
    x[:, :prefix] = torch.arange(prefix) % MASK
    return x


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)])
def test_kv_cache_gives_the_same_tokens(temperature: float, top_p: float) -> None:
    model = random_model()
    outs = []
    for kv_cache in (True, False):
        sampler = ARSampler(MASK, temperature=temperature, top_p=top_p, kv_cache=kv_cache)
        outs.append(sampler.sample(model, prompt(8, 12, prefix=3), generator=torch.Generator().manual_seed(5)))
    assert torch.equal(outs[0].tokens, outs[1].tokens)
    assert outs[0].nfe == outs[1].nfe == 9
    assert torch.all(outs[0].tokens[:, :3] == prompt(8, 12, prefix=3)[:, :3])
    assert not (outs[0].tokens == MASK).any()


def test_top_p_keeps_the_nucleus_and_temperature_scales() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0 + 1e-9]]))
    # p = 0.9: ReMDM's rule keeps the tokens with cumulative probability <= 0.9 (0.5, 0.3); Hugging
    # Face's keeps the smallest set reaching 0.9, so the crossing token (0.15) too.
    for rule, kept in (("remdm", 2), ("hf", 3)):
        probs = ARSampler(mask_index=4, top_p=0.9, top_p_rule=rule).next_token_probs(logits)
        assert probs[0, 4] == 0  # mask never sampled
        assert torch.all(probs[0, kept:] == 0) and torch.all(probs[0, :kept] > 0), rule
    probs = ARSampler(mask_index=4, top_p=0.4).next_token_probs(logits)  # below the top token: it alone
    assert probs[0, 0] > 0 and torch.all(probs[0, 1:] == 0)
    cold = ARSampler(mask_index=4, temperature=0.5).next_token_probs(logits)
    ratio = cold[0, 0] / cold[0, 1]
    torch.testing.assert_close(ratio, torch.tensor((0.5 / 0.3) ** 2, dtype=torch.float64))


def test_samples_follow_the_model_distribution() -> None:
    # Exact law of two generated tokens: p(a) p(b | a) from the model's own logits.
    model = random_model(1)
    x0 = prompt(1, 3)
    with torch.no_grad():
        first = ARSampler(MASK).next_token_probs(model(x0[:, :1], None)[:, -1])[0]
        pairs = torch.stack(torch.meshgrid(torch.arange(VOCAB), torch.arange(VOCAB), indexing="ij"), -1).reshape(-1, 2)
        seqs = torch.cat([x0[:, :1].expand(len(pairs), 1), pairs], 1)
        second = ARSampler(MASK).next_token_probs(model(seqs[:, :2], None)[:, -1])
    law = first[pairs[:, 0]] * second[torch.arange(len(pairs)), pairs[:, 1]]
    n = 20_000
    out = ARSampler(MASK).sample(model, prompt(n, 3), generator=torch.Generator().manual_seed(0)).tokens
    counts = torch.bincount(out[:, 1] * VOCAB + out[:, 2], minlength=VOCAB * VOCAB).double()
    keep = law * n >= 5
    expected = law[keep] * n
    observed = counts[keep]
    observed = torch.cat([observed, (n - observed.sum()).reshape(1)])
    expected = torch.cat([expected, (n - expected.sum()).reshape(1)])
    assert stats.chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3
    assert counts[law == 0].sum() == 0


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="temperature"):
        ARSampler(MASK, temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        ARSampler(MASK, top_p=0)
    x = prompt(2, 5)
    x[1, 3] = 2  # a given token after a masked one
    with pytest.raises(ValueError, match="prefix"):
        ARSampler(MASK).sample(random_model(), x)
