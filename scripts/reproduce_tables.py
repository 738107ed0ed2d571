"""Small-scale reproduction of the MDLM paper's comparisons, on one CPU machine.

Trains AR, MDLM, SEDD and D3PM (T = 1000) with the same model size, token budget and data,
evaluates all of them on the same validation tokens, then runs the MDLM ablation
(T = 1000, without carry-over, without zero masking) and the eval-time T sweep of one MDLM.
Prints the tables and writes them (Markdown) to ``--out``.

    python scripts/reproduce_tables.py                 # default budget: < 1 hour on 2 CPU cores
    python scripts/reproduce_tables.py --budget long   # 32x the training tokens
    python scripts/reproduce_tables.py --budget smoke  # seconds; for tests
    python scripts/reproduce_tables.py --table bd3lm   # block diffusion: AR < BD3-LM L'=4 < L'=16 < MDLM?
    python scripts/reproduce_tables.py --table duo     # uniform-state diffusion: MDLM < DUO < UDLM?

Data: Penn Treebank with the GPT-2 tokenizer from ../shared/data when present, else the
built-in corpus (``--data synthetic`` forces it). The paper's ordering in perplexity is
AR < MDLM < SEDD < D3PM; what this prints is what was measured, whether or not it matches.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

BUDGETS = {  # steps, global batch, length, validation blocks
    "smoke": dict(steps=4, batch=4, length=32, valid_limit=2, val_every=4),
    "default": dict(steps=500, batch=8, length=64, valid_limit=1.0, val_every=500),
    "long": dict(steps=4000, batch=16, length=128, valid_limit=1.0, val_every=1000),
}


@dataclass
class Run:
    name: str                      # row label
    overrides: list[str]           # what makes this model
    eval_overrides: list[str] = field(default_factory=list)


MODELS = [
    Run("AR", ["backbone=ar", "parameterization=ar", "time_conditioning=false"]),
    Run("MDLM", ["parameterization=subs"]),
    Run("SEDD", ["parameterization=sedd", "noise=geometric", "sampling.predictor=analytic"]),
    Run("D3PM absorb (T=1000)", ["parameterization=d3pm", "T=1000", "subs_masking=false", "sampling.predictor=ddpm"]),
]
BLOCK_DIFFUSION = [  # BD3-LM's Table 3 ordering, all trained from scratch with the same budget
    MODELS[0],
    Run("BD3-LM L'=4", ["algorithm=bd3lm", "block_size=4"]),
    Run("BD3-LM L'=16", ["algorithm=bd3lm", "block_size=16"]),
    MODELS[1],
]
UNIFORM_STATE = [  # DUO's Table 1 ordering (LM1B / OWT)
    MODELS[1],
    # the reference's LM1B / OWT recipe scaled to the budget: the curriculum (tau = 1e-3) for the first half
    Run("DUO", ["algorithm=duo", "algorithm.curriculum_start=0", "algorithm.curriculum_end={half_steps}",
                "algorithm.gumbel_tau_log10_start=-3", "algorithm.gumbel_tau_log10_end=-3"]),
    # configs/algorithm/duo.yaml as it is (made for 1M steps): here the whole run is in the curriculum (tau = 0.1)
    Run("DUO, config defaults", ["algorithm=duo"]),
    Run("UDLM", ["algorithm=udlm"]),
]


@dataclass
class Comparison:
    """A table of models trained from scratch with one budget: its title, what differs from the paper, the
    paper's numbers, the default output file."""

    title: str
    note: str
    paper: str
    runs: list[Run]
    out: str


COMPARISONS = {
    "bd3lm": Comparison(
        "BD3-LM's comparison (block diffusion between AR and MDLM)",
        "every model trained from scratch (the paper fine-tunes BD3-LM from MDLM); same validation tokens; the "
        "BD3-LM bound is the unclipped one.",
        "Paper (OWT, PPL): AR 17.54 < BD3-LM L'=4 20.73 < L'=8 21.68 < L'=16 22.27 < MDLM 22.98",
        BLOCK_DIFFUSION, "bd3lm_small.md"),
    "duo": Comparison(
        "DUO's comparison (uniform-state diffusion against MDLM)",
        "every model trained from scratch; same validation tokens; the DUO and UDLM rows are UDLM's NELBO. DUO: "
        "the curriculum (soft inputs, tau = 1e-3, on the duality band) for the first half of the steps, then the "
        "NELBO, as the reference's LM1B / OWT scripts (500K of 1M steps); DUO, config defaults: `algorithm=duo` "
        "alone, whose curriculum (made for 1M steps) lasts the whole budget here, at tau = 0.1.",
        "Paper (PPL): LM1B AR 22.3 < MDLM 27.0 < DUO 29.9 < UDLM 31.3; OWT AR 17.5 < MDLM 23.2 < DUO 25.2 < UDLM 27.4",
        UNIFORM_STATE, "duo_small.md"),
}
ABLATIONS = [
    Run("MDLM, T=1000", ["parameterization=subs", "T=1000"]),
    Run("  w/o carry-over", ["parameterization=d3pm", "T=1000", "subs_masking=true", "sampling.predictor=ddpm"]),
]


def data_overrides(choice: str, length: int) -> tuple[str, list[str]]:
    ptb = SHARED_DATA / "ptb"
    if choice == "ptb" or (choice == "auto" and ptb.is_dir()):
        if not ptb.is_dir():
            raise SystemExit(f"--data ptb needs {ptb}")
        return "PTB (GPT-2 tokenizer)", [
            "data=text_files",
            f"data.train_path={ptb / 'ptb.train.txt'}",
            f"data.valid_path={ptb / 'ptb.valid.txt'}",
            f"data.tokenizer_name_or_path={SHARED_DATA / 'gpt2_tokenizer'}",
            "data.document_separator=line",
            f"model.length={length}",
        ]
    return "built-in synthetic corpus", ["data=synthetic", f"model.length={length}"]


def slug(name: str) -> str:
    """A folder name for a row label: 'MDLM, T=1000' -> 'MDLM_T1000'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", name.replace("=", "")).strip("_")


def main_py(args: list[str], log: Path) -> None:
    cmd = [sys.executable, str(ROOT / "main.py"), *args]
    with log.open("w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\nsee {log}")


def train_and_eval(run: Run, common: list[str], out_dir: Path, eval_extra: list[str] | None = None) -> dict:
    run_dir = out_dir / slug(run.name)
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    main_py([*common, *budget_overrides(run, common), f"hydra.run.dir={run_dir}"], run_dir / "train.log")
    train_seconds = time.perf_counter() - start
    results = evaluate(run, common, run_dir, eval_extra or [])
    results["train_minutes"] = train_seconds / 60
    return results


def evaluate(run: Run, common: list[str], run_dir: Path, extra: list[str], tag: str = "eval") -> dict:
    eval_dir = run_dir / tag
    main_py(
        [*common, *budget_overrides(run, common), *extra, "mode=ppl_eval",
         f"eval.checkpoint_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={eval_dir}"],
        run_dir / f"{tag}.log",
    )
    return json.loads((eval_dir / "eval_results.json").read_text())


def budget_overrides(run: Run, common: list[str]) -> list[str]:
    """The run's overrides with ``{half_steps}`` replaced by half of the budget's ``trainer.max_steps``."""
    steps = int(next(o for o in common if o.startswith("trainer.max_steps=")).split("=", 1)[1])
    return [o.replace("{half_steps}", str(steps // 2)) for o in run.overrides]


def fmt_row(name: str, r: dict) -> str:
    truth = f"{r['true_nll']:.3f}" if "true_nll" in r else "-"
    return (
        f"| {name} | {r['nll']:.3f} ± {r['nll_stderr']:.3f} | {r['ppl']:.2f} | {truth} | "
        f"{int(r['num_tokens']):,} | {r.get('train_minutes', float('nan')):.1f} |"
    )


HEADER = (
    "| model | NLL (nats/token; bound for diffusion) | PPL | true NLL | tokens | train min |\n"
    "|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="default")
    parser.add_argument("--data", choices=("auto", "ptb", "synthetic"), default="auto")
    parser.add_argument("--model", default="micro", help="model size config for every run (default micro)")
    parser.add_argument("--table", choices=("mdlm", *COMPARISONS), default="mdlm",
                        help="mdlm: the MDLM paper's tables; bd3lm: AR, BD3-LM (L' = 4, 16) and MDLM; "
                             "duo: MDLM, DUO and UDLM")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: results/paper_tables_small.md (mdlm), results/bd3lm_small.md (bd3lm), "
                             "results/duo_small.md (duo)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "outputs" / "reproduce")
    args = parser.parse_args()
    b = BUDGETS[args.budget]
    data_name, data = data_overrides(args.data, b["length"])
    common = [
        f"model={args.model}",
        *data,
        f"trainer.max_steps={b['steps']}",
        f"trainer.val_check_interval={b['val_every']}",
        f"trainer.limit_val_batches={b['valid_limit']}",
        "trainer.num_sanity_val_steps=0",
        f"loader.global_batch_size={b['batch']}",
        f"loader.eval_global_batch_size={b['batch']}",
        "lr_scheduler.num_warmup_steps=" + str(max(1, b["steps"] // 10)),
        "optim.lr=1e-3",
        "training.ema=0.999",
        "sampling.num_sample_log=0",
        "wandb.mode=disabled",
        f"callbacks.checkpoint_every_n_steps.every_n_train_steps={b['val_every']}",
    ]
    out_dir = args.work_dir / args.budget
    started = time.perf_counter()
    if args.table in COMPARISONS:
        comparison = COMPARISONS[args.table]
        args.out = args.out or ROOT / "results" / comparison.out
        comparison_table(args, comparison, b, data_name, common, out_dir, started)
        return
    args.out = args.out or ROOT / "results" / "paper_tables_small.md"
    lines = [
        "# Small-scale reproduction of the MDLM paper's comparisons",
        "",
        f"Data: {data_name}; model `{args.model}` for every run; {b['steps']} steps x {b['batch']} sequences x "
        f"{b['length']} tokens = {b['steps'] * b['batch'] * b['length']:,} training tokens each; "
        "same validation tokens.",
        f"Command: `python scripts/reproduce_tables.py --budget {args.budget} --data {args.data} --model {args.model}` "
        f"({datetime.date.today()})",
        "",
        "## Baselines (paper, LM1B: AR 22.32 < MDLM 27.04 < SEDD 32.79 < D3PM 76.90 in PPL)",
        "",
        HEADER,
    ]
    results = train_rows(MODELS, common, out_dir, lines)
    lines.append("")

    lines += ["## MDLM ablation (paper, LM1B: 27.04 / 27.19 / 28.56 / 28.51)", "", HEADER,
              fmt_row("MDLM (continuous time)", results["MDLM"])]
    for run in ABLATIONS:
        print(f"[reproduce] training {run.name.strip()} ...", flush=True)
        results[run.name] = train_and_eval(run, common, out_dir)
        lines.append(fmt_row(run.name, results[run.name]))
    lines.append(fmt_row("  w/o zero masking (= D3PM above)", results["D3PM absorb (T=1000)"]))

    paper = "paper, OWT: T=10 42.18, 100 24.35, 1000 23.15, inf 23.05"
    lines += ["", f"## Eval-time T on the continuous-time MDLM ({paper})", "", HEADER]
    mdlm_dir = out_dir / "MDLM"
    for T in (10, 100, 1000):
        r = evaluate(MODELS[1], common, mdlm_dir, [f"T={T}"], tag=f"eval_T{T}")
        lines.append(fmt_row(f"T = {T}", r))
    lines.append(fmt_row("T = inf (continuous)", results["MDLM"]))
    minutes = (time.perf_counter() - started) / 60
    lines += ["", f"Total run time: {minutes:.1f} min. Standard errors are over validation sequences "
              "(one time sample per sequence for the diffusion bounds)."]
    write_table(lines, args.out, results)


def train_rows(runs: list[Run], common: list[str], out_dir: Path, lines: list[str]) -> dict[str, dict]:
    """Train and evaluate each run, appending its row and then the measured order to ``lines``."""
    results = {}
    for run in runs:
        print(f"[reproduce] training {run.name} ...", flush=True)
        results[run.name] = train_and_eval(run, common, out_dir)
        lines.append(fmt_row(run.name, results[run.name]))
        print(lines[-1], flush=True)
    order = sorted(results, key=lambda k: results[k]["nll"])
    lines += ["", f"Measured order (lowest NLL first): {' < '.join(order)}."]
    return results


def write_table(lines: list[str], out: Path, results: dict[str, dict]) -> None:
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)
    print(f"wrote {out}")
    if not all(math.isfinite(r["nll"]) for r in results.values()):
        raise SystemExit("a run produced a non-finite NLL")


def comparison_table(args: argparse.Namespace, comparison: Comparison, b: dict, data_name: str,
                     common: list[str], out_dir: Path, started: float) -> None:
    lines = [
        f"# Small-scale reproduction of {comparison.title}",
        "",
        f"Data: {data_name}; model `{args.model}` for every run; {b['steps']} steps x {b['batch']} sequences x "
        f"{b['length']} tokens = {b['steps'] * b['batch'] * b['length']:,} training tokens each, {comparison.note}",
        f"Command: `python scripts/reproduce_tables.py --table {args.table} --budget {args.budget} --data {args.data} "
        f"--model {args.model}` "
        f"({datetime.date.today()})",
        "",
        f"## {comparison.paper}",
        "",
        HEADER,
    ]
    results = train_rows(comparison.runs, common, out_dir, lines)
    minutes = (time.perf_counter() - started) / 60
    lines += ["",
              f"Total run time: {minutes:.1f} min. Standard errors are over validation sequences (one time sample "
              "per sequence or block for the diffusion bounds)."]
    write_table(lines, args.out, results)


if __name__ == "__main__":
    main()
