"""Figures of evaluation results: the likelihood table of ``ppl_eval`` runs, and the sampler comparison.

    python scripts/plot_eval.py --eval outputs/reproduce/default/{MDLM,AR}/eval/eval_results.json \\
        --labels MDLM AR --out /tmp/figures                          # writes /tmp/figures/eval.png
    python scripts/plot_eval.py --samplers results/samplers.json --out /tmp/figures   # /tmp/figures/samplers.png

``--eval``: ``eval_results.json`` files written by ``python main.py mode=ppl_eval ...`` (one per
model / run; each holds one or several data sets, ``eval.datasets``). The figure has one bar group
per data set and one bar per file, with the error bar of the NLL's standard error (for PPL:
``exp(nll ± stderr)``) and, where the data has a known entropy (the built-in corpus), the
true NLL as a dashed line over the group. ``--metric`` picks PPL (default), NLL (nats/token) or BPD.
``--labels``: one per file; default the run folder of the evaluated checkpoint.

``--samplers``: the JSON ``scripts/compare_samplers.py`` writes (``results/samplers.json``), drawn by
that script's own ``plot`` (one row of panels per model, x = NFE), so it can be redrawn without
sampling again.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

if TYPE_CHECKING:  # matplotlib is imported when drawing, with the Agg backend
    from matplotlib.figure import Figure

METRICS = {"ppl": "perplexity", "nll": "NLL (nats / token)", "bpd": "bits per token"}


@dataclass
class EvalTable:
    """``values[r, d]``: run ``r``'s ``metric`` on data set ``d`` (nan: not evaluated or failed).

    ``errors``: (2, R, D) the distances to the lower and upper end of the NLL's standard error
    interval in the metric's units; ``true[d]``: the data's true value, nan where unknown.
    """

    metric: str
    labels: list[str]
    datasets: list[str]
    values: np.ndarray  # (R, D)
    errors: np.ndarray  # (2, R, D)
    true: np.ndarray  # (D,)


def read_eval_results(path: Path) -> dict[str, dict[str, float]]:
    """``{data set: metrics}`` of one ``eval_results.json`` (``main.write_eval_results``'s format)."""
    payload = json.loads(Path(path).read_text())
    if isinstance(payload.get("datasets"), dict):
        return payload["datasets"]
    if "nll" in payload and "data" in payload:  # one data set, no per-data-set table
        return {payload["data"]: payload}
    raise ValueError(f"{path} is not an eval_results.json of `main.py mode=ppl_eval`: it has neither 'datasets' "
                     f"nor 'data' and 'nll' (keys: {sorted(payload)})")


def default_label(path: Path) -> str:
    """The evaluated checkpoint's run folder (``.../MDLM/checkpoints/last.ckpt``: MDLM), else the file's folder."""
    checkpoint = Path(str(json.loads(Path(path).read_text()).get("checkpoint") or ""))
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent.name
    return Path(path).resolve().parent.name


def in_metric(nll: float, metric: str) -> float:
    """An NLL in nats/token as ``metric``: ``exp(nll)`` (ppl), ``nll / ln 2`` (bpd) or itself."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {sorted(METRICS)}")
    return math.exp(nll) if metric == "ppl" else nll / math.log(2) if metric == "bpd" else nll


def eval_table(paths: list[Path], labels: list[str] | None = None, metric: str = "ppl") -> EvalTable:
    """The runs' results side by side; data sets in order of first appearance."""
    if labels is None:
        labels = [default_label(p) for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f"--labels: {len(labels)} label(s) for {len(paths)} --eval file(s); give one per file")
    if len(set(labels)) != len(labels):
        raise ValueError(f"the labels {labels} repeat; name each file with --labels")
    runs = [read_eval_results(p) for p in paths]
    datasets = list(dict.fromkeys(name for run in runs for name in run))
    values = np.full((len(runs), len(datasets)), np.nan)
    errors = np.zeros((2, len(runs), len(datasets)))
    true = np.full(len(datasets), np.nan)
    for r, run in enumerate(runs):
        for d, name in enumerate(datasets):
            if name not in run:
                continue
            result = run[name]
            nll, stderr = result["nll"], result.get("nll_stderr", 0.0)
            values[r, d] = result.get(metric, in_metric(nll, metric))
            low, high = in_metric(nll - stderr, metric), in_metric(nll + stderr, metric)
            errors[:, r, d] = values[r, d] - low, high - values[r, d]
            if "true_nll" in result:
                true[d] = in_metric(result["true_nll"], metric)
    return EvalTable(metric, labels, datasets, values, errors, true)


def draw_eval(table: EvalTable) -> Figure:
    """Grouped bars: x = data set, one bar per run, the value printed on each; true value dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, sets = table.values.shape
    width = 0.8 / runs
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 + sets * (0.55 * runs + 0.6)), 3.8))
    x = np.arange(sets)
    for r, label in enumerate(table.labels):
        bars = ax.bar(x - 0.4 + width * (r + 0.5), table.values[r], width, yerr=table.errors[:, r], capsize=3,
                      label=label)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, padding=2)
    for d in np.flatnonzero(~np.isnan(table.true)):
        ax.hlines(table.true[d], d - 0.45, d + 0.45, colors="black", linestyles="--", linewidth=1,
                  label="true (source entropy)" if d == np.flatnonzero(~np.isnan(table.true))[0] else None)
    ax.set_xticks(x, table.datasets)
    ax.set_ylabel(METRICS[table.metric])
    ax.set_title(f"{METRICS[table.metric]} by data set\n(lower is better; bars: ± one standard error)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.12)
    fig.tight_layout()
    return fig


def draw_samplers(path: Path) -> Figure:
    """``results/samplers.json`` drawn by ``scripts/compare_samplers.py``'s ``plot``."""
    if str(ROOT / "scripts") not in sys.path:
        sys.path.append(str(ROOT / "scripts"))  # after site-packages (scripts/lm_eval.py vs lm-eval)
    import compare_samplers  # heavy (the repo's main module): only when asked for

    results: dict[str, Any] = json.loads(Path(path).read_text())
    if not isinstance(results, dict) or not all(isinstance(r, dict) and "rows" in r for r in results.values()):
        raise ValueError(f"{path} is not a JSON written by scripts/compare_samplers.py ({{model: {{'rows': [...]}}}})")
    return compare_samplers.plot(results)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", nargs="+", type=Path, default=[], metavar="FILE", help="eval_results.json files")
    parser.add_argument("--labels", nargs="+", default=None, help="one per --eval file")
    parser.add_argument("--metric", choices=sorted(METRICS), default="ppl")
    parser.add_argument("--samplers", type=Path, default=None, metavar="FILE", help="e.g. results/samplers.json")
    parser.add_argument("--out", type=Path, required=True, help="folder for eval.png and samplers.png")
    parser.add_argument("--dpi", type=int, default=110)
    args = parser.parse_args(argv)
    if not args.eval and args.samplers is None:
        parser.error("nothing to draw: give --eval FILE [FILE ...] and/or --samplers FILE")
    missing = [str(p) for p in [*args.eval, *([args.samplers] if args.samplers else [])] if not p.is_file()]
    if missing:
        parser.error(f"not found: {missing}")
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        if args.eval:
            table = eval_table(args.eval, args.labels, args.metric)
            draw_eval(table).savefig(args.out / "eval.png", dpi=args.dpi)
            written.append(args.out / "eval.png")
        if args.samplers is not None:
            draw_samplers(args.samplers).savefig(args.out / "samplers.png", dpi=args.dpi)
            written.append(args.out / "samplers.png")
    except ValueError as error:
        parser.exit(1, f"plot_eval.py: {error}\n")
    print("Wrote " + ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    main()
