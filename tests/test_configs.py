"""Every config composes, and every group option instantiates into its class."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import hydra
import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

import main
import registry
import samplers
from config_aliases import translate
from samplers import DDPMSampler

CONFIGS = ROOT / "configs"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def make_cfg(tmp_path: Path, overrides: list[str] | None = None) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("config", overrides=translate([f"checkpointing.save_dir={tmp_path}", *(overrides or [])]))


def test_root_config_composes(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    assert cfg.mode == "train" and cfg.algorithm._target_ == "algorithms.MDLM" and cfg.data.name == "synthetic"
    assert cfg.loader.global_batch_size == 512 and cfg.sampler._target_ == "samplers.DDPMCacheSampler"


@pytest.mark.parametrize("name", options("algorithm"))
def test_algorithms_instantiate_with_their_default_sampler(tmp_path: Path, name: str) -> None:
    """Each algorithm YAML builds its class; its defaults list picks the class's default sampler, which fits."""
    overrides = {"d3pm": ["T=1000"]}.get(name, [])
    cfg = make_cfg(tmp_path, [f"algorithm={name}", *overrides])
    algorithm = instantiate(cfg.algorithm)(mask_index=7)
    assert algorithm.name == name and registry.option_of_class("algorithm", type(algorithm)) == name
    assert registry.option_of_class("sampler", hydra.utils.get_class(cfg.sampler._target_)) == algorithm.default_sampler
    sampler = instantiate(cfg.sampler)(**algorithm.sampler_inputs(), dtype="float64")
    assert sampler.accepts == algorithm.denoiser_kind
    assert algorithm.default_sampler in registry.samplers_accepting(algorithm.denoiser_kind)


@pytest.mark.parametrize("name", options("sampler"))
def test_samplers_instantiate_for_an_algorithm_they_fit(tmp_path: Path, name: str) -> None:
    cls = registry.target_class("sampler", name)
    algorithm = next(a for a in options("algorithm")
                     if registry.target_class("algorithm", a).denoiser_kind == cls.accepts)
    cfg = make_cfg(tmp_path, [f"algorithm={algorithm}", f"sampler={name}", "T=1000" if algorithm == "d3pm" else "T=0"])
    sampler = instantiate(cfg.sampler)(**instantiate(cfg.algorithm)(mask_index=3).sampler_inputs())
    assert isinstance(sampler, cls) and sampler.name == name


def test_algorithm_options_read_the_original_names(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, ["T=1000", "time_conditioning=true", "training.sampling_eps=0.01"])
    assert (cfg.algorithm.T, cfg.algorithm.time_conditioning, cfg.algorithm.sampling_eps) == (1000, True, 0.01)
    cfg = make_cfg(tmp_path, ["sampling.steps=17", "sampling.eps=0.001"])
    assert (cfg.sampler.steps, cfg.sampler.eps) == (17, 0.001)


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


# Every command line of the original MDLM README and scripts/ (github kuleshov-group/mdlm), as override lists.
ORIGINAL_COMMANDS = {
    "readme_sample_hf": ["mode=sample_eval", "eval.checkpoint_path=kuleshov-group/mdlm-owt", "data=openwebtext-split",
                         "model.length=1024", "sampling.predictor=ddpm_cache", "sampling.steps=1000",
                         "loader.eval_batch_size=1", "sampling.num_sample_batches=10", "backbone=hf_dit"],
    "readme_sample_local": ["mode=sample_eval", "eval.checkpoint_path=/path/to/checkpoint/mdlm.ckpt",
                            "data=openwebtext-split", "model.length=1024", "sampling.predictor=ddpm_cache",
                            "sampling.steps=10000", "loader.eval_batch_size=1", "sampling.num_sample_batches=1",
                            "backbone=dit"],
    "readme_semi_ar": ["mode=sample_eval", "eval.checkpoint_path=kuleshov-group/mdlm-owt", "data=openwebtext-split",
                       "parameterization=subs", "model.length=1024", "sampling.predictor=ddpm_cache",
                       "sampling.steps=1000", "loader.eval_batch_size=1", "sampling.num_sample_batches=2",
                       "sampling.semi_ar=True", "sampling.stride_length=512", "sampling.num_strides=2",
                       "backbone=hf_dit"],
    "readme_train": ["model=small", "data=openwebtext-split", "wandb.name=mdlm-owt", "parameterization=subs",
                     "model.length=1024", "eval.compute_generative_perplexity=True", "sampling.steps=1000"],
    "readme_ppl_eval": ["mode=ppl_eval", "loader.batch_size=16", "loader.eval_batch_size=16", "data=openwebtext-split",
                        "model=small", "parameterization=subs", "backbone=dit", "model.length=1024",
                        "eval.checkpoint_path=/path/to/checkpoint/mdlm.ckpt", "+wandb.offline=true"],
    "readme_eval_ar": ["mode=ppl_eval", "loader.batch_size=16", "loader.eval_batch_size=16", "data=openwebtext-split",
                       "model=small-ar", "parameterization=ar", "backbone=ar", "model.length=1024",
                       "eval.checkpoint_path=/path/to/checkpoint/ar.ckpt", "+wandb.offline=true"],
    "readme_eval_sedd": ["mode=ppl_eval", "loader.batch_size=16", "loader.eval_batch_size=16",
                         "data=openwebtext-split", "model=small", "parameterization=sedd", "backbone=dit",
                         "model.length=1024", "eval.checkpoint_path=/path/to/checkpoint/sedd.ckpt",
                         "time_conditioning=True", "sampling.predictor=analytic", "+wandb.offline=true"],
    "eval_owt_T_mdlm": ["mode=ppl_eval", "loader.batch_size=16", "loader.eval_batch_size=16",
                        "data=openwebtext-split", "model=small", "parameterization=subs", "backbone=dit",
                        "model.length=1024", "T=1000", "eval.checkpoint_path=/c.ckpt", "+wandb.offline=true"],
    "eval_owt_sedd": ["mode=ppl_eval", "loader.batch_size=16", "loader.eval_batch_size=16", "data=openwebtext-split",
                      "model=small", "parameterization=sedd", "backbone=dit", "model.length=1024",
                      "eval.checkpoint_path=/c.ckpt", "time_conditioning=True", "+wandb.offline=true"],
    "train_lm1b_ar": ["loader.batch_size=16", "loader.eval_batch_size=16", "model=small-ar", "backbone=ar",
                      "data=lm1b", "wandb.name=ar-lm1b", "parameterization=ar", "model.length=128",
                      "eval.compute_generative_perplexity=True", "sampling.steps=1000", "time_conditioning=True"],
    "train_lm1b_d3pm": ["loader.batch_size=16", "loader.eval_batch_size=16", "model=small", "data=lm1b",
                        "wandb.name=d3pm-lm1b", "parameterization=d3pm", "model.length=128",
                        "eval.compute_generative_perplexity=True", "sampling.steps=1000", "sampling.predictor=ddpm",
                        "time_conditioning=True", "T=1000"],
    "train_owt_sedd": ["loader.batch_size=16", "loader.eval_batch_size=16", "model=small", "data=openwebtext-split",
                       "wandb.name=sedd-owt", "parameterization=sedd", "model.length=1024",
                       "eval.compute_generative_perplexity=True", "sampling.steps=1000",
                       "sampling.predictor=analytic", "time_conditioning=True"],
    "hand_set_keys": ["eval.gen_ppl_eval_model_name_or_path=gpt2-medium", "eval.perplexity_batch_size=4",
                      "eval.generate_samples=False", "diffusion=absorbing_state"],
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_COMMANDS))
def test_every_original_command_line_composes(tmp_path: Path, name: str) -> None:
    cfg = make_cfg(tmp_path, ORIGINAL_COMMANDS[name])
    given = dict(o.lstrip("+").split("=", 1) for o in ORIGINAL_COMMANDS[name])
    algorithm = hydra.utils.get_class(cfg.algorithm._target_)
    if "parameterization" in given:
        assert algorithm.parameterization == given["parameterization"]
    if "sampling.predictor" in given:
        assert hydra.utils.get_class(cfg.sampler._target_).name == given["sampling.predictor"]
    if "sampling.steps" in given and "steps" in cfg.sampler:
        assert cfg.sampler.steps == int(given["sampling.steps"])
    if name == "hand_set_keys":
        assert cfg.eval.gen_ppl_eval_model == "gpt2-medium" and cfg.eval.gen_ppl_batch_size == 4


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


class GreedyDemoSampler(DDPMSampler):
    """A sampler added as a test would add one: this class and one YAML, nothing else."""

    name = "greedy_demo"

    def _step(self, log_p, x, t, s, generator):  # unmask like ddpm, but with the most likely token
        x_s = super()._step(log_p, x, t, s, generator)
        changed = x_s != x
        return torch.where(changed, log_p.argmax(-1), x_s)


def test_a_new_sampler_is_one_class_and_one_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs)
    (configs / "sampler" / "greedy_demo.yaml").write_text(
        "_target_: test_configs.GreedyDemoSampler\n_partial_: true\nsteps: ${sampling.steps}\n")
    monkeypatch.setattr(registry, "CONFIGS", configs)
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        cfg = compose("config", overrides=translate(["sampler=greedy_demo", "model=micro", "sampling.steps=4",
                                                     f"checkpointing.save_dir={tmp_path}"]))
        with pytest.raises(ValueError, match=r"valid choices: \['analytic'\]"):
            main.check_combination(compose("config", overrides=["sampler=greedy_demo", "algorithm=sedd"]))
    main.check_combination(cfg)
    assert "greedy_demo" in registry.samplers_accepting(samplers.X0_LOG_PROBS)
    module = main.build_module(cfg, vocab_size=11, mask_index=10)
    assert isinstance(module.sampler, GreedyDemoSampler)
    out = module.generate(module.sampler, torch.full((2, 8), 10), generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (2, 8) and (out.tokens != 10).all() and out.nfe >= 1


def test_trainer_cpu_preset(tmp_path: Path) -> None:
    """trainer=cpu: CPU-sized defaults that work for any data and model (the quickstart's recipe)."""
    default, cpu = make_cfg(tmp_path, ["trainer=default"]), make_cfg(tmp_path, ["trainer=cpu"])
    assert (default.loader.global_batch_size, default.optim.lr, default.training.ema) == (512, 3e-4, 0.9999)
    assert (cpu.trainer.accelerator, cpu.loader.global_batch_size, cpu.loader.eval_global_batch_size) == ("cpu", 32, 32)
    assert (cpu.optim.lr, cpu.lr_scheduler.num_warmup_steps, cpu.training.ema) == (1e-3, 100, 0.999)
    quickstart = make_cfg(tmp_path, ["experiment=quickstart", "trainer=cpu"])
    assert quickstart.trainer.max_steps == 3000 and quickstart.loader.eval_global_batch_size == 64  # the recipe wins


@pytest.mark.parametrize("key,fix", [("parameterization", "- override /algorithm: NAME"),
                                     ("sampling.predictor", "- override /sampler: NAME"),
                                     ("diffusion", "nothing (remove it)")])
def test_an_original_key_set_in_a_config_file_is_an_error(tmp_path: Path, key: str, fix: str) -> None:
    """In an experiment file the original's names would be silently ignored (only the command line is rewritten)."""
    cfg = make_cfg(tmp_path)
    with open_dict(cfg):
        OmegaConf.update(cfg, key, "subs", force_add=True)
    with pytest.raises(ValueError, match=f"{key} is set in a config file, but it moved: write {re.escape(fix)}"):
        main.validate_config(cfg)


@pytest.mark.parametrize("overrides,fused", [
    ([], True),                                                   # auto, CPU: 32-true
    (["optim.fused=false"], False),
    (["trainer.precision=bf16-mixed"], False),                    # auto: not under mixed precision
    (["optim.fused=true", "trainer.precision=bf16-mixed", "trainer.gradient_clip_val=0"], True),
])
def test_optimizer_is_fused_adamw_in_full_precision(tmp_path: Path, overrides: list[str], fused: bool) -> None:
    """optim.fused (default auto): torch's fused AdamW kernel in full precision, about 10x faster than the
    per-tensor loop on CPU (docs/benchmarks.md); torch's default implementation otherwise."""
    cfg = make_cfg(tmp_path, ["experiment=quickstart", "model=tiny", *overrides])
    optimizer = main.build_module(cfg, vocab_size=11, mask_index=10).configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    assert bool(optimizer.defaults["fused"]) is fused
    assert optimizer.defaults["lr"] == cfg.optim.lr


def test_fused_adamw_with_mixed_precision_and_clipping_is_an_error(tmp_path: Path) -> None:
    """Lightning refuses to clip a fused optimizer's gradients under mixed precision (at the first step)."""
    cfg = make_cfg(tmp_path, ["experiment=quickstart", "optim.fused=true", "trainer.precision=bf16-mixed"])
    with pytest.raises(ValueError, match="optim.fused=auto"):
        main.build_module(cfg, vocab_size=11, mask_index=10)
