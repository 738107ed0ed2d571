"""The paper's corpora from local copies in their real on-disk formats, the token cache, and the errors.

Every fixture here is written by the test in the format the data set ships in (PTB's
``ptb.*.txt``, WikiText's ``wiki.*.raw``, the LM1B tarball's folders, ``text8`` / ``text8.zip``,
jsonl / parquet / csv tables, a ``DatasetDict.save_to_disk`` folder). Tokens are checked with a
character-level tokenizer whose ids the test computes on its own (:func:`encode`), so every
detokenizer rewrite, newline and EOS shows up in the expected stream. No test touches the
network (:func:`no_network`); only the last section needs ``../shared/data``.
"""

from __future__ import annotations

import csv
import json
import random
import socket
import string
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import corpora
import data_cache
import detokenizers
import hub
from corpora import CORPORA, SPLITS, DataUnavailableError, get_corpus, load_documents, stream_documents
from dataloader import CorpusData, CroppedBlocks, PaddedDocuments, WrappedBlocks

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------ helpers

# Character tokenizer: ids 0-4 special, then every printable ASCII character; anything else is [UNK].
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[MASK]", "[UNK]")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 4
CHAR_IDS = {c: len(SPECIAL_TOKENS) + i for i, c in enumerate(sorted(set(string.printable)))}
# text8's built-in tokenizer: [BOS]=2, [EOS]=3, then a-z and space from id 8.
TEXT8_BOS, TEXT8_EOS = 2, 3
TEXT8_IDS = {c: 8 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}


def encode(text: str) -> list[int]:
    """The character tokenizer's ids of ``text``, computed without it."""
    return [CHAR_IDS.get(c, UNK_ID) for c in text]


def save_char_tokenizer(folder: Path, extra: str = "") -> str:
    """Save the character tokenizer (plus the characters ``extra``) where ``AutoTokenizer`` loads it."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)} | {c: i for c, i in CHAR_IDS.items()}
    for c in extra:
        vocab.setdefault(c, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # newlines too
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]",
                                        eos_token="[EOS]", mask_token="[MASK]", unk_token="[UNK]")
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def char_tok(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = save_char_tokenizer(tmp_path_factory.mktemp("char_tokenizer"))
    probe = "\n a\u201cb\u201d <unk> 's\t$1\n"
    assert AutoTokenizer.from_pretrained(folder)(probe, add_special_tokens=False)["input_ids"] == encode(probe)
    return folder


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every internet connection attempt fails at once (and is recorded); local sockets still work."""
    attempts: list[tuple] = []
    connect = socket.socket.connect

    def guarded(self: socket.socket, address: object) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError(f"test_corpora: network access to {address} blocked")
        connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    return attempts


def corpus_data(tmp_path: Path, train: str, valid: str, tokenizer: str, block_size: int, **kwargs) -> CorpusData:
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    return CorpusData(train=train, valid=valid, tokenizer_name_or_path=tokenizer, block_size=block_size,
                      num_proc=1, **kwargs)


def documents(corpus: str, split: str, tmp_path: Path, path: Path | str | None, **kwargs) -> list[str]:
    table = load_documents(get_corpus(corpus), split, tmp_path / "cache", path, **kwargs)
    assert table.column_names == ["text"]
    return table["text"]


def expected_blocks(stream: list[int], block_size: int, bos: int, eos: int) -> list[list[int]]:
    """Cut ``stream`` into ``block_size - 2``-token bodies, BOS / EOS around each, remainder dropped."""
    body = block_size - 2
    return [[bos, *stream[i : i + body], eos] for i in range(0, len(stream) - body + 1, body)]


def items(dataset: torch.utils.data.Dataset) -> list[list[int]]:
    return [dataset[i]["input_ids"].tolist() for i in range(len(dataset))]


def entries(cache_dir: Path) -> set[str]:
    return {p.name for p in (cache_dir / "tokenized").iterdir() if p.is_dir()}


# ------------------------------------------------------------------ 1. Penn Treebank

PTB_LINES = {  # as in the real files: a leading and a trailing space on every line
    "train": [
        " pierre <unk> N years old will join the board as a nonexecutive director nov. N \n",
        " mr. <unk> is chairman of <unk> n.v. the dutch publishing group \n",
        " it 's a \\/ share deal \n",
    ],
    "valid": [
        " consumers may want to move their telephones a little closer to the tv set \n",
        " <unk> <unk> watching abc 's monday night football can now vote during <unk> for the greatest play in N "
        "years from among four or five <unk> <unk> \n",
        " the company 's N N N shares were n't sold at $ N a share \n",
        " two weeks ago viewers of several nbc <unk> consumer segments started calling a N number \n",
    ],
    "test": [
        " no it was n't black monday \n",
        " but while the new york stock exchange did n't fall apart friday the dow plunged N points \n",
    ],
}


@pytest.fixture
def ptb_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ptb"
    folder.mkdir()
    for split, lines in PTB_LINES.items():
        (folder / f"ptb.{split}.txt").write_text("".join(lines))
    (folder / "README").write_text("not a split file\n")  # ignored: its name holds no split alias
    return folder


@pytest.mark.parametrize(("split", "file_split"), [("train", "train"), ("validation", "valid"), ("test", "test")])
def test_ptb_documents_are_the_stripped_lines_in_order(
    tmp_path: Path, ptb_dir: Path, split: str, file_split: str
) -> None:
    rows = documents("ptb", split, tmp_path, ptb_dir)
    assert rows == [line.strip() for line in PTB_LINES[file_split]]
    assert rows[0][0] != " " and rows[0][-1] != " "


def test_ptb_validation_blocks_are_the_detokenized_lines_wrapped(tmp_path: Path, ptb_dir: Path, char_tok: str) -> None:
    block_size = 17
    data = corpus_data(tmp_path, "ptb", "ptb", char_tok, block_size, path=str(ptb_dir))
    valid = data.valid_dataset()
    assert isinstance(valid, WrappedBlocks)
    lines = [line.strip() for line in PTB_LINES["valid"]]
    assert all(detokenizers.ptb(line) != line for line in lines[1:])  # the detokenizer matters here
    stream = [t for line in lines for t in [*encode(detokenizers.ptb(line)), EOS_ID]]
    assert len(stream) % (block_size - 2) != 0  # a remainder to drop
    expected = expected_blocks(stream, block_size, BOS_ID, EOS_ID)
    assert items(valid) == expected
    assert all(valid[i]["attention_mask"].tolist() == [1] * block_size for i in range(len(valid)))
    # The training split is its own file.
    train_stream = [t for line in PTB_LINES["train"] for t in [*encode(detokenizers.ptb(line.strip())), EOS_ID]]
    assert items(data.train_dataset()) == expected_blocks(train_stream, block_size, BOS_ID, EOS_ID)


# ------------------------------------------------------------------ 2. WikiText

WIKI_RAW = (
    " \n"
    " = Valkyria Chronicles III = \n"
    " \n"
    " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game . \n"
    " \n"
    " = = Gameplay = = \n"
)
WIKI_ROWS = [  # the hub's rows of the same text
    "",
    " = Valkyria Chronicles III = \n",
    "",
    " Senjō no Valkyria 3 : Unrecorded Chronicles is a tactical role @-@ playing video game . \n",
    "",
    " = = Gameplay = = \n",
]


def test_wikitext_raw_lines_keep_their_newline_and_blank_lines_are_empty(tmp_path: Path, char_tok: str) -> None:
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    (folder / "wiki.train.raw").write_text(" = Train = \n \n Some text . \n")
    (folder / "wiki.valid.raw").write_text(WIKI_RAW)
    (folder / "wiki.test.raw").write_text(" \n = Test = \n")
    assert documents("wikitext2", "validation", tmp_path, folder) == WIKI_ROWS
    assert documents("wikitext103", "train", tmp_path, folder) == [" = Train = \n", "", " Some text . \n"]
    assert documents("wikitext2", "test", tmp_path, folder) == ["", " = Test = \n"]

    data = corpus_data(tmp_path, "wikitext2", "wikitext2", char_tok, 12, path=str(folder))
    stream = [t for row in WIKI_ROWS for t in [*encode(detokenizers.wikitext(row)), EOS_ID]]
    assert items(data.valid_dataset()) == expected_blocks(stream, 12, BOS_ID, EOS_ID)


# ------------------------------------------------------------------ 3. LAMBADA

LAMBADA_TEXTS = [
    "In my palm is a clear stone.\n\n\u201cFigured if you're going to be out at night,\u201d he said. Harlin",
    "She looked at the map again and pointed. \u201cThere,\u201d said Anna",
    "The last word of this passage is word",
]


def test_lambada_single_jsonl_serves_every_split_and_is_detokenized(tmp_path: Path, char_tok: str) -> None:
    file = tmp_path / "lambada_test.jsonl"
    file.write_text("".join(json.dumps({"text": text}) + "\n" for text in LAMBADA_TEXTS))
    for split in SPLITS:
        assert documents("lambada", split, tmp_path, file) == LAMBADA_TEXTS

    data = corpus_data(tmp_path, "lambada", "lambada", char_tok, 24, path=str(file))
    stream = [t for text in LAMBADA_TEXTS for t in [*encode(detokenizers.lambada(text)), EOS_ID]]
    valid = items(data.valid_dataset())
    assert valid == expected_blocks(stream, 24, BOS_ID, EOS_ID)
    assert valid[0][1] == CHAR_IDS["\n"]  # the detokenizer's leading newline reaches the tokenizer
    assert UNK_ID not in stream  # curly quotes were straightened (they are not in the vocabulary)


# ------------------------------------------------------------------ 4. OpenWebText

OWT_DOCS = [
    "First document.\nIt has two lines.",
    "Second document, one line.",
    "Third:  with  double  spaces.",
    "Fourth document",
    "Fifth document here.\nMore text.\nAnd more.",
    "Sixth and last.",
]


def write_owt(folder: Path, fmt: str, docs: list[str] = OWT_DOCS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        file = folder / "owt.parquet"
        pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), file)
    elif fmt == "jsonl":
        file = folder / "owt.jsonl"
        file.write_text("".join(json.dumps({"text": doc, "meta": i}) + "\n" for i, doc in enumerate(docs)))
    else:  # documents separated by blank lines (one of them holding spaces, one a run of three)
        file = folder / "owt.txt"
        separators = ["\n\n", "\n   \n", "\n\n\n\n"]
        text = docs[0]
        for i, doc in enumerate(docs[1:]):
            text += separators[i % len(separators)] + doc
        file.write_text(text + "\n")
    return file


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "txt"])
def test_openwebtext_local_copy_and_its_heldout_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    file = write_owt(tmp_path / "owt", fmt)
    for split in SPLITS:  # one split only: every split reads all of it
        assert documents("openwebtext", split, tmp_path, file) == OWT_DOCS
    assert documents("openwebtext", "train", tmp_path, file.parent) == OWT_DOCS  # the folder holding it
    monkeypatch.setattr(corpora, "OWT_HELDOUT_DOCUMENTS", 3)
    assert documents("openwebtext-train", "train", tmp_path, file) == OWT_DOCS[:-3]
    assert documents("openwebtext-valid", "validation", tmp_path, file) == OWT_DOCS[-3:]
    assert [row["text"] for row in stream_documents(get_corpus("openwebtext-train"), tmp_path, file)] == OWT_DOCS[:-3]
    assert [row["text"] for row in stream_documents(get_corpus("openwebtext"), tmp_path, file)] == OWT_DOCS


@pytest.mark.parametrize("num_docs", [3, 2])
def test_openwebtext_heldout_split_needs_more_documents_than_it_holds_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_docs: int
) -> None:
    monkeypatch.setattr(corpora, "OWT_HELDOUT_DOCUMENTS", 3)
    file = write_owt(tmp_path / "owt", "jsonl", OWT_DOCS[:num_docs])
    for corpus in ("openwebtext-train", "openwebtext-valid"):
        with pytest.raises(ValueError, match=rf"last 3 documents, but this copy has only {num_docs}"):
            load_documents(get_corpus(corpus), "train", tmp_path / "cache", file)
    with pytest.raises(ValueError, match=rf"this copy has {num_docs}"):
        stream_documents(get_corpus("openwebtext-train"), tmp_path, file)


def test_openwebtext_split_config_trains_and_validates_on_disjoint_documents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, char_tok: str
) -> None:
    monkeypatch.setattr(corpora, "OWT_HELDOUT_DOCUMENTS", 3)
    file = write_owt(tmp_path / "owt", "parquet")
    data = corpus_data(tmp_path, "openwebtext-train", "openwebtext-valid", char_tok, 10, path=str(file))
    for dataset, docs in ((data.train_dataset(), OWT_DOCS[:-3]), (data.valid_dataset(), OWT_DOCS[-3:])):
        stream = [t for doc in docs for t in [*encode(doc), EOS_ID]]  # no detokenizer for OpenWebText
        assert items(dataset) == expected_blocks(stream, 10, BOS_ID, EOS_ID)


# ------------------------------------------------------------------ 5. LM1B

LM1B_ROOT = "1-billion-word-language-modeling-benchmark-r13output"
LM1B_TRAIN = {
    "news.en-00001-of-00100": [
        "The U.S. Centers for Disease Control and Prevention initially advised school systems to close , then "
        "reversed itself .",
        "It is ' dangerous ' .",
        "Hi !",
    ],
    "news.en-00002-of-00100": ['He said , " we \'re fine . "', "Go to http : / / example.com now ."],
}
LM1B_HELDOUT = {
    "news.en.heldout-00000-of-00050": ["Yes .", "The scale of the problem is huge , officials say ."],
    "news.en.heldout-00001-of-00050": ["Why ?"],
}


@pytest.fixture
def lm1b_dir(tmp_path: Path) -> Path:
    """The statmt tarball's layout (with a README at the top, as the real one)."""
    root = tmp_path / "lm1b"
    for folder, files in (("training-monolingual.tokenized.shuffled", LM1B_TRAIN),
                          ("heldout-monolingual.tokenized.shuffled", LM1B_HELDOUT)):
        (root / LM1B_ROOT / folder).mkdir(parents=True)
        for name, lines in reversed(files.items()):  # written out of order: files are read sorted by name
            (root / LM1B_ROOT / folder / name).write_text("".join(line + "\n" for line in lines))
    (root / LM1B_ROOT / "README").write_text("train test valid heldout\n")
    return root


def test_lm1b_train_reads_the_training_files_and_test_the_heldout_ones(tmp_path: Path, lm1b_dir: Path) -> None:
    train = [line for lines in LM1B_TRAIN.values() for line in lines]
    test = [line for lines in LM1B_HELDOUT.values() for line in lines]
    assert documents("lm1b", "train", tmp_path, lm1b_dir) == train
    assert documents("lm1b", "test", tmp_path, lm1b_dir) == test
    assert documents("lm1b", "test", tmp_path, lm1b_dir / LM1B_ROOT) == test  # the unpacked folder itself


def padded(text: str, block_size: int, bos: int, eos: int, pad: int, ids: list[int]) -> tuple[list[int], list[int]]:
    body = ids[: block_size - 2]
    n = len(body)
    return [bos, *body, eos] + [pad] * (block_size - n - 2), [1] * (n + 2) + [0] * (block_size - n - 2)


def test_lm1b_unwrapped_items_are_padded_sentences(tmp_path: Path, lm1b_dir: Path, char_tok: str) -> None:
    block_size = 16
    data = corpus_data(tmp_path, "lm1b", "lm1b", char_tok, block_size, wrap=False, path=str(lm1b_dir))
    for dataset, files in ((data.train_dataset(), LM1B_TRAIN), (data.valid_dataset(), LM1B_HELDOUT)):
        assert isinstance(dataset, PaddedDocuments)
        sentences = [line for lines in files.values() for line in lines]
        assert len(dataset) == len(sentences)
        lengths = set()
        for i, sentence in enumerate(sentences):
            ids = encode(detokenizers.lm1b(sentence))
            lengths.add(len(ids) > block_size - 2)
            input_ids, mask = padded(sentence, block_size, BOS_ID, EOS_ID, PAD_ID, ids)
            assert dataset[i]["input_ids"].tolist() == input_ids, sentence
            assert dataset[i]["attention_mask"].tolist() == mask, sentence
        assert lengths == {True, False}  # both truncated and padded sentences
    long_item = data.train_dataset()[0]["input_ids"].tolist()
    assert long_item[-1] == EOS_ID and PAD_ID not in long_item  # truncated to L-2 tokens, EOS kept last


def test_lm1b_config_validates_on_the_test_split(tmp_path: Path, lm1b_dir: Path, char_tok: str) -> None:
    cfg = OmegaConf.load(ROOT / "configs" / "data" / "lm1b.yaml")
    assert (cfg.train, cfg.valid, cfg.wrap) == ("lm1b", "lm1b", False)
    assert get_corpus("lm1b").valid_split == "test"
    overrides = {"block_size": 16, "seed": 0, "tokenizer_name_or_path": char_tok, "path": str(lm1b_dir),
                 "cache_dir": str(tmp_path / "cache"), "num_proc": 1}
    data = instantiate(OmegaConf.merge(cfg, overrides))
    assert isinstance(data, CorpusData)
    valid = data.valid_dataset()
    heldout = [line for lines in LM1B_HELDOUT.values() for line in lines]
    assert len(valid) == len(heldout)
    first = encode(detokenizers.lm1b(heldout[0]))
    assert valid[0]["input_ids"].tolist()[: len(first) + 2] == [BOS_ID, *first, EOS_ID]
    assert {p.split("-")[1] for p in entries(tmp_path / "cache")} == {"test"}


# ------------------------------------------------------------------ 6. text8

TEXT8_SMALL_SPLITS = {"train": (0, 120), "validation": (120, 160), "test": (160, None)}


@pytest.fixture
def text8_text(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(corpora, "TEXT8_SPLITS", TEXT8_SMALL_SPLITS)
    rng = random.Random(0)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz    ") for _ in range(203))


def write_text8(folder: Path, text: str, zipped: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not zipped:
        (folder / "text8").write_text(text)
        return folder / "text8"
    with zipfile.ZipFile(folder / "text8.zip", "w") as archive:
        archive.writestr("text8", text)
    return folder / "text8.zip"


@pytest.mark.parametrize("zipped", [False, True])
def test_text8_chunks_each_split_dropping_the_last_partial_chunk(tmp_path: Path, text8_text: str, zipped: bool) -> None:
    file = write_text8(tmp_path / "text8", text8_text, zipped)
    chunk = 16
    for split, (start, end) in TEXT8_SMALL_SPLITS.items():
        text = text8_text[start:end]
        expected = [text[i : i + chunk] for i in range(0, len(text) // chunk * chunk, chunk)]
        for path in (file, file.parent):
            assert documents("text8", split, tmp_path, path, text8_chunk=chunk) == expected
    assert documents("text8", "train", tmp_path, file, text8_chunk=chunk)[-1] == text8_text[96:112]  # 112..120 dropped
    with pytest.raises(ValueError, match="fewer than one chunk"):
        load_documents(get_corpus("text8"), "validation", tmp_path, file, text8_chunk=41)


def text8_stream(text: str, chunk: int) -> list[int]:
    pieces = [text[i : i + chunk] for i in range(0, len(text) - chunk + 1, chunk)]
    return [t for piece in pieces for t in [*(TEXT8_IDS[c] for c in piece), TEXT8_EOS]]


def test_text8_blocks_and_text8_crop_windows(tmp_path: Path, text8_text: str) -> None:
    length = 8
    file = write_text8(tmp_path / "text8", text8_text, zipped=True)
    data = corpus_data(tmp_path, "text8", "text8", "text8", length, path=str(file))
    test_text = text8_text[160:]
    assert items(data.valid_dataset()) == expected_blocks(text8_stream(test_text, length), length, TEXT8_BOS,
                                                          TEXT8_EOS)

    crop = corpus_data(tmp_path, "text8-crop", "text8", "text8", length, path=str(file), seed=3)
    train = crop.train_dataset()
    assert isinstance(train, CroppedBlocks) and train.needs_epoch
    wide = expected_blocks(text8_stream(text8_text[:120], 2 * length), 2 * length, TEXT8_BOS, TEXT8_EOS)
    assert items(train.blocks) == wide  # 2L-character documents, 2L-token blocks
    assert len(train) == len(wide)
    assert items(crop.valid_dataset()) == items(data.valid_dataset())  # text8-crop validates on text8's L blocks
    again = corpus_data(tmp_path, "text8-crop", "text8", "text8", length, path=str(file), seed=3).train_dataset()
    for index in range(len(train)):
        window = train[(0, index)]["input_ids"].tolist()
        assert len(window) == length and window[0] == TEXT8_BOS and window[-1] == TEXT8_EOS
        starts = [s for s in range(length + 1) if wide[index][s + 1 : s + length - 1] == window[1:-1]]
        assert starts, f"block {index}: {window} is not a window of {wide[index]}"
        assert again[(0, index)]["input_ids"].tolist() == window  # a pure function of (seed, epoch, index)
        assert torch.equal(train[(0, index)]["attention_mask"], torch.ones(length, dtype=torch.long))
    assert any(train[(epoch, i)]["input_ids"].tolist() != train[(0, i)]["input_ids"].tolist()
               for epoch in range(1, 4) for i in range(len(train)))


def test_text8_cannot_be_unwrapped(tmp_path: Path) -> None:
    for train, valid in (("text8", "text8"), ("text8-crop", "text8"), ("ptb", "text8")):
        with pytest.raises(ValueError, match="wrap=true"):
            corpus_data(tmp_path, train, valid, "text8", 8, wrap=False)


# ------------------------------------------------------------------ 7. ag_news, scientific_papers

AG_NEWS = {
    "train": [
        ("Wall St. Bears Claw Back Into the Black (Reuters) Short-sellers, Wall Street's band, are \"green\".", 2),
        ("Oil and Economy Cloud Stocks' Outlook", 2),
    ],
    "test": [("Fears for T N pension after talks, unions say", 2), ("The Race is On: Second Private Team Sets", 3)],
}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_ag_news_tables_keep_the_text_column(tmp_path: Path, char_tok: str, fmt: str) -> None:
    folder = tmp_path / "ag_news"
    folder.mkdir()
    for split, rows in AG_NEWS.items():
        if fmt == "csv":
            with open(folder / f"{split}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["text", "label"])
                writer.writerows(rows)
        else:
            pq.write_table(pa.table({"text": [t for t, _ in rows], "label": [lab for _, lab in rows]}),
                           folder / f"{split}.parquet")
    for split in ("train", "test"):
        assert documents("ag_news", split, tmp_path, folder) == [t for t, _ in AG_NEWS[split]]
    data = corpus_data(tmp_path, "ag_news", "ag_news", char_tok, 12, path=str(folder))
    stream = [t for text, _ in AG_NEWS["test"] for t in [*encode(text), EOS_ID]]  # validation = test split
    assert items(data.valid_dataset()) == expected_blocks(stream, 12, BOS_ID, EOS_ID)


def test_scientific_papers_saved_dataset_dict_uses_the_article_column(tmp_path: Path, char_tok: str) -> None:
    def split(prefix: str) -> datasets.Dataset:
        return datasets.Dataset.from_dict({
            "article": [f"{prefix} article one ( see fig . 1 ) , with @xmath0 .", f"{prefix} article two ."],
            "abstract": [f"{prefix} abstract one", f"{prefix} abstract two"],
            "section_names": [["introduction", "methods"], ["results"]],
        })

    folder = tmp_path / "pubmed"
    datasets.DatasetDict({name: split(name) for name in SPLITS}).save_to_disk(str(folder))
    for name in SPLITS:
        rows = documents("scientific_papers_pubmed", name, tmp_path, folder)
        assert rows == split(name)["article"]
    data = corpus_data(tmp_path, "scientific_papers_pubmed", "scientific_papers_pubmed", char_tok, 12,
                       path=str(folder))
    articles = split("validation")["article"]
    assert detokenizers.scientific_papers(articles[0]) != articles[0]
    stream = [t for text in articles for t in [*encode(detokenizers.scientific_papers(text)), EOS_ID]]
    assert items(data.valid_dataset()) == expected_blocks(stream, 12, BOS_ID, EOS_ID)


# ------------------------------------------------------------------ 8. errors


def test_unknown_corpus_lists_the_valid_names(tmp_path: Path, char_tok: str) -> None:
    with pytest.raises(ValueError, match="unknown data set 'ptbb'") as error:
        get_corpus("ptbb")
    assert all(name in str(error.value) for name in CORPORA)
    with pytest.raises(ValueError, match="valid names"):
        corpus_data(tmp_path, "ptb", "wikitext", char_tok, 16)
    with pytest.raises(ValueError, match="unknown split"):
        load_documents(get_corpus("ptb"), "valid", tmp_path, tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_copy"
    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        load_documents(get_corpus("ptb"), "train", tmp_path / "cache", missing)
    assert str(missing) in str(error.value)


def test_folder_without_the_split_names_the_expected_files(tmp_path: Path, lm1b_dir: Path) -> None:
    folder = tmp_path / "ptb_partial"
    folder.mkdir()
    (folder / "ptb.train.txt").write_text(" a b \n")
    assert documents("ptb", "train", tmp_path, folder) == ["a b"]
    with pytest.raises(FileNotFoundError, match="no validation files for ptb") as error:
        load_documents(get_corpus("ptb"), "validation", tmp_path / "cache", folder)
    assert all(pattern in str(error.value) for pattern in ("*valid*", "*validation*", "*dev*", str(folder)))
    for file in (lm1b_dir / LM1B_ROOT / "heldout-monolingual.tokenized.shuffled").iterdir():
        file.unlink()
    with pytest.raises(FileNotFoundError, match="heldout-monolingual.tokenized.shuffled/news.en.heldout-"):
        load_documents(get_corpus("lm1b"), "test", tmp_path / "cache", lm1b_dir)


def test_multi_split_corpus_needs_a_folder(tmp_path: Path, ptb_dir: Path) -> None:
    with pytest.raises(ValueError, match="must be a folder") as error:
        load_documents(get_corpus("ptb"), "validation", tmp_path / "cache", ptb_dir / "ptb.valid.txt")
    assert "train/validation/test" in str(error.value) and "ptb.valid.txt" in str(error.value)


def test_mixed_file_types_are_refused_but_text_suffixes_mix(tmp_path: Path) -> None:
    folder = tmp_path / "owt"
    write_owt(folder, "jsonl")
    write_owt(folder, "txt")
    with pytest.raises(ValueError, match=r"mixed file types \['.jsonl', '.txt'\]"):
        load_documents(get_corpus("openwebtext"), "train", tmp_path / "cache", folder)
    (folder / "owt.jsonl").unlink()
    (folder / "more.raw").write_text("Seventh.\n\nEighth.\n")  # .raw and .txt: both plain text
    assert documents("openwebtext", "train", tmp_path, folder) == ["Seventh.", "Eighth.", *OWT_DOCS]


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the Hugging Face caches at empty folders, so nothing the user has cached is found."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")


def test_offline_without_a_copy_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_hf_cache: None, no_network: list[tuple]
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # datasets / huggingface_hub read the variable at import; mirror what setting it before starting does.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "hub_reachable", lambda *args, **kwargs: False)
    assert hub.datasets_offline()
    with pytest.raises(DataUnavailableError) as error:
        load_documents(get_corpus("wikitext2"), "validation", tmp_path)
    message = str(error.value)
    assert "'wikitext2'" in message and "HF_DATASETS_OFFLINE=1" in message and "data.path" in message
    assert "offline mode is on" in message
    assert no_network == []


def test_unreachable_url_only_corpus_says_how_to_get_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_hf_cache: None, no_network: list[tuple]
) -> None:
    for variable in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *args, **kwargs: False)
    downloads: list[str] = []

    def unreachable(url: str, *args: object, **kwargs: object) -> None:
        downloads.append(url)
        raise urllib.error.URLError("unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    assert not hub.datasets_offline()
    with pytest.raises(DataUnavailableError) as error:
        load_documents(get_corpus("lambada"), "validation", tmp_path)
    message = str(error.value)
    assert "'lambada'" in message and "HF_DATASETS_OFFLINE=1" in message and "data.path" in message
    assert "unreachable" in message and "lambada_test.jsonl" in message
    assert downloads in ([], [get_corpus("lambada").urls["test"]])
    assert not (tmp_path / "downloads" / "lambada" / "lambada_test.jsonl").exists()  # no half download left
    assert no_network == []


# ------------------------------------------------------------------ 9. the token cache


def test_cache_reuse_and_what_invalidates_it(
    tmp_path: Path, ptb_dir: Path, char_tok: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = corpus_data(tmp_path, "ptb", "ptb", char_tok, 16, path=str(ptb_dir))
    blocks = items(first.valid_dataset())
    (entry,) = entries(cache)
    assert entry.startswith("ptb-validation-")
    meta = json.loads((cache / "tokenized" / entry / "meta.json").read_text())
    lines = [line.strip() for line in PTB_LINES["valid"]]
    stream = [t for line in lines for t in [*encode(detokenizers.ptb(line)), EOS_ID]]
    assert meta["num_documents"] == len(lines) and meta["num_tokens"] == len(stream)
    assert np.load(cache / "tokenized" / entry / "tokens.npy").tolist() == stream
    assert np.load(cache / "tokenized" / entry / "offsets.npy").tolist()[-1] == len(stream)

    real_build = data_cache._build
    builds: list[str] = []

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("re-tokenized a cached split")

    def counting_build(entry: Path, key: dict, *args: object, **kwargs: object) -> None:
        builds.append(entry.name)
        real_build(entry, key, *args, **kwargs)

    # Same settings: loaded, not built.
    monkeypatch.setattr(data_cache, "_build", no_build)
    assert items(corpus_data(tmp_path, "ptb", "ptb", char_tok, 16, path=str(ptb_dir)).valid_dataset()) == blocks
    # A new block size cuts the same cached stream differently.
    longer = corpus_data(tmp_path, "ptb", "ptb", char_tok, 40, path=str(ptb_dir)).valid_dataset()
    assert items(longer) == expected_blocks(stream, 40, BOS_ID, EOS_ID) and len(longer) != len(blocks)
    assert entries(cache) == {entry}

    monkeypatch.setattr(data_cache, "_build", counting_build)
    # No EOS between documents: another entry, and the stream lacks the EOS.
    no_eos = corpus_data(tmp_path, "ptb", "ptb", char_tok, 16, path=str(ptb_dir), insert_valid_eos=False)
    no_eos_stream = [t for line in lines for t in encode(detokenizers.ptb(line))]
    assert items(no_eos.valid_dataset()) == expected_blocks(no_eos_stream, 16, BOS_ID, EOS_ID)
    # Another tokenizer (one extra character): another entry.
    other_tok = save_char_tokenizer(tmp_path / "other_tokenizer", extra="\u00e9")
    assert items(corpus_data(tmp_path, "ptb", "ptb", other_tok, 16, path=str(ptb_dir)).valid_dataset()) == blocks
    assert len(builds) == 2 and len(entries(cache)) == 3

    # The source file rewritten: another entry holding the new text.
    new_lines = [" a new <unk> line \n", " and the company 's second \n"]
    (ptb_dir / "ptb.valid.txt").write_text("".join(new_lines))
    new_stream = [t for line in new_lines for t in [*encode(detokenizers.ptb(line.strip())), EOS_ID]]
    rebuilt = corpus_data(tmp_path, "ptb", "ptb", char_tok, 16, path=str(ptb_dir)).valid_dataset()
    assert items(rebuilt) == expected_blocks(new_stream, 16, BOS_ID, EOS_ID)
    assert len(builds) == 3 and len(entries(cache)) == 4


def test_rewritten_table_file_is_reread(tmp_path: Path, char_tok: str) -> None:
    """A jsonl copy rewritten in place (same name) gives the new documents, not the Arrow cache of the old."""
    file = write_owt(tmp_path / "owt", "jsonl")
    assert documents("openwebtext", "train", tmp_path, file) == OWT_DOCS
    data = corpus_data(tmp_path, "openwebtext", "openwebtext", char_tok, 10, path=str(file))
    assert len(data.train_dataset()) == len(expected_blocks([t for d in OWT_DOCS for t in [*encode(d), 2]], 10, 1, 2))
    new_docs = ["Completely different.", "Also new, and longer than before: " * 3]
    write_owt(tmp_path / "owt", "jsonl", new_docs)
    assert documents("openwebtext", "train", tmp_path, file) == new_docs
    stream = [t for doc in new_docs for t in [*encode(doc), EOS_ID]]
    fresh = corpus_data(tmp_path, "openwebtext", "openwebtext", char_tok, 10, path=str(file))
    assert items(fresh.train_dataset()) == expected_blocks(stream, 10, BOS_ID, EOS_ID)


# ------------------------------------------------------------------ 10. real tokenizers and PTB (../shared/data)


def test_real_ptb_with_gpt2_tokenizer(tmp_path: Path, shared_data: Path) -> None:
    tokenizer_dir = shared_data / "gpt2_tokenizer"
    block_size = 128
    data = corpus_data(tmp_path, "ptb", "ptb", str(tokenizer_dir), block_size, path=str(shared_data / "ptb"))
    assert (data.bos_id, data.eos_id) == (50256, 50256)
    valid = data.valid_dataset()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lines = [line.strip() for line in (shared_data / "ptb" / "ptb.valid.txt").read_text().splitlines()]
    assert len(lines) == 3370
    encoded = tokenizer([detokenizers.ptb(line) for line in lines], add_special_tokens=False)["input_ids"]
    stream = [t for ids in encoded for t in [*ids, 50256]]
    (entry,) = entries(tmp_path / "cache")
    meta = json.loads((tmp_path / "cache" / "tokenized" / entry / "meta.json").read_text())
    assert meta["num_tokens"] == len(stream) and meta["num_documents"] == 3370
    assert len(valid) == len(stream) // (block_size - 2)
    body = np.concatenate([valid[i]["input_ids"][1:-1].numpy() for i in range(len(valid))])
    assert body.tolist() == stream[: len(body)]
    assert valid[len(valid) - 1]["input_ids"][0] == 50256 and valid[len(valid) - 1]["input_ids"][-1] == 50256


def test_real_bert_tokenizer_pads_lm1b_sentences(tmp_path: Path, lm1b_dir: Path, shared_data: Path) -> None:
    tokenizer_dir = str(shared_data / "bert_base_uncased")
    block_size = 16
    data = corpus_data(tmp_path, "lm1b", "lm1b", tokenizer_dir, block_size, wrap=False, path=str(lm1b_dir))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for dataset, files in ((data.train_dataset(), LM1B_TRAIN), (data.valid_dataset(), LM1B_HELDOUT)):
        sentences = [line for lines in files.values() for line in lines]
        assert len(dataset) == len(sentences)
        for i, sentence in enumerate(sentences):
            # The original pipeline's unwrapped path: [CLS] ... [SEP] [PAD] ..., truncated to block_size.
            reference = tokenizer(detokenizers.lm1b(sentence), max_length=block_size, truncation=True,
                                  padding="max_length")
            item = dataset[i]
            assert item["input_ids"].tolist() == reference["input_ids"], sentence
            assert item["attention_mask"].tolist() == reference["attention_mask"], sentence
            ids = item["input_ids"].tolist()
            n = int(item["attention_mask"].sum())
            assert ids[0] == 101 and ids[n - 1] == 102 and ids[n:] == [0] * (block_size - n)
