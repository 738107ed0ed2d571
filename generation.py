"""sample_eval's pipeline: templates (unconditional, prefix, infill), sampling, scoring.

Used by ``main.py`` (``mode=sample_eval``, and a few samples after training) and by the
training-time generative perplexity (:class:`callbacks.GenerativePerplexityCallback`). Per sample it records the
text, the sampler settings, NFE, seconds, the seed, the unigram entropy of its tokens and,
when an eval LM is given, its generative perplexity (:class:`metrics.GenerativePerplexity`:
loaded once, text after the first EOS left out unless ``eval.gen_ppl_truncate_at_eos=false``).
With held-out texts (:func:`reference_texts`) the summary adds MAUVE of the samples against them.
With ``trace`` each record also says at which network call each position was unmasked
(:mod:`denoising_trace`; replay it with ``scripts/replay.py``).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor
from tqdm import tqdm

import registry
from algorithms import Algorithm
from conditioning import infill_template, prefix_template
from dataloader import block_special_ids, decode
from denoising_trace import TraceRecorder, check_traceable, traced_fields
from diffusion import Diffusion
from metrics import GenerativePerplexity, mauve_score, truncate_at_eos, unigram_entropy
from samplers import Sampler, check_fits


def make_sampler(sampler_config: DictConfig, algorithm: Algorithm, float64: bool = True) -> Sampler:
    """The sampler of ``configs/sampler/*.yaml`` for ``algorithm``, with its run-time inputs.

    The config is a ``_partial_`` class; the algorithm supplies the noise schedule and mask index
    (:meth:`algorithms.Algorithm.sampler_inputs`), ``float64`` the precision of the draws. A
    sampler that does not accept the algorithm's denoiser is an error naming those that do.
    """
    dtype = "float64" if float64 else "float32"  # names samplers.check_sampling_dtype accepts
    sampler = instantiate(sampler_config)(**algorithm.sampler_inputs(), dtype=dtype)
    check_fits(sampler, algorithm, lambda: registry.samplers_accepting(algorithm.denoiser_kind))
    return sampler


def sample_template(
    tokenizer: Any, length: int, mask_index: int, sampler: Sampler, prefix: str | None = None,
    infill: str | None = None,
) -> Tensor:
    """(1, L): all masks (BOS first for a left-to-right sampler), ``[BOS] prefix`` then masks, or an infill template."""
    bos, eos = block_special_ids(tokenizer)
    if prefix is not None and infill is not None:
        raise ValueError("set sampling.prefix or sampling.infill, not both")
    if prefix is not None:
        return prefix_template(tokenizer, str(prefix), length, mask_index, bos)
    if infill is not None:
        if sampler.left_to_right:
            raise ValueError(f"sampling.infill needs a diffusion sampler: sampler={sampler.name} only continues a "
                             "prefix (use sampling.prefix)")
        return infill_template(tokenizer, str(infill), length, mask_index, bos, eos)
    template = torch.full((1, length), mask_index, dtype=torch.long)
    if sampler.left_to_right:
        template[:, 0] = bos  # the given first token of a left-to-right sampler
    return template


@dataclass(frozen=True)
class EntropyRejection:
    """BD3-LM's low-entropy rejection: a sample whose last ``window`` tokens have unigram entropy
    below ``min_entropy`` nats (:func:`metrics.unigram_entropy`; the paper: 4 nats over 256 tokens)
    is degenerate (a loop of a few tokens) and is drawn again, at most ``max_retries`` times; one
    still below after that is kept and flagged (``low_entropy`` in its record)."""

    min_entropy: float
    window: int = 256
    max_retries: int = 10

    def __post_init__(self) -> None:
        if self.window < 1 or self.max_retries < 0:
            raise ValueError(f"sampling.entropy_window must be >= 1 and sampling.max_retries >= 0, got "
                             f"{self.window} and {self.max_retries}")

    def rejects(self, tokens: Tensor) -> bool:
        """Whether ``tokens`` (L,) end in a low-entropy stretch."""
        return unigram_entropy(tokens[-self.window:]) < self.min_entropy

    @staticmethod
    def seed(batch_seed: int, attempt: int) -> int:
        """The seed of the ``attempt``-th redraw of a batch (never another batch's first seed)."""
        return (batch_seed + 1) * 1_000_033 + attempt


def generate_samples(
    module: Diffusion,
    sampler: Sampler,
    template: Tensor,
    tokenizer: Any,
    num_batches: int,
    batch_size: int,
    seed: int,
    semi_ar: tuple[int, int] | None = None,
    source: Any = None,
    stop_token: int | None = None,
    rejection: EntropyRejection | None = None,
    trace: bool = False,
) -> list[dict[str, Any]]:
    """Sample ``num_batches`` batches of ``template`` (1, L) on the module's device.

    One record per sample: text, tokens, sampler, steps, NFE, seconds, seed, index in batch,
    length, and with a ``source`` of known law (``source.has_true_nll``) the sample's exact
    NLL per token under it. ``semi_ar = (stride_length, num_strides)``. ``stop_token``:
    variable length (block diffusion): each sample ends at its first ``stop_token`` after
    position 0. ``rejection``: samples whose tail has too little entropy are drawn again
    (``retries`` and ``low_entropy`` in the record). ``trace``: the record also holds ``trace``,
    ``trace_remasks`` and ``trace_pieces`` (:func:`denoising_trace.traced_fields`); the samples
    are the same as without it.
    """
    if semi_ar and sampler.left_to_right:
        raise ValueError(f"sampling.semi_ar applies to diffusion samplers; sampler={sampler.name} generates "
                         "token by token")
    device = next(module.parameters()).device
    template = template.to(device)
    mask_index = module.algorithm.mask_index

    if trace:
        check_traceable(sampler)  # before any work

    def draw(draw_seed: int, n: int) -> tuple[list[Tensor], int, list[tuple[Tensor, Tensor] | None]]:
        generator = torch.Generator(device).manual_seed(draw_seed)
        x = template.expand(n, -1)
        with TraceRecorder(sampler, mask_index) if trace else contextlib.nullcontext() as recorder:
            out = module.generate(sampler, x.clone(), generator=generator, progress=True, semi_ar=semi_ar,
                                  stop_token=stop_token)
        tokens = out.tokens.cpu()
        lengths = [tokens.shape[1]] * n if out.lengths is None else out.lengths.tolist()
        rows = [tokens[i, :length] for i, length in enumerate(lengths)]
        if recorder is None:
            return rows, out.nfe, [None] * n
        steps, remasks = (t.cpu() for t in recorder.result(out.tokens, x, semi_ar[0] if semi_ar else None))
        return rows, out.nfe, list(zip(steps, remasks, strict=True))  # (N,) steps and remasks per row

    records = []
    for batch_index in tqdm(range(num_batches), desc="sample batches", unit="batch", disable=num_batches < 2):
        batch_seed = seed * 1_000_003 + batch_index
        start = time.perf_counter()
        samples, nfe, traces = draw(batch_seed, batch_size)
        seeds, nfes, retries = [batch_seed] * batch_size, [nfe] * batch_size, [0] * batch_size
        if rejection is not None:
            for attempt in range(1, rejection.max_retries + 1):
                rejected = [i for i, tokens in enumerate(samples) if rejection.rejects(tokens)]
                if not rejected:
                    break
                retry_seed = rejection.seed(batch_seed, attempt)
                redrawn, nfe, retraced = draw(retry_seed, len(rejected))
                for i, tokens, traced in zip(rejected, redrawn, retraced, strict=True):
                    samples[i], seeds[i], nfes[i], retries[i], traces[i] = tokens, retry_seed, nfe, attempt, traced
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        same_length = len({len(t) for t in samples}) == 1 and len(samples[0]) == template.shape[1]
        scorable = getattr(source, "has_true_nll", False) and not semi_ar and same_length
        true_nll = source.true_nll_of(torch.stack(samples)) if scorable else None
        for i, tokens in enumerate(samples):
            record = {"text": decode(tokenizer, tokens[None], mask_index)[0], "tokens": tokens.tolist(),
                      "sampler": sampler.name, "steps": getattr(sampler, "steps", None), "nfe": nfes[i],
                      "seconds": seconds / batch_size, "seed": seeds[i], "index_in_batch": i, "length": len(tokens),
                      "float64": sampler.dtype == torch.float64}
            if semi_ar:
                record.update(stride_length=semi_ar[0], num_strides=semi_ar[1])
            if rejection is not None:
                record.update(retries=retries[i], low_entropy=rejection.rejects(tokens))
            if true_nll is not None:
                record["true_nll_per_token"] = float(true_nll[i]) / len(tokens)
            if traces[i] is not None:  # after the timing: decoding the pieces is not sampling
                record.update(traced_fields(*traces[i], tokens.tolist(), tokenizer, mask_index))
            records.append(record)
    return records


def reference_texts(data: Any, num_texts: int, truncate: bool) -> list[str]:
    """``num_texts`` held-out texts of the data set, the reference MAUVE compares samples with.

    Evenly spaced blocks of ``data.evaluation_dataset()`` (the validation split; text the model
    did not train on), each decoded as a sample is for scoring (:func:`scored_text`), so both
    sides have the same length and the same treatment of BOS / EOS.
    """
    dataset = data.evaluation_dataset()
    if len(dataset) < num_texts:
        raise ValueError(f"MAUVE compares {num_texts} samples with as many held-out texts, but the evaluation split "
                         f"has {len(dataset)} blocks: sample fewer (sampling.num_sample_batches)")
    indices = np.linspace(0, len(dataset) - 1, num_texts).round().astype(int).tolist()
    return [scored_text(dataset[i]["input_ids"].tolist(), data.tokenizer, truncate) for i in indices]


def scored_ids(token_ids: list[int], tokenizer: Any, truncate: bool) -> list[int]:
    """The part of a sample that is scored: up to its first EOS after position 0 (with ``truncate``)."""
    return truncate_at_eos(token_ids, block_special_ids(tokenizer)[1]) if truncate else list(token_ids)


def scored_text(token_ids: list[int], tokenizer: Any, truncate: bool) -> str:
    """:func:`scored_ids` decoded without special tokens: the text an eval LM reads."""
    return tokenizer.decode(scored_ids(token_ids, tokenizer, truncate), skip_special_tokens=True)


def score_samples(
    records: list[dict[str, Any]], tokenizer: Any, scorer: GenerativePerplexity | None, truncate: bool,
    reference: list[str] | None = None, seed: int = 25,
) -> dict[str, float]:
    """Add ``entropy`` (and with a scorer ``gen_ppl``, ``gen_nll_sum``, ``gen_num_tokens``) to each record.

    The scored part of a sample is :func:`scored_ids` (cut at the first EOS after position 0
    when ``truncate``), decoded without special tokens. Returns the summary: token-weighted
    ``gen_ppl``, ``mean_entropy``, seconds per sample, and with ``reference`` texts (which
    need the scorer's LM) ``mauve`` of the samples against them (:func:`metrics.mauve_score`).
    """
    ids_list = [scored_ids(r["tokens"], tokenizer, truncate) for r in records]
    for record, ids in zip(records, ids_list, strict=True):
        record["entropy"] = unigram_entropy(ids)
        record["scored_tokens"] = len(ids)
    entropies = [r["entropy"] for r in records if math.isfinite(r["entropy"])]
    summary: dict[str, float] = {
        "num_samples": len(records),
        "mean_entropy": sum(entropies) / max(len(entropies), 1),
        "seconds_per_sample": sum(r["seconds"] for r in records) / max(len(records), 1),
    }
    if scorer is None:
        if reference is not None:
            raise ValueError("MAUVE needs the eval LM's features: pass a scorer with the reference texts")
        return summary
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in ids_list]
    results = scorer.score(texts)
    for record, result in zip(records, results, strict=True):
        record.update(gen_ppl=result["ppl"], gen_nll_sum=result["nll_sum"], gen_num_tokens=result["num_tokens"])
    summary.update(GenerativePerplexity.summary(results))
    if reference is not None:
        summary["mauve"] = mauve_score(scorer.features(texts), scorer.features(reference), seed=seed)
        summary["mauve_num_reference"] = len(reference)
    return summary


def print_samples(records: list[dict[str, Any]], limit: int) -> None:
    for r in records[:limit]:
        where = f"seed {r['seed']}, #{r['index_in_batch']}"
        scores = f", gen. PPL {r['gen_ppl']:.2f}" if "gen_ppl" in r else ""
        entropy = f", entropy {r['entropy']:.2f}" if "entropy" in r else ""
        steps = f", {r['steps']} steps" if r.get("steps") is not None else ""
        print(f"--- sample ({where}, {r['sampler']}{steps}, NFE {r['nfe']}{scores}{entropy})")
        print(r["text"])
    if records:
        seconds = sum(r["seconds"] for r in records) / len(records)
        lengths = sorted({r["length"] for r in records})
        length = f"{lengths[0]}" if len(lengths) == 1 else f"{lengths[0]}-{lengths[-1]}"
        nfes = sorted({r["nfe"] for r in records})
        nfe = f"{nfes[0]}" if len(nfes) == 1 else f"{nfes[0]}-{nfes[-1]}"
        print(f"--- {len(records)} samples of {length} tokens, {seconds:.3f} s/sample, NFE {nfe}")
        if "trace" in records[0]:
            print("--- each record's trace: the network call that unmasked each position; replay, heat map and order "
                  "with python scripts/replay.py RUN_DIR/samples.jsonl [--png out.png] [--summary]")
        if "retries" in records[0]:
            redrawn = sum(r["retries"] > 0 for r in records)
            flagged = sum(r["low_entropy"] for r in records)
            print(f"--- low-entropy rejection: {redrawn} samples redrawn, {flagged} still below after the retries")
        scored = [r["true_nll_per_token"] for r in records if "true_nll_per_token" in r]
        possible = [v for v in scored if math.isfinite(v)]
        if scored:
            mean = f"{sum(possible) / len(possible):.4f} nats/token" if possible else "n/a"
            print(
                f"--- {len(possible)}/{len(scored)} samples are possible under the source (the rest contain a word "
                f"pair or a BOS/EOS placement it never produces); their true NLL: {mean}"
            )
