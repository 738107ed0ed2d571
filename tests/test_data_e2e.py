"""The paper's data configs through main.py, as a user runs them, on local copies (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from test_main_e2e import TINY, run_main

import main

DATA_CONFIGS = (
    "openwebtext", "openwebtext-split", "openwebtext-streaming", "lm1b", "lm1b-wrap", "lm1b-gpt2", "text8",
    "text8-crop", "wikitext2", "wikitext103", "ptb", "lambada", "ag_news", "scientific_papers_arxiv",
    "scientific_papers_pubmed",
)
PAPER_EXPERIMENTS = ("owt_mdlm", "owt_sedd", "owt_ar", "lm1b_mdlm", "lm1b_ar", "lm1b_d3pm", "lm1b_sedd")
# The e2e base run without experiment=quickstart, whose data keys belong to the built-in corpus.
BASE = ["model=micro", *(o for o in TINY if not o.startswith(("data.", "experiment="))),
        "lr_scheduler.num_warmup_steps=10"]
SMALL_RUN = ["wandb.mode=disabled", "trainer.max_steps=4", "sampling.num_sample_log=0"]


def test_every_data_set_of_the_paper_has_a_config() -> None:
    for name in DATA_CONFIGS:
        assert (ROOT / "configs" / "data" / f"{name}.yaml").is_file(), name


@pytest.mark.parametrize("name", PAPER_EXPERIMENTS)
def test_paper_experiments_compose_and_validate(tmp_path: Path, name: str) -> None:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=[f"experiment={name}", f"checkpointing.save_dir={tmp_path}"],
                      return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        main.validate_config(cfg)  # parameterization / backbone / sampler / T pairing
    data, length = name.split("_")[0], {"owt": 1024, "lm1b": 128}[name.split("_")[0]]
    assert cfg.model.length == length and cfg.loader.global_batch_size == 512
    assert cfg.data.train == ("openwebtext-train" if data == "owt" else "lm1b")
    assert cfg.data.wrap == (data == "owt")  # LM1B: sentence level, padded


DUO_EXPERIMENTS = {  # name: (length, data.train, wrap, algorithm, global batch, steps, sampling steps)
    "lm1b_duo": (128, "lm1b", False, "uniform_diffusion.DUO", 512, 1_000_000, 1024),
    "owt_duo": (1024, "openwebtext-train", True, "uniform_diffusion.DUO", 512, 1_000_000, 1024),
    "owt_duo_distill": (1024, "openwebtext-train", True, "distillation.DUODistill", 128, 50_000, 8),
}


@pytest.mark.parametrize("name", DUO_EXPERIMENTS)
def test_duo_experiments_compose_and_validate(tmp_path: Path, name: str) -> None:
    """The reference's DUO recipes (s-sahoo/duo scripts/train_*_duo.sh, distil_owt.sh)."""
    overrides = [f"experiment={name}", f"checkpointing.save_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        main.validate_config(cfg)
    length, train, wrap, target, batch, steps, sampling_steps = DUO_EXPERIMENTS[name]
    assert (cfg.model.length, cfg.data.train, cfg.data.wrap, cfg.algorithm._target_) == (length, train, wrap, target)
    assert (cfg.loader.global_batch_size, cfg.trainer.max_steps, cfg.sampling.steps) == (batch, steps, sampling_steps)
    assert cfg.sampler._target_ == "uniform_samplers.UniformAncestralSampler" and cfg.model.name == "small"
    if target.endswith("DUO"):
        assert (cfg.algorithm.curriculum_start, cfg.algorithm.curriculum_end) == (0, 500_000)
        assert cfg.algorithm.gumbel_tau_log10_start == cfg.algorithm.gumbel_tau_log10_end == -3.0
        assert cfg.algorithm.gamma_min == (-3.5 if name == "lm1b_duo" else -3.55)
    else:
        assert (cfg.algorithm.T, cfg.algorithm.update_teacher_every, cfg.algorithm.loss_type) == (512, 10_000, "kl-bwd")
        assert cfg.optim.lr == 6e-5 and cfg.training.ema == 0.999


def write_wikitext(folder: Path) -> Path:
    folder.mkdir(parents=True)
    lines = " = Heading = \n \n the quick brown fox @-@ jumps over the lazy dog . \n \n"
    for split, repeat in (("train", 40), ("valid", 8), ("test", 8)):
        (folder / f"wiki.{split}.raw").write_text(lines * repeat)
    return folder


def test_train_and_evaluate_on_a_local_copy(tmp_path: Path) -> None:
    """data=wikitext2 data.path=FOLDER: tokenized once into data.cache_dir, then reused by ppl_eval."""
    folder = write_wikitext(tmp_path / "wikitext-2-raw")
    data = ["data=wikitext2", f"data.path={folder}", "data.tokenizer_name_or_path=text8",
            f"data.cache_dir={tmp_path / 'cache'}", "model.length=32"]
    proc = run_main(tmp_path / "run", *SMALL_RUN, *data, base=BASE)
    assert "Tokenizing wikitext2 train" in proc.stdout and "Tokenizing wikitext2 validation" in proc.stdout
    entries = sorted(p.name for p in (tmp_path / "cache" / "tokenized").iterdir() if p.is_dir())
    assert [e.split("-")[1] for e in entries] == ["train", "validation"]
    evaluation = run_main(tmp_path / "run", *SMALL_RUN, *data, "mode=ppl_eval",
                          f"eval.checkpoint_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", base=BASE)
    assert "Tokenizing" not in evaluation.stdout  # cache hit
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["data"] == "wikitext2" and results["num_tokens"] > 0


def test_padded_sentences_train(tmp_path: Path) -> None:
    """data=lm1b (unwrapped, padded): the statmt folder layout, padding left out of loss and attention."""
    root = tmp_path / "1-billion-word-language-modeling-benchmark-r13output"
    train = root / "training-monolingual.tokenized.shuffled"
    heldout = root / "heldout-monolingual.tokenized.shuffled"
    train.mkdir(parents=True)
    heldout.mkdir(parents=True)
    sentences = ["the cat sat on the mat .", "a dog barked at the moon tonight .", "hello world !"]
    (train / "news.en-00001-of-00100").write_text("\n".join(sentences * 30) + "\n")
    (heldout / "news.en.heldout-00000-of-00050").write_text("\n".join(sentences * 6) + "\n")
    data = ["data=lm1b", f"data.path={root}", "data.tokenizer_name_or_path=text8",
            f"data.cache_dir={tmp_path / 'cache'}", "model.length=48"]
    proc = run_main(tmp_path / "run", *SMALL_RUN, *data, base=BASE)
    assert "Tokenizing lm1b test" in proc.stdout  # LM1B validates on its test split, as the original
    assert "Final validation" in proc.stdout
