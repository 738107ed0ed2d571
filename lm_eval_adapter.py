"""lm-evaluation-harness model ``mdlm``: a :class:`pipeline.Pipeline` behind lm-eval's ``LM`` interface.

    import lm_eval, lm_eval_adapter
    lm = lm_eval_adapter.MDLMHarness("outputs/quickstart/checkpoints/best.ckpt", mc_samples=32)
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

(``scripts/lm_eval.py CKPT --tasks ...`` does this and prints the table.)

``loglikelihood(context, continuation)`` is a BOUND, not the exact log-likelihood. The request is
laid out as a prompt is for generation (:func:`conditioning.prefix_template`):

    x0 = [BOS] context continuation [MASK] ... [MASK]        (L = model.length positions)

Only the continuation's positions may be masked; the context stays clean, and the positions after
the continuation stay masked (unobserved: the model is not told where the text ends). With
``K = mc_samples`` draws of a time ``t_k`` and of the continuation's masks (the loss of
``ppl_eval``, :meth:`algorithms.Algorithm.loss`), for MDLM

    -log p(continuation | context) <= E_t[ w(t) sum_{i in continuation, masked in x_t} -log p_theta(x0_i | x_t) ]
                                    ~  (1/K) sum_k (the same at t_k),      w(t) = -alpha'_t / (1 - alpha_t)

(w(t) = 1/t for the loglinear schedule), and the returned log-likelihood is minus this estimate: in
expectation a LOWER bound on ``log p(continuation | context)``, with Monte-Carlo noise of order
``1/sqrt(K)``. For an exact-likelihood model (AR) it is the exact conditional log-likelihood.
The draws of a request depend only on the request's text and the seed (not on the batch or on
the other requests), so a result is reproducible on its own. A context longer than fits is
cut from the left; a continuation of more than ``L - 1`` tokens is an error.

``is_greedy``: whether every continuation token is the argmax of the model's one-step prediction
with the whole continuation masked (``p_theta(x0_i | x_t)`` at t = 1, the mask token excluded):
what a one-step greedy decoder fills in. It equals greedy decoding for one-token continuations;
for longer ones it is stricter than any step-by-step greedy decoder (which sees the tokens it
already chose). For AR it is the usual teacher-forced greedy check. LAMBADA's ``acc`` is its mean.
The prediction is the algorithm's ``denoiser`` on the whole sequence; for block diffusion with
``block_size < model.length`` that is not the block-causal network its loss uses (the bound is).

``loglikelihood_rolling(text)``: minus the unconditional bound of the whole text,
:meth:`pipeline.Pipeline.score` (``[BOS] text [EOS]`` blocks as the training data; longer texts in
consecutive blocks of L - 2 tokens, each scored without the previous block as context).

``generate_until(context, {until, max_gen_toks})``: :meth:`pipeline.Pipeline.generate` with the
context as prefix (the pipeline's sampler, or ``sampler=``), the text after the context cut at the
first EOS, after ``max_gen_toks`` tokens and before the first ``until`` string. Other generation
arguments (``do_sample``, ``temperature``) are not read: choose the sampler and its options
(``sampler="confidence"`` is greedy, temperature 0).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from torch import Tensor

from dataloader import block_special_ids
from diffusion import Diffusion
from pipeline import Blocks, Pipeline
from samplers import LOG_SCORE, NEXT_TOKEN_LOGITS, X0_LOG_PROBS

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until
DRAW_INDEX_BITS = 40  # request draws are indexed by 40 bits of a hash: exact in item_draws' float64 arithmetic


def encode_pair(pipe: Pipeline, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and ``continuation`` as lm-eval's Hugging Face models split them.

    Trailing spaces of the context move to the continuation; the pair is tokenized whole and the
    continuation is what follows the context's own tokens (so merges across the boundary count).
    """
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = pipe.encode(context + continuation)
    context_ids = pipe.encode(context) if context else []
    return context_ids, whole[len(context_ids):]


def conditional_blocks(pipe: Pipeline, pairs: Sequence[tuple[str, str]]) -> Blocks:
    """``[BOS] context continuation [MASK]..`` (N, L), scored and maskable at the continuation only."""
    length, mask = int(pipe.cfg.model.length), pipe.module.algorithm.mask_index
    bos, _ = block_special_ids(pipe.tokenizer)
    rows, scored = [], torch.zeros(len(pairs), length, dtype=torch.bool)
    for n, (context, continuation) in enumerate(pairs):
        context_ids, continuation_ids = encode_pair(pipe, context, continuation)
        room = length - 1 - len(continuation_ids)
        if room < 0:
            raise ValueError(f"the continuation {continuation[:40]!r} takes {len(continuation_ids)} tokens; with BOS "
                             f"that does not fit in model.length={length}.")
        context_ids = context_ids[len(context_ids) - room:] if len(context_ids) > room else context_ids
        row = [bos, *context_ids, *continuation_ids]
        rows.append(row + [mask] * (length - len(row)))
        scored[n, 1 + len(context_ids):len(row)] = True
    x0 = torch.tensor(rows, dtype=torch.long)                                              # (N, L)
    return Blocks(x0, torch.ones_like(x0), scored, maskable=scored)


def request_indices(pairs: Sequence[tuple[str, ...]]) -> Tensor:
    """(N,) draw indices from a hash of each request's text: its draws do not depend on the other requests."""
    digests = [hashlib.sha256("\x00".join(pair).encode()).digest() for pair in pairs]
    return torch.tensor([int.from_bytes(d[:8], "little") % 2**DRAW_INDEX_BITS for d in digests])


def continuation_text(tokenizer: Any, kept: list[int], generated: list[int]) -> str:
    """The text ``generated`` adds after ``kept``: the decoded whole minus the decoded ``kept`` (so the
    separator a word-level tokenizer puts between them is kept, as a byte-level BPE's leading space is)."""
    head = tokenizer.decode(kept, skip_special_tokens=True)
    whole = tokenizer.decode(kept + generated, skip_special_tokens=True)
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(generated, skip_special_tokens=True)


# ----------------------------------------------------------------------------- is_greedy
def _masked_argmax(module: Diffusion, x0: Tensor, xt: Tensor) -> Tensor:
    """(B, L) argmax of the denoiser's output at t = 1 (log p(x0 | x_t), or SEDD's log score, whose
    ranking over tokens at a masked position is p(x0 | x_t)'s), the mask token excluded."""
    algorithm = module.algorithm
    sigma = algorithm.noise.total_noise(torch.ones(xt.shape[0], device=xt.device))
    out = algorithm.denoiser(module.backbone)(xt, sigma).float()                          # (B, L, V)
    out[..., algorithm.mask_index] = -torch.inf
    return out.argmax(-1)


def _teacher_forced_argmax(module: Diffusion, x0: Tensor, xt: Tensor) -> Tensor:
    """(B, L) next-token argmax given the clean tokens before each position (position 0 kept)."""
    logits = module.algorithm.denoiser(module.backbone)(x0, None).float()                 # (B, L, V)
    logits[..., module.algorithm.mask_index] = -torch.inf
    return torch.cat([x0[:, :1], logits[:, :-1].argmax(-1)], dim=1)


# The one-step prediction of each kind of denoiser (samplers.py's denoiser kinds).
GREEDY_PREDICTIONS: dict[str, Callable[[Diffusion, Tensor, Tensor], Tensor]] = {
    X0_LOG_PROBS: _masked_argmax,
    LOG_SCORE: _masked_argmax,
    NEXT_TOKEN_LOGITS: _teacher_forced_argmax,
}


@torch.no_grad()
def greedy_matches(pipe: Pipeline, blocks: Blocks, batch_size: int = 8) -> list[bool]:
    """Per block: every scored token is the model's one-step argmax with the scored positions masked."""
    kind = pipe.module.algorithm.denoiser_kind
    if kind not in GREEDY_PREDICTIONS:
        raise ValueError(f"no greedy prediction for denoisers of kind {kind!r}; known: {sorted(GREEDY_PREDICTIONS)}")
    module, mask = pipe.module.eval(), pipe.module.algorithm.mask_index
    matches = []
    for start in range(0, blocks.x0.shape[0], batch_size):
        x0, scored = blocks.x0[start:start + batch_size].to(pipe.device), blocks.scored[start:start + batch_size]
        xt = x0.masked_fill(scored.to(pipe.device), mask)
        with pipe._autocast():
            predicted = GREEDY_PREDICTIONS[kind](module, x0, xt).cpu()
        matches += ((predicted == x0.cpu()) | ~scored).all(-1).tolist()
    return matches


# ----------------------------------------------------------------------------- the model
@register_model("mdlm")
class MDLMHarness(LM):
    """lm-eval's ``LM`` over a :class:`pipeline.Pipeline` (see the module docstring for what each method returns).

    Args:
        pretrained: a checkpoint (:meth:`pipeline.Pipeline.from_pretrained`) or a Pipeline.
        mc_samples: draws per request of the bound (``loglikelihood`` and ``loglikelihood_rolling``).
        batch_size: sequences per network call.
        seed: of the draws and of generation (request ``n`` samples with ``seed + n``); None = the config's.
        sampler, steps, sampler_options: for ``generate_until`` (:meth:`pipeline.Pipeline.generate`).
        device, overrides: for :meth:`pipeline.Pipeline.from_pretrained`.
    """

    def __init__(self, pretrained: str | Pipeline, mc_samples: int = 32, batch_size: int | str | None = 8,
                 seed: int | None = None, sampler: str | None = None, steps: int | None = None,
                 sampler_options: dict[str, Any] | None = None, device: str | None = None,
                 overrides: Sequence[str] = (), **unused: Any) -> None:
        super().__init__()
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        if unused.keys() - {"max_batch_size"}:
            raise ValueError(f"MDLMHarness does not take {sorted(unused)}; it takes pretrained, mc_samples, "
                             "batch_size, seed, sampler, steps, sampler_options, device, overrides.")
        self.pipe = pretrained if isinstance(pretrained, Pipeline) else \
            Pipeline.from_pretrained(pretrained, device=device, overrides=overrides)
        self.mc_samples = int(mc_samples)
        self.batch_size = 8 if batch_size in (None, "auto") else int(batch_size)
        self.seed = int(self.pipe.cfg.seed if seed is None else seed)
        self.sampler, self.steps, self.sampler_options = sampler, steps, dict(sampler_options or {})

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(-bound of the continuation given the context, is_greedy) per request."""
        if not requests:
            return []
        pairs = [tuple(request.args) for request in requests]
        blocks = conditional_blocks(self.pipe, pairs)
        nll, _ = self.pipe.bound(blocks, self.mc_samples, self.batch_size, self.seed, request_indices(pairs),
                                 progress=True)
        greedy = greedy_matches(self.pipe, blocks, self.batch_size)
        return [(-float(row.mean()), g) for row, g in zip(nll, greedy, strict=True)]

    def loglikelihood_rolling(self, requests: list[Instance]) -> list[float]:
        """Minus the unconditional bound of each whole text (nats)."""
        texts = [request.args[0] for request in requests]
        scores = self.pipe.score(texts, self.mc_samples, self.batch_size, self.seed, progress=True)
        return [-score.nll_sum for score in scores]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """The pipeline's samples with each context as prefix, cut at EOS, ``max_gen_toks`` and ``until``."""
        return [self.continue_text(*request.args, seed=self.seed + n) for n, request in enumerate(requests)]

    def continue_text(self, context: str, gen_kwargs: dict[str, Any], seed: int) -> str:
        """One sample of text after ``context`` (left-truncated to leave ``max_gen_toks`` positions)."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        length = int(self.pipe.cfg.model.length)
        budget = min(int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), length - 2)
        context_ids = self.pipe.encode(context.rstrip())
        if 1 + len(context_ids) > length - budget:
            context_ids = context_ids[len(context_ids) - (length - 1 - budget):]
            context = self.pipe.tokenizer.decode(context_ids)
            context_ids = self.pipe.encode(context.rstrip())
        sample = self.pipe.generate(1, steps=self.steps, sampler=self.sampler, prefix=context, seed=seed,
                                    **self.sampler_options)[0]
        kept, generated = sample.tokens[:1 + len(context_ids)], sample.tokens[1 + len(context_ids):]
        _, eos = block_special_ids(self.pipe.tokenizer)
        generated = generated[:generated.index(eos)] if eos in generated else generated
        text = continuation_text(self.pipe.tokenizer, kept, generated[:budget])
        for stop in until:
            text = text.split(stop)[0] if stop else text
        return text
