"""The data of the local task synthetic_lambada.yaml: JSON lines next to this file, read without the hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

DATA = Path(__file__).resolve().parent / "synthetic_lambada.jsonl"


def load(**kwargs: Any) -> datasets.DatasetDict:
    """``{"test": the documents}``; lm-eval passes the task's metadata as keyword arguments (unused)."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})  # in memory: no cache files
