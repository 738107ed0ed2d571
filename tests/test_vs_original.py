"""bench/vs_original.py without the original code: its flash-attn stand-in, its module isolation, its errors.

The original MDLM is not available here, so these pin what is ours: the SDPA stand-ins of
``flash_attn_varlen_qkvpacked_func`` and ``apply_rotary_emb_qkv_`` against direct computations
from their formulas, the import of an original next to our same-named modules (on a small fake
original), the load measure, and the command line.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import flash_attn_sdpa  # noqa: E402

from models.dit import Rotary, apply_rotary  # noqa: E402

HEADS, HEAD_DIM = 2, 8


# --------------------------------------------------------------------------- references


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                        scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v of one sequence, in float64, with explicit loops over heads. (L, H, D) -> (L, H, D)."""
    length, heads, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    out = torch.empty(length, heads, dim, dtype=torch.float64)
    for h in range(heads):
        scores = q[:, h].double() @ k[:, h].double().T * scale  # (L, L)
        if causal:
            scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), -math.inf)
        out[:, h] = scores.softmax(-1) @ v[:, h].double()
    return out


def rotary_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0,
                     interleaved: bool = False) -> torch.Tensor:
    """The rotation written out element by element: (B, L, 3, H, D) -> a new tensor, q and k rotated.

    Pair j of features (j, j + R/2), or (2j, 2j + 1) interleaved, of token l at position p = l + offset:
    ``(a, b) -> (a cos[p, j] - b sin[p, j], a sin[p, j] + b cos[p, j])``.
    """
    out = qkv.clone()
    batch, length, _, heads, _ = qkv.shape
    half = cos.shape[-1]
    for b in range(batch):
        for l in range(length):  # noqa: E741
            p = l + offset
            for which in (0, 1):  # q, k
                for h in range(heads):
                    for j in range(half):
                        i1, i2 = (2 * j, 2 * j + 1) if interleaved else (j, j + half)
                        a, c = float(qkv[b, l, which, h, i1]), float(qkv[b, l, which, h, i2])
                        out[b, l, which, h, i1] = a * float(cos[p, j]) - c * float(sin[p, j])
                        out[b, l, which, h, i2] = a * float(sin[p, j]) + c * float(cos[p, j])
    return out


def tables(positions: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(positions, half, generator=torch.Generator().manual_seed(3)) * 2 * math.pi
    return angles.cos(), angles.sin()


# --------------------------------------------------------------------------- varlen attention


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_keeps_sequences_apart(causal: bool) -> None:
    lengths = [3, 7, 1, 5]  # several sequences of different lengths in one packed batch
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    qkv = torch.randn(sum(lengths), 3, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    out = flash_attn_sdpa.flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max(lengths), 0.0, causal=causal)
    assert out.shape == (sum(lengths), HEADS, HEAD_DIM)
    for start, end in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True):
        q, k, v = qkv[start:end].unbind(1)  # each (L_b, H, D)
        torch.testing.assert_close(out[start:end], attention_reference(q, k, v, causal).float())


def test_varlen_attention_equal_lengths_and_scale() -> None:
    """MDLM's case (B sequences of L, one batched call) with a given softmax scale."""
    batch, length = 3, 6
    cu_seqlens = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32)
    qkv = torch.randn(batch * length, 3, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    out = flash_attn_sdpa.flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, length, softmax_scale=0.3)
    for b in range(batch):
        q, k, v = qkv[b * length:(b + 1) * length].unbind(1)
        torch.testing.assert_close(out[b * length:(b + 1) * length], attention_reference(q, k, v, False, 0.3).float())


def test_varlen_attention_rejects_bad_arguments() -> None:
    qkv = torch.randn(4, 3, HEADS, HEAD_DIM)
    with pytest.raises(ValueError, match="max_seqlen"):
        flash_attn_sdpa.flash_attn_varlen_qkvpacked_func(qkv, torch.tensor([0, 4], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        flash_attn_sdpa.flash_attn_varlen_qkvpacked_func(qkv, torch.tensor([0, 3], dtype=torch.int32), 4)
    with pytest.raises(NotImplementedError, match="window_size"):
        flash_attn_sdpa.flash_attn_varlen_qkvpacked_func(qkv, torch.tensor([0, 4], dtype=torch.int32), 4,
                                                         window_size=(2, 2))


# --------------------------------------------------------------------------- rotary


@pytest.mark.parametrize(("interleaved", "rotary_dim", "offset"), [(False, HEAD_DIM, 0), (False, 4, 2),
                                                                   (True, HEAD_DIM, 1)])
def test_rotary_in_place_matches_the_formula(interleaved: bool, rotary_dim: int, offset: int) -> None:
    batch, length = 2, 5
    qkv = torch.randn(batch, length, 3, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(2))
    cos, sin = tables(length + offset, rotary_dim // 2)
    expected = rotary_reference(qkv, cos, sin, offset, interleaved)
    before = qkv.clone()
    out = flash_attn_sdpa.apply_rotary_emb_qkv_(qkv, cos, sin, interleaved=interleaved, seqlen_offsets=offset)
    assert out is qkv  # in place, returned
    torch.testing.assert_close(qkv, expected)
    assert torch.equal(qkv[:, :, 2], before[:, :, 2])  # values untouched
    assert torch.equal(qkv[..., rotary_dim:], before[..., rotary_dim:])  # features past rotary_dim untouched


def test_rotary_per_sequence_offsets_and_key_tables() -> None:
    batch, length = 2, 3
    qkv = torch.randn(batch, length, 3, HEADS, HEAD_DIM, generator=torch.Generator().manual_seed(4))
    cos, sin = tables(8, HEAD_DIM // 2)
    offsets = torch.tensor([0, 4])
    expected = torch.cat([rotary_reference(qkv[b:b + 1], cos, sin, int(offsets[b])) for b in range(batch)])
    flash_attn_sdpa.apply_rotary_emb_qkv_(qkv, cos, sin, seqlen_offsets=offsets)
    torch.testing.assert_close(qkv, expected)

    qkv = torch.randn(1, length, 3, HEADS, HEAD_DIM)
    cos_k, sin_k = torch.ones(length, HEAD_DIM // 2), torch.zeros(length, HEAD_DIM // 2)  # identity for the keys
    keys = qkv[:, :, 1].clone()
    flash_attn_sdpa.apply_rotary_emb_qkv_(qkv, cos[:length], sin[:length], cos_k=cos_k, sin_k=sin_k)
    torch.testing.assert_close(qkv[:, :, 1], keys)


def test_rotary_matches_our_dit_and_its_gradient() -> None:
    """The stand-in as the original DiT calls it (its Rotary's tables, halves) equals our DiT's rotary,
    values and gradients (the training step backpropagates through the in-place write)."""
    length = 6
    cos, sin = Rotary(HEAD_DIM)(length, torch.device("cpu"))  # (L, D/2) each
    weight = torch.randn(4 * HEADS * HEAD_DIM, 3 * HEADS * HEAD_DIM, requires_grad=True)
    h = torch.randn(2, length, 4 * HEADS * HEAD_DIM)

    def qkv() -> torch.Tensor:  # non-leaf, as the output of attn_qkv
        return (h @ weight).view(2, length, 3, HEADS, HEAD_DIM)

    ours = apply_rotary(qkv(), cos, sin)
    theirs = flash_attn_sdpa.apply_rotary_emb_qkv_(qkv(), cos, sin)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    grad_ours, = torch.autograd.grad(ours.square().sum(), weight)
    grad_theirs, = torch.autograd.grad(theirs.square().sum(), weight)
    torch.testing.assert_close(grad_theirs, grad_ours)


# --------------------------------------------------------------------------- registration


def test_install_registers_the_names_the_original_imports() -> None:
    try:
        assert flash_attn_sdpa.install(only_if_missing=False)
        import flash_attn.flash_attn_interface
        import flash_attn.layers.rotary

        assert flash_attn.layers.rotary.apply_rotary_emb_qkv_ is flash_attn_sdpa.apply_rotary_emb_qkv_
        assert (flash_attn.flash_attn_interface.flash_attn_varlen_qkvpacked_func
                is flash_attn_sdpa.flash_attn_varlen_qkvpacked_func)
    finally:
        flash_attn_sdpa.uninstall()
    assert not any(isinstance(m, flash_attn_sdpa.StandIn) for m in sys.modules.values())


def fake_original(path: Path) -> Path:
    """A tiny stand-in for the original's tree: the files the script checks, and the imports of its own DiT."""
    (path / "models").mkdir(parents=True)
    (path / "configs").mkdir()
    (path / "configs" / "config.yaml").write_text("mode: train\n")
    (path / "models" / "__init__.py").write_text("raise ImportError('the package __init__ must not run')\n")
    (path / "models" / "dit.py").write_text("import flash_attn\nimport flash_attn.layers.rotary\nMARK = 'their dit'\n")
    (path / "models" / "ema.py").write_text("MARK = 'their ema'\n")
    (path / "noise_schedule.py").write_text("MARK = 'their noise'\n")
    (path / "diffusion.py").write_text("import models\nimport noise_schedule\nMARK = 'their diffusion'\n")
    return path


def test_import_original_keeps_our_modules(tmp_path: Path) -> None:
    import vs_original

    import models.dit
    import noise_schedule

    ours = sys.modules["models"], sys.modules["models.dit"], sys.modules["noise_schedule"]
    theirs = vs_original.import_original(fake_original(tmp_path / "mdlm"))
    assert theirs.MARK == "their diffusion"
    assert theirs.models.dit.MARK == "their dit" and theirs.noise_schedule.MARK == "their noise"
    assert theirs.models.dit.flash_attn.layers.rotary.apply_rotary_emb_qkv_ is flash_attn_sdpa.apply_rotary_emb_qkv_
    assert (sys.modules["models"], sys.modules["models.dit"], sys.modules["noise_schedule"]) == ours
    assert models.dit.DiT is not None and noise_schedule.LogLinear is not None
    assert "diffusion" not in sys.modules or sys.modules["diffusion"] is not theirs
    assert not any(isinstance(m, flash_attn_sdpa.StandIn) for m in sys.modules.values())
    assert str(tmp_path / "mdlm") not in sys.path


def test_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import vs_original

    monkeypatch.setattr(vs_original, "REQUIRED", ("torch", "no_such_package_xyz"))
    with pytest.raises(SystemExit, match="no_such_package_xyz") as info:
        vs_original.check_required_packages()
    assert "pip install no_such_package_xyz" in str(info.value)


def test_others_share() -> None:
    import vs_original

    before = vs_original.Probe(wall=10.0, own_cpu=1.0, machine_busy=100.0)
    after = vs_original.Probe(wall=12.0, own_cpu=4.0, machine_busy=104.0)  # 4 s busy, 3 s of them ours
    assert vs_original.others_share(before, after, cpus=2) == pytest.approx(0.25)  # 1 s of 2 s x 2 CPUs
    quiet = vs_original.Probe(wall=12.0, own_cpu=4.0, machine_busy=102.9)  # tick rounding: never below 0
    assert vs_original.others_share(before, quiet, cpus=2) == 0.0


# --------------------------------------------------------------------------- command line


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/vs_original.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_help_runs() -> None:
    proc = run_script("--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--original", "--repeats", "--length", "--out", "--busy-threshold"):
        assert flag in proc.stdout


def test_missing_original_dir_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_script("--original", str(tmp_path / "nowhere"))
    assert proc.returncode != 0
    assert "--original" in proc.stderr and "does not exist" in proc.stderr and "kuleshov-group/mdlm" in proc.stderr
    assert "Traceback" not in proc.stderr

    import vs_original

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="lacks diffusion.py, models/dit.py"):
        vs_original.check_original_dir(tmp_path / "empty")
