"""What a long run shows on the console: progress bars and lines, and the printed config tree.

Bars drawn with ``disable=None`` appear only when stderr is a terminal; ``Terminal`` below is a
stderr that says it is one, so the test sees what a user at a terminal sees.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import datasets
import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from test_gen_ppl import model_dir, random_ids, text_of  # noqa: F401 - model_dir is a fixture
from transformers import AutoTokenizer

import config_aliases
import data_cache
import utils
from metrics import GenerativePerplexity

CONFIGS = ROOT / "configs"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# --------------------------------------------------------------------------- config tree
def printed_config(capsys: pytest.CaptureFixture[str], save_path: Path, *overrides: str) -> tuple[str, DictConfig]:
    """The tree ``main.py`` prints for ``overrides`` (rewritten as main.py rewrites them), and the saved YAML."""
    with initialize_config_dir(str(CONFIGS), version_base=None):
        cfg = compose("config", overrides=config_aliases.translate(
            ["experiment=quickstart", "mode=ppl_eval", "eval.checkpoint_path=x.ckpt",
             f"checkpointing.save_dir={save_path.parent}", *overrides]))
    capsys.readouterr()
    utils.print_config_tree(cfg, save_path)
    return capsys.readouterr().out, OmegaConf.load(save_path)


def branch(tree: str, key: str) -> list[str]:
    """The lines of top-level branch ``key`` of a printed tree, without the tree guides."""
    lines = tree.splitlines()
    start = next(i for i, line in enumerate(lines) if line.endswith(f"── {key}"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("├──", "└──"))), len(lines))
    return [line.lstrip("│ └├─").rstrip() for line in lines[start + 1 : end] if line.strip("│ ")]


def test_config_tree_lists_only_the_data_paths_that_were_set(capsys: pytest.CaptureFixture[str],
                                                             tmp_path: Path) -> None:
    """Before: 15 ``eval.data_paths.<corpus>: null`` lines (one per data config) in every printed tree.

    Nulls elsewhere stay: ``eval.split: null`` or ``loader.batch_size: null`` are settings
    (the data set's own split, global / devices), and the saved YAML must be complete.
    """
    tree, saved = printed_config(capsys, tmp_path / "default" / "config_ppl_eval.yaml")
    assert "data_paths: {}" in branch(tree, "eval") and saved.eval.data_paths == {}
    assert "split: null" in branch(tree, "eval") and "batch_size: null" in branch(tree, "loader")

    tree, saved = printed_config(capsys, tmp_path / "set" / "config_ppl_eval.yaml", "eval.datasets=[ptb,wikitext2]",
                                 "eval.data_paths.ptb=/data/ptb")
    lines = branch(tree, "eval")
    start = lines.index("data_paths:")
    assert lines[start + 1] == "ptb: /data/ptb" and ":" in lines[start + 2] and "null" not in lines[start + 2]
    assert OmegaConf.to_container(saved.eval.data_paths) == {"ptb": "/data/ptb"}


# --------------------------------------------------------------------------- progress
def test_progress_line_is_a_tqdm_meter_with_the_time_left() -> None:
    line = utils.progress_line(1, 3, 42.0, "ppl_eval (ptb next)", unit="data set")
    assert line.startswith("ppl_eval (ptb next):  33%|") and "| 1/3 [00:42<01:24, 42.00s/data set]" in line
    assert "\n" not in line and "\r" not in line


def test_gen_ppl_scoring_and_mauve_features_show_a_bar_on_a_terminal(model_dir: Path,  # noqa: F811
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    scorer = GenerativePerplexity(str(model_dir), batch_size=2)
    texts = [text_of(random_ids(5, seed=i)) for i in range(5)]  # 5 chunks: 3 batches of 2
    for progress, shown in ((None, True), (False, False), (True, True)):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        scorer.score(texts, progress=progress)
        scorer.features(texts, progress=progress)
        monkeypatch.undo()
        err = terminal.getvalue()
        assert ("gen PPL (eval LM):" in err and "/3 [" in err) is shown, (progress, err)
        assert ("MAUVE features (eval LM):" in err) is shown, (progress, err)
    quiet = io.StringIO()  # not a terminal (a log file): no bar unless asked for
    monkeypatch.setattr(sys, "stderr", quiet)
    scorer.score(texts)
    monkeypatch.undo()
    assert quiet.getvalue() == ""


def test_data_cache_build_shows_tokenizing_and_writing_bars(model_dir: Path, tmp_path: Path,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [text_of(random_ids(7, seed=i)) for i in range(20)]
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    stream = data_cache.load_or_build(tmp_path, {"corpus": "tiny", "split": "validation"},
                                      lambda: datasets.Dataset.from_dict({"text": texts}), tokenizer, None, 0, 1)
    monkeypatch.undo()
    assert stream.num_documents == 20 and int(stream.offsets[-1]) == 20 * 8  # 7 words + EOS each
    err = terminal.getvalue()
    assert "Tokenizing tiny validation" in err  # datasets.map's bar
    assert f"Writing {stream.path.name}:" in err and "/160 [" in err  # tokens, cleared when done (leave=False)
