"""Tests for the AR backbone: checkpoint names, causality, a slow reference, the KV cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import Tensor

from models.autoregressive import ARTransformer, KVCache

VOCAB, HIDDEN, BLOCKS, HEADS = 40, 32, 2, 4
HEAD_DIM = HIDDEN // HEADS


def make_model(seed: int = 0, perturb: bool = True, dropout: float = 0.0) -> ARTransformer:
    """A tiny AR model in eval mode; with ``perturb`` every parameter is redrawn from N(0, 0.1^2).

    Layer-norm weights are then shifted by 1 so that activations (and the rotary effect on
    the attention pattern) stay large enough for the comparisons to be sensitive.
    """
    torch.manual_seed(seed)
    model = ARTransformer(VOCAB, HIDDEN, BLOCKS, HEADS, dropout=dropout)
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.normal_(0.0, 0.1)
                if 'norm' in name:
                    p.add_(1.0)
    return model.eval()


def make_tokens(batch: int = 3, length: int = 12, seed: int = 1) -> Tensor:
    """Random tokens (B, L)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=gen)


def expected_keys(n_blocks: int) -> list[str]:
    """State-dict names of the original AR checkpoint, without the ``backbone.`` prefix."""
    keys = ['vocab_embed.embedding', 'rotary_emb.inv_freq']
    block_keys = [
        'norm1.weight', 'attn_qkv.weight', 'attn_out.weight', 'norm2.weight',
        'mlp.0.weight', 'mlp.0.bias', 'mlp.2.weight', 'mlp.2.bias',
    ]
    for n in range(n_blocks):
        keys += [f'blocks.{n}.{k}' for k in block_keys]
    keys += ['output_layer.norm_final.weight', 'output_layer.linear.weight', 'output_layer.linear.bias']
    return keys


# --------------------------------------------------------------------------- slow reference


def ref_layer_norm(x: Tensor, weight: Tensor) -> Tensor:
    """(x - mean) / sqrt(var + 1e-5) * weight over the last dimension."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight


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


def ref_causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Explicit causal softmax attention, one query at a time; q, k, v (B, L, H, D)."""
    out = torch.empty_like(q)
    for i in range(q.shape[1]):
        scores = torch.einsum('bhd,bkhd->bhk', q[:, i], k[:, :i + 1]) / math.sqrt(q.shape[-1])
        probs = torch.exp(scores - scores.amax(-1, keepdim=True))
        probs = probs / probs.sum(-1, keepdim=True)  # (B, H, i + 1)
        out[:, i] = torch.einsum('bhk,bkhd->bhd', probs, v[:, :i + 1])
    return out


def reference_forward(model: ARTransformer, indices: Tensor) -> Tensor:
    """The AR transformer written out from its description, in float64, from the state dict."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    batch, length = indices.shape
    x = sd['vocab_embed.embedding'][indices]  # (B, L, D)
    for n in range(BLOCKS):
        pre = f'blocks.{n}'
        h = ref_layer_norm(x, sd[f'{pre}.norm1.weight'])
        qkv = ref_linear(h, sd, f'{pre}.attn_qkv', bias=False)  # (B, L, 3D)
        q, k, v = (qkv[..., i * HIDDEN:(i + 1) * HIDDEN].reshape(batch, length, HEADS, HEAD_DIM)
                   for i in range(3))
        attn = ref_causal_attention(ref_rotary(q), ref_rotary(k), v).reshape(batch, length, HIDDEN)
        x = x + ref_linear(attn, sd, f'{pre}.attn_out', bias=False)
        h = ref_layer_norm(x, sd[f'{pre}.norm2.weight'])
        x = x + ref_linear(ref_gelu_tanh(ref_linear(h, sd, f'{pre}.mlp.0')), sd, f'{pre}.mlp.2')
    h = ref_layer_norm(x, sd['output_layer.norm_final.weight'])
    return ref_linear(h, sd, 'output_layer.linear')  # (B, L, V)


# --------------------------------------------------------------------------- forward


def test_state_dict_names_and_shapes() -> None:
    model = make_model(perturb=False)
    sd = model.state_dict()
    assert list(sd) == expected_keys(BLOCKS)
    shapes = {
        'vocab_embed.embedding': (VOCAB, HIDDEN),
        'rotary_emb.inv_freq': (HEAD_DIM // 2,),
        'blocks.0.attn_qkv.weight': (3 * HIDDEN, HIDDEN),
        'blocks.0.attn_out.weight': (HIDDEN, HIDDEN),
        'blocks.0.mlp.0.weight': (4 * HIDDEN, HIDDEN),
        'blocks.0.mlp.2.weight': (HIDDEN, 4 * HIDDEN),
        'output_layer.linear.weight': (VOCAB, HIDDEN),
    }
    for name, shape in shapes.items():
        assert tuple(sd[name].shape) == shape, name


def test_cond_dim_is_accepted_and_ignored() -> None:
    torch.manual_seed(0)
    with_cond = ARTransformer(VOCAB, HIDDEN, BLOCKS, HEADS, cond_dim=128)
    assert list(with_cond.state_dict()) == expected_keys(BLOCKS)


@pytest.mark.parametrize('length', [1, 7, 16])
def test_output_shape_dtype_finite(length: int) -> None:
    model = make_model()
    indices = make_tokens(batch=2, length=length)
    with torch.no_grad():
        logits = model(indices)
    assert logits.shape == (2, length, VOCAB)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_sigma_is_ignored() -> None:
    model = make_model()
    indices = make_tokens()
    with torch.no_grad():
        assert torch.equal(model(indices, torch.rand(indices.shape[0])), model(indices))


def test_logits_are_zero_at_init() -> None:
    model = make_model(perturb=False)
    with torch.no_grad():
        assert torch.count_nonzero(model(make_tokens())) == 0


def test_load_state_dict_gives_identical_outputs() -> None:
    source = make_model(seed=0)
    indices = make_tokens()
    released = {f'backbone.{k}': v.clone() for k, v in source.state_dict().items()}
    target = make_model(seed=1)
    target.load_state_dict({k.removeprefix('backbone.'): v for k, v in released.items()}, strict=True)
    with torch.no_grad():
        assert torch.equal(target(indices), source(indices))


def test_matches_slow_reference() -> None:
    model = make_model()
    indices = make_tokens(batch=2, length=9)
    with torch.no_grad():
        logits = model(indices)
    expected = reference_forward(model, indices)
    rel_err = (logits.double() - expected).abs().max() / expected.abs().max()
    assert expected.abs().max() > 1e-2  # non-trivial logits
    assert rel_err < 1e-5


@pytest.mark.parametrize('j', [0, 5, 9])
def test_causal_attention_ignores_the_future(j: int) -> None:
    model = make_model()
    indices = make_tokens(batch=2, length=10)
    changed = indices.clone()
    changed[:, j] = (indices[:, j] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(indices), model(changed)
    assert torch.equal(after[:, :j], before[:, :j])
    diff = (after - before).abs().amax(-1)  # (B, L)
    assert (diff[:, j:] > 1e-6).all()


def test_dropout_only_in_train_mode() -> None:
    indices = make_tokens()
    model = make_model(dropout=0.1).train()
    torch.manual_seed(0)
    assert not torch.allclose(model(indices), model(indices))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(indices), model(indices))


def test_bf16_autocast_on_cpu_runs() -> None:
    model = make_model()
    indices = make_tokens()
    with torch.no_grad():
        expected = model(indices)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            logits = model(indices)
            cache = model.new_cache(indices.shape[0], indices.shape[1], dtype=torch.bfloat16)
            stepped = torch.cat([model.forward_step(indices[:, :5], cache),
                                 model.forward_step(indices[:, 5:], cache)], dim=1)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), expected, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(stepped.float(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'hidden_size': 30}, 'divisible'),
        ({'hidden_size': 36, 'n_heads': 12}, 'even'),
        ({'vocab_size': 0}, 'vocab_size'),
        ({'n_blocks': 0}, 'n_blocks'),
        ({'dropout': 1.0}, 'dropout'),
    ],
)
def test_constructor_validates_arguments(kwargs: dict[str, float], message: str) -> None:
    args = {'vocab_size': VOCAB, 'hidden_size': HIDDEN, 'n_blocks': BLOCKS, 'n_heads': HEADS} | kwargs
    with pytest.raises(ValueError, match=message):
        ARTransformer(**args)


def test_forward_validates_shapes() -> None:
    with pytest.raises(ValueError, match='indices'):
        make_model(perturb=False)(make_tokens()[0])


# --------------------------------------------------------------------------- KV cache


def run_chunks(model: ARTransformer, indices: Tensor, chunks: list[int], max_length: int) -> Tensor:
    """Feed ``indices`` through ``forward_step`` in chunks of the given sizes; (B, L, V)."""
    assert sum(chunks) == indices.shape[1]
    cache = model.new_cache(indices.shape[0], max_length)
    outputs, start = [], 0
    for n in chunks:
        outputs.append(model.forward_step(indices[:, start:start + n], cache))
        start += n
        assert cache.length == start
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize(
    'chunks',
    [[1] * 10, [4] + [1] * 6, [10], [3, 1, 2, 4], [1, 9], [5, 5]],
    ids=lambda c: '-'.join(map(str, c)),
)
def test_kv_cache_matches_full_forward(chunks: list[int]) -> None:
    model = make_model()
    indices = make_tokens(batch=3, length=10)
    with torch.no_grad():
        expected = model(indices)
        stepped = run_chunks(model, indices, chunks, max_length=16)
    assert expected.abs().max() > 1e-2  # non-trivial logits
    torch.testing.assert_close(stepped, expected, rtol=0.0, atol=1e-5)


def test_kv_cache_fills_keys_and_values_in_order() -> None:
    model = make_model()
    indices = make_tokens(batch=2, length=6)
    cache = model.new_cache(2, 8)
    assert isinstance(cache, KVCache) and cache.length == 0
    assert len(cache.keys) == BLOCKS and cache.keys[0].shape == (2, HEADS, 8, HEAD_DIM)
    with torch.no_grad():
        model.forward_step(indices, cache)
    for keys, values in zip(cache.keys, cache.values, strict=True):
        assert keys[:, :, :6].abs().sum() > 0 and values[:, :, :6].abs().sum() > 0
        assert torch.count_nonzero(keys[:, :, 6:]) == 0 and torch.count_nonzero(values[:, :, 6:]) == 0


def test_forward_step_needs_eval_mode() -> None:
    model = make_model().train()
    cache = model.new_cache(3, 12)
    with pytest.raises(RuntimeError, match='eval'):
        model.forward_step(make_tokens(), cache)


def test_forward_step_validates_the_cache() -> None:
    model = make_model()
    indices = make_tokens(batch=3, length=6)
    with torch.no_grad():
        with pytest.raises(ValueError, match='cache holds'):
            model.forward_step(indices, model.new_cache(3, 5))
        with pytest.raises(ValueError, match='batch size'):
            model.forward_step(indices, model.new_cache(2, 8))
        cache = model.new_cache(3, 8)
        model.forward_step(indices, cache)
        with pytest.raises(ValueError, match='cache holds'):
            model.forward_step(indices[:, :3], cache)


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(('size', 'expected'), [('tiny-ar', (512, 8, 8)), ('small-ar', (768, 12, 12))])
def test_ar_configs_instantiate(tmp_path: Path, size: str, expected: tuple[int, int, int]) -> None:
    with initialize_config_dir(config_dir=str(ROOT / 'configs'), version_base=None):
        cfg = compose('config', overrides=[f'checkpointing.save_dir={tmp_path}', f'model={size}', 'backbone=ar'])
    assert cfg.model.name == size
    assert (cfg.model.hidden_size, cfg.model.n_blocks, cfg.model.n_heads) == expected
    with torch.device('meta'):  # no memory for the big ones
        backbone = instantiate(cfg.backbone, vocab_size=50258)
    assert isinstance(backbone, ARTransformer) and len(backbone.blocks) == expected[1]
