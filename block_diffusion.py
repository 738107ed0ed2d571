"""Block diffusion (BD3-LM; Arriola et al., ICLR 2025): autoregressive over blocks, masked diffusion within them.

A sequence of length L is cut into L / L' blocks of ``block_size`` L'. The likelihood factorizes
over blocks, ``log p(x) = sum_b log p(x^b | x^{<b})``, and each factor is bounded by MDLM's
NELBO of the block given the clean earlier blocks, at a noise level of its own:

    NELBO = sum_b E_{t_b} [ w(t_b) sum_{i in b, x_t^i masked} -log p_theta(x_0^i | x_t^b, x_0^{<b}) ]

with ``w(t) = -alpha'_t / (1 - alpha_t)`` (:attr:`noise_schedule.NoiseLevel.nelbo_weight`).
L' = L is MDLM; L' = 1 with every token masked is an autoregressive model.

**Vectorized training.** All blocks are scored in one forward pass of length 2L: the input is
``x_t ⊕ x_0`` (both halves with rotary positions 0..L-1) under :func:`block_diffusion_mask`, so
that the noisy block b sees itself and the clean blocks before it, and the clean copy is
block-causal; the loss reads the first L outputs.

**Sampling** runs block by block, left to right: any sampler of x0 log-probabilities
(``ddpm_cache``, ``first_hitting``, ``remdm``, nucleus, ...) fills one block at a time with a
denoiser that runs [clean prefix ; noisy block] under the block-causal mask, the view training
gives each noisy block. ``sampling.steps`` is the step count per block.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from algorithms import (
    Backbone,
    Denoiser,
    Draws,
    LossOutput,
    MaskedDiffusion,
    q_xt,
    sample_times,
    selects_outputs,
    subs_log_probs,
    subs_log_probs_at_masks,
    subs_log_probs_at_rows,
    subs_log_probs_of_rows,
    subs_nelbo,
    subs_nelbo_of_rows,
    zero_mask_logit,
)
from noise_schedule import NoiseSchedule
from samplers import SampleOutput, Sampler


@functools.lru_cache(maxsize=16)
def block_diffusion_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(2L, 2L) bool, True where query q may attend to key k, for the input ``x_t ⊕ x_0``.

    With ``clean = idx >= L`` and ``block = (idx mod L) // L'``:

    - block-diagonal: ``block_q == block_k and clean_q == clean_k`` (a noisy block sees itself, a
      clean block itself);
    - offset block-causal: ``block_q > block_k and clean_k and not clean_q`` (a noisy block sees the
      clean blocks before it);
    - block-causal: ``block_q >= block_k and clean_q and clean_k`` (clean blocks see the clean
      blocks up to their own).

    The clean queries never see a noisy key, so the clean half computes what a block-causal
    model computes on x_0 alone (the keys and values a sampler caches). Cached per
    (L, L', device); do not modify the result.
    """
    if length < 1 or block_size < 1 or length % block_size:
        raise ValueError(f"block_size ({block_size}) must divide the length ({length}); both >= 1")
    idx = torch.arange(2 * length, device=device)  # (2L,)
    clean = idx >= length  # (2L,)
    block = (idx % length) // block_size  # (2L,)
    q_clean, k_clean = clean[:, None], clean[None, :]
    q_block, k_block = block[:, None], block[None, :]
    diagonal = (q_block == k_block) & (q_clean == k_clean)
    offset_causal = (q_block > k_block) & k_clean & ~q_clean
    causal = (q_block >= k_block) & q_clean & k_clean
    return diagonal | offset_causal | causal  # (2L, 2L)


@functools.lru_cache(maxsize=16)
def block_causal_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(S, S) bool: a block sees the blocks up to its own (the clean quadrant of :func:`block_diffusion_mask`).

    Cached per (S, L', device), so attention kernels that prepare a mask once (FlexAttention) reuse it.
    """
    block = torch.arange(length, device=device) // block_size
    return block[:, None] >= block[None, :]


def two_stream_logits(backbone: Backbone, xt: Tensor, x0: Tensor, block_size: int, sigma: Tensor,
                      attention_mask: Tensor | None = None, output_mask: Tensor | None = None) -> Tensor:
    """Logits (B, L, V) at the noisy positions from one pass over ``x_t ⊕ x_0`` (B, 2L).

    ``attention_mask`` (B, L) (1 = real token) hides padding in both halves; None = no padding.
    ``output_mask`` (B, L) bool: only the logits (N, V) of the noisy positions where it is True
    (a backbone with ``selects_outputs``), row-major.
    """
    length = xt.shape[1]
    positions = torch.arange(length, device=xt.device).repeat(2)  # (2L,): the clean copy has the same positions
    mask = block_diffusion_mask(length, block_size, xt.device)  # (2L, 2L)
    padding = None if attention_mask is None else attention_mask.repeat(1, 2)  # (B, 2L)
    extra = {}
    if output_mask is not None:  # the clean half's outputs are never needed
        extra["output_mask"] = torch.cat([output_mask, torch.zeros_like(output_mask)], dim=1)  # (B, 2L)
    logits = backbone(torch.cat([xt, x0], dim=1), sigma, attention_mask=padding, attn_mask=mask,
                      positions=positions, **extra)  # (B, 2L, V), or (N, V)
    return logits if output_mask is not None else logits[:, :length]


def sequence_ends(x: Tensor, stop_token: int, default: Tensor) -> Tensor:
    """(B,) one past the first ``stop_token`` of each row of ``x`` (B, S) after position 0; ``default`` (B,) where
    there is none."""
    hits = x[:, 1:] == stop_token  # (B, S - 1)
    return torch.where(hits.any(dim=1), hits.int().argmax(dim=1) + 2, default)


def clip_intervals(widths: Sequence[float], delta: float, floor: float = 1e-3) -> list[tuple[float, float]]:
    """BD3-LM's candidate intervals of masking rates: ``[floor, 1]``, then for each width w the intervals
    ``[i, i + w]`` for ``i = 0, delta, 2 delta, ..., 1 - w`` (lower ends raised to ``floor``).

    Widths (0.5, 0.6, 0.7, 0.8, 0.9) with delta 0.05 give 1 + 11 + 9 + 7 + 5 + 3 = 36 intervals.
    """
    if delta <= 0 or any(not 0 < w <= 1 for w in widths):
        raise ValueError(f"training.clip_search_widths must be in (0, 1] and clip_search_delta > 0; got "
                         f"{list(widths)} and {delta}")
    intervals = [(floor, 1.0)]
    for width in widths:
        steps = int(math.floor((1.0 - width) / delta + 1e-9))
        for k in range(steps + 1):
            low = round(k * delta, 10)
            intervals.append((max(low, floor), min(round(low + width, 10), 1.0)))
    return list(dict.fromkeys(intervals))  # in order, without repeats


class ClipSearch:
    """The totals of BD3-LM's clip search over one validation run (see :meth:`BD3LM.on_validation_batch`).

    Args:
        widths: interval widths to try (the paper: 0.5 ... 0.9); empty = no search.
        delta: step of the intervals' lower ends.
        max_batches: validation batches per process that take part (each costs one forward
            pass per interval).
    """

    def __init__(self, widths: Sequence[float], delta: float, max_batches: int) -> None:
        self.active = len(widths) > 0
        self.intervals = clip_intervals(widths, delta) if self.active else []
        if max_batches < 1:
            raise ValueError(f"training.clip_search_batches must be >= 1, got {max_batches}")
        self.max_batches = max_batches
        self.totals = [0.0] * len(self.intervals)
        self.batches = 0

    def add(self, index: int, variance: Tensor) -> None:
        self.totals[index] += float(variance)
        self.batches += index == 0

    def best(self) -> tuple[tuple[float, float], float]:
        """The interval of least total variance and its variance per batch; the totals start again."""
        index = min(range(len(self.intervals)), key=self.totals.__getitem__)
        result = self.intervals[index], self.totals[index] / self.batches
        self.totals, self.batches = [0.0] * len(self.intervals), 0
        return result


class BD3LM(MaskedDiffusion):
    """Block diffusion with the SUBS parameterization (absorbing state), continuous time.

    Args:
        noise: the noise schedule.
        mask_index: id of the mask token.
        block_size: L', which must divide the sequence length. L' = L is MDLM.
        sampling_eps: evaluation times are drawn in ``[sampling_eps, 1]`` (the unclipped bound
            that perplexities report).
        clip_min, clip_max: training times are drawn in ``[clip_min, clip_max]`` (BD3-LM's
            clipped schedule, beta and omega; the defaults are the unclipped interval).
        antithetic_sampling: one time per stratum over all B * L / L' blocks of the batch.
        time_conditioning: must be false: each block has its own noise level, and the network
            takes one per sequence (BD3-LM trains without it; the network then sees 0).
        kv_cache: sampling keeps the clean prefix's keys and values (``sampling.kv_cache``).
        context_length: the most tokens the network sees when sampling (the trained
            ``model.length``); longer samples slide a window of that size. None: no limit.
        clip_search_widths, clip_search_delta, clip_search_batches: the paper's data-driven
            clipped schedule (:class:`ClipSearch`): at each validation during training, the
            interval of :func:`clip_intervals` whose per-block NELBO terms have the least
            variance over the first ``clip_search_batches`` batches becomes the training
            interval (logged as ``val/clip_min``, ``val/clip_max``). Empty widths: no search.

    Times: training draws ``u ~ U[0, 1)`` per block (antithetic over the batch's blocks) and sets
    ``t = clip_min + (clip_max - clip_min) u``. With given draws (:class:`algorithms.Draws`, one
    uniform ``u`` per sequence), block b gets ``frac(u + b L' / L)``: stratified over the
    sequence's blocks and, for L' = L, exactly MDLM's time.
    """

    name = "bd3lm"
    parameterization = "subs"
    needs_block_attention = True  # the backbone takes attn_mask, positions and a KV cache (main.check_combination)
    model_options = ("block_size", "time_conditioning")

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_index: int,
        block_size: int,
        sampling_eps: float = 1e-3,
        clip_min: float = 1e-3,
        clip_max: float = 1.0,
        antithetic_sampling: bool = True,
        time_conditioning: bool = False,
        kv_cache: bool = True,
        context_length: int | None = None,
        clip_search_widths: Sequence[float] = (),
        clip_search_delta: float = 0.05,
        clip_search_batches: int = 100,
    ) -> None:
        super().__init__(noise, mask_index, time_conditioning, antithetic_sampling, sampling_eps, T=0)
        self.kv_cache = bool(kv_cache)
        if context_length is not None and (context_length < block_size or context_length % block_size):
            raise ValueError(f"context_length ({context_length}, the trained model.length) must be a multiple of "
                             f"block_size ({block_size})")
        self.context_length = context_length
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.block_size = block_size
        if not 0.0 <= clip_min < clip_max <= 1.0:
            raise ValueError(f"need 0 <= clip_min < clip_max <= 1 (the clipped interval of training times), "
                             f"got clip_min={clip_min}, clip_max={clip_max}")
        # The interval is state: the clip search moves it, checkpoints keep it (the floats mirror the buffer).
        self.register_buffer("clip_interval", torch.tensor([clip_min, clip_max], dtype=torch.float64))
        self.clip_min, self.clip_max = float(clip_min), float(clip_max)
        self.register_load_state_dict_post_hook(lambda module, keys: module.set_clip_interval(
            *module.clip_interval.tolist()))
        self.clip_search_widths = [float(w) for w in clip_search_widths]
        self.clip_search_delta, self.clip_search_batches = float(clip_search_delta), int(clip_search_batches)
        self.clip_search = ClipSearch(self.clip_search_widths, self.clip_search_delta, self.clip_search_batches)
        if self.time_conditioning:
            self.reject("time_conditioning", "each block has its own noise level and the DiT takes one per "
                        "sequence; BD3-LM trains without time conditioning: set time_conditioning=false.")

    def check_length(self, length: int) -> int:
        """The number of blocks of a length-L sequence; an error when L' does not divide L."""
        if length % self.block_size:
            raise ValueError(f"block_size={self.block_size} must divide the sequence length {length} "
                             "(model.length): choose a divisor")
        return length // self.block_size

    def set_clip_interval(self, low: float, high: float) -> None:
        """Training times from now on are drawn in ``[low, high]``."""
        self.clip_min, self.clip_max = float(low), float(high)
        self.clip_interval.copy_(torch.tensor([low, high], dtype=torch.float64))

    def block_times(self, batch: int, num_blocks: int, device: torch.device | str,
                    draws: Draws | None = None, interval: tuple[float, float] | None = None) -> Tensor:
        """Times (B, L / L') of each block: in ``interval`` if given, else clipped while training and in
        ``[sampling_eps, 1]`` otherwise."""
        low, high = (self.clip_min, self.clip_max) if self.training else (self.sampling_eps, 1.0)
        if interval is not None:
            low, high = interval
        if draws is not None:
            offsets = torch.arange(num_blocks, device=device) / num_blocks  # (nb,)
            u = torch.frac(draws.time.to(device)[:, None] + offsets)  # (B, nb)
        else:
            u = sample_times(batch * num_blocks, 0.0, self.antithetic_sampling, device).view(batch, num_blocks)
        return low + (high - low) * u

    def forward_process(self, x0: Tensor, draws: Draws | None = None,
                        interval: tuple[float, float] | None = None) -> tuple[Tensor, Tensor]:
        """Per-token times t (B, L), constant over each block, and xt (B, L) ~ q(xt | x0)."""
        num_blocks = self.check_length(x0.shape[1])
        t = self.block_times(x0.shape[0], num_blocks, x0.device, draws, interval)  # (B, nb)
        t = t.repeat_interleave(self.block_size, dim=1)  # (B, L)
        xt = q_xt(x0, self.noise.move_chance(t), self.mask_index, u=None if draws is None else draws.mask)
        return t, xt

    def loss(
        self, backbone: nn.Module, x0: Tensor, attention_mask: Tensor, padded: bool | None = None,
        draws: Draws | None = None, interval: tuple[float, float] | None = None,
    ) -> LossOutput:
        """Per-token NELBO (B, L): each block's MDLM NELBO given the clean blocks before it.

        ``interval``: draw the times in it (the clip search), whatever the mode.
        """
        if padded is None:
            padded = not bool(attention_mask.all())
        t, xt = self.forward_process(x0, draws, interval)  # (B, L) each
        sigma = torch.zeros(x0.shape[0], device=x0.device)  # no time conditioning: the network sees 0
        padding = attention_mask if padded else None
        weight = self.noise(t).nelbo_weight.float()  # (B, L)
        if selects_outputs(backbone):  # the output layer only at the masked positions
            masked = xt == self.mask_index  # (B, L)
            rows = two_stream_logits(backbone, xt, x0, self.block_size, sigma, padding, output_mask=masked)
            nll = subs_nelbo_of_rows(rows, x0, masked, self.mask_index, weight)  # (B, L)
        else:
            logits = two_stream_logits(backbone, xt, x0, self.block_size, sigma, padding)
            nll = subs_nelbo(logits, x0, xt, self.mask_index, torch.ones_like(sigma)) * weight  # (B, L)
        return LossOutput(nll=nll * attention_mask, mask=attention_mask, tokens=x0)

    @torch.no_grad()
    def on_validation_batch(self, backbone: nn.Module, batch: dict[str, Any], batch_idx: int,
                            gather: Any) -> None:
        """The clip search's work on one validation batch (the first ``clip_search_batches`` of each rank).

        For every candidate interval: the NELBO with times drawn in it, as the per-block terms
        (B, L / L') (each block's weighted per-token NELBO, averaged over the block); their
        variance over every process's batch is added to the interval's total.
        """
        if not self.clip_search.active or batch_idx >= self.clip_search.max_batches:
            return
        x0, mask = batch["input_ids"], batch["attention_mask"]
        for index, interval in enumerate(self.clip_search.intervals):
            nll = self.loss(backbone, x0, mask, batch.get("padded"), interval=interval).nll  # (B, L)
            terms = nll.view(x0.shape[0], -1, self.block_size).mean(-1)  # (B, nb)
            self.clip_search.add(index, gather(terms).double().var())

    def on_validation_end(self) -> dict[str, float]:
        """Move the training interval to the search's best (lowest total variance); log it."""
        if not self.clip_search.active or self.clip_search.batches == 0:
            return {}
        (low, high), variance = self.clip_search.best()
        self.set_clip_interval(low, high)
        return {"clip_min": low, "clip_max": high, "clip_variance": variance}

    def block_denoiser(self, backbone: nn.Module, prefix: Tensor) -> Denoiser:
        """``(x_t block (B, L'), sigma) -> log p_theta(x0 | x_t block, prefix)`` (B, L', V), SUBS.

        The network sees [prefix ; block] (the prefix clean, a whole number of blocks) under the
        block-causal mask, and sigma = 0 (no time conditioning).
        """
        def denoise(xt: Tensor, sigma: Tensor, rows: Tensor | None = None) -> Tensor:
            x = torch.cat([prefix, xt], dim=1)  # (B, P + L')
            mask = block_causal_mask(x.shape[1], self.block_size, x.device)  # (S, S)
            if selects_outputs(backbone):  # the output layer only at the block's masked (or asked) positions
                wanted = torch.cat([torch.zeros_like(prefix, dtype=torch.bool),
                                    xt == self.mask_index if rows is None else rows], dim=1)
                logits = backbone(x, torch.zeros_like(sigma), attn_mask=mask, output_mask=wanted)  # (N, V)
                if rows is not None:
                    return zero_mask_logit(logits, self.mask_index).log_softmax(dim=-1)
                return subs_log_probs_of_rows(logits, xt, self.mask_index)
            logits = backbone(x, torch.zeros_like(sigma), attn_mask=mask)[:, prefix.shape[1]:]  # (B, L', V)
            log_p = subs_log_probs(logits, xt, self.mask_index)
            return log_p if rows is None else log_p[rows]

        denoise.time_conditioned = False  # type: ignore[attr-defined]
        denoise.selects_rows = True  # type: ignore[attr-defined]
        return denoise

    def cached_denoiser(self, backbone: nn.Module, cache: Any) -> Denoiser:
        """:meth:`block_denoiser` reading the prefix's keys and values from ``cache`` (``models.dit.KVCache``)."""
        def denoise(xt: Tensor, sigma: Tensor, rows: Tensor | None = None) -> Tensor:
            if rows is not None:
                return subs_log_probs_at_rows(backbone, xt, torch.zeros_like(sigma), rows, self.mask_index,
                                              cache=cache)
            return subs_log_probs_at_masks(backbone, xt, torch.zeros_like(sigma), self.mask_index, cache=cache)

        denoise.time_conditioned = False  # type: ignore[attr-defined]
        denoise.selects_rows = True  # type: ignore[attr-defined]
        return denoise

    semi_ar = False  # longer samples are more blocks
    var_length = True  # sample() can stop at a token (sampling.var_length)

    def sample(self, sampler: Sampler, backbone: nn.Module, x: Tensor, generator: torch.Generator | None = None,
               progress: bool = False, stop_token: int | None = None) -> SampleOutput:
        """Fill the masked positions of ``x`` (B, L) block by block, left to right (L' must divide L).

        Each block is sampled by ``sampler`` given the tokens before it, at most ``context_length -
        L'`` of them (a sliding window: samples may be longer than the trained length). With
        ``kv_cache`` the prefix's keys and values are kept: each finished block runs through the
        network once more to add its own (one extra call per block, counted in the NFE), and the
        sampler's calls see only the block. Blocks without a mask cost no sampler call.

        ``stop_token`` (variable length, e.g. EOS): a sequence ends at its first ``stop_token``
        after position 0 (position 0 may hold a BOS that shares the id, as GPT-2's does), and
        generation stops after the block in which every sequence has ended. The output then has
        as many blocks as were generated, and ``lengths`` (B,) says where each sequence ends
        (its stop token included; a sequence that never stops runs to the last block).
        """
        num_blocks = self.check_length(x.shape[1])
        window = None if self.context_length is None else self.context_length - self.block_size
        cache = self.new_cache(backbone, window) if self.kv_cache else None
        x, nfe, zeros = x.clone(), 0, torch.zeros(x.shape[0], device=x.device)
        ends = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)  # (B,) length of each sequence
        blocks = tqdm(range(num_blocks), desc=f"sampling ({sampler.name}) by block", unit="block", disable=not progress)
        for b in blocks:
            block = slice(b * self.block_size, (b + 1) * self.block_size)
            if bool((x[:, block] == self.mask_index).any()):
                if cache is not None:
                    denoiser = self.cached_denoiser(backbone, cache)
                else:
                    denoiser = self.block_denoiser(backbone, x[:, max(0, block.start - (window or block.start)):
                                                              block.start])
                out = sampler.sample(denoiser, x[:, block].clone(), generator=generator, progress=False)
                x[:, block], nfe = out.tokens, nfe + out.nfe
            if stop_token is not None:
                ends = sequence_ends(x[:, :block.stop], stop_token, ends)
                if bool((ends <= block.stop).all()):  # every sequence has ended
                    return SampleOutput(tokens=x[:, :block.stop], nfe=nfe, lengths=ends)
            if cache is not None and b < num_blocks - 1:  # the finished block joins the cached prefix
                cache.store = True
                backbone(x[:, block], zeros, cache=cache)
                cache.store, nfe = False, nfe + 1
        return SampleOutput(tokens=x, nfe=nfe, lengths=None if stop_token is None else ends)

    @staticmethod
    def new_cache(backbone: nn.Module, window: int | None) -> Any:
        if not hasattr(backbone, "new_cache"):
            raise ValueError(f"sampling.kv_cache=true needs a backbone with a KV cache (backbone=dit); "
                             f"{type(backbone).__name__} has none: set sampling.kv_cache=false")
        return backbone.new_cache(window)

    def sampler_inputs(self) -> dict[str, Any]:
        return {"noise": self.noise, "mask_index": self.mask_index}
