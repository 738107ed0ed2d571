"""The released BD3-LM (``kuleshov-group/bd3lm-owt-block_size{4,8,16}``, model_type ``bd3lm``) loads natively.

The hub is unreachable here, so each test writes a directory in the released layout at a tiny
size: their config.json fields and a ``model.safetensors`` with random weights under their key
names (MDLM's ``backbone.*`` names plus the scalar buffers ``sampling_eps_min`` / ``_max``).
"""

from __future__ import annotations

import json
import sys
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
from test_checkpoints import SYNTHETIC_VOCAB, reference_logits, released_weights
from test_main_e2e import run_main
from torch import Tensor

import main
import registry
from block_diffusion import BD3LM, two_stream_logits
from checkpoints import LoadedCheckpoint, adopt_checkpoint, load_backbone_weights, load_checkpoint
from config_aliases import translate

VOCAB, HIDDEN, COND, BLOCKS, HEADS, LENGTH, BLOCK_SIZE = 61, 32, 16, 2, 2, 16, 4
MASK = VOCAB - 1
CLIP = (0.3, 0.8)  # the buffers' clipped interval (the variance search's choice), unlike config.json's


# --------------------------------------------------------------------------- the released layout
def released_config(**changes: Any) -> dict[str, Any]:
    """config.json of kuleshov-group/bd3lm-owt-block_size4 at a tiny size; ``changes`` replace fields (None: remove)."""
    config = {
        "architectures": ["BD3LM"], "attn_backend": "sdpa",
        "auto_map": {"AutoConfig": "configuration_bd3lm.BD3LMConfig", "AutoModelForMaskedLM": "modeling_bd3lm.BD3LM"},
        "block_size": BLOCK_SIZE, "cond_dim": COND, "cross_attn": True, "dropout": 0.1, "hidden_dim": HIDDEN,
        "model_length": LENGTH, "model_type": "bd3lm", "n_blocks": BLOCKS, "n_heads": HEADS, "return_dict": False,
        "sampling_eps_max": 0.999, "sampling_eps_min": 0.001, "time_conditioning": False, "torch_dtype": "float32",
        "transformers_version": "4.49.0", "var_min": True, "vocab_size": VOCAB,
    }
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


def released_bd3lm_weights(rotary: bool = True, buffers: bool = True, vocab: int = VOCAB) -> dict[str, Tensor]:
    """Random weights under the released names: ``backbone.*`` (as MDLM's) and the two scalar clip buffers."""
    weights = {f"backbone.{k}": v for k, v in released_weights("dit", vocab, HIDDEN, COND, BLOCKS, HEADS).items()}
    if not rotary:
        del weights["backbone.rotary_emb.inv_freq"]
    if buffers:
        weights |= {"sampling_eps_min": torch.tensor(CLIP[0]), "sampling_eps_max": torch.tensor(CLIP[1])}
    return weights


def write_bd3lm_directory(folder: Path, weights: dict[str, Tensor] | None = None, **changes: Any) -> dict[str, Tensor]:
    folder.mkdir(parents=True, exist_ok=True)
    weights = released_bd3lm_weights() if weights is None else weights
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(released_config(**changes), indent=2))
    return weights


def loaded_backbone(loaded: LoadedCheckpoint) -> torch.nn.Module:
    backbone = instantiate(loaded.config["backbone"], vocab_size=VOCAB).eval()
    load_backbone_weights(backbone, loaded, use_ema=False)
    return backbone


@pytest.fixture
def eval_cfg(tmp_path: Path) -> Iterator[Any]:
    """``make(overrides)`` -> the composed ppl_eval config with HydraConfig set, as ``python main.py`` has it."""

    def make(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            cfg = compose("config", overrides=translate(["mode=ppl_eval", f"checkpointing.save_dir={tmp_path}",
                                                         *overrides]), return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    yield make
    HydraConfig.instance().cfg = None


# --------------------------------------------------------------------------- loading
@pytest.mark.parametrize("rotary", [True, False], ids=["with_rotary_buffer", "without_rotary_buffer"])
def test_released_directory_loads_as_bd3lm(tmp_path: Path, rotary: bool) -> None:
    weights = write_bd3lm_directory(tmp_path / "bd3lm-owt-block_size4", released_bd3lm_weights(rotary=rotary))
    loaded = load_checkpoint(tmp_path / "bd3lm-owt-block_size4")
    assert loaded.format == "hf" and loaded.ema is None and loaded.backbone_kind == "dit"
    assert loaded.parameterization == "subs" and loaded.vocab_size == VOCAB
    model = loaded.config["model"]
    assert (model["hidden_size"], model["cond_dim"], model["n_blocks"], model["n_heads"], model["length"]) == (
        HIDDEN, COND, BLOCKS, HEADS, LENGTH)
    assert model["name"] == "bd3lm-owt-block_size4"
    algorithm = loaded.config["algorithm"]
    assert algorithm["_target_"] == "block_diffusion.BD3LM" and algorithm["block_size"] == BLOCK_SIZE
    assert (algorithm["clip_min"], algorithm["clip_max"]) == pytest.approx(CLIP)
    assert algorithm["time_conditioning"] is False and algorithm["context_length"] == LENGTH
    assert algorithm["sampling_eps"] == 1e-3 and algorithm["antithetic_sampling"] is True
    loglinear = OmegaConf.to_container(registry.load("noise", "loglinear"), resolve=True)
    assert algorithm["noise"] == loglinear and loaded.config["noise"] == loglinear
    # The buffers are not DiT weights; every other tensor is the file's, under the same name.
    assert not any(k.startswith("sampling_eps") for k in loaded.state_dict)
    expected = {k: v for k, v in released_bd3lm_weights().items() if k.startswith("backbone.")}
    assert loaded.state_dict.keys() == expected.keys()
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in expected.items())
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in weights.items() if k.startswith("backbone."))
    algorithm_object = instantiate(algorithm)(mask_index=MASK)
    assert isinstance(algorithm_object, BD3LM) and algorithm_object.block_size == BLOCK_SIZE
    loaded_backbone(loaded)  # strict: every DiT weight present, nothing else


def test_without_buffers_the_clip_interval_is_config_jsons(tmp_path: Path) -> None:
    write_bd3lm_directory(tmp_path / "hf", released_bd3lm_weights(buffers=False), var_min=False)
    algorithm = load_checkpoint(tmp_path / "hf").config["algorithm"]
    assert (algorithm["clip_min"], algorithm["clip_max"]) == pytest.approx((0.001, 0.999))


def test_evaluation_adopts_bd3lm_and_its_block_size(tmp_path: Path, eval_cfg: Any) -> None:
    folder = tmp_path / "bd3lm-owt-block_size4"
    write_bd3lm_directory(folder)
    cfg = eval_cfg(f"eval.checkpoint_path={folder}", "backbone=hf_dit")  # composed: algorithm=mdlm, model=small
    module = main.load_for_eval(cfg, VOCAB, MASK)
    assert cfg.algorithm._target_ == "block_diffusion.BD3LM" and cfg.algorithm.block_size == BLOCK_SIZE
    assert cfg.model.hidden_size == HIDDEN and cfg.model.length == LENGTH
    assert isinstance(module.algorithm, BD3LM) and module.algorithm.block_size == BLOCK_SIZE
    assert (module.algorithm.clip_min, module.algorithm.clip_max) == pytest.approx(CLIP)
    assert not module.algorithm.time_conditioning


def test_ppl_eval_of_a_released_directory(tmp_path: Path) -> None:
    """``python main.py mode=ppl_eval eval.checkpoint_path=<bd3lm dir>``: bd3lm with the file's block size and clip."""
    folder = tmp_path / "bd3lm-owt-block_size4"
    write_bd3lm_directory(folder, released_bd3lm_weights(vocab=SYNTHETIC_VOCAB), vocab_size=SYNTHETIC_VOCAB)
    proc = run_main(tmp_path / "ppl", "mode=ppl_eval", f"eval.checkpoint_path={folder}", "wandb.mode=disabled")
    assert "Loaded hf checkpoint" in proc.stdout and "algorithm=bd3lm (block_size=4" in proc.stdout
    assert "clip_min=0.3" in proc.stdout and "NLL bound" in proc.stdout
    assert json.loads((tmp_path / "ppl" / "eval_results.json").read_text())["nll"] > 0


@pytest.mark.parametrize("overrides,error", [
    (["block_size=8"], "trained with block_size=4 but the command line says block_size=8"),
    (["algorithm=mdlm"], "was trained with algorithm=bd3lm"),
    (["time_conditioning=true"], "trained with time_conditioning=False but the command line says"),
    (["block_size=4"], None),
])
def test_a_command_line_contradicting_the_checkpoint_is_refused(
    tmp_path: Path, eval_cfg: Any, overrides: list[str], error: str | None
) -> None:
    write_bd3lm_directory(tmp_path / "hf")
    loaded = load_checkpoint(tmp_path / "hf")
    cfg = eval_cfg(f"eval.checkpoint_path={tmp_path / 'hf'}", *overrides)
    given = dict(o.split("=", 1) for o in translate(overrides))
    if error is None:
        adopt_checkpoint(cfg, loaded, given)
        assert cfg.algorithm.block_size == BLOCK_SIZE
    else:
        with pytest.raises(ValueError, match=error):
            adopt_checkpoint(cfg, loaded, given)


# --------------------------------------------------------------------------- logits
def noisy_pair(seed: int = 1, batch: int = 3) -> tuple[Tensor, Tensor]:
    """(x_t, x_0), each (B, L): x_0 random tokens, x_t with about half of them masked."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, MASK, (batch, LENGTH), generator=gen)
    xt = torch.where(torch.rand(batch, LENGTH, generator=gen) < 0.5, MASK, x0)
    return xt, x0


def test_vectorized_logits_equal_the_per_block_view(tmp_path: Path) -> None:
    """The x_t half of one pass over x_t ⊕ x_0 = block b run after its clean prefix, block-causally, block by block."""
    write_bd3lm_directory(tmp_path / "hf")
    loaded = load_checkpoint(tmp_path / "hf")
    backbone, block_size = loaded_backbone(loaded), loaded.config["algorithm"]["block_size"]
    xt, x0 = noisy_pair()
    sigma = torch.zeros(xt.shape[0])
    with torch.no_grad():
        vectorized = two_stream_logits(backbone, xt, x0, block_size, sigma)  # (B, L, V)
        for b in range(LENGTH // block_size):
            block = slice(b * block_size, (b + 1) * block_size)
            x = torch.cat([x0[:, :block.start], xt[:, block]], dim=1)  # (B, S): clean blocks < b, noisy block b
            blocks = torch.arange(x.shape[1]) // block_size
            per_block = backbone(x, sigma, attn_mask=blocks[:, None] >= blocks[None, :])[:, block.start:]
            torch.testing.assert_close(vectorized[:, block], per_block, rtol=0, atol=1e-5)
    assert vectorized.abs().max() > 0.1  # non-trivial logits


def hand_logits(weights: dict[str, Tensor], token: int) -> Tensor:
    """(V,) float64 logits at every position of an input that is ``token`` everywhere, sigma = 0.

    All positions then have the same hidden state, so attention returns the value vector
    ``W_v h`` whatever the mask and positions: ``h = LN(x) w_1 (1 + scale_msa) + shift_msa``,
    ``x += gate_msa W_out W_v h``,
    ``x += gate_mlp (W_2 gelu(W_1 (LN(x) w_2 (1 + scale_mlp) + shift_mlp) + b_1) + b_2)``,
    with the six chunks of ``W_ada c + b_ada`` and ``c = silu(mlp([cos 0]*128 ++ [sin 0]*128))``;
    logits ``= W (LN(x) w_f (1 + scale) + shift) + b``.
    """
    w = {k.removeprefix("backbone."): v.double() for k, v in weights.items()}

    def linear(t: Tensor, name: str) -> Tensor:
        return w[f"{name}.weight"] @ t + w.get(f"{name}.bias", 0)

    def norm(t: Tensor, name: str) -> Tensor:
        return (t - t.mean()) / torch.sqrt(t.var(unbiased=False) + 1e-5) * w[f"{name}.weight"]

    features = torch.cat([torch.ones(128), torch.zeros(128)]).double()  # sigma = 0: cos 0, sin 0
    c = F.silu(linear(F.silu(linear(features, "sigma_map.mlp.0")), "sigma_map.mlp.2"))
    x = w["vocab_embed.embedding"][token]
    for n in range(BLOCKS):
        p = f"blocks.{n}"
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = linear(c, f"{p}.adaLN_modulation").chunk(6)
        h = norm(x, f"{p}.norm1") * (1 + scale_msa) + shift_msa
        value = w[f"{p}.attn_qkv.weight"][2 * HIDDEN:] @ h  # rows [q | k | v]
        x = x + gate_msa * (w[f"{p}.attn_out.weight"] @ value)
        h = norm(x, f"{p}.norm2") * (1 + scale_mlp) + shift_mlp
        x = x + gate_mlp * linear(F.gelu(linear(h, f"{p}.mlp.0"), approximate="tanh"), f"{p}.mlp.2")
    shift, scale = linear(c, "output_layer.adaLN_modulation").chunk(2)
    return linear(norm(x, "output_layer.norm_final") * (1 + scale) + shift, "output_layer.linear")


def test_logits_pin_the_released_key_names(tmp_path: Path) -> None:
    """Hand-computed logits from the file's tensors under their released names.

    (1) an input that is one token everywhere (x_t and x_0), whose logits need no attention
    pattern (:func:`hand_logits`), also through the loaded algorithm's block denoiser given
    sigma = 2 (no time conditioning: the network sees 0); (2) the first noisy block sees only
    itself, so its logits are MDLM's DiT on that block alone, with full attention and sigma = 0.
    """
    weights = write_bd3lm_directory(tmp_path / "hf")
    loaded = load_checkpoint(tmp_path / "hf")
    backbone = loaded_backbone(loaded)
    algorithm = instantiate(loaded.config["algorithm"])(mask_index=MASK)
    batch, block_size = 2, algorithm.block_size
    with torch.no_grad():
        for token in (5, MASK):
            same = torch.full((batch, LENGTH), token)
            got = two_stream_logits(backbone, same, same, block_size, torch.zeros(batch))  # (B, L, V)
            want = hand_logits(weights, token).expand_as(got)
            torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
        prefix, masked = torch.full((batch, LENGTH - block_size), MASK), torch.full((batch, block_size), MASK)
        log_p = algorithm.block_denoiser(backbone, prefix)(masked, torch.full((batch,), 2.0))  # (B, L', V)
        want = hand_logits(weights, MASK)[:MASK].log_softmax(-1)  # SUBS: the mask is never the answer
        torch.testing.assert_close(log_p[..., :MASK].double(), want.expand_as(log_p[..., :MASK]), rtol=0, atol=1e-5)

        xt, x0 = noisy_pair()
        first = two_stream_logits(backbone, xt, x0, block_size, torch.zeros(xt.shape[0]))[:, :block_size]
        want = reference_logits(weights, xt[:, :block_size], torch.zeros(xt.shape[0]), HEADS)
        torch.testing.assert_close(first.double(), want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- other files
def test_flex_attention_is_only_a_kernel_choice(tmp_path: Path) -> None:
    write_bd3lm_directory(tmp_path / "sdpa")
    write_bd3lm_directory(tmp_path / "flex", attn_backend="flex")
    sdpa, flex = load_checkpoint(tmp_path / "sdpa"), load_checkpoint(tmp_path / "flex")
    assert flex.config == {**sdpa.config, "model": {**sdpa.config["model"], "name": "flex"}}
    assert all(torch.equal(flex.state_dict[k], v) for k, v in sdpa.state_dict.items())


@pytest.mark.parametrize("changes,error", [
    ({"cross_attn": False}, "cross_attn=false: the network reads x_t alone"),
    ({"adaln": False}, "adaln=false: the network has no adaLN modulation"),
    ({"time_conditioning": True}, "time_conditioning=true: algorithm=bd3lm gives each block its own noise level"),
    ({"causal": True}, "causal=true"),
    ({"attn_backend": "flash_attn"}, r"attn_backend='flash_attn', not one of \['sdpa', 'flex'\]"),
    ({"block_size": None}, "has no block_size"),
], ids=["cross_attn", "adaln", "time_conditioning", "causal", "attn_backend", "no_block_size"])
def test_another_network_in_the_bd3lm_format_is_refused(tmp_path: Path, changes: dict[str, Any], error: str) -> None:
    write_bd3lm_directory(tmp_path / "hf", **changes)
    with pytest.raises(ValueError, match=error) as raised:
        load_checkpoint(tmp_path / "hf")
    assert str(tmp_path / "hf") in str(raised.value)


def test_an_unknown_model_type_lists_the_accepted_formats(tmp_path: Path) -> None:
    write_bd3lm_directory(tmp_path / "hf", model_type="bd3lm_v2")
    with pytest.raises(ValueError, match=r"model_type='bd3lm_v2', not one of \['bd3lm', 'mdlm'\]") as raised:
        load_checkpoint(tmp_path / "hf")
    assert "Accepted: a Lightning checkpoint" in str(raised.value) and "model_type 'bd3lm'" in str(raised.value)


@pytest.fixture
def remote_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Remote code imported from a module cache of its own, which other tests never see.

    transformers puts the cache folder on ``sys.path`` and the loaded modules in ``sys.modules``;
    another test's remote code (test_checkpoints') would otherwise resolve its package there.
    """
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
        del sys.modules[name]


@pytest.mark.usefixtures("remote_modules")
def test_remote_code_gives_the_same_checkpoint(tmp_path: Path) -> None:
    """``trust_remote_code=True`` builds the repo's model (a stand-in here) and reads the same weights and config."""
    folder = tmp_path / "remote"
    write_bd3lm_directory(folder)
    (folder / "modeling_bd3lm.py").write_text(REMOTE_MODEL)
    native, remote = load_checkpoint(folder), load_checkpoint(folder, trust_remote_code=True)
    assert remote.config == native.config
    assert remote.state_dict.keys() == native.state_dict.keys()
    assert all(torch.equal(remote.state_dict[k], v) for k, v in native.state_dict.items())


# A stand-in for the repo's code: its config fields, our DiT under ``backbone`` and the two buffers. One file, no
# relative import, so that it loads whichever module cache another test's remote code left on sys.path.
REMOTE_MODEL = '''
import torch
import transformers

from models.dit import DiT


class BD3LMConfig(transformers.PretrainedConfig):
    model_type = "bd3lm"

    def __init__(self, block_size=1, vocab_size=50258, model_length=1024, cross_attn=True, adaln=True,
                 attn_backend="sdpa", causal=False, hidden_dim=768, cond_dim=128, n_blocks=12, n_heads=12, dropout=0.1,
                 time_conditioning=False, var_min=True, sampling_eps_min=1e-3, sampling_eps_max=0.999, **kwargs):
        super().__init__(**kwargs)
        self.block_size, self.vocab_size, self.model_length = block_size, vocab_size, model_length
        self.cross_attn, self.adaln, self.attn_backend, self.causal = cross_attn, adaln, attn_backend, causal
        self.hidden_dim, self.cond_dim, self.n_blocks, self.n_heads = hidden_dim, cond_dim, n_blocks, n_heads
        self.dropout, self.time_conditioning, self.var_min = dropout, time_conditioning, var_min
        self.sampling_eps_min, self.sampling_eps_max = sampling_eps_min, sampling_eps_max


class BD3LM(transformers.PreTrainedModel):
    config_class = BD3LMConfig
    base_model_prefix = "bd3lm"

    def __init__(self, config):
        super().__init__(config)
        self.backbone = DiT(config.vocab_size, config.hidden_dim, config.cond_dim, config.n_blocks, config.n_heads,
                            config.dropout)
        self.register_buffer("sampling_eps_min", torch.tensor(config.sampling_eps_min))
        self.register_buffer("sampling_eps_max", torch.tensor(config.sampling_eps_max))
        self.post_init()

    def _init_weights(self, module):
        pass
'''
