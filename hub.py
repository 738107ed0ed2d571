"""Hugging Face hub access: whether a load may use the network, and why a hub load failed.

One decision shared by every hub load in the project: tokenizers (:mod:`dataloader`), eval
models (:mod:`metrics`), hub checkpoints (:mod:`checkpoints`) and data sets (:mod:`corpora`).

- Offline by choice, :func:`hub_offline`: ``HF_HUB_OFFLINE`` (or its older name
  ``TRANSFORMERS_OFFLINE``, used only when ``HF_HUB_OFFLINE`` is unset or empty, as in
  ``huggingface_hub``) is true (``1`` / ``ON`` / ``YES`` / ``TRUE``), either as
  ``huggingface_hub`` read it at its import (``constants.HF_HUB_OFFLINE``) or in the
  environment now. :func:`datasets_offline` adds ``HF_DATASETS_OFFLINE`` for data set loads.
- Reachable, :func:`hub_reachable`: a TCP connection to the endpoint opens within
  :data:`HUB_PROBE_TIMEOUT_S` (3 s, DNS included; the probe runs in a daemon thread because
  DNS ignores socket timeouts). With ``HTTPS_PROXY`` / ``ALL_PROXY`` set there is no probe and
  the hub counts as reachable: a direct connection says nothing about the proxy. Unreachable
  means a fast failure, where ``huggingface_hub`` would retry for ~50 s.
- :func:`hub_local_only`: offline by choice or unreachable, so loads pass
  ``local_files_only=True`` and read the local cache only. :func:`hub_failure_reason` says
  which of the two (or the caller's ``missing``) when such a load fails.

Nothing is cached: every :func:`hub_reachable` / :func:`hub_local_only` call probes again
(at most :data:`HUB_PROBE_TIMEOUT_S`), and the flags are read at each call. Importing this
module reads no variable and opens no connection.
"""

from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

from huggingface_hub import constants

# Seconds to wait for a TCP connection to the hub before treating it as unreachable: offline,
# huggingface_hub otherwise retries for ~50 s before failing.
HUB_PROBE_TIMEOUT_S = 3.0

TRUE_VALUES = ("1", "ON", "YES", "TRUE")  # what huggingface_hub and datasets take as a true flag
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _flag(value: str | None) -> bool:
    return (value or "").upper() in TRUE_VALUES


def hub_offline() -> bool:
    """Whether the user asked for no hub access: ``HF_HUB_OFFLINE`` (else ``TRANSFORMERS_OFFLINE``) is true."""
    return constants.HF_HUB_OFFLINE or _flag(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))


def datasets_offline() -> bool:
    """Whether the user asked for no hub access for data sets: :func:`hub_offline` or ``HF_DATASETS_OFFLINE``."""
    return hub_offline() or _flag(os.environ.get("HF_DATASETS_OFFLINE"))


def hub_local_only() -> bool:
    """Whether hub loads may read the local cache only: :func:`hub_offline`, or the hub is unreachable."""
    return hub_offline() or not hub_reachable(constants.ENDPOINT)


def hub_failure_reason(local_only: bool, missing: str) -> str:
    """Why a hub load failed: offline by choice, the hub unreachable, or ``missing`` (it has no such thing)."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    return "the Hugging Face hub is unreachable" if local_only else missing


def hub_reachable(endpoint: str, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``endpoint`` opens within ``timeout_s`` (DNS included)."""
    if any(os.environ.get(var) for var in PROXY_VARIABLES):
        return True  # a direct connection says nothing about the proxy; let the hub client try
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []  # filled by the probe thread
    done = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)
        done.set()

    # A daemon thread, because DNS resolution ignores the socket timeout and may hang.
    threading.Thread(target=probe, daemon=True).start()
    return done.wait(timeout_s) and result[0]
