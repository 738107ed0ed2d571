"""Training throughput, model FLOP utilisation and sampling speed of MDLM on the current device.

    python bench/benchmark.py             # CUDA if available, else CPU
    python bench/benchmark.py --quick     # smoke run, seconds
    python bench/benchmark.py --json bench_results/b.json   # also every number as JSON

Prints two Markdown tables and writes them to ``--out``
(default ``bench_results/benchmark_<device>.md``):

1. **Training throughput** per model size: one full training step as the framework does it
   (MDLM loss on random token ids, backward, grad-norm clip, AdamW step, EMA update), bf16
   autocast on CUDA and fp32 on CPU. Each size runs in a fresh subprocess of this script
   (the internal ``--_one-train SIZE`` flag, which prints one JSON line), so its peak memory
   (``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS on CPU) is not
   contaminated by the sizes measured before it. Next to tokens/s each row has the model
   FLOPs of a step (:func:`step_flops`), the achieved TFLOP/s and the MFU: achieved / the
   machine's matmul rate measured here for the same dtype (:func:`measure_matmul_peak`, bf16 on
   CUDA, fp32 on CPU; on a GPU of :data:`NOMINAL_BF16_TFLOPS` also / its data-sheet peak), and
   the time to fetch one batch through ``dataloader.DataModule`` relative to a step
   (:func:`measure_data`: the loader is not the bottleneck when this is small).
2. **Sampling**: seconds per sample and the number of network calls (NFE) of the ``ddpm``
   and ``ddpm_cache`` samplers for several step counts, with an untrained, randomly
   perturbed model.

Model sizes come from ``configs/model/<name>.yaml`` (``*-dimamba`` sizes build the bidirectional
Mamba of ``models/dimamba.py``, the others the DiT); optimizer, EMA, time sampling and
sampler settings from the defaults in ``configs/config.yaml`` and ``configs/noise/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/benchmark.py`: make the repo importable
    sys.path.insert(0, str(ROOT))

import registry  # noqa: E402
from algorithms import MDLM  # noqa: E402
from models.dimamba import MAMBA_SSM_AVAILABLE, DiMamba  # noqa: E402
from models.dit import FLASH_ATTN_AVAILABLE, DiT  # noqa: E402
from models.ema import ExponentialMovingAverage  # noqa: E402
from noise_schedule import LogLinear  # noqa: E402

CONFIGS = ROOT / "configs"
DEFAULT_VOCAB = 50258  # GPT-2's 50257 tokens + the mask token
GRAD_CLIP = 1.0  # trainer.gradient_clip_val
PERTURB_STD = 0.02  # std of the random weights used for sampling (non-trivial logits)
PREDICTORS = ("ddpm", "ddpm_cache")
MIB = 2**20
DIMAMBA_SUFFIX = "-dimamba"  # size presets named *-dimamba build the bidirectional Mamba, the rest the DiT

PER_SEQUENCE_LINEARS = ("sigma_map", "adaLN_modulation")  # Linear layers fed the noise embedding (B, .)
PEAK_REPEATS = 5  # timed repeats of the peak matmul; the median counts
PEAK_INNER = {"cuda": 10, "cpu": 1}  # matmuls per timed repeat: one 4096^3 bf16 matmul is ~0.2 ms on an H100
PEAK_DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}  # the dtype the training matmuls run in
DATA_BATCHES = 10  # timed batches of the data-loading measurement (after one untimed)
# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched as a
# case-insensitive substring of torch.cuda.get_device_name(); the first match wins, so the
# PCIe / NVL variants come before the SXM name they contain.
NOMINAL_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
    ("A100", 312.0), ("A5000", 111.1),
)

# Per-device defaults; None in the parsed arguments means "use these". The CPU ones keep
# the whole default run under ~5 minutes on 2 cores.
DEVICE_DEFAULTS: dict[str, dict[str, object]] = {
    "cuda": {"train_length": 1024, "train_batch": 16, "warmup": 5, "timed_steps": 20,
             "sample_size": "tiny", "sample_length": 1024, "steps": "128,1024,4096", "peak_size": 4096},
    "cpu": {"train_length": 128, "train_batch": 4, "warmup": 2, "timed_steps": 5,
            "sample_size": "micro", "sample_length": 128, "steps": "32,128,512", "peak_size": 2048},
}
QUICK_DEFAULTS: dict[str, object] = {
    "train_sizes": "micro", "train_length": 16, "train_batch": 2, "warmup": 1, "timed_steps": 1,
    "sample_size": "micro", "sample_length": 16, "steps": "4,8", "peak_size": 512,
}
COMMON_DEFAULTS: dict[str, object] = {"train_sizes": "tiny,small", "sample_batch": 1}

TRAIN_COLUMNS = ("model", "params (non-embedding, M)", "batch x length", "tokens/s", "ms/step",
                 "output rows / token", "GFLOP/step", "TFLOP/s", "MFU (vs measured peak)")
NOMINAL_COLUMN = "MFU (vs nominal bf16 peak)"  # CUDA only
DATA_COLUMN = "data / step"
SAMPLE_COLUMNS = ("predictor", "steps", "NFE", "s/sample", "speed-up vs ddpm")


# --------------------------------------------------------------------------- configuration


def model_sizes() -> list[str]:
    return sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))


def load_model_size(name: str) -> DictConfig:
    """The size preset ``configs/model/<name>.yaml``; an unknown name lists the valid ones."""
    path = CONFIGS / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"Unknown model size {name!r}. Valid sizes: {', '.join(model_sizes())}.")
    return OmegaConf.load(path)


def framework_defaults() -> DictConfig:
    """The root config (``configs/config.yaml``): optimizer, EMA, time sampling, sampler."""
    return OmegaConf.load(CONFIGS / "config.yaml")


def build_backbone(size: str, vocab_size: int) -> DiT | DiMamba:
    cfg = load_model_size(size)
    if size.endswith(DIMAMBA_SUFFIX):
        return DiMamba(vocab_size=vocab_size, hidden_size=cfg.hidden_size, cond_dim=cfg.cond_dim,
                       n_blocks=cfg.n_blocks, dropout=cfg.dropout, d_state=cfg.d_state, d_conv=cfg.d_conv,
                       expand=cfg.expand, conditioning=cfg.conditioning)
    return DiT(vocab_size=vocab_size, hidden_size=cfg.hidden_size, cond_dim=cfg.cond_dim,
               n_blocks=cfg.n_blocks, n_heads=cfg.n_heads, dropout=cfg.dropout)


def build_algorithm(root: DictConfig, mask_index: int) -> MDLM:
    noise_cfg = OmegaConf.load(CONFIGS / "noise" / "loglinear.yaml")
    return MDLM(noise=LogLinear(eps=noise_cfg.eps), mask_index=mask_index,
                sampling_eps=root.training.sampling_eps,
                antithetic_sampling=root.training.antithetic_sampling,
                time_conditioning=root.time_conditioning)


def non_embedding_params(model: DiT | DiMamba) -> int:
    """Parameters except the token embedding (V x D) and the output projection (D x V, + V for the DiT)."""
    vocab_sized = {id(model.vocab_embed.embedding), id(model.output_layer.linear.weight),
                   id(model.output_layer.linear.bias)}
    return sum(p.numel() for p in model.parameters() if id(p) not in vocab_sized)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the framework's ``bf16-mixed``), nothing (fp32) on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timer(device: torch.device) -> Iterator[list[float]]:
    """Wall time of the block in seconds, appended to the yielded list on exit."""
    elapsed: list[float] = []
    synchronize(device)
    start = time.perf_counter()
    yield elapsed
    synchronize(device)
    elapsed.append(time.perf_counter() - start)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, B on macOS)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


# --------------------------------------------------------------------------- FLOPs and peak


@dataclass(frozen=True)
class FlopModel:
    """The weights of a backbone's matmuls, grouped by how often they run per training sequence."""

    token_params: int  # Linear weights applied at every position (attention q/k/v/out and MLP; Mamba projections)
    sequence_params: int  # Linear weights applied once per sequence (noise embedding, adaLN modulations)
    output_params: int  # the output projection D x V, applied only at the rows the model outputs
    attention_layers: int  # blocks with softmax attention over the whole sequence
    attention_width: int  # D = heads x head size of those blocks


def flop_model(model: DiT | DiMamba) -> FlopModel:
    """Count the Linear weights of ``model`` (biases and elementwise ops left out).

    ``output_layer.linear`` is the output projection; a Linear whose name contains one of
    :data:`PER_SEQUENCE_LINEARS` acts on the noise embedding c (B, cond_dim), once per sequence;
    every other Linear acts on every position. Blocks with an ``attn_qkv`` projection attend.
    """
    output = model.output_layer.linear
    token = sequence = 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is output:
            continue
        if any(part in name for part in PER_SEQUENCE_LINEARS):
            sequence += module.weight.numel()
        else:
            token += module.weight.numel()
    attention = [m for m in model.modules() if isinstance(getattr(m, "attn_qkv", None), nn.Linear)]
    width = attention[0].attn_qkv.out_features // 3 if attention else 0
    return FlopModel(token, sequence, output.weight.numel(), len(attention), width)


def step_flops(fm: FlopModel, sequences: float, length: int, output_rows: float) -> float:
    """Model FLOPs of one training step (forward + backward) over ``sequences`` sequences of ``length``.

    With P_tok, P_seq, P_out = D V the weights of :class:`FlopModel`, n_attn attention layers of
    width D, S sequences of length L and N_out rows through the output layer::

        FLOPs = 6 (P_tok S L + P_seq S + P_out N_out) + 12 n_attn L D S L

    A multiply-add is 2 FLOPs and the backward pass costs twice the forward (gradients of the
    inputs and of the weights), hence 6 per weight and row. Attention forward is q k^T and the
    weighted sum of v, 2 L D each per query, so 4 L D per token and layer, 12 L D with the
    backward. N_out is what the DiT computes: the 50k-vocabulary projection runs at masked
    positions only (``output_mask``), about half of them under the loglinear schedule; the
    DiMamba has no ``output_mask``, so there N_out = S L. Model FLOPs, not hardware FLOPs:
    recomputation (the PyTorch scan's checkpoint, flash-attn's backward) is not counted, nor
    are norms, activations, softmax, rotary, the Mamba scan and convolution, the optimizer and
    the EMA (elementwise, a few percent of the total for the DiT).
    """
    tokens = sequences * length
    dense = fm.token_params * tokens + fm.sequence_params * sequences + fm.output_params * output_rows
    return 6.0 * dense + 12.0 * fm.attention_layers * length * fm.attention_width * tokens


@contextlib.contextmanager
def count_forward_rows(model: DiT | DiMamba) -> Iterator[dict[str, int]]:
    """Count what ``model`` computes while the block runs: sequences, their length, output-layer rows.

    Forward hooks read shapes only (no GPU synchronisation): ``sequences`` sums B over the
    model's forward calls, ``length`` is the last call's L, ``output_rows`` sums the rows of the
    output layer's result ((B, L, V) -> B L; (N, V) under ``output_mask`` -> N).
    """
    counts = {"sequences": 0, "length": 0, "output_rows": 0}

    def on_model(module: nn.Module, args: tuple[Any, ...]) -> None:
        counts["sequences"] += args[0].shape[0]  # indices (B, L)
        counts["length"] = args[0].shape[1]

    def on_output(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        counts["output_rows"] += out.shape[:-1].numel()

    handles = [model.register_forward_pre_hook(on_model), model.output_layer.register_forward_hook(on_output)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def measure_matmul_peak(device: torch.device, size: int, dtype: torch.dtype) -> float:
    """FLOP/s of a (size x size) @ (size x size) matmul in ``dtype``: 2 size^3 FLOPs per product.

    One untimed warm-up, then :data:`PEAK_REPEATS` timed repeats of :data:`PEAK_INNER` products
    each; the median repeat counts. What the hardware and the BLAS library reach here, the
    ceiling a model's matmuls can approach.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    out = torch.empty_like(a)
    inner = PEAK_INNER[device.type]
    torch.matmul(a, b, out=out)
    seconds = []
    for _ in range(PEAK_REPEATS):
        with timer(device) as elapsed:
            for _ in range(inner):
                torch.matmul(a, b, out=out)
        seconds.append(elapsed[0])
    return 2.0 * size**3 * inner / statistics.median(seconds)


def nominal_bf16_tflops(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak of a GPU named ``device_name`` (:data:`NOMINAL_BF16_TFLOPS`), or None."""
    for pattern, tflops in NOMINAL_BF16_TFLOPS:
        if pattern.lower() in device_name.lower():
            return tflops
    return None


@dataclass
class Peak:
    dtype: str
    size: int
    tflops: float  # measured
    nominal_tflops: float | None  # data sheet, CUDA only


def measure_peak(args: argparse.Namespace, device: torch.device) -> Peak:
    dtype = PEAK_DTYPE[device.type]
    nominal = nominal_bf16_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return Peak(str(dtype).removeprefix("torch."), args.peak_size,
                measure_matmul_peak(device, args.peak_size, dtype) / 1e12, nominal)


# --------------------------------------------------------------------------- data


@dataclass
class DataResult:
    source: str
    batches: int  # timed
    ms_per_batch: float


def build_data(args: argparse.Namespace) -> tuple[Any, str]:
    """The data object ``--data-text`` names (TextFiles), else the built-in corpus (SyntheticData)."""
    # Imported here, not at the top: the data stack (transformers, datasets) would cost every
    # training subprocess, which never loads data, seconds of import.
    from dataloader import SyntheticData, TextFiles

    if args.data_text is not None:
        # valid_path: no validation split is held out (only the training loader is timed)
        data = TextFiles(train_path=str(args.data_text), valid_path=str(args.data_text),
                         tokenizer_name_or_path=args.tokenizer, block_size=args.train_length)
        return data, f"text {args.data_text}, tokenizer {args.tokenizer}"
    blocks = (DATA_BATCHES + 1) * args.train_batch  # the batches it times; the corpus is generated up front
    return SyntheticData(block_size=args.train_length, num_train_sequences=blocks, num_valid_sequences=1,
                         seed=args.seed), "built-in synthetic corpus"


def measure_data(args: argparse.Namespace, device: torch.device) -> DataResult:
    """Mean time to get one training batch (B, L) onto ``device`` through ``dataloader.DataModule``.

    What the training loop waits for per step with the default ``loader.num_workers=0``: the
    loader's next batch (shuffled sampler, collation), the DataModule's padding check and the
    host-to-device copy. The data set is built and the first batch fetched before timing.
    """
    from dataloader import DataModule  # see build_data

    data, source = build_data(args)
    module = DataModule(data, batch_size=args.train_batch, eval_batch_size=args.train_batch,
                        pin_memory=device.type == "cuda", seed=args.seed)
    loader = module.train_dataloader()
    if len(loader) < 2:
        raise ValueError(f"{source}: fewer than 2 batches of {args.train_batch} x {args.train_length} tokens")
    batches = iter(loader)

    def fetch() -> None:
        batch = module.on_before_batch_transfer(next(batches), 0)
        batch["input_ids"].to(device, non_blocking=True)

    fetch()
    timed = min(DATA_BATCHES, len(loader) - 1)
    with timer(device) as elapsed:
        for _ in range(timed):
            fetch()
    return DataResult(source, timed, 1000 * elapsed[0] / timed)


# --------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    size: str
    params: int  # non-embedding
    batch: int
    length: int
    tokens_per_s: float
    ms_per_step: float
    peak_mib: float
    baseline_mib: float  # peak RSS / allocated memory before the model was built
    output_rows_per_token: float  # rows through the output layer / positions (masked fraction for the DiT)
    flops_per_step: float  # model FLOPs, :func:`step_flops`

    def tflops(self) -> float:
        """Achieved model TFLOP/s."""
        return self.flops_per_step / (self.ms_per_step / 1000) / 1e12


def measure_training(size: str, args: argparse.Namespace, device: torch.device) -> TrainResult:
    """Time ``args.timed_steps`` full training steps after ``args.warmup`` untimed ones."""
    root = framework_defaults()
    torch.manual_seed(args.seed)
    baseline = torch.cuda.memory_allocated(device) / MIB if device.type == "cuda" else peak_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    model = build_backbone(size, args.vocab).to(device).train()
    algorithm = build_algorithm(root, mask_index=args.vocab - 1).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=root.optim.lr, betas=(root.optim.beta1, root.optim.beta2),
                                  eps=root.optim.eps, weight_decay=root.optim.weight_decay)
    ema = ExponentialMovingAverage(params, decay=root.training.ema)
    # Real tokens only (the mask index is the last id); one fixed batch: data loading is not timed.
    x0 = torch.randint(0, args.vocab - 1, (args.train_batch, args.train_length), device=device)  # (B, L)

    def step() -> None:
        with autocast(device):
            loss = algorithm.loss(model, x0, torch.ones_like(x0)).nll.mean()  # every token counts
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        ema.update(params)

    for _ in range(args.warmup):
        step()
    with count_forward_rows(model) as counts, timer(device) as elapsed:
        for _ in range(args.timed_steps):
            step()
    seconds = elapsed[0]
    sequences, rows = counts["sequences"] / args.timed_steps, counts["output_rows"] / args.timed_steps  # per step
    peak = torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else peak_rss_mib()
    return TrainResult(
        size=size,
        params=non_embedding_params(model),
        batch=args.train_batch,
        length=args.train_length,
        tokens_per_s=args.train_batch * args.train_length * args.timed_steps / seconds,
        ms_per_step=1000 * seconds / args.timed_steps,
        peak_mib=peak,
        baseline_mib=baseline,
        output_rows_per_token=rows / (sequences * counts["length"]),
        flops_per_step=step_flops(flop_model(model), sequences, counts["length"], rows),
    )


def train_in_subprocess(size: str, args: argparse.Namespace) -> TrainResult:
    """Run :func:`measure_training` for one size in a fresh interpreter and parse its JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_one-train", size, "--device", args.device,
           "--vocab", str(args.vocab), "--train-length", str(args.train_length),
           "--train-batch", str(args.train_batch), "--warmup", str(args.warmup),
           "--timed-steps", str(args.timed_steps), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"training benchmark for {size!r} failed:\n{proc.stderr}")
    return TrainResult(**json.loads(proc.stdout.strip().splitlines()[-1]))


# --------------------------------------------------------------------------- sampling


@dataclass
class SampleResult:
    predictor: str
    steps: int
    nfe: int
    s_per_sample: float


def measure_sampling(args: argparse.Namespace, device: torch.device) -> list[SampleResult]:
    """Sample an all-mask batch with every predictor and step count, one seeded run each."""
    root = framework_defaults()
    torch.manual_seed(args.seed)
    model = build_backbone(args.sample_size, args.vocab).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, PERTURB_STD)  # adaLN-zero init would give all-zero logits
    algorithm = build_algorithm(root, mask_index=args.vocab - 1).to(device)
    denoiser = algorithm.denoiser(model)
    x = torch.full((args.sample_batch, args.sample_length), algorithm.mask_index, device=device)  # (B, L)

    def run(predictor: str, steps: int) -> tuple[int, float]:
        sampler = registry.target_class("sampler", predictor)(  # the class of configs/sampler/<predictor>.yaml
            **algorithm.sampler_inputs(), steps=steps, eps=root.sampling.eps, noise_removal=root.sampling.noise_removal)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        with torch.no_grad(), autocast(device), timer(device) as elapsed:
            out = sampler.sample(denoiser, x, generator=generator)
        return out.nfe, elapsed[0]

    run("ddpm", 2)  # warm-up: kernels, allocator, lazy initialisation
    results = []
    for steps in args.steps:
        for predictor in PREDICTORS:
            nfe, seconds = run(predictor, steps)
            results.append(SampleResult(predictor, steps, nfe, seconds / args.sample_batch))
    return results


# --------------------------------------------------------------------------- report


def markdown_table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor()
    with contextlib.suppress(OSError):  # platform.processor() is often empty or generic on Linux
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {name or platform.machine()}, {cores} cores, {torch.get_num_threads()} torch threads"


def command_line(argv: list[str]) -> str:
    return shlex.join([Path(sys.executable).name, *argv])


def now() -> str:
    return datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def three_digits(x: float) -> str:
    """``x`` with 3 significant digits, without an exponent from 100 on (700, 1,200; 0.0123)."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def peak_description(peak: Peak, device: torch.device) -> str:
    measured = (f"{three_digits(peak.tflops)} TFLOP/s ({peak.dtype}, {peak.size} x {peak.size} matmul, "
                f"median of {PEAK_REPEATS} x {PEAK_INNER[device.type]})")
    if device.type != "cuda":
        return measured
    nominal = "not in the table" if peak.nominal_tflops is None else f"{peak.nominal_tflops:,.0f} TFLOP/s"
    return f"{measured}; nominal dense bf16 peak: {nominal}"


def header(device: torch.device, argv: list[str]) -> str:
    return "\n".join([
        "# MDLM benchmark",
        "",
        f"- device: {device_description(device)}",
        f"- torch: {torch.__version__}",
        f"- flash-attn: {'available' if FLASH_ATTN_AVAILABLE else 'not available (PyTorch SDPA)'}",
        f"- mamba-ssm (DiMamba sizes): {'available' if MAMBA_SSM_AVAILABLE else 'not available (PyTorch scan)'}",
        f"- date: {now()}",
        f"- command: `{command_line(argv)}`",
    ])


def json_report(args: argparse.Namespace, device: torch.device, argv: list[str], peak: Peak, data: DataResult,
                train: list[TrainResult], sample: list[SampleResult]) -> dict[str, Any]:
    """Every number of the run, for ``--json`` (and ``bench/gpu_check.sh``): one dict, JSON-serialisable."""
    settings = {key: getattr(args, key) for key in (
        "vocab", "seed", "train_sizes", "train_length", "train_batch", "warmup", "timed_steps",
        "sample_size", "sample_length", "sample_batch", "steps", "peak_size")}
    return {
        "device": device_description(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "flash_attn": FLASH_ATTN_AVAILABLE,
        "mamba_ssm": MAMBA_SSM_AVAILABLE,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "date": now(),
        "command": command_line(argv),
        "settings": settings,
        "matmul_peak": asdict(peak),
        "data": asdict(data),
        "training": training_rows(train, peak, data),
        "sampling": [{**asdict(r), "size": args.sample_size, "length": args.sample_length,
                      "batch": args.sample_batch} for r in sample],
    }


def training_rows(results: list[TrainResult], peak: Peak, data: DataResult) -> list[dict[str, Any]]:
    """Each result with its achieved TFLOP/s, MFU (vs the measured and the nominal peak) and data / step."""
    rows = []
    for r in results:
        tflops = r.tflops()
        rows.append({**asdict(r), "tflops": tflops, "mfu": tflops / peak.tflops,
                     "mfu_nominal": None if peak.nominal_tflops is None else tflops / peak.nominal_tflops,
                     "data_to_step": data.ms_per_batch / r.ms_per_step})
    return rows


def training_section(results: list[TrainResult], args: argparse.Namespace, device: torch.device, peak: Peak,
                     data: DataResult) -> str:
    memory = "peak memory (max allocated, MiB)" if device.type == "cuda" else "peak RSS (MiB)"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    nominal = device.type == "cuda"
    columns = (*TRAIN_COLUMNS, *((NOMINAL_COLUMN,) if nominal else ()), DATA_COLUMN, memory)
    rows = []
    for r in training_rows(results, peak, data):
        mfu_nominal = "-" if r["mfu_nominal"] is None else f"{r['mfu_nominal']:.1%}"
        rows.append([r["size"], f"{r['params'] / 1e6:.1f}", f"{r['batch']} x {r['length']}",
                     f"{r['tokens_per_s']:,.0f}", f"{r['ms_per_step']:,.1f}", f"{r['output_rows_per_token']:.2f}",
                     f"{r['flops_per_step'] / 1e9:,.1f}", three_digits(r["tflops"]), f"{r['mfu']:.1%}",
                     *([mfu_nominal] if nominal else []), f"{r['data_to_step']:.2g}", f"{r['peak_mib']:,.0f}"])
    baseline = ", ".join(f"{r.size} {r.baseline_mib:,.0f}" for r in results)
    notes = [
        f"One step = MDLM loss ({precision}) on random token ids (vocab {args.vocab}), backward, "
        f"grad-norm clip {GRAD_CLIP}, AdamW, EMA update; {args.warmup} warm-up + {args.timed_steps} timed steps, "
        "each size in a fresh subprocess.",
        "Non-embedding parameters exclude the token embedding (V x D) and the output projection (D x V, + V for DiT).",
        "GFLOP/step: model FLOPs of forward + backward, 6 (P_tok B L + P_seq B + D V N_out) + 12 n_attn L D B L "
        "(bench/benchmark.py step_flops); output rows / token = N_out / (B L), the positions the output layer ran "
        "at (the DiT: masked positions only). TFLOP/s = GFLOP/step / step time; MFU = TFLOP/s / matmul peak "
        f"(measured, {peak.dtype})" + (", and / the data-sheet dense bf16 peak." if nominal else "."),
        f"data / step: fetching one {args.train_batch} x {args.train_length} batch through dataloader.DataModule "
        f"({data.source}, {data.ms_per_batch:.3f} ms, mean of {data.batches}, with the copy to the device) "
        "over the step time; the training loop pays it every step (loader.num_workers=0).",
    ]
    if device.type == "cpu":
        notes.append(f"Peak RSS includes the Python/torch runtime; peak RSS before building the model: {baseline} MiB.")
    return "\n".join([
        "## Training throughput",
        "",
        f"matmul peak (measured): {peak_description(peak, device)}",
        "",
        markdown_table(columns, rows),
        "",
        *(f"- {note}" for note in notes),
    ])


def sampling_section(results: list[SampleResult], args: argparse.Namespace, device: torch.device) -> str:
    baseline = {r.steps: r.s_per_sample for r in results if r.predictor == "ddpm"}
    rows = []
    for r in results:
        speedup = "-" if r.predictor == "ddpm" else f"{baseline[r.steps] / r.s_per_sample:.2f}x"
        rows.append([r.predictor, str(r.steps), str(r.nfe), f"{r.s_per_sample:.3f}", speedup])
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    notes = [
        f"Model `{args.sample_size}`, length {args.sample_length}, batch {args.sample_batch}, vocab {args.vocab}, "
        f"{precision}, eval mode, no grad; s/sample = wall time / batch; one seeded run (seed {args.seed}) per row.",
        "The weights are untrained (randomly perturbed, N(0, 0.02^2)). For NFE and timing this is representative: "
        "with SUBS, a masked position is unmasked in a step from t to s with probability (m_t - m_s) / m_t, "
        "which depends only on the noise schedule, not on the model's output, so the number of steps that "
        "change the sequence (and thus ddpm_cache's NFE) has the same distribution for any weights.",
    ]
    return "\n".join([
        "## Sampling",
        "",
        markdown_table(SAMPLE_COLUMNS, rows),
        "",
        *(f"- {note}" for note in notes),
    ])


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA if available, else CPU")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run in seconds: micro only, length 16, 1 timed step, steps 4,8")
    parser.add_argument("--vocab", type=int, default=DEFAULT_VOCAB, help="vocabulary size, mask token included")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="Markdown file (default bench_results/benchmark_<device>.md)")
    parser.add_argument("--json", type=Path, help="also write every number to this JSON file")
    parser.add_argument("--peak-size", type=int,
                        help="side of the square matmul timed as the peak (4096 / 2048; 512 with --quick)")
    group = parser.add_argument_group("training (per-device defaults: cuda / cpu)")
    group.add_argument("--train-sizes", help="comma-separated names from configs/model/ (tiny,small; "
                       "tiny-dimamba for the bidirectional Mamba)")
    group.add_argument("--train-length", type=int, help="sequence length (1024 / 128)")
    group.add_argument("--train-batch", type=int, help="batch size (16 / 4)")
    group.add_argument("--warmup", type=int, help="untimed warm-up steps (5 / 2)")
    group.add_argument("--timed-steps", type=int, help="timed steps (20 / 5)")
    group.add_argument("--data-text", type=Path, help="time the data loader on this text file or folder "
                       "(dataloader.TextFiles); default: the built-in synthetic corpus")
    group.add_argument("--tokenizer", default="gpt2", help="tokenizer name or folder for --data-text (gpt2)")
    group = parser.add_argument_group("sampling (per-device defaults: cuda / cpu)")
    group.add_argument("--sample-size", help="name from configs/model/ (tiny / micro)")
    group.add_argument("--sample-length", type=int, help="sequence length (1024 / 128)")
    group.add_argument("--sample-batch", type=int, help="batch size (1)")
    group.add_argument("--steps", help="comma-separated sampling steps (128,1024,4096 / 32,128,512)")
    parser.add_argument("--_one-train", dest="one_train", metavar="SIZE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    defaults = {**COMMON_DEFAULTS, **DEVICE_DEFAULTS[args.device], **(QUICK_DEFAULTS if args.quick else {})}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.train_sizes = [s.strip() for s in args.train_sizes.split(",") if s.strip()]
    args.steps = [int(s) for s in str(args.steps).split(",") if s.strip()]
    for size in [*args.train_sizes, args.sample_size]:
        if size not in model_sizes():
            parser.error(f"unknown model size {size!r}; valid sizes: {', '.join(model_sizes())}")
    positive = ("vocab", "train_length", "train_batch", "timed_steps", "sample_length", "sample_batch", "peak_size")
    for key in positive:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0 or not args.steps or min(args.steps) < 1:
        parser.error("--warmup must be >= 0 and --steps a non-empty list of integers >= 1")
    return args


def default_out(device: torch.device) -> Path:
    if device.type == "cpu":
        name = "cpu"
    else:
        slug = "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name(device).lower())
        name = f"cuda_{slug.strip('_')}"
    return ROOT / "bench_results" / f"benchmark_{name}.md"


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.one_train is not None:  # internal: one training measurement, one JSON line
        print(json.dumps(asdict(measure_training(args.one_train, args, device))))
        return

    command = [sys.argv[0], *argv]
    sections = [header(device, command)]
    print(sections[0] + "\n", flush=True)
    train_results = [train_in_subprocess(size, args) for size in args.train_sizes]
    # After the subprocesses: on Linux a child's peak RSS starts from its parent's, so the parent
    # stays small until they are done (the data set and the peak's matrices would count in theirs).
    peak, data = measure_peak(args, device), measure_data(args, device)
    sections.append(training_section(train_results, args, device, peak, data))
    print(sections[-1] + "\n", flush=True)
    sample_results = measure_sampling(args, device)
    sections.append(sampling_section(sample_results, args, device))
    print(sections[-1], flush=True)

    out = args.out or default_out(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(sections) + "\n")
    print(f"\nwrote {out}")
    if args.json is not None:
        report = json_report(args, device, command, peak, data, train_results, sample_results)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main(sys.argv[1:])
