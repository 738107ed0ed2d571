"""Tests for the DiMamba backbone: shapes, bidirectionality, the reference scan, conditioning,
padding, training under each loss, checkpoints, configs and an end-to-end CLI run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from test_configs import make_cfg
from test_main_e2e import TINY, run_main
from torch import Tensor

from algorithms import D3PM, MDLM, SEDD
from dataloader import SyntheticData, vocab_and_mask
from models.dimamba import (
    CONDITIONINGS,
    MAMBA_SSM_AVAILABLE,
    BiMambaMixer,
    DiMamba,
    causal_conv1d_silu,
    selective_scan,
    selective_scan_reference,
)
from noise_schedule import LogLinear

VOCAB, HIDDEN, COND, BLOCKS = 50, 32, 16, 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


def make_model(conditioning: str = "adaln", seed: int = 0, bidirectional: bool = True) -> DiMamba:
    """A tiny DiMamba in eval mode, with N(0, 0.1^2) noise added to every parameter except the SSM
    decay rates (``A_log``, ``dt_proj.bias``), so that the zero-initialised adaLN layers are active."""
    torch.manual_seed(seed)
    model = DiMamba(VOCAB, HIDDEN, COND, BLOCKS, dropout=0.0, conditioning=conditioning, bidirectional=bidirectional)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(("A_log", "dt_proj.bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def make_inputs(batch: int = 3, length: int = 12, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Random tokens (B, L) and noise levels sigma (B,) in [0.5, 3.5)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen), 0.5 + 3.0 * torch.rand(batch, generator=gen)


# --------------------------------------------------------------------------- shapes and options


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_output_shape(conditioning: str) -> None:
    model = make_model(conditioning)
    indices, sigma = make_inputs(batch=3, length=12)
    logits = model(indices, sigma)
    assert logits.shape == (3, 12, VOCAB) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    width = HIDDEN + COND if conditioning == "concat" else HIDDEN
    assert model.output_layer.linear.in_features == width


def test_invalid_options_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"Valid choices: \['adaln', 'concat', 'add'\]"):
        DiMamba(VOCAB, HIDDEN, COND, BLOCKS, conditioning="film")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="d_state must be positive"):
        DiMamba(VOCAB, HIDDEN, COND, BLOCKS, d_state=0)
    with pytest.raises(ValueError, match="dropout"):
        DiMamba(VOCAB, HIDDEN, COND, BLOCKS, dropout=1.0)
    with pytest.raises(ValueError, match="sigma must be"):
        DiMamba(VOCAB, HIDDEN, COND, BLOCKS)(torch.zeros(2, 5, dtype=torch.long), torch.zeros(3))


def test_reverse_direction_shares_only_the_projections() -> None:
    """Caduceus' weight tying: in_proj / out_proj are shared, each direction has its own SSM."""
    mixer = make_model().blocks[0].mixer
    names = {n for n, _ in mixer.named_parameters()}
    assert {"in_proj.weight", "out_proj.weight"} <= names
    for part in ("conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D"):
        assert f"forward_ssm.{part}" in names and f"reverse_ssm.{part}" in names
    assert not torch.equal(mixer.forward_ssm.x_proj.weight, mixer.reverse_ssm.x_proj.weight)


# --------------------------------------------------------------------------- bidirectionality


def changed_positions(model: DiMamba, j: int, length: int = 12) -> Tensor:
    """Max |change| of the logits (L,) at each position when token j is replaced."""
    indices, sigma = make_inputs(batch=2, length=length)
    other = indices.clone()
    other[:, j] = (indices[:, j] + 1) % VOCAB
    with torch.no_grad():
        return (model(indices, sigma) - model(other, sigma)).abs().amax(dim=(0, 2))  # (L,)


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_output_depends_on_tokens_on_both_sides(conditioning: str) -> None:
    j = 6
    change = changed_positions(make_model(conditioning), j)
    assert (change[:j] > 1e-4).all(), change  # earlier positions see token j (reverse scan)
    assert (change[j:] > 1e-4).all(), change  # later positions see it too (forward scan)


def test_forward_only_ablation_is_causal() -> None:
    """Without the reverse scan, positions before j cannot see token j: the test above can fail."""
    j = 6
    change = changed_positions(make_model(bidirectional=False), j)
    torch.testing.assert_close(change[:j], torch.zeros(j), rtol=0, atol=1e-6)
    assert (change[j:] > 1e-4).all(), change


# --------------------------------------------------------------------------- reference scan


def naive_selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor, delta_bias: Tensor
) -> Tensor:
    """The Mamba recurrence element by element in float64: for every state n,
    ``h[n] <- exp(d A[:, n]) h[n] + d B[n] u``, ``y = sum_n C[n] h[n] + D u``, ``out = y * z sigmoid(z)``,
    with ``d = log(1 + exp(delta + delta_bias))``."""
    u, delta, A, B, C, D, z, delta_bias = (t.double() for t in (u, delta, A, B, C, D, z, delta_bias))
    batch, channels, length = u.shape
    h = [torch.zeros(batch, channels, dtype=torch.float64) for _ in range(A.shape[1])]  # N states (B, E)
    out = []
    for t in range(length):
        d = torch.log1p(torch.exp(delta[:, :, t] + delta_bias))  # (B, E)
        y = D * u[:, :, t]
        for n in range(A.shape[1]):
            h[n] = torch.exp(d * A[:, n]) * h[n] + d * B[:, n, t, None] * u[:, :, t]
            y = y + C[:, n, t, None] * h[n]
        out.append(y * z[:, :, t] / (1 + torch.exp(-z[:, :, t])))
    return torch.stack(out, dim=-1)  # (B, E, L)


def test_reference_scan_matches_the_naive_recurrence() -> None:
    gen = torch.Generator().manual_seed(0)
    batch, channels, states, length = 2, 6, 4, 17
    u = torch.randn(batch, channels, length, generator=gen)
    delta = torch.randn(batch, channels, length, generator=gen)
    A = -torch.rand(channels, states, generator=gen) * 3
    B = torch.randn(batch, states, length, generator=gen)
    C = torch.randn(batch, states, length, generator=gen)
    D = torch.randn(channels, generator=gen)
    z = torch.randn(batch, channels, length, generator=gen)
    delta_bias = torch.randn(channels, generator=gen)
    inputs = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]
    out = selective_scan(*inputs, use_kernel=False)  # the reference, recomputed in the backward pass
    expected = naive_selective_scan(*inputs)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * weights.double()).sum(), inputs)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # still float32 inside
        torch.testing.assert_close(selective_scan_reference(u, delta, A, B, C, D, z, delta_bias), out)


def test_causal_conv_matches_the_naive_sum() -> None:
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 5, 9, generator=gen), torch.randn(5, 4, generator=gen), torch.randn(5)
    out = causal_conv1d_silu(x, weight, bias)
    expected = torch.empty_like(x)
    for t in range(9):
        acc = bias.expand(2, 5).clone()
        for k in range(4):
            if t - 3 + k >= 0:
                acc = acc + weight[:, k] * x[:, :, t - 3 + k]
        expected[:, :, t] = F.silu(acc)
    torch.testing.assert_close(out, expected)


# --------------------------------------------------------------------------- conditioning and padding


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_time_conditioning_changes_the_output(conditioning: str) -> None:
    model = make_model(conditioning)
    indices, sigma = make_inputs()
    with torch.no_grad():
        change = (model(indices, sigma) - model(indices, sigma + 2.0)).abs().max()
    assert change > 1e-3


def test_padding_does_not_change_the_logits_of_real_tokens() -> None:
    model = make_model()
    indices, sigma = make_inputs(batch=2, length=12)
    other = torch.randint(0, VOCAB, indices.shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for real in (slice(0, 8), slice(4, 12)):  # right padding, left padding
            mask = torch.zeros_like(indices)
            mask[:, real] = 1
            swapped = torch.where(mask.bool(), indices, other)  # other token ids at the padding
            logits = model(indices, sigma, attention_mask=mask)[:, real]
            torch.testing.assert_close(model(swapped, sigma, attention_mask=mask)[:, real], logits)
            torch.testing.assert_close(model(indices[:, real], sigma), logits)  # = padding cut off
            assert not torch.allclose(model(swapped, sigma)[:, real], logits)  # unmasked, padding leaks
        mask = torch.ones_like(indices)
        mask[:, 3:6] = 0  # padding inside: the padded token ids are still invisible
        swapped = torch.where(mask.bool(), indices, other)
        keep = mask.bool()
        torch.testing.assert_close(model(swapped, sigma, attention_mask=mask)[keep],
                                   model(indices, sigma, attention_mask=mask)[keep])


def test_bf16_autocast_runs_on_cpu() -> None:
    model = make_model("concat")
    indices, sigma = make_inputs()
    mask = torch.ones_like(indices)
    mask[0, -3:] = 0
    with torch.no_grad():
        reference = model(indices, sigma, attention_mask=mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(indices, sigma, attention_mask=mask)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits.float(), reference, rtol=0.1, atol=0.1)


# --------------------------------------------------------------------------- training


def test_a_few_training_steps_lower_the_loss() -> None:
    """MDLM (SUBS, log-linear schedule) on the built-in corpus, AdamW, fixed seeds."""
    data = SyntheticData(block_size=16, num_train_sequences=60 * 16, num_valid_sequences=8)
    vocab_size, mask_index = vocab_and_mask(data.tokenizer)
    blocks = data.train_dataset().blocks.long()  # (N, 16)
    torch.manual_seed(0)
    model = DiMamba(vocab_size, HIDDEN, COND, BLOCKS, dropout=0.0)
    algorithm = MDLM(LogLinear(), mask_index)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        x0 = blocks[16 * step : 16 * (step + 1)]  # (16, 16)
        out = algorithm.loss(model, x0, torch.ones_like(x0))
        loss = out.nll.sum() / out.mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.5, (first, last)


@pytest.mark.parametrize("parameterization", ["subs", "sedd", "d3pm"])
def test_loss_and_gradients_under_each_parameterization(parameterization: str) -> None:
    model = make_model().train()  # perturbed: with adaLN-zero gates the mixers would get no gradient yet
    cls = {"subs": MDLM, "sedd": SEDD, "d3pm": D3PM}[parameterization]
    extra = {"T": 1000} if parameterization == "d3pm" else {}
    algorithm = cls(LogLinear(), VOCAB - 1, time_conditioning=True, **extra)
    x0 = torch.randint(0, VOCAB - 1, (4, 12))
    mask = torch.ones_like(x0)
    mask[0, -3:] = 0  # one padded sequence: the masked path runs too
    out = algorithm.loss(model, x0, mask)
    loss = out.nll.sum() / out.mask.sum()
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.blocks[0].mixer.reverse_ssm.x_proj.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- checkpoints and configs


@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_state_dict_round_trip(tmp_path: Path, conditioning: str) -> None:
    model = make_model(conditioning)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    fresh = make_model(conditioning, seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    indices, sigma = make_inputs()
    with torch.no_grad():
        assert torch.equal(fresh(indices, sigma), model(indices, sigma))
    assert "vocab_embed.embedding" in model.state_dict()  # main.load_for_eval reads the vocabulary from it


@pytest.mark.parametrize("size,sizes", [("tiny-dimamba", (512, 128, 14)), ("small-dimamba", (768, 128, 22))])
def test_configs_compose_and_instantiate(tmp_path: Path, size: str, sizes: tuple[int, int, int]) -> None:
    cfg = make_cfg(tmp_path, ["backbone=dimamba", f"model={size}"])
    assert (cfg.model.hidden_size, cfg.model.cond_dim, cfg.model.n_blocks) == sizes
    with torch.device("meta"):  # no memory needed
        backbone = instantiate(cfg.backbone, vocab_size=50258)
    assert isinstance(backbone, DiMamba) and len(backbone.blocks) == sizes[2] and backbone.conditioning == "adaln"


def test_conditioning_is_chosen_in_the_config(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, ["backbone=dimamba", "model=tiny-dimamba", "model.conditioning=concat"])
    with torch.device("meta"):
        assert instantiate(cfg.backbone, vocab_size=100).output_layer.linear.in_features == 512 + 128
    cfg = make_cfg(tmp_path, ["backbone=dimamba", "model=tiny-dimamba", "model.conditioning=film"])
    with pytest.raises(Exception, match="Valid choices"), torch.device("meta"):
        instantiate(cfg.backbone, vocab_size=100)


def test_cli_trains_then_samples_from_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`main.py backbone=dimamba model=tiny-dimamba` (shrunk) trains; sample_eval rebuilds it from the checkpoint."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the subprocesses: see one_thread
    base = ["backbone=dimamba", "model=tiny-dimamba", *(o for o in TINY if not o.startswith("model.n_heads"))]
    run_dir = tmp_path / "run"
    proc = run_main(run_dir, "trainer.max_steps=4", "wandb.mode=disabled", base=base)
    assert "NLL bound" in proc.stdout and "--- sample" in proc.stdout
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["config"]["backbone"]["_target_"] == "models.dimamba.DiMamba"
    assert any(".reverse_ssm." in key for key in saved["state_dict"])
    # No backbone/model overrides: the architecture comes from the checkpoint.
    run_main(tmp_path / "eval", "mode=sample_eval", f"eval.checkpoint_path={checkpoint}", "sampling.predictor=ddpm",
             "loader.eval_global_batch_size=3", "wandb.mode=disabled")
    records = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["nfe"] >= 8 and len(r["tokens"]) == 16 for r in records)


# --------------------------------------------------------------------------- CUDA kernels


def set_use_kernels(model: DiMamba, flag: bool) -> None:
    for module in model.modules():
        if isinstance(module, BiMambaMixer):
            module.use_kernels = flag


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and MAMBA_SSM_AVAILABLE), reason="needs CUDA and mamba-ssm")
@pytest.mark.parametrize("conditioning", CONDITIONINGS)
def test_kernels_match_the_reference(conditioning: str) -> None:
    """mamba-ssm (and causal-conv1d, if installed) give the reference's logits and gradients."""
    model = make_model(conditioning).cuda()
    indices, sigma = (t.cuda() for t in make_inputs(batch=4, length=64))
    mask = torch.ones_like(indices)
    mask[0, -10:] = 0

    def run(use_kernels: bool, autocast: bool) -> tuple[Tensor, list[Tensor]]:
        set_use_kernels(model, use_kernels)
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            logits = model(indices, sigma, attention_mask=mask)
        logits.float().square().mean().backward()
        return logits.float().detach(), [p.grad.clone() for p in model.parameters()]

    for autocast, tol in ((False, 1e-4), (True, 3e-2)):
        kernel_logits, kernel_grads = run(True, autocast)
        ref_logits, ref_grads = run(False, autocast)
        torch.testing.assert_close(kernel_logits, ref_logits, rtol=tol, atol=tol)
        for g_kernel, g_ref in zip(kernel_grads, ref_grads, strict=True):
            torch.testing.assert_close(g_kernel, g_ref, rtol=10 * tol, atol=10 * tol)
