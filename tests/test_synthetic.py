"""The built-in Markov source: exact entropies, sampling law, likelihood and posteriors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from synthetic import END, SPECIAL_TOKENS, WORD_OFFSET, MarkovSource, build_tokenizer


@pytest.fixture(scope="module")
def source() -> MarkovSource:
    return MarkovSource.from_seed(0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_entropy_rate_is_at_most_half_the_unigram_entropy(seed: int) -> None:
    chain = MarkovSource.from_seed(seed)
    ratio = chain.entropy_rate() / chain.unigram_entropy()
    assert 0.3 < ratio <= 0.5


def test_entropies_match_their_definitions(source: MarkovSource) -> None:
    pi, t = source.stationary(), source.transition
    unigram = -sum(p * math.log(p) for p in pi.tolist() if p > 0)
    rate = -sum(
        pi[u].item() * t[u, v].item() * math.log(t[u, v].item())
        for u in range(source.num_words)
        for v in range(source.num_words)
        if t[u, v] > 0
    )
    assert source.unigram_entropy() == pytest.approx(unigram, rel=1e-12)
    assert source.entropy_rate() == pytest.approx(rate, rel=1e-12)


def test_transition_is_row_stochastic_and_start_follows_a_sentence_end(source: MarkovSource) -> None:
    w = source.num_words
    assert source.transition.shape == (w, w) and source.transition.dtype == torch.float64
    assert (source.transition >= 0).all()
    torch.testing.assert_close(source.transition.sum(1), torch.ones(w, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(source.start, source.transition[source.words.index(END)])
    assert len(set(source.words)) == w


def test_stationary_distribution_is_stationary_and_unique(source: MarkovSource) -> None:
    pi = source.stationary()
    torch.testing.assert_close(pi @ source.transition, pi, rtol=0, atol=1e-13)
    assert pi.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert (pi > 0).all()  # irreducible
    # Aperiodic and irreducible: T^n converges to pi from every start word.
    power = torch.linalg.matrix_power(source.transition, 512)
    torch.testing.assert_close(power, pi.expand_as(power), rtol=0, atol=1e-10)


def test_chain_is_deterministic_for_a_seed_and_differs_across_seeds(source: MarkovSource) -> None:
    again, other = MarkovSource.from_seed(0), MarkovSource.from_seed(1)
    assert again.words == source.words
    assert torch.equal(again.transition, source.transition)
    assert not torch.equal(other.transition, source.transition)
    first = source.sample(50, 20, np.random.default_rng(7))
    np.testing.assert_array_equal(first, again.sample(50, 20, np.random.default_rng(7)))
    assert not np.array_equal(first, source.sample(50, 20, np.random.default_rng(8)))


def test_samples_follow_the_start_and_transition_laws(source: MarkovSource) -> None:
    w = source.num_words
    words = source.sample(20_000, 40, np.random.default_rng(0))  # (N, n)
    assert words.shape == (20_000, 40) and words.min() >= 0 and words.max() < w
    counts = np.zeros((w, w))
    np.add.at(counts, (words[:, :-1].ravel(), words[:, 1:].ravel()), 1)
    transition = source.transition.numpy()
    assert counts[transition == 0].sum() == 0  # never a zero-probability transition
    rows = [(counts[u], transition[u]) for u in np.argsort(-counts.sum(1))[:8]]
    rows.append((np.bincount(words[:, 0], minlength=w).astype(float), source.start.numpy()))
    for observed, probs in rows:
        expected = observed.sum() * probs
        big = expected >= 5  # chi-square needs expected counts >= 5; pool the rest
        pooled = expected[~big].sum() > 0
        observed_cells = np.append(observed[big], observed[~big].sum()) if pooled else observed[big]
        expected_cells = np.append(expected[big], expected[~big].sum()) if pooled else expected[big]
        assert stats.chisquare(observed_cells, expected_cells).pvalue > 1e-4


def test_log_prob_matches_a_python_loop(source: MarkovSource) -> None:
    words = torch.from_numpy(source.sample(16, 12, np.random.default_rng(3)))
    expected = []
    for row in words.tolist():
        total = math.log(source.start[row[0]].item())
        for a, b in itertools.pairwise(row):
            total += math.log(source.transition[a, b].item())
        expected.append(total)
    torch.testing.assert_close(source.log_prob(words), torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=0)


def test_log_prob_is_minus_infinity_for_impossible_sequences(source: MarkovSource) -> None:
    end = source.words.index(END)
    assert source.log_prob(torch.tensor([[end, end]])).item() == -math.inf  # ". ." never occurs


PATTERNS = [(True, False, True, False), (False, True, False, True), (False, False, True, True)]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_posterior_marginals_match_brute_force_enumeration(source: MarkovSource, pattern: tuple[bool, ...]) -> None:
    w = source.num_words
    words = torch.from_numpy(source.sample(1, 4, np.random.default_rng(11)))  # (1, 4)
    observed = torch.tensor([pattern])
    hidden = [i for i, seen in enumerate(pattern) if not seen]
    completions = words.repeat(w * w, 1)  # (W^2, 4): every filling of the two hidden slots
    grid = torch.cartesian_prod(torch.arange(w), torch.arange(w))  # (W^2, 2)
    completions[:, hidden] = grid
    joint = source.log_prob(completions).exp()  # (W^2,)
    posterior = source.posterior_marginals(words, observed)[0]  # (4, W)
    for slot, position in enumerate(hidden):
        expected = torch.zeros(w, dtype=torch.float64).index_add_(0, grid[:, slot], joint) / joint.sum()
        torch.testing.assert_close(posterior[position], expected, rtol=0, atol=1e-10)
    for position in (i for i, seen in enumerate(pattern) if seen):
        assert posterior[position, words[0, position]].item() == 1.0


def test_posterior_marginals_without_evidence_are_the_prior_marginals(source: MarkovSource) -> None:
    n = 6
    garbage = torch.full((2, n), 10**6)  # unobserved ids are ignored, however invalid
    posterior = source.posterior_marginals(garbage, torch.zeros(2, n, dtype=torch.bool))
    marginal = source.start
    for i in range(n):
        torch.testing.assert_close(posterior[:, i], marginal.expand(2, -1), rtol=0, atol=1e-12)
        marginal = marginal @ source.transition


def test_posterior_marginals_reject_impossible_evidence(source: MarkovSource) -> None:
    end = source.words.index(END)
    with pytest.raises(ValueError, match="probability zero"):
        source.posterior_marginals(torch.tensor([[end, end, 0]]), torch.tensor([[True, True, False]]))


def test_mean_nll_per_word_matches_the_exact_expectation_and_the_entropy_rate(source: MarkovSource) -> None:
    n = 200
    words = torch.from_numpy(source.sample(4_000, n, np.random.default_rng(5)))
    nll_per_word = -source.log_prob(words) / n  # (N,)
    # Exact E[-log p(x_1..x_n)] / n = (H(start) + sum_{i<n} marginal_i . h) / n, h = row entropies.
    row_entropy = -torch.special.xlogy(source.transition, source.transition).sum(1)
    marginal, expected = source.start, -torch.special.xlogy(source.start, source.start).sum()
    for _ in range(n - 1):
        expected = expected + marginal @ row_entropy
        marginal = marginal @ source.transition
    expected = expected.item() / n
    stderr = nll_per_word.std().item() / math.sqrt(len(nll_per_word))
    assert abs(nll_per_word.mean().item() - expected) < 4 * stderr
    assert expected == pytest.approx(source.entropy_rate(), abs=0.01)  # start effect: O(1/n)


def test_tokenizer_ids_and_round_trip(source: MarkovSource) -> None:
    tokenizer = build_tokenizer(source)
    assert len(tokenizer) == WORD_OFFSET + source.num_words
    assert tokenizer.convert_ids_to_tokens(list(range(WORD_OFFSET))) == list(SPECIAL_TOKENS)
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("pad", "bos", "eos", "mask", "unk")}
    assert ids == {"pad": 0, "bos": 1, "eos": 2, "mask": 3, "unk": 4}
    words = source.sample(3, 30, np.random.default_rng(1))
    for row in words:
        text = " ".join(source.words[i] for i in row)
        encoded = tokenizer.encode(text)
        assert encoded == (row + WORD_OFFSET).tolist()  # token id = word id + 5, no specials added
        assert tokenizer.decode(encoded) == text
        assert tokenizer.decode([1, *encoded, 2, 0], skip_special_tokens=True) == text
    the, end = WORD_OFFSET + source.words.index("the"), WORD_OFFSET + source.words.index(END)
    assert tokenizer.encode("the zebra .") == [the, tokenizer.unk_token_id, end]
