"""Bidirectional Mamba (DiMamba) denoiser backbone: a Caduceus-style alternative to the DiT.

Same interface as :class:`models.dit.DiT`: tokens ``x_t`` (B, L) and the total noise ``sigma``
(B,) -> unnormalised logits (B, L, V). Instead of attention every block mixes the sequence with
a selective state-space model (Mamba, Gu & Dao 2023) run twice, once left to right and once on
the reversed sequence; the two outputs are added, so position i sees tokens on both sides.

Per direction, with ``E = expand * D`` channels, state size ``N`` and ``dt_rank = ceil(D / 16)``::

    x, z  = in_proj(h).chunk(2)                       # (B, L, E) each
    x     = SiLU(causal_depthwise_conv(x))            # kernel d_conv, zero history
    dt, B, C = x_proj(x).split(dt_rank, N, N)         # B, C: (B, L, N)
    delta = softplus(dt_proj(dt))                     # (B, L, E), step sizes
    h_t   = exp(delta_t A) * h_{t-1} + delta_t B_t x_t, A = -exp(A_log)    # state (B, E, N)
    y_t   = <C_t, h_t> + D x_t
    out   = out_proj(y * SiLU(z))

Direction weights: as in the original (Caduceus' ``bidirectional_weight_tie=True``) the
reverse direction shares ``in_proj`` and ``out_proj`` (most of the parameters) with the forward
one and has its own ``conv1d``, ``x_proj``, ``dt_proj``, ``A_log`` and ``D``. Since both
projections are linear without bias, ``in_proj`` runs once and ``out_proj`` once on the sum
``y_fwd + flip(y_rev)``, which is the same as projecting each direction separately.

Time conditioning (``conditioning``), ``c = SiLU(sigma_map(sigma))``:

- ``adaln``: c (cond_dim) modulates every block, ``x = x + gate * mixer(norm(x) * (1 + scale) + shift)``,
  and the output norm, as in the DiT (zero-initialised, so blocks start as the identity).
- ``add``: c (hidden_size) is added to every token embedding.
- ``concat``: c (cond_dim) is concatenated to every token embedding; the blocks and the output
  layer then have width ``hidden_size + cond_dim``.

Kernels: the ``mamba-ssm`` selective scan and the ``causal-conv1d`` convolution are used when
they are installed and the tensors are on CUDA; otherwise (CPU, or ``use_kernels=False``) the
PyTorch reference below computes the same function (:func:`selective_scan_reference`,
a sequential scan in float32, and :func:`torch.nn.functional.conv1d`). The reference builds
(B, L, E, N) float32 tensors per scan (recomputed in the backward pass rather than stored) and
loops over L in Python: fine on CPU and for short sequences, but training at the paper's
scale (L = 1024) on a GPU wants the kernels.

Padding (``attention_mask`` (B, L), 1 = real token, 0 = padding): a scan cannot skip keys the
way attention does, so padding is removed inside each mixer: the convolution input is zeroed
at padded positions and their step size is forced to ``delta = 0``, so the state crosses them
unchanged (no decay, no input). The logits at real tokens then do not depend on the padded
token ids, and when the real tokens are one contiguous span (right or left padding) they equal
the logits of the sequence with the padding cut off. Logits at padded positions are meaningless.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.dit import TimestepEmbedder, TokenEmbedding, gated_residual, modulate, to_key_padding_mask

try:  # optional CUDA kernels, detected once; everything works without them
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _selective_scan_fn
except ImportError:
    _selective_scan_fn = None
try:
    from causal_conv1d import causal_conv1d_fn as _causal_conv1d_fn
except ImportError:
    _causal_conv1d_fn = None

MAMBA_SSM_AVAILABLE: bool = _selective_scan_fn is not None
CAUSAL_CONV1D_AVAILABLE: bool = _causal_conv1d_fn is not None

Conditioning = Literal["adaln", "concat", "add"]
CONDITIONINGS: tuple[str, ...] = get_args(Conditioning)

DT_MIN, DT_MAX = 1e-3, 1e-1  # initial step sizes softplus(dt_proj.bias) are log-uniform in [DT_MIN, DT_MAX]
DT_INIT_FLOOR = 1e-4  # lower clamp of those initial step sizes
EMBED_INIT_STD = 0.02  # token embedding init, as in Mamba / Caduceus
RMS_NORM_EPS = 1e-5
# Pre-softplus step size at padded positions: softplus(-1e4 + bias) is exactly 0 in float32
# (and so is its gradient), so the scan state crosses padding unchanged.
MASKED_DT = -1e4


# --------------------------------------------------------------------------- kernels and references


def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None, use_kernel: bool = True) -> Tensor:
    """Depthwise causal convolution followed by SiLU.

    ``out[b, e, t] = SiLU(bias[e] + sum_k weight[e, k] * x[b, e, t - K + 1 + k])`` with
    ``x = 0`` before the start (K = kernel width), i.e. position t sees only ``x[..., :t + 1]``.

    Args:
        x: (B, E, L) input channels.
        weight: (E, K) one filter per channel.
        bias: (E,) or None.
        use_kernel: use ``causal_conv1d_fn`` when it is installed and ``x`` is on CUDA.

    Returns:
        (B, E, L), dtype of ``x``.
    """
    weight = weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if use_kernel and CAUSAL_CONV1D_AVAILABLE and x.is_cuda:
        return _causal_conv1d_fn(x.contiguous(), weight.contiguous(), bias, activation="silu")
    width = weight.shape[1]
    out = F.conv1d(F.pad(x, (width - 1, 0)), weight[:, None, :], bias, groups=x.shape[1])  # (B, E, L)
    return F.silu(out)


def selective_scan_reference(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor, delta_bias: Tensor
) -> Tensor:
    """The selective scan of Mamba in PyTorch, sequential over L, computed in float32.

    With ``d_t = softplus(delta[:, :, t] + delta_bias)`` (B, E) and ``h_0 = 0``:
    ``h_t = exp(d_t A) * h_{t-1} + (d_t u_t) B_t`` (B, E, N),
    ``y_t = sum_n C_t[n] h_t[:, :, n] + D u_t``, ``out_t = y_t * SiLU(z_t)``.
    This is the function ``mamba_ssm``'s ``selective_scan_fn(..., delta_softplus=True)`` computes.

    Args:
        u: (B, E, L) input.
        delta: (B, E, L) step sizes before the softplus.
        A: (E, N) state matrix (diagonal per channel, negative).
        B: (B, N, L) input projection per position.
        C: (B, N, L) output projection per position.
        D: (E,) skip connection.
        z: (B, E, L) gate.
        delta_bias: (E,) added to ``delta`` before the softplus.

    Returns:
        (B, E, L), dtype of ``u``.
    """
    dtype = u.dtype
    u, delta, A, B, C, D, z = (t.float() for t in (u, delta, A, B, C, D, z))
    with torch.autocast(device_type=u.device.type, enabled=False):  # the einsum would run in bf16
        steps = F.softplus(delta + delta_bias.float()[None, :, None]).transpose(1, 2)  # (B, L, E)
        decay = torch.exp(steps[..., None] * A)  # (B, L, E, N)
        drive = (steps * u.transpose(1, 2))[..., None] * B.transpose(1, 2)[:, :, None, :]  # (B, L, E, N)
        state = torch.zeros_like(decay[:, 0])  # (B, E, N)
        states = []
        # unbind, not decay[:, t]: the backward of L separate selects would write L full-size zero tensors.
        for decay_t, drive_t in zip(decay.unbind(1), drive.unbind(1), strict=True):
            state = torch.addcmul(drive_t, decay_t, state)  # (B, E, N)
            states.append(state)
        y = torch.einsum("blen,bnl->bel", torch.stack(states, dim=1), C)  # (B, E, L)
        y = y + D[None, :, None] * u
        return (y * F.silu(z)).to(dtype)


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor, delta_bias: Tensor,
    use_kernel: bool = True,
) -> Tensor:
    """:func:`selective_scan_reference` (same arguments and shapes), through the ``mamba_ssm``
    CUDA kernel when it is installed, ``u`` is on CUDA and ``use_kernel`` is set."""
    if use_kernel and MAMBA_SSM_AVAILABLE and u.is_cuda:
        return _selective_scan_fn(u, delta, A, B, C, D.float(), z=z, delta_bias=delta_bias.float(),
                                  delta_softplus=True)
    if torch.is_grad_enabled():
        # Recomputed in the backward pass: otherwise every block would keep three (B, L, E, N)
        # float32 tensors alive until then; this way only one scan's are, at a time.
        return checkpoint(selective_scan_reference, u, delta, A, B, C, D, z, delta_bias, use_reentrant=False)
    return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias)


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + 1e-5) * weight`` over the last dimension, in float32 (autocast off)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, L, D) -> (B, L, D) float32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.rms_norm(x.float(), [self.dim], self.weight.float(), eps=RMS_NORM_EPS)


class SelectiveSSM(nn.Module):
    """One scan direction of a Mamba mixer: causal conv, input-dependent (delta, B, C), scan.

    Parameters: ``conv1d`` (E, 1, K) + bias, ``x_proj`` E -> dt_rank + 2N, ``dt_proj``
    dt_rank -> E (+ bias), ``A_log`` (E, N) with ``A = -exp(A_log)``, ``D`` (E,).
    Initialisation as in Mamba: ``A = -[1, ..., N]`` per channel, ``D = 1``, ``dt_proj.bias``
    the inverse softplus of step sizes log-uniform in [DT_MIN, DT_MAX].
    """

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int) -> None:
        super().__init__()
        self.d_state = d_state
        self.dt_rank = dt_rank
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        bound = dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        log_dt = torch.rand(d_inner) * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)
        dt = torch.exp(log_dt).clamp(min=DT_INIT_FLOOR)  # (E,)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        states = torch.arange(1, d_state + 1, dtype=torch.float32)  # (N,)
        self.A_log = nn.Parameter(torch.log(states).repeat(d_inner, 1))  # (E, N)
        self.D = nn.Parameter(torch.ones(d_inner))

    def forward(self, x: Tensor, z: Tensor, real: Tensor | None, use_kernels: bool) -> Tensor:
        """x, z (B, E, L) from ``in_proj``; real (B, 1, L) bool or None -> y * SiLU(z) (B, E, L)."""
        if real is not None:
            x = x * real  # padding never enters the convolution window of a real token
        x = causal_conv1d_silu(x, self.conv1d.weight[:, 0], self.conv1d.bias, use_kernels)  # (B, E, L)
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (B, E, L), bias added in the scan
        if real is not None:
            delta = delta.masked_fill(~real, MASKED_DT)  # delta = 0 at padding: the state passes unchanged
        A = -torch.exp(self.A_log.float())  # (E, N)
        return selective_scan(x, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D, z, self.dt_proj.bias,
                              use_kernels)


class BiMambaMixer(nn.Module):
    """Bidirectional Mamba mixer: ``out_proj(y_fwd + flip(y_rev))``, (B, L, D) -> (B, L, D).

    ``in_proj`` (D -> 2E) and ``out_proj`` (E -> D), both without bias, are shared by the
    directions; each direction has its own :class:`SelectiveSSM`. ``y_rev`` is the forward
    computation on the sequence reversed along L. ``bidirectional=False`` keeps only the
    forward direction (a causal mixer; an ablation).
    """

    def __init__(
        self, dim: int, d_state: int, d_conv: int, expand: int, bidirectional: bool = True, use_kernels: bool = True
    ) -> None:
        super().__init__()
        d_inner = expand * dim
        dt_rank = math.ceil(dim / 16)
        self.use_kernels = use_kernels
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.forward_ssm = SelectiveSSM(d_inner, d_state, d_conv, dt_rank)
        self.reverse_ssm = SelectiveSSM(d_inner, d_state, d_conv, dt_rank) if bidirectional else None
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, h: Tensor, real: Tensor | None = None) -> Tensor:
        """h (B, L, D), real (B, L) bool (True at real tokens) or None -> (B, L, D)."""
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)  # each (B, E, L)
        real = None if real is None else real[:, None, :]  # (B, 1, L)
        y = self.forward_ssm(x, z, real, self.use_kernels)  # (B, E, L)
        if self.reverse_ssm is not None:  # the same scan on the sequence reversed along L, flipped back
            real_rev = None if real is None else real.flip(-1)
            y = y + self.reverse_ssm(x.flip(-1), z.flip(-1), real_rev, self.use_kernels).flip(-1)  # (B, E, L)
        return self.out_proj(y.transpose(1, 2))  # (B, L, D)


class DiMambaBlock(nn.Module):
    """Pre-norm residual block around a :class:`BiMambaMixer`; residual stream in float32.

    adaLN (``cond_dim`` given): ``(shift, scale, gate) = adaLN_modulation(c)`` and
    ``x = x + gate * dropout(mixer(modulate(norm(x), shift, scale)))``, with
    ``adaLN_modulation`` zero-initialised (the block starts as the identity).
    Otherwise: ``x = x + dropout(mixer(norm(x)))``.
    """

    def __init__(
        self, dim: int, cond_dim: int | None, d_state: int, d_conv: int, expand: int, dropout: float,
        bidirectional: bool = True, use_kernels: bool = True,
    ) -> None:
        super().__init__()
        self.norm = RMSNorm(dim)
        self.mixer = BiMambaMixer(dim, d_state, d_conv, expand, bidirectional, use_kernels)
        self.dropout = nn.Dropout(dropout)
        self.adaLN_modulation = None
        if cond_dim is not None:
            self.adaLN_modulation = nn.Linear(cond_dim, 3 * dim)
            nn.init.zeros_(self.adaLN_modulation.weight)
            nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: Tensor, c: Tensor | None, real: Tensor | None) -> Tensor:
        """x (B, L, D), c (B, cond_dim) or None, real (B, L) bool or None -> (B, L, D) float32."""
        h = self.norm(x)  # (B, L, D)
        if self.adaLN_modulation is None:
            return x.float() + self.dropout(self.mixer(h, real)).float()
        shift, scale, gate = self.adaLN_modulation(c)[:, None].chunk(3, dim=2)  # each (B, 1, D)
        h = self.mixer(modulate(h, shift, scale), real)  # (B, L, D)
        return gated_residual(x.float(), gate, self.dropout(h))


class DiMambaOutput(nn.Module):
    """Output head ``linear(norm_final(x))``; with adaLN ``linear(modulate(norm_final(x), shift, scale))``.

    ``linear`` has no bias and Linear's default init; ``adaLN_modulation`` is zero-initialised.
    """

    def __init__(self, dim: int, vocab_size: int, cond_dim: int | None) -> None:
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, vocab_size, bias=False)
        self.adaLN_modulation = None
        if cond_dim is not None:
            self.adaLN_modulation = nn.Linear(cond_dim, 2 * dim)
            nn.init.zeros_(self.adaLN_modulation.weight)
            nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: Tensor, c: Tensor | None) -> Tensor:
        """x (B, L, D), c (B, cond_dim) or None -> (B, L, vocab_size)."""
        h = self.norm_final(x)  # (B, L, D)
        if self.adaLN_modulation is not None:
            shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)  # each (B, 1, D)
            h = modulate(h, shift, scale)
        return self.linear(h)


# --------------------------------------------------------------------------- model


def check_dimamba_sizes(dropout: float, conditioning: str, **sizes: int) -> None:
    """Validate sizes (all positive), dropout in [0, 1) and the conditioning name (listing the valid ones)."""
    for name, value in sizes.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if conditioning not in CONDITIONINGS:
        raise ValueError(f"Unknown conditioning={conditioning!r}. Valid choices: {list(CONDITIONINGS)}.")


class DiMamba(nn.Module):
    """Bidirectional Mamba denoiser: ``(indices (B, L), sigma (B,)) -> logits (B, L, vocab_size)``.

    ``c = SiLU(sigma_map(sigma))`` enters as set by ``conditioning`` (see the module docstring);
    then ``n_blocks`` :class:`DiMambaBlock` and :class:`DiMambaOutput`. Parameter names
    ``vocab_embed.embedding`` and ``output_layer.linear`` match the DiT's.

    Args:
        vocab_size: number of token ids, mask token included.
        hidden_size: token embedding width D (the block width, plus ``cond_dim`` with ``concat``).
        cond_dim: width of c for ``adaln`` and ``concat`` (``add`` uses ``hidden_size``).
        n_blocks: number of bidirectional Mamba blocks.
        dropout: dropout on every block's residual branch.
        d_state: SSM state size N per channel.
        d_conv: width of the causal depthwise convolution.
        expand: inner width E = expand * block width.
        conditioning: ``adaln``, ``concat`` or ``add``.
        bidirectional: False keeps only the left-to-right scan (a causal ablation).
        use_kernels: use the mamba-ssm / causal-conv1d kernels on CUDA when installed;
            False forces the PyTorch reference everywhere.
    """

    causal: ClassVar[bool] = False  # bidirectional: for the diffusion algorithms (algorithms.Algorithm.causal)

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        cond_dim: int,
        n_blocks: int,
        dropout: float = 0.1,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        conditioning: Conditioning = "adaln",
        bidirectional: bool = True,
        use_kernels: bool = True,
    ) -> None:
        super().__init__()
        check_dimamba_sizes(dropout, conditioning, vocab_size=vocab_size, hidden_size=hidden_size,
                            cond_dim=cond_dim, n_blocks=n_blocks, d_state=d_state, d_conv=d_conv, expand=expand)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.conditioning = conditioning
        width = hidden_size + cond_dim if conditioning == "concat" else hidden_size
        block_cond = cond_dim if conditioning == "adaln" else None

        self.vocab_embed = TokenEmbedding(vocab_size, hidden_size)
        nn.init.normal_(self.vocab_embed.embedding, std=EMBED_INIT_STD)
        self.sigma_map = TimestepEmbedder(hidden_size if conditioning == "add" else cond_dim)
        self.blocks = nn.ModuleList(
            DiMambaBlock(width, block_cond, d_state, d_conv, expand, dropout, bidirectional, use_kernels)
            for _ in range(n_blocks)
        )
        self.output_layer = DiMambaOutput(width, vocab_size, block_cond)
        with torch.no_grad():  # GPT-2 style: each residual branch's last projection scaled by 1/sqrt(depth)
            for block in self.blocks:
                block.mixer.out_proj.weight.div_(math.sqrt(n_blocks))

    def forward(self, indices: Tensor, sigma: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """indices (B, L) long, sigma (B,) float -> logits (B, L, vocab_size).

        ``attention_mask`` (B, L), 1 = real token and 0 = padding: padded positions are
        skipped by every scan (see the module docstring), so the logits at real tokens do
        not depend on the padding. None or all ones: no masking.
        """
        if indices.ndim != 2:
            raise ValueError(f"indices must be (B, L), got shape {tuple(indices.shape)}")
        if sigma.shape != indices.shape[:1]:
            raise ValueError(f"sigma must be (B,) = ({indices.shape[0]},), got shape {tuple(sigma.shape)}")
        real = to_key_padding_mask(attention_mask, indices)  # (B, L) bool or None
        x = self.vocab_embed(indices)  # (B, L, D)
        c = F.silu(self.sigma_map(sigma))  # (B, cond_dim), (B, D) for add
        if self.conditioning == "add":
            x = x + c[:, None, :]
        elif self.conditioning == "concat":
            x = torch.cat([c[:, None, :].expand(-1, x.shape[1], -1).to(x.dtype), x], dim=-1)  # (B, L, D + cond)
        block_c = c if self.conditioning == "adaln" else None
        for block in self.blocks:
            x = block(x, block_c, real)  # (B, L, width)
        return self.output_layer(x, block_c)  # (B, L, V)
