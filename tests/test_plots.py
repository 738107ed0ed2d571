"""scripts/plot_run.py and scripts/plot_eval.py: the plotted data is the logged data, and the PNGs are real.

Runs are built as Lightning's CSV logger writes them (one row per logging call, empty cells for
the other columns); evaluation results are written by ``main.write_eval_results`` itself.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
from conftest import ROOT
from omegaconf import OmegaConf

sys.path.append(str(ROOT / "scripts"))  # after site-packages: scripts/lm_eval.py must not shadow lm-eval
import plot_eval  # noqa: E402
import plot_run  # noqa: E402

COLUMNS = ["epoch", "lr-AdamW", "step", "train/loss", "val/bpd", "val/nll", "val/ppl", "val/true_nll"]
BATCH, LENGTH = 8, 16  # loader.global_batch_size, model.length of the runs written below


def write_version(run_dir: Path, version: int, rows: list[dict[str, float]]) -> Path:
    """``run_dir/csv/version_<version>/metrics.csv`` with ``rows`` (missing columns left empty)."""
    path = run_dir / "csv" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows({"epoch": 0, **row} for row in rows)
    return path


def training_rows(steps: list[int], offset: float) -> list[dict[str, float]]:
    """A learning-rate row and a train-loss row per step, as LearningRateMonitor and self.log write them."""
    rows: list[dict[str, float]] = []
    for i, step in enumerate(steps):
        rows.append({"step": step, "lr-AdamW": 1e-4 * (i + 1)})
        rows.append({"step": step, "train/loss": offset + 0.1 * i})
    return rows


def write_config(run_dir: Path, name: str = "config_train.yaml") -> None:
    path = run_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    loader = {"global_batch_size": BATCH, "eval_global_batch_size": "${.global_batch_size}"}  # as .hydra/ has it
    OmegaConf.save(OmegaConf.create({"loader": loader, "model": {"length": LENGTH}}), path)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """One version: train loss at 10, 20, 30, 40; validation at 40 (bound 2.5 against the truth 2.0)."""
    run = tmp_path / "run"
    write_version(run, 0, [*training_rows([10, 20, 30, 40], offset=3.0),
                           {"step": 40, "val/nll": 2.5, "val/true_nll": 2.0, "val/bpd": 3.6, "val/ppl": 12.2}])
    write_config(run)
    return run


def test_curves_are_the_logged_values_and_tokens_are_steps_times_batch_times_length(run_dir: Path) -> None:
    curves = plot_run.load_run(run_dir)
    train = curves.metrics["train/loss"]
    assert train.steps.tolist() == [10, 20, 30, 40]
    assert train.values == pytest.approx([3.0, 3.1, 3.2, 3.3])
    assert curves.metrics["lr-AdamW"].values == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4])
    assert curves.metrics["val/nll"].steps.tolist() == [40] and curves.metrics["val/true_nll"].values.tolist() == [2.0]
    assert curves.tokens_per_step == BATCH * LENGTH
    assert curves.tokens(train.steps).tolist() == [s * BATCH * LENGTH for s in (10, 20, 30, 40)]

    fig = plot_run.draw(curves)
    loss_ax, lr_ax = fig.axes[:2]
    lines = {line.get_label().split(" (")[0]: line for line in loss_ax.get_lines()}
    assert lines["train loss"].get_xdata().tolist() == [10, 20, 30, 40]
    assert lines["train loss"].get_ydata() == pytest.approx([3.0, 3.1, 3.2, 3.3])
    assert lines["val NLL bound"].get_ydata().tolist() == [2.5]
    assert list(lines["true NLL of the source"].get_ydata()) == [2.0, 2.0]  # a horizontal line
    assert lr_ax.get_lines()[0].get_ydata() == pytest.approx([1e-4, 2e-4, 3e-4, 4e-4])
    fig.canvas.draw()
    (top,) = loss_ax.child_axes  # the tokens axis
    assert top.get_xlim() == pytest.approx(tuple(x * BATCH * LENGTH for x in loss_ax.get_xlim()))


def test_resumed_versions_join_in_numeric_order_and_later_starts_win(tmp_path: Path) -> None:
    """version_10 comes after version_9; rows an earlier start logged at or after the next start's
    first step were discarded work; an evaluation-only version (ppl_eval in the run folder) is left out."""
    run = tmp_path / "run"
    write_version(run, 0, training_rows([10, 20, 30, 40], offset=5.0))  # resumed at 35: its 40 was lost
    write_version(run, 9, training_rows([35, 45], offset=4.0))
    write_version(run, 10, [*training_rows([50, 60], offset=3.0), {"step": 60, "val/nll": 2.9}])
    write_version(run, 11, [{"step": 0, "val/nll": 2.8}])  # mode=ppl_eval in the same folder
    curves = plot_run.load_run(run)
    train = curves.metrics["train/loss"]
    assert train.steps.tolist() == [10, 20, 30, 35, 45, 50, 60]
    assert train.values == pytest.approx([5.0, 5.1, 5.2, 4.0, 4.1, 3.0, 3.1])
    assert curves.metrics["val/nll"].steps.tolist() == [60]
    assert [p.parent.name for p in curves.versions] == ["version_0", "version_9", "version_10"]
    assert [p.parent.name for p in curves.skipped] == ["version_11"]
    assert curves.tokens_per_step is None  # no config in this folder: no tokens axis
    assert plot_run.draw(curves).axes[0].child_axes == []


def test_the_hydra_config_gives_the_tokens_when_config_train_is_missing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_version(run, 0, training_rows([10], offset=1.0))
    write_config(run, ".hydra/config.yaml")
    assert plot_run.load_run(run).tokens_per_step == BATCH * LENGTH


def test_plot_run_writes_a_png_into_the_run_folder(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = plot_run.main([str(run_dir), "--dpi", "50"])
    assert out == run_dir / "curves.png"
    image = matplotlib.image.imread(out)  # (H, W, 4): a PNG matplotlib can read back
    assert image.shape[:2] == (round(3.9 * 50), round(2 * 5.2 * 50)) and 5_000 < out.stat().st_size < 150_000
    assert image.std() > 0.05  # not a blank canvas
    printed = capsys.readouterr().out
    assert f"last step 40 = {40 * BATCH * LENGTH:,} tokens" in printed and "val NLL bound at step 40: 2.5000" in printed


def test_a_folder_without_metrics_names_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"csv/version_\*/metrics\.csv"):
        plot_run.load_run(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        plot_run.main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 1
    write_version(tmp_path, 0, [{"step": 0, "val/nll": 2.8}])
    with pytest.raises(ValueError, match="no 'train/loss'.*ppl_eval"):
        plot_run.load_run(tmp_path)


# --------------------------------------------------------------------------- plot_eval
def result(nll: float, stderr: float = 0.05, true_nll: float | None = None) -> dict[str, float]:
    """One data set's entry as ``Diffusion.last_val`` holds it."""
    r = {"num_tokens": 1000.0, "nll": nll, "nll_stderr": stderr, "bpd": nll / math.log(2), "ppl": math.exp(nll),
         "content_num_tokens": 900.0, "content_nll": nll + 0.1, "content_nll_stderr": stderr,
         "content_ppl": math.exp(nll + 0.1)}
    if true_nll is not None:
        r.update(true_nll=true_nll, gap=nll - true_nll, gap_stderr=stderr)
    return r


def write_results(run_dir: Path, results: dict[str, dict[str, float]], failed: dict[str, str] | None = None) -> Path:
    """``run_dir/eval_results.json`` written by main.py's own writer (rank zero)."""
    import main

    run_dir.mkdir(parents=True)
    cfg = OmegaConf.create({"eval": {"checkpoint_path": str(run_dir / "checkpoints" / "last.ckpt"), "mc_samples": 1}})
    names = [*results, *(failed or {})]
    main.write_eval_results(SimpleNamespace(is_global_zero=True), run_dir, cfg, names, results, failed or {})
    return run_dir / "eval_results.json"


@pytest.fixture
def eval_files(tmp_path: Path) -> list[Path]:
    return [write_results(tmp_path / "A", {"ptb": result(4.0), "wikitext2": result(3.5, 0.1)}),
            write_results(tmp_path / "B", {"ptb": result(4.5)}, failed={"wikitext2": "FileNotFoundError: x"}),
            write_results(tmp_path / "C", {"synthetic": result(2.2, true_nll=2.0)})]


def test_eval_bars_are_the_json_values_one_group_per_data_set(eval_files: list[Path]) -> None:
    table = plot_eval.eval_table(eval_files)
    assert table.labels == ["A", "B", "C"]  # the evaluated checkpoint's run folder
    assert table.datasets == ["ptb", "wikitext2", "synthetic"]
    expected = np.array([[math.exp(4.0), math.exp(3.5), np.nan], [math.exp(4.5), np.nan, np.nan],
                         [np.nan, np.nan, math.exp(2.2)]])
    np.testing.assert_allclose(table.values, expected)
    np.testing.assert_allclose(table.errors[:, 0, 1], [math.exp(3.5) - math.exp(3.4), math.exp(3.6) - math.exp(3.5)])
    np.testing.assert_allclose(table.true, [np.nan, np.nan, math.exp(2.0)])

    fig = plot_eval.draw_eval(table)
    ax = fig.axes[0]
    heights = [[bar.get_height() for bar in container] for container in ax.containers if hasattr(container, "patches")]
    np.testing.assert_allclose(heights, expected)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ptb", "wikitext2", "synthetic"]
    (truth,) = [c for c in ax.collections if c.get_label().startswith("true")]
    (segment,) = truth.get_segments()
    assert segment[:, 1] == pytest.approx([math.exp(2.0)] * 2) and segment[:, 0] == pytest.approx([1.55, 2.45])


@pytest.mark.parametrize(("metric", "convert"), [("nll", lambda x: x), ("bpd", lambda x: x / math.log(2))])
def test_eval_metric_nll_and_bpd(eval_files: list[Path], metric: str, convert) -> None:
    table = plot_eval.eval_table(eval_files[:1], ["mine"], metric=metric)
    np.testing.assert_allclose(table.values, [[convert(4.0), convert(3.5)]])
    np.testing.assert_allclose(table.errors[:, 0, 1], [convert(0.1), convert(0.1)])


def test_eval_labels_must_match_the_files(eval_files: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="2 label.*3 --eval file"):
        plot_eval.eval_table(eval_files, ["a", "b"])
    with pytest.raises(ValueError, match="repeat"):
        plot_eval.eval_table(eval_files[:2], ["a", "a"])
    (tmp_path / "other.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="not an eval_results.json"):
        plot_eval.read_eval_results(tmp_path / "other.json")


def samplers_json(path: Path) -> Path:
    rows = [{"sampler": "held-out data", "steps": None, "nfe": 0.0, "mauve": 0.99, "gen_ppl": 100.0, "entropy": 3.7},
            *({"sampler": "ddpm", "steps": t, "nfe": float(t), "mauve": m, "gen_ppl": g, "entropy": 3.6}
              for t, m, g in [(64, 0.9, 130.0), (16, 0.5, 200.0)])]
    path.write_text(json.dumps({"tiny": {"label": "a tiny model", "short": "tiny", "rows": rows}}))
    return path


def test_samplers_figure_is_compare_samplers_plot_of_the_json(tmp_path: Path) -> None:
    fig = plot_eval.draw_samplers(samplers_json(tmp_path / "samplers.json"))
    mauve_ax, gen_ppl_ax = fig.axes[:2]
    (ddpm,) = [line for line in mauve_ax.get_lines() if line.get_label() == "ddpm"]
    assert ddpm.get_xdata() == pytest.approx([16, 64]) and ddpm.get_ydata() == pytest.approx([0.5, 0.9])
    (data,) = [line for line in mauve_ax.get_lines() if line.get_label() == "held-out data"]
    assert list(data.get_ydata()) == [0.99, 0.99]
    assert [line.get_ydata().tolist() for line in gen_ppl_ax.get_lines() if line.get_label() == "ddpm"] == [[200, 130]]
    (tmp_path / "bad.json").write_text(json.dumps({"tiny": {"label": "no rows"}}))
    with pytest.raises(ValueError, match="compare_samplers"):
        plot_eval.draw_samplers(tmp_path / "bad.json")


def test_plot_eval_cli_writes_both_pngs(eval_files: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "figures"
    written = plot_eval.main(["--eval", *map(str, eval_files), "--labels", "MDLM", "AR", "toy",
                              "--samplers", str(samplers_json(tmp_path / "samplers.json")), "--out", str(out),
                              "--dpi", "50"])
    assert written == [out / "eval.png", out / "samplers.png"]
    for path in written:
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and 3_000 < path.stat().st_size < 300_000
        assert image.std() > 0.05
    with pytest.raises(SystemExit) as exit_info:
        plot_eval.main(["--eval", *map(str, eval_files), "--labels", "one", "--out", str(out)])
    assert exit_info.value.code == 1
    with pytest.raises(SystemExit):
        plot_eval.main(["--out", str(out)])  # nothing to draw
