"""Every config composes, and every group option instantiates into its class."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig

CONFIGS = ROOT / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def make_cfg(tmp_path: Path, overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("config", overrides=[f"checkpointing.save_dir={tmp_path}", *(overrides or [])])


def test_root_config_composes(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    assert cfg.mode == "train" and cfg.parameterization == "subs" and cfg.data.name == "synthetic"
    assert cfg.loader.global_batch_size == 512 and cfg.sampling.predictor == "ddpm_cache"


@pytest.mark.parametrize("size", options("model"))
def test_model_sizes_instantiate_a_backbone(tmp_path: Path, size: str) -> None:
    backbone = "ar" if size.endswith("-ar") else "dimamba" if size.endswith("-dimamba") else "dit"
    cfg = make_cfg(tmp_path, [f"model={size}", f"backbone={backbone}"])
    expected = {
        "micro": (128, 4, 4),
        "tiny": (512, 8, 8),
        "small": (768, 12, 12),
        "medium": (1024, 24, 16),
        "tiny-ar": (512, 8, 8),
        "small-ar": (768, 12, 12),
        "tiny-dimamba": (512, 14, None),  # no attention heads
        "small-dimamba": (768, 22, None),
    }[size]
    assert (cfg.model.hidden_size, cfg.model.n_blocks, cfg.model.get("n_heads")) == expected
    with torch.device("meta"):  # no memory for the big ones
        backbone = instantiate(cfg.backbone, vocab_size=50258)
    assert len(backbone.blocks) == cfg.model.n_blocks


@pytest.mark.parametrize("name", options("noise"))
def test_noise_instantiates(tmp_path: Path, name: str) -> None:
    noise = instantiate(make_cfg(tmp_path, [f"noise={name}"]).noise)
    level = noise(torch.tensor([0.5]))
    assert level.sigma.item() > 0 and level.dsigma.item() > 0


@pytest.mark.parametrize("name", options("lr_scheduler"))
def test_lr_scheduler_instantiates(tmp_path: Path, name: str) -> None:
    factory = instantiate(make_cfg(tmp_path, [f"lr_scheduler={name}"]).lr_scheduler)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = factory(optimizer)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)


@pytest.mark.parametrize("name", options("callbacks"))
def test_callbacks_instantiate(tmp_path: Path, name: str) -> None:
    cfg = make_cfg(tmp_path, [f"callbacks=[{name}]"])
    for callback_cfg in cfg.callbacks.values():
        instantiate(callback_cfg)


@pytest.mark.parametrize("name", options("strategy"))
def test_strategy_instantiates(tmp_path: Path, name: str) -> None:
    instantiate(make_cfg(tmp_path, [f"strategy={name}"]).strategy)


def test_synthetic_data_instantiates(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, ["data=synthetic", "data.num_train_sequences=64", "data.num_valid_sequences=8"])
    data = instantiate(cfg.data)
    assert len(data.train_dataset()) == 64 and data.valid_dataset()[0]["input_ids"].shape == (cfg.model.length,)


def test_text_files_data_instantiates(tmp_path: Path, shared_data: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        [
            "data=text_files",
            f"data.train_path={shared_data / 'ptb' / 'ptb.valid.txt'}",
            f"data.tokenizer_name_or_path={shared_data / 'gpt2_tokenizer'}",
            "data.document_separator=line",
            "model.length=128",
        ],
    )
    data = instantiate(cfg.data)
    assert data.train_dataset()[0]["input_ids"].shape == (128,)


@pytest.mark.parametrize("name", options("experiment"))
def test_experiments_compose(tmp_path: Path, name: str) -> None:
    cfg = make_cfg(tmp_path, [f"experiment={name}"])
    assert cfg.trainer.max_steps > 0


def test_original_readme_overrides_compose(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        [
            "mode=sample_eval",
            "eval.checkpoint_path=kuleshov-group/mdlm-owt",
            "model.length=1024",
            "sampling.predictor=ddpm_cache",
            "sampling.steps=1000",
            "loader.batch_size=16",
            "loader.eval_batch_size=16",
            "parameterization=subs",
            "backbone=dit",
            "time_conditioning=false",
        ],
    )
    assert cfg.sampling.steps == 1000 and cfg.loader.batch_size == 16
