"""DUO's curriculum (uniform_diffusion.DUO): soft inputs to the DiT, the temperature schedule, the loss
against a slow reference with fixed draws, the switch to discrete inputs, and the logged keys from the CLI.

During the first ``curriculum_end`` steps the network is fed ``softmax(w_t / τ)`` of the Gaussian latent
``w_t = ã_t e_x0 + sqrt(1 - ã_t²) ε`` (``ã_t`` on the band) and scored at ``x_t = argmax(w_t)``; from
``curriculum_end`` on (and in evaluation) it is UDLM's NELBO with discrete inputs.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_main_e2e import TINY, run_main
from test_uniform_diffusion import scipy_alpha, slow_udlm
from torch import Tensor, nn

from algorithms import Draws
from models.dit import DiT
from noise_schedule import LogLinear
from uniform_diffusion import DUO

V, MASK = 9, 4                                                     # 8 real tokens, the mask id in the middle
REAL = torch.tensor([v for v in range(V) if v != MASK])


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


def tiny_dit(vocab: int = 11) -> DiT:
    torch.manual_seed(0)
    dit = DiT(vocab, hidden_size=32, cond_dim=16, n_blocks=2, n_heads=2, dropout=0.0)
    for p in dit.parameters():  # adaLN-zero starts with zero outputs: give every layer a say
        nn.init.normal_(p, std=0.3)
    return dit.eval()


# --------------------------------------------------------------------------- soft inputs to the DiT
def test_one_hot_soft_inputs_give_exactly_the_discrete_logits() -> None:
    dit = tiny_dit()
    g = torch.Generator().manual_seed(1)
    indices = torch.randint(11, (3, 7), generator=g)
    sigma = torch.rand(3, generator=g)
    one_hot = F.one_hot(indices, 11).float()
    placeholder = torch.zeros_like(indices)  # the soft inputs alone say which tokens these are
    assert torch.equal(dit(placeholder, sigma, soft_inputs=one_hot), dit(indices, sigma))
    padding = torch.ones(3, 7, dtype=torch.long)
    padding[1, 5:] = 0
    rows = torch.rand(3, 7, generator=g) < 0.5
    assert torch.equal(dit(placeholder, sigma, attention_mask=padding, output_mask=rows, soft_inputs=one_hot),
                       dit(indices, sigma, attention_mask=padding, output_mask=rows))


def test_soft_inputs_mix_the_embeddings_and_train_every_row() -> None:
    dit = tiny_dit()
    indices = torch.randint(11, (2, 5), generator=torch.Generator().manual_seed(2))
    soft = torch.softmax(torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(3)), -1)
    captured = {}

    def capture(module: nn.Module, args: tuple) -> None:
        captured.setdefault("x", args[0])  # the first block's input: the embedding

    dit.blocks[0].register_forward_pre_hook(capture)
    logits = dit(indices, torch.ones(2), soft_inputs=soft)
    torch.testing.assert_close(captured["x"], torch.einsum("blv,vd->bld", soft, dit.vocab_embed.embedding))
    assert not torch.allclose(logits, dit(indices, torch.ones(2)))
    logits.sum().backward()
    assert (dit.vocab_embed.embedding.grad.abs().sum(-1) > 0).all()  # every token has a positive weight
    with pytest.raises(ValueError, match="soft_inputs must be"):
        dit(indices, torch.ones(2), soft_inputs=soft[..., :10])


# --------------------------------------------------------------------------- the temperature schedule
def reference_tau(step: int, start: int, end: int, log10_start: float, log10_end: float) -> float:
    """The reference's ``1 / _compute_gumbel_tau_inverse()`` at ``global_step = step``."""
    if step < start:
        log10_tau = log10_start
    elif step < end:
        log10_tau = log10_start + (step - start) / (end - start) * (log10_end - log10_start)
    else:
        log10_tau = -10
    return 1 / 10 ** (-log10_tau)


def test_tau_schedule_and_logged_values() -> None:
    duo = DUO(LogLinear(), MASK, curriculum_start=10, curriculum_end=30, gumbel_tau_log10_start=-1.0,
              gumbel_tau_log10_end=-3.0)
    for step in (0, 9, 10, 11, 20, 29):
        expected = reference_tau(step, 10, 30, -1.0, -3.0)
        assert math.isclose(duo.tau(step), expected, rel_tol=1e-12), step
    assert math.isclose(duo.tau(20), 1e-2, rel_tol=1e-12) and math.isclose(duo.tau(29), 10**-2.9, rel_tol=1e-12)
    assert duo.tau(30) is None and duo.tau(10**7) is None  # discrete inputs from curriculum_end on
    assert duo.on_train_batch_start(20) == {"curriculum_on": 1.0, "curriculum_tau": duo.tau(20)} and duo.step == 20
    assert duo.on_train_batch_start(30) == {"curriculum_on": 0.0, "curriculum_tau": 0.0} and duo.step == 30
    default = DUO(LogLinear(), MASK)  # the reference's duo.yaml: 1e-1 up to 100K, 1e-2 at 200K, then discrete
    assert default.tau(0) == default.tau(100_000) == 0.1 and default.tau(199_999) < 0.0101
    assert default.tau(200_000) is None and DUO(LogLinear(), MASK, curriculum_end=0, curriculum_start=0).tau(0) is None
    with pytest.raises(ValueError, match="is after algorithm.curriculum_end"):
        DUO(LogLinear(), MASK, curriculum_start=5, curriculum_end=4)
    with pytest.raises(ValueError, match="step count >= 0"):
        DUO(LogLinear(), MASK, curriculum_end=-1)


# --------------------------------------------------------------------------- the curriculum's loss
class SoftNetwork(nn.Module):
    """A backbone whose logits are a fixed linear map of its (soft or one-hot) inputs plus a sigma term;
    records what it was given."""

    vocab_size = V

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.weight = 2 * torch.randn(V, V, generator=g, dtype=torch.float64)
        self.bias = torch.randn(V, generator=g, dtype=torch.float64)
        self.calls: list[dict[str, Tensor | None]] = []

    def logits(self, inputs: Tensor, sigma: Tensor) -> Tensor:
        return inputs.double() @ self.weight + sigma.double()[:, None, None] * self.bias

    def forward(self, xt: Tensor, sigma: Tensor, soft_inputs: Tensor | None = None, **kwargs: object) -> Tensor:
        self.calls.append({"xt": xt, "sigma": sigma, "soft_inputs": soft_inputs})
        inputs = F.one_hot(xt, V) if soft_inputs is None else soft_inputs
        return self.logits(inputs, sigma).float()


def band(t: float) -> tuple[float, float, float]:
    """(ã, sigma, dsigma/dt) at band time t of the default band [-3.5, -1.75], alpha by scipy, alpha' by
    central differences."""
    def alpha(time: float) -> float:
        return scipy_alpha(math.sqrt(1 / (1 + math.exp(-3.5 + time * 1.75))), V - 1)

    h = 1e-5
    a_tilde = math.sqrt(1 / (1 + math.exp(-3.5 + t * 1.75)))
    value = alpha(t)
    return a_tilde, -math.log(value), -(alpha(t + h) - alpha(t - h)) / (2 * h) / value


def test_curriculum_loss_matches_slow_reference() -> None:
    """The fast loss with ε from a seeded generator against a float64 loop with the same ε: x_t = argmax(w_t),
    the network fed softmax(w_t / τ), the NELBO integrand at alpha = T(ã_t) (scipy) with alpha' by differences."""
    g = torch.Generator().manual_seed(4)
    x0 = REAL[torch.randint(V - 1, (4, 5), generator=g)]
    t = torch.tensor([0.001, 0.3, 0.7, 1.0], dtype=torch.float64)
    tau = 0.05
    network = SoftNetwork()
    fast = DUO(LogLinear(), MASK).curriculum_nll(network, x0, t, tau, generator=torch.Generator().manual_seed(7))
    epsilon = torch.randn((*x0.shape, V), generator=torch.Generator().manual_seed(7)).double()  # the same draw
    rows = [band(x) for x in t.tolist()]
    a_tilde, sigma, dsigma = (torch.tensor(column, dtype=torch.float64) for column in zip(*rows, strict=True))
    soft = torch.zeros(*x0.shape, V, dtype=torch.float64)
    xt = torch.zeros_like(x0)
    for b in range(x0.shape[0]):
        for i in range(x0.shape[1]):
            a = float(a_tilde[b])
            w = [a * (v == int(x0[b, i])) + math.sqrt(1 - a * a) * float(epsilon[b, i, v]) for v in range(V)]
            w[MASK] = -math.inf
            xt[b, i] = max(range(V), key=lambda v: w[v])  # noqa: B023
            top = max(w)
            e = [math.exp((x - top) / tau) for x in w]
            soft[b, i] = torch.tensor(e, dtype=torch.float64) / sum(e)
    (call,) = network.calls
    assert torch.equal(call["xt"], xt)
    torch.testing.assert_close(call["soft_inputs"].double(), soft, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(call["sigma"].double(), sigma, rtol=1e-6, atol=0)
    slow = slow_udlm(network.logits(soft, sigma).float(), x0, xt, sigma, dsigma, MASK)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-4, atol=1e-6)


def test_switch_to_discrete_inputs_at_curriculum_end() -> None:
    """Steps < curriculum_end: soft inputs on the band; from curriculum_end on: discrete inputs and the
    NELBO under the noise schedule; in evaluation always the latter."""
    g = torch.Generator().manual_seed(6)
    x0 = REAL[torch.randint(V - 1, (4, 5), generator=g)]
    draws = Draws(time=torch.tensor([0.1, 0.4, 0.6, 0.9]), mask=torch.rand(x0.shape, generator=g))
    duo = DUO(LogLinear(), MASK, curriculum_start=0, curriculum_end=5)
    network = SoftNetwork().train()
    band_sigma = duo.band_noise(draws.time.double() * (1 - 1e-3) + 1e-3, V - 1)[0]
    schedule_sigma = LogLinear().total_noise(draws.time * (1 - 1e-3) + 1e-3)
    for step, soft in ((0, True), (4, True), (5, False), (6, False)):
        duo.on_train_batch_start(step)
        duo.loss(network, x0, torch.ones_like(x0), draws=draws)
        call = network.calls[-1]
        assert (call["soft_inputs"] is not None) == soft, step
        torch.testing.assert_close(call["sigma"].double(), band_sigma if soft else schedule_sigma.double(),
                                   rtol=1e-6, atol=0)
    duo.on_train_batch_start(0)
    network.eval()
    duo.loss(network, x0, torch.ones_like(x0), draws=draws)
    assert network.calls[-1]["soft_inputs"] is None


def test_curriculum_needs_a_backbone_with_soft_inputs() -> None:
    class Discrete(nn.Module):
        vocab_size = V

        def forward(self, xt: Tensor, sigma: Tensor) -> Tensor:
            return torch.zeros(*xt.shape, V)

    x0 = REAL[torch.zeros(2, 3, dtype=torch.long)]
    with pytest.raises(ValueError, match=r"does not take: use backbone=dit, or .*\(algorithm.curriculum_end=0\)"):
        DUO(LogLinear(), MASK).loss(Discrete().train(), x0, torch.ones_like(x0))


# --------------------------------------------------------------------------- the command line
def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    (metrics,) = (run_dir / "csv").glob("version_*/metrics.csv")
    with open(metrics) as f:
        return list(csv.DictReader(f))


def test_cli_logs_the_curriculum_and_switches(tmp_path: Path) -> None:
    run_main(tmp_path, "algorithm=duo", "algorithm.curriculum_start=0", "algorithm.curriculum_end=3",
             "algorithm.gumbel_tau_log10_end=-2", "trainer.max_steps=6", "trainer.log_every_n_steps=1",
             "trainer.val_check_interval=1000", "trainer.num_sanity_val_steps=0", "sampling.num_sample_log=0",
             "wandb.mode=disabled")
    logged = [(int(r["step"]), float(r["train/curriculum_on"]), float(r["train/curriculum_tau"]))
              for r in metrics_rows(tmp_path) if r.get("train/curriculum_on")]
    duo = DUO(LogLinear(), MASK, curriculum_start=0, curriculum_end=3, gumbel_tau_log10_end=-2.0)
    assert [(step, on) for step, on, _ in logged] == [(0, 1.0), (1, 1.0), (2, 1.0), (3, 0.0), (4, 0.0), (5, 0.0)]
    for step, _, tau in logged:
        assert math.isclose(tau, duo.tau(step) or 0.0, rel_tol=1e-6), step
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["config"]["algorithm"]["curriculum_end"] == 3


RESUME = [*TINY, "algorithm=duo", "algorithm.curriculum_start=0", "algorithm.curriculum_end=5",
          "data.num_train_sequences=48", "callbacks.checkpoint_every_n_steps.every_n_train_steps=1",
          "trainer.val_check_interval=1000", "sampling.num_sample_log=0", "wandb.mode=disabled"]


@pytest.mark.slow
def test_resume_across_the_switch_is_exact(tmp_path: Path) -> None:
    """Stopped at step 3 inside the curriculum and resumed to 7 (the switch at 5): the weights, EMA and optimizer
    state equal the uninterrupted run's bit for bit (the step comes from the restored global_step)."""
    from test_resume import assert_same_training_state, final_state

    run_main(tmp_path / "straight", *RESUME, "trainer.max_steps=7", base=[])
    run_main(tmp_path / "resumed", *RESUME, "trainer.max_steps=3", base=[])
    proc = run_main(tmp_path / "resumed", *RESUME, "trainer.max_steps=7", base=[])
    assert "Resuming from" in proc.stdout
    assert_same_training_state(final_state(tmp_path / "straight"), final_state(tmp_path / "resumed"))
