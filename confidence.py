"""Confidence-ordered parallel decoding (LLaDA, Nie et al. 2025; Fast-dLLM, Wu et al. 2025).

Every step calls the denoiser once, proposes a token ``x0_i`` for each masked position of the
current block, and *commits* the most confident proposals; the other positions stay masked and
are proposed again at the next step. Committed and given tokens are never changed.

* Proposal: ``x0_i = argmax_v p_theta(x_0^i = v | x_t)`` at temperature 0 (greedy, LLaDA's
  default), else a draw from ``p^(1/T)`` restricted to its top-p nucleus.
* Confidence: ``c_i = p_theta(x_0^i = x0_i | x_t)``, the model's own probability of the proposal
  (before temperature and nucleus, as both papers' code), for ``remasking="low_confidence"``; a
  uniform number for ``remasking="random"``.
* Blocks: the sequence is cut into blocks of ``block_length`` positions (the last one shorter if
  ``block_length`` does not divide L); a block starts only once the block before it has no mask.
* How many per step, either
    - fixed (LLaDA, ``threshold=None``): the ``steps`` are split over the blocks (``steps // blocks``
      each, the remainder to the first blocks); a row with ``n`` masks in a block at the block's
      start commits ``n // s`` of them at each of the block's ``s`` steps, plus one more at the
      first ``n % s`` steps, so every block is finished after its steps. A step in which no row
      commits anything makes no network call. NFE <= steps.
    - threshold (Fast-dLLM): the most confident masked position of the block plus every other one
      with ``c_i >= threshold``, until nothing is masked; ``steps`` is not used. Each step commits
      at least one position per unfinished row, so NFE <= L.

Neither samples the model's distribution: it is a greedy / heuristic decoder, *not exact in law*
at any temperature (positions decoded in parallel ignore each other, and the order depends on
the model's confidence). Rows of a batch are decoded independently (their own counts and, with a
threshold, their own current block); one network call serves the whole batch at one time.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from tqdm import tqdm

from noise_schedule import NoiseSchedule
from samplers import Denoiser, DiffusionSampler, SampleOutput, ranks

# How the confidence of a proposal is measured: the model's probability of it, or a uniform number.
REMASKING = ("low_confidence", "random")


def _is_real(value: object, kind: type = numbers.Real) -> bool:
    """``value`` is a number of ``kind`` (a bool is not), as a config may give it."""
    return isinstance(value, kind) and not isinstance(value, bool)


class ConfidenceSampler(DiffusionSampler):
    """Commit the most confident proposals first, block by block (LLaDA / Fast-dLLM); not exact in law.

    The denoiser is called at time ``t_i`` of the grid ``linspace(1, eps, steps + 1)`` at step ``i``
    (fixed mode). With a threshold there is no grid: the time is where an ancestral sampler
    expects the fraction ``f`` of the positions to generate that are still masked (over the batch),
    ``t = m^{-1}(f m(1))`` clipped to ``[eps, 1]`` (``t = f`` for the log-linear schedule). LLaDA's
    network reads no time; an MDLM network with time conditioning gets a sensible one.

    Args:
        noise: the schedule the model was trained with (only for the time handed to the network).
        mask_index: id of the mask token.
        steps: network calls of fixed mode, at least the number of blocks (ignored with a threshold).
        eps: final time of the grid.
        noise_removal: what happens to positions still masked at the end (none are, by
            construction; see :class:`DiffusionSampler`).
        dtype: precision of the draws and confidences (float64 by default).
        temperature: >= 0; 0 proposes the argmax (greedy), > 0 draws from ``p^(1/temperature)``.
        top_p, top_p_rule: the nucleus of the proposals' distribution (see :func:`samplers.nucleus`);
            it never removes the argmax, so it matters only at temperature > 0.
        remasking: ``"low_confidence"`` (commit the most probable proposals) or ``"random"``.
        block_length: positions per block, decoded left to right; None: one block, the whole sequence.
        threshold: None for the fixed schedule, or a number in [0, 1]: commit the most confident
            position and every other one whose confidence reaches it (Fast-dLLM: 0.9, block 32); with
            random remasking it compares the uniform numbers (each further position with chance 1 - threshold).
    """

    name = "confidence"

    def __init__(
        self,
        noise: NoiseSchedule,
        mask_index: int,
        steps: int,
        eps: float = 1e-5,
        noise_removal: bool | str | None = True,
        dtype: torch.dtype | str = torch.float64,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_p_rule: str = "remdm",
        remasking: str = "low_confidence",
        block_length: int | None = None,
        threshold: float | None = None,
    ) -> None:
        if not (_is_real(temperature) and temperature >= 0):
            raise ValueError(f"sampler temperature must be a number >= 0 (0: greedy argmax), got {temperature!r}.")
        # The base class draws at temperature > 0 only; temperature 0 is handled by _draw.
        super().__init__(noise, mask_index, steps, eps=eps, noise_removal=noise_removal, dtype=dtype,
                         temperature=temperature or 1.0, top_p=top_p, top_p_rule=top_p_rule)
        if remasking not in REMASKING:
            raise ValueError(f"sampler remasking={remasking!r}; valid choices: {list(REMASKING)}")
        if block_length is not None and not (_is_real(block_length, numbers.Integral) and block_length >= 1):
            raise ValueError(f"sampler block_length must be an integer >= 1, or null for one block (the whole "
                             f"sequence), got {block_length!r}.")
        if threshold is not None and not (_is_real(threshold) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"sampler threshold must be a number in [0, 1], or null for a fixed number of "
                             f"positions per step, got {threshold!r}.")
        self.temperature = float(temperature)
        self.remasking = remasking
        self.block_length = None if block_length is None else int(block_length)
        self.threshold = None if threshold is None else float(threshold)

    @property
    def exact(self) -> bool:
        """Never: confidence ordering is a heuristic, whatever the temperature."""
        return False

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(steps={self.steps}, eps={self.eps}, remasking={self.remasking}, "
            f"block_length={self.block_length}, threshold={self.threshold}, temperature={self.temperature}, "
            f"top_p={self.top_p} ({self.top_p_rule}), mask_index={self.mask_index}, "
            f"noise_removal={self.noise_removal}, dtype={self.dtype})"
        )

    @torch.no_grad()
    def sample(
        self,
        denoiser: Denoiser,
        x: Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> SampleOutput:
        x = self._check_input(x)  # (B, L)
        length = x.shape[1]
        block_length = max(1, min(self.block_length or length, length))
        blocks = -(-length // block_length)
        block_of = torch.arange(length, device=x.device) // block_length  # (L,) block of each position
        if self.threshold is None:
            if self.steps < blocks:
                raise ValueError(
                    f"sampler steps={self.steps} is fewer than the {blocks} blocks of block_length={block_length} "
                    f"in length {length}, and every block needs a step: set sampling.steps >= {blocks} or a "
                    f"larger sampler.block_length (or sampler.threshold)."
                )
            x, nfe = self._fixed(denoiser, x, block_of, blocks, generator, progress)
        else:
            x, nfe = self._thresholded(denoiser, x, block_of, blocks, generator, progress)
        if self.noise_removal and (x == self.mask_index).any():
            x = self._remove_noise(self._call(denoiser, x, self._time_grid(x.device)[-1]), x, generator)
            nfe += 1
        return SampleOutput(tokens=x, nfe=nfe)

    def _fixed(self, denoiser: Denoiser, x: Tensor, block_of: Tensor, blocks: int,
               generator: torch.Generator | None, progress: bool) -> tuple[Tensor, int]:
        """LLaDA's schedule: each block finished in its share of the steps, k per row and step."""
        times = self._time_grid(x.device)
        per_block = [self.steps // blocks + (b < self.steps % blocks) for b in range(blocks)]
        schedule = [(b, j, n) for b, n in enumerate(per_block) for j in range(n)]  # (block, step in it, its steps)
        nfe = 0
        for i in self._progress(progress):
            block, j, n = schedule[i]
            candidates = (x == self.mask_index) & (block_of == block)  # (B, L)
            if j == 0:
                count = candidates.sum(-1)  # (B,) masks of each row in the block at its start
            k = count // n + (j < count % n)  # (B,)
            if not k.any():
                continue
            log_p = self._call(denoiser, x, times[i])  # (B, L, V)
            nfe += 1
            tokens, confidence = self._propose(log_p, x, candidates, generator)
            commit = candidates & (ranks(confidence) < k[:, None])
            x = torch.where(commit, tokens, x)
        return x, nfe

    def _thresholded(self, denoiser: Denoiser, x: Tensor, block_of: Tensor, blocks: int,
                     generator: torch.Generator | None, progress: bool) -> tuple[Tensor, int]:
        """Fast-dLLM's rule: the top-1 plus every position at or above the threshold, until none is masked."""
        start = (x == self.mask_index).sum()
        nfe = 0
        # At most L steps: every step commits at least one position of each unfinished row.
        for _ in tqdm(range(x.shape[1]), desc=f"sampling ({self.name})", disable=not progress):
            masked = x == self.mask_index  # (B, L)
            if not masked.any():
                break
            current = torch.where(masked, block_of, blocks).amin(-1)  # (B,) first block with a mask
            candidates = masked & (block_of == current[:, None])  # (B, L)
            log_p = self._call(denoiser, x, self._time_left(masked.sum() / start))  # (B, L, V)
            nfe += 1
            tokens, confidence = self._propose(log_p, x, candidates, generator)
            commit = candidates & ((ranks(confidence) == 0) | (confidence >= self.threshold))
            x = torch.where(commit, tokens, x)
        return x, nfe

    def _time_left(self, fraction: Tensor) -> Tensor:
        """0-dim float64 time at which the move chance is ``fraction * m(1)``, clipped to [eps, 1]."""
        one = torch.ones((), dtype=torch.float64, device=fraction.device)
        t = self.noise.inverse_move_chance(self.noise.move_chance(one) * fraction.to(torch.float64))
        return t.clamp(self.eps, 1.0)

    def _propose(self, log_p: Tensor, x: Tensor, candidates: Tensor,
                 generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Proposals and their confidences at the candidate positions (B, L).

        Returns:
            tokens (B, L): ``x`` with each candidate replaced by its proposal;
            confidence (B, L) in ``self.dtype``: the model's probability of the proposal (or a
            uniform number for random remasking) at candidates, -inf elsewhere.
        """
        rows, cols = candidates.nonzero(as_tuple=True)  # N candidates, row-major
        proposal = self._draw(log_p[rows, cols], generator)  # (N,)
        if self.remasking == "low_confidence":
            scores = log_p[rows, cols, proposal].to(self.dtype).exp()  # (N,)
        else:
            scores = torch.rand(rows.shape, dtype=self.dtype, device=x.device, generator=generator)
        tokens = x.clone()
        tokens[rows, cols] = proposal
        confidence = torch.full(x.shape, -torch.inf, dtype=self.dtype, device=x.device)
        confidence[rows, cols] = scores
        return tokens, confidence

    def _draw(self, log_p: Tensor, generator: torch.Generator | None) -> Tensor:
        """(N, V) log p_theta rows (a fresh tensor) -> (N,) tokens: the argmax (mask excluded) at temperature 0,
        the limit of ``p^(1/T)`` (a nucleus always keeps it); otherwise :meth:`DiffusionSampler._draw`."""
        return super()._draw(log_p, generator) if self.temperature > 0.0 else self._greedy(log_p)
