"""sample_eval's pipeline: templates (unconditional, prefix, infill), sampling, scoring.

Used by ``main.py`` (``mode=sample_eval``, and a few samples after training) and by the
training-time generative perplexity (:func:`sample_evaluator`). Per sample it records the
text, the sampler settings, NFE, seconds, the seed, the unigram entropy of its tokens and,
when an eval LM is given, its generative perplexity (:class:`metrics.GenerativePerplexity`:
loaded once, text after the first EOS left out unless ``eval.gen_ppl_truncate_at_eos=false``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

import utils
from conditioning import infill_template, prefix_template
from dataloader import block_special_ids, decode
from diffusion import Diffusion
from metrics import GenerativePerplexity, truncate_at_eos, unigram_entropy
from samplers import ARSampler, Sampler, build_sampler


def make_sampler(cfg: DictConfig, noise: Any, mask_index: int) -> Sampler | ARSampler:
    """The sampler for this parameterization: ``sampling.predictor``, or the AR sampler for ``ar``."""
    s = cfg.sampling
    dtype = "float64" if s.float64 else "float32"  # names samplers.check_sampling_dtype accepts
    if cfg.parameterization == "ar":
        return ARSampler(mask_index, temperature=s.temperature, top_p=s.top_p, use_cache=s.kv_cache, dtype=dtype)
    options: dict[str, Any] = {"time_conditioning": cfg.time_conditioning} if s.predictor == "ddpm_cache" else {}
    return build_sampler(s.predictor, noise=noise, mask_index=mask_index, steps=s.steps, eps=s.eps,
                         noise_removal=s.noise_removal, dtype=dtype, **options)


def sample_template(cfg: DictConfig, tokenizer: Any, mask_index: int, ar: bool) -> Tensor:
    """(1, L): all masks (BOS first for AR), ``[BOS] prefix`` then masks, or an infill template."""
    s, length = cfg.sampling, cfg.model.length
    bos, eos = block_special_ids(tokenizer)
    if s.prefix is not None and s.infill is not None:
        raise ValueError("set sampling.prefix or sampling.infill, not both")
    if s.prefix is not None:
        return prefix_template(tokenizer, str(s.prefix), length, mask_index, bos)
    if s.infill is not None:
        if ar:
            raise ValueError("sampling.infill needs a diffusion model: an AR model only continues a prefix")
        return infill_template(tokenizer, str(s.infill), length, mask_index, bos, eos)
    template = torch.full((1, length), mask_index, dtype=torch.long)
    if ar:
        template[:, 0] = bos  # the AR sampler's given first token
    return template


def generate_samples(
    cfg: DictConfig, module: Diffusion, data: Any, mask_index: int, num_batches: int, batch_size: int
) -> list[dict[str, Any]]:
    """Sample ``num_batches`` batches; one record per sample (text, tokens, settings, NFE, seconds, seed)."""
    accelerator, _ = utils.resolve_accelerator(cfg.trainer.accelerator, 1)
    device = torch.device("cuda" if accelerator == "cuda" else "cpu")
    module.to(device)
    sampler = make_sampler(cfg, module.algorithm.noise, mask_index)
    ar = isinstance(sampler, ARSampler)
    template = sample_template(cfg, data.tokenizer, mask_index, ar).to(device)
    s = cfg.sampling
    semi_ar = (s.stride_length, s.num_strides) if s.semi_ar else None
    if semi_ar and ar:
        raise ValueError("sampling.semi_ar applies to diffusion models; an AR model is sampled token by token")
    records = []
    for batch_index in range(num_batches):
        seed = cfg.seed * 1_000_003 + batch_index
        generator = torch.Generator(device).manual_seed(seed)
        start = time.perf_counter()
        out = module.generate(sampler, template.expand(batch_size, -1).clone(), generator=generator, progress=True,
                              semi_ar=semi_ar)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = out.tokens.cpu()
        texts = decode(data.tokenizer, tokens, mask_index)
        true_nll = data.true_nll_of(tokens) if getattr(data, "has_true_nll", False) and not semi_ar else None
        for i, text in enumerate(texts):
            record = {"text": text, "tokens": tokens[i].tolist(), "sampler": "ar" if ar else s.predictor,
                      "steps": s.steps, "nfe": out.nfe, "seconds": seconds / batch_size, "seed": seed,
                      "index_in_batch": i, "length": tokens.shape[1], "float64": bool(s.float64)}
            if semi_ar:
                record.update(stride_length=s.stride_length, num_strides=s.num_strides)
            if true_nll is not None:
                record["true_nll_per_token"] = float(true_nll[i]) / tokens.shape[1]
            records.append(record)
    return records


def score_samples(
    records: list[dict[str, Any]], tokenizer: Any, scorer: GenerativePerplexity | None, truncate: bool
) -> dict[str, float]:
    """Add ``entropy`` (and with a scorer ``gen_ppl``, ``gen_nll_sum``, ``gen_num_tokens``) to each record.

    The scored part of a sample is its tokens up to the first EOS after position 0
    (:func:`metrics.truncate_at_eos`) when ``truncate``, decoded without special tokens.
    Returns the summary: token-weighted ``gen_ppl``, ``mean_entropy``, seconds per sample.
    """
    eos = block_special_ids(tokenizer)[1]
    scored_ids = [truncate_at_eos(r["tokens"], eos) if truncate else r["tokens"] for r in records]
    for record, ids in zip(records, scored_ids, strict=True):
        record["entropy"] = unigram_entropy(ids)
        record["scored_tokens"] = len(ids)
    entropies = [r["entropy"] for r in records if math.isfinite(r["entropy"])]
    summary: dict[str, float] = {
        "num_samples": len(records),
        "mean_entropy": sum(entropies) / max(len(entropies), 1),
        "seconds_per_sample": sum(r["seconds"] for r in records) / max(len(records), 1),
    }
    if scorer is not None:
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in scored_ids]
        results = scorer.score(texts)
        for record, result in zip(records, results, strict=True):
            record.update(gen_ppl=result["ppl"], gen_nll_sum=result["nll_sum"], gen_num_tokens=result["num_tokens"])
        summary.update(GenerativePerplexity.summary(results))
    return summary


def load_scorer(cfg: DictConfig) -> GenerativePerplexity:
    accelerator, _ = utils.resolve_accelerator(cfg.trainer.accelerator, 1)
    return GenerativePerplexity(cfg.eval.gen_ppl_eval_model, device="cuda" if accelerator == "cuda" else "cpu",
                                batch_size=cfg.eval.gen_ppl_batch_size)


def sample_evaluator(cfg: DictConfig, data: Any, mask_index: int) -> Callable[[Diffusion], dict[str, float]]:
    """For training: a few samples scored for generative perplexity and entropy (eval LM loaded once)."""
    scorer = load_scorer(cfg)

    def evaluate(module: Diffusion) -> dict[str, float]:
        records = generate_samples(cfg, module, data, mask_index, 1, cfg.eval.gen_ppl_num_samples)
        summary = score_samples(records, data.tokenizer, scorer, cfg.eval.gen_ppl_truncate_at_eos)
        return {"gen_ppl": summary["gen_ppl"], "entropy": summary["mean_entropy"]}

    return evaluate


def print_samples(records: list[dict[str, Any]], limit: int) -> None:
    for r in records[:limit]:
        where = f"seed {r['seed']}, #{r['index_in_batch']}"
        scores = f", gen. PPL {r['gen_ppl']:.2f}" if "gen_ppl" in r else ""
        entropy = f", entropy {r['entropy']:.2f}" if "entropy" in r else ""
        print(f"--- sample ({where}, {r['sampler']}, {r['steps']} steps, NFE {r['nfe']}{scores}{entropy})")
        print(r["text"])
    if records:
        seconds = sum(r["seconds"] for r in records) / len(records)
        print(f"--- {len(records)} samples of {records[0]['length']} tokens, {seconds:.3f} s/sample, "
              f"NFE {records[0]['nfe']}")
        scored = [r["true_nll_per_token"] for r in records if "true_nll_per_token" in r]
        possible = [v for v in scored if math.isfinite(v)]
        if scored:
            mean = f"{sum(possible) / len(possible):.4f} nats/token" if possible else "n/a"
            print(
                f"--- {len(possible)}/{len(scored)} samples are possible under the source (the rest contain a word "
                f"pair or a BOS/EOS placement it never produces); their true NLL: {mean}"
            )
