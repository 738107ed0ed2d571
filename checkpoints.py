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
  ``trust_remote_code=True``. The released BD3-LM (``kuleshov-group/bd3lm-owt-block_size{4,8,16}``,
  model_type ``"bd3lm"``) has the same weight names plus two scalar buffers, the clipped interval
  of training times, which are not DiT weights: they become the ``bd3lm`` algorithm's
  ``clip_min`` / ``clip_max``, and the file's ``block_size`` its block size. That network is our
  DiT run on ``x_t ⊕ x_0`` under the block diffusion mask, adaLN fed sigma = 0
  (:func:`block_diffusion.two_stream_logits`).

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
from collections.abc import Callable, Sequence
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
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import load_file
from torch import Tensor

import hub
import registry
from config_aliases import ALGORITHM_OF_PARAMETERIZATION
from models.dit import Rotary
from models.hf import BD3LM_MODEL_TYPE, MODEL_TYPE, BD3LMConfig, MDLMConfig, MDLMForMaskedLM

CheckpointFormat = Literal["ours", "original", "hf"]
ACCEPTED_FORMATS = (
    "a Lightning checkpoint (.ckpt) written by this code; "
    "a Lightning checkpoint of the original MDLM code (the released mdlm.ckpt, ar.ckpt, sedd.ckpt); "
    "a Hugging Face directory or hub repo in the kuleshov-group/mdlm-owt format "
    "(config.json with model_type 'mdlm' + model.safetensors) with backbone=hf_dit, "
    "or in the kuleshov-group/bd3lm-owt-block_size{4,8,16} format (model_type 'bd3lm')"
)
# Config keys that define the network and what its loss means; evaluation takes them from the
# checkpoint (:func:`adopt_checkpoint`). ``algorithm`` holds every option of the algorithm.
ARCHITECTURE_KEYS = ("model", "backbone", "noise", "algorithm")
# The original's flat keys from which checkpoints without an ``algorithm`` entry (the original's,
# Hugging Face exports, ours before the algorithm group) record their algorithm.
LEGACY_ALGORITHM_KEYS = ("parameterization", "T", "time_conditioning", "subs_masking", "training")
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
# The released BD3-LM's top-level buffers: the clipped interval of training times (beta, omega) that
# training's variance search chose, not DiT weights. Named as our training.sampling_eps_min / max,
# which configs/algorithm/bd3lm.yaml reads as clip_min / clip_max.
BD3LM_CLIP_BUFFERS = ("sampling_eps_min", "sampling_eps_max")
# What the released BD3-LM was trained and sampled with that its config.json does not record (the
# original's configs/config.yaml and sampling scripts), under our keys; its noise is configs/noise/<name>.yaml.
BD3LM_RELEASED = {"training": {"sampling_eps": 1e-3, "antithetic_sampling": True}, "sampling": {"kv_cache": True}}
BD3LM_NOISE = "loglinear"
# The attention kernels its config.json may name: the same attention, computed either way.
BD3LM_ATTENTION_BACKENDS = ("sdpa", "flex")


@dataclass
class LoadedCheckpoint:
    """A checkpoint in our layout, whatever format it came in.

    Attributes:
        state_dict: backbone weights under ``backbone.`` names (as :class:`diffusion.Diffusion` has them).
        ema: the EMA state ``{"decay", "num_updates", "shadow_params"}`` (shadows in the order of the
            backbone's trainable parameters), or None.
        config: the architecture in our config layout, a subset of :data:`ARCHITECTURE_KEYS` (plus
            ``tokenizer``, the training data's ``tokenizer_name_or_path``, where recorded), or for
            checkpoints written before the algorithm group, of the original's flat keys
            (:data:`LEGACY_ALGORITHM_KEYS`); a key the checkpoint does not record (e.g. the released
            HF model's parameterization) is absent.
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
        return backbone_kind(self.config.get("backbone", {}).get("_target_", "")) or weights_kind(self.state_dict)

    @property
    def parameterization(self) -> str | None:
        """The original's name of the algorithm (subs / d3pm / sedd / ar), if the checkpoint records it."""
        algorithm = self.config.get("algorithm")
        if isinstance(algorithm, dict) and "_target_" in algorithm:
            return get_class(algorithm["_target_"]).parameterization
        return self.config.get("parameterization")

    @property
    def causal(self) -> bool:
        """Whether the weights are of a causal (next-token) backbone."""
        target = self.config.get("backbone", {}).get("_target_") or BACKBONE_TARGETS[weights_kind(self.state_dict)]
        return bool(getattr(get_class(target), "causal", False))

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


def backbone_kind(target: str) -> str:
    """``"dit"`` or ``"ar"`` for a backbone config's ``_target_``, else the class name in lower case ("" for "")."""
    kinds = {t: k for k, t in BACKBONE_TARGETS.items()}
    return kinds.get(target, target.rpartition(".")[2].lower())


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


def legacy_algorithm(cfg: DictConfig, saved: dict[str, Any]) -> dict[str, Any]:
    """The ``algorithm`` entry of a checkpoint that records the original's flat keys.

    The algorithm's YAML (``configs/algorithm/<name>.yaml``, whose values read the original's
    key names: ``${T}``, ``${training.sampling_eps}`` ...) is resolved against the checkpoint's keys,
    and against ``cfg`` for what the checkpoint does not record. The parameterization defaults
    to the one ``cfg`` chose (the released HF model records none).
    """
    parameterization = saved.get("parameterization") or get_class(cfg.algorithm._target_).parameterization
    if parameterization not in ALGORITHM_OF_PARAMETERIZATION:
        raise ValueError(f"The checkpoint's parameterization={parameterization!r} is not one of "
                         f"{sorted(ALGORITHM_OF_PARAMETERIZATION)}.")
    recorded = {k: saved[k] for k in (*LEGACY_ALGORITHM_KEYS, "noise") if k in saved and k != "parameterization"}
    base = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("algorithm", "sampler", "noise")])
    base = OmegaConf.merge(base, recorded)  # training: key by key over cfg's; noise: the checkpoint's, whole
    if "noise" not in recorded:
        base.noise = cfg.noise
    base.algorithm = registry.load("algorithm", ALGORITHM_OF_PARAMETERIZATION[parameterization])
    return OmegaConf.to_container(base.algorithm, resolve=True)


def adopt_checkpoint(cfg: DictConfig, loaded: LoadedCheckpoint, given: dict[str, str],
                     given_backbone: str | None = None, allow_longer: bool = False) -> list[str]:
    """Set ``cfg``'s architecture and algorithm to the checkpoint's; returns notes to print.

    Everything that changes what the network computes or what the loss means travels with the
    checkpoint: model, backbone, noise schedule and every option of the algorithm (time
    conditioning, change of variables, T, sampling_eps ...). ``model.length`` given on the command
    line is kept. An algorithm option given on the command line is kept when the algorithm allows
    changing it at evaluation (e.g. an eval-time ``T`` sweep), and is an error when it is one of
    the algorithm's ``model_options`` and contradicts the checkpoint.

    Args:
        cfg: the composed run config (changed in place).
        loaded: the checkpoint.
        given: ``{key: value}`` given on the command line (after :func:`config_aliases.translate`).
        given_backbone: the ``backbone=`` config name given on the command line, or None.
        allow_longer: accept a ``model.length`` above the length the checkpoint was trained at
            (``eval.allow_longer``); without it that is an error.

    Raises:
        ValueError: the command line names another algorithm or backbone than the checkpoint's,
            contradicts one of its model options, or the algorithm cannot use its weights.
    """
    source = loaded.source
    if given_backbone is not None and BACKBONE_KINDS.get(given_backbone, given_backbone) != loaded.backbone_kind:
        raise ValueError(
            f"eval.checkpoint_path={source} holds {loaded.backbone_kind} weights but the command line says "
            f"backbone={given_backbone}: leave backbone= out (the checkpoint's is used)."
        )
    saved = loaded.config
    algorithm = saved.get("algorithm") if "algorithm" in saved else legacy_algorithm(cfg, saved)
    saved_cls, composed_cls = get_class(algorithm["_target_"]), get_class(cfg.algorithm._target_)
    notes: list[str] = []
    if "algorithm" in given and saved_cls is not composed_cls:
        raise ValueError(
            f"eval.checkpoint_path={source} was trained with algorithm={saved_cls.name} (parameterization="
            f"{saved_cls.parameterization}) but the command line says algorithm={composed_cls.name}: leave it out, "
            f"or pass algorithm={saved_cls.name}."
        )
    for key, knob in registry.option_paths("algorithm", saved_cls.name).items():
        if key not in algorithm:
            continue
        if knob in given:
            name, value = knob, OmegaConf.select(cfg, knob)
        elif f"algorithm.{key}" in given and saved_cls is composed_cls:
            name, value = f"algorithm.{key}", cfg.algorithm[key]
        else:
            continue
        if algorithm[key] == value:
            continue
        if key in saved_cls.model_options:
            raise ValueError(
                f"eval.checkpoint_path={source} was trained with {name}={algorithm[key]} but the command line "
                f"says {name}={value}: it changes what the network computes; leave it out."
            )
        notes.append(f"Note: {name}={value} from the command line replaces the checkpoint's {algorithm[key]}.")
        algorithm = {**algorithm, key: value}
    if saved_cls.causal != loaded.causal:
        needs = "algorithm=ar (parameterization=ar) with backbone=ar" if loaded.causal else "a diffusion algorithm"
        raise ValueError(f"eval.checkpoint_path={source} holds {loaded.backbone_kind} weights, which "
                         f"algorithm={saved_cls.name} cannot use: they need {needs}.")
    tokenizer = saved.get("tokenizer")
    if tokenizer and "tokenizer_name_or_path" in cfg.data and "data.tokenizer_name_or_path" not in given:
        if cfg.data.tokenizer_name_or_path != tokenizer:
            notes.append(f"Note: data.tokenizer_name_or_path={tokenizer}, the tokenizer the checkpoint was trained "
                         "with (give data.tokenizer_name_or_path to choose another).")
            with open_dict(cfg):
                cfg.data.tokenizer_name_or_path = tokenizer
    length, trained = cfg.model.length, saved.get("model", {}).get("length")
    if "model.length" in given and trained is not None and length > trained:
        if not allow_longer:
            raise ValueError(
                f"model.length={length} is longer than the {trained} tokens eval.checkpoint_path={source} was trained "
                "on; the model was never trained on such positions. To sample longer, use semi-autoregressive "
                f"windows (sampling.semi_ar=true sampling.stride_length=S sampling.num_strides=K keep model.length="
                f"{trained}); to go ahead anyway, add eval.allow_longer=true."
            )
        notes.append(f"Note: model.length={length} is longer than the trained {trained} (eval.allow_longer=true).")
    with open_dict(cfg):
        for key in ("model", "backbone", "noise"):
            if key in saved:
                cfg[key] = saved[key]
        cfg.algorithm = algorithm
        if "model.length" in given:
            cfg.model.length = length
    return notes


def load_backbone_weights(backbone: torch.nn.Module, loaded: LoadedCheckpoint, use_ema: bool) -> None:
    """Load the checkpoint's backbone weights (the EMA's when ``use_ema`` and it has one) into ``backbone``."""
    names = [f"backbone.{n}" for n, p in backbone.named_parameters() if p.requires_grad] if use_ema else None
    weights = {k.removeprefix("backbone."): v for k, v in loaded.weights(names).items()}
    try:
        backbone.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        message = f"The weights in {loaded.source} do not fit the model built from its config: {error}"
        raise ValueError(message) from error


def check_vocabulary(loaded: LoadedCheckpoint, vocab_size: int, data_name: str) -> None:
    """Refuse a data set whose tokenizer has another vocabulary size than the checkpoint's embedding."""
    if loaded.vocab_size is not None and loaded.vocab_size != vocab_size:
        raise ValueError(
            f"The checkpoint's vocabulary has {loaded.vocab_size} entries but data={data_name} gives {vocab_size}: "
            "evaluate with the data/tokenizer the model was trained on."
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


def safe_torch_load(path: Path, for_evaluation: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` that also reads the original's Lightning checkpoints.

    OmegaConf classes are allow-listed; any other non-tensor global (the pickled tokenizer in
    the original's ``hyper_parameters``) loads as an inert :class:`Unpickled`. A file that cannot be
    read is a ValueError saying why (not written by torch.save, truncated, unsafe); with
    ``for_evaluation`` it names ``eval.checkpoint_path`` and the accepted formats.
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
        if is_zip:
            reason = f"it could not be read safely: {detail}"
        elif _starts_like_a_zip(path):
            reason = "it is truncated (a torch.save zip archive whose end is missing: an interrupted copy or write)"
        else:
            reason = "it is not a file written by torch.save"
        if not for_evaluation:
            raise ValueError(f"{path}: {reason}.") from error
        raise ValueError(f"eval.checkpoint_path={path}: {reason}. Accepted: {ACCEPTED_FORMATS}.") from error


def _starts_like_a_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def check_resumable(path: Path, state_dict: dict[str, Tensor], ema_shapes: Sequence[torch.Size] | None) -> None:
    """Raise a ValueError saying why training cannot resume from ``path`` (read as evaluation reads it).

    Args:
        path: the checkpoint.
        state_dict: the state dict of the module being trained (its names and shapes must match).
        ema_shapes: the shapes of the module's EMA parameters, or None without an EMA.
    """
    checkpoint = safe_torch_load(path, for_evaluation=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "config" not in checkpoint:
        raise ValueError(f"{path} is not a training checkpoint of this code (no state_dict and config).")
    saved = checkpoint["state_dict"]
    problems = [f"{k}: missing" for k in state_dict if k not in saved]
    problems += [f"{k}: not in this model" for k in saved if k not in state_dict]
    problems += [f"{k}: shape {tuple(saved[k].shape)} in the checkpoint, {tuple(v.shape)} in this model"
                 for k, v in state_dict.items() if k in saved and isinstance(v, Tensor)  # not a module's extra state
                 and tuple(saved[k].shape) != tuple(v.shape)]
    ema = checkpoint.get("ema")
    if ema_shapes is not None and isinstance(ema, dict) and ema.get("shadow_params") is not None:
        shadows = ema["shadow_params"]
        if [tuple(t.shape) for t in shadows] != [tuple(s) for s in ema_shapes]:
            problems.append(f"ema: {len(shadows)} tensors of other shapes than this model's {len(ema_shapes)}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{path} was written by another model: {'; '.join(problems[:3])}{more}.")


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
    keys = ARCHITECTURE_KEYS if "algorithm" in saved else (*ARCHITECTURE_KEYS, *LEGACY_ALGORITHM_KEYS)
    config = {key: saved[key] for key in keys if key in saved}
    tokenizer = (saved.get("data") or {}).get("tokenizer_name_or_path")
    if tokenizer:
        config["tokenizer"] = tokenizer  # the tokenizer it was trained with, for evaluating other text
    weights = _backbone_tensors(checkpoint["state_dict"], source)
    return LoadedCheckpoint(weights, _ema_state(checkpoint), config, "ours", source)


# --------------------------------------------------------------------------- the original's checkpoints
# The original's training options that change what the loss means or what the network is fed.
ORIGINAL_TRAINING_KEYS = ("sampling_eps", "antithetic_sampling", "importance_sampling", "change_of_variables")


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
    """Our noise config for the original's ``noise`` entry; None for an algorithm that takes no schedule."""
    noise_type = _select(config, "noise.type", source)
    algorithm = registry.target_class("algorithm", ALGORITHM_OF_PARAMETERIZATION.get(parameterization, "mdlm"))
    if noise_type not in ORIGINAL_NOISE and "noise" not in inspect.signature(algorithm).parameters:
        return None  # e.g. the AR model, whose config's noise entry means nothing
    if noise_type not in ORIGINAL_NOISE:
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
        "T": int(_select(original, "T", source, default=0)),
    }
    training = _select(original, "training", source, default=None)
    if isinstance(training, dict):
        config["training"] = {k: training[k] for k in ORIGINAL_TRAINING_KEYS if k in training}
    noise = _original_noise(original, parameterization, source)
    if noise is not None:
        config["noise"] = noise
    return LoadedCheckpoint(weights, _ema_state(checkpoint), config, "original", source)


# --------------------------------------------------------------------------- Hugging Face format
def _hub_snapshot(repo_id: str, trust_remote_code: bool) -> Path:
    """Download (or find in the cache when offline) the config and weights of hub repo ``repo_id``."""
    offline = hub.hub_local_only()
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
        reason = hub.hub_failure_reason(offline, "the hub has no such repo")
        raise FileNotFoundError(
            f"eval.checkpoint_path={repo_id} does not exist as a local path, {reason}, and it is not in the "
            "local Hugging Face cache. Download it where the hub is reachable (e.g. "
            f"`hf download {repo_id} --local-dir {repo_id.rpartition('/')[2]}`) and pass the directory, or set "
            "HF_HUB_OFFLINE=1 with a warm cache."
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
    except (ImportError, OSError, ValueError, AttributeError, TypeError) as error:  # e.g. code for another transformers
        raise ValueError(f"{source}: loading with the repo's remote code failed ({error}); without "
                         "eval.trust_remote_code the weights are mapped into our DiT directly.") from error
    return {k: v.detach() for k, v in model.state_dict().items()}, model.config.to_dict()


def _hf_weights(state_dict: dict[str, Tensor], head_dim: int) -> dict[str, Tensor]:
    """Released names under ``backbone.``; the rotary table, a buffer, is added if a file lacks it.

    BD3-LM's clip buffers are dropped (its algorithm records them: :func:`_architecture_from_bd3lm`).
    """
    state_dict = {k: v for k, v in state_dict.items() if k not in BD3LM_CLIP_BUFFERS}
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
    algorithm = getattr(hf, "algorithm", None)
    if isinstance(algorithm, dict) and "_target_" in algorithm:
        config["algorithm"] = algorithm  # every option of the algorithm, as our exports record it
    elif isinstance(algorithm, dict):
        config.update(algorithm)  # the original's flat keys (T, training) of an exported original checkpoint
    return config


def _check_bd3lm(hf: BD3LMConfig, source: str) -> None:
    """Refuse a BD3-LM config.json that describes another network than our DiT on ``x_t ⊕ x_0``."""
    where = f"eval.checkpoint_path={source}: config.json"
    if hf.block_size is None:
        raise ValueError(f"{where} has no block_size (model_type 'bd3lm' needs it; the released files have it).")
    if not hf.cross_attn:
        raise ValueError(f"{where} has cross_attn=false: the network reads x_t alone, not x_t ⊕ x_0 under the "
                         "block diffusion mask. Only BD3-LM checkpoints with cross_attn=true are supported.")
    if not hf.adaln:
        raise ValueError(f"{where} has adaln=false: the network has no adaLN modulation, which our DiT always "
                         "has. Only BD3-LM checkpoints with adaln=true (the released ones) are supported.")
    if hf.causal:
        raise ValueError(f"{where} has causal=true: causal attention in place of the block diffusion mask is "
                         "not supported.")
    if hf.time_conditioning:
        raise ValueError(f"{where} has time_conditioning=true: algorithm=bd3lm gives each block its own noise "
                         "level and feeds the network sigma = 0, so it cannot use a time-conditioned network.")
    if hf.attn_backend not in BD3LM_ATTENTION_BACKENDS:
        raise ValueError(f"{where} has attn_backend={hf.attn_backend!r}, not one of {list(BD3LM_ATTENTION_BACKENDS)}.")


def _architecture_from_bd3lm(raw: dict[str, Any], state_dict: dict[str, Tensor], name: str,
                             source: str) -> dict[str, Any]:
    """Our config keys from a ``BD3LMConfig``: the DiT's sizes and the whole ``bd3lm`` algorithm node.

    The node is ``configs/algorithm/bd3lm.yaml`` resolved, as our checkpoints record it, against
    our root config overlaid with the file's block size and length, the clipped interval its
    buffers hold (without them, its config's), and :data:`BD3LM_RELEASED`.
    """
    hf = BD3LMConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    _check_bd3lm(hf, source)
    model = {"name": name, "hidden_size": hf.hidden_dim, "cond_dim": hf.cond_dim, "n_blocks": hf.n_blocks,
             "n_heads": hf.n_heads, "dropout": hf.dropout, "length": hf.model_length}
    clip = {buffer: float(state_dict[buffer]) if buffer in state_dict else float(getattr(hf, buffer))
            for buffer in BD3LM_CLIP_BUFFERS}
    root = OmegaConf.load(registry.CONFIGS / "config.yaml")
    base = OmegaConf.merge(OmegaConf.masked_copy(root, [k for k in root if k != "defaults"]), {
        "model": model, "block_size": hf.block_size, "time_conditioning": False,
        "training": {**BD3LM_RELEASED["training"], **clip}, "sampling": BD3LM_RELEASED["sampling"],
        "noise": registry.load("noise", BD3LM_NOISE),
    })
    base.algorithm = registry.load("algorithm", "bd3lm")
    algorithm = OmegaConf.to_container(base.algorithm, resolve=True)
    return {"model": model, "backbone": backbone_config("dit", model), "noise": algorithm["noise"],
            "algorithm": algorithm}


# config.json's model_type -> our config keys from (config.json, the weights, the checkpoint's name, source).
HF_ARCHITECTURES: dict[str, Callable[[dict[str, Any], dict[str, Tensor], str, str], dict[str, Any]]] = {
    MODEL_TYPE: lambda raw, state_dict, name, source: _architecture_from_hf(raw, name),
    BD3LM_MODEL_TYPE: _architecture_from_bd3lm,
}


def _load_hf_directory(folder: Path, source: str, trust_remote_code: bool) -> LoadedCheckpoint:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"eval.checkpoint_path={source} is a directory without config.json. Accepted: {ACCEPTED_FORMATS}."
        )
    raw = json.loads(config_file.read_text())
    architecture = HF_ARCHITECTURES.get(raw.get("model_type"))
    if architecture is None:
        raise ValueError(f"eval.checkpoint_path={source}: config.json has model_type={raw.get('model_type')!r}, "
                         f"not one of {sorted(HF_ARCHITECTURES)}. Accepted: {ACCEPTED_FORMATS}.")
    if trust_remote_code:
        state_dict, raw = _remote_code_model(folder, raw, source)
    else:
        state_dict = _read_hf_weights(folder, source)
    config = architecture(raw, state_dict, Path(source.rstrip("/")).name, source)
    head_dim = config["model"]["hidden_size"] // config["model"]["n_heads"]
    return LoadedCheckpoint(_hf_weights(state_dict, head_dim), None, config, "hf", source)


# --------------------------------------------------------------------------- export
def hf_config(loaded: LoadedCheckpoint) -> MDLMConfig:
    """The :class:`models.hf.MDLMConfig` of a DiT checkpoint."""
    backbone = loaded.config.get("backbone", {})
    if loaded.backbone_kind != "dit" or loaded.causal or backbone.get("mlp_ratio", 4) != 4:
        raise ValueError(
            f"{loaded.source} holds {loaded.backbone_kind} weights; the Hugging Face MDLM format holds the "
            "bidirectional DiT only (MDLM, SEDD, D3PM checkpoints), not the AR transformer."
        )
    model, config = loaded.config["model"], loaded.config
    algorithm = config.get("algorithm")
    flat = algorithm if isinstance(algorithm, dict) else config
    if not isinstance(algorithm, dict):  # a checkpoint with the original's flat keys: keep the ones MDLMConfig lacks
        algorithm = {k: config[k] for k in ("T", "training") if k in config} or None
    return MDLMConfig(
        vocab_size=loaded.vocab_size, model_length=model["length"], hidden_dim=model["hidden_size"],
        cond_dim=model["cond_dim"], n_blocks=model["n_blocks"], n_heads=model["n_heads"], dropout=model["dropout"],
        time_conditioning=bool(flat.get("time_conditioning", False)), parameterization=loaded.parameterization,
        noise=config.get("noise"), subs_masking=flat.get("subs_masking"), algorithm=algorithm,
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
