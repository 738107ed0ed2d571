"""Shared test helpers: the repo root on sys.path and the optional offline data folder."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny models (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    a second thread only adds synchronisation, and on a busy 2-core machine its spin-waiting makes each small op
    far slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
