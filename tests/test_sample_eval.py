"""sample_eval as a user runs it: generative perplexity, entropy, semi-AR, prefix, infill, precision."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from test_main_e2e import run_main, trained  # noqa: F401 - the shared trained-model fixture
from transformers import GPT2Config, GPT2LMHeadModel

from synthetic import BOS_ID, MASK_ID, MarkovSource, build_tokenizer


@pytest.fixture(scope="module")
def eval_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 over the built-in corpus's words, saved like a hub model."""
    folder = tmp_path_factory.mktemp("eval_lm")
    tokenizer = build_tokenizer(MarkovSource.from_seed(0))
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def read_samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


def sample(trained, run_dir: Path, *overrides: str) -> list[dict]:  # noqa: F811
    checkpoint = f"eval.checkpoint_path={trained[0]}/checkpoints/last.ckpt"
    run_main(run_dir, "mode=sample_eval", checkpoint, "wandb.mode=disabled", "sampling.num_sample_batches=1",
             "loader.eval_global_batch_size=4", *overrides)
    return read_samples(run_dir)


def test_generative_perplexity_and_entropy(trained, tmp_path: Path, eval_lm: Path) -> None:  # noqa: F811
    records = sample(trained, tmp_path, "eval.compute_generative_perplexity=true",
                     f"eval.gen_ppl_eval_model={eval_lm}", "sampling.float64=false")
    summary = json.loads((tmp_path / "sample_results.json").read_text())
    assert len(records) == 4 and all(r["gen_ppl"] > 1 and r["entropy"] > 0 for r in records)
    assert not records[0]["float64"] and not summary["float64"]
    tokens = sum(r["gen_num_tokens"] for r in records)
    assert summary["num_tokens"] == tokens > 0
    total_nll = sum(r["gen_nll_sum"] for r in records)
    assert summary["gen_ppl"] == pytest.approx(math.exp(total_nll / tokens), rel=1e-9)


def test_semi_ar_extends_the_sequence(trained, tmp_path: Path) -> None:  # noqa: F811
    records = sample(trained, tmp_path, "sampling.semi_ar=true", "sampling.stride_length=4", "sampling.num_strides=3")
    assert all(r["length"] == 16 + 3 * 4 == len(r["tokens"]) for r in records)
    assert records[0]["num_strides"] == 3 and records[0]["seconds"] > 0


def test_prefix_and_infill_keep_the_given_tokens(trained, tmp_path: Path) -> None:  # noqa: F811
    tokenizer = build_tokenizer(MarkovSource.from_seed(0))
    prefix = tokenizer("the old cat", add_special_tokens=False)["input_ids"]
    for r in sample(trained, tmp_path / "prefix", "sampling.prefix='the old cat'"):
        assert r["tokens"][: 1 + len(prefix)] == [BOS_ID, *prefix]
    infilled = sample(trained, tmp_path / "infill", "sampling.infill='the [MASK:2] cat saw [MASK] dog .'")
    given = tokenizer("the cat saw dog .", add_special_tokens=False)["input_ids"]
    for r in infilled:
        t = r["tokens"]
        assert [t[1], t[4], t[5], t[7], t[8]] == given and t[0] == BOS_ID
        assert MASK_ID not in t  # every masked position filled


def test_generative_perplexity_during_training(tmp_path: Path, eval_lm: Path) -> None:
    run_main(tmp_path, "trainer.max_steps=8", "wandb.mode=disabled", "eval.compute_generative_perplexity=true",
             f"eval.gen_ppl_eval_model={eval_lm}", "eval.gen_ppl_num_samples=2", "sampling.num_sample_log=0")
    (metrics_file,) = (tmp_path / "csv").glob("version_*/metrics.csv")
    with open(metrics_file) as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/gen_ppl")]
    assert rows and all(float(r["val/gen_ppl"]) > 1 and float(r["val/entropy"]) > 0 for r in rows)


def test_mauve_against_held_out_blocks(trained, tmp_path: Path, eval_lm: Path) -> None:  # noqa: F811
    """sample_eval eval.compute_mauve=true: MAUVE of the samples against as many held-out blocks
    (the eval LM's features; SmolLM2's are tested in test_eval_lm.py)."""
    sample(trained, tmp_path, "eval.compute_mauve=true", f"eval.gen_ppl_eval_model={eval_lm}",
           "sampling.num_sample_batches=3")
    summary = json.loads((tmp_path / "sample_results.json").read_text())
    assert summary["num_samples"] == summary["mauve_num_reference"] == 12
    assert 0 < summary["mauve"] <= 1 and summary["gen_ppl"] > 1 and summary["eval_model"] == str(eval_lm)
