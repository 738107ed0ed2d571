"""Discrete consistency distillation (distillation.py): shared-noise trajectories, the loss against a slow
reference, the rounds (δ doubling, the teacher renewed), the teacher in checkpoints, and the command line
from a DUO checkpoint to an 8-step sampler.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from hydra import compose, initialize_config_dir
from scipy import stats
from test_main_e2e import TINY, run_main
from test_uniform_diffusion import scipy_alpha
from torch import Tensor, nn

import main
from algorithms import Draws
from distillation import DUODistill, SharedNoise, distillation_divergence
from duality import duality
from models.dit import DiT
from noise_schedule import LogLinear

V, MASK = 9, 4                                                     # 8 real tokens, the mask id in the middle
REAL = torch.tensor([v for v in range(V) if v != MASK])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


def full_argmax(x0: Tensor, a_tilde: Tensor, epsilon: Tensor) -> Tensor:
    """``argmax(ã e_x0 + sqrt(1 - ã²) ε)`` over the real tokens, from the whole ε (B, L, V), float64."""
    a = a_tilde.double()[:, None, None]
    w = a * F.one_hot(x0, epsilon.shape[-1]).double() + torch.sqrt(1 - a * a) * epsilon.double()
    w[..., MASK] = -torch.inf
    return w.argmax(-1)


# --------------------------------------------------------------------------- trajectories
def test_trajectory_is_the_argmax_of_one_shared_noise() -> None:
    """Given ε, x_t and x_s are the argmax of the two Gaussian latents with that same ε: deterministic, and coupled
    (once x_t is x0 so is every less noisy x_s; two corrupted tokens are the same token)."""
    g = torch.Generator().manual_seed(0)
    x0 = REAL[torch.randint(V - 1, (64, 32), generator=g)]
    epsilon = torch.randn(64, 32, V, generator=g)
    noise = SharedNoise.from_epsilon(epsilon, x0, MASK)
    a_t, a_s = torch.rand(64, generator=g) * 0.6, torch.rand(64, generator=g) * 0.3 + 0.6   # ã_s > ã_t: s < t
    x_t, x_s = noise.tokens(x0, a_t), noise.tokens(x0, a_s)
    assert torch.equal(x_t, full_argmax(x0, a_t, epsilon)) and torch.equal(x_s, full_argmax(x0, a_s, epsilon))
    assert torch.equal(noise.tokens(x0, a_t), x_t)
    assert ((x_t != x0) | (x_s == x0)).all()                         # x_t = x0 => x_s = x0
    both = (x_t != x0) & (x_s != x0)
    assert both.any() and torch.equal(x_t[both], x_s[both])
    assert ((x_t == x0) & (x_s == x0)).any() and ((x_t != x0) & (x_s == x0)).any()
    assert torch.equal(noise.tokens(x0, torch.ones(64)), x0) and not (x_t == MASK).any()


def test_drawn_noise_has_the_law_of_the_whole_vector() -> None:
    """SharedNoise.draw (no (B, L, V) tensor) against ε drawn whole, K = 100: the largest other coordinate
    (Kolmogorov-Smirnov against Φ(m)^{K-1}), its position (uniform over the K - 1 other real tokens), and the
    joint law of (x_t = x0, x_s = x0) at two noise levels (chi-square against whole vectors)."""
    vocab, mask, n = 101, 50, 40_000
    x0 = torch.randint(vocab - 1, (n, 1), generator=torch.Generator().manual_seed(1))
    x0 = x0 + (x0 >= mask).long()
    drawn = SharedNoise.draw(x0, vocab, mask, torch.Generator().manual_seed(2))
    assert stats.kstest(drawn.top.flatten().numpy(), lambda m: stats.norm.cdf(m) ** (vocab - 2)).pvalue > 1e-3
    index = drawn.top_index.flatten()
    assert not ((index == mask) | (index == x0.flatten())).any()
    real_index = index - (index > mask).long()                       # ids among the K real tokens
    real_x0 = x0.flatten() - (x0.flatten() > mask).long()
    rank = real_index - (real_index > real_x0).long()                # rank among the K - 1 others
    counts = torch.bincount(rank, minlength=vocab - 2)
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3
    a = torch.tensor([0.35, 0.55], dtype=torch.float64)

    def cells(noise: SharedNoise, x: Tensor) -> Tensor:
        kept_t = noise.tokens(x, a[:1].expand(x.shape[0])) == x
        kept_s = noise.tokens(x, a[1:].expand(x.shape[0])) == x
        return torch.bincount((2 * kept_t + kept_s).flatten(), minlength=4)

    whole = SharedNoise.from_epsilon(torch.randn(n, 1, vocab, generator=torch.Generator().manual_seed(3)), x0, mask)
    table = torch.stack([cells(drawn, x0), cells(whole, x0)]).numpy()
    assert table[:, 2].sum() == 0                                    # x_t = x0 and x_s != x0 never happens
    assert stats.chi2_contingency(table[:, [0, 1, 3]]).pvalue > 1e-3
    kept = cells(drawn, x0)[[1, 3]].sum() / n                        # P(x_s = x0) = T(ã_s) + (1 - T) / K
    alpha = float(duality(a[1:], vocab - 1).alpha)
    p = alpha + (1 - alpha) / (vocab - 1)
    assert abs(kept - p) < 5 * math.sqrt(p * (1 - p) / n)


# --------------------------------------------------------------------------- the loss
class TokenNetwork(nn.Module):
    """Logits from a fixed table of the input tokens plus a sigma term; records its calls."""

    vocab_size = V

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = 2 * torch.randn(V, V, generator=g, dtype=torch.float64)
        self.bias = torch.randn(V, generator=g, dtype=torch.float64)
        self.calls: list[tuple[Tensor, Tensor]] = []

    def logits(self, xt: Tensor, sigma: Tensor) -> Tensor:
        return self.table[xt] + sigma.double()[:, None, None] * self.bias

    def forward(self, xt: Tensor, sigma: Tensor, **kwargs: object) -> Tensor:
        self.calls.append((xt, sigma))
        return self.logits(xt, sigma).float()


def band_a_tilde(t: float) -> float:
    """ã at band time t of the distillation band [-4, -1]."""
    return math.sqrt(1 / (1 + math.exp(-4.0 + 3.0 * t)))


def slow_kl(student: list[float], teacher: list[float], loss_type: str) -> float:
    """KL between the softmaxes over the real tokens of two logit rows, float64."""
    def probs(row: list[float]) -> list[float]:
        real = [x for v, x in enumerate(row) if v != MASK]
        top = max(real)
        z = sum(math.exp(x - top) for x in real)
        return [0.0 if v == MASK else math.exp(x - top) / z for v, x in enumerate(row)]

    p, q = probs(student), probs(teacher)
    if loss_type == "kl-fwd":
        p, q = q, p
    return sum(pv * math.log(pv / qv) for pv, qv in zip(p, q, strict=True) if pv > 0)


@pytest.mark.parametrize("loss_type", ["kl-bwd", "kl-fwd"])
def test_distillation_loss_matches_slow_reference(loss_type: str) -> None:
    """Student at (x_t, sigma_t), teacher at (x_s, sigma_s), x from the whole ε, sigma = -log T(ã) by scipy."""
    g = torch.Generator().manual_seed(4)
    x0 = REAL[torch.randint(V - 1, (4, 6), generator=g)]
    epsilon = torch.randn(4, 6, V, generator=g)
    t = torch.tensor([0.05, 0.3, 0.7, 1.0], dtype=torch.float64)
    s = t - torch.tensor([0.05, 0.1, 0.2, 0.4], dtype=torch.float64)
    student, teacher = TokenNetwork(5), TokenNetwork(6)
    algorithm = DUODistill(LogLinear(), MASK, loss_type=loss_type)
    fast = algorithm.distill_nll(student, teacher, x0, t, s, noise=SharedNoise.from_epsilon(epsilon, x0, MASK))
    a_t = torch.tensor([band_a_tilde(x) for x in t.tolist()], dtype=torch.float64)
    a_s = torch.tensor([band_a_tilde(x) for x in s.tolist()], dtype=torch.float64)
    sigma_t = torch.tensor([-math.log(scipy_alpha(float(a), V - 1)) for a in a_t], dtype=torch.float64)
    sigma_s = torch.tensor([-math.log(scipy_alpha(float(a), V - 1)) for a in a_s], dtype=torch.float64)
    x_t, x_s = full_argmax(x0, a_t, epsilon), full_argmax(x0, a_s, epsilon)
    assert torch.equal(student.calls[0][0], x_t) and torch.equal(teacher.calls[0][0], x_s)
    torch.testing.assert_close(student.calls[0][1].double(), sigma_t, rtol=1e-6, atol=0)
    torch.testing.assert_close(teacher.calls[0][1].double(), sigma_s, rtol=1e-6, atol=0)
    logits_s, logits_t = student.logits(x_t, sigma_t).float().double(), teacher.logits(x_s, sigma_s).float().double()
    slow = torch.tensor([[slow_kl(logits_s[b, i].tolist(), logits_t[b, i].tolist(), loss_type) for i in range(6)]
                         for b in range(4)], dtype=torch.float64)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-4, atol=1e-6)
    assert (slow > 0).all()


def test_divergence_is_zero_for_equal_models_and_rejects_unknown_types() -> None:
    log_p = torch.randn(2, 3, V).log_softmax(-1)
    assert torch.equal(distillation_divergence(log_p, log_p, "kl-bwd"), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"valid: \('kl-bwd', 'kl-fwd'\)"):
        distillation_divergence(log_p, log_p, "posterior")
    with pytest.raises(ValueError, match="is not one of"):
        DUODistill(LogLinear(), MASK, loss_type="posterior")
    with pytest.raises(ValueError, match="integer >= 1"):
        DUODistill(LogLinear(), MASK, T=0)


# --------------------------------------------------------------------------- rounds and the teacher
def test_delta_doubles_at_round_boundaries() -> None:
    """δ = 2^n / T with n = step // update_teacher_every; the loss puts the student at t = min(t' + δ, 1) and
    the teacher at t - δ."""
    algorithm = DUODistill(LogLinear(), MASK, T=16, update_teacher_every=5)
    assert [algorithm.delta(step) for step in (0, 4, 5, 9, 10, 14, 15, 20)] == [
        1 / 16, 1 / 16, 2 / 16, 2 / 16, 4 / 16, 4 / 16, 8 / 16, 16 / 16]
    assert algorithm.on_train_batch_start(10) == {"distill_delta": 0.25, "distill_round": 2.0}
    x0 = REAL[torch.randint(V - 1, (4, 5), generator=torch.Generator().manual_seed(7))]
    draws = Draws(time=torch.tensor([0.0, 0.3, 0.6, 0.9]), mask=torch.zeros(4, 5))
    student = TokenNetwork(8).train()
    teacher = TokenNetwork(9)
    algorithm.__dict__["_teacher"], algorithm._teacher_round = teacher, 2  # the round's teacher, already made
    algorithm.loss(student, x0, torch.ones_like(x0), draws=draws)
    t = (draws.time.double() * (1 - 1e-3) + 1e-3 + 0.25).clamp(max=1.0)
    torch.testing.assert_close(student.calls[0][1].double(), algorithm.band_noise(t, V - 1)[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(teacher.calls[0][1].double(), algorithm.band_noise(t - 0.25, V - 1)[0],
                               rtol=1e-6, atol=0)


def micro_dit(seed: int) -> DiT:
    torch.manual_seed(seed)
    dit = DiT(V, hidden_size=16, cond_dim=8, n_blocks=1, n_heads=2, dropout=0.1)
    for p in dit.parameters():
        nn.init.normal_(p, std=0.3)
    return dit.train()


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_teacher_is_frozen_renewed_each_round_and_restored_from_the_state_dict() -> None:
    algorithm = DUODistill(LogLinear(), MASK, update_teacher_every=3)
    backbone = micro_dit(0)
    x0 = REAL[torch.randint(V - 1, (2, 5), generator=torch.Generator().manual_seed(8))]
    ones = torch.ones_like(x0)
    assert algorithm.teacher is None and algorithm.get_extra_state() == {"round": -1}
    algorithm.on_train_batch_start(0)
    algorithm.loss(backbone, x0, ones)
    start = {k: v.clone() for k, v in backbone.state_dict().items()}
    teacher = algorithm.teacher
    assert same_weights(teacher, backbone) and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(p is q for p in algorithm.parameters() for q in teacher.parameters())  # not trained, not in EMA
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.1)                                              # an optimizer step
    algorithm.on_train_batch_start(2)
    algorithm.loss(backbone, x0, ones)
    assert all(torch.equal(teacher.state_dict()[k], start[k]) for k in start)   # same round: the start weights
    saved = copy.deepcopy(algorithm.state_dict())                    # as a checkpoint written now holds it
    algorithm.on_train_batch_start(3)
    algorithm.loss(backbone, x0, ones)
    assert algorithm.teacher is teacher and same_weights(teacher, backbone)      # round 1: the student's weights

    restored = DUODistill(LogLinear(), MASK, update_teacher_every=3)
    restored.load_state_dict(saved)                                  # a resumed run (round 0, at step 2)
    assert restored.get_extra_state()["round"] == 0
    restored.on_train_batch_start(2)
    other = micro_dit(1)
    restored.loss(other, x0, ones)
    assert all(torch.equal(restored.teacher.state_dict()[k], start[k]) for k in start)
    restored.on_train_batch_start(3)
    restored.loss(other, x0, ones)
    assert same_weights(restored.teacher, other)


# --------------------------------------------------------------------------- the command line
def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    (metrics,) = (run_dir / "csv").glob("version_*/metrics.csv")
    with open(metrics) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def duo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DUO trained for 8 steps (curriculum for the first 4) through the CLI."""
    run_dir = tmp_path_factory.mktemp("duo")
    run_main(run_dir, "algorithm=duo", "algorithm.curriculum_start=0", "algorithm.curriculum_end=4",
             "trainer.max_steps=8", "trainer.num_sanity_val_steps=0", "trainer.val_check_interval=8",
             "sampling.num_sample_log=0", "wandb.mode=disabled")
    return run_dir / "checkpoints" / "last.ckpt"


def test_cli_distills_a_duo_checkpoint_into_an_8_step_sampler(duo_checkpoint: Path, tmp_path: Path) -> None:
    proc = run_main(tmp_path / "distill", "algorithm=duo_distill", f"training.from_pretrained={duo_checkpoint}",
                    "algorithm.T=8", "algorithm.update_teacher_every=2", "trainer.max_steps=4",
                    "trainer.val_check_interval=4", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
                    "sampling.num_sample_log=0", "wandb.mode=disabled")
    assert "Starting from the EMA weights" in proc.stdout
    logged = [(int(r["step"]), float(r["train/distill_delta"]), float(r["train/distill_round"]))
              for r in metrics_rows(tmp_path / "distill") if r.get("train/distill_delta")]
    assert logged == [(0, 1 / 8, 0.0), (1, 1 / 8, 0.0), (2, 2 / 8, 1.0), (3, 2 / 8, 1.0)]
    checkpoint = tmp_path / "distill" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    teacher = state["state_dict"]["algorithm._extra_state"]
    assert state["global_step"] == 4 and teacher["round"] == 1
    assert set(teacher["weights"]) == {k.removeprefix("backbone.") for k in state["state_dict"]
                                       if k.startswith("backbone.")}
    run_main(tmp_path / "sample", "mode=sample_eval", f"eval.checkpoint_path={checkpoint}", "sampling.steps=8",
             "sampling.num_sample_batches=1", "loader.eval_global_batch_size=3", "wandb.mode=disabled")
    records = [json.loads(line) for line in (tmp_path / "sample" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["sampler"] == "uniform_ancestral" and r["steps"] == 8 and r["nfe"] == 9
                                     for r in records)


RESUME = [*TINY, "algorithm=duo_distill", "algorithm.T=8", "algorithm.update_teacher_every=3",
          "data.num_train_sequences=48", "callbacks.checkpoint_every_n_steps.every_n_train_steps=1",
          "trainer.val_check_interval=1000", "sampling.num_sample_log=0", "wandb.mode=disabled"]


def assert_same_state(a: dict, b: dict) -> None:
    """Weights, the teacher's round and weights, the EMA and the optimizer state, bit for bit."""
    assert a["global_step"] == b["global_step"]
    for key, value in a["state_dict"].items():
        if key == "algorithm._extra_state":
            assert value["round"] == b["state_dict"][key]["round"]
            for name, tensor in value["weights"].items():
                assert torch.equal(tensor, b["state_dict"][key]["weights"][name]), name
        else:
            assert torch.equal(value, b["state_dict"][key]), key
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"], strict=True):
        assert torch.equal(x, y)
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(),
                      strict=True):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


@pytest.mark.slow
def test_resumed_distillation_keeps_its_teacher(duo_checkpoint: Path, tmp_path: Path) -> None:
    """Stopped at step 5 (round 1, whose teacher is the student of step 3) and resumed to 8: everything equals the
    uninterrupted run's; a resume that lost the teacher (rebuilt from the student of step 5) would differ."""
    start = f"training.from_pretrained={duo_checkpoint}"
    run_main(tmp_path / "straight", *RESUME, start, "trainer.max_steps=8", base=[])
    run_main(tmp_path / "resumed", *RESUME, start, "trainer.max_steps=5", base=[])
    ckpt = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    stopped = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert stopped["global_step"] == 5 and stopped["state_dict"]["algorithm._extra_state"]["round"] == 1
    (tmp_path / "lost").mkdir()
    (tmp_path / "lost" / "checkpoints").mkdir()
    stopped["state_dict"]["algorithm._extra_state"] = {"round": -1}
    torch.save(stopped, tmp_path / "lost" / "checkpoints" / "last.ckpt")
    proc = run_main(tmp_path / "resumed", *RESUME, start, "trainer.max_steps=8", base=[])
    assert "Resuming from" in proc.stdout
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert_same_state(straight, torch.load(ckpt, map_location="cpu", weights_only=True))
    run_main(tmp_path / "lost", *RESUME, start, "trainer.max_steps=8", base=[])
    lost = torch.load(tmp_path / "lost" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    with pytest.raises(AssertionError):
        assert_same_state(straight, lost)


def test_distillation_without_a_teacher_is_refused_before_any_work(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=[*TINY, "algorithm=duo_distill", f"checkpointing.save_dir={tmp_path}"])
    refusal = r"algorithm=duo_distill starts from a trained model.*training.from_pretrained="
    with pytest.raises(ValueError, match=refusal):
        main.train(cfg, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing built or written
