"""Training throughput and sampling speed of MDLM on the current device.

    python bench/benchmark.py             # CUDA if available, else CPU
    python bench/benchmark.py --quick     # smoke run, seconds

Prints two Markdown tables and writes them to ``--out``
(default ``bench_results/benchmark_<device>.md``):

1. **Training throughput** per model size: one full training step as the framework does it
   (MDLM loss on random token ids, backward, grad-norm clip, AdamW step, EMA update), bf16
   autocast on CUDA and fp32 on CPU. Each size runs in a fresh subprocess of this script
   (the internal ``--_one-train SIZE`` flag, which prints one JSON line), so its peak memory
   (``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS on CPU) is not
   contaminated by the sizes measured before it.
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
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

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

# Per-device defaults; None in the parsed arguments means "use these". The CPU ones keep
# the whole default run under ~5 minutes on 2 cores.
DEVICE_DEFAULTS: dict[str, dict[str, object]] = {
    "cuda": {"train_length": 1024, "train_batch": 16, "warmup": 5, "timed_steps": 20,
             "sample_size": "tiny", "sample_length": 1024, "steps": "128,1024,4096"},
    "cpu": {"train_length": 128, "train_batch": 4, "warmup": 2, "timed_steps": 5,
            "sample_size": "micro", "sample_length": 128, "steps": "32,128,512"},
}
QUICK_DEFAULTS: dict[str, object] = {
    "train_sizes": "micro", "train_length": 16, "train_batch": 2, "warmup": 1, "timed_steps": 1,
    "sample_size": "micro", "sample_length": 16, "steps": "4,8",
}
COMMON_DEFAULTS: dict[str, object] = {"train_sizes": "tiny,small", "sample_batch": 1}

TRAIN_COLUMNS = ("model", "params (non-embedding, M)", "batch x length", "tokens/s", "ms/step")
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
    with timer(device) as elapsed:
        for _ in range(args.timed_steps):
            step()
    seconds = elapsed[0]
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


def header(device: torch.device, argv: list[str]) -> str:
    command = shlex.join([Path(sys.executable).name, *argv])
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return "\n".join([
        "# MDLM benchmark",
        "",
        f"- device: {device_description(device)}",
        f"- torch: {torch.__version__}",
        f"- flash-attn: {'available' if FLASH_ATTN_AVAILABLE else 'not available (PyTorch SDPA)'}",
        f"- mamba-ssm (DiMamba sizes): {'available' if MAMBA_SSM_AVAILABLE else 'not available (PyTorch scan)'}",
        f"- date: {now}",
        f"- command: `{command}`",
    ])


def training_section(results: list[TrainResult], args: argparse.Namespace, device: torch.device) -> str:
    memory = "peak memory (max allocated, MiB)" if device.type == "cuda" else "peak RSS (MiB)"
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    rows = [[r.size, f"{r.params / 1e6:.1f}", f"{r.batch} x {r.length}", f"{r.tokens_per_s:,.0f}",
             f"{r.ms_per_step:,.1f}", f"{r.peak_mib:,.0f}"] for r in results]
    baseline = ", ".join(f"{r.size} {r.baseline_mib:,.0f}" for r in results)
    notes = [
        f"One step = MDLM loss ({precision}) on random token ids (vocab {args.vocab}), backward, "
        f"grad-norm clip {GRAD_CLIP}, AdamW, EMA update; {args.warmup} warm-up + {args.timed_steps} timed steps, "
        "each size in a fresh subprocess.",
        "Non-embedding parameters exclude the token embedding (V x D) and the output projection (D x V, + V for DiT).",
    ]
    if device.type == "cpu":
        notes.append(f"Peak RSS includes the Python/torch runtime; peak RSS before building the model: {baseline} MiB.")
    return "\n".join([
        "## Training throughput",
        "",
        markdown_table((*TRAIN_COLUMNS, memory), rows),
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
    group = parser.add_argument_group("training (per-device defaults: cuda / cpu)")
    group.add_argument("--train-sizes", help="comma-separated names from configs/model/ (tiny,small; "
                       "tiny-dimamba for the bidirectional Mamba)")
    group.add_argument("--train-length", type=int, help="sequence length (1024 / 128)")
    group.add_argument("--train-batch", type=int, help="batch size (16 / 4)")
    group.add_argument("--warmup", type=int, help="untimed warm-up steps (5 / 2)")
    group.add_argument("--timed-steps", type=int, help="timed steps (20 / 5)")
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
    positive = ("vocab", "train_length", "train_batch", "timed_steps", "sample_length", "sample_batch")
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

    sections = [header(device, [sys.argv[0], *argv])]
    print(sections[0] + "\n", flush=True)
    train_results = [train_in_subprocess(size, args) for size in args.train_sizes]
    sections.append(training_section(train_results, args, device))
    print(sections[-1] + "\n", flush=True)
    sections.append(sampling_section(measure_sampling(args, device), args, device))
    print(sections[-1], flush=True)

    out = args.out or default_out(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(sections) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
