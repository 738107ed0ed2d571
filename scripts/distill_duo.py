"""DUO distilled into 16- and 8-step samplers on the built-in corpus, measured against the source's truth.

    python scripts/distill_duo.py                   # about 45 min on 2 CPU cores; writes results/duo_distill.md
    python scripts/distill_duo.py --budget smoke    # seconds (the test's run)

1. **Teacher.** DUO with the quickstart recipe (micro DiT, L = 64, 3,000 steps), the curriculum
   (soft inputs, tau = 1e-3) for the first half, as the reference's LM1B / OWT scripts scaled down.
2. **Students.** Discrete consistency distillation (``algorithm=duo_distill``) from the teacher's
   EMA weights with ``T = 128`` and rounds of ``R`` steps: after 4 rounds (delta up to 8/128 = 1/16)
   the 16-step student, after a 5th (delta up to 1/8) the 8-step student, the same run resumed.
3. **Samples.** ``N`` samples of each row with ``sampler=uniform_ancestral`` and DUO's greedy tail,
   scored by the source itself (the built-in corpus is a known Markov chain): the fraction of
   samples it can produce, their true NLL per token, the fraction of adjacent word pairs it can
   produce, and the mean unigram entropy of each sample's tokens. The first row is held-out
   source text scored the same way; the undistilled teacher at 1,024 steps is the reference.

Each stage is a ``main.py`` command (printed and written to the report), skipped when its
checkpoint exists under ``--work-dir``; the samples are what ``main.py mode=sample_eval`` draws
with the same overrides (same functions, loaded once per checkpoint).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import math
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/distill_duo.py`: make the repo importable
    sys.path.insert(0, str(ROOT))

import main as entry  # noqa: E402
import utils  # noqa: E402
from dataloader import WORD_OFFSET  # noqa: E402
from generation import make_sampler, score_samples  # noqa: E402


def _script(name: str) -> Any:
    """``scripts/<name>.py`` as a module, without putting scripts/ on sys.path (its lm_eval.py would shadow
    the lm-eval package in the same process)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_compare_samplers = _script("compare_samplers")
compose_config, shown = _compare_samplers.compose_config, _compare_samplers.shown
held_out_records, summarize = _compare_samplers.held_out_records, _compare_samplers.summarize

BUDGETS = {  # teacher steps, curriculum end, steps per distillation round, samples, the reference's steps
    "smoke": dict(teacher_steps=6, curriculum_end=3, round_steps=2, num_samples=4, batch_size=4, reference_steps=32),
    "default": dict(teacher_steps=3000, curriculum_end=1500, round_steps=300, num_samples=256, batch_size=64,
                    reference_steps=1024),
}
DISTILL_T = 128  # delta = 2^n / 128 in round n: 4 rounds reach 1/16, 5 rounds 1/8


@dataclass(frozen=True)
class Row:
    label: str
    model: str  # teacher | student16 | student8
    steps: int
    overrides: tuple[str, ...] = ()


def run_main(args: list[str], log: Path) -> None:
    """``python main.py ARGS``, its output in ``log``; a failure raises with the log's tail."""
    print("[distill_duo] python main.py " + " ".join(shlex.quote(a) for a in args), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        done = subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"main.py failed (exit {done.returncode}); the end of {log}:\n"
                         + "\n".join(log.read_text().splitlines()[-30:]))


def common_overrides(budget: dict[str, int]) -> list[str]:
    return ["experiment=quickstart", "wandb.mode=disabled", "sampling.num_sample_log=0"] + (
        ["trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
         "callbacks.checkpoint_every_n_steps.every_n_train_steps=2", "loader.global_batch_size=4",
         "loader.eval_global_batch_size=4", "data.num_train_sequences=64", "data.num_valid_sequences=8"]
        if budget is BUDGETS["smoke"] else [])


def teacher_command(budget: dict[str, int], run_dir: Path) -> list[str]:
    return [*common_overrides(budget), "algorithm=duo", f"trainer.max_steps={budget['teacher_steps']}",
            "algorithm.curriculum_start=0", f"algorithm.curriculum_end={budget['curriculum_end']}",
            "algorithm.gumbel_tau_log10_start=-3", "algorithm.gumbel_tau_log10_end=-3", f"hydra.run.dir={run_dir}"]


def student_command(budget: dict[str, int], teacher: Path, rounds: int, run_dir: Path) -> list[str]:
    """Distillation for ``rounds`` rounds; the EMA's horizon (1 / (1 - 0.99) = 100 steps) is shorter than a round."""
    r = budget["round_steps"]
    return [*common_overrides(budget), "algorithm=duo_distill", f"training.from_pretrained={teacher}",
            f"algorithm.T={DISTILL_T}", f"algorithm.update_teacher_every={r}", f"trainer.max_steps={rounds * r}",
            f"trainer.val_check_interval={r}", f"callbacks.checkpoint_every_n_steps.every_n_train_steps={r}",
            "optim.lr=2e-4", "lr_scheduler.num_warmup_steps=20", "training.ema=0.99", f"hydra.run.dir={run_dir}"]


def timed_main(args: list[str], log: Path, minutes: dict[str, float], stage: str) -> None:
    started = time.perf_counter()
    run_main(args, log)
    minutes[stage] = (time.perf_counter() - started) / 60


def train_all(budget: dict[str, int], work: Path) -> tuple[dict[str, Path], list[str], dict[str, float]]:
    """Teacher, then the student after 4 rounds (copied aside) and after 5 (resumed): checkpoints, commands and
    the minutes of the stages this call ran."""
    teacher_dir, student_dir = work / "teacher", work / "student"
    teacher = teacher_dir / "checkpoints" / "last.ckpt"
    student16, student8 = work / "student16.ckpt", work / "student8.ckpt"
    commands = [teacher_command(budget, teacher_dir), student_command(budget, teacher, 4, student_dir),
                student_command(budget, teacher, 5, student_dir)]
    minutes: dict[str, float] = {}
    if not teacher.is_file():
        timed_main(commands[0], work / "teacher.log", minutes, "teacher")
    if not student16.is_file():
        shutil.rmtree(student_dir, ignore_errors=True)  # a fresh distillation from this teacher
        timed_main(commands[1], work / "student16.log", minutes, "4 rounds")
        shutil.copy2(student_dir / "checkpoints" / "last.ckpt", student16)
    if not student8.is_file():
        timed_main(commands[2], work / "student8.log", minutes, "5th round")  # resumes the 4-round run
        shutil.copy2(student_dir / "checkpoints" / "last.ckpt", student8)
    shown_commands = ["python main.py " + " ".join(shlex.quote(a) for a in c) for c in commands]
    checkpoints = {"teacher": teacher, "student16": student16, "student8": student8}
    return checkpoints, [shown(c) for c in shown_commands], minutes


def valid_pair_fraction(token_ids: torch.Tensor, transition: torch.Tensor) -> float:
    """The fraction of adjacent pairs inside the blocks' word span (positions 1 .. L-2) that the chain can make.

    A pair with a non-word token (a special token inside the block) counts as impossible.
    """
    words = token_ids[:, 1:-1] - WORD_OFFSET  # (N, L-2)
    is_word = (words >= 0) & (words < transition.shape[0])
    safe = words.clamp(0, transition.shape[0] - 1)
    possible = (transition[safe[:, :-1], safe[:, 1:]] > 0) & is_word[:, :-1] & is_word[:, 1:]  # (N, L-3)
    return float(possible.double().mean())


class Scorer:
    """Samples rows from checkpoints (each loaded once) and scores them by the source."""

    def __init__(self, checkpoints: dict[str, Path], budget: dict[str, int], seed: int) -> None:
        self.budget, self.seed = budget, seed
        self.num_batches = math.ceil(budget["num_samples"] / budget["batch_size"])
        self.loaded: dict[str, tuple[list[str], Any, Any]] = {}
        self.data = None  # the same corpus for every checkpoint: built once
        for name, path in checkpoints.items():
            base = [*common_overrides(budget), "mode=sample_eval", f"eval.checkpoint_path={path}", f"seed={seed}"]
            cfg = compose_config(base)
            entry.validate_config(cfg)
            loaded = entry.adopt_for_eval(cfg)
            if self.data is None:
                self.data, self.vocab_size, self.mask_index = entry.build_data(cfg)
            self.loaded[name] = (base, loaded, entry.build_for_eval(cfg, loaded, self.vocab_size, self.mask_index))

    def scores(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """compare_samplers' numbers without an eval LM (NFE, s/sample, entropy, possible, true NLL), the
        valid word pairs and the first sample's text."""
        numbers = summarize(records, score_samples(records, self.data.tokenizer, None, truncate=False))
        tokens = torch.tensor([r["tokens"] for r in records])
        return {**numbers, "valid_pairs": valid_pair_fraction(tokens, self.data.source.transition),
                "example": self.data.tokenizer.decode(records[0]["tokens"], skip_special_tokens=True)[:150]}

    def held_out(self) -> dict[str, Any]:
        records = held_out_records(self.data, self.num_batches * self.budget["batch_size"])
        return {"label": "held-out source text", "steps": None, "command": "", **self.scores(records)}

    def row(self, row: Row) -> dict[str, Any]:
        base, loaded, module = self.loaded[row.model]
        overrides = [f"sampling.steps={row.steps}", *row.overrides]
        cfg = compose_config([*base, *overrides])
        entry.validate_config(cfg)
        entry.adopt_for_eval(cfg, loaded)
        module.sampler = make_sampler(cfg.sampler, module.algorithm, bool(cfg.sampling.float64))
        torch.manual_seed(self.seed)
        records = entry.generate_from_config(cfg, module, self.data, self.num_batches, self.budget["batch_size"])
        command = shown("python main.py " + " ".join(shlex.quote(o) for o in [*base, *overrides]))
        return {"label": row.label, "steps": row.steps, "command": command, **self.scores(records)}


def rows(reference_steps: int) -> list[Row]:
    return [
        Row("teacher (DUO), exact last step", "teacher", reference_steps, ("sampling.noise_removal=sample",)),
        Row("teacher (DUO)", "teacher", reference_steps),
        Row("teacher (DUO)", "teacher", 16),
        Row("teacher (DUO)", "teacher", 8),
        Row("student, 4 rounds (to 16 steps)", "student16", 16),
        Row("student, 4 rounds (to 16 steps)", "student16", 8),
        Row("student, 5 rounds (to 8 steps)", "student8", 16),
        Row("student, 5 rounds (to 8 steps)", "student8", 8),
    ]


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else spec.format(value)


def report(results: list[dict[str, Any]], commands: list[str], args: argparse.Namespace, truth: dict[str, float],
           minutes: float, stages: dict[str, float]) -> str:
    b = BUDGETS[args.budget]
    ran = ", ".join(f"{name} {m:.1f} min" for name, m in stages.items()) or "none"
    lines = [
        "# DUO distilled to 16 and 8 steps, against the 1,024-step teacher (built-in corpus)",
        "",
        f"Command: `python scripts/distill_duo.py --budget {args.budget}` ({datetime.date.today()}, "
        f"{minutes:.0f} min on {platform.machine()} CPU, torch {torch.__version__}; training stages it ran: {ran}; "
        f"the rest sampling). {b['num_samples']} samples of 64 tokens per row, seed {args.seed}, "
        "`sampler=uniform_ancestral` with DUO's greedy tail unless noted.",
        "",
        f"The source: entropy rate {truth['entropy_rate']:.4f} nats/word; held-out blocks cost "
        f"{results[0]['true_nll']:.4f} nats/token (per token of the block, whose BOS and EOS cost nothing).",
        "",
        "| model | steps | NFE | s/sample | possible | true NLL (nats/token) | valid word pairs | entropy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r['label']} | {fmt(r['steps'], '{:,}')} | {r['nfe']:.0f} | {r['seconds_per_sample']:.4f} | "
                     f"{r['possible']:.0%} | {fmt(r['true_nll'], '{:.3f}')} | {r['valid_pairs']:.1%} | "
                     f"{r['entropy']:.3f} |")
    lines += [
        "",
        "- possible: the fraction of samples the source can produce at all; true NLL: the mean over those (so it",
        "  leaves out the worst samples: read it with `possible`);",
        "  valid word pairs: over every sample's adjacent word pairs; entropy: the unigram entropy of each",
        "  sample's tokens, averaged (held-out text's value is the target; lower means repetitive samples).",
        "",
        "Training commands (each skipped when its checkpoint exists; the 5-round run resumes the 4-round one):",
        "",
        *[f"    {c}" for c in commands],
        "",
        "Sampling commands (one per row):",
        "",
        *[f"    {r['command']}" for r in results if r["command"]],
        "",
        "First sample of each row:",
        "",
        *[f"- {r['label']}, {fmt(r['steps'], '{}')} steps: `{r['example']}`" for r in results],
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="default")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: outputs/duo_distill (smoke: .../smoke)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "duo_distill.md")
    args = parser.parse_args()
    budget = BUDGETS[args.budget]
    work = args.work_dir or ROOT / "outputs" / "duo_distill" / ("" if args.budget == "default" else args.budget)
    started = time.perf_counter()
    print(utils.configure_cpu_threads(processes=1))
    checkpoints, commands, stages = train_all(budget, work)
    scorer = Scorer(checkpoints, budget, args.seed)
    source = scorer.data.source
    truth = {"entropy_rate": source.entropy_rate()}
    results = [scorer.held_out()]
    for row in rows(budget["reference_steps"]):
        results.append(scorer.row(row))
        r = results[-1]
        print(f"[distill_duo] {r['label']}, {r['steps']} steps: NFE {r['nfe']:.0f}, possible {r['possible']:.0%}, "
              f"true NLL {fmt(r['true_nll'], '{:.3f}')}, valid pairs {r['valid_pairs']:.1%}, "
              f"entropy {r['entropy']:.3f}", flush=True)
    text = report(results, commands, args, truth, (time.perf_counter() - started) / 60, stages)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
