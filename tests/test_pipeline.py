"""pipeline.Pipeline on a tiny quickstart checkpoint trained with the CLI: the same bound as ppl_eval, the same
samples as sample_eval, save/reload with identical logits, push_to_hub's offline failure, and docs/python_api.md's
example run as written."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from tiny_quickstart import run_main, tiny_checkpoint

from dataloader import SyntheticData
from pipeline import PIPELINE_FILE, Pipeline, Sample

UNREACHABLE_HUB = "http://127.0.0.1:9"  # the discard port on the loopback: refused at once, nothing is sent
TEXTS = ["the old cat saw the dog .", "dog the . saw cat the old"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(checkpoint: Path) -> Pipeline:
    return Pipeline.from_pretrained(checkpoint, device="cpu")


def test_adopts_the_checkpoint_as_main_does(pipe: Pipeline) -> None:
    assert pipe.cfg.model.length == 16 and pipe.cfg.model.hidden_size == 32
    assert pipe.module.algorithm.name == "mdlm" and pipe.module.ema is None
    assert "sampler=ddpm_cache" in repr(pipe)


def test_score_is_ppl_evals_bound(pipe: Pipeline, checkpoint: Path, tmp_path: Path) -> None:
    """The validation blocks, as texts, score to ppl_eval's NLL bound (same draws: a block's index and the seed)."""
    run_main(tmp_path, "mode=ppl_eval", f"eval.checkpoint_path={checkpoint}", "eval.mc_samples=2")
    expected = json.loads((tmp_path / "eval_results.json").read_text())
    blocks = SyntheticData(16, num_valid_sequences=32).valid_dataset().blocks  # the run's validation set
    texts = [pipe.tokenizer.decode(block[1:-1].tolist()) for block in blocks]
    scores = pipe.score(texts, mc_samples=2, batch_size=16)
    assert sum(s.num_tokens for s in scores) == expected["num_tokens"] == 32 * 16
    nll = sum(s.nll_sum for s in scores) / sum(s.num_tokens for s in scores)
    assert nll == pytest.approx(expected["nll"], rel=1e-6)
    assert all(s.stderr > 0 and not s.exact for s in scores)


def test_score_counts_tokens_repeats_its_draws_and_reports_their_spread(pipe: Pipeline) -> None:
    natural, shuffled = pipe.score(TEXTS, mc_samples=4)
    assert (natural.num_tokens, shuffled.num_tokens) == (9, 9)  # BOS + 7 words + EOS
    assert pipe.score(TEXTS, mc_samples=4) == [natural, shuffled]  # seeded: the same draws again
    assert 0 < natural.stderr < natural.nll and 0 < shuffled.stderr < shuffled.nll
    assert math.isnan(pipe.score(TEXTS[0], mc_samples=1)[0].stderr)  # one draw: no spread to estimate


def test_long_text_is_scored_in_blocks_of_l_minus_2(pipe: Pipeline) -> None:
    words = (TEXTS[0] + " " + TEXTS[0] + " my dog slept .").split()  # 18 words: blocks of 14 and 4
    whole, = pipe.score(" ".join(words), mc_samples=3)
    first, rest = pipe.score([" ".join(words[:14]), " ".join(words[14:])], mc_samples=3)  # block indices 0, 1
    assert whole.num_tokens == 18 + 2 * 2 == first.num_tokens + rest.num_tokens
    assert whole.nll_sum == pytest.approx(first.nll_sum + rest.nll_sum, rel=1e-9)


def test_score_refuses_the_mask_token(pipe: Pipeline) -> None:
    with pytest.raises(ValueError, match="mask id"):
        pipe.score("the [MASK] slept .")


@pytest.mark.slow  # a sample_eval process (~13 s); the docs example test runs generate in the default suite
def test_generate_draws_what_sample_eval_draws(pipe: Pipeline, checkpoint: Path, tmp_path: Path) -> None:
    run_main(tmp_path, "mode=sample_eval", f"eval.checkpoint_path={checkpoint}", "sampler=first_hitting", "seed=3",
             "loader.eval_batch_size=2", "sampling.num_sample_batches=2")
    expected = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    samples = pipe.generate(4, sampler="first_hitting", seed=3, batch_size=2)
    assert [s.text for s in samples] == [r["text"] for r in expected]
    assert all(isinstance(s, Sample) and s.nfe == 16 and s.seconds > 0 for s in samples)  # one token per call
    assert [s.seed for s in samples] == [3_000_009, 3_000_009, 3_000_010, 3_000_010]


def test_generate_options_prefix_and_errors(pipe: Pipeline) -> None:
    out = pipe.generate(3, steps=4, prefix="the old cat", seed=0, temperature=0.5)
    assert len(out) == 3 and all(s.text.startswith("the old cat") and s.nfe <= 4 for s in out)
    assert pipe.generate(1, sampler="confidence", seed=0)[0].nfe <= pipe.cfg.sampling.steps
    with pytest.raises(ValueError, match="not an option of sampler=first_hitting; its options: .*tokens_per_step"):
        pipe.generate(1, sampler="first_hitting", eta=0.1)
    with pytest.raises(ValueError, match="sampler=first_hitting takes no number of steps"):
        pipe.generate(1, sampler="first_hitting", steps=8)
    with pytest.raises(ValueError, match="sampler=nope does not exist; valid choices"):
        pipe.generate(1, sampler="nope")


def assert_same_model(a: Pipeline, b: Pipeline) -> None:
    x = torch.randint(0, a.module.algorithm.mask_index + 1, (3, a.cfg.model.length))
    sigma = torch.zeros(3)
    with torch.no_grad():
        assert torch.equal(a.module.backbone(x, sigma), b.module.backbone(x, sigma))
    assert a.score(TEXTS, mc_samples=2) == b.score(TEXTS, mc_samples=2)
    assert [s.tokens for s in a.generate(2, seed=5)] == [s.tokens for s in b.generate(2, seed=5)]


def test_save_pretrained_reloads_with_identical_logits(checkpoint: Path, tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(checkpoint, device="cpu", overrides=["sampler=first_hitting"])
    folder = pipe.save_pretrained(tmp_path / "saved")
    assert {"config.json", "model.safetensors", "tokenizer.json", PIPELINE_FILE} <= {p.name for p in folder.iterdir()}
    again = Pipeline.from_pretrained(folder, device="cpu")
    assert again.loaded.format == "hf" and again.sampler_name(again.cfg) == "first_hitting"  # the overrides kept
    assert_same_model(pipe, again)


def test_push_to_hub_fails_clearly_offline_and_leaves_a_complete_folder(pipe: Pipeline, tmp_path: Path) -> None:
    with pytest.raises(ConnectionError, match=r"Cannot push to me/tiny-mdlm .*(unreachable|HF_HUB_OFFLINE).*hf upload"):
        pipe.push_to_hub("me/tiny-mdlm", save_dir=tmp_path / "to_push", endpoint=UNREACHABLE_HUB)
    assert_same_model(pipe, Pipeline.from_pretrained(tmp_path / "to_push", device="cpu"))
    with pytest.raises(ConnectionError, match=r"pipe.save_pretrained\(DIR\)"):
        pipe.push_to_hub("me/tiny-mdlm", endpoint=UNREACHABLE_HUB)


def test_docs_example_runs_as_written(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The code block of docs/python_api.md, on the tiny checkpoint instead of the quickstart's."""
    page = (ROOT / "docs" / "python_api.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    assert "outputs/quickstart/checkpoints/best.ckpt" in code and len(code.strip().splitlines()) <= 12
    assert f"```python\n{code}```" in (ROOT / "README.md").read_text()  # the README shows this same example
    exec(code.replace("outputs/quickstart/checkpoints/best.ckpt", str(checkpoint)), {})  # noqa: S102
    printed = capsys.readouterr().out
    assert printed.count("NFE 16") == 2 and printed.count("nats/token") == 2
