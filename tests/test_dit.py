"""Tests for the DiT backbone: shapes, checkpoint names, a slow reference, attention masks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from models import dit
from models.dit import DiT

VOCAB, HIDDEN, COND, BLOCKS, HEADS = 50, 32, 16, 2, 4
HEAD_DIM = HIDDEN // HEADS


def make_model(
    seed: int = 0, perturb: bool = True, dropout: float = 0.0
) -> DiT:
    """A tiny DiT; with ``perturb`` every parameter is redrawn from N(0, 0.1^2).

    Layer-norm weights are then shifted by 1 so that activations (and the rotary effect on
    the attention pattern) stay large enough for the comparisons to be sensitive.
    """
    torch.manual_seed(seed)
    model = DiT(VOCAB, HIDDEN, COND, BLOCKS, HEADS, dropout=dropout)
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(0.0, 0.1)
                if 'norm' in name:
                    p.add_(1.0)
    return model.eval()


def make_inputs(batch: int = 3, length: int = 12, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Random tokens (B, L) and non-zero noise levels sigma (B,)."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, VOCAB, (batch, length), generator=gen)
    sigma = 0.5 + 3.0 * torch.rand(batch, generator=gen)
    return indices, sigma


def expected_keys(n_blocks: int) -> list[str]:
    """State-dict names of the released MDLM DiT, without the ``backbone.`` prefix."""
    keys = [
        'vocab_embed.embedding',
        'sigma_map.mlp.0.weight', 'sigma_map.mlp.0.bias',
        'sigma_map.mlp.2.weight', 'sigma_map.mlp.2.bias',
        'rotary_emb.inv_freq',
    ]
    block_keys = [
        'norm1.weight', 'attn_qkv.weight', 'attn_out.weight', 'norm2.weight',
        'mlp.0.weight', 'mlp.0.bias', 'mlp.2.weight', 'mlp.2.bias',
        'adaLN_modulation.weight', 'adaLN_modulation.bias',
    ]
    for n in range(n_blocks):
        keys += [f'blocks.{n}.{k}' for k in block_keys]
    keys += [
        'output_layer.norm_final.weight', 'output_layer.linear.weight',
        'output_layer.linear.bias', 'output_layer.adaLN_modulation.weight',
        'output_layer.adaLN_modulation.bias',
    ]
    return keys


# --------------------------------------------------------------------------- slow reference


def ref_layer_norm(x: Tensor, weight: Tensor) -> Tensor:
    """(x - mean) / sqrt(var + 1e-5) * weight over the last dimension."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight


def ref_silu(x: Tensor) -> Tensor:
    return x / (1.0 + torch.exp(-x))


def ref_gelu_tanh(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def ref_linear(x: Tensor, sd: dict[str, Tensor], name: str, bias: bool = True) -> Tensor:
    out = x @ sd[f'{name}.weight'].T
    return out + sd[f'{name}.bias'] if bias else out


def ref_rotary(x: Tensor) -> Tensor:
    """Rotate (B, L, H, D) by position: pair (j, j + D/2) turns by p / 10000^(2j/D)."""
    _, length, _, d = x.shape
    out = torch.empty_like(x)
    for p in range(length):
        for j in range(d // 2):
            theta = p / 10000.0 ** (2 * j / d)
            a, b = x[:, p, :, j], x[:, p, :, j + d // 2]
            out[:, p, :, j] = a * math.cos(theta) - b * math.sin(theta)
            out[:, p, :, j + d // 2] = a * math.sin(theta) + b * math.cos(theta)
    return out


def ref_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    """Explicit softmax attention; q, k, v (B, L, H, D) -> (B, L, H, D)."""
    scores = torch.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
    if causal:
        length = q.shape[1]
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, -math.inf)
    scores = scores - scores.amax(-1, keepdim=True)
    probs = torch.exp(scores)
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.einsum('bhqk,bkhd->bqhd', probs, v)


def reference_forward(model: DiT, indices: Tensor, sigma: Tensor, causal: bool) -> Tensor:
    """The MDLM DiT written out from its description, in float64, from the state dict."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    batch, length = indices.shape

    half = 128
    freqs = torch.tensor([10000.0 ** (-j / half) for j in range(half)], dtype=torch.float64)
    args = sigma.double()[:, None] * freqs[None]
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 256)
    hidden = ref_silu(ref_linear(features, sd, 'sigma_map.mlp.0'))
    c = ref_silu(ref_linear(hidden, sd, 'sigma_map.mlp.2'))  # (B, cond)

    x = sd['vocab_embed.embedding'][indices]  # (B, L, D)
    for n in range(BLOCKS):
        pre = f'blocks.{n}'
        mod = ref_linear(c, sd, f'{pre}.adaLN_modulation')[:, None, :]  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa = (mod[..., i * HIDDEN:(i + 1) * HIDDEN] for i in range(3))
        shift_mlp, scale_mlp, gate_mlp = (
            mod[..., i * HIDDEN:(i + 1) * HIDDEN] for i in range(3, 6))

        h = ref_layer_norm(x, sd[f'{pre}.norm1.weight']) * (1 + scale_msa) + shift_msa
        qkv = ref_linear(h, sd, f'{pre}.attn_qkv', bias=False)  # (B, L, 3D)
        q, k, v = (qkv[..., i * HIDDEN:(i + 1) * HIDDEN].reshape(batch, length, HEADS, HEAD_DIM)
                   for i in range(3))
        attn = ref_attention(ref_rotary(q), ref_rotary(k), v, causal)
        attn = attn.reshape(batch, length, HIDDEN)
        x = x + gate_msa * ref_linear(attn, sd, f'{pre}.attn_out', bias=False)

        h = ref_layer_norm(x, sd[f'{pre}.norm2.weight']) * (1 + scale_mlp) + shift_mlp
        h = ref_linear(ref_gelu_tanh(ref_linear(h, sd, f'{pre}.mlp.0')), sd, f'{pre}.mlp.2')
        x = x + gate_mlp * h

    mod = ref_linear(c, sd, 'output_layer.adaLN_modulation')[:, None, :]  # (B, 1, 2D)
    shift, scale = mod[..., :HIDDEN], mod[..., HIDDEN:]
    h = ref_layer_norm(x, sd['output_layer.norm_final.weight']) * (1 + scale) + shift
    return ref_linear(h, sd, 'output_layer.linear')  # (B, L, V)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize('length', [1, 7, 16])
def test_output_shape_dtype_finite(length: int) -> None:
    model = make_model()
    indices, sigma = make_inputs(batch=2, length=length)
    with torch.no_grad():
        logits = model(indices, sigma)
    assert logits.shape == (2, length, VOCAB)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_deterministic_in_eval_mode() -> None:
    model = make_model(dropout=0.1)
    indices, sigma = make_inputs()
    with torch.no_grad():
        assert torch.equal(model(indices, sigma), model(indices, sigma))


def test_logits_are_zero_at_init() -> None:
    model = make_model(perturb=False)
    indices, sigma = make_inputs()
    with torch.no_grad():
        logits = model(indices, sigma)
    assert torch.count_nonzero(logits) == 0


def test_state_dict_names_and_shapes() -> None:
    model = make_model(perturb=False)
    sd = model.state_dict()
    assert sorted(sd) == sorted(expected_keys(BLOCKS))
    assert len(sd) == len(expected_keys(BLOCKS))
    shapes = {
        'vocab_embed.embedding': (VOCAB, HIDDEN),
        'sigma_map.mlp.0.weight': (COND, 256),
        'sigma_map.mlp.2.weight': (COND, COND),
        'rotary_emb.inv_freq': (HEAD_DIM // 2,),
        'blocks.0.attn_qkv.weight': (3 * HIDDEN, HIDDEN),
        'blocks.0.attn_out.weight': (HIDDEN, HIDDEN),
        'blocks.0.mlp.0.weight': (4 * HIDDEN, HIDDEN),
        'blocks.0.mlp.2.weight': (HIDDEN, 4 * HIDDEN),
        'blocks.0.adaLN_modulation.weight': (6 * HIDDEN, COND),
        'output_layer.linear.weight': (VOCAB, HIDDEN),
        'output_layer.adaLN_modulation.weight': (2 * HIDDEN, COND),
    }
    for name, shape in shapes.items():
        assert tuple(sd[name].shape) == shape, name
    expected_inv_freq = 1.0 / 10000.0 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
    torch.testing.assert_close(sd['rotary_emb.inv_freq'], expected_inv_freq)


def test_load_state_dict_gives_identical_outputs() -> None:
    source = make_model(seed=0)
    indices, sigma = make_inputs()
    with torch.no_grad():
        expected = source(indices, sigma)

    target = make_model(seed=1)
    target.load_state_dict(source.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(target(indices, sigma), expected)

    # As in the released checkpoints: names under 'backbone.', stripped before loading.
    released = {f'backbone.{k}': v.clone() for k, v in source.state_dict().items()}
    stripped = {k.removeprefix('backbone.'): v for k, v in released.items()}
    target = make_model(seed=2)
    target.load_state_dict(stripped, strict=True)
    with torch.no_grad():
        assert torch.equal(target(indices, sigma), expected)


def test_matches_slow_reference() -> None:
    causal = False  # the DiT is bidirectional; the AR transformer (models/autoregressive.py) is the causal one
    model = make_model()
    indices, sigma = make_inputs(batch=2, length=9)
    with torch.no_grad():
        logits = model(indices, sigma)
    expected = reference_forward(model, indices, sigma, causal)
    rel_err = (logits.double() - expected).abs().max() / expected.abs().max()
    assert expected.abs().max() > 1e-2  # non-trivial logits
    assert rel_err < 1e-5


def test_attention_is_bidirectional() -> None:
    model = make_model()
    indices, sigma = make_inputs(batch=1, length=10)
    changed = indices.clone()
    j = 6
    changed[0, j] = (indices[0, j] + 1) % VOCAB
    with torch.no_grad():
        diff = (model(indices, sigma) - model(changed, sigma)).abs().amax(-1)[0]  # (L,)
    assert (diff > 1e-6).all()


def test_dropout_only_in_train_mode() -> None:
    indices, sigma = make_inputs()
    noisy = make_model(dropout=0.1).train()
    torch.manual_seed(0)
    assert not torch.allclose(noisy(indices, sigma), noisy(indices, sigma))

    clean = make_model(dropout=0.0).train()
    assert torch.equal(clean(indices, sigma), clean(indices, sigma))


def test_bf16_autocast_on_cpu_runs() -> None:
    model = make_model()
    indices, sigma = make_inputs()
    with torch.no_grad():
        expected = model(indices, sigma)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            logits = model(indices, sigma)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), expected, rtol=5e-2, atol=5e-2)


def test_attention_falls_back_to_sdpa_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_flash(*args: object, **kwargs: object) -> Tensor:
        raise AssertionError('flash-attn must not be used for CPU tensors')

    monkeypatch.setattr(dit, 'FLASH_ATTN_AVAILABLE', True)
    monkeypatch.setattr(dit, '_flash_attn_qkvpacked_func', broken_flash)
    qkv = torch.randn(2, 5, 3, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    out = dit.attention(qkv, causal=False)
    assert out.shape == (2, 5, HIDDEN)


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'hidden_size': 30}, 'divisible'),
        ({'hidden_size': 36, 'n_heads': 12}, 'even'),
        ({'vocab_size': 0}, 'vocab_size'),
        ({'n_blocks': 0}, 'n_blocks'),
        ({'cond_dim': -1}, 'cond_dim'),
        ({'dropout': 1.0}, 'dropout'),
    ],
)
def test_constructor_validates_arguments(kwargs: dict[str, float], message: str) -> None:
    args = {'vocab_size': VOCAB, 'hidden_size': HIDDEN, 'cond_dim': COND,
            'n_blocks': BLOCKS, 'n_heads': HEADS} | kwargs
    with pytest.raises(ValueError, match=message):
        DiT(**args)


def test_forward_validates_shapes() -> None:
    model = make_model(perturb=False)
    indices, sigma = make_inputs()
    with pytest.raises(ValueError, match='sigma'):
        model(indices, sigma[:, None])
    with pytest.raises(ValueError, match='indices'):
        model(indices[0], sigma)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_bf16_autocast_on_cuda_matches_fp32() -> None:
    model = make_model().cuda()
    indices, sigma = make_inputs()
    indices, sigma = indices.cuda(), sigma.cuda()
    with torch.no_grad():
        expected = model(indices, sigma)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            logits = model(indices, sigma)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('causal', [False, True])
def test_flash_attention_matches_sdpa(causal: bool) -> None:
    if not dit.FLASH_ATTN_AVAILABLE:
        pytest.skip('flash-attn is not installed')
    torch.manual_seed(0)
    qkv = torch.randn(2, 64, 3, 4, 64, device='cuda', dtype=torch.bfloat16)
    torch.testing.assert_close(
        dit.flash_attention(qkv, causal), dit.sdpa_attention(qkv, causal),
        rtol=1.6e-2, atol=1e-2)
