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
import json
import math
import os
import re
import typing
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

import hub
from corpora import Corpus, Split, decode_error, get_corpus, load_documents, source_files, stream_documents
from data_cache import TokenStream, default_cache_dir, load_or_build, source_fingerprint, tokenizer_fingerprint
from detokenizers import get_detokenizer
from synthetic import BOS_ID, EOS_ID, WORD_OFFSET, MarkovSource, build_tokenizer

# SyntheticData draws its splits from np.random.default_rng([seed, stream]); stream 0 is the
# chain itself (synthetic.SOURCE_STREAM), so the three never share random numbers.
TRAIN_STREAM = 1
VALID_STREAM = 2

MASK_TEXT = "[MASK]"  # how decode() renders a still-masked position

DocumentSeparator = Literal["blank_line", "line", "file"]
DOCUMENT_SPLITTERS: dict[str, Callable[[str], list[str]]] = {
    "blank_line": lambda text: re.split(r"\n[ \t\r]*\n", text),
    "line": str.splitlines,
    "file": lambda text: [text],
}


EVAL_SPLITS: tuple[str, ...] = typing.get_args(Split)  # what eval.split may name: train / validation / test


def check_eval_split(split: str | None, valid: tuple[str, ...], data_name: str) -> None:
    """``eval.split`` must be None or one of the splits ``data_name`` has; else an error naming them."""
    if split is not None and split not in valid:
        raise ValueError(f"eval.split={split} is not a split of data={data_name}; valid: {list(valid)} "
                         "(or leave it out for the data set's evaluation split).")


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

    def evaluation_dataset(self, split: str | None = None) -> BlockDataset:
        """What ``ppl_eval`` scores: the validation stream (None, ``validation``) or ``train``."""
        check_eval_split(split, ("train", "validation"), self.name)
        return self.train_dataset() if split == "train" else self.valid_dataset()

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
    validation split. Files are read as ``encoding`` (default UTF-8). Tokenization and wrapping
    (:func:`wrap_documents`) happen on first use.
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
        encoding: str = "utf-8",
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
        self.encoding = encoding
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

    def evaluation_dataset(self, split: str | None = None) -> BlockDataset:
        """What ``ppl_eval`` scores. None: every document of the given files, scored whole
        (``valid_path`` if given, else ``train_path``); ``validation``: the split that training
        validated on (the held-out ``valid_fraction`` without ``valid_path``); ``train``: the rest."""
        check_eval_split(split, ("train", "validation"), self.name)
        if split == "train":
            return self.train_dataset()
        if split == "validation":
            return self.valid_dataset()
        if "all" not in self._datasets:
            files = self.valid_files or self.train_files
            self._datasets["all"] = self._wrap(self._read(files), files, "the whole text")
        return self._datasets["all"]

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
            try:
                text = file.read_text(encoding=self.encoding)
            except UnicodeDecodeError:
                raise decode_error(file, self.encoding, "or set data.encoding=latin-1 (or the file's encoding).") \
                    from None
            documents.extend(doc.strip() for doc in split(text) if doc.strip())
        return documents

    def _dataset(self, split: str) -> BlockDataset:
        if split not in self._datasets:
            files = self.train_files if split == "train" or self.valid_files is None else self.valid_files
            self._datasets[split] = self._wrap(self.documents()[split], files, f"{split} split")
        return self._datasets[split]

    def _wrap(self, documents: list[str], files: list[Path], what: str) -> BlockDataset:
        token_lists = []
        if documents:
            token_lists = self.tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]
        try:
            blocks = wrap_documents(token_lists, self.block_size, self.bos_id, self.eos_id)
        except ValueError as error:
            raise ValueError(f"{what} ({_names(files)}): {error}") from error
        return BlockDataset(blocks)


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


# text8's character vocabulary, in the original's id order (so its checkpoints stay compatible).
TEXT8_SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[BOS]", "[EOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")
TEXT8_CHARACTERS = "abcdefghijklmnopqrstuvwxyz "


def build_text8_tokenizer() -> PreTrainedTokenizerFast:
    """Character tokenizer of text8: 8 special tokens then ``a``-``z`` and space (35 ids).

    Text is lower-cased; any other character becomes ``[UNK]``. Decoding joins characters
    without separators.
    """
    vocab = {token: i for i, token in enumerate(TEXT8_SPECIAL_TOKENS + tuple(TEXT8_CHARACTERS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one piece per character
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, cls_token="[CLS]", sep_token="[SEP]", bos_token="[BOS]", eos_token="[EOS]",
        mask_token="[MASK]", pad_token="[PAD]", unk_token="[UNK]", name_or_path="text8",
    )


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer: ``text8`` (built in), a local directory, or a Hugging Face hub name.

    A directory is loaded with ``AutoTokenizer.from_pretrained``. Anything else is taken as
    a hub name: if ``HF_HUB_OFFLINE`` is set, or no TCP connection to the hub opens within
    ``hub.HUB_PROBE_TIMEOUT_S`` (skipped when a proxy is configured), only the local cache is
    tried (:func:`hub.hub_local_only`), so an offline failure takes seconds instead of ~50 s
    of retries. Failure raises ``OSError`` saying what to pass instead.
    """
    if name_or_path == "text8":
        return build_text8_tokenizer()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path))
    if path.is_absolute() or name_or_path.startswith((".", "~")):
        raise FileNotFoundError(f"tokenizer directory {name_or_path!r} does not exist")
    local_only = hub.hub_local_only()
    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_only)
    except (OSError, ValueError) as error:
        reason = hub.hub_failure_reason(local_only, "the Hugging Face hub has no such tokenizer")
        raise OSError(
            f"could not load tokenizer {name_or_path!r}: there is no local directory of that name, "
            f"{reason}, and it is not in the local cache (or the name is wrong). Pass a local "
            f"directory holding the tokenizer files, e.g. "
            f"data.tokenizer_name_or_path=/path/to/gpt2_tokenizer (one written by "
            f"tokenizer.save_pretrained), or set HF_HUB_OFFLINE=1 with a warm Hugging Face cache."
        ) from error


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


# --------------------------------------------------------------------------- block data sets
class WrappedBlocks(Dataset):
    """Blocks ``[BOS] s[i*b : (i+1)*b] [EOS]`` of a token stream ``s``, with ``b = L - 2``.

    ``len = floor(T / b)``: the remainder of the stream is dropped. The stream holds every
    document followed by EOS (when EOS insertion is on), so a block may start or end inside a
    document, as in the paper.
    """

    def __init__(self, stream: np.ndarray, block_size: int, bos_id: int, eos_id: int) -> None:
        if block_size < 3:
            raise ValueError(f"block_size must be >= 3 (BOS, one token, EOS); got {block_size}")
        self.stream = stream
        self.block_size = block_size
        self.body = block_size - 2
        self.bos_id, self.eos_id = bos_id, eos_id

    def __len__(self) -> int:
        return len(self.stream) // self.body

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range [0, {len(self)})")
        input_ids = torch.empty(self.block_size, dtype=torch.long)  # (L,)
        input_ids[0], input_ids[-1] = self.bos_id, self.eos_id
        start = index * self.body
        input_ids[1:-1] = torch.from_numpy(np.asarray(self.stream[start : start + self.body], dtype=np.int64))
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


class PaddedDocuments(Dataset):
    """One document per item: ``[BOS] d[:L-2] [EOS] [PAD] ...`` (LM1B's sentence-level setting).

    Longer documents are truncated; ``attention_mask`` is 1 on BOS, the tokens and EOS and 0 on
    padding, which the losses and the attention ignore.
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, block_size: int, bos_id: int, eos_id: int,
                 pad_id: int) -> None:
        if block_size < 3:
            raise ValueError(f"block_size must be >= 3 (BOS, one token, EOS); got {block_size}")
        self.tokens, self.offsets = tokens, offsets
        self.block_size = block_size
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        start = int(self.offsets[index])
        end = min(int(self.offsets[index + 1]), start + self.block_size - 2)
        n = end - start
        input_ids = torch.full((self.block_size,), self.pad_id, dtype=torch.long)  # (L,)
        input_ids[0] = self.bos_id
        input_ids[1 : n + 1] = torch.from_numpy(np.asarray(self.tokens[start:end], dtype=np.int64))
        input_ids[n + 1] = self.eos_id
        attention_mask = torch.zeros(self.block_size, dtype=torch.long)
        attention_mask[: n + 2] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


class CroppedBlocks(Dataset):
    """Random windows of ``L`` tokens from blocks of ``2L`` (text8-crop's training set).

    Keys are ``(epoch, index)`` (:class:`ResumableSampler` with ``with_epoch=True``): the window
    start ``u ~ Uniform{0, .., L-1}`` is drawn from ``np.random.default_rng([seed, epoch, index])``,
    so every epoch crops differently and a resumed run crops exactly as the uninterrupted one.
    As in the original, the window's first token is set to BOS and its last to EOS.
    """

    needs_epoch = True

    def __init__(self, blocks: WrappedBlocks, length: int, seed: int = 0) -> None:
        if blocks.block_size != 2 * length:
            raise ValueError(f"text8-crop needs blocks of 2 x {length}; got {blocks.block_size}")
        self.blocks, self.length, self.seed = blocks, length, seed

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Tensor]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        start = int(np.random.default_rng([self.seed, epoch, index]).integers(self.length))
        input_ids = self.blocks[index]["input_ids"][start : start + self.length].clone()  # (L,)
        input_ids[0], input_ids[-1] = self.blocks.bos_id, self.blocks.eos_id
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


# --------------------------------------------------------------------------- the paper's data sets
STREAMING_CORPORA = ("openwebtext", "openwebtext-train")
STREAM_TOKENIZE_BATCH = 256  # documents read and tokenized together in streaming mode
# A local copy given by data.path also serves the validation corpus when both are the same data set.
_SAME_SOURCE = {"openwebtext-train": "openwebtext", "openwebtext-valid": "openwebtext", "text8-crop": "text8"}


class CorpusData:
    """One of the paper's data sets (``configs/data/<name>.yaml``), tokenized once and cached.

    Args:
        train, valid: corpus names (:data:`corpora.CORPORA`), e.g. ``openwebtext-train`` /
            ``openwebtext-valid``; the validation split is the corpus's ``valid_split``.
        tokenizer_name_or_path: hub name, local directory, or ``text8`` (built-in characters).
        block_size: sequence length L.
        wrap: concatenate documents (EOS after each when ``insert_*_eos``) and cut blocks
            ``[BOS] .. [EOS]`` of L tokens, dropping the remainder; else one padded document per
            item (LM1B's sentence-level setting).
        streaming: train on the OpenWebText variants without downloading them first
            (:class:`StreamingBlocks`); validation is always cached.
        insert_train_eos, insert_valid_eos: EOS after each document when wrapping.
        cache_dir: where tokenized splits and downloads are kept (default
            :func:`data_cache.default_cache_dir`).
        path: a local copy of the training data set; also used for validation when ``valid`` is
            the same data set. ``valid_path``: a local copy of a different validation data set.
        num_proc: tokenization processes (default: one per 50,000 documents, at most the CPUs, 16).
        seed: text8-crop's window draws.
    """

    has_true_nll = False

    def __init__(
        self,
        train: str,
        valid: str,
        tokenizer_name_or_path: str,
        block_size: int,
        wrap: bool = True,
        streaming: bool = False,
        insert_train_eos: bool = True,
        insert_valid_eos: bool = True,
        cache_dir: str | None = None,
        path: str | None = None,
        valid_path: str | None = None,
        num_proc: int | None = None,
        seed: int = 0,
        name: str = "",
    ) -> None:
        self.train_corpus, self.valid_corpus = get_corpus(train), get_corpus(valid)
        self.name = name or train
        if not wrap and (self.train_corpus.is_text8 or self.valid_corpus.is_text8):
            raise ValueError("text8 is character-level and always wrapped; set data.wrap=true")
        if streaming and train not in STREAMING_CORPORA:
            raise ValueError(f"data.streaming=true works for data.train in {list(STREAMING_CORPORA)}; got {train!r}")
        if streaming and not wrap:
            raise ValueError("data.streaming=true needs data.wrap=true")
        if block_size < 3:
            raise ValueError(f"block_size must be >= 3 (BOS, one token, EOS); got {block_size}")
        self.block_size = block_size
        self.wrap, self.streaming = wrap, streaming
        self.insert_eos = {"train": insert_train_eos, "valid": insert_valid_eos}
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.paths = {"train": path, "valid": valid_path}
        if valid_path is None and _SAME_SOURCE.get(valid, valid) == _SAME_SOURCE.get(train, train):
            self.paths["valid"] = path
        self.num_proc = num_proc
        self.seed = seed
        self.tokenizer = load_tokenizer(tokenizer_name_or_path)
        self.bos_id, self.eos_id = block_special_ids(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self._datasets: dict[str, Dataset] = {}

    def train_dataset(self) -> Dataset:
        if "train" not in self._datasets:
            if self.streaming:
                self._datasets["train"] = StreamingBlocks(self, self.train_corpus.name)
            else:
                self._datasets["train"] = self._blocks("train", self.train_corpus, "train")
        return self._datasets["train"]

    def valid_dataset(self) -> Dataset:
        if "valid" not in self._datasets:
            self._datasets["valid"] = self._blocks("valid", self.valid_corpus, self.valid_corpus.valid_split)
        return self._datasets["valid"]

    def evaluation_dataset(self, split: str | None = None) -> Dataset:
        """What ``ppl_eval`` scores: the validation data set's evaluation split (None: its
        ``valid_split``, ``test`` for lm1b / text8 / ag_news as in the paper), or the split named."""
        check_eval_split(split, EVAL_SPLITS, self.name)
        if split is None or split == self.valid_corpus.valid_split:
            return self.valid_dataset()
        key = f"eval:{split}"
        if key not in self._datasets:
            self._datasets[key] = self._blocks("valid", self.valid_corpus, split)
        return self._datasets[key]

    def token_stream(self, role: str, corpus: Corpus, split: str) -> TokenStream:
        """The cached tokens of ``split`` of ``corpus`` (``role``: ``train`` / ``valid``, for the options)."""
        crop = corpus.name == "text8-crop" and split == "train"
        chunk = (2 if crop else 1) * self.block_size if corpus.is_text8 else None
        eos = self.eos_id if self.wrap and self.insert_eos[role] else None
        path = self.paths[role]
        remote = json.dumps({"hub": corpus.hub and vars(corpus.hub), "urls": corpus.urls})
        detokenizer = get_detokenizer(corpus.name)
        key = {
            "corpus": corpus.name, "split": split,
            "source": source_fingerprint(None if path is None else source_files(corpus, path, split), remote),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "detokenizer": corpus.name if detokenizer else None, "eos": eos, "text8_chunk": chunk,
        }
        return load_or_build(
            self.cache_dir, key,
            documents=lambda: load_documents(corpus, split, self.cache_dir, path, text8_chunk=chunk),
            tokenizer=self.tokenizer, detokenizer=detokenizer, eos_id=eos, num_proc=self.num_proc,
        )

    def _blocks(self, role: str, corpus: Corpus, split: str) -> Dataset:
        stream = self.token_stream(role, corpus, split)
        if not self.wrap:
            return PaddedDocuments(stream.tokens, stream.offsets, self.block_size, self.bos_id, self.eos_id,
                                   self.pad_id)
        crop = corpus.name == "text8-crop" and split == "train"
        block_size = 2 * self.block_size if crop else self.block_size
        blocks = WrappedBlocks(stream.tokens, block_size, self.bos_id, self.eos_id)
        if len(blocks) == 0:
            raise ValueError(
                f"{corpus.name} {split}: {len(stream.tokens):,} tokens, fewer than one block of {block_size - 2} "
                f"(block_size={block_size} minus BOS and EOS)"
            )
        return CroppedBlocks(blocks, self.block_size, self.seed) if crop else blocks


class StreamingBlocks(IterableDataset):
    """OpenWebText blocks made on the fly from a streamed copy (``data.streaming=true``).

    Documents stream in order (``datasets`` streaming mode; nothing is downloaded up front).
    Document ``d`` goes to shard ``d mod S`` with ``S = world_size x num_workers``; each shard
    detokenizes, tokenizes, appends EOS and wraps its documents exactly like
    :class:`WrappedBlocks`, so every shard yields its own blocks in a fixed order. The
    DataLoader takes batch ``i`` of a rank from worker ``i mod num_workers``, which makes the
    batch sequence a pure function of (world size, workers, batch size). Resuming after ``c``
    batches: worker ``k`` takes the part of worker ``j = (k + c) mod num_workers`` and skips the
    blocks of the ``len(range(j, c, num_workers))`` batches that one had produced. Exact as long
    as those three numbers are unchanged (re-reading the skipped documents takes time).
    """

    def __init__(self, data: CorpusData, corpus_name: str) -> None:
        self.data = data
        self.corpus = get_corpus(corpus_name)
        self.rank, self.world_size = 0, 1
        self.batch_size = 1
        self.skip_batches = 0

    def configure(self, rank: int, world_size: int, batch_size: int, skip_batches: int = 0) -> None:
        self.rank, self.world_size, self.batch_size, self.skip_batches = rank, world_size, batch_size, skip_batches

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        # A resumed loader asks worker 0 first, for the uninterrupted run's batch c: so worker k
        # plays the part of worker (k + c) mod num_workers there.
        role = (worker_id + self.skip_batches) % num_workers
        shard, num_shards = self.rank * num_workers + role, self.world_size * num_workers
        skip = len(range(role, self.skip_batches, num_workers)) * self.batch_size
        data = self.data
        documents = stream_documents(self.corpus, data.cache_dir, data.paths["train"])
        detokenizer = get_detokenizer(self.corpus.name)
        eos = data.eos_id if data.insert_eos["train"] else None
        body = data.block_size - 2
        buffer: list[int] = []
        produced = 0
        first = 0  # global index of the batch's first document
        # .iter() rather than iterating the data set: in a DataLoader worker the latter would
        # shard by worker on its own (HF's split by worker) and break the fixed assignment above.
        for batch in documents.iter(batch_size=STREAM_TOKENIZE_BATCH):
            texts = [t for d, t in enumerate(batch["text"], first) if d % num_shards == shard]
            first += len(batch["text"])
            if detokenizer is not None:
                texts = [detokenizer(t) for t in texts]
            for ids in data.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []:
                buffer.extend(ids)
                if eos is not None:
                    buffer.append(eos)
                while len(buffer) >= body:
                    chunk, buffer = buffer[:body], buffer[body:]
                    produced += 1
                    if produced <= skip:
                        continue
                    input_ids = torch.tensor([data.bos_id, *chunk, data.eos_id], dtype=torch.long)
                    yield {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


# --------------------------------------------------------------------------- samplers
class ResumableSampler(Sampler):
    """Shuffled, sharded training order that a checkpoint can resume mid-epoch, exactly.

    Epoch ``e`` visits ``perm_e = randperm(N, seed + e)`` truncated to a multiple of the
    number of processes ``W``; process ``r`` takes ``perm_e[r::W]`` (as ``DistributedSampler``
    with ``drop_last``), so after ``c`` batches of ``B`` per process the consumed items are
    exactly ``perm_e[:c B W]``. :meth:`resume` makes the next pass over epoch ``e`` start after
    that many items. ``with_epoch=True`` yields ``(epoch, index)`` keys for data sets that
    draw per-item randomness (:class:`CroppedBlocks`).
    """

    def __init__(self, num_items: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 with_epoch: bool = False) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        if num_items < num_replicas:
            raise ValueError(f"{num_items} items cannot be split over {num_replicas} processes")
        self.num_items, self.num_replicas, self.rank = num_items, num_replicas, rank
        self.shuffle, self.seed, self.with_epoch = shuffle, seed, with_epoch
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, items consumed over all processes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, consumed: int) -> None:
        if consumed % self.num_replicas:
            raise ValueError(f"consumed items {consumed} is not a multiple of the {self.num_replicas} processes")
        self._resume = (epoch, consumed)

    def __len__(self) -> int:
        return self.num_items // self.num_replicas

    def order(self, epoch: int) -> Tensor:
        """The epoch's global visiting order (N',), N' the largest multiple of W <= N."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.num_items, generator=generator)
        else:
            perm = torch.arange(self.num_items)
        return perm[: len(self) * self.num_replicas]

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
            self._resume = None
        indices = self.order(self.epoch)[start + self.rank :: self.num_replicas].tolist()
        epoch = self.epoch
        return iter([(epoch, i) for i in indices] if self.with_epoch else indices)


class Indexed(Dataset):
    """Adds each item's position in the data set as ``"index"`` (what evaluation seeds its noise with)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {**self.dataset[index], "index": torch.tensor(index)}


class ShardSampler(Sampler):
    """Evaluation order: process ``r`` of ``W`` takes items ``r, r + W, ...``, no padding, no duplicates."""

    def __init__(self, num_items: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.num_items, self.num_replicas, self.rank = num_items, num_replicas, rank

    def __len__(self) -> int:
        return len(range(self.rank, self.num_items, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.num_items, self.num_replicas))


# --------------------------------------------------------------------------- Lightning data module
class DataModule(L.LightningDataModule):
    """Train / validation loaders over a data object, with an exactly resumable training order.

    The loaders are built when Lightning asks for them, so the process rank and count are
    known; Lightning's own distributed sampler must be off (``use_distributed_sampler=False``).
    The checkpoint stores where the training order stood (:meth:`state_dict`): the epoch and the
    batches this process had taken (Lightning's ``batch_progress.current.ready`` at save time,
    which counts the batch being trained, not the ones prefetched).
    """

    def __init__(self, data: Any, batch_size: int, eval_batch_size: int, num_workers: int = 0,
                 pin_memory: bool = False, seed: int = 0, evaluate: bool = False,
                 eval_split: str | None = None) -> None:
        super().__init__()
        self.data = data
        # ppl_eval: validate on data.evaluation_dataset(eval_split) instead of data.valid_dataset()
        self.evaluate, self.eval_split = evaluate, eval_split
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory, self.seed = num_workers, pin_memory, seed
        self._resume: dict[str, int] | None = None

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset: Dataset, batch_size: int, sampler: Sampler | None, drop_last: bool) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=self.num_workers, pin_memory=self.pin_memory and torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._world()
        dataset = self.data.train_dataset()
        resume = self._resume or {}
        if isinstance(dataset, StreamingBlocks):
            dataset.configure(rank, world_size, self.batch_size, resume.get("batches", 0))
            return self._loader(dataset, self.batch_size, None, drop_last=True)
        sampler = ResumableSampler(len(dataset), world_size, rank, shuffle=True, seed=self.seed,
                                   with_epoch=getattr(dataset, "needs_epoch", False))
        if resume:
            sampler.resume(resume["epoch"], resume["batches"] * self.batch_size * world_size)
        return self._loader(dataset, self.batch_size, sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        rank, world_size = self._world()
        valid = self.data.evaluation_dataset(self.eval_split) if self.evaluate else self.data.valid_dataset()
        dataset = Indexed(valid)
        return self._loader(dataset, self.eval_batch_size, ShardSampler(len(dataset), world_size, rank), False)

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Mark whether the batch has padding while it is still on the CPU (``batch["padded"]``)."""
        batch["padded"] = not bool(batch["attention_mask"].all())
        return batch

    def state_dict(self) -> dict[str, int]:
        trainer = self.trainer
        if trainer is None:
            return {}
        loop = trainer.fit_loop
        _, world_size = self._world()
        return {"epoch": loop.epoch_progress.current.processed, "batches": loop.epoch_loop.batch_progress.current.ready,
                "batch_size": self.batch_size, "world_size": world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not state:
            return
        _, world_size = self._world()
        if (state["batch_size"], state["world_size"]) != (self.batch_size, world_size):
            warnings.warn(
                f"resuming with {world_size} process(es) x {self.batch_size} per batch; the checkpoint was written "
                f"with {state['world_size']} x {state['batch_size']}: the data order continues at the same item "
                "count but is not the uninterrupted run's", stacklevel=2)
            consumed = state["batches"] * state["batch_size"] * state["world_size"]
            state = {**state, "batches": consumed // (self.batch_size * world_size)}
        self._resume = {"epoch": state["epoch"], "batches": state["batches"]}
