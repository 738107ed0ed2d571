"""FlexAttention as the DiT's attention kernel under block diffusion's mask (``DiT.attn_backend``).

On CPU (this torch: FlexAttention runs eagerly, forward only; the eager path evaluates the
mask_mod densely):

- the DiT's logits and BD3-LM's loss with ``attn_backend="flex"`` equal SDPA's (to 1e-5) on
  :func:`block_diffusion.block_diffusion_mask` for several (L, L'), L not a multiple of 128;
- the BlockMask the CUDA kernel would walk lists exactly the 128 x 128 tiles that hold an allowed
  entry (so no allowed key is skipped), and its full tiles are all allowed;
- the dispatch of ``"auto"`` / ``"sdpa"`` / ``"flex"`` (on CPU, and for CUDA inputs as a pure
  function), the cache of BlockMasks, and the error messages.

``-m slow``: the compiled CPU kernel, which does skip tiles, against SDPA. ``-m gpu``: the same
comparison as on CPU on CUDA in bf16, gradients included.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from algorithms import Draws
from block_diffusion import BD3LM, block_diffusion_mask
from models import dit
from models.dit import DiT, attention_kernel, set_attention_backend
from noise_schedule import LogLinear

VOCAB, MASK = 13, 12
CPU = torch.device('cpu')
CUDA = torch.device('cuda')
# L' | L, L not a multiple of 128 (2L = 200, 320 and 8: partial edge tiles; 320 has empty tiles)
SHAPES = [(4, 2), (100, 4), (160, 16)]

needs_flex = pytest.mark.skipif(not dit.FLEX_ATTN_AVAILABLE, reason='this torch has no FlexAttention')
# the eager (CPU) path warns once that it is unfused; that is what it is here for
eager_flex = pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')


def random_dit(seed: int = 0, hidden: int = 32, heads: int = 4) -> DiT:
    """A small DiT with every weight random (the zero-initialised adaLN and output layer included)."""
    torch.manual_seed(seed)
    model = DiT(VOCAB, hidden_size=hidden, cond_dim=16, n_blocks=2, n_heads=heads, dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def two_stream_inputs(length: int, batch: int = 2, device: torch.device = CPU) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens (B, 2L) of x_t ⊕ x_0, sigma = 0 (B,), and the rotary positions 0..L-1 twice (2L,)."""
    gen = torch.Generator().manual_seed(length)
    x = torch.randint(0, MASK + 1, (batch, 2 * length), generator=gen).to(device)
    positions = torch.arange(length, device=device).repeat(2)
    return x, torch.zeros(batch, device=device), positions


def logits_with(model: DiT, backend: str, x: Tensor, sigma: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
    set_attention_backend(model, backend)
    return model(x, sigma, attn_mask=mask, positions=positions)


# --------------------------------------------------------------------------- numbers on CPU


@needs_flex
@eager_flex
@pytest.mark.parametrize(('length', 'block_size'), SHAPES)
def test_flex_logits_equal_sdpa_on_cpu(length: int, block_size: int) -> None:
    model = random_dit()
    x, sigma, positions = two_stream_inputs(length)
    mask = block_diffusion_mask(length, block_size, 'cpu')
    with torch.no_grad():
        expected = logits_with(model, 'sdpa', x, sigma, mask, positions)
        logits = logits_with(model, 'flex', x, sigma, mask, positions)
    assert expected.abs().max() > 1.0  # large enough for the comparison to mean something
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@needs_flex
@eager_flex
@pytest.mark.parametrize(('length', 'block_size'), [(8, 2), (100, 4)])
def test_flex_bd3lm_loss_equals_sdpa_on_cpu(length: int, block_size: int) -> None:
    model = random_dit(1)
    algorithm = BD3LM(LogLinear(), MASK, block_size=block_size)
    x0 = torch.randint(0, MASK, (3, length))
    draws = Draws(time=torch.rand(3), mask=torch.rand(3, length))
    ones = torch.ones(3, length)
    with torch.no_grad():  # FlexAttention has no backward on CPU: gradients are compared on CUDA (-m gpu)
        set_attention_backend(model, 'sdpa')
        expected = algorithm.loss(model, x0, ones, draws=draws).nll
        set_attention_backend(model, 'flex')
        nll = algorithm.loss(model, x0, ones, draws=draws).nll
    assert expected.abs().sum() > 0
    torch.testing.assert_close(nll, expected, atol=1e-5, rtol=1e-5)


def listed_tiles(num_blocks: Tensor, indices: Tensor, n_kv: int) -> Tensor:
    """(nq, nk) bool: the key tiles a BlockMask lists for each query tile (batch and head 0)."""
    tiles = torch.zeros(num_blocks.shape[-1], n_kv, dtype=torch.bool)
    for row, count in enumerate(num_blocks[0, 0].tolist()):
        tiles[row, indices[0, 0, row, :count]] = True
    return tiles


@needs_flex
@pytest.mark.parametrize(('length', 'block_size'), [*SHAPES, (512, 16)])
def test_block_mask_lists_exactly_the_tiles_the_mask_touches(length: int, block_size: int) -> None:
    """What the CUDA kernel skips (the CPU eager path ignores the tile lists and reads the mask_mod)."""
    mask = block_diffusion_mask(length, block_size, 'cpu')  # (2L, 2L)
    block_mask = dit.dense_block_mask(mask, CPU)
    tile_q, tile_k = block_mask.BLOCK_SIZE
    n_q, n_k = -(-2 * length // tile_q), -(-2 * length // tile_k)
    padded = torch.zeros(n_q * tile_q, n_k * tile_k, dtype=torch.bool)
    padded[:2 * length, :2 * length] = mask
    touched = padded.view(n_q, tile_q, n_k, tile_k).any(dim=3).any(dim=1)  # (nq, nk)

    partial = listed_tiles(block_mask.kv_num_blocks, block_mask.kv_indices, n_k)
    full = listed_tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, n_k)
    assert not (partial & full).any()
    assert torch.equal(partial | full, touched)  # no allowed key skipped, no empty tile visited
    for row, col in full.nonzero().tolist():  # a full tile skips the mask_mod: all of it must be allowed
        assert padded[row * tile_q:(row + 1) * tile_q, col * tile_k:(col + 1) * tile_k].all()
    if length == 512:  # at L = 512, L' = 16 most tiles are empty: the point of FlexAttention
        assert (~touched).float().mean() > 0.4


@needs_flex
def test_block_masks_are_built_once_per_mask_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dit, '_BLOCK_MASKS', type(dit._BLOCK_MASKS)())
    mask = block_diffusion_mask(8, 2, 'cpu')
    first = dit.dense_block_mask(mask, CPU)
    assert dit.dense_block_mask(mask, CPU) is first
    assert dit.dense_block_mask(mask.clone(), CPU) is not first  # another tensor: another entry
    assert dit.dense_block_mask(mask.T, CPU) is not first  # same address and shape, other contents
    changed = mask.clone()
    before = dit.dense_block_mask(changed, CPU)
    changed[0, -1] = True  # modified in place: rebuilt
    assert dit.dense_block_mask(changed, CPU) is not before
    for length in range(1, 2 * dit.BLOCK_MASK_CACHE_SIZE):
        dit.dense_block_mask(torch.ones(length, length, dtype=torch.bool), CPU)
    assert len(dit._BLOCK_MASKS) == dit.BLOCK_MASK_CACHE_SIZE


@eager_flex
def test_paths_without_a_mask_do_not_change() -> None:
    """Full attention and the KV cache (sampling) run as before under every backend, bit for bit."""
    model = random_dit(2)
    x, sigma, _ = two_stream_inputs(6)
    prefix, block = x[:, :8], x[:, 8:10]
    outputs = {}
    with torch.no_grad():
        for backend in dit.ATTN_BACKENDS:
            set_attention_backend(model, backend)
            cache = model.new_cache()
            cache.store = True
            model(prefix, sigma, cache=cache)
            cache.store = False
            outputs[backend] = (model(x, sigma), model(block, sigma, cache=cache))
    for backend in ('sdpa', 'flex'):
        for got, expected in zip(outputs[backend], outputs['auto'], strict=True):
            assert torch.equal(got, expected)


def test_auto_is_sdpa_on_cpu() -> None:
    model = random_dit(3)
    x, sigma, positions = two_stream_inputs(512)  # 2L = 1024 >= FLEX_AUTO_MIN_LENGTH
    mask = block_diffusion_mask(512, 16, 'cpu')
    with torch.no_grad():
        assert torch.equal(logits_with(model, 'auto', x, sigma, mask, positions),
                           logits_with(model, 'sdpa', x, sigma, mask, positions))


# --------------------------------------------------------------------------- dispatch and errors


@needs_flex
def test_auto_picks_flex_on_cuda_for_long_masks_only() -> None:
    """The pure dispatch function, asked about CUDA inputs (no GPU needed)."""
    def kernel(backend: str = 'auto', device: torch.device = CUDA, head_dim: int = 64, padding: bool = False,
               mask_shape: tuple[int, ...] | None = (2048, 2048), needs_grad: bool = True) -> str:
        return attention_kernel(backend, device, torch.bfloat16, head_dim, padding, mask_shape, needs_grad)

    long, short = (dit.FLEX_AUTO_MIN_LENGTH,) * 2, (dit.FLEX_AUTO_MIN_LENGTH - 2,) * 2
    assert kernel(mask_shape=long) == 'flex'
    assert kernel(mask_shape=short) == 'sdpa'
    assert kernel(mask_shape=long, padding=True) == 'sdpa'
    assert kernel(mask_shape=long, head_dim=8) == 'sdpa'
    assert kernel(mask_shape=(2, 1, 2048, 2048)) == 'sdpa'
    assert kernel(device=CPU, needs_grad=False) == 'sdpa'  # auto never takes the unfused CPU path
    assert kernel('sdpa') == 'sdpa'
    assert kernel('flex', mask_shape=short) == 'flex'
    assert kernel('flex', device=CPU, needs_grad=False) == 'flex'
    no_mask = 'flash' if dit.FLASH_ATTN_AVAILABLE else 'sdpa'
    assert kernel('flex', mask_shape=None) == no_mask  # nothing to skip: flex applies under an attn_mask only
    assert kernel('sdpa', mask_shape=None) == 'sdpa'


@pytest.mark.parametrize(('kwargs', 'message'), [
    ({'padding': True}, 'padding'),
    ({'device': CPU}, 'no backward on CPU'),
    ({'head_dim': 8}, 'head size >= 16'),
    ({'device': torch.device('mps')}, 'not on mps'),
    ({'mask_shape': (2, 1, 64, 64)}, r'one \(L, L\) attn_mask'),
])
@needs_flex
def test_flex_says_why_it_cannot_run(kwargs: dict, message: str) -> None:
    args = {'device': CUDA, 'head_dim': 64, 'padding': False, 'mask_shape': (64, 64), 'needs_grad': True} | kwargs
    with pytest.raises(ValueError, match=f'attn_backend=flex cannot run.*{message}.*Use attn_backend=sdpa'):
        attention_kernel('flex', args['device'], torch.float32, args['head_dim'], args['padding'],
                         args['mask_shape'], args['needs_grad'])


def test_flex_without_flex_attention_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dit, 'FLEX_ATTN_AVAILABLE', False)
    with pytest.raises(ValueError, match='has no torch.nn.attention.flex_attention.*Use attn_backend=sdpa'):
        attention_kernel('flex', CUDA, torch.bfloat16, 64, False, (2048, 2048), True)
    assert attention_kernel('auto', CUDA, torch.bfloat16, 64, False, (2048, 2048), True) == 'sdpa'


@needs_flex
def test_flex_with_a_padding_mask_is_refused() -> None:
    model = random_dit(4)
    x, sigma, positions = two_stream_inputs(4)
    padding = torch.ones_like(x)
    padding[:, -2:] = 0
    set_attention_backend(model, 'flex')
    with torch.no_grad(), pytest.raises(ValueError, match='padding.*Use attn_backend=sdpa'):
        model(x, sigma, attention_mask=padding, attn_mask=block_diffusion_mask(4, 2, 'cpu'), positions=positions)


@needs_flex
def test_flex_training_on_cpu_is_refused() -> None:
    model = random_dit(5).train()
    algorithm = BD3LM(LogLinear(), MASK, block_size=2)
    set_attention_backend(model, 'flex')
    with pytest.raises(ValueError, match='no backward on CPU.*Use attn_backend=sdpa'):
        algorithm.loss(model, torch.randint(0, MASK, (2, 8)), torch.ones(2, 8))


def test_unknown_backend_names_the_valid_ones() -> None:
    model = random_dit(6)
    message = "attn_backend must be one of auto, sdpa, flex; got 'flash'"
    with pytest.raises(ValueError, match=message):
        model.attn_backend = 'flash'
    with pytest.raises(ValueError, match=message):
        set_attention_backend(model, 'flash')
    with pytest.raises(ValueError, match=message):
        dit.attention(torch.zeros(1, 4, 3, 2, 8), False, backend='flash')
    assert model.attn_backend == 'auto'


def test_set_attention_backend_reaches_every_dit() -> None:
    holder = torch.nn.ModuleDict({'backbone': random_dit(7), 'ema': random_dit(8), 'head': torch.nn.Linear(2, 2)})
    assert set_attention_backend(holder, 'flex') == 2
    assert holder['backbone'].attn_backend == holder['ema'].attn_backend == 'flex'
    assert 'attn_backend' not in DiT.__init__.__code__.co_varnames  # not architecture: not in checkpoints
    assert all('attn_backend' not in name for name in holder.state_dict())
    assert set_attention_backend(torch.nn.Linear(2, 2), 'auto') == 0
    with pytest.raises(ValueError, match='attn_backend=sdpa applies to the DiT.*leave attn_backend=auto'):
        set_attention_backend(torch.nn.Linear(2, 2), 'sdpa')


# --------------------------------------------------------------------------- compiled kernels


@pytest.mark.slow
@needs_flex
def test_compiled_cpu_kernel_skips_tiles_and_matches_sdpa() -> None:
    """The compiled CPU kernel walks the BlockMask's tile lists, as the CUDA one does (~30 s compile)."""
    length, block_size = 320, 16  # 2L = 640: 5 x 5 tiles, some empty, the last ones partial
    mask = block_diffusion_mask(length, block_size, 'cpu')
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 2 * length, 16, generator=gen).unbind(0)  # each (B, H, 2L, D)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = torch.compile(dit._flex_attention)(q, k, v, block_mask=dit.dense_block_mask(mask, CPU))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def relative_error(got: Tensor, expected: Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize(('length', 'block_size'), [(1024, 16), (200, 4)])
def test_flex_matches_sdpa_on_cuda_in_bf16(length: int, block_size: int) -> None:
    """Logits, BD3-LM loss and gradients under bf16 autocast: flex is as close to fp32 as SDPA is.

    (1024, 16) is what ``auto`` sends to FlexAttention (2L = 2048, mostly empty tiles); (200, 4)
    has partial edge tiles.
    """
    model = random_dit(9, hidden=128, heads=4).cuda()  # head size 32 (the CUDA kernel needs >= 16)
    algorithm = BD3LM(LogLinear(), MASK, block_size=block_size)
    x0 = torch.randint(0, MASK, (2, length), device='cuda')
    draws = Draws(time=torch.rand(2, device='cuda'), mask=torch.rand(2, length, device='cuda'))
    ones = torch.ones(2, length, device='cuda')
    mask = block_diffusion_mask(length, block_size, CUDA)
    x, sigma, positions = two_stream_inputs(length, device=CUDA)

    def run(backend: str, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, per-token NELBO, all gradients flattened) with ``backend`` under autocast to ``dtype``."""
        model.zero_grad()
        with torch.autocast('cuda', dtype=dtype, enabled=dtype != torch.float32):
            with torch.no_grad():
                logits = logits_with(model, backend, x, sigma, mask, positions)
            nll = algorithm.loss(model, x0, ones, draws=draws).nll
        nll.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters()])
        return logits.float(), nll.detach().float(), grads.float()

    reference = run('sdpa', torch.float32)
    sdpa, flex = run('sdpa', torch.bfloat16), run('flex', torch.bfloat16)
    assert dit.attention_kernel('auto', CUDA, torch.bfloat16, 32, False, tuple(mask.shape), True) == (
        'flex' if 2 * length >= dit.FLEX_AUTO_MIN_LENGTH else 'sdpa')
    torch.testing.assert_close(flex[0], sdpa[0], rtol=5e-2, atol=5e-2)
    for name, got, base, ref in zip(('logits', 'nll', 'grads'), flex, sdpa, reference, strict=True):
        error, baseline = relative_error(got, ref), relative_error(base, ref)
        assert error <= max(2 * baseline, 1e-2), f'{name}: flex bf16 {error:.2e} vs sdpa bf16 {baseline:.2e}'
