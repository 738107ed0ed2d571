"""Tokenize a split once, save it, and load it memory-mapped in seconds afterwards.

A cache entry is a folder ``<cache_dir>/tokenized/<corpus>-<split>-<digest>/`` with

- ``tokens.npy``: (T,) uint16 (vocabularies up to 65,536) or int32, every document's tokens
  one after the other (each followed by EOS when EOS insertion is on);
- ``offsets.npy``: (D + 1,) int64, document ``d`` is ``tokens[offsets[d]:offsets[d + 1]]``;
- ``meta.json``: the settings that produced it (the key), counts and build time.

The digest is the SHA-256 of the key: every setting that changes the tokens (corpus, split,
source, tokenizer, detokenizer, EOS insertion, text8 chunk size, this format's version). The
block size is not part of it: blocks are cut from the stream when items are read, so a new
``model.length`` reuses the entry. Entries are written to a temporary folder and renamed, under
a file lock, so concurrent processes (DDP ranks) build once and a crash never leaves half an
entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from filelock import FileLock
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

CACHE_FORMAT = 1  # bump when the on-disk layout or the tokenization procedure changes
ROWS_PER_PROCESS = 50_000  # automatic process count: one per this many documents (PTB's 42k: 1 is faster)
MAX_PROCESSES = 16
UINT16_MAX_VOCAB = 1 << 16


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mdlm/data`` (``~/.cache/mdlm/data`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mdlm" / "data"


@dataclass(frozen=True)
class TokenStream:
    """A cached split: ``tokens`` (T,) and document ``offsets`` (D + 1,), memory-mapped."""

    tokens: np.ndarray
    offsets: np.ndarray
    meta: dict[str, Any]
    path: Path

    @property
    def num_documents(self) -> int:
        return len(self.offsets) - 1


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of everything that decides token ids: the fast tokenizer's JSON, else the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items())) + type(tokenizer).__name__
    payload += json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def source_fingerprint(files: list[Path] | None, remote: str) -> str:
    """Identity of the raw data: each local file's path, size and mtime, or the remote source's name."""
    if files is None:
        return remote
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()


def cache_entry(cache_dir: Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **key}, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / "tokenized" / f"{key['corpus']}-{key['split']}-{digest[:16]}"


def load_or_build(
    cache_dir: Path,
    key: dict[str, Any],
    documents: Callable[[], datasets.Dataset],
    tokenizer: PreTrainedTokenizerBase,
    detokenizer: Callable[[str], str] | None,
    eos_id: int | None,
    num_proc: int | None,
) -> TokenStream:
    """The cached stream for ``key``; on a miss, ``documents()`` is tokenized and saved first.

    ``key`` must hold every setting that changes the result (see the module docstring) and
    ``"corpus"`` / ``"split"`` for the folder name. ``eos_id``: appended after every document
    (None: nothing appended). ``num_proc``: tokenization processes; None = one per
    ``ROWS_PER_PROCESS`` documents, at most the CPU count and ``MAX_PROCESSES``.
    """
    entry = cache_entry(cache_dir, key)
    if not (entry / "meta.json").exists():
        entry.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(entry) + ".lock"):
            if not (entry / "meta.json").exists():  # another process may have built it meanwhile
                _build(entry, key, documents(), tokenizer, detokenizer, eos_id, num_proc)
    return open_entry(entry)


def open_entry(entry: Path) -> TokenStream:
    meta = json.loads((entry / "meta.json").read_text())
    tokens = np.load(entry / "tokens.npy", mmap_mode="r")
    offsets = np.load(entry / "offsets.npy")
    return TokenStream(tokens=tokens, offsets=offsets, meta=meta, path=entry)


def _tokenize_batch(
    batch: dict[str, list[str]],
    tokenizer: PreTrainedTokenizerBase,
    detokenizer: Callable[[str], str] | None,
    eos_id: int | None,
) -> dict[str, list[list[int]]]:
    texts = batch["text"] if detokenizer is None else [detokenizer(text) for text in batch["text"]]
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    if eos_id is not None:
        ids = [doc + [eos_id] for doc in ids]
    return {"input_ids": ids}


def _build(
    entry: Path,
    key: dict[str, Any],
    documents: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    detokenizer: Callable[[str], str] | None,
    eos_id: int | None,
    num_proc: int | None,
) -> None:
    start = time.perf_counter()
    procs = num_proc or max(1, min(os.cpu_count() or 1, MAX_PROCESSES, len(documents) // ROWS_PER_PROCESS))
    print(f"Tokenizing {key['corpus']} {key['split']}: {len(documents):,} documents, {procs} process(es) -> {entry}")
    dtype = np.uint16 if len(tokenizer) + 1 <= UINT16_MAX_VOCAB else np.int32
    tokenized = documents.map(
        _tokenize_batch,
        batched=True,
        num_proc=procs if procs > 1 else None,
        remove_columns=documents.column_names,
        fn_kwargs={"tokenizer": tokenizer, "detokenizer": detokenizer, "eos_id": eos_id},
        features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))}),
        desc=f"Tokenizing {key['corpus']} {key['split']}",
    )
    column = tokenized.data.column("input_ids")  # pyarrow ChunkedArray of int32 lists
    lengths = np.concatenate([pc.list_value_length(c).to_numpy(zero_copy_only=False) for c in column.chunks]
                             or [np.zeros(0, np.int64)]).astype(np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokens = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=dtype, shape=(int(offsets[-1]),))
    position = 0
    with tqdm(total=int(offsets[-1]), desc=f"Writing {entry.name}", unit="tok", unit_scale=True, leave=False,
              disable=None) as bar:  # None: when stderr is a terminal (a log file gets the summary line below)
        for chunk in column.chunks:
            flat = pc.list_flatten(chunk).to_numpy(zero_copy_only=False)
            tokens[position : position + len(flat)] = flat
            position += len(flat)
            bar.update(len(flat))
    tokens.flush()
    del tokens
    np.save(tmp / "offsets.npy", offsets)
    seconds = time.perf_counter() - start
    meta = {"key": key, "format": CACHE_FORMAT, "num_documents": len(lengths), "num_tokens": int(offsets[-1]),
            "dtype": np.dtype(dtype).name, "build_seconds": round(seconds, 3)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, entry)
    for file in {f["filename"] for f in tokenized.cache_files} - {f["filename"] for f in documents.cache_files}:
        Path(file).unlink(missing_ok=True)  # the intermediate Arrow copy; our .npy stream replaces it
    print(f"  {int(offsets[-1]):,} tokens in {seconds:.1f} s ({offsets[-1] / max(seconds, 1e-9):,.0f} tokens/s)")
