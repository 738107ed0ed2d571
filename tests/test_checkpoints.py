"""checkpoints.py: the original's Lightning checkpoints (MDLM, AR, SEDD) and the Hugging Face format load
into our models with the logits of the published architecture; loading runs no code from the file;
every failure is a clear error; ``main.py`` evaluates all of them."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import save_file
from test_main_e2e import TINY, run_main
from torch import Tensor

import main
from checkpoints import (
    ARCHITECTURE_KEYS,
    LEGACY_ALGORITHM_KEYS,
    Unpickled,
    load_checkpoint,
    safe_torch_load,
    save_as_ours,
)
from config_aliases import translate
from models.ema import ExponentialMovingAverage
from synthetic import MarkovSource, build_tokenizer

VOCAB, HIDDEN, COND, BLOCKS, HEADS, LENGTH = 61, 32, 16, 2, 4, 11
SYNTHETIC_VOCAB = 286  # data=synthetic (experiment=quickstart): 285 tokens + [MASK]


# --------------------------------------------------------------------------- fixtures in the released layout
def released_weights(kind: str, vocab: int = VOCAB, hidden: int = HIDDEN, cond: int = COND, blocks: int = BLOCKS,
                     heads: int = HEADS, seed: int = 0) -> dict[str, Tensor]:
    """Random weights under the released names and shapes (FACTS.md), in the released order, no ``backbone.``.

    ``kind``: ``"dit"`` (mdlm.ckpt, sedd.ckpt, kuleshov-group/mdlm-owt) or ``"ar"`` (ar.ckpt: no
    noise embedding, no adaLN). Layer-norm weights are ~1, everything else ~N(0, 0.1^2) (biases
    too), so that every term of the forward pass moves the logits.
    """
    gen = torch.Generator().manual_seed(seed)
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"vocab_embed.embedding": (vocab, hidden)}
    if kind == "dit":
        shapes |= {"sigma_map.mlp.0.weight": (cond, 256), "sigma_map.mlp.0.bias": (cond,),
                   "sigma_map.mlp.2.weight": (cond, cond), "sigma_map.mlp.2.bias": (cond,)}
    shapes["rotary_emb.inv_freq"] = (head_dim // 2,)
    for n in range(blocks):
        shapes |= {f"blocks.{n}.norm1.weight": (hidden,), f"blocks.{n}.attn_qkv.weight": (3 * hidden, hidden),
                   f"blocks.{n}.attn_out.weight": (hidden, hidden), f"blocks.{n}.norm2.weight": (hidden,),
                   f"blocks.{n}.mlp.0.weight": (4 * hidden, hidden), f"blocks.{n}.mlp.0.bias": (4 * hidden,),
                   f"blocks.{n}.mlp.2.weight": (hidden, 4 * hidden), f"blocks.{n}.mlp.2.bias": (hidden,)}
        if kind == "dit":
            shapes |= {f"blocks.{n}.adaLN_modulation.weight": (6 * hidden, cond),
                       f"blocks.{n}.adaLN_modulation.bias": (6 * hidden,)}
    shapes |= {"output_layer.norm_final.weight": (hidden,), "output_layer.linear.weight": (vocab, hidden),
               "output_layer.linear.bias": (vocab,)}
    if kind == "dit":
        shapes |= {"output_layer.adaLN_modulation.weight": (2 * hidden, cond),
                   "output_layer.adaLN_modulation.bias": (2 * hidden,)}
    weights = {}
    for name, shape in shapes.items():
        value = 0.1 * torch.randn(shape, generator=gen)
        weights[name] = value + 1.0 if "norm" in name else value
    weights["rotary_emb.inv_freq"] = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return weights


def reference_logits(weights: dict[str, Tensor], indices: Tensor, sigma: Tensor | None, heads: int) -> Tensor:
    """The published MDLM DiT / AR forward (FACTS.md), in float64, from released-name weights.

    Weight-only layer norm; adaLN ``x (1 + scale) + shift`` with the chunks (shift_msa, scale_msa,
    gate_msa, shift_mlp, scale_mlp, gate_mlp); rotary on q and k, non-interleaved halves, base
    10,000; GELU(tanh); sigma -> 256 features (cos then sin) -> Linear-SiLU-Linear -> SiLU; final
    norm, modulate, linear. ``sigma=None``: the AR model (no adaLN, causal attention).
    """
    w = {k.removeprefix("backbone."): v.double() for k, v in weights.items()}
    x = w["vocab_embed.embedding"][indices]  # (B, L, D)
    batch, length, dim = x.shape
    head_dim = dim // heads

    def linear(t: Tensor, name: str, bias: bool = True) -> Tensor:
        return t @ w[f"{name}.weight"].T + (w[f"{name}.bias"] if bias else 0)

    def norm(t: Tensor, name: str) -> Tensor:
        return F.layer_norm(t, (dim,), eps=1e-5) * w[f"{name}.weight"]

    angles = torch.arange(length, dtype=torch.float64)[:, None] * 10000.0 ** (
        -torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (L, D_head/2)
    cos, sin = angles.cos()[None, :, None], angles.sin()[None, :, None]

    def rotate(t: Tensor) -> Tensor:  # (B, L, H, D_head)
        t1, t2 = t[..., : head_dim // 2], t[..., head_dim // 2:]
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1)

    if sigma is not None:
        freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float64) / 128)
        args = sigma.double()[:, None] * freqs  # (B, 128)
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 256)
        c = F.silu(linear(F.silu(linear(features, "sigma_map.mlp.0")), "sigma_map.mlp.2"))  # (B, cond)
    n_blocks = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    for n in range(n_blocks):
        p = f"blocks.{n}"
        if sigma is None:
            shift_msa = scale_msa = shift_mlp = scale_mlp = torch.zeros(())
            gate_msa = gate_mlp = torch.ones(())
        else:
            chunks = linear(c, f"{p}.adaLN_modulation")[:, None].chunk(6, dim=-1)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks
        qkv = linear(norm(x, f"{p}.norm1") * (1 + scale_msa) + shift_msa, f"{p}.attn_qkv", bias=False)
        q, k, v = qkv.view(batch, length, 3, heads, head_dim).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", rotate(q), rotate(k)) / math.sqrt(head_dim)
        if sigma is None:
            scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), -math.inf)
        attn = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(batch, length, dim)
        x = x + gate_msa * linear(attn, f"{p}.attn_out", bias=False)
        h = norm(x, f"{p}.norm2") * (1 + scale_mlp) + shift_mlp
        x = x + gate_mlp * linear(F.gelu(linear(h, f"{p}.mlp.0"), approximate="tanh"), f"{p}.mlp.2")
    if sigma is None:
        return linear(norm(x, "output_layer.norm_final"), "output_layer.linear")
    shift, scale = linear(c, "output_layer.adaLN_modulation")[:, None].chunk(2, dim=-1)
    return linear(norm(x, "output_layer.norm_final") * (1 + scale) + shift, "output_layer.linear")  # (B, L, V)


ORIGINAL_RUNS = {  # the original README's three released models: (backbone, parameterization, time_conditioning)
    "mdlm": ("dit", "subs", False),
    "ar": ("ar", "ar", False),
    "sedd": ("dit", "sedd", True),
}


def original_config(name: str, vocab: int = VOCAB, hidden: int = HIDDEN, blocks: int = BLOCKS,
                    noise: dict[str, Any] | None = None) -> DictConfig:
    """An OmegaConf config as the original's Hydra run stored it (interpolations with its resolvers kept)."""
    backbone, parameterization, time_conditioning = ORIGINAL_RUNS[name]
    model = {"name": "small", "type": "ddit", "hidden_size": hidden, "cond_dim": COND, "length": LENGTH,
             "n_blocks": blocks, "n_heads": HEADS, "scale_by_sigma": True, "dropout": 0.1,
             "tie_word_embeddings": False}
    if backbone == "ar":
        model["causal"] = True
    config = OmegaConf.create({
        "mode": "train", "diffusion": "absorbing_state", "backbone": backbone, "parameterization": parameterization,
        "time_conditioning": time_conditioning, "T": 0, "subs_masking": False, "seed": 1, "model": model,
        "noise": noise or {"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20},
        "loader": {"global_batch_size": 512, "batch_size": "${div_up:${.global_batch_size}, ${eval:2 * 1}}"},
        "checkpointing": {"save_dir": "${cwd:}"},
        "data": {"tokenizer_name_or_path": "gpt2", "wrap": True},
    })
    OmegaConf.set_struct(config, True)
    return config


def write_original_checkpoint(
    path: Path, name: str, vocab: int = VOCAB, hidden: int = HIDDEN, blocks: int = BLOCKS, seed: int = 0,
    noise: dict[str, Any] | None = None,
) -> tuple[dict[str, Tensor], list[Tensor]]:
    """An original Lightning checkpoint: ``backbone.``/``noise.`` state dict, ``ema``, the config and a
    pickled tokenizer in ``hyper_parameters``. Returns the raw weights and the EMA shadows (released names)."""
    kind = ORIGINAL_RUNS[name][0]
    weights = released_weights(kind, vocab=vocab, hidden=hidden, blocks=blocks, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    shadows = [v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in weights.items() if k != "rotary_emb.inv_freq"]
    checkpoint = {
        "epoch": 4, "global_step": 1_000_000, "pytorch-lightning_version": "2.2.1",
        "state_dict": {**{f"backbone.{k}": v for k, v in weights.items()}, "noise.sigmas": torch.tensor([1e-4, 20.0])},
        "ema": {"decay": 0.9999, "num_updates": 1_000_000, "shadow_params": shadows},
        "loops": {"fit_loop": {"epoch_progress": {"current": {"completed": 4}}}},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 3e-4, "params": [0]}]}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"config": original_config(name, vocab, hidden, blocks, noise),
                             "tokenizer": build_tokenizer(MarkovSource.from_seed(0))},
    }
    torch.save(checkpoint, path)
    return weights, shadows


def write_hf_directory(folder: Path, vocab: int = VOCAB, hidden: int = HIDDEN, blocks: int = BLOCKS,
                       length: int = LENGTH, seed: int = 0, time_conditioning: bool = False) -> dict[str, Tensor]:
    """A directory as ``kuleshov-group/mdlm-owt`` has it: the remote-code config.json and model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = {f"backbone.{k}": v for k, v in released_weights("dit", vocab, hidden, blocks=blocks, seed=seed).items()}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["MDLM"], "auto_map": {"AutoConfig": "configuration_mdlm.MDLMConfig",
                                                "AutoModelForMaskedLM": "modeling_mdlm.MDLM"},
        "model_type": "mdlm", "vocab_size": vocab, "model_length": length, "hidden_dim": hidden, "cond_dim": COND,
        "n_blocks": blocks, "n_heads": HEADS, "dropout": 0.1, "time_conditioning": time_conditioning,
        "return_dict": False, "torch_dtype": "float32", "transformers_version": "4.38.2",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return weights


def build_backbone(config: dict[str, Any], vocab: int) -> torch.nn.Module:
    return instantiate(config["backbone"], vocab_size=vocab).eval()


def parameter_names(module: torch.nn.Module) -> list[str]:
    return [f"backbone.{n}" for n, p in module.named_parameters() if p.requires_grad]


def inputs(vocab: int = VOCAB, batch: int = 3, length: int = LENGTH) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, vocab, (batch, length), generator=gen), 0.5 + 2 * torch.rand(batch, generator=gen)


def relative_error(got: Tensor, want: Tensor) -> float:
    assert want.abs().max() > 0.1  # non-trivial logits
    return ((got.double() - want).abs().max() / want.abs().max()).item()


# --------------------------------------------------------------------------- the original's checkpoints
@pytest.mark.parametrize("name", list(ORIGINAL_RUNS))
def test_original_checkpoint_loads_with_config_and_ema(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.ckpt"
    weights, shadows = write_original_checkpoint(path, name)
    loaded = load_checkpoint(path)
    backbone, parameterization, time_conditioning = ORIGINAL_RUNS[name]
    assert loaded.format == "original" and loaded.source == str(path)
    assert loaded.backbone_kind == backbone and loaded.parameterization == parameterization
    assert loaded.config["time_conditioning"] is time_conditioning and loaded.vocab_size == VOCAB
    assert {k: loaded.config["model"][k] for k in ("hidden_size", "cond_dim", "n_blocks", "n_heads", "length")} == {
        "hidden_size": HIDDEN, "cond_dim": COND, "n_blocks": BLOCKS, "n_heads": HEADS, "length": LENGTH}
    assert loaded.config["noise"] == {"_target_": "noise_schedule.LogLinear", "eps": 1e-3}
    assert sorted(loaded.state_dict) == sorted(f"backbone.{k}" for k in weights)  # noise.* dropped
    for key, value in weights.items():
        assert torch.equal(loaded.state_dict[f"backbone.{key}"], value)
    # The EMA shadows follow the original's parameter order; our module's order is the same.
    module = build_backbone(loaded.config, VOCAB)
    ema_weights = loaded.weights(parameter_names(module))
    for key, shadow in zip([k for k in weights if k != "rotary_emb.inv_freq"], shadows, strict=True):
        assert torch.equal(ema_weights[f"backbone.{key}"], shadow)
    module.load_state_dict({k.removeprefix("backbone."): v for k, v in ema_weights.items()}, strict=True)


@pytest.mark.parametrize(
    "noise,expected",
    [
        ({"type": "loglinear", "sigma_min": 1e-4, "sigma_max": 20}, {"eps": 1e-3}),
        ({"type": "linear", "sigma_min": 1e-3, "sigma_max": 7.0}, {"sigma_min": 1e-3, "sigma_max": 7.0}),
        ({"type": "geometric", "sigma_min": 1e-4, "sigma_max": 20}, {"sigma_min": 1e-4, "sigma_max": 20.0}),
        ({"type": "cosine"}, {"eps": 1e-3}),
    ],
)
def test_original_noise_schedules_map_to_ours(tmp_path: Path, noise: dict[str, Any], expected: dict[str, Any]) -> None:
    write_original_checkpoint(tmp_path / "sedd.ckpt", "sedd", noise=noise)
    config = load_checkpoint(tmp_path / "sedd.ckpt").config["noise"]
    assert {k: v for k, v in config.items() if k != "_target_"} == expected
    assert instantiate(config)(torch.tensor([0.5])).sigma.item() > 0


def test_unknown_original_noise_schedule_is_a_clear_error(tmp_path: Path) -> None:
    write_original_checkpoint(tmp_path / "x.ckpt", "mdlm", noise={"type": "polynomial", "a": -3})
    with pytest.raises(ValueError, match="noise.type='polynomial' is not supported; valid:"):
        load_checkpoint(tmp_path / "x.ckpt")
    write_original_checkpoint(tmp_path / "ar.ckpt", "ar", noise={"type": "ar", "scale": 6.0})
    assert "noise" not in load_checkpoint(tmp_path / "ar.ckpt").config  # the AR model uses none


@pytest.mark.parametrize("name", ["mdlm", "ar"])
def test_original_checkpoint_logits_match_the_published_architecture(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.ckpt"
    write_original_checkpoint(path, name)
    loaded = load_checkpoint(path)
    module = build_backbone(loaded.config, VOCAB)
    weights = loaded.weights(parameter_names(module))
    module.load_state_dict({k.removeprefix("backbone."): v for k, v in weights.items()}, strict=True)
    indices, sigma = inputs()
    with torch.no_grad():
        got = module(indices, sigma)
    want = reference_logits(weights, indices, sigma if name == "mdlm" else None, HEADS)
    assert relative_error(got, want) < 1e-5


def touch(path: str) -> None:
    """What a malicious checkpoint would have ``pickle.load`` call (see :class:`_Exploit`)."""
    Path(path).touch()


class _Exploit:
    """``pickle.load`` would call ``function(argument)`` to rebuild it; a safe load must not."""

    def __init__(self, function: Any, argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.function, (self.argument,))


def test_loading_runs_no_code_from_the_file(tmp_path: Path) -> None:
    """Globals a pickle names (the original's tokenizer, or anything else) load as inert placeholders."""
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "hyper_parameters": {"evil": _Exploit(touch, str(marker))}}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="hyper_parameters hold no MDLM config"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert isinstance(safe_torch_load(tmp_path / "evil.ckpt")["hyper_parameters"]["evil"], Unpickled)
    assert not marker.exists()
    write_original_checkpoint(tmp_path / "mdlm.ckpt", "mdlm")
    assert isinstance(safe_torch_load(tmp_path / "mdlm.ckpt")["hyper_parameters"]["tokenizer"], Unpickled)


def test_modules_torch_blocks_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "evil": _Exploit(os.system, f"touch {marker}")}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="could not be read safely: .*posix.system"):
        load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


# --------------------------------------------------------------------------- our own checkpoints
def test_our_checkpoint_loads_and_round_trips(tmp_path: Path) -> None:
    model = released_weights("dit")
    config = {"model": {"name": "micro", "hidden_size": HIDDEN, "cond_dim": COND, "n_blocks": BLOCKS,
                        "n_heads": HEADS, "dropout": 0.1, "length": LENGTH},
              "backbone": {"_target_": "models.dit.DiT", "hidden_size": HIDDEN, "cond_dim": COND,
                           "n_blocks": BLOCKS, "n_heads": HEADS, "dropout": 0.1},
              "noise": {"_target_": "noise_schedule.LogLinear", "eps": 1e-3}, "parameterization": "subs",
              "time_conditioning": False, "subs_masking": False, "T": 0, "seed": 1}
    backbone = build_backbone(config, VOCAB)
    backbone.load_state_dict(model)
    ema = ExponentialMovingAverage(backbone.parameters(), 0.999)
    for _ in range(3):
        with torch.no_grad():
            for p in backbone.parameters():
                p.add_(0.01)
        ema.update(backbone.parameters())
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}, "ema": ema.state_dict(),
                "config": config, "global_step": 3}, path)
    loaded = load_checkpoint(path)
    legacy = (*ARCHITECTURE_KEYS, *LEGACY_ALGORITHM_KEYS)  # a checkpoint from before the algorithm group
    assert loaded.format == "ours" and loaded.config == {k: config[k] for k in legacy if k in config}
    assert loaded.ema is not None and loaded.ema["num_updates"] == 3
    ema_weights = loaded.weights(parameter_names(backbone))
    for (name, _), shadow in zip(backbone.named_parameters(), ema.shadow_params, strict=True):
        assert torch.equal(ema_weights[f"backbone.{name}"], shadow)
    save_as_ours(loaded, tmp_path / "copy.ckpt")
    again = load_checkpoint(tmp_path / "copy.ckpt")
    assert again.config == loaded.config and again.format == "ours"
    assert all(torch.equal(again.state_dict[k], v) for k, v in loaded.state_dict.items())
    assert all(torch.equal(a, b) for a, b in zip(again.ema["shadow_params"], ema.shadow_params, strict=True))


# --------------------------------------------------------------------------- Hugging Face format
def test_hf_directory_maps_into_our_dit(tmp_path: Path) -> None:
    weights = write_hf_directory(tmp_path / "mdlm-owt")
    loaded = load_checkpoint(tmp_path / "mdlm-owt")
    assert loaded.format == "hf" and loaded.ema is None and loaded.backbone_kind == "dit"
    assert "parameterization" not in loaded.config and loaded.config["time_conditioning"] is False
    assert loaded.config["model"] | {"name": None} == {
        "name": None, "hidden_size": HIDDEN, "cond_dim": COND, "n_blocks": BLOCKS, "n_heads": HEADS,
        "dropout": 0.1, "length": LENGTH}
    module = build_backbone(loaded.config, VOCAB)
    module.load_state_dict({k.removeprefix("backbone."): v for k, v in loaded.weights().items()}, strict=True)
    indices, sigma = inputs()
    with torch.no_grad():
        got = module(indices, sigma)
    assert relative_error(got, reference_logits(weights, indices, sigma, HEADS)) < 1e-5


def test_hf_directory_without_rotary_buffer_gets_it(tmp_path: Path) -> None:
    weights = write_hf_directory(tmp_path / "hf")
    inv_freq = weights.pop("backbone.rotary_emb.inv_freq")
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    assert torch.equal(load_checkpoint(tmp_path / "hf").state_dict["backbone.rotary_emb.inv_freq"], inv_freq)


def test_hub_repo_offline_and_not_cached_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    import hub

    monkeypatch.setattr(hub, "hub_reachable", lambda endpoint: False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="unreachable, and it is not in the local Hugging Face cache"):
        load_checkpoint("kuleshov-group/mdlm-owt")


def test_remote_code_runs_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``trust_remote_code=True`` builds the model with the repo's own code; without it that code never runs."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder = tmp_path / "remote"
    weights = write_hf_directory(folder)
    marker = tmp_path / "remote_code_ran"
    (folder / "configuration_mdlm.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_mdlm.py").write_text(REMOTE_MODEL.replace("MARKER", str(marker)))
    load_checkpoint(folder)
    assert not marker.exists()
    loaded = load_checkpoint(folder, trust_remote_code=True)
    assert marker.exists() and loaded.format == "hf"
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in weights.items())


REMOTE_CONFIG = '''
import transformers


class MDLMConfig(transformers.PretrainedConfig):
    model_type = "mdlm"

    def __init__(self, vocab_size=50258, model_length=1024, hidden_dim=768, cond_dim=128, n_blocks=12, n_heads=12,
                 dropout=0.1, time_conditioning=False, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.model_length, self.hidden_dim = vocab_size, model_length, hidden_dim
        self.cond_dim, self.n_blocks, self.n_heads = cond_dim, n_blocks, n_heads
        self.dropout, self.time_conditioning = dropout, time_conditioning
'''
REMOTE_MODEL = '''
import pathlib

import transformers

from models.dit import DiT

from .configuration_mdlm import MDLMConfig

pathlib.Path("MARKER").touch()


class MDLM(transformers.PreTrainedModel):
    config_class = MDLMConfig
    base_model_prefix = "mdlm"

    def __init__(self, config):
        super().__init__(config)
        self.backbone = DiT(config.vocab_size, config.hidden_dim, config.cond_dim, config.n_blocks, config.n_heads,
                            config.dropout)
        self.post_init()

    def _init_weights(self, module):
        pass
'''


# --------------------------------------------------------------------------- errors
def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    for missing in (tmp_path / "nope.ckpt", "nope/last.ckpt", "./nope"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_checkpoint(missing)


def test_hf_directory_without_weights_is_a_clear_error(tmp_path: Path) -> None:
    write_hf_directory(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="none of the weight files"):
        load_checkpoint(tmp_path / "hf")


@pytest.mark.parametrize("kind", ["text", "bare_state_dict", "other_dict", "empty_dir", "bert_dir"])
def test_unknown_format_is_a_clear_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "thing.ckpt"
    if kind == "text":
        path.write_text("not a checkpoint")
    elif kind == "bare_state_dict":
        torch.save({f"backbone.{k}": v for k, v in released_weights("dit").items()}, path)
    elif kind == "other_dict":
        torch.save({"model": torch.zeros(3)}, path)
    elif kind == "empty_dir":
        path = tmp_path / "folder"
        path.mkdir()
    else:
        path = tmp_path / "bert"
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="Accepted: a Lightning checkpoint") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_original_checkpoint_without_config_is_a_clear_error(tmp_path: Path) -> None:
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="hyper_parameters hold no MDLM config"):
        load_checkpoint(tmp_path / "x.ckpt")


@pytest.mark.parametrize(
    "name,overrides,message",
    [
        ("ar", ["parameterization=subs"], r"trained with algorithm=ar \(parameterization=ar\) but the command line "
         "says algorithm=mdlm"),
        ("ar", ["backbone=dit"], "holds ar weights but the command line says backbone=dit"),
        ("ar", ["backbone=hf_dit"], "holds ar weights but the command line says backbone=hf_dit"),
        ("mdlm", ["parameterization=ar", "backbone=ar"], "holds dit weights but the command line says backbone=ar"),
        ("sedd", ["parameterization=subs"], "trained with algorithm=sedd .* but the command line says algorithm=mdlm"),
        ("sedd", ["time_conditioning=false"], "trained with time_conditioning=True but the command line says "
         "time_conditioning=False"),
    ],
)
def test_algorithm_or_backbone_mismatch_is_a_clear_error(
    tmp_path: Path, eval_cfg: Any, name: str, overrides: list[str], message: str
) -> None:
    write_original_checkpoint(tmp_path / "x.ckpt", name)
    cfg = eval_cfg(f"eval.checkpoint_path={tmp_path / 'x.ckpt'}", *overrides)
    with pytest.raises(ValueError, match=message):
        main.load_for_eval(cfg, VOCAB, VOCAB - 1)


def test_hf_weights_need_a_diffusion_algorithm(tmp_path: Path, eval_cfg: Any) -> None:
    write_hf_directory(tmp_path / "hf")
    for overrides in (["backbone=hf_dit"], ["parameterization=sedd", "backbone=dit"]):
        main.load_for_eval(eval_cfg(f"eval.checkpoint_path={tmp_path / 'hf'}", "model.length=8", *overrides),
                           VOCAB, VOCAB - 1)
    cfg = eval_cfg(f"eval.checkpoint_path={tmp_path / 'hf'}", "parameterization=ar")
    with pytest.raises(ValueError, match="holds dit weights, which algorithm=ar cannot use"):
        main.load_for_eval(cfg, VOCAB, VOCAB - 1)


def test_ema_of_another_architecture_is_a_clear_error(tmp_path: Path) -> None:
    write_original_checkpoint(tmp_path / "x.ckpt", "mdlm")
    loaded = load_checkpoint(tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="EMA .* holds"):
        loaded.weights(parameter_names(build_backbone(loaded.config, VOCAB))[:-1])


# --------------------------------------------------------------------------- main.load_for_eval
@pytest.fixture
def eval_cfg(tmp_path: Path) -> Iterator[Any]:
    """``make(overrides)`` -> the composed config with HydraConfig set, as ``python main.py`` has it."""

    def make(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            base = [o for o in TINY if not o.startswith("model.length=")]
            cfg = compose("config", overrides=translate([*base, "mode=ppl_eval", f"checkpointing.save_dir={tmp_path}",
                                                         *overrides]), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):  # as in `python main.py`: the task config without the hydra node
            del cfg["hydra"]
        return cfg

    yield make
    HydraConfig.instance().cfg = None


def test_load_for_eval_of_an_original_sedd_checkpoint(tmp_path: Path, eval_cfg: Any) -> None:
    """The README's SEDD command: architecture, noise and time conditioning from the checkpoint, EMA applied."""
    path = tmp_path / "sedd.ckpt"
    weights, shadows = write_original_checkpoint(path, "sedd", vocab=SYNTHETIC_VOCAB)
    cfg = eval_cfg(f"eval.checkpoint_path={path}", "model=small", "parameterization=sedd", "backbone=dit",
                   "model.length=8", "time_conditioning=True", "sampling.predictor=analytic", "+wandb.offline=true")
    module = main.load_for_eval(cfg, SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)
    assert cfg.algorithm._target_ == "algorithms.SEDD" and cfg.algorithm.time_conditioning is True
    assert cfg.model.length == 8 and cfg.sampler._target_ == "samplers.AnalyticSampler"
    assert cfg.model.hidden_size == HIDDEN and cfg.noise._target_ == "noise_schedule.LogLinear"
    assert module.ema is None and type(module.algorithm).__name__ == "SEDD"
    params = [p for p in module.backbone.parameters()]
    assert all(torch.equal(p, s) for p, s in zip(params, shadows, strict=True))


def test_load_for_eval_without_ema_uses_the_raw_weights(tmp_path: Path, eval_cfg: Any) -> None:
    path = tmp_path / "mdlm.ckpt"
    weights, _ = write_original_checkpoint(path, "mdlm", vocab=SYNTHETIC_VOCAB)
    cfg = eval_cfg(f"eval.checkpoint_path={path}", "eval.disable_ema=true")
    module = main.load_for_eval(cfg, SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)
    assert module.ema is None and cfg.model.length == LENGTH  # model.length not given: the checkpoint's
    assert all(torch.equal(v, weights[k]) for k, v in module.backbone.state_dict().items())


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["parameterization=subs"], "trained with algorithm=ar .* but the command line says algorithm=mdlm"),
        (["backbone=hf_dit"], "holds ar weights but the command line says backbone=hf_dit"),
    ],
)
def test_load_for_eval_refuses_an_ar_checkpoint_as_mdlm(
    tmp_path: Path, eval_cfg: Any, overrides: list[str], message: str
) -> None:
    write_original_checkpoint(tmp_path / "ar.ckpt", "ar", vocab=SYNTHETIC_VOCAB)
    cfg = eval_cfg(f"eval.checkpoint_path={tmp_path / 'ar.ckpt'}", *overrides)
    with pytest.raises(ValueError, match=message):
        main.load_for_eval(cfg, SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)


def test_load_for_eval_vocabulary_mismatch_is_a_clear_error(tmp_path: Path, eval_cfg: Any) -> None:
    write_hf_directory(tmp_path / "hf", vocab=50258, hidden=16, blocks=1)
    cfg = eval_cfg(f"eval.checkpoint_path={tmp_path / 'hf'}", "backbone=hf_dit")
    with pytest.raises(ValueError, match="vocabulary has 50258 entries but data=synthetic gives 286"):
        main.load_for_eval(cfg, SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)


# --------------------------------------------------------------------------- end to end, as the README runs it
def test_ppl_eval_and_sample_eval_of_a_hf_directory(tmp_path: Path) -> None:
    """The original README's Hugging Face commands with a local directory in place of the hub repo."""
    write_hf_directory(tmp_path / "mdlm-owt", vocab=SYNTHETIC_VOCAB, length=16)
    checkpoint = f"eval.checkpoint_path={tmp_path / 'mdlm-owt'}"
    proc = run_main(tmp_path / "ppl", "mode=ppl_eval", checkpoint, "backbone=hf_dit", "wandb.mode=disabled")
    assert "Loaded hf checkpoint" in proc.stdout and "NLL bound" in proc.stdout
    assert json.loads((tmp_path / "ppl" / "eval_results.json").read_text())["nll"] > 0
    run_main(tmp_path / "sample", "mode=sample_eval", checkpoint, "model.length=16", "sampling.predictor=ddpm_cache",
             "sampling.steps=8", "loader.eval_batch_size=1", "sampling.num_sample_batches=2", "backbone=hf_dit")
    assert len((tmp_path / "sample" / "samples.jsonl").read_text().splitlines()) == 2


def test_ppl_eval_of_an_original_ar_checkpoint(tmp_path: Path) -> None:
    """The original README's AR command (model sizes in the checkpoint win over model=small-ar)."""
    write_original_checkpoint(tmp_path / "ar.ckpt", "ar", vocab=SYNTHETIC_VOCAB)
    proc = run_main(tmp_path / "eval", "mode=ppl_eval", "loader.batch_size=8", "loader.eval_batch_size=16",
                    "model=small-ar", "parameterization=ar", "backbone=ar", "model.length=8",
                    f"eval.checkpoint_path={tmp_path / 'ar.ckpt'}", "+wandb.offline=true", "wandb.mode=disabled")
    assert "Loaded original checkpoint" in proc.stdout and "backbone ar" in proc.stdout
    assert json.loads((tmp_path / "eval" / "eval_results.json").read_text())["nll"] > 0


# --------------------------------------------------------------------------- every training option travels
# A non-default value of every option of every algorithm config (configs/algorithm/*.yaml), as the
# command line gives it; evaluation without those options must restore each of them.
OPTION_CASES = [
    ("mdlm", "T", ["T=100"], 100),
    ("mdlm", "time_conditioning", ["time_conditioning=true"], True),
    ("mdlm", "sampling_eps", ["training.sampling_eps=0.01"], 0.01),
    ("mdlm", "antithetic_sampling", ["training.antithetic_sampling=false"], False),
    ("mdlm", "importance_sampling", ["training.importance_sampling=true"], True),
    ("mdlm", "change_of_variables", ["training.change_of_variables=true", "time_conditioning=true"], True),
    ("d3pm", "T", ["T=500"], 500),
    ("d3pm", "time_conditioning", ["T=1000", "time_conditioning=true"], True),
    ("d3pm", "subs_masking", ["T=1000", "subs_masking=true"], True),
    ("d3pm", "antithetic_sampling", ["T=1000", "training.antithetic_sampling=false"], False),
    ("sedd", "time_conditioning", ["time_conditioning=true"], True),
    ("sedd", "sampling_eps", ["training.sampling_eps=0.01"], 0.01),
    ("sedd", "antithetic_sampling", ["training.antithetic_sampling=false"], False),
    ("bd3lm", "block_size", ["block_size=4"], 4),
    ("bd3lm", "sampling_eps", ["block_size=4", "training.sampling_eps=0.01"], 0.01),
    ("bd3lm", "clip_min", ["block_size=4", "training.sampling_eps_min=0.3"], 0.3),
    ("bd3lm", "clip_max", ["block_size=4", "training.sampling_eps_max=0.8"], 0.8),
    ("bd3lm", "antithetic_sampling", ["block_size=4", "training.antithetic_sampling=false"], False),
    ("bd3lm", "time_conditioning", ["block_size=4"], False),  # true is refused
    ("bd3lm", "kv_cache", ["block_size=4", "sampling.kv_cache=false"], False),
    ("bd3lm", "context_length", ["block_size=4"], 16),  # the trained model.length
    ("bd3lm", "clip_search_widths", ["block_size=4", "training.clip_search_widths=[0.5]"], [0.5]),
    ("bd3lm", "clip_search_delta", ["block_size=4", "training.clip_search_delta=0.1"], 0.1),
    ("bd3lm", "clip_search_batches", ["block_size=4", "training.clip_search_batches=7"], 7),
    ("udlm", "sampling_eps", ["training.sampling_eps=0.01"], 0.01),
    ("udlm", "antithetic_sampling", ["training.antithetic_sampling=false"], False),
    ("duo", "sampling_eps", ["training.sampling_eps=0.01"], 0.01),
    ("duo", "antithetic_sampling", ["training.antithetic_sampling=false"], False),
    ("duo", "gamma_min", ["algorithm.gamma_min=-3.55"], -3.55),
    ("duo", "gamma_max", ["algorithm.gamma_max=-1.85"], -1.85),
    ("duo", "curriculum_start", ["algorithm.curriculum_start=0"], 0),
    ("duo", "curriculum_end", ["algorithm.curriculum_end=500000"], 500_000),
    ("duo", "gumbel_tau_log10_start", ["algorithm.gumbel_tau_log10_start=-3"], -3.0),
    ("duo", "gumbel_tau_log10_end", ["algorithm.gumbel_tau_log10_end=-3"], -3.0),
    ("duo_distill", "sampling_eps", ["training.sampling_eps=0.01"], 0.01),
    ("duo_distill", "antithetic_sampling", ["training.antithetic_sampling=false"], False),
    ("duo_distill", "gamma_min", ["algorithm.gamma_min=-3.5"], -3.5),
    ("duo_distill", "gamma_max", ["algorithm.gamma_max=-1.5"], -1.5),
    ("duo_distill", "loss_type", ["algorithm.loss_type=kl-fwd"], "kl-fwd"),
    ("duo_distill", "T", ["algorithm.T=512"], 512),
    ("duo_distill", "update_teacher_every", ["algorithm.update_teacher_every=500"], 500),
]


def test_option_cases_cover_every_option_of_every_algorithm() -> None:
    import registry

    covered = {(name, option) for name, option, _, _ in OPTION_CASES}
    for name in registry.options("algorithm"):
        options = {k for k in registry.load("algorithm", name) if not k.startswith("_") and k != "noise"}
        assert options == {o for n, o in covered if n == name}, name


def save_trained_checkpoint(tmp_path: Path, overrides: list[str]) -> Path:
    """A checkpoint of our format for the composed training config (weights: the fresh initialisation)."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=translate([*TINY, f"checkpointing.save_dir={tmp_path}", *overrides]))
    module = main.build_module(cfg, SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)
    path = tmp_path / "trained.ckpt"
    torch.save({"state_dict": module.state_dict(), "ema": module.ema.state_dict(),
                "config": OmegaConf.to_container(cfg, resolve=True)}, path)
    return path


@pytest.mark.parametrize("name,option,overrides,value", OPTION_CASES, ids=[f"{c[0]}-{c[1]}" for c in OPTION_CASES])
def test_evaluation_restores_every_training_option(
    tmp_path: Path, eval_cfg: Any, name: str, option: str, overrides: list[str], value: Any
) -> None:
    path = save_trained_checkpoint(tmp_path, [f"algorithm={name}", "noise=linear", *overrides])
    cfg = eval_cfg(f"eval.checkpoint_path={path}")
    module = main.load_for_eval(cfg, SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)
    assert type(module.algorithm).name == name and cfg.algorithm[option] == value
    assert getattr(module.algorithm, option) == value
    assert type(module.algorithm.noise).__name__ == "Linear"  # the schedule travels too


def test_an_evaluation_time_T_replaces_the_checkpoints(tmp_path: Path, eval_cfg: Any, capsys: Any) -> None:
    path = save_trained_checkpoint(tmp_path, ["training.sampling_eps=0.01"])  # continuous time, T=0
    module = main.load_for_eval(eval_cfg(f"eval.checkpoint_path={path}", "T=1000"), SYNTHETIC_VOCAB,
                                SYNTHETIC_VOCAB - 1)
    assert module.algorithm.T == 1000 and module.algorithm.sampling_eps == 0.01
    assert "Note: T=1000 from the command line replaces the checkpoint's 0" in capsys.readouterr().out


def test_a_model_option_contradicting_the_checkpoint_is_an_error(tmp_path: Path, eval_cfg: Any) -> None:
    path = save_trained_checkpoint(tmp_path, ["training.change_of_variables=true", "time_conditioning=true"])
    cfg = eval_cfg(f"eval.checkpoint_path={path}", "training.change_of_variables=false")
    with pytest.raises(ValueError, match="trained with training.change_of_variables=True but the command line says"):
        main.load_for_eval(cfg, SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)


def test_checkpoints_from_before_the_algorithm_group_restore_their_options(tmp_path: Path, eval_cfg: Any) -> None:
    """Our checkpoints written with the flat keys (parameterization, T, time_conditioning, training.*)."""
    path = save_trained_checkpoint(tmp_path, ["training.change_of_variables=true", "time_conditioning=true",
                                              "noise=geometric"])
    checkpoint = torch.load(path, weights_only=True)
    config = checkpoint["config"]
    del config["algorithm"], config["sampler"]
    config.update(parameterization="subs", subs_masking=False)  # T, time_conditioning, training: still there
    torch.save(checkpoint, path)
    module = main.load_for_eval(eval_cfg(f"eval.checkpoint_path={path}"), SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)
    assert module.algorithm.change_of_variables and module.algorithm.time_conditioning
    assert type(module.algorithm.noise).__name__ == "Geometric"


def test_hf_export_keeps_every_algorithm_option(tmp_path: Path, eval_cfg: Any) -> None:
    from checkpoints import export_hf

    path = save_trained_checkpoint(tmp_path, ["training.change_of_variables=true", "time_conditioning=true",
                                              "training.sampling_eps=0.01"])
    export_hf(load_checkpoint(path), tmp_path / "hf")
    cfg = eval_cfg(f"eval.checkpoint_path={tmp_path / 'hf'}", "backbone=hf_dit")
    module = main.load_for_eval(cfg, SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)
    assert module.algorithm.change_of_variables and module.algorithm.sampling_eps == 0.01


def test_an_adopted_algorithm_gets_its_default_sampler(tmp_path: Path, eval_cfg: Any) -> None:
    """Sampling sedd.ckpt without naming its sampler: the composed default (ddpm_cache, for mdlm) does not
    fit SEDD, so the checkpoint's algorithm brings its own (analytic). A sampler named on the command
    line is kept, and checked."""
    path = tmp_path / "sedd.ckpt"
    write_original_checkpoint(path, "sedd", vocab=SYNTHETIC_VOCAB)
    cfg = eval_cfg(f"eval.checkpoint_path={path}", "model.length=8")
    module = main.load_for_eval(cfg, SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)
    assert cfg.sampler._target_ == "samplers.AnalyticSampler" and module.sampler.name == "analytic"
    cfg = eval_cfg(f"eval.checkpoint_path={path}", "model.length=8", "sampler=ddpm")
    with pytest.raises(ValueError, match=r"sampler=ddpm does not apply to algorithm=sedd.*valid choices: \['analytic"):
        main.load_for_eval(cfg, SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)


def test_sampler_options_carry_over_to_the_adopted_default_sampler(tmp_path: Path, eval_cfg: Any) -> None:
    """`sampler.temperature=0.5` with ar.ckpt: the AR sampler samples at 0.5 (it silently used 1.0: the options
    were composed into ddpm_cache, which the checkpoint's default sampler replaced). An option the adopted
    sampler lacks is an error, not ignored."""
    path = tmp_path / "ar.ckpt"
    write_original_checkpoint(path, "ar", vocab=SYNTHETIC_VOCAB)
    cfg = eval_cfg(f"eval.checkpoint_path={path}", "model.length=8", "sampler.temperature=0.5", "sampler.top_p=0.9")
    module = main.load_for_eval(cfg, SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)
    assert module.sampler.name == "ar" and module.sampler.temperature == 0.5 and module.sampler.top_p == 0.9
    cfg = eval_cfg(f"eval.checkpoint_path={path}", "model.length=8", "sampler.eps=0.01")
    with pytest.raises(ValueError, match=r"sampler.eps=0.01 is not an option of sampler=ar.*'kv_cache'"):
        main.load_for_eval(cfg, SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)
