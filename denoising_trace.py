"""The denoising view: at which network call each position of a sample was unmasked.

``mode=sample_eval sampling.trace=true`` samples as usual, with every denoiser the sampler
receives wrapped in a :class:`DenoisingTrace`, and writes per sample the step of each
position into ``samples.jsonl`` (:func:`generation.generate_samples`). No sampler knows about
it: :class:`TraceRecorder` patches the sampler instance's ``sample`` for the duration of the
generation, so every ``sampler.sample(denoiser, x)`` call made by an algorithm, by semi-AR
windows (:func:`samplers.semi_ar_sample`) or by BD3-LM's blocks runs on a traced denoiser.

Definition. Let x^(k) be the input of the k-th denoiser call of a generation, k = 0, 1, ...,
counted over the whole generation (across semi-AR windows and BD3-LM blocks), and x^(end) the
sampler's output. Position i is *decided by call k* when it is masked in x^(k) and unmasked in
x^(k+1) (x^(end) after the last call): its token came from call k's output, also when steps
without a call (``ddpm_cache`` reusing the output) moved it. Its step is the k of the last such
change: a sampler that remasks (ReMDM) may decide a position several times, and ``remasks``
counts how often a decided token was masked again or redrawn between two calls. Special values:

    GIVEN = -1      never masked: BOS, a prefix, the context of an infill template;
    UNDECIDED = -2  masked in the output (``noise_removal=false``), or changed with no call
                    of its sampler run to attribute it to (``null`` in samples.jsonl).

Uniform-state samplers (UDLM, DUO) have no mask state after their start: they replace the
template's masks by draws from the uniform prior before the first call, and every step may
change any generated position. There a position's step is the last call whose output changed
it (its last change, often the greedy final call), and ``remasks`` counts its changes after the
first; GIVEN still marks the template's given tokens.

The step is the denoiser-call index, so it is NFE-aligned: call k is function evaluation
k + 1 and the largest step is at most NFE - 1. (BD3-LM with ``kv_cache`` adds to its NFE one
call per finished block but the last, which caches the block's keys and values; those are not
denoiser calls and get no step, so its steps stay below NFE minus their number.) The AR
sampler drives the causal model directly, not a denoiser, and decodes left to right by
construction: it is not traced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dataloader import decode
from samplers import Denoiser, SampleOutput, Sampler

GIVEN = -1      # never masked
UNDECIDED = -2  # masked at the end, or changed with no call to attribute it to


class DenoisingTrace:
    """A denoiser that records, per position, the call that decided it (see the module docstring).

    Calls ``denoiser(x_t, sigma, **kwargs)`` unchanged (``rows=`` included) and answers every
    attribute it lacks from the denoiser (``time_conditioned``, ``selects_rows``, a uniform-state
    denoiser's ``vocab_size``, ...; absent there, absent here), so the sampler takes the same
    path and draws the same numbers: tracing never changes the samples.

    Args:
        denoiser: what the sampler would have called.
        x: (B, W) long, the sampler's input (masks where tokens are to be generated).
        mask_index: id of the mask token.
        first_call: the generation-wide index of this trace's first call.
    """

    def __init__(self, denoiser: Denoiser, x: Tensor, mask_index: int, first_call: int = 0) -> None:
        self.denoiser = denoiser
        self.mask_index = int(mask_index)
        self.first_call = int(first_call)
        self.calls = self.first_call  # the generation-wide index of the next call
        self.last = x.clone()  # (B, W) the state at the previous observation
        self.steps = torch.where(x == self.mask_index, UNDECIDED, GIVEN)  # (B, W) long
        self.remasks = torch.zeros_like(x)  # (B, W) long

    def __getattr__(self, name: str) -> Any:
        """Only for attributes the trace itself lacks: the denoiser's (``selects_rows`` etc.)."""
        if name == "denoiser":  # not set yet (during __init__, or unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.denoiser, name)

    def __call__(self, xt: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        self._observe(xt)
        self.calls += 1
        return self.denoiser(xt, sigma, **kwargs)

    def finish(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Observe the sampler's output (B, W); returns the steps and remask counts, both (B, W) long."""
        self._observe(tokens)
        return self.steps, self.remasks

    def _observe(self, x: Tensor) -> None:
        """Attribute the changes from the previous state to ``x`` (B, W) to the previous call."""
        if x.shape != self.last.shape:
            raise ValueError(f"a traced sampler changed the shape of its state from {tuple(self.last.shape)} to "
                             f"{tuple(x.shape)} between denoiser calls; sampling.trace needs a fixed (batch, length).")
        by = UNDECIDED if self.calls == self.first_call else self.calls - 1
        was, now = self.last == self.mask_index, x == self.mask_index  # (B, W)
        redrawn = ~was & ~now & (x != self.last)  # a decided token replaced in one go
        remasked = ~was & now
        self.steps = torch.where((was & ~now) | redrawn, by, self.steps)
        self.steps = torch.where(remasked, UNDECIDED, self.steps)
        self.remasks += (remasked | redrawn).long()
        self.last = x.clone()


def check_traceable(sampler: Sampler) -> None:
    """A sampler that takes a denoiser (every diffusion sampler) can be traced; the AR sampler cannot."""
    if sampler.left_to_right:
        raise ValueError(f"sampling.trace records the order in which a diffusion sampler unmasks positions; "
                         f"sampler={sampler.name} drives the causal model itself and generates left to right, "
                         "one position per call: set sampling.trace=false.")


@dataclass(frozen=True)
class Segment:
    """One ``sampler.sample`` run of a generation: steps, remask counts and output, each (B, W)."""

    steps: Tensor
    remasks: Tensor
    tokens: Tensor


class TraceRecorder:
    """While active, every ``sampler.sample(denoiser, x, ...)`` runs on a :class:`DenoisingTrace`.

    A context manager that sets ``sampler.sample`` on the instance and deletes it on exit
    (the class's method is untouched). Each run is a :class:`Segment`; the call counter runs
    on across them, so a later semi-AR window or BD3-LM block has larger steps. After the
    generation, :meth:`result` lays the segments onto its output.
    """

    def __init__(self, sampler: Sampler, mask_index: int) -> None:
        check_traceable(sampler)
        self.sampler = sampler
        self.mask_index = int(mask_index)
        self.calls = 0
        self.segments: list[Segment] = []

    def __enter__(self) -> TraceRecorder:
        if "sample" in vars(self.sampler):
            raise RuntimeError(f"{type(self.sampler).__name__}.sample is already patched (a trace inside a trace)")
        inner = self.sampler.sample  # the bound method

        def sample(denoiser: Denoiser, x: Tensor, *args: Any, **kwargs: Any) -> SampleOutput:
            trace = DenoisingTrace(denoiser, x, self.mask_index, first_call=self.calls)
            out = inner(trace, x, *args, **kwargs)
            self.calls = trace.calls
            steps, remasks = trace.finish(out.tokens)
            self.segments.append(Segment(steps, remasks, out.tokens.clone()))
            return out

        self.sampler.sample = sample  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.sampler.sample

    def offsets(self, template: Tensor, stride: int | None) -> list[int]:
        """Where each segment starts in the output.

        ``stride`` (semi-AR): window k starts at k * stride. Otherwise the runs cover the
        template (B, L) block by block, left to right, in blocks of their own width, skipping
        blocks with no mask (BD3-LM samples only those); one run over the whole template is
        the single block at 0.
        """
        if stride is not None:
            return [k * stride for k in range(len(self.segments))]
        widths = {segment.steps.shape[1] for segment in self.segments}
        if len(widths) > 1:
            raise ValueError(f"sampler runs of different widths {sorted(widths)}: no block layout to trace")
        width = widths.pop() if widths else template.shape[1]
        starts = range(0, template.shape[1], width)
        blocks = [s for s in starts if bool((template[:, s:s + width] == self.mask_index).any())]
        if len(self.segments) > len(blocks):
            raise ValueError(f"{len(self.segments)} sampler runs for {len(blocks)} blocks with masks of width {width}")
        return blocks[:len(self.segments)]

    def result(self, tokens: Tensor, template: Tensor, stride: int | None = None) -> tuple[Tensor, Tensor]:
        """The steps and remask counts (B, N) of the generation's output ``tokens`` (B, N).

        ``template`` (B, L): the generation's input; ``stride``: the semi-AR stride length, if
        any (:meth:`offsets`). A later segment's decisions replace an earlier one's (the last
        unmasking counts); positions masked in ``tokens`` are UNDECIDED, those no call decided
        GIVEN. A decided position whose token differs from the output's there means the layout
        is wrong, and is an error rather than a wrong picture.
        """
        steps = torch.full_like(tokens, GIVEN)  # (B, N)
        remasks = torch.zeros_like(tokens)  # (B, N)
        for segment, start in zip(self.segments, self.offsets(template, stride), strict=True):
            width = min(segment.steps.shape[1], tokens.shape[1] - start)
            local = segment.steps[:, :width].to(tokens.device)  # (B, W)
            window = slice(start, start + width)
            if bool(((local >= 0) & (segment.tokens[:, :width].to(tokens.device) != tokens[:, window])).any()):
                raise RuntimeError(f"the sampler run placed at position {start} decided tokens that are not in the "
                                   "output there: the trace cannot be laid out on this generation")
            steps[:, window] = torch.where(local != GIVEN, local, steps[:, window])
            remasks[:, window] += segment.remasks[:, :width].to(tokens.device)
        return torch.where(tokens == self.mask_index, UNDECIDED, steps), remasks


def token_pieces(tokenizer: Any, ids: list[int], mask_index: int) -> list[str]:
    """The text of each token, such that ``"".join(pieces)`` is exactly the sample's text.

    The text is :func:`dataloader.decode` of ``ids`` (special tokens skipped, masks shown),
    and piece n is what decoding ``ids[:n + 1]`` adds to decoding ``ids[:n]``, so spaces and
    merges follow the tokenizer. Where a longer prefix rewrites the end of the shorter one (a
    character split over byte-level tokens decodes to U+FFFD until complete) the earlier pieces
    are trimmed and the character goes to the token that completes it. Cost: O(L^2) decoding,
    a fraction of a second for L = 1024.
    """
    pieces: list[str] = []
    shown = ""
    for n in range(1, len(ids) + 1):
        text = decode(tokenizer, torch.tensor([ids[:n]]), mask_index)[0]
        while not text.startswith(shown):  # trim the last non-empty piece until shown is a prefix again
            last = max(i for i, piece in enumerate(pieces) if piece)
            pieces[last], shown = pieces[last][:-1], shown[:-1]
        pieces.append(text[len(shown):])
        shown = text
    return pieces


def traced_fields(steps: Tensor, remasks: Tensor, tokens: list[int], tokenizer: Any,
                  mask_index: int) -> dict[str, list[Any]]:
    """A sample's trace as samples.jsonl holds it, for its ``len(tokens)`` positions.

    ``trace``: the step of each position (GIVEN = -1, UNDECIDED as ``null``); ``trace_remasks``:
    times each was remasked or redrawn; ``trace_pieces``: the text of each token
    (:func:`token_pieces`), so a replay needs no tokenizer.
    """
    n = len(tokens)
    return {
        "trace": [None if s == UNDECIDED else s for s in steps[:n].tolist()],
        "trace_remasks": remasks[:n].tolist(),
        "trace_pieces": token_pieces(tokenizer, tokens, mask_index),
    }
