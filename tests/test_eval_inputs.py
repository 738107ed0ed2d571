"""Evaluation of the user's own inputs: no silent wrong answer (issue: evaluating your own text, lengths).

Each test fails on the code before the fix it names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

import main
from config_aliases import translate
from dataloader import vocab_and_mask

TRAINED_LENGTH = 16
TEXT = "\n\n".join(f"Paragraph {i} is about the cat that sat on mat number {i} and then walked." for i in range(40))


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Iterator[Any]:
    """``make(overrides)`` -> the composed config with HydraConfig set, as ``python main.py`` has it."""

    def make(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            cfg = compose("config", overrides=translate([f"hydra.run.dir={tmp_path / 'run'}", "wandb.mode=disabled",
                                                         *overrides]), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    yield make
    HydraConfig.instance().cfg = None


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "mine.txt"
    path.write_text(TEXT)
    return path


def gpt2_checkpoint(tmp_path: Path, compose_cfg: Any, tokenizer: Path) -> Path:
    """A micro DiT for the GPT-2 vocabulary trained (here: initialised) at length 16, saved as ours."""
    cfg = compose_cfg("model=micro", f"model.length={TRAINED_LENGTH}", "data=text_files", "data.train_path=unused.txt",
                      f"data.tokenizer_name_or_path={tokenizer}")
    from dataloader import load_tokenizer

    module = main.build_module(cfg, *vocab_and_mask(load_tokenizer(str(tokenizer))))
    path = tmp_path / "gpt2-micro.ckpt"
    torch.save({"state_dict": module.state_dict(), "ema": module.ema.state_dict(),
                "config": OmegaConf.to_container(cfg, resolve=True)}, path)
    return path


def test_ppl_eval_of_a_text_file_uses_the_trained_length_and_scores_the_whole_file(
    tmp_path: Path, compose_cfg: Any, shared_data: Path, text_file: Path
) -> None:
    """The README's "score your own text" command. Before: blocks of the default model=small length
    (1,024, while the banner said 16) over only the 5% held out for validation."""
    tokenizer = shared_data / "gpt2_tokenizer"
    checkpoint = gpt2_checkpoint(tmp_path, compose_cfg, tokenizer)
    cfg = compose_cfg("mode=ppl_eval", f"eval.checkpoint_path={checkpoint}", "data=text_files",
                      f"data.train_path={text_file}", "loader.eval_global_batch_size=8")  # the tokenizer: the model's
    main.ppl_eval(cfg, tmp_path / "run")
    assert cfg.data.tokenizer_name_or_path == str(tokenizer)
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    from dataloader import load_tokenizer

    documents = [d for d in TEXT.split("\n\n") if d.strip()]
    tokens = sum(len(ids) + 1 for ids in load_tokenizer(str(tokenizer))(documents)["input_ids"])  # + EOS each
    blocks = tokens // (TRAINED_LENGTH - 2)  # each block: [BOS] 14 tokens of the stream [EOS] (remainder dropped)
    assert cfg.model.length == TRAINED_LENGTH
    assert results["num_tokens"] == blocks * TRAINED_LENGTH


def test_eval_split_chooses_the_held_out_part_of_a_text_file(
    tmp_path: Path, compose_cfg: Any, shared_data: Path, text_file: Path
) -> None:
    tokenizer = shared_data / "gpt2_tokenizer"
    checkpoint = gpt2_checkpoint(tmp_path, compose_cfg, tokenizer)
    counts = {}
    for split in ("null", "validation", "train"):
        cfg = compose_cfg("mode=ppl_eval", f"eval.checkpoint_path={checkpoint}", "data=text_files",
                          f"data.train_path={text_file}", f"data.tokenizer_name_or_path={tokenizer}",
                          "loader.eval_global_batch_size=8", f"eval.split={split}")
        main.ppl_eval(cfg, tmp_path / split)
        counts[split] = json.loads((tmp_path / split / "eval_results.json").read_text())["num_tokens"]
    assert counts["validation"] < counts["train"] < counts["null"]  # 5% held out, 95%, all
    cfg = compose_cfg("mode=ppl_eval", f"eval.checkpoint_path={checkpoint}", "data=text_files",
                      f"data.train_path={text_file}", f"data.tokenizer_name_or_path={tokenizer}", "eval.split=test")
    with pytest.raises(ValueError, match=r"eval.split=test is not a split of data=text_files; valid: \['train'"):
        main.ppl_eval(cfg, tmp_path / "test")


def quickstart_checkpoint(tmp_path: Path, compose_cfg: Any) -> Path:
    cfg = compose_cfg("experiment=quickstart", f"model.length={TRAINED_LENGTH}")
    data, vocab_size, mask_index = main.build_data(cfg)
    module = main.build_module(cfg, vocab_size, mask_index)
    path = tmp_path / "quickstart.ckpt"
    torch.save({"state_dict": module.state_dict(), "ema": module.ema.state_dict(),
                "config": OmegaConf.to_container(cfg, resolve=True)}, path)
    return path


def test_a_length_beyond_the_trained_one_needs_an_opt_in(tmp_path: Path, compose_cfg: Any) -> None:
    """Before: model.length=4096 on a model trained at 64 ran with no word."""
    checkpoint = quickstart_checkpoint(tmp_path, compose_cfg)
    cfg = compose_cfg("experiment=quickstart", "mode=sample_eval", f"eval.checkpoint_path={checkpoint}",
                      "model.length=4096")
    with pytest.raises(ValueError, match="model.length=4096 is longer than the 16 tokens .*sampling.semi_ar=true"):
        main.adopt_for_eval(cfg)
    cfg = compose_cfg("experiment=quickstart", "mode=sample_eval", f"eval.checkpoint_path={checkpoint}",
                      "model.length=32", "eval.allow_longer=true")
    main.adopt_for_eval(cfg)
    assert cfg.model.length == 32
    cfg = compose_cfg("experiment=quickstart", "mode=sample_eval", f"eval.checkpoint_path={checkpoint}",
                      "model.length=8")  # shorter is fine
    main.adopt_for_eval(cfg)
    assert cfg.model.length == 8


def test_sampling_steps_zero_fails_before_training(tmp_path: Path, compose_cfg: Any) -> None:
    """Before: sampling.steps=0 in train mode failed after the whole run and its final validation."""
    cfg = compose_cfg("experiment=quickstart", "sampling.steps=0")
    with pytest.raises(ValueError, match="sampler steps must be an integer >= 1"):
        main.build_module(cfg, 20, 19)  # the module (and its sampler) is built before the first step


def test_a_non_utf8_text_file_names_the_file_the_byte_and_data_encoding(tmp_path: Path, shared_data: Path) -> None:
    """Before: a bare UnicodeDecodeError with no file name."""
    from dataloader import TextFiles

    path = tmp_path / "latin.txt"
    path.write_bytes("caf\u00e9 au lait\n\nsecond paragraph here".encode("latin-1"))
    data = TextFiles(str(path), str(shared_data / "gpt2_tokenizer"), block_size=8)
    with pytest.raises(ValueError, match=r"latin.txt is not valid utf-8 text at byte 3 .*data.encoding=latin-1"):
        data.evaluation_dataset()
    latin = TextFiles(str(path), str(shared_data / "gpt2_tokenizer"), block_size=8, encoding="latin-1")
    assert len(latin.evaluation_dataset()) >= 1


def test_a_non_utf8_file_in_a_local_corpus_copy_names_the_file(tmp_path: Path, shared_data: Path) -> None:
    """Before: datasets' DatasetGenerationError with the cause 80 lines up."""
    from dataloader import CorpusData

    folder = tmp_path / "ptb"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        (folder / f"ptb.{split}.txt").write_bytes("the caf\u00e9 sold shares\n".encode("latin-1") * 20)
    data = CorpusData(train="ptb", valid="ptb", tokenizer_name_or_path=str(shared_data / "gpt2_tokenizer"),
                      block_size=16, path=str(folder), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"ptb.valid.txt is not valid utf-8 text at byte 7 .*iconv"):
        data.valid_dataset()


def write_module_checkpoint(path: Path, compose_cfg: Any, *overrides: str) -> Any:
    cfg = compose_cfg("experiment=quickstart", f"model.length={TRAINED_LENGTH}", *overrides)
    module = main.build_module(cfg, 286, 285)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "ema": module.ema.state_dict(),
                "config": OmegaConf.to_container(cfg, resolve=True)}, path)
    return module


@pytest.mark.parametrize("kind", ["random bytes", "truncated", "another model"])
def test_an_unusable_last_ckpt_is_one_clear_message_with_the_ways_out(tmp_path: Path, compose_cfg: Any,
                                                                       kind: str) -> None:
    """Before: torch's advice to retry with weights_only=False (random bytes), a zip-reader traceback
    (truncated), or `EMA tensor shape (286, 128) != (286, 64)` (another model)."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    module = write_module_checkpoint(tmp_path / "checkpoints" / "best.ckpt", compose_cfg)
    if kind == "random bytes":
        last.write_bytes(torch.randint(0, 256, (5000,), dtype=torch.uint8).numpy().tobytes())
        reason = "it is not a file written by torch.save"
    elif kind == "truncated":
        whole = (tmp_path / "checkpoints" / "best.ckpt").read_bytes()
        last.write_bytes(whole[: len(whole) // 2])
        reason = "it is truncated"
    else:
        write_module_checkpoint(last, compose_cfg, "model.hidden_size=64", "model.n_heads=2")
        reason = "was written by another model: .*shape"
    with pytest.raises(ValueError, match=reason) as info:
        main.check_resume(last, module, tmp_path)
    message = str(info.value)
    assert f"The run directory {tmp_path} holds a checkpoint that training cannot resume from" in message
    for way in ("mv ", "checkpointing.resume_from_ckpt=false", "hydra.run.dir=",
                f"checkpointing.resume_ckpt_path={tmp_path / 'checkpoints' / 'best.ckpt'}"):
        assert way in message
    assert "weights_only=False" not in message
