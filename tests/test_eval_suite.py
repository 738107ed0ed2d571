"""ppl_eval over several data sets, Monte-Carlo samples, and exact aggregation over processes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from test_data_e2e import BASE, SMALL_RUN, write_wikitext
from test_main_e2e import run_main

from algorithms import item_draws


def test_item_draws_depend_only_on_the_index() -> None:
    together = item_draws(torch.tensor([3, 7, 11]), length=5, seed=0)
    alone = item_draws(torch.tensor([11]), length=5, seed=0)
    assert torch.equal(together.time[2:], alone.time) and torch.equal(together.mask[2:], alone.mask)
    other_sample = item_draws(torch.tensor([11]), length=5, seed=0, sample=1, num_samples=2)
    assert not torch.equal(other_sample.mask, alone.mask)
    assert not torch.equal(item_draws(torch.tensor([11]), 5, seed=1).mask, alone.mask)


def test_item_draw_times_fill_the_unit_interval_evenly() -> None:
    times = item_draws(torch.arange(1000), length=1, seed=0).time.sort().values
    assert times.min() >= 0 and times.max() < 1
    gaps = torch.diff(torch.cat([times, times[:1] + 1]))
    assert gaps.max() < 3.0 / 1000  # a Kronecker sequence; i.i.d. uniforms would leave gaps of ~log(n)/n


@pytest.fixture(scope="module")
def wikitext_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("wt")
    data = ["data=wikitext2", f"data.path={write_wikitext(root / 'wikitext-2-raw')}",
            "data.tokenizer_name_or_path=text8", f"data.cache_dir={root / 'cache'}", "model.length=32"]
    run_main(root / "run", *SMALL_RUN, *data, base=BASE)
    return root / "run" / "checkpoints" / "last.ckpt", data


def write_ptb(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for split, n in (("train", 10), ("valid", 12), ("test", 4)):
        (folder / f"ptb.{split}.txt").write_text(" the company 's shares were n't sold <unk> \n" * n)
    return folder


def test_ppl_eval_on_several_data_sets_writes_a_table(tmp_path: Path, wikitext_model) -> None:
    checkpoint, data = wikitext_model
    ptb = write_ptb(tmp_path / "ptb")
    proc = run_main(tmp_path / "eval", *SMALL_RUN, *data, "mode=ppl_eval", f"eval.checkpoint_path={checkpoint}",
                    "eval.datasets=[wikitext2,ptb]", f"eval.data_paths.wikitext2={data[1].split('=')[1]}",
                    f"eval.data_paths.ptb={ptb}",
                    "eval.mc_samples=2", base=BASE)
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert sorted(results["datasets"]) == ["ptb", "wikitext2"] and results["mc_samples"] == 2
    assert results["nll"] == results["datasets"]["wikitext2"]["nll"]  # the first one is the summary
    with open(tmp_path / "eval" / "eval_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["data"] for r in rows] == ["wikitext2", "ptb"]
    assert float(rows[1]["num_tokens"]) == results["datasets"]["ptb"]["num_tokens"] > 0
    assert "| ptb |" in proc.stdout and "Tokenizing ptb validation" in proc.stdout
    assert "ppl_eval (ptb next):  50%|" in proc.stdout and "| 1/2 [" in proc.stdout  # which data set, time left


def test_unknown_eval_data_set_names_the_valid_ones(tmp_path: Path, wikitext_model) -> None:
    checkpoint, data = wikitext_model
    proc = run_main(tmp_path / "eval", *SMALL_RUN, *data, "mode=ppl_eval", f"eval.checkpoint_path={checkpoint}",
                    "eval.datasets=[nope]", base=BASE, check=False)
    assert proc.returncode != 0 and "valid: [" in proc.stderr and "wikitext103" in proc.stderr


def test_two_processes_give_the_numbers_of_one(tmp_path: Path, wikitext_model) -> None:
    """No padded duplicates, per-sequence noise: 1 vs 2 gloo processes agree to float precision."""
    checkpoint, data = wikitext_model
    common = [*SMALL_RUN, *data, "mode=ppl_eval", f"eval.checkpoint_path={checkpoint}",
              "loader.eval_global_batch_size=6", "trainer.accelerator=cpu"]
    run_main(tmp_path / "one", *common, "trainer.devices=1", base=BASE)
    run_main(tmp_path / "two", *common, "trainer.devices=2", "strategy=ddp", base=BASE)
    one, two = (json.loads((tmp_path / d / "eval_results.json").read_text()) for d in ("one", "two"))
    assert one["num_tokens"] == two["num_tokens"]
    assert one["nll"] == pytest.approx(two["nll"], rel=1e-6)
    assert one["nll_stderr"] == pytest.approx(two["nll_stderr"], rel=1e-5)


def test_a_failing_data_set_keeps_the_others_results_and_exits_non_zero(tmp_path: Path, wikitext_model) -> None:
    """Before: when one data set of eval.datasets failed, the results computed for the others were lost."""
    checkpoint, data = wikitext_model
    proc = run_main(tmp_path / "eval", *SMALL_RUN, *data, "mode=ppl_eval", f"eval.checkpoint_path={checkpoint}",
                    "eval.datasets=[wikitext2,ptb]", f"eval.data_paths.wikitext2={data[1].split('=')[1]}",
                    f"eval.data_paths.ptb={tmp_path / 'no-such-folder'}", base=BASE, check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert list(results["datasets"]) == ["wikitext2"] and results["nll"] > 0
    assert list(results["failed"]) == ["ptb"] and "no-such-folder" in results["failed"]["ptb"]
    assert results["pending"] == [] and "ppl_eval failed on ['ptb']" in proc.stdout


def test_eval_split_picks_a_local_data_sets_split(tmp_path: Path, wikitext_model) -> None:
    """eval.data_paths.ptb=DIR scored ptb.valid.txt whatever one wanted; eval.split=test picks ptb.test.txt."""
    checkpoint, data = wikitext_model
    ptb = write_ptb(tmp_path / "ptb")
    tokens = {}
    for split in ("validation", "test"):
        run_main(tmp_path / split, *SMALL_RUN, *data, "mode=ppl_eval", f"eval.checkpoint_path={checkpoint}",
                 "eval.datasets=[ptb]", f"eval.data_paths.ptb={ptb}", f"eval.split={split}", base=BASE)
        tokens[split] = json.loads((tmp_path / split / "eval_results.json").read_text())["num_tokens"]
    assert tokens["test"] < tokens["validation"]  # 4 lines against 12
