"""Data sets by config, tokenizers, block wrapping and sample decoding.

Two data classes, each the ``_target_`` of one file in ``configs/data/``:

- :class:`SyntheticData`, the built-in default: blocks ``[BOS] w_1 .. w_{L-2} [EOS]`` drawn
  from the Markov chain of :mod:`synthetic`, with the exact NLL of every block;
- :class:`TextFiles`: the user's own text files, tokenized with any Hugging Face tokenizer
  and wrapped into fixed-length blocks.

Both expose ``tokenizer``, ``has_true_nll``, ``train_dataset()`` and ``valid_dataset()``.
Dataset items are dicts ``{"input_ids": (L,) int64, "attention_mask": (L,) int64 ones}``
(plus ``"true_nll"``, a float64 scalar in nats, for the synthetic data), so the default
``collate_fn`` batches them into ``(B, L)`` tensors.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import numpy as np
import torch
from huggingface_hub import constants
from torch import Tensor
from torch.utils.data import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from synthetic import BOS_ID, EOS_ID, WORD_OFFSET, MarkovSource, build_tokenizer

# SyntheticData draws its splits from np.random.default_rng([seed, stream]); stream 0 is the
# chain itself (synthetic.SOURCE_STREAM), so the three never share random numbers.
TRAIN_STREAM = 1
VALID_STREAM = 2

# Seconds to wait for a TCP connection to the hub before treating it as unreachable: offline,
# huggingface_hub otherwise retries for ~50 s before failing.
HUB_PROBE_TIMEOUT_S = 3.0

MASK_TEXT = "[MASK]"  # how decode() renders a still-masked position

DocumentSeparator = Literal["blank_line", "line", "file"]
DOCUMENT_SPLITTERS: dict[str, Callable[[str], list[str]]] = {
    "blank_line": lambda text: re.split(r"\n[ \t\r]*\n", text),
    "line": str.splitlines,
    "file": lambda text: [text],
}


class BlockDataset(Dataset):
    """Fixed-length token blocks ``(N, L)``, optionally with the exact NLL of each block."""

    def __init__(self, blocks: Tensor, true_nll: Tensor | None = None) -> None:
        self.blocks = blocks  # (N, L) integer
        self.true_nll = true_nll  # (N,) float64 or None

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        input_ids = self.blocks[index].long()  # (L,)
        item = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if self.true_nll is not None:
            item["true_nll"] = self.true_nll[index]  # () float64
        return item


class SyntheticData:
    """Built-in default data: sequences ``[BOS] w_1 .. w_{L-2} [EOS]`` from ``MarkovSource``.

    ``seed`` builds the chain (``MarkovSource.from_seed(seed)``) and the two independent,
    deterministic sample streams: train from ``np.random.default_rng([seed, 1])``, valid
    from ``np.random.default_rng([seed, 2])``. Every process that builds the same config gets
    the same blocks. The splits are generated on first use (~1 s for 50k blocks of 128).
    """

    has_true_nll = True

    def __init__(
        self,
        block_size: int,
        num_train_sequences: int = 50_000,
        num_valid_sequences: int = 1_000,
        seed: int = 0,
        name: str = "synthetic",
    ) -> None:
        if block_size < 3:
            raise ValueError(f"block_size must be >= 3 ([BOS], one word, [EOS]); got {block_size}")
        self.name = name
        self.block_size = block_size
        self.num_train_sequences = num_train_sequences
        self.num_valid_sequences = num_valid_sequences
        self.seed = seed
        self.source = MarkovSource.from_seed(seed)
        self.tokenizer: PreTrainedTokenizerFast = build_tokenizer(self.source)
        self._datasets: dict[int, BlockDataset] = {}

    def train_dataset(self) -> BlockDataset:
        return self._dataset(self.num_train_sequences, TRAIN_STREAM)

    def valid_dataset(self) -> BlockDataset:
        return self._dataset(self.num_valid_sequences, VALID_STREAM)

    def _dataset(self, num_sequences: int, stream: int) -> BlockDataset:
        if stream not in self._datasets:
            rng = np.random.default_rng([self.seed, stream])
            words = self.source.sample(num_sequences, self.block_size - 2, rng)  # (N, L-2)
            true_nll = -self.source.log_prob(torch.from_numpy(words))  # (N,) float64
            blocks = np.empty((num_sequences, self.block_size), dtype=np.int32)  # (N, L)
            blocks[:, 0] = BOS_ID
            blocks[:, 1:-1] = words + WORD_OFFSET
            blocks[:, -1] = EOS_ID
            self._datasets[stream] = BlockDataset(torch.from_numpy(blocks), true_nll)
        return self._datasets[stream]

    def true_nll_of(self, token_ids: Tensor) -> Tensor:
        """Exact ``-log p`` in nats of each block; (N, L) token ids -> (N,) float64.

        ``[BOS]`` at position 0 and ``[EOS]`` at position L-1 are deterministic (cost 0), so
        ``-log p(block) = -log p(w_1 .. w_{L-2})`` under the chain. A block that is not
        well-formed (no BOS/EOS at the ends, a special token inside, or a transition the
        chain never makes) has probability zero: its NLL is ``inf``, never an error, so that
        generated samples can be scored and counted as invalid.
        """
        token_ids = torch.as_tensor(token_ids, dtype=torch.long)
        if token_ids.ndim != 2 or token_ids.shape[1] < 3:
            raise ValueError(f"expected (N, L) token ids with L >= 3; got {tuple(token_ids.shape)}")
        words = token_ids[:, 1:-1] - WORD_OFFSET  # (N, L-2)
        well_formed = (
            (token_ids[:, 0] == BOS_ID)
            & (token_ids[:, -1] == EOS_ID)
            & ((words >= 0) & (words < self.source.num_words)).all(dim=1)
        )  # (N,)
        nll = torch.full((token_ids.shape[0],), math.inf, dtype=torch.float64)
        nll[well_formed] = -self.source.log_prob(words[well_formed])
        return nll


class TextFiles:
    """The user's own text, wrapped into fixed-length blocks with BOS/EOS.

    ``train_path`` / ``valid_path``: a file, a list of files, or a folder (all ``*.txt``
    directly inside it, sorted by name); relative paths are relative to the current working
    directory. Files are split into documents by ``document_separator``: ``"blank_line"``
    (paragraphs separated by empty lines), ``"line"`` (one document per line) or ``"file"``.
    Documents are stripped; empty ones are dropped. If ``valid_path`` is None, the last
    ``max(1, floor(valid_fraction * num_documents))`` documents of the training text are the
    validation split. Tokenization and wrapping (:func:`wrap_documents`) happen on first use.
    """

    has_true_nll = False

    def __init__(
        self,
        train_path: str | list[str],
        tokenizer_name_or_path: str,
        block_size: int,
        valid_path: str | list[str] | None = None,
        valid_fraction: float = 0.05,
        document_separator: DocumentSeparator = "blank_line",
        name: str = "text_files",
    ) -> None:
        if document_separator not in DOCUMENT_SPLITTERS:
            raise ValueError(f"unknown document_separator {document_separator!r}; valid: {sorted(DOCUMENT_SPLITTERS)}")
        if valid_path is None and not 0.0 < valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in (0, 1); got {valid_fraction}")
        if block_size < 3:
            raise ValueError(f"block_size must be >= 3 (BOS, one token, EOS); got {block_size}")
        self.name = name
        self.block_size = block_size
        self.valid_fraction = valid_fraction
        self.document_separator = document_separator
        self.train_files = resolve_text_files(train_path)
        self.valid_files = None if valid_path is None else resolve_text_files(valid_path)
        self.tokenizer = load_tokenizer(tokenizer_name_or_path)
        self.bos_id, self.eos_id = block_special_ids(self.tokenizer)
        self._documents: dict[str, list[str]] | None = None
        self._datasets: dict[str, BlockDataset] = {}

    def train_dataset(self) -> BlockDataset:
        return self._dataset("train")

    def valid_dataset(self) -> BlockDataset:
        return self._dataset("valid")

    def documents(self) -> dict[str, list[str]]:
        """The documents of each split: ``{"train": [...], "valid": [...]}``."""
        if self._documents is None:
            train = self._read(self.train_files)
            if self.valid_files is not None:
                valid = self._read(self.valid_files)
            else:
                if len(train) < 2:
                    raise ValueError(
                        f"cannot split a validation set off {len(train)} document(s) in "
                        f"{_names(self.train_files)}; pass valid_path or choose another "
                        f"document_separator (now {self.document_separator!r})"
                    )
                num_valid = min(len(train) - 1, max(1, int(self.valid_fraction * len(train))))
                train, valid = train[:-num_valid], train[-num_valid:]
            self._documents = {"train": train, "valid": valid}
        return self._documents

    def _read(self, files: list[Path]) -> list[str]:
        split = DOCUMENT_SPLITTERS[self.document_separator]
        documents = []
        for file in files:
            text = file.read_text(encoding="utf-8")
            documents.extend(doc.strip() for doc in split(text) if doc.strip())
        return documents

    def _dataset(self, split: str) -> BlockDataset:
        if split not in self._datasets:
            documents = self.documents()[split]
            token_lists = (
                self.tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"] if documents else []
            )
            files = self.train_files if split == "train" or self.valid_files is None else self.valid_files
            try:
                blocks = wrap_documents(token_lists, self.block_size, self.bos_id, self.eos_id)
            except ValueError as error:
                raise ValueError(f"{split} split ({_names(files)}): {error}") from error
            self._datasets[split] = BlockDataset(blocks)
        return self._datasets[split]


def resolve_text_files(paths: str | os.PathLike | list[str]) -> list[Path]:
    """Expand a file, a folder (its ``*.txt``, sorted) or a list of these into files.

    Raises ``FileNotFoundError`` naming the path for a missing path or a folder with no
    ``*.txt`` file.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for entry in paths:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = sorted(path.glob("*.txt"))
            if not found:
                raise FileNotFoundError(f"no *.txt files in folder {str(path)!r}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(
                f"data path {str(path)!r} does not exist "
                f"(relative paths are relative to the current directory {os.getcwd()!r})"
            )
    return files


def _names(files: list[Path]) -> str:
    shown = ", ".join(str(f) for f in files[:3])
    return shown + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def wrap_documents(token_lists: list[list[int]], block_size: int, bos_id: int, eos_id: int) -> Tensor:
    """Concatenate documents and cut them into blocks ``[BOS] t_1 .. t_{L-2} [EOS]``.

    Each document is followed by ``eos_id``; the stream of ``T = sum_d (len_d + 1)`` tokens
    is cut into ``floor(T / (L - 2))`` chunks of ``L - 2`` tokens, the remainder is dropped,
    and each chunk gets ``bos_id`` before and ``eos_id`` after it. Returns
    ``(num_blocks, L)`` int64. Raises ``ValueError`` if not even one block fits.
    """
    if block_size < 3:
        raise ValueError(f"block_size must be >= 3 (BOS, one token, EOS); got {block_size}")
    body = block_size - 2
    total = sum(len(tokens) + 1 for tokens in token_lists)
    num_blocks = total // body
    if num_blocks == 0:
        raise ValueError(
            f"only {total} tokens ({len(token_lists)} documents, one EOS after each), but "
            f"block_size={block_size} needs at least {body} tokens for one block "
            f"(each block holds block_size - 2 tokens between BOS and EOS)"
        )
    stream = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(tokens, (eos_id,)) for tokens in token_lists),
        dtype=np.int64,
        count=total,
    )  # (T,)
    blocks = np.empty((num_blocks, block_size), dtype=np.int64)  # (num_blocks, L)
    blocks[:, 0] = bos_id
    blocks[:, 1:-1] = stream[: num_blocks * body].reshape(num_blocks, body)
    blocks[:, -1] = eos_id
    return torch.from_numpy(blocks)


def block_special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """``(bos_id, eos_id)`` that delimit blocks.

    BOS: the tokenizer's BOS, else its EOS, else CLS. EOS: its EOS, else SEP, else BOS.
    GPT-2: ``(50256, 50256)`` (``<|endoftext|>``); BERT: ``(101, 102)`` (``[CLS]``, ``[SEP]``).
    Raises ``ValueError`` if the tokenizer has none of them.
    """
    bos = _first_not_none(tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id)
    eos = _first_not_none(tokenizer.eos_token_id, tokenizer.sep_token_id, tokenizer.bos_token_id)
    if bos is None or eos is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no BOS, EOS, CLS or SEP "
            "token to delimit blocks; give it one, e.g. tokenizer.add_special_tokens("
            "{'eos_token': '<|endoftext|>'}) and save it"
        )
    return bos, eos


def _first_not_none(*values: int | None) -> int | None:
    return next((value for value in values if value is not None), None)


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory or, failing that, the Hugging Face hub.

    A directory is loaded with ``AutoTokenizer.from_pretrained``. Anything else is taken as
    a hub name: if ``HF_HUB_OFFLINE`` is set, or no TCP connection to the hub opens within
    ``HUB_PROBE_TIMEOUT_S`` (skipped when a proxy is configured), only the local cache is
    tried, so an offline failure takes seconds instead of ~50 s of retries. Failure raises
    ``OSError`` saying what to pass instead.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    if path.is_absolute() or name_or_path.startswith((".", "~")):
        raise FileNotFoundError(f"tokenizer directory {name_or_path!r} does not exist")
    offline = constants.HF_HUB_OFFLINE or not _hub_reachable(constants.ENDPOINT)
    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=offline)
    except (OSError, ValueError) as error:
        if constants.HF_HUB_OFFLINE:
            reason = "HF_HUB_OFFLINE is set"
        elif offline:
            reason = "the Hugging Face hub is unreachable"
        else:
            reason = "the Hugging Face hub has no such tokenizer"
        raise OSError(
            f"could not load tokenizer {name_or_path!r}: there is no local directory of that name, "
            f"{reason}, and it is not in the local cache (or the name is wrong). Pass a local "
            f"directory holding the tokenizer files, e.g. "
            f"data.tokenizer_name_or_path=/path/to/gpt2_tokenizer (one written by "
            f"tokenizer.save_pretrained), or set HF_HUB_OFFLINE=1 with a warm Hugging Face cache."
        ) from error


def _hub_reachable(endpoint: str, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``endpoint`` opens within ``timeout_s`` (DNS included)."""
    if any(os.environ.get(var) for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
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


def vocab_and_mask(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """``(vocab_size, mask_index)`` for the model.

    With a mask token: ``(len(tokenizer), mask_token_id)`` (BERT: ``(30522, 103)``). Without:
    one extra id ``mask_index = len(tokenizer)``, so ``vocab_size = len(tokenizer) + 1``
    (GPT-2: ``(50258, 50257)``, as the released MDLM checkpoint).
    """
    if tokenizer.mask_token_id is not None:
        return len(tokenizer), tokenizer.mask_token_id
    return len(tokenizer) + 1, len(tokenizer)


def decode(tokenizer: PreTrainedTokenizerBase, ids: Tensor, mask_index: int) -> list[str]:
    """Decode samples (N, L) into N strings, special tokens skipped, masks shown.

    Every ``mask_index`` renders as ``"[MASK]"``, also the one outside the tokenizer's
    vocabulary (GPT-2's 50257) and also when it is the tokenizer's own mask token (which
    ``skip_special_tokens`` would hide), so partially denoised samples stay readable. The
    text between masks is decoded run by run and joined with a space where neither side
    has one.
    """
    texts = []
    for row in torch.as_tensor(ids).tolist():
        pieces: list[str] = []
        run: list[int] = []
        for token in row:
            if token == mask_index:
                pieces += [tokenizer.decode(run, skip_special_tokens=True), MASK_TEXT]
                run = []
            else:
                run.append(token)
        pieces.append(tokenizer.decode(run, skip_special_tokens=True))
        texts.append(_join_with_spaces(pieces))
    return texts


def _join_with_spaces(pieces: list[str]) -> str:
    """Concatenate, adding ``" "`` between two non-empty pieces when neither has one there."""
    text = ""
    for piece in pieces:
        if piece and text and not text[-1].isspace() and not piece[0].isspace():
            text += " "
        text += piece
    return text
