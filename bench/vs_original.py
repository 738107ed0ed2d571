"""Speed of this code against the original MDLM code (github kuleshov-group/mdlm), same model, same inputs.

    python bench/vs_original.py --original DIR                # DIR: a local clone of the original
    python bench/vs_original.py --original DIR --length 1024  # the same at L = 1,024 (long on CPU)

Both codebases build the DiT of one size (default: hidden 256, 4 blocks, 4 heads, cond 128, the
GPT-2 vocabulary of 50,258 with the mask), with the same random weights: ours (``models.dit.DiT``)
are drawn and copied into the original's ``DIT`` by name (the parameter names are the same, as
for the released checkpoints). Everything runs in fp32 on CPU. The script

1. checks that the backbone logits agree (max |diff|; it stops if they do not), and reports the
   SUBS log-probabilities' and one seeded NELBO's agreement;
2. times, alternating between the two codebases, the median over ``--repeats`` pairs of:
   a training step (loss, backward, AdamW step), the backbone forward, the forward with SUBS
   log-probabilities, the NELBO under no_grad (``ppl_eval``'s work, in tokens/s), and
   ``ddpm_cache`` sampling (batch 1, T = 128 and 1,000 steps), with our first-hitting sampler too.

Each code runs as its users run it: ours through ``algorithms.MDLM`` (whose DiT computes the
output layer only at masked positions) and ``samplers``; the original through its ``Diffusion``
LightningModule (``_loss``, ``forward``, ``_sample``), built from its own Hydra config.

Load from other processes is measured around each timed pair (``/proc/stat``: the machine's CPU
time not spent by this process); pairs above ``--busy-threshold`` are set aside and retried, and
a row that could not get enough quiet pairs is flagged. Writes the Markdown table to ``--out``
(default ``results/vs_original.md``).

The original imports packages that a CPU machine may lack. In this process only:

- ``flash_attn``: its two functions are stood in by ``bench/flash_attn_sdpa.py`` (PyTorch SDPA);
  flash-attn's kernels need CUDA, so the stand-in is used on this CPU run even where it is installed;
- ``timm`` (the original's ``utils.py`` imports its cosine LR scheduler at the top): when missing,
  a placeholder class that raises if used; no timed code uses it;
- the original's ``models/__init__.py`` also imports its Mamba and AR backbones (``mamba_ssm``,
  ``causal_conv1d``: CUDA-only); only ``models.dit`` and ``models.ema`` are loaded.

Any other missing package (``einops`` is the usual one) is an error that names it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import importlib.util
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from hydra import compose, initialize_config_dir
from torch import Tensor

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
if str(ROOT) not in sys.path:  # run as `python bench/vs_original.py`: make the repo importable
    sys.path.insert(0, str(ROOT))

import flash_attn_sdpa  # noqa: E402  (bench/, the script's own folder)
from benchmark import device_description, markdown_table  # noqa: E402

from algorithms import MDLM  # noqa: E402
from first_hitting import FirstHittingSampler  # noqa: E402
from models.dit import DiT  # noqa: E402
from noise_schedule import LogLinear  # noqa: E402
from samplers import DDPMCacheSampler  # noqa: E402

DEFAULT_TOKENIZER = ROOT.parent / "shared" / "data" / "gpt2_tokenizer"
DEFAULT_OUT = ROOT / "results" / "vs_original.md"
# The original's imports that this script needs to be real (the rest are stood in, see above).
REQUIRED = ("einops", "huggingface_hub", "omegaconf", "hydra", "lightning", "torchmetrics", "transformers",
            "datasets", "fsspec", "requests", "tokenizers", "numpy")
ORIGINAL_FILES = ("diffusion.py", "models/dit.py", "models/ema.py", "noise_schedule.py", "configs/config.yaml")
PERTURB_STD = 0.02  # std of the random weights (adaLN-zero init would give all-zero logits)
LOGITS_ATOL = 1e-4  # fp32, same op order up to the attention kernel: agreement is ~1e-6 or exact
LOGLINEAR_EPS = 1e-3  # the loglinear schedule's eps: both codes' default
SAMPLING_EPS = 1e-5  # both samplers run t = 1 -> 1e-5 (the original's _sample default)
WARMUP_SAMPLE_STEPS = 8  # the untimed warm-up sample: short, runs every code path once
MAX_PAIRS_FACTOR = 2  # at most this many x --repeats pairs are run to find --repeats quiet ones


# --------------------------------------------------------------------------- the original code


def check_original_dir(path: Path) -> None:
    """Exit with a clear message unless ``path`` looks like a clone of the original MDLM."""
    missing = [name for name in ORIGINAL_FILES if not (path / name).is_file()]
    if missing:
        where = "does not exist" if not path.exists() else f"lacks {', '.join(missing)}"
        sys.exit(f"error: --original {path} {where}; it must be a local clone of the original MDLM code "
                 "(git clone https://github.com/kuleshov-group/mdlm DIR).")


def check_required_packages() -> None:
    """Exit naming every package of :data:`REQUIRED` that does not import here."""
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        names = " ".join(missing)
        sys.exit(f"error: the original code needs packages that are not installed here: {names}. "
                 f"Install them (pip install {names}), or into a separate folder "
                 f"(pip install --target DIR {names}) and run with PYTHONPATH=DIR.")


def timm_placeholder() -> dict[str, types.ModuleType]:
    """``timm`` and ``timm.scheduler`` with a ``CosineLRScheduler`` that raises when used."""

    class CosineLRScheduler:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("timm is not installed: bench/vs_original.py stood in a placeholder for the "
                               "original's cosine LR scheduler, which no timed code uses")

    timm, scheduler = types.ModuleType("timm"), types.ModuleType("timm.scheduler")
    timm.__path__ = []  # a package
    scheduler.CosineLRScheduler = CosineLRScheduler
    timm.scheduler = scheduler
    return {"timm": timm, "timm.scheduler": scheduler}


def top_level_names(path: Path) -> set[str]:
    """The modules and packages at the top of ``path`` (``diffusion``, ``models``, ``utils``, ...)."""
    return {p.stem for p in path.glob("*.py")} | {p.name for p in path.iterdir() if (p / "__init__.py").is_file()}


def import_original(path: Path) -> types.ModuleType:
    """Import the original's ``diffusion`` module from ``path``, next to ours; returns it.

    Several of its module names are ours too (``diffusion``, ``models``, ``noise_schedule``,
    ``utils``, ...). Ours are set aside while it imports and put back afterwards; its modules
    keep their references to each other (and to the stand-ins), so both codebases run side by
    side in this process, and no stand-in stays in ``sys.modules``.
    """
    names = top_level_names(path)

    def clashes(name: str) -> bool:
        return name.split(".")[0] in names

    ours = {name: sys.modules.pop(name) for name in list(sys.modules) if clashes(name)}
    flash_attn_sdpa.install(only_if_missing=False)  # CPU run: flash-attn's CUDA kernels cannot run
    placeholders = timm_placeholder() if importlib.util.find_spec("timm") is None else {}
    sys.modules.update(placeholders)
    models = types.ModuleType("models")  # the package without its __init__ (Mamba / AR imports)
    models.__path__ = [str(path / "models")]
    sys.path.insert(0, str(path))
    try:
        sys.modules["models"] = models
        for name in ("models.dit", "models.ema"):
            importlib.import_module(name)
        return importlib.import_module("diffusion")
    except ModuleNotFoundError as err:
        sys.exit(f"error: the original code imports {err.name!r}, which is not installed here "
                 f"(pip install {err.name}, or pip install --target DIR {err.name} and PYTHONPATH=DIR).")
    finally:
        sys.path.remove(str(path))
        for name in [name for name in sys.modules if clashes(name) or name in placeholders]:
            del sys.modules[name]
        flash_attn_sdpa.uninstall()
        sys.modules.update(ours)


def original_config(path: Path, args: argparse.Namespace) -> Any:
    """The original's Hydra config (composed from ``path/configs``) for this comparison."""
    overrides = [
        "model=tiny", f"model.hidden_size={args.hidden}", f"model.n_blocks={args.blocks}",
        f"model.n_heads={args.heads}", f"model.cond_dim={args.cond}", f"model.length={args.length}",
        f"model.dropout={args.dropout}", "noise=loglinear", "parameterization=subs", "T=0", "backbone=dit",
        "time_conditioning=false", "sampling.predictor=ddpm_cache", "sampling.noise_removal=true",
        f"loader.batch_size={args.batch}", f"loader.eval_batch_size={args.sample_batch}",
        f"eval.gen_ppl_eval_model_name_or_path={args.tokenizer}",  # loaded at construction: keep it local
    ]
    with initialize_config_dir(version_base=None, config_dir=str(path / "configs")):
        return compose(config_name="config", overrides=overrides)


def original_commit(path: Path) -> str:
    """The short commit of the clone at ``path``, if it is one (not of a repository around it)."""
    if not (path / ".git").exists():
        return "unknown (not a git checkout)"
    proc = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


# --------------------------------------------------------------------------- the two models


@dataclasses.dataclass
class Pair:
    """Both codebases on the same weights: our DiT and MDLM, and the original's Diffusion."""

    dit: DiT
    algorithm: MDLM
    theirs: Any  # the original's diffusion.Diffusion (a LightningModule)
    weights: dict[str, Tensor]  # the initial weights of both, restored after the training steps

    def restore(self) -> None:
        self.dit.load_state_dict(self.weights, strict=True)
        self.theirs.backbone.load_state_dict(self.weights, strict=True)

    def train(self, mode: bool) -> None:
        self.dit.train(mode)
        self.theirs.train(mode)


def build_pair(diffusion: types.ModuleType, config: Any, args: argparse.Namespace) -> Pair:
    """Our DiT with random weights, the original's Diffusion with a copy of them, and our MDLM."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(args.tokenizer))
    theirs = diffusion.Diffusion(config, tokenizer=tokenizer)
    torch.manual_seed(args.seed)
    dit = DiT(vocab_size=theirs.vocab_size, hidden_size=args.hidden, cond_dim=args.cond, n_blocks=args.blocks,
              n_heads=args.heads, dropout=args.dropout)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0.0, PERTURB_STD)
    weights = {k: v.clone() for k, v in dit.state_dict().items()}
    theirs.backbone.load_state_dict(weights, strict=True)  # the same names (checkpoints.py relies on it)
    algorithm = MDLM(noise=LogLinear(eps=LOGLINEAR_EPS), mask_index=theirs.mask_index, T=0, time_conditioning=False,
                     sampling_eps=float(config.training.sampling_eps),
                     antithetic_sampling=bool(config.training.antithetic_sampling))
    return Pair(dit, algorithm, theirs, weights)


def noised_batch(pair: Pair, args: argparse.Namespace) -> tuple[Tensor, Tensor, Tensor]:
    """x0 (B, L) real tokens, xt (B, L) with about half of them masked, sigma (B,) = 0 (no time conditioning)."""
    generator = torch.Generator().manual_seed(args.seed)
    x0 = torch.randint(0, pair.algorithm.mask_index, (args.batch, args.length), generator=generator)
    masked = torch.rand(x0.shape, generator=generator) < 0.5
    xt = x0.masked_fill(masked, pair.algorithm.mask_index)
    return x0, xt, torch.zeros(args.batch)


def check_agreement(pair: Pair, args: argparse.Namespace) -> dict[str, float]:
    """Max |diff| of the backbone logits (at random sigma) and of the SUBS log-probs (the mask column aside),
    and the NELBO of one batch in each code from the same seed. Exits if the logits disagree."""
    x0, xt, _ = noised_batch(pair, args)
    sigma = torch.rand(args.batch, generator=torch.Generator().manual_seed(args.seed))
    zero = torch.zeros(args.batch)
    mask_index = pair.algorithm.mask_index
    pair.train(False)
    with torch.no_grad():
        ours, theirs = pair.dit(xt, sigma), pair.theirs.backbone(xt, sigma)
        logits = (ours - theirs).abs().max().item()
        ours_lp, theirs_lp = pair.algorithm.denoiser(pair.dit)(xt, zero), pair.theirs.forward(xt, zero)
        keep = torch.arange(ours_lp.shape[-1]) != mask_index  # the mask column: -1e6 vs logit - 1e6, both ~0
        subs = (ours_lp[..., keep] - theirs_lp[..., keep]).abs().max().item()
        ones = torch.ones_like(x0)
        torch.manual_seed(args.seed)
        out = pair.algorithm.loss(pair.dit, x0, ones)
        ours_nelbo = (out.nll.sum() / out.mask.sum()).item()
        torch.manual_seed(args.seed)
        theirs_nelbo = pair.theirs._loss(x0, ones).loss.item()
    result = {"vocab": pair.theirs.vocab_size, "logits": logits, "logits_scale": theirs.abs().max().item(),
              "subs": subs, "nelbo_ours": ours_nelbo, "nelbo_theirs": theirs_nelbo}
    if not logits <= LOGITS_ATOL:
        sys.exit(f"error: the backbone logits differ: max |ours - original| = {logits:.3g} > {LOGITS_ATOL} "
                 "(same weights, fp32): not timing different models. Check the weight copy and the stand-ins.")
    return result


# --------------------------------------------------------------------------- machine load


@dataclasses.dataclass
class Probe:
    """A snapshot of the clocks that tell whether other processes ran."""

    wall: float  # perf_counter, s
    own_cpu: float  # this process's CPU time (all threads), s
    machine_busy: float  # the machine's non-idle CPU time (steal included), s


CPU_FIELDS_BUSY = (0, 1, 2, 5, 6, 7)  # /proc/stat cpu line: user nice system [idle iowait] irq softirq steal


def machine_busy_seconds() -> float:
    """Non-idle CPU time of the whole machine since boot (/proc/stat), in seconds; nan where unreadable."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return math.nan
    return sum(int(fields[i]) for i in CPU_FIELDS_BUSY if i < len(fields)) / os.sysconf("SC_CLK_TCK")


def machine_cpus() -> int:
    """CPUs counted in /proc/stat (the machine's, not only this process's affinity)."""
    try:
        with open("/proc/stat") as f:
            return max(1, sum(1 for line in f if line.startswith("cpu") and line[3].isdigit()))
    except OSError:
        return os.cpu_count() or 1


def probe() -> Probe:
    return Probe(time.perf_counter(), time.process_time(), machine_busy_seconds())


def others_share(before: Probe, after: Probe, cpus: int) -> float:
    """Share of the machine's CPU capacity used by other processes between two probes (0 = quiet, 1 = full).

    ``(machine busy - this process's CPU time) / (wall time * CPUs)``; /proc/stat counts in
    ticks of 10 ms, so use it over spans of a few tenths of a second or more. nan where unknown.
    """
    wall = after.wall - before.wall
    others = (after.machine_busy - before.machine_busy) - (after.own_cpu - before.own_cpu)
    return max(0.0, others) / (wall * cpus) if wall > 0 else math.nan


# --------------------------------------------------------------------------- timing


@dataclasses.dataclass
class Work:
    """One timed item: a callable per codebase (each may return its NFE), and how to report it."""

    name: str
    original: Callable[[], int | None] | None  # None: the original has no counterpart
    ours: Callable[[], int | None]
    train: bool = False  # models in train mode (dropout) and weights restored afterwards
    tokens: int | None = None  # report tokens / s for this many tokens per call instead of time
    warmup: Callable[[], None] | None = None  # untimed, before the pairs
    inner: int | None = None  # calls per timed sample; None: enough for --min-time (one untimed call of each)


@dataclasses.dataclass
class Timed:
    """The medians of one work item over its pairs."""

    work: Work
    original: list[float]  # s per call, one per used pair
    ours: list[float]
    ratios: list[float]  # original / ours, per pair
    nfe_original: list[int]
    nfe_ours: list[int]
    quiet: int  # used pairs that were quiet
    shares: list[float]  # others' CPU share during each pair run


def run_calls(fn: Callable[[], int | None], inner: int) -> tuple[float, int | None]:
    """Seconds per call of ``inner`` calls of fn, and the last call's NFE."""
    start = time.perf_counter()
    nfe = None
    for _ in range(inner):
        nfe = fn()
    return (time.perf_counter() - start) / inner, nfe


def measure(work: Work, pair: Pair, args: argparse.Namespace) -> Timed:
    """Time ``work`` in pairs, the two codes alternating in order, until ``args.repeats`` quiet pairs."""
    pair.train(work.train)
    sides = [work.ours] if work.original is None else [work.original, work.ours]
    if work.warmup is not None:
        work.warmup()
    inner = work.inner or max(1, math.ceil(args.min_time / max(min(run_calls(fn, 1)[0] for fn in sides), 1e-9)))
    cpus = machine_cpus()
    quiet: list[list[tuple[float, int | None]]] = []
    busy: list[list[tuple[float, int | None]]] = []
    shares = []
    for index in range(args.repeats * MAX_PAIRS_FACTOR):
        if len(quiet) >= args.repeats:
            break
        order = range(len(sides)) if index % 2 == 0 else reversed(range(len(sides)))
        before = probe()
        results = {side: run_calls(sides[side], inner) for side in order}
        shares.append(others_share(before, probe(), cpus))
        (busy if shares[-1] > args.busy_threshold else quiet).append([results[side] for side in range(len(sides))])
    used = quiet if len(quiet) >= args.repeats else quiet + busy  # too few quiet pairs: all of them, flagged
    if work.train:
        pair.restore()
    ours = [row[-1] for row in used]
    original = [row[0] for row in used] if work.original is not None else []
    return Timed(
        work, original=[t for t, _ in original], ours=[t for t, _ in ours],
        ratios=[o / u for (o, _), (u, _) in zip(original, ours, strict=True)] if original else [],
        nfe_original=[n for _, n in original if n is not None], nfe_ours=[n for _, n in ours if n is not None],
        quiet=len(quiet), shares=shares)


# --------------------------------------------------------------------------- the work items


def training_work(pair: Pair, x0: Tensor, args: argparse.Namespace) -> Work:
    ones = torch.ones_like(x0)

    def step(optimizer: torch.optim.Optimizer, loss: Callable[[], Tensor]) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    def adamw(module: torch.nn.Module, fused: bool | None) -> torch.optim.Optimizer:
        optim = pair.theirs.config.optim  # the original's settings, for both
        return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=optim.lr,
                                 betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay,
                                 fused=fused)

    # Each as its training builds it: ours with optim.fused=true (the default), the original with torch's default.
    ours_optimizer, theirs_optimizer = adamw(pair.dit, True), adamw(pair.theirs.backbone, None)

    def ours_loss() -> Tensor:
        out = pair.algorithm.loss(pair.dit, x0, ones)
        return out.nll.sum() / out.mask.sum()

    return Work(
        f"training step (loss + backward + AdamW), {args.batch} x {args.length}",
        original=lambda: step(theirs_optimizer, lambda: pair.theirs._loss(x0, ones).loss),
        ours=lambda: step(ours_optimizer, ours_loss),
        train=True)


def eval_works(pair: Pair, x0: Tensor, xt: Tensor, sigma: Tensor, args: argparse.Namespace) -> list[Work]:
    ones = torch.ones_like(x0)
    denoiser = pair.algorithm.denoiser(pair.dit)
    size = f"{args.batch} x {args.length}"

    def no_grad(fn: Callable[[], Any]) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                fn()
        return call

    return [
        Work(f"backbone forward (full logits), {size}",
             original=no_grad(lambda: pair.theirs.backbone(xt, sigma)), ours=no_grad(lambda: pair.dit(xt, sigma))),
        Work(f"forward + SUBS log-probs (half masked), {size}",
             original=no_grad(lambda: pair.theirs.forward(xt, sigma)), ours=no_grad(lambda: denoiser(xt, sigma))),
        Work(f"ppl_eval NELBO (no grad), {size}", original=no_grad(lambda: pair.theirs._loss(x0, ones)),
             ours=no_grad(lambda: pair.algorithm.loss(pair.dit, x0, ones)), tokens=x0.numel()),
    ]


def sampling_works(pair: Pair, args: argparse.Namespace) -> list[Work]:
    mask_index = pair.algorithm.mask_index
    denoiser = pair.algorithm.denoiser(pair.dit)
    x = torch.full((args.sample_batch, args.length), mask_index)  # (B, L) all masks
    draws = [args.seed]

    def seed() -> int:
        draws[0] += 1
        return draws[0]

    def theirs(steps: int) -> Callable[[], int]:
        def sample() -> int:
            calls = []  # the original does not count its network calls: a forward hook does
            hook = pair.theirs.backbone.register_forward_hook(lambda *_: calls.append(1))
            try:
                torch.manual_seed(seed())
                pair.theirs._sample(num_steps=steps, eps=SAMPLING_EPS)
            finally:
                hook.remove()
            return len(calls)
        return sample

    def ours(sampler: Any) -> Callable[[], int]:
        def sample() -> int:
            return sampler.sample(denoiser, x, generator=torch.Generator().manual_seed(seed())).nfe
        return sample

    def cache_sampler(steps: int) -> DDPMCacheSampler:  # as main.py sample_eval builds it (float64 draws)
        return DDPMCacheSampler(**pair.algorithm.sampler_inputs(), steps=steps, eps=SAMPLING_EPS,
                                noise_removal=True, dtype=torch.float64)

    def warmup() -> None:
        with torch.no_grad():
            theirs(WARMUP_SAMPLE_STEPS)()
            ours(cache_sampler(WARMUP_SAMPLE_STEPS))()

    size = f"{args.sample_batch} x {args.length}"
    works = [Work(f"ddpm_cache sampling, T = {steps:,}, {size}", original=theirs(steps),
                  ours=ours(cache_sampler(steps)), warmup=warmup, inner=1) for steps in args.sample_steps]
    hitting = FirstHittingSampler(**pair.algorithm.sampler_inputs(), dtype=torch.float64)
    works.append(Work(f"first_hitting sampling (ours only), {size}", original=None, ours=ours(hitting), inner=1,
                      warmup=lambda: ours(hitting)()))
    return works


# --------------------------------------------------------------------------- report


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 1.0 else f"{seconds:,.2f} s"


def fmt_cell(times: list[float], nfes: list[int], tokens: int | None) -> str:
    if not times:
        return "-"
    median = statistics.median(times)
    text = f"{tokens / median:,.0f} tokens/s" if tokens else fmt_time(median)
    if nfes:
        text += f" (NFE {statistics.median(nfes):g})"
    return text


def results_table(timed: list[Timed], args: argparse.Namespace) -> str:
    rows = []
    for t in timed:
        ratio = f"{statistics.median(t.ratios):.2f}x" if t.ratios else "-"
        load = statistics.median(t.shares)
        pairs = f"{t.quiet}/{len(t.ours)}" + ("" if t.quiet >= args.repeats else " (busy: flagged)")
        pairs += "" if math.isnan(load) else f", load {load:.0%}"
        rows.append([t.work.name, fmt_cell(t.original, t.nfe_original, t.work.tokens),
                     fmt_cell(t.ours, t.nfe_ours, t.work.tokens), ratio, pairs])
    columns = ("work", "original", "ours", "ratio (original time / ours)", "quiet pairs, others' load")
    return markdown_table(columns, rows)


def header(args: argparse.Namespace, argv: list[str], agreement: dict[str, float]) -> str:
    command = shlex.join(["python", *argv])
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return "\n".join([
        "# This code vs the original MDLM",
        "",
        f"- command: `{command}`",
        f"- date: {now}",
        f"- machine: {device_description(torch.device('cpu'))}; torch {torch.__version__}, fp32",
        f"- original: {args.original} (commit {original_commit(args.original)}); flash-attn: SDPA stand-in "
        "(bench/flash_attn_sdpa.py)",
        f"- model: DiT, hidden {args.hidden}, {args.blocks} blocks, {args.heads} heads, cond {args.cond}, "
        f"vocabulary {agreement['vocab']:,} (GPT-2 + mask), dropout {args.dropout} (training step only), "
        "random weights",
        f"- same weights: backbone logits max |ours - original| = {agreement['logits']:.2g} "
        f"(logits up to {agreement['logits_scale']:.2g}); SUBS log-probs {agreement['subs']:.2g}; "
        f"one seeded NELBO: ours {agreement['nelbo_ours']:.6f}, original {agreement['nelbo_theirs']:.6f}",
    ])


def notes(timed: list[Timed], args: argparse.Namespace) -> str:
    shares = [s for t in timed for s in t.shares if not math.isnan(s)]
    load = f"{statistics.median(shares):.1%} median, {max(shares):.1%} max" if shares else "unknown (no /proc/stat)"
    lines = [
        f"Medians over {args.repeats} pairs, the two codes alternating (the original first in even pairs); "
        "the ratio is the median of the pairs' ratios (> 1: ours is faster). Each timed sample runs a call "
        f"enough times to last >= {args.min_time} s. tokens/s = B x L / time.",
        "Training step: the loss (ours: algorithms.MDLM.loss, continuous time, loglinear; the original: "
        "Diffusion._loss), backward and an AdamW step (each as its training builds it: ours torch's fused "
        "kernel, optim.fused=true; the original torch's default); no clipping, EMA or logging in either. "
        "SUBS and NELBO: ours computes the output layer only at masked positions (output_mask); "
        "the original, at every position.",
        *(["Sampling: ours samplers.DDPMCacheSampler (float64 draws, as main.py sample_eval) and "
           "first_hitting.FirstHittingSampler, through MDLM's denoiser; the original Diffusion._sample "
           "(sampling.predictor=ddpm_cache); NFE = network calls per sample (median), noise removal included. "
           "Ours asks the network for the positions a step fills only (ddpm_cache: those that unmask; "
           "first-hitting: the one it unmasks)."]
          if args.sampling else []),
        f"Load from other processes (share of the machine's CPU not used by this script, per pair): {load}; "
        f"pairs above {args.busy_threshold:.0%} are set aside and retried (up to {MAX_PAIRS_FACTOR}x --repeats "
        "pairs); a row with too few quiet pairs uses all of them and is flagged.",
    ]
    return "\n".join(f"- {line}" for line in lines)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original", type=Path, required=True, help="local clone of github kuleshov-group/mdlm")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER,
                        help="GPT-2 tokenizer folder (the original builds its vocabulary from it)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown file to write")
    parser.add_argument("--repeats", type=int, default=5, help="quiet pairs per row (median over them)")
    parser.add_argument("--batch", type=int, default=4, help="batch of the training / forward / NELBO rows")
    parser.add_argument("--length", type=int, default=128, help="sequence length, also of the samples")
    parser.add_argument("--sample-batch", type=int, default=1)
    parser.add_argument("--sample-steps", default="128,1000", help="comma-separated T of the ddpm_cache rows")
    parser.add_argument("--no-sampling", dest="sampling", action="store_false", help="skip the sampling rows")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--cond", type=int, default=128)
    parser.add_argument("--dropout", type=float, default=0.1, help="both models' (training step)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, usually the cores); where "
                        "other processes load the machine, 1 avoids threads stalling on each other")
    parser.add_argument("--min-time", type=float, default=0.25, help="seconds a timed sample lasts at least")
    parser.add_argument("--busy-threshold", type=float, default=0.1,
                        help="set a pair aside when other processes used more than this share of the CPUs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.sample_steps = [int(s) for s in args.sample_steps.split(",") if s.strip()]
    for key in ("repeats", "batch", "length", "sample_batch", "hidden", "blocks", "heads", "cond"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if not args.sample_steps or min(args.sample_steps) < 1:
        parser.error("--sample-steps must be a comma-separated list of integers >= 1")
    args.original = args.original.expanduser().resolve()
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    check_original_dir(args.original)
    if not args.tokenizer.is_dir():
        sys.exit(f"error: --tokenizer {args.tokenizer} is not a folder (a saved GPT-2 tokenizer)")
    check_required_packages()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)  # the original's torch.cuda.amp.autocast
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    warnings.filterwarnings("ignore", message=".*self.log.*")  # Lightning: no Trainer attached
    started = time.perf_counter()

    diffusion = import_original(args.original)
    pair = build_pair(diffusion, original_config(args.original, args), args)
    agreement = check_agreement(pair, args)
    sections = [header(args, [sys.argv[0], *argv], agreement)]
    print(sections[0] + "\n", flush=True)

    x0, xt, sigma = noised_batch(pair, args)
    works = [training_work(pair, x0, args), *eval_works(pair, x0, xt, sigma, args)]
    if args.sampling:
        works += sampling_works(pair, args)
    timed = []
    for work in works:
        timed.append(measure(work, pair, args))
        print(results_table(timed[-1:], args).splitlines()[-1], flush=True)
    sections += [results_table(timed, args), notes(timed, args)]
    text = "\n\n".join(sections) + "\n"
    print("\n" + "\n\n".join(sections[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"\nwrote {args.out} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main(sys.argv[1:])
