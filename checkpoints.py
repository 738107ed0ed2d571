"""Checkpoints of every released format, loaded safely into our models' layout; export to Hugging Face.

:func:`load_checkpoint` reads three formats and returns a :class:`LoadedCheckpoint` (backbone
weights under ``backbone.`` names, the EMA, the architecture in our config layout):

- ``ours``: a Lightning checkpoint written by this code (``state_dict``, ``ema``, ``config``).
- ``original``: a Lightning checkpoint of the original MDLM code, e.g. the released
  ``mdlm.ckpt``, ``ar.ckpt``, ``sedd.ckpt``: ``state_dict`` under ``backbone.`` (and ``noise.``),
  the EMA under ``ema``, the original Hydra config in ``hyper_parameters["config"]``.
- ``hf``: a local directory or hub repo in the ``kuleshov-group/mdlm-owt`` format: ``config.json``
  (model_type ``"mdlm"``) and ``model.safetensors`` (or ``pytorch_model.bin``). The weights map
  into our :class:`models.dit.DiT` by name; the repo's remote code runs only with
  ``trust_remote_code=True``.

Safety: torch files are read with ``weights_only=True``. The original's ``hyper_parameters`` also
hold OmegaConf objects and a pickled tokenizer: OmegaConf's container and node classes are
allow-listed, and every other class the pickle names (the tokenizer's) is replaced by the inert
:class:`Unpickled`, so nothing in the file is called. Hugging Face weights come from safetensors.

:func:`export_hf` writes a checkpoint as ``config.json`` + ``model.safetensors``
(:mod:`models.hf`), and :func:`save_as_ours` writes any loaded checkpoint in our format.
"""

from __future__ import annotations

import collections
import inspect
import json
import pickle
import re
import typing
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import omegaconf
import omegaconf.base
import omegaconf.dictconfig
import omegaconf.errors
import omegaconf.listconfig
import omegaconf.nodes
import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch import Tensor

from models.dit import Rotary
from models.hf import MODEL_TYPE, MDLMConfig, MDLMForMaskedLM

CheckpointFormat = Literal["ours", "original", "hf"]
ACCEPTED_FORMATS = (
    "a Lightning checkpoint (.ckpt) written by this code; "
    "a Lightning checkpoint of the original MDLM code (the released mdlm.ckpt, ar.ckpt, sedd.ckpt); "
    "a Hugging Face directory or hub repo in the kuleshov-group/mdlm-owt format "
    "(config.json with model_type 'mdlm' + model.safetensors) with backbone=hf_dit"
)
# Config keys that define the network (as main.ARCHITECTURE_KEYS).
ARCHITECTURE_KEYS = ("model", "backbone", "noise", "parameterization", "time_conditioning", "subs_masking")
BACKBONE_TARGETS = {"dit": "models.dit.DiT", "ar": "models.autoregressive.ARTransformer"}
# Backbone config names (configs/backbone/*.yaml and the original's `backbone=`) -> the weights they hold.
BACKBONE_KINDS = {"dit": "dit", "hf_dit": "dit", "ar": "ar"}
EMBEDDING_KEY = "backbone.vocab_embed.embedding"
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# The original's noise.type -> (our noise class, fixed arguments, arguments read from its noise config).
# Its log-linear and cosine schedules ignored the config and always used eps = 1e-3.
ORIGINAL_NOISE: dict[str, tuple[str, dict[str, float], tuple[str, ...]]] = {
    "loglinear": ("noise_schedule.LogLinear", {"eps": 1e-3}, ()),
    "cosine": ("noise_schedule.Cosine", {"eps": 1e-3}, ()),
    "cosinesqr": ("noise_schedule.CosineSqr", {"eps": 1e-3}, ()),
    "linear": ("noise_schedule.Linear", {}, ("sigma_min", "sigma_max")),
    "geometric": ("noise_schedule.Geometric", {}, ("sigma_min", "sigma_max")),
}


@dataclass
class LoadedCheckpoint:
    """A checkpoint in our layout, whatever format it came in.

    Attributes:
        state_dict: backbone weights under ``backbone.`` names (as :class:`diffusion.Diffusion` has them).
        ema: the EMA state ``{"decay", "num_updates", "shadow_params"}`` (shadows in the order of the
            backbone's trainable parameters), or None.
        config: the architecture in our config layout, a subset of :data:`ARCHITECTURE_KEYS`; a key
            the checkpoint does not record (e.g. the released HF model's parameterization) is absent.
        format: ``"ours"``, ``"original"`` or ``"hf"``.
        source: the path or hub repo it was read from.
    """

    state_dict: dict[str, Tensor]
    ema: dict[str, Any] | None
    config: dict[str, Any]
    format: CheckpointFormat
    source: str

    @property
    def vocab_size(self) -> int | None:
        """Rows of the token embedding (None for a backbone without ``vocab_embed``)."""
        embedding = self.state_dict.get(EMBEDDING_KEY)
        return None if embedding is None else embedding.shape[0]

    @property
    def backbone_kind(self) -> str:
        """``"dit"`` or ``"ar"`` (else the backbone class name, lower case), from the config's ``_target_``."""
        target = self.config.get("backbone", {}).get("_target_", "")
        kinds = {t: k for k, t in BACKBONE_TARGETS.items()}
        return kinds.get(target, target.rpartition(".")[2].lower() or weights_kind(self.state_dict))

    @property
    def parameterization(self) -> str | None:
        return self.config.get("parameterization")

    def weights(self, ema_parameter_names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """The backbone state dict; with ``ema_parameter_names``, the EMA weights in place of the raw ones.

        Args:
            ema_parameter_names: names of the trainable parameters the EMA shadows, in the
                EMA's order (``[n for n, p in module.named_parameters() if p.requires_grad]``).
                None, or a checkpoint without EMA: the raw weights.
        """
        weights = dict(self.state_dict)
        if ema_parameter_names is None or self.ema is None:
            return weights
        names, shadows = list(ema_parameter_names), list(self.ema["shadow_params"])
        if len(names) != len(shadows):
            raise ValueError(
                f"The EMA in {self.source} holds {len(shadows)} tensors but the model has {len(names)} trainable "
                "parameters: the checkpoint was made with a different architecture (or pass eval.disable_ema=true)."
            )
        for name, shadow in zip(names, shadows, strict=True):
            if name not in weights or weights[name].shape != shadow.shape:
                found = tuple(weights[name].shape) if name in weights else "missing"
                raise ValueError(
                    f"The EMA tensor for {name} in {self.source} has shape {tuple(shadow.shape)}, the weights {found}."
                )
            weights[name] = shadow
        return weights


def weights_kind(state_dict: dict[str, Tensor]) -> str:
    """``"dit"`` if the weights have adaLN modulation (the DiT), else ``"ar"`` (the AR transformer has none)."""
    return "dit" if any(k.endswith("adaLN_modulation.weight") for k in state_dict) else "ar"


def backbone_config(kind: str, model: dict[str, Any]) -> dict[str, Any]:
    """Our backbone config (``configs/backbone/<kind>.yaml``, resolved) for the model sizes ``model``."""
    sizes = {"hidden_size": model["hidden_size"], "n_blocks": model["n_blocks"], "n_heads": model["n_heads"],
             "dropout": model["dropout"]}
    if kind == "dit":
        return {"_target_": BACKBONE_TARGETS["dit"], "cond_dim": model["cond_dim"], **sizes}
    return {"_target_": BACKBONE_TARGETS["ar"], **sizes}


def check_compatible(
    loaded: LoadedCheckpoint,
    parameterization: str,
    given_parameterization: str | None = None,
    given_backbone: str | None = None,
) -> None:
    """Refuse a parameterization or backbone that contradicts the checkpoint, naming both.

    Args:
        loaded: the checkpoint.
        parameterization: the run's parameterization, used when the checkpoint records none
            (the released Hugging Face model).
        given_parameterization: ``parameterization=`` given explicitly on the command line, or None.
        given_backbone: ``backbone=`` given explicitly on the command line (a config name), or None.

    Raises:
        ValueError: the command line names another parameterization or backbone than the
            checkpoint's, or the parameterization cannot use its weights (AR weights need
            ``parameterization=ar``, DiT weights a diffusion parameterization).
    """
    source, kind, saved = loaded.source, loaded.backbone_kind, loaded.parameterization
    if given_backbone is not None and BACKBONE_KINDS.get(given_backbone, given_backbone) != kind:
        raise ValueError(
            f"eval.checkpoint_path={source} holds {kind} weights but the command line says backbone={given_backbone}: "
            f"pass backbone={'ar' if kind == 'ar' else 'dit (or hf_dit)'}, or leave it out."
        )
    if saved is not None and given_parameterization is not None and given_parameterization != saved:
        raise ValueError(
            f"eval.checkpoint_path={source} was trained with parameterization={saved} but the command line says "
            f"parameterization={given_parameterization}: pass parameterization={saved}, or leave it out."
        )
    used = saved or given_parameterization or parameterization
    if (used == "ar") != (kind == "ar"):
        needs = "parameterization=ar backbone=ar" if kind == "ar" else "a diffusion parameterization (subs, sedd, d3pm)"
        raise ValueError(
            f"eval.checkpoint_path={source} holds {kind} weights, which parameterization={used} cannot use: "
            f"they need {needs}."
        )


# --------------------------------------------------------------------------- entry point
def load_checkpoint(path_or_repo: str | Path, *, trust_remote_code: bool = False) -> LoadedCheckpoint:
    """Read a checkpoint in any supported format (see the module docstring).

    Args:
        path_or_repo: a ``.ckpt`` file, a Hugging Face directory, or a hub repo id
            (``kuleshov-group/mdlm-owt``; downloaded, or read from the local cache when offline).
        trust_remote_code: Hugging Face format only: build the model with the repo's own code
            (``AutoModelForMaskedLM.from_pretrained(..., trust_remote_code=True)``) and take its
            weights, instead of reading the weight file directly.

    Raises:
        FileNotFoundError: no such file or directory, and no such hub repo reachable or cached.
        ValueError: not one of the accepted formats, or an inconsistent checkpoint.
    """
    source = str(path_or_repo)
    path = Path(source).expanduser()
    if path.is_file():
        return _load_torch_file(path, source)
    if path.is_dir():
        return _load_hf_directory(path, source, trust_remote_code)
    is_path = source.startswith((".", "/", "~")) or source.endswith(CHECKPOINT_SUFFIXES)
    if is_path or not HUB_REPO_ID.fullmatch(source):
        raise FileNotFoundError(
            f"eval.checkpoint_path={source} does not exist (relative paths start at {Path.cwd()}). "
            f"Accepted: {ACCEPTED_FORMATS}."
        )
    return _load_hf_directory(_hub_snapshot(source, trust_remote_code), source, trust_remote_code)


# --------------------------------------------------------------------------- torch files
class Unpickled:
    """Inert stand-in for any class or function a checkpoint's pickle names that is not allow-listed.

    It accepts any constructor arguments and state and keeps none of them, so loading a file
    never runs its code (e.g. the original's pickled tokenizer becomes an ``Unpickled``).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Unpickled:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _omegaconf_globals() -> dict[str, Any]:
    """The classes a pickled OmegaConf config names: its containers, nodes and metadata, and plain types."""
    classes: dict[str, Any] = {"typing.Any": typing.Any, "collections.defaultdict": collections.defaultdict}
    for builtin in (dict, list, tuple, set, int, float, bool, str, bytes):
        classes[f"builtins.{builtin.__name__}"] = builtin
    for module in (omegaconf.base, omegaconf.nodes, omegaconf.dictconfig, omegaconf.listconfig):
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__:
                classes[f"{module.__name__}.{name}"] = cls
    return classes


def safe_torch_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` that also reads the original's Lightning checkpoints.

    OmegaConf classes are allow-listed; any other non-tensor global (the pickled tokenizer in
    the original's ``hyper_parameters``) loads as an inert :class:`Unpickled`.
    """
    is_zip = zipfile.is_zipfile(path)  # torch.save's format since PyTorch 1.6
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if is_zip else []
        known = _omegaconf_globals()
        allowed: list[Any] = [(known[name], name) for name in unsafe if name in known]
        allowed += [(Unpickled, name) for name in unsafe if name not in known]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as error:
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [line for line in str(error).splitlines() if line.strip() and not line.startswith(boilerplate)]
        detail = lines[0] if lines else type(error).__name__
        reason = f"it could not be read safely: {detail}" if is_zip else "it is not a file written by torch.save"
        raise ValueError(f"eval.checkpoint_path={path}: {reason}. Accepted: {ACCEPTED_FORMATS}.") from error


def _load_torch_file(path: Path, source: str) -> LoadedCheckpoint:
    checkpoint = safe_torch_load(path)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        if "config" in checkpoint:
            return _from_ours(checkpoint, source)
        if "hyper_parameters" in checkpoint:
            return _from_original(checkpoint, source)
    what = "a bare state dict" if isinstance(checkpoint, dict) and EMBEDDING_KEY in checkpoint else "an unknown format"
    raise ValueError(f"eval.checkpoint_path={source} is {what}. Accepted: {ACCEPTED_FORMATS}.")


def _backbone_tensors(state_dict: dict[str, Any], source: str) -> dict[str, Tensor]:
    """The ``backbone.`` entries (``noise.`` buffers and the rest dropped); they must all be tensors."""
    weights = {k: v for k, v in state_dict.items() if k.startswith("backbone.")}
    if any(k.startswith("backbone.backbone.") for k in weights):  # the original run with backbone=hf_dit
        weights = {k.removeprefix("backbone."): v for k, v in weights.items()}
    bad = [k for k, v in weights.items() if not isinstance(v, Tensor)]
    if not weights or bad:
        raise ValueError(f"{source}: the state_dict has no backbone weights ({bad[:3] or 'no backbone.* keys'}).")
    return weights


def _ema_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    ema = checkpoint.get("ema")
    if not isinstance(ema, dict) or not ema.get("shadow_params"):
        return None
    return {"decay": ema.get("decay"), "num_updates": ema.get("num_updates"), "shadow_params": ema["shadow_params"]}


def _from_ours(checkpoint: dict[str, Any], source: str) -> LoadedCheckpoint:
    saved = checkpoint["config"]
    config = {key: saved[key] for key in ARCHITECTURE_KEYS if key in saved}
    weights = _backbone_tensors(checkpoint["state_dict"], source)
    return LoadedCheckpoint(weights, _ema_state(checkpoint), config, "ours", source)


# --------------------------------------------------------------------------- the original's checkpoints
def _original_config(checkpoint: dict[str, Any], source: str) -> DictConfig:
    """The original's Hydra config: ``hyper_parameters["config"]`` (or the hyper-parameters themselves)."""
    hparams = checkpoint["hyper_parameters"]
    config = None
    if isinstance(hparams, dict | DictConfig):
        config = hparams.get("config", hparams if "model" in hparams else None)
    if isinstance(config, dict):
        try:
            config = OmegaConf.create(config)
        except omegaconf.errors.OmegaConfBaseException:
            config = None
    if not isinstance(config, DictConfig) or "model" not in config:
        raise ValueError(
            f"{source}: hyper_parameters hold no MDLM config (expected hyper_parameters['config'] with "
            f"model/backbone/parameterization). Accepted: {ACCEPTED_FORMATS}."
        )
    return config


def _select(config: DictConfig, key: str, source: str, default: Any = None) -> Any:
    """``config.<key>`` with interpolations resolved; a clear error if one cannot be."""
    try:
        value = OmegaConf.select(config, key, default=default)
    except omegaconf.errors.OmegaConfBaseException as error:
        raise ValueError(f"{source}: cannot read {key} from the checkpoint's config ({error}).") from error
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, omegaconf.Container) else value


def _original_noise(config: DictConfig, parameterization: str, source: str) -> dict[str, Any] | None:
    noise_type = _select(config, "noise.type", source)
    if noise_type not in ORIGINAL_NOISE:
        if parameterization == "ar":
            return None  # the AR model uses no noise schedule
        raise ValueError(f"{source}: noise.type={noise_type!r} is not supported; valid: {sorted(ORIGINAL_NOISE)}.")
    target, fixed, keys = ORIGINAL_NOISE[noise_type]
    return {"_target_": target, **fixed, **{k: float(_select(config, f"noise.{k}", source)) for k in keys}}


def _from_original(checkpoint: dict[str, Any], source: str) -> LoadedCheckpoint:
    original = _original_config(checkpoint, source)
    name = _select(original, "backbone", source, default="dit")
    if name not in BACKBONE_KINDS:
        raise ValueError(f"{source}: backbone={name} checkpoints are not supported; valid: {sorted(BACKBONE_KINDS)}.")
    parameterization = _select(original, "parameterization", source, default="subs")
    model = {"name": _select(original, "model.name", source, default="original")}
    for key in ("hidden_size", "cond_dim", "n_blocks", "n_heads", "dropout", "length"):
        model[key] = _select(original, f"model.{key}", source)
        if model[key] is None:
            raise ValueError(f"{source}: the checkpoint's config has no model.{key}.")
    weights = _backbone_tensors(checkpoint["state_dict"], source)
    kind = BACKBONE_KINDS[name]
    if weights_kind(weights) != kind:
        raise ValueError(f"{source}: the config says backbone={name} but the weights are an {weights_kind(weights)}.")
    config = {
        "model": model,
        "backbone": backbone_config(kind, model),
        "parameterization": parameterization,
        "time_conditioning": bool(_select(original, "time_conditioning", source, default=False)),
        "subs_masking": bool(_select(original, "subs_masking", source, default=False)),
    }
    noise = _original_noise(original, parameterization, source)
    if noise is not None:
        config["noise"] = noise
    return LoadedCheckpoint(weights, _ema_state(checkpoint), config, "original", source)


# --------------------------------------------------------------------------- Hugging Face format
def _hub_snapshot(repo_id: str, trust_remote_code: bool) -> Path:
    """Download (or find in the cache when offline) the config and weights of hub repo ``repo_id``."""
    from dataloader import hub_failure_reason, hub_local_only  # lightning comes with it: only when needed

    offline = hub_local_only()
    patterns = ["config.json", "model*.safetensors", "model.safetensors.index.json"]
    if trust_remote_code:
        patterns.append("*.py")
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
        if not any(folder.glob("model*.safetensors")):  # an older repo with only a .bin file
            folder = Path(snapshot_download(repo_id, allow_patterns=[*patterns, "pytorch_model.bin"],
                                            local_files_only=offline))
        return folder
    except (OSError, ValueError, HfHubHTTPError) as error:
        reason = hub_failure_reason(offline, "the hub has no such repo")
        raise FileNotFoundError(
            f"eval.checkpoint_path={repo_id} does not exist as a local path, {reason}, and it is not in the "
            "local Hugging Face cache. Download it where the hub is reachable (e.g. "
            f"`hf download {repo_id} --local-dir mdlm-owt`) and pass the directory, or set HF_HUB_OFFLINE=1 "
            "with a warm cache."
        ) from error


def _read_hf_weights(folder: Path, source: str) -> dict[str, Tensor]:
    """The state dict of a Hugging Face directory: safetensors (single or sharded), else a weights-only .bin."""
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    if (folder / "model.safetensors.index.json").is_file():
        shards = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()
        return {k: v for shard in sorted(set(shards)) for k, v in load_file(folder / shard).items()}
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{source} has a config.json but none of the weight files {list(HF_WEIGHTS)}.")


def _remote_code_model(folder: Path, raw: dict[str, Any], source: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Weights and config as the repo's own code builds them (``trust_remote_code=True``).

    The class is taken from ``auto_map`` directly: through ``AutoModelForMaskedLM``, the ``mdlm``
    model type that :mod:`models.hf` registers would take precedence over the repo's code.
    """
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    reference = raw.get("auto_map", {}).get("AutoModelForMaskedLM")
    if reference is None:
        raise ValueError(f"{source}: trust_remote_code asks for the repo's code, but its config.json has no "
                         "auto_map.AutoModelForMaskedLM; leave eval.trust_remote_code out.")
    try:
        model = get_class_from_dynamic_module(reference, str(folder)).from_pretrained(str(folder))
    except (ImportError, OSError, ValueError) as error:
        raise ValueError(f"{source}: loading with the repo's remote code failed ({error}); without "
                         "eval.trust_remote_code the weights are mapped into our DiT directly.") from error
    return {k: v.detach() for k, v in model.state_dict().items()}, model.config.to_dict()


def _hf_weights(state_dict: dict[str, Tensor], head_dim: int) -> dict[str, Tensor]:
    """Released names under ``backbone.``; the rotary table, a buffer, is added if a file lacks it."""
    if not any(k.startswith("backbone.") for k in state_dict):
        state_dict = {f"backbone.{k}": v for k, v in state_dict.items()}
    state_dict.setdefault("backbone.rotary_emb.inv_freq", Rotary(head_dim).inv_freq)
    return state_dict


def _architecture_from_hf(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """Our config keys from an ``MDLMConfig`` (fields the file lacks take the released model's values)."""
    hf = MDLMConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    model = {"name": name, "hidden_size": hf.hidden_dim, "cond_dim": hf.cond_dim, "n_blocks": hf.n_blocks,
             "n_heads": hf.n_heads, "dropout": hf.dropout, "length": hf.model_length}
    config = {"model": model, "backbone": backbone_config("dit", model),
              "time_conditioning": bool(hf.time_conditioning)}
    for key in ("parameterization", "noise", "subs_masking"):
        if getattr(hf, key) is not None:
            config[key] = getattr(hf, key)
    return config


def _load_hf_directory(folder: Path, source: str, trust_remote_code: bool) -> LoadedCheckpoint:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"eval.checkpoint_path={source} is a directory without config.json. Accepted: {ACCEPTED_FORMATS}."
        )
    raw = json.loads(config_file.read_text())
    if raw.get("model_type") != MODEL_TYPE:
        raise ValueError(f"eval.checkpoint_path={source}: config.json has model_type={raw.get('model_type')!r}, "
                         f"not {MODEL_TYPE!r}. Accepted: {ACCEPTED_FORMATS}.")
    if trust_remote_code:
        state_dict, raw = _remote_code_model(folder, raw, source)
    else:
        state_dict = _read_hf_weights(folder, source)
    config = _architecture_from_hf(raw, Path(source.rstrip("/")).name)
    head_dim = config["model"]["hidden_size"] // config["model"]["n_heads"]
    return LoadedCheckpoint(_hf_weights(state_dict, head_dim), None, config, "hf", source)


# --------------------------------------------------------------------------- export
def hf_config(loaded: LoadedCheckpoint) -> MDLMConfig:
    """The :class:`models.hf.MDLMConfig` of a DiT checkpoint."""
    backbone = loaded.config.get("backbone", {})
    if loaded.backbone_kind != "dit" or backbone.get("causal") or backbone.get("mlp_ratio", 4) != 4:
        raise ValueError(
            f"{loaded.source} holds {loaded.backbone_kind} weights; the Hugging Face MDLM format holds the "
            "bidirectional DiT only (MDLM, SEDD, D3PM checkpoints), not the AR transformer."
        )
    model, config = loaded.config["model"], loaded.config
    return MDLMConfig(
        vocab_size=loaded.vocab_size, model_length=model["length"], hidden_dim=model["hidden_size"],
        cond_dim=model["cond_dim"], n_blocks=model["n_blocks"], n_heads=model["n_heads"], dropout=model["dropout"],
        time_conditioning=bool(config.get("time_conditioning", False)), parameterization=config.get("parameterization"),
        noise=config.get("noise"), subs_masking=config.get("subs_masking"),
    )


def export_hf(loaded: LoadedCheckpoint, out_dir: str | Path, *, use_ema: bool = True) -> MDLMForMaskedLM:
    """Write ``loaded`` as ``config.json`` + ``model.safetensors`` in ``out_dir``; returns the model.

    With ``use_ema`` (and an EMA in the checkpoint) the EMA weights are exported, as released.
    """
    model = MDLMForMaskedLM(hf_config(loaded))
    names = [f"backbone.{n}" for n, p in model.backbone.named_parameters() if p.requires_grad]
    weights = loaded.weights(names if use_ema else None)
    model.backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in weights.items()}, strict=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model.eval()


def save_as_ours(loaded: LoadedCheckpoint, path: str | Path) -> None:
    """Write ``loaded`` as a checkpoint of this code (``state_dict``, ``config``, ``ema``) for evaluation."""
    checkpoint: dict[str, Any] = {"state_dict": loaded.state_dict, "config": loaded.config}
    if loaded.ema is not None:
        checkpoint["ema"] = loaded.ema
    torch.save(checkpoint, path)
