"""The config directory is the registry: the options of a Hydra group are its YAML files.

Nothing here lists algorithms, samplers or data sets by name; each function reads
``configs/<group>/``, so adding a variant is one class and one YAML file.
"""

from __future__ import annotations

from pathlib import Path

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

CONFIGS = Path(__file__).resolve().parent / "configs"
CORPUS_TARGET = "dataloader.CorpusData"  # the data configs that eval.datasets can name


def options(group: str) -> list[str]:
    """The names a group offers (``configs/<group>/*.yaml``), sorted."""
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def load(group: str, name: str) -> DictConfig:
    """``configs/<group>/<name>.yaml`` without its defaults list (interpolations unresolved).

    Raises:
        ValueError: no such option; the message lists the valid ones.
    """
    path = CONFIGS / group / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"{group}={name} does not exist; valid choices: {options(group)}.")
    config = OmegaConf.load(path)
    return OmegaConf.masked_copy(config, [k for k in config if k != "defaults"])


def target_class(group: str, name: str) -> type:
    """The class ``configs/<group>/<name>.yaml`` instantiates."""
    return get_class(load(group, name)._target_)


def option_of_class(group: str, cls: type) -> str:
    """The name of the option of ``group`` whose ``_target_`` is ``cls``."""
    for name in options(group):
        if target_class(group, name) is cls:
            return name
    raise ValueError(f"{cls.__module__}.{cls.__qualname__} has no config in configs/{group}/.")


def option_paths(group: str, name: str) -> dict[str, str]:
    """``{key: path}`` for the keys of ``configs/<group>/<name>.yaml`` written as ``${path}``.

    The algorithm and sampler configs read the original's option names (``T: ${T}``,
    ``steps: ${sampling.steps}``); keys that read a whole group (``noise: ${noise}``) are left out.
    """
    raw = OmegaConf.to_container(load(group, name), resolve=False)
    paths = {k: v[2:-1] for k, v in raw.items() if isinstance(v, str) and v.startswith("${") and v.endswith("}")}
    return {k: path for k, path in paths.items() if not (CONFIGS / path).is_dir()}


def option_knobs(group: str, name: str | None = None) -> set[str]:
    """The config paths that ``configs/<group>/<name>.yaml`` (every option of the group if None) reads."""
    return {path for option in (options(group) if name is None else [name])
            for path in option_paths(group, option).values()}


def samplers_accepting(denoiser_kind: str) -> list[str]:
    """The sampler configs whose class accepts a denoiser of ``denoiser_kind``."""
    return [name for name in options("sampler") if target_class("sampler", name).accepts == denoiser_kind]


def corpus_names() -> list[str]:
    """The data set configs that name a corpus (what ``eval.datasets`` may list)."""
    return [name for name in options("data") if OmegaConf.load(CONFIGS / "data" / f"{name}.yaml").get("_target_")
            == CORPUS_TARGET]
