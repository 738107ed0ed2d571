"""models/hf.py and the export: the released Hugging Face layout, AutoModel loading, exact round trips."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT
from hydra.utils import instantiate
from test_checkpoints import (  # noqa: F401 - eval_cfg: the composed-config fixture
    BLOCKS,
    COND,
    HEADS,
    HIDDEN,
    LENGTH,
    SYNTHETIC_VOCAB,
    VOCAB,
    eval_cfg,
    inputs,
    parameter_names,
    released_weights,
    save_trained_checkpoint,
    write_original_checkpoint,
)
from transformers import AutoConfig, AutoModelForMaskedLM
from transformers.modeling_outputs import MaskedLMOutput

import main
from checkpoints import LoadedCheckpoint, export_hf, load_checkpoint, save_as_ours
from models.dit import DiT
from models.ema import ExponentialMovingAverage
from models.hf import MDLMConfig, MDLMForMaskedLM

CONFIG = {
    "model": {"name": "micro", "hidden_size": HIDDEN, "cond_dim": COND, "n_blocks": BLOCKS, "n_heads": HEADS,
              "dropout": 0.1, "length": LENGTH},
    "backbone": {"_target_": "models.dit.DiT", "hidden_size": HIDDEN, "cond_dim": COND, "n_blocks": BLOCKS,
                 "n_heads": HEADS, "dropout": 0.1},
    "noise": {"_target_": "noise_schedule.LogLinear", "eps": 1e-3},
    "parameterization": "subs",
    "time_conditioning": False,
    "subs_masking": False,
}


def tiny_config(**overrides: object) -> MDLMConfig:
    fields = dict(vocab_size=VOCAB, model_length=LENGTH, hidden_dim=HIDDEN, cond_dim=COND, n_blocks=BLOCKS,
                  n_heads=HEADS) | overrides
    return MDLMConfig(**fields)


def write_our_checkpoint(path: Path) -> tuple[DiT, list[torch.Tensor]]:
    """A checkpoint of this code (``state_dict``, ``ema``, ``config``) whose EMA differs from the raw weights."""
    backbone = instantiate(CONFIG["backbone"], vocab_size=VOCAB)
    backbone.load_state_dict(released_weights("dit"))
    ema = ExponentialMovingAverage(backbone.parameters(), 0.9)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ema.update(backbone.parameters())
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                "ema": ema.state_dict(), "config": {**CONFIG, "seed": 1, "T": 0}, "global_step": 1}, path)
    return backbone.eval(), ema.shadow_params


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def architecture(loaded: LoadedCheckpoint) -> dict[str, object]:
    """The config without the model's display name (which an HF directory takes from its folder)."""
    return {**loaded.config, "model": {k: v for k, v in loaded.config["model"].items() if k != "name"}}


# --------------------------------------------------------------------------- models/hf.py
def test_config_defaults_are_the_released_model() -> None:
    config = MDLMConfig()
    assert config.model_type == "mdlm" and AutoConfig.for_model("mdlm").__class__ is MDLMConfig
    assert (config.vocab_size, config.model_length, config.hidden_dim, config.cond_dim, config.n_blocks,
            config.n_heads, config.dropout, config.time_conditioning) == (50258, 1024, 768, 128, 12, 12, 0.1, False)


def test_state_dict_has_the_released_names() -> None:
    model = MDLMForMaskedLM(tiny_config())
    expected = {f"backbone.{k}": v.shape for k, v in released_weights("dit").items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == expected


@pytest.mark.parametrize("time_conditioning", [False, True])
def test_forward_is_the_dit(time_conditioning: bool) -> None:
    model = MDLMForMaskedLM(tiny_config(time_conditioning=time_conditioning)).eval()
    model.backbone.load_state_dict(released_weights("dit"))
    indices, sigma = inputs()
    with torch.no_grad():
        out = model(indices, timesteps=sigma)
        fed = sigma if time_conditioning else torch.zeros_like(sigma)  # as the released model
        assert isinstance(out, MaskedLMOutput) and torch.equal(out.logits, model.backbone(indices, fed))
        assert torch.equal(model(indices, return_dict=False)[0], model.backbone(indices, torch.zeros_like(sigma)))
    with pytest.raises(ValueError, match="hidden states"):
        model(indices, output_hidden_states=True)


# --------------------------------------------------------------------------- export and back
def test_export_loads_with_automodel_and_round_trips_exactly(tmp_path: Path) -> None:
    backbone, shadows = write_our_checkpoint(tmp_path / "last.ckpt")
    loaded = load_checkpoint(tmp_path / "last.ckpt")
    export_hf(loaded, tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "mdlm"

    config = AutoConfig.from_pretrained(tmp_path / "hf")
    assert isinstance(config, MDLMConfig) and (config.hidden_dim, config.n_blocks, config.vocab_size) == (
        HIDDEN, BLOCKS, VOCAB)
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "hf")
    assert isinstance(model, MDLMForMaskedLM) and not model.training
    with torch.no_grad():  # the EMA weights, as released
        for p, shadow in zip(backbone.parameters(), shadows, strict=True):
            p.copy_(shadow)
        indices, sigma = inputs()
        assert torch.equal(model(indices).logits, backbone(indices, torch.zeros_like(sigma)))

    back = load_checkpoint(tmp_path / "hf")
    assert back.format == "hf" and back.ema is None and architecture(back) == architecture(loaded)
    ema_weights = loaded.weights(parameter_names(backbone))
    assert_same_weights(back.state_dict, ema_weights)
    save_as_ours(back, tmp_path / "back.ckpt")
    again = load_checkpoint(tmp_path / "back.ckpt")
    assert again.format == "ours" and architecture(again) == architecture(loaded)
    assert_same_weights(again.state_dict, ema_weights)


def test_export_without_ema_writes_the_raw_weights(tmp_path: Path) -> None:
    write_our_checkpoint(tmp_path / "last.ckpt")
    loaded = load_checkpoint(tmp_path / "last.ckpt")
    export_hf(loaded, tmp_path / "hf", use_ema=False)
    assert_same_weights(load_checkpoint(tmp_path / "hf").state_dict, loaded.state_dict)


def test_export_of_an_original_sedd_checkpoint_keeps_its_parameterization(tmp_path: Path) -> None:
    write_original_checkpoint(tmp_path / "sedd.ckpt", "sedd")
    loaded = load_checkpoint(tmp_path / "sedd.ckpt")
    export_hf(loaded, tmp_path / "hf")
    back = load_checkpoint(tmp_path / "hf")
    assert back.parameterization == "sedd" and back.config["time_conditioning"] is True
    assert architecture(back) == architecture(loaded)


@pytest.mark.parametrize("name,options", [
    ("udlm", {"sampling_eps": 0.01}),
    ("duo", {"gamma_min": -3.55, "gamma_max": -1.85, "curriculum_start": 0, "curriculum_end": 7}),
    ("duo_distill", {"T": 512, "loss_type": "kl-fwd"}),  # a distilled student
])
def test_export_of_a_uniform_state_model_evaluates_as_it(tmp_path: Path, eval_cfg: Any, name: str,  # noqa: F811
                                                         options: dict[str, Any]) -> None:
    keys = {"sampling_eps": "training.sampling_eps"}
    path = save_trained_checkpoint(tmp_path, [f"algorithm={name}", "noise=linear",
                                              *(f"{keys.get(k, 'algorithm.' + k)}={v}" for k, v in options.items())])
    export_hf(load_checkpoint(path), tmp_path / "hf")
    direct = main.load_for_eval(eval_cfg(f"eval.checkpoint_path={path}"), SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)
    cfg = eval_cfg(f"eval.checkpoint_path={tmp_path / 'hf'}", "backbone=hf_dit")
    exported = main.load_for_eval(cfg, SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)
    assert type(exported.algorithm) is type(direct.algorithm) and type(exported.algorithm).name == name
    assert cfg.sampler._target_.endswith("UniformAncestralSampler")
    for option, value in options.items():
        assert getattr(exported.algorithm, option) == value
    assert type(exported.algorithm.noise).__name__ == "Linear"
    indices = torch.randint(0, SYNTHETIC_VOCAB - 1, (2, 16), generator=torch.Generator().manual_seed(0))
    sigma = torch.full((2,), 0.7)
    with torch.no_grad():  # the same network (the EMA weights both ways), conditioned on the noise level
        assert torch.equal(exported.backbone(indices, sigma), direct.backbone(indices, sigma))


def test_ar_checkpoints_cannot_be_exported(tmp_path: Path) -> None:
    write_original_checkpoint(tmp_path / "ar.ckpt", "ar")
    with pytest.raises(ValueError, match="holds ar weights; the Hugging Face MDLM format holds the bidirectional"):
        export_hf(load_checkpoint(tmp_path / "ar.ckpt"), tmp_path / "hf")


def test_export_script_both_directions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_our_checkpoint(tmp_path / "last.ckpt")
    out = subprocess.run([sys.executable, "scripts/export_hf.py", str(tmp_path / "last.ckpt"), str(tmp_path / "hf")],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "ours -> hf, EMA weights" in out
    spec = importlib.util.spec_from_file_location("export_hf", ROOT / "scripts" / "export_hf.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--to-ckpt", str(tmp_path / "hf"), str(tmp_path / "back" / "mdlm.ckpt")])  # and back, in-process
    assert "hf -> ours" in capsys.readouterr().out
    assert_same_weights(load_checkpoint(tmp_path / "back" / "mdlm.ckpt").state_dict,
                        load_checkpoint(tmp_path / "hf").state_dict)
