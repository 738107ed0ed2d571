"""Shared test helpers: the repo root on sys.path and the optional offline data folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real tokenizers and corpora); skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found: real-data tests need the shared data folder")
    return SHARED_DATA


def diffusion_samplers() -> dict[str, type]:
    """The diffusion samplers of configs/sampler/ by name (the config directory is the registry)."""
    import registry
    from samplers import DiffusionSampler

    classes = {name: registry.target_class("sampler", name) for name in registry.options("sampler")}
    return {name: cls for name, cls in classes.items() if issubclass(cls, DiffusionSampler)}


def build_sampler(name: str, **kwargs: object) -> object:
    """The diffusion sampler ``configs/sampler/<name>.yaml`` names, built with ``kwargs``."""
    return diffusion_samplers()[name](**kwargs)
