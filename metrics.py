"""Likelihood metrics: NLL (nats/token), BPD and perplexity, in float64, synced across processes;
generative perplexity of samples under an eval language model.

All :class:`NLLMetric` states are float64 sums reduced with ``sum`` over processes, so a metric
computed on N processes equals the one computed on a single process over the same sequences.

:class:`GenerativePerplexity` loads its eval model once and scores decoded samples: each is
retokenized for the eval model, long ones are scored in context-size chunks, and (with
:func:`truncate_at_eos` applied first) nothing after a sample's end of sequence is scored.
:func:`unigram_entropy` goes with it: a low generative perplexity with a low entropy means
repetitive text, not good text.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import Metric
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

import hub

LN2 = math.log(2.0)


class NLLMetric(Metric):
    """Token-averaged negative log-likelihood (or its bound), with optional reference.

    ``update`` takes per-sequence totals: ``nll_sum`` (B,) nats and ``num_tokens`` (B,),
    and optionally ``reference_nll_sum`` (B,), e.g. the exact NLL of the data source on the
    same tokens. Sequences with no tokens are ignored. With, for sequence ``i`` of the ``S``
    kept ones, ``a_i`` = nll_sum, ``n_i`` = num_tokens, ``r_i`` = reference and
    ``d_i = a_i - r_i``, ``compute`` returns

    - ``nll`` = R = sum a / sum n, ``bpd`` = nll / ln 2, ``ppl`` = exp(nll);
    - ``nll_stderr``: the delta-method (ratio-estimator) standard error of R over sequences,
      ``Var(R) ~ sum_i (a_i - R n_i)^2 / (S (S - 1) nbar^2)`` with ``nbar = sum n / S``
      (0 for a single sequence), evaluated from sums as
      ``sum a^2 - 2 R sum a n + R^2 sum n^2`` (clamped at 0 against rounding). It is the
      Monte-Carlo plus data sampling error of ``nll``; with equal ``n_i`` it equals the
      standard error of the per-sequence means ``a_i / n_i`` exactly;
    - with a reference: ``true_nll`` = sum r / sum n and ``gap`` = sum d / sum n, i.e.
      ``nll - true_nll`` of the same token-weighted sums (not a mean of per-sequence gaps),
      with its paired standard error ``gap_stderr`` (the formula above with ``d_i`` for
      ``a_i``). The sums behind these three run over the sequences updated with a
      reference; when every update has one they are the sequences behind ``nll``.

    The states are float64 sums of ``a, n, a^2, n^2, a n`` (and of ``r, d, d^2, d n, n, n^2``
    over the sequences with a reference), so summing them over processes is exact.
    """

    full_state_update = False
    _STATES = (
        "nll", "tokens", "seqs", "nll_sq", "tokens_sq", "nll_tokens",
        "ref", "ref_tokens", "ref_tokens_sq", "ref_seqs", "gap", "gap_sq", "gap_tokens",
    )

    def __init__(self) -> None:
        super().__init__()
        for name in self._STATES:
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.set_dtype(torch.float64)

    def update(self, nll_sum: Tensor, num_tokens: Tensor, reference_nll_sum: Tensor | None = None) -> None:
        nll_sum, num_tokens = nll_sum.double(), num_tokens.double()
        keep = num_tokens > 0
        a, n = nll_sum[keep], num_tokens[keep]
        self.nll += a.sum()
        self.tokens += n.sum()
        self.seqs += keep.sum()
        self.nll_sq += a.square().sum()
        self.tokens_sq += n.square().sum()
        self.nll_tokens += (a * n).sum()
        if reference_nll_sum is not None:
            r = reference_nll_sum.double()[keep]
            d = a - r
            self.ref += r.sum()
            self.ref_tokens += n.sum()
            self.ref_tokens_sq += n.square().sum()
            self.ref_seqs += keep.sum()
            self.gap += d.sum()
            self.gap_sq += d.square().sum()
            self.gap_tokens += (d * n).sum()

    @staticmethod
    def _ratio_stderr(x: Tensor, x_sq: Tensor, x_n: Tensor, n: Tensor, n_sq: Tensor, seqs: Tensor) -> Tensor:
        """Delta-method standard error of ``sum x / sum n`` from the sums over ``seqs`` sequences."""
        ratio = x / n
        resid = (x_sq - 2 * ratio * x_n + ratio.square() * n_sq).clamp_min(0)  # sum (x_i - R n_i)^2
        var = resid * seqs / ((seqs - 1).clamp_min(1) * n.square())  # = resid / (S (S-1) nbar^2)
        return torch.where(seqs == 1, torch.zeros_like(var), var).sqrt()  # resid is 0 up to rounding

    def compute(self) -> dict[str, Tensor]:
        nll = self.nll / self.tokens
        out = {
            "nll": nll,
            "bpd": nll / LN2,
            "ppl": nll.exp(),
            "nll_stderr": self._ratio_stderr(
                self.nll, self.nll_sq, self.nll_tokens, self.tokens, self.tokens_sq, self.seqs
            ),
            "num_tokens": self.tokens,
        }
        if self.ref_seqs > 0:
            out["true_nll"] = self.ref / self.ref_tokens
            out["gap"] = self.gap / self.ref_tokens
            out["gap_stderr"] = self._ratio_stderr(
                self.gap, self.gap_sq, self.gap_tokens, self.ref_tokens, self.ref_tokens_sq, self.ref_seqs
            )
        return out


def unigram_entropy(token_ids: Sequence[int] | Tensor) -> float:
    """Entropy in nats of the empirical token distribution of one sample.

    With ``c_v`` the count of token ``v`` among the ``n`` ids,
    ``H = -sum_v (c_v / n) log(c_v / n)``: 0 for one repeated token, ``log n`` for ``n``
    distinct tokens. ``nan`` for an empty sample. ``token_ids``: (L,) ids of one sample.
    """
    ids = token_ids.tolist() if isinstance(token_ids, Tensor) else list(token_ids)
    n = len(ids)
    if n == 0:
        return math.nan
    return -math.fsum(c / n * math.log(c / n) for c in Counter(ids).values())


def truncate_at_eos(token_ids: Sequence[int] | Tensor, eos_id: int, skip_first: bool = True) -> list[int]:
    """The ids of a generated sample before its first EOS.

    With ``skip_first``, an EOS at position 0 is the sample's leading BOS (GPT-2 uses one id,
    50256, for both): it is dropped and the search starts at position 1. The EOS itself and
    everything after it are removed. ``token_ids``: (L,) generator-tokenizer ids.
    """
    ids = token_ids.tolist() if isinstance(token_ids, Tensor) else list(token_ids)
    if skip_first and ids and ids[0] == eos_id:
        ids = ids[1:]
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


class GenerativePerplexity:
    """Perplexity of text samples under an eval causal LM, loaded once (default ``gpt2-large``).

    A text's ``T`` eval-tokenizer tokens are split into chunks of at most ``C - 1`` tokens
    (``C``: the context size); each chunk is scored as ``[BOS] + chunk``, so every token is
    scored exactly once and the BOS is only context:
    ``nll_sum = -sum_t log p(x_t | BOS, chunk tokens before x_t)`` (nats) and
    ``ppl = exp(nll_sum / T)``. Chunks are batched (``batch_size`` at a time) with right
    padding that is masked out of attention and of the sum. Log-probabilities are computed
    in at least float32 and summed in float64.

    ``model_name_or_path``: a local directory (``save_pretrained`` output holding both model
    and tokenizer) or a hub name, loaded like :func:`dataloader.load_tokenizer` does (cache
    only when offline). ``max_length`` caps the context size (default: the model's).
    """

    def __init__(
        self,
        model_name_or_path: str = "gpt2-large",
        device: str | torch.device = "cpu",
        batch_size: int = 8,
        dtype: torch.dtype = torch.float32,
        max_length: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer, model = self._load(model_name_or_path)
        # Cast after loading: ``from_pretrained``'s dtype argument is named differently across versions.
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.context_size = self._context_size(self.model.config, max_length)
        self.bos_id = self.tokenizer.bos_token_id
        if self.bos_id is None:
            self.bos_id = self.tokenizer.eos_token_id
        if self.bos_id is None:
            raise ValueError(f"eval tokenizer of {model_name_or_path!r} has neither a BOS nor an EOS token")

    @staticmethod
    def _load(name_or_path: str) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
        """Tokenizer and model from a local directory, else from the hub or its local cache."""
        path = Path(name_or_path).expanduser()
        advice = (
            "Pass a local directory holding the model and its tokenizer (written by save_pretrained), "
            "e.g. eval.gen_ppl_eval_model=/path/to/gpt2-large, or set HF_HUB_OFFLINE=1 with a warm "
            "Hugging Face cache."
        )
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path)), AutoModelForCausalLM.from_pretrained(str(path))
        if path.is_absolute() or name_or_path.startswith((".", "~")):
            raise FileNotFoundError(f"eval model directory {name_or_path!r} does not exist. {advice}")
        local_only = hub.hub_local_only()
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_only)
            return tokenizer, AutoModelForCausalLM.from_pretrained(name_or_path, local_files_only=local_only)
        except (OSError, ValueError) as error:
            reason = hub.hub_failure_reason(local_only, "the Hugging Face hub could not provide it")
            raise OSError(
                f"could not load eval model {name_or_path!r}: there is no local directory of that name, "
                f"{reason}, and it is not in the local cache (or the name is wrong). {advice}"
            ) from error

    @staticmethod
    def _context_size(config: PretrainedConfig, max_length: int | None) -> int:
        """``max_length`` if given (at most the model's), else ``n_positions`` / ``max_position_embeddings``."""
        model_max = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if max_length is not None and model_max is not None and max_length > model_max:
            raise ValueError(f"max_length={max_length} exceeds the eval model's context size {model_max}")
        context_size = max_length or model_max
        if context_size is None or context_size < 2:
            raise ValueError(f"need a context size >= 2 (BOS + one token), got {context_size}; pass max_length")
        return context_size

    def score(self, texts: list[str]) -> list[dict]:
        """Per text ``{"nll_sum": nats, "num_tokens": T, "ppl": exp(nll_sum / T)}`` (``ppl`` nan if T = 0)."""
        if not texts:
            return []
        token_lists = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        step = self.context_size - 1  # chunk tokens per window; the BOS takes the remaining slot
        chunks = [(i, ids[s : s + step]) for i, ids in enumerate(token_lists) for s in range(0, len(ids), step)]
        chunks.sort(key=lambda chunk: len(chunk[1]))  # similar lengths share a batch: less padding
        nll_sums = [0.0] * len(texts)
        for start in range(0, len(chunks), self.batch_size):
            owners, batch = zip(*chunks[start : start + self.batch_size], strict=True)
            for owner, nll in zip(owners, self._score_chunks(list(batch)).tolist(), strict=True):
                nll_sums[owner] += nll
        return [
            {"nll_sum": nll, "num_tokens": len(ids), "ppl": math.exp(nll / len(ids)) if ids else math.nan}
            for nll, ids in zip(nll_sums, token_lists, strict=True)
        ]

    @torch.inference_mode()
    def _score_chunks(self, chunks: list[list[int]]) -> Tensor:
        """Summed NLL (B,) float64 of each chunk given the BOS before it; chunks are non-empty."""
        width = 1 + max(len(ids) for ids in chunks)
        input_ids = torch.full((len(chunks), width), self.bos_id, dtype=torch.long)  # (B, W); pad value unused
        attention_mask = torch.zeros((len(chunks), width), dtype=torch.long)  # (B, W); 1 = real token
        for row, ids in enumerate(chunks):
            input_ids[row, 1 : 1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : 1 + len(ids)] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, W-1, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> float32
        targets = input_ids[:, 1:]  # (B, W-1): token t+1 is predicted at position t
        target_logits = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, W-1)
        token_nll = logits.logsumexp(-1) - target_logits  # (B, W-1) = -log softmax(logits)[target]
        return (token_nll.double() * attention_mask[:, 1:]).sum(-1).cpu()  # (B,)

    @staticmethod
    def summary(results: list[dict]) -> dict[str, float | int]:
        """Aggregates over non-empty samples.

        ``gen_ppl = exp(sum nll_sum / sum num_tokens)`` (token-weighted, the corpus number);
        ``mean_sample_ppl`` = the plain mean of per-sample ``ppl``; ``num_samples``,
        ``num_tokens``; ``num_empty``: samples with no tokens, left out of the rest.
        """
        scored = [r for r in results if r["num_tokens"] > 0]
        num_tokens = sum(r["num_tokens"] for r in scored)
        nll = math.fsum(r["nll_sum"] for r in scored)
        return {
            "gen_ppl": math.exp(nll / num_tokens) if num_tokens else math.nan,
            "mean_sample_ppl": math.fsum(r["ppl"] for r in scored) / len(scored) if scored else math.nan,
            "num_samples": len(scored),
            "num_tokens": num_tokens,
            "num_empty": len(results) - len(scored),
        }
