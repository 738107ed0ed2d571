"""Likelihood metrics: NLL (nats/token), BPD and perplexity, in float64, synced across processes.

All states are float64 sums reduced with ``sum`` over processes, so a metric computed on
N processes equals the one computed on a single process over the same sequences.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

LN2 = math.log(2.0)


class NLLMetric(Metric):
    """Token-averaged negative log-likelihood (or its bound), with optional reference.

    ``update`` takes per-sequence totals: ``nll_sum`` (B,) nats and ``num_tokens`` (B,),
    and optionally ``reference_nll_sum`` (B,), e.g. the exact NLL of the data source on the
    same tokens. ``compute`` returns

    - ``nll`` = sum nll / sum tokens, ``bpd`` = nll / ln 2, ``ppl`` = exp(nll);
    - ``nll_stderr``: standard error of the per-sequence mean NLL over sequences (the
      Monte-Carlo plus data sampling error of ``nll``);
    - with a reference: ``true_nll`` likewise, and ``gap`` = nll - true_nll with its paired
      standard error ``gap_stderr`` (both computed on the same sequences).
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("nll", "tokens", "seqs", "seq_mean", "seq_mean_sq", "ref", "ref_seqs", "gap", "gap_sq"):
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.set_dtype(torch.float64)

    def update(self, nll_sum: Tensor, num_tokens: Tensor, reference_nll_sum: Tensor | None = None) -> None:
        nll_sum, num_tokens = nll_sum.double(), num_tokens.double()
        keep = num_tokens > 0
        nll_sum, num_tokens = nll_sum[keep], num_tokens[keep]
        seq_mean = nll_sum / num_tokens
        self.nll += nll_sum.sum()
        self.tokens += num_tokens.sum()
        self.seqs += keep.sum()
        self.seq_mean += seq_mean.sum()
        self.seq_mean_sq += seq_mean.square().sum()
        if reference_nll_sum is not None:
            ref = reference_nll_sum.double()[keep]
            gap = seq_mean - ref / num_tokens
            self.ref += ref.sum()
            self.ref_seqs += keep.sum()
            self.gap += gap.sum()
            self.gap_sq += gap.square().sum()

    @staticmethod
    def _stderr(total: Tensor, total_sq: Tensor, n: Tensor) -> Tensor:
        mean = total / n
        var = (total_sq / n - mean.square()).clamp_min(0) * n / (n - 1).clamp_min(1)
        return (var / n).sqrt()

    def compute(self) -> dict[str, Tensor]:
        nll = self.nll / self.tokens
        out = {
            "nll": nll,
            "bpd": nll / LN2,
            "ppl": nll.exp(),
            "nll_stderr": self._stderr(self.seq_mean, self.seq_mean_sq, self.seqs),
            "num_tokens": self.tokens,
        }
        if self.ref_seqs > 0:
            out["true_nll"] = self.ref / self.tokens
            out["gap"] = self.gap / self.ref_seqs
            out["gap_stderr"] = self._stderr(self.gap, self.gap_sq, self.ref_seqs)
        return out
