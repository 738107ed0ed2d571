import math

import numpy as np
import torch

from metrics import NLLMetric


def test_token_weighted_nll_bpd_ppl() -> None:
    metric = NLLMetric()
    metric.update(torch.tensor([10.0, 4.0]), torch.tensor([5, 2]))
    metric.update(torch.tensor([3.0]), torch.tensor([3]))
    out = metric.compute()
    nll = 17.0 / 10.0
    assert out["nll"].dtype == torch.float64
    assert math.isclose(float(out["nll"]), nll)
    assert math.isclose(float(out["bpd"]), nll / math.log(2))
    assert math.isclose(float(out["ppl"]), math.exp(nll))
    assert float(out["num_tokens"]) == 10
    assert "true_nll" not in out


def test_stderr_and_reference_gap() -> None:
    torch.manual_seed(0)
    per_seq = torch.randn(1000, dtype=torch.float64) + 3.0
    ref = per_seq - 0.5 + 0.1 * torch.randn(1000, dtype=torch.float64)
    metric = NLLMetric()
    metric.update(per_seq * 8, torch.full((1000,), 8), ref * 8)
    out = metric.compute()
    torch.testing.assert_close(out["nll_stderr"], per_seq.std() / math.sqrt(1000))
    torch.testing.assert_close(out["true_nll"], ref.mean())
    torch.testing.assert_close(out["gap"], (per_seq - ref).mean())
    torch.testing.assert_close(out["gap_stderr"], (per_seq - ref).std() / math.sqrt(1000))


def test_float64_accumulation_survives_large_sums() -> None:
    metric = NLLMetric()
    for _ in range(100):
        metric.update(torch.full((4,), 1e8 + 0.25, dtype=torch.float64), torch.ones(4))
    assert float(metric.compute()["nll"]) == 1e8 + 0.25


def test_sequences_without_tokens_are_ignored() -> None:
    metric = NLLMetric()
    metric.update(torch.tensor([2.0, 0.0]), torch.tensor([1, 0]))
    assert float(metric.compute()["nll"]) == 2.0


def unequal_sequences(num: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sequence (nll_sum, num_tokens, reference_nll_sum) of ``num`` sequences of very unequal
    lengths whose per-token NLL and gap depend on the length, so per-sequence means and
    token-weighted ratios differ (and so do their standard errors)."""
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 200, size=num).astype(np.float64)
    per_token_ref = 2.0 + 0.1 * rng.standard_normal(num)
    per_token_gap = 0.2 + 2.0 / np.sqrt(n) + 0.1 * rng.standard_normal(num)
    r = per_token_ref * n + np.sqrt(n) * rng.standard_normal(num)
    a = r + per_token_gap * n + 2.0 * np.sqrt(n) * rng.standard_normal(num)
    return a, n, r


def delta_stderr(x: np.ndarray, n: np.ndarray) -> float:
    """Delta-method standard error of sum x / sum n, written directly over the sequences."""
    s = len(x)
    ratio = x.sum() / n.sum()
    return math.sqrt(((x - ratio * n) ** 2).sum() / (s * (s - 1) * n.mean() ** 2))


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x)


def test_gap_is_token_weighted_on_unequal_lengths() -> None:
    a, n, r = unequal_sequences(50, seed=1)
    metric = NLLMetric()
    metric.update(t(a), t(n), t(r))
    out = metric.compute()
    assert math.isclose(float(out["nll"]), a.sum() / n.sum(), rel_tol=1e-12)
    assert math.isclose(float(out["true_nll"]), r.sum() / n.sum(), rel_tol=1e-12)
    assert abs(float(out["gap"]) - float(out["nll"] - out["true_nll"])) < 1e-12
    assert abs(float(out["gap"]) - (a - r).sum() / n.sum()) < 1e-12
    per_sequence_mean_gap = ((a - r) / n).mean()
    assert abs(per_sequence_mean_gap - float(out["gap"])) > 0.05  # the data tells the two apart


def test_tiny_unequal_example_by_hand() -> None:
    # a 1-token sequence with gap 1 nat and a 9-token one with gap 0: 1 nat over 10 tokens.
    metric = NLLMetric()
    metric.update(torch.tensor([3.0, 18.0]), torch.tensor([1, 9]), torch.tensor([2.0, 18.0]))
    out = metric.compute()
    assert math.isclose(float(out["nll"]), 2.1)
    assert math.isclose(float(out["true_nll"]), 2.0)
    assert math.isclose(float(out["gap"]), 0.1)  # the per-sequence mean gap would be 0.5


def test_stderr_matches_delta_method_formula() -> None:
    a, n, r = unequal_sequences(200, seed=2)
    metric = NLLMetric()
    metric.update(t(a), t(n), t(r))
    out = metric.compute()
    assert math.isclose(float(out["nll_stderr"]), delta_stderr(a, n), rel_tol=1e-9)
    assert math.isclose(float(out["gap_stderr"]), delta_stderr(a - r, n), rel_tol=1e-9)
    # ... which is not the standard error of the per-sequence means on these lengths
    assert float(out["nll_stderr"]) < 0.8 * (a / n).std(ddof=1) / math.sqrt(200)
    assert float(out["gap_stderr"]) < 0.8 * ((a - r) / n).std(ddof=1) / math.sqrt(200)


def test_stderr_agrees_with_sequence_bootstrap() -> None:
    a, n, r = unequal_sequences(400, seed=3)
    metric = NLLMetric()
    metric.update(t(a), t(n), t(r))
    out = metric.compute()
    idx = np.random.default_rng(4).integers(0, len(a), size=(4000, len(a)))
    n_boot = n[idx].sum(1)
    boot_nll = (a[idx].sum(1) / n_boot).std(ddof=1)
    boot_gap = ((a - r)[idx].sum(1) / n_boot).std(ddof=1)
    assert math.isclose(float(out["nll_stderr"]), boot_nll, rel_tol=0.1)
    assert math.isclose(float(out["gap_stderr"]), boot_gap, rel_tol=0.1)


def test_split_updates_and_summed_process_states_agree() -> None:
    a, n, r = unequal_sequences(60, seed=5)
    n[[3, 40]] = 0  # sequences without tokens are ignored wherever they fall
    whole = NLLMetric()
    whole.update(t(a), t(n), t(r))
    expected = whole.compute()

    split = NLLMetric()
    for chunk in np.array_split(np.arange(60), [7, 8, 31, 50]):
        split.update(t(a[chunk]), t(n[chunk]), t(r[chunk]))

    processes = [NLLMetric(), NLLMetric()]
    for rank, metric in enumerate(processes):  # rank k gets every other sequence, as a sampler would
        metric.update(t(a[rank::2]), t(n[rank::2]), t(r[rank::2]))
    merged = NLLMetric()  # a third process that got no sequences
    empty = torch.zeros(0, dtype=torch.float64)
    merged.update(empty, empty, empty)
    for name in merged._defaults:  # what dist_reduce_fx="sum" does across processes
        setattr(merged, name, getattr(merged, name) + sum(getattr(m, name) for m in processes))

    for other in (split.compute(), merged.compute()):
        assert other.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(other[key], value, rtol=1e-12, atol=1e-12)


def test_equal_lengths_match_per_sequence_means() -> None:
    # With equal lengths the token-weighted ratio is the mean of the per-sequence means and
    # its delta-method standard error is exactly the standard error of those means.
    rng = np.random.default_rng(6)
    num, length = 300, 64
    n = np.full(num, float(length))
    r = (2.0 + 0.3 * rng.standard_normal(num)) * length
    a = r + (0.4 + 0.2 * rng.standard_normal(num)) * length
    metric = NLLMetric()
    metric.update(t(a), t(n), t(r))
    out = metric.compute()
    seq_mean, seq_gap = a / n, (a - r) / n
    assert math.isclose(float(out["nll"]), seq_mean.mean(), rel_tol=1e-12)
    assert math.isclose(float(out["gap"]), seq_gap.mean(), rel_tol=1e-12)
    assert math.isclose(float(out["nll_stderr"]), seq_mean.std(ddof=1) / math.sqrt(num), rel_tol=1e-9)
    assert math.isclose(float(out["gap_stderr"]), seq_gap.std(ddof=1) / math.sqrt(num), rel_tol=1e-9)


def test_single_sequence_has_zero_stderr() -> None:
    metric = NLLMetric()
    metric.update(torch.tensor([7.0]), torch.tensor([3]), torch.tensor([5.0]))
    out = metric.compute()
    assert float(out["nll_stderr"]) == 0.0 and float(out["gap_stderr"]) == 0.0
    assert math.isclose(float(out["gap"]), 2.0 / 3.0)
