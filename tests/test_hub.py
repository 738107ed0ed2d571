"""hub.py: the offline flags, the reachability probe, the failure reason; importing it does nothing."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

import hub

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No offline flag set, neither in the environment nor as huggingface_hub read it at import."""
    for variable in FLAGS:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return monkeypatch


def test_no_flag_means_online(online: pytest.MonkeyPatch) -> None:
    assert not hub.hub_offline() and not hub.datasets_offline()


@pytest.mark.parametrize("value", ["1", "on", "YES", "true"])
def test_hub_flag_set_after_import_counts_for_models_and_data(online: pytest.MonkeyPatch, value: str) -> None:
    online.setenv("HF_HUB_OFFLINE", value)
    assert hub.hub_offline() and hub.datasets_offline()


def test_transformers_offline_is_the_older_name_unless_hf_hub_offline_says_otherwise(
    online: pytest.MonkeyPatch,
) -> None:
    online.setenv("TRANSFORMERS_OFFLINE", "1")
    assert hub.hub_offline()
    online.setenv("HF_HUB_OFFLINE", "0")  # as in huggingface_hub: HF_HUB_OFFLINE, when set, wins
    assert not hub.hub_offline()


def test_datasets_flag_counts_for_data_only(online: pytest.MonkeyPatch) -> None:
    online.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub.datasets_offline() and not hub.hub_offline()
    online.setenv("HF_DATASETS_OFFLINE", "0")
    assert not hub.datasets_offline()


def test_flag_read_by_huggingface_hub_at_import_counts(online: pytest.MonkeyPatch) -> None:
    online.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.hub_offline() and hub.datasets_offline()


def test_local_only_probes_the_endpoint_only_when_not_offline(online: pytest.MonkeyPatch) -> None:
    probes: list[str] = []
    online.setattr(hub, "hub_reachable", lambda endpoint: probes.append(endpoint) or False)
    assert hub.hub_local_only() and probes == [constants.ENDPOINT]
    assert hub.hub_failure_reason(True, "missing") == "the Hugging Face hub is unreachable"
    assert hub.hub_failure_reason(False, "missing") == "missing"
    online.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_local_only() and probes == [constants.ENDPOINT]  # no second probe
    assert hub.hub_failure_reason(True, "missing") == "HF_HUB_OFFLINE is set"


def test_probe_sees_an_open_and_a_closed_port(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in hub.PROXY_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert hub.hub_reachable(f"http://127.0.0.1:{port}", timeout_s=2.0)
    start = time.monotonic()
    assert not hub.hub_reachable(f"http://127.0.0.1:{port}", timeout_s=2.0)  # closed now: refused
    assert time.monotonic() - start < 2.5


def test_a_proxy_skips_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: pytest.fail("probed behind a proxy"))
    assert hub.hub_reachable("https://huggingface.co")


def test_import_opens_no_connection_and_starts_no_thread() -> None:
    code = (
        "import socket, threading\n"
        "def refuse(*args, **kwargs): raise SystemExit('connection at import')\n"
        "socket.create_connection = refuse\n"
        "socket.socket.connect = refuse\n"
        "import huggingface_hub.constants\n"
        "before = threading.active_count()\n"
        "import hub\n"
        "assert threading.active_count() == before, 'thread started at import'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
