"""A run's training curves from its CSV metrics: loss, validation NLL bound (and the truth), learning rate.

    python scripts/plot_run.py outputs/quickstart                 # writes outputs/quickstart/curves.png
    python scripts/plot_run.py outputs/quickstart --out /tmp/curves.png

Reads ``RUN_DIR/csv/version_*/metrics.csv`` (Lightning's CSV logger, one folder per start of
``main.py`` in that run directory). A resumed run has several: they are joined in version order,
and where a later start re-logged steps an earlier one had already logged (it resumed from a
checkpoint older than the last logged step) the later rows win. A version without ``train/loss``
is an evaluation (``mode=ppl_eval`` run in the same folder) and is left out.

The x axis is optimizer steps; the top axis is tokens seen,
``tokens = step x loader.global_batch_size x model.length``, both read from the run's
``config_train.yaml`` (or ``.hydra/config.yaml``), which the latest start wrote (a batch size
changed between starts is not tracked); without either, the top axis is left out.
On the built-in corpus (``data=synthetic``) validation also logs ``val/true_nll``, the exact NLL of
the same tokens under the source: the bound ``val/nll`` can only approach it from above.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

if TYPE_CHECKING:  # matplotlib is imported when drawing, with the Agg backend
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

METRICS_GLOB = "csv/version_*/metrics.csv"
CONFIG_FILES = ("config_train.yaml", ".hydra/config.yaml")  # the resolved copy first
TRAIN_LOSS = "train/loss"


@dataclass
class Series:
    """One logged metric: ``steps`` (N,) int64 optimizer steps, ``values`` (N,) float64."""

    steps: np.ndarray
    values: np.ndarray


@dataclass
class RunCurves:
    """What :func:`draw` plots: every metric by name, and the tokens one optimizer step consumes."""

    run_dir: Path
    metrics: dict[str, Series]
    versions: list[Path]  # the metrics.csv files used, in order
    tokens_per_step: int | None = None  # loader.global_batch_size x model.length; None: no config found
    skipped: list[Path] = field(default_factory=list)  # evaluation-only versions

    def tokens(self, steps: np.ndarray) -> np.ndarray:
        """Tokens seen after ``steps`` optimizer steps: ``steps x global batch x length``."""
        return np.asarray(steps) * self._per_step()

    def steps_at(self, tokens: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`tokens` (the top axis needs both)."""
        return np.asarray(tokens) / self._per_step()

    def _per_step(self) -> int:
        if self.tokens_per_step is None:
            raise ValueError(f"no batch size / length for {self.run_dir}: looked for {list(CONFIG_FILES)}")
        return self.tokens_per_step


def version_number(path: Path) -> int:
    """``.../version_12/metrics.csv`` -> 12 (numeric order: version_10 comes after version_9)."""
    match = re.fullmatch(r"version_(\d+)", path.parent.name)
    return int(match.group(1)) if match else -1


def find_metrics(run_dir: Path) -> list[Path]:
    """The run's ``metrics.csv`` files in version order; an error naming what was looked for if none."""
    found = sorted(run_dir.glob(METRICS_GLOB), key=version_number)
    if not found:
        where = "it does not exist" if not run_dir.is_dir() else "there is none"
        raise FileNotFoundError(
            f"no training metrics in {run_dir}: looked for {run_dir / METRICS_GLOB} ({where}). "
            "Training writes them there (Lightning's CSV logger); pass the run directory of a `main.py` training run, "
            "e.g. outputs/quickstart."
        )
    return found


def read_metrics_csv(path: Path) -> dict[str, Series]:
    """Every non-empty cell of one ``metrics.csv`` by column (rows hold a subset of the columns each)."""
    columns: dict[str, tuple[list[int], list[float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("step"):
                continue
            step = int(float(row["step"]))
            for name, cell in row.items():
                if name in ("step", "epoch") or cell in ("", None):
                    continue
                steps, values = columns.setdefault(name, ([], []))
                steps.append(step)
                values.append(float(cell))
    return {name: Series(np.asarray(s, dtype=np.int64), np.asarray(v, dtype=np.float64))
            for name, (s, v) in columns.items()}


def join_versions(parts: list[dict[str, Series]]) -> dict[str, Series]:
    """Versions in order; rows of a version at or after the next version's first step are dropped.

    The next start resumed from a checkpoint at that step, so those rows belong to discarded work.
    """
    firsts = [min((int(s.steps.min()) for s in part.values() if len(s.steps)), default=None) for part in parts]
    joined: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for i, part in enumerate(parts):
        later = [f for f in firsts[i + 1 :] if f is not None]
        cut = min(later) if later else math.inf
        for name, series in part.items():
            keep = series.steps < cut
            steps, values = joined.setdefault(name, ([], []))
            steps.append(series.steps[keep])
            values.append(series.values[keep])
    return {name: Series(np.concatenate(s), np.concatenate(v)) for name, (s, v) in joined.items()}


def tokens_per_step(run_dir: Path) -> int | None:
    """``loader.global_batch_size x model.length`` from the run's config, None without one."""
    for name in CONFIG_FILES:
        path = run_dir / name
        if not path.is_file():
            continue
        cfg = OmegaConf.load(path)
        try:
            batch = OmegaConf.select(cfg, "loader.global_batch_size", throw_on_resolution_failure=True)
            length = OmegaConf.select(cfg, "model.length", throw_on_resolution_failure=True)
        except OmegaConfBaseException:
            continue
        if isinstance(batch, int) and isinstance(length, int):
            return batch * length
    return None


def load_run(run_dir: Path | str) -> RunCurves:
    """Read a run directory: its metrics (versions joined) and its tokens per optimizer step."""
    run_dir = Path(run_dir)
    used, skipped, parts = [], [], []
    for path in find_metrics(run_dir):
        part = read_metrics_csv(path)
        if TRAIN_LOSS in part:
            used.append(path)
            parts.append(part)
        else:
            skipped.append(path)
    if not parts:
        raise ValueError(
            f"{run_dir} has metrics but no {TRAIN_LOSS!r} in any of {[str(p) for p in skipped]}: "
            "only evaluation runs (mode=ppl_eval) logged there. Pass the directory a training run wrote."
        )
    return RunCurves(run_dir, join_versions(parts), used, tokens_per_step(run_dir), skipped)


def learning_rate_names(metrics: dict[str, Series]) -> list[str]:
    """LearningRateMonitor's columns (``lr-AdamW``, ``lr-AdamW/pg1``, ...)."""
    return sorted(name for name in metrics if name == "lr" or name.startswith("lr-"))


def draw_loss(ax: Axes, m: dict[str, Series]) -> None:
    """Train loss, the validation NLL bound and, where logged, the source's true NLL (dashed)."""
    train = m[TRAIN_LOSS]
    ax.plot(train.steps, train.values, color="tab:blue", linewidth=0.9, alpha=0.8, label="train loss")
    if "val/nll" in m:
        val = m["val/nll"]
        ax.plot(val.steps, val.values, color="tab:orange", marker="o", markersize=4,
                label=f"val NLL bound (last {val.values[-1]:.3f})")
    if "val/true_nll" in m:
        true = m["val/true_nll"]
        label = f"true NLL of the source ({true.values[-1]:.3f})"
        if np.ptp(true.values) <= 1e-9 * abs(true.values[0]):  # the same validation tokens every time
            ax.axhline(true.values[0], color="black", linestyle="--", linewidth=1, label=label)
        else:
            ax.plot(true.steps, true.values, color="black", linestyle="--", linewidth=1, label=label)
    ax.set_ylabel("loss (nats / token)")
    ax.legend(fontsize=8)


def draw(curves: RunCurves, title: str | None = None) -> Figure:
    """Loss panel (:func:`draw_loss`), learning-rate panel and, if logged, gen PPL; x = optimizer steps.

    With ``tokens_per_step`` known, each panel has a top axis in tokens seen.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, FuncFormatter

    m = curves.metrics
    panels = 2 + ("val/gen_ppl" in m)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.9), squeeze=False)
    draw_loss(axes[0][0], m)
    lr_ax, lr_names = axes[0][1], learning_rate_names(m)
    for name in lr_names:
        lr_ax.plot(m[name].steps, m[name].values, label=name.removeprefix("lr-"))
    lr_ax.set_ylabel("learning rate")
    lr_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.2g}"))
    if len(lr_names) > 1:
        lr_ax.legend(fontsize=8)
    if panels == 3:
        gen = m["val/gen_ppl"]
        axes[0][2].plot(gen.steps, gen.values, marker="o", color="tab:green")
        axes[0][2].set_ylabel("generative perplexity (eval LM)")
    for ax in axes[0]:
        ax.set_xlabel("optimizer steps")
        ax.grid(alpha=0.3)
        if curves.tokens_per_step is not None:
            top = ax.secondary_xaxis("top", functions=(curves.tokens, curves.steps_at))
            top.xaxis.set_major_formatter(EngFormatter(sep=""))
            top.set_xlabel("tokens seen", fontsize=9)
    if title is None:
        title = str(curves.run_dir)
        if curves.tokens_per_step is not None:
            title += f"  ({curves.tokens_per_step:,} tokens per optimizer step)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def summary(curves: RunCurves) -> str:
    """One line per fact the figure shows, for the terminal."""
    m = curves.metrics
    last = int(max(s.steps.max() for s in m.values() if len(s.steps)))
    lines = [f"{len(curves.versions)} version(s): {', '.join(p.parent.name for p in curves.versions)}; "
             f"last step {last:,}"
             + (f" = {last * curves.tokens_per_step:,} tokens ({curves.tokens_per_step:,} per step)"
                if curves.tokens_per_step else " (no config: tokens unknown)")]
    if curves.skipped:
        lines.append(f"left out (evaluation only): {', '.join(p.parent.name for p in curves.skipped)}")
    if "val/nll" in m:
        val = m["val/nll"]
        line = f"val NLL bound at step {int(val.steps[-1]):,}: {val.values[-1]:.4f} nats/token"
        if "val/true_nll" in m:
            line += f" (true NLL {m['val/true_nll'].values[-1]:.4f})"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a training run directory, e.g. outputs/quickstart")
    parser.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/curves.png)")
    parser.add_argument("--title", default=None, help="figure title (default: the run directory)")
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        curves = load_run(args.run_dir)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"plot_run.py: {error}\n")
    out = args.out or args.run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = draw(curves, args.title)
    fig.savefig(out, dpi=args.dpi)
    print(summary(curves))
    print(f"Wrote {out}")
    return out


if __name__ == "__main__":
    main()
