"""Discrete consistency distillation of DUO (Sahoo et al., ICML 2025, Alg. 1): few-step uniform-state samplers.

**Trajectories.** One noise ``ε ~ N(0, I_V)`` per token is shared by two times s < t of the Gaussian
diffusion on the band of :class:`uniform_diffusion.DUO` (``ã² = sigmoid(-gamma)``, ``gamma = gamma_min +
t (gamma_max - gamma_min)``); the discrete latents are its argmax,

    x_t = argmax(ã_t e_x0 + sqrt(1 - ã_t²) ε),    x_s = argmax(ã_s e_x0 + sqrt(1 - ã_s²) ε),

a deterministic function of (x0, ε) at every time (the DDIM-like ODE trajectory of the Gaussian side),
and a uniform-state latent with ``alpha = T(ã)`` at each time (:mod:`duality`). The argmax depends on ε only
through ε at x0, the largest ε over the other real tokens and where it is (:class:`SharedNoise`):
``x = x0`` if ``ã + sqrt(1 - ã²) ε_x0 > sqrt(1 - ã²) max_{v != x0} ε_v``, else the argmax of the others. So
the latents are drawn exactly without the (B, L, V) tensor: the maximum of K - 1 standard normals by
inversion (``Φ^{-1}(U^{1/(K-1)})``) and its position uniformly among the other real tokens.

**Loss.** The student at t is pulled towards the frozen teacher at ``s = t - δ`` (both conditioned on
``sigma = -log T(ã)``, x_theta as in :mod:`uniform_diffusion`), per token

    kl-bwd (default):  KL(x_theta^student(x_t, t) || x_theta^teacher(x_s, s))
    kl-fwd:            KL(x_theta^teacher(x_s, s) || x_theta^student(x_t, t))

with ``t ~ U[eps, 1] + δ`` clipped to 1 (the reference's ``Distillation.nll``).

**Rounds.** The teacher is a frozen copy of the starting weights (``training.from_pretrained``: a DUO
checkpoint's EMA weights); every ``update_teacher_every`` steps it is replaced by the student's current
weights and ``δ = 2^n / T`` doubles (round ``n = step // update_teacher_every``). The teacher runs in eval
mode (no dropout; the reference's copy keeps the student's training mode). It is saved in checkpoints
(``get_extra_state``: its weights and round), so a resumed run continues with the very same teacher.
Evaluation (validation, ``ppl_eval``) is UDLM's NELBO of the student, and sampling is DUO's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from algorithms import Draws, LossOutput
from noise_schedule import NoiseSchedule
from uniform_diffusion import DUO, backbone_vocab_size, udlm_log_probs

LOSS_TYPES = ("kl-bwd", "kl-fwd")


# --------------------------------------------------------------------------- shared-noise trajectories
@dataclass(frozen=True)
class SharedNoise:
    """What ``argmax(ã e_x0 + sqrt(1 - ã²) ε)`` needs of ε (B, L, V), for every ã at once. Each (B, L)."""

    own: Tensor        # ε at x0, float64
    top: Tensor        # the largest ε over the other real tokens (not x0, not the mask), float64
    top_index: Tensor  # where it is, long

    @classmethod
    def from_epsilon(cls, epsilon: Tensor, x0: Tensor, mask_index: int) -> SharedNoise:
        """From a whole ε (B, L, V) (for tests and references)."""
        others = epsilon.double().scatter(-1, x0[..., None], -torch.inf)
        others[..., mask_index] = -torch.inf
        top, top_index = others.max(-1)
        return cls(own=epsilon.double().gather(-1, x0[..., None]).squeeze(-1), top=top, top_index=top_index)

    @classmethod
    def draw(cls, x0: Tensor, vocab_size: int, mask_index: int,
             generator: torch.Generator | None = None) -> SharedNoise:
        """The exact law of :meth:`from_epsilon` of ``ε ~ N(0, I_V)``, without drawing ε.

        The K - 1 = V - 2 other real coordinates are i.i.d. normal: their maximum has distribution function
        ``Φ(m)^{K-1}``, drawn as ``m = -Φ^{-1}(-expm1(log(U) / (K - 1)))`` (accurate for K = 50k), and its
        position is uniform over them and independent of it.
        """
        shape, device = tuple(x0.shape), x0.device
        own = torch.randn(shape, dtype=torch.float64, device=device, generator=generator)
        u = torch.rand(shape, dtype=torch.float64, device=device, generator=generator)
        top = -torch.special.ndtri(-torch.expm1(torch.log(u) / (vocab_size - 2)))
        r = torch.randint(vocab_size - 2, shape, device=device, generator=generator)
        low, high = x0.clamp(max=mask_index), x0.clamp(min=mask_index)  # the two excluded ids, in increasing order
        r = r + (r >= low).long()
        return cls(own=own, top=top, top_index=r + (r >= high).long())

    def tokens(self, x0: Tensor, a_tilde: Tensor) -> Tensor:
        """``argmax(ã e_x0 + sqrt(1 - ã²) ε)`` (B, L) at ``a_tilde`` (B,) in [0, 1]."""
        a = a_tilde.double()[:, None]                                 # (B, 1)
        scale = torch.sqrt((1 - a) * (1 + a))
        return torch.where(a + scale * self.own > scale * self.top, x0, self.top_index)


def distillation_divergence(log_student: Tensor, log_teacher: Tensor, loss_type: str) -> Tensor:
    """Per-token KL (B, L) between x_theta's (B, L, V) log-probabilities (the mask's at ``NEG_INF`` in both).

    ``kl-bwd``: ``sum_v p_S (log p_S - log p_T)``; ``kl-fwd``: ``sum_v p_T (log p_T - log p_S)``.
    """
    if loss_type == "kl-bwd":
        return (log_student.exp() * (log_student - log_teacher)).sum(-1)
    if loss_type == "kl-fwd":
        return (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    raise ValueError(f"loss_type={loss_type!r}; valid: {LOSS_TYPES}.")


# --------------------------------------------------------------------------- the algorithm
class DUODistill(DUO):
    """Discrete consistency distillation of a DUO model (module docstring); train it from a DUO checkpoint.

    Args:
        noise, mask_index, sampling_eps, antithetic_sampling: as :class:`uniform_diffusion.DUO` (the noise
            schedule of evaluation and sampling).
        gamma_min, gamma_max: the band of the trajectories (the reference's distillation: -4, -1).
        loss_type: ``kl-bwd`` (the reference's default) or ``kl-fwd``.
        T: ``δ = 2^n / T`` in round n (the reference's ``algo.T``; its OWT script: 512).
        update_teacher_every: steps per round; the teacher becomes the student at each round's first step.
    """

    name = "duo_distill"
    parameterization = "duo"
    needs_pretrained = True  # the teacher is the starting model

    def __init__(self, noise: NoiseSchedule, mask_index: int, sampling_eps: float = 1e-3,
                 antithetic_sampling: bool = True, gamma_min: float = -4.0, gamma_max: float = -1.0,
                 loss_type: str = "kl-bwd", T: int = 64, update_teacher_every: int = 10_000) -> None:
        super().__init__(noise, mask_index, sampling_eps, antithetic_sampling, gamma_min, gamma_max,
                         curriculum_start=0, curriculum_end=0)
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"algorithm.loss_type={loss_type!r} is not one of {LOSS_TYPES} (the reference also "
                             "lists 'posterior', which its code does not implement).")
        for name, value in (("T", T), ("update_teacher_every", update_teacher_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"algorithm.{name} must be an integer >= 1, got {value!r}.")
        self.loss_type = loss_type
        self.T = int(T)
        self.update_teacher_every = int(update_teacher_every)
        # The teacher: not a registered submodule (not trained, not in the EMA, not moved with the module; it is
        # made on the backbone's device). Saved and restored through get_extra_state / set_extra_state.
        self.__dict__["_teacher"] = None
        self._teacher_round = -1
        self._pending: dict[str, Any] | None = None  # a restored teacher, until the backbone is seen

    # ----------------------------------------------------------------- rounds
    def round(self, step: int) -> int:
        """The round of a training step: ``step // update_teacher_every``."""
        return step // self.update_teacher_every

    def delta(self, step: int) -> float:
        """``δ = 2^n / T`` at a training step of round n."""
        return 2.0 ** self.round(step) / self.T

    def on_train_batch_start(self, step: int) -> dict[str, float]:
        """Record the step; log ``distill_delta`` and ``distill_round``."""
        self.step = int(step)
        return {"distill_delta": self.delta(self.step), "distill_round": float(self.round(self.step))}

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (None before the first training step)."""
        return self._teacher

    def teacher_for(self, backbone: nn.Module) -> nn.Module:
        """The teacher of the current round: made from ``backbone`` at the first training step (or from the
        restored checkpoint), and loaded with the backbone's weights at each round's first step."""
        if self._teacher is None:
            teacher = copy.deepcopy(backbone).eval().requires_grad_(False)
            for param in teacher.parameters():
                param.grad = None
            self.__dict__["_teacher"] = teacher
            if self._pending is not None:
                teacher.load_state_dict(self._pending["weights"])
                self._teacher_round, self._pending = int(self._pending["round"]), None
        current = self.round(self.step)
        if self._teacher_round != current:
            self._teacher.load_state_dict(backbone.state_dict())
            self._teacher_round = current
        return self._teacher

    def get_extra_state(self) -> dict[str, Any]:
        """The teacher's round and weights (in the checkpoint's state dict, under ``algorithm._extra_state``)."""
        if self._teacher is not None:
            return {"round": self._teacher_round, "weights": self._teacher.state_dict()}
        if self._pending is not None:
            return self._pending
        return {"round": -1}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if "weights" not in state:  # saved before the first training step: a fresh teacher
            self.__dict__["_teacher"], self._teacher_round, self._pending = None, -1, None
        elif self._teacher is not None:
            self._teacher.load_state_dict(state["weights"])
            self._teacher_round = int(state["round"])
        else:
            self._pending = state

    # ----------------------------------------------------------------- loss
    def distill_nll(self, student: Any, teacher: Any, x0: Tensor, t: Tensor, s: Tensor,
                    noise: SharedNoise | None = None, generator: torch.Generator | None = None) -> Tensor:
        """The per-token divergence (B, L) between the student at (x_t, t) and the teacher at (x_s, s).

        t, s (B,) band times (s < t); ``noise``: the shared ε (drawn with ``generator`` when None).
        """
        vocab_size = backbone_vocab_size(student)
        sigma_t, _, a_t, _ = self.band_noise(t, vocab_size - 1)
        sigma_s, _, a_s, _ = self.band_noise(s, vocab_size - 1)
        if noise is None:
            noise = SharedNoise.draw(x0, vocab_size, self.mask_index, generator)
        log_student = udlm_log_probs(student(noise.tokens(x0, a_t), sigma_t.float()), self.mask_index)
        with torch.no_grad():
            log_teacher = udlm_log_probs(teacher(noise.tokens(x0, a_s), sigma_s.float()), self.mask_index)
        return distillation_divergence(log_student, log_teacher, self.loss_type)

    def loss(self, backbone: nn.Module, x0: Tensor, attention_mask: Tensor, padded: bool | None = None,
             draws: Draws | None = None) -> LossOutput:
        """Training: :meth:`distill_nll` at ``t = min(t' + δ, 1)``, ``s = t - δ`` (given ``draws`` fix t' only);
        evaluation (backbone in eval mode): the student's NELBO."""
        if not backbone.training:
            return self.nelbo(backbone, x0, attention_mask, padded, draws)
        teacher = self.with_padding_mask(self.teacher_for(backbone), attention_mask, padded)
        student = self.with_padding_mask(backbone, attention_mask, padded)
        delta = self.delta(self.step)
        t = self.sample_t(x0.shape[0], x0.device, u=None if draws is None else draws.time).double()
        t = (t + delta).clamp(max=1.0)
        nll = self.distill_nll(student, teacher, x0, t, t - delta)
        return LossOutput(nll=nll * attention_mask, mask=attention_mask, tokens=x0)
