import math

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
