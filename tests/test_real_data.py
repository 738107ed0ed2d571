"""The named data sets on the real files in ../shared/data (skipped without it), GPT-2 tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from dataloader import CorpusData
from detokenizers import lambada, wikitext

BLOCK = 128


def gpt2(shared_data: Path) -> str:
    return str(shared_data / "gpt2_tokenizer")


def expected_block_count(token_lists: list[list[int]]) -> int:
    """Blocks of BLOCK - 2 tokens from the documents with one EOS after each, remainder dropped."""
    return sum(len(t) + 1 for t in token_lists) // (BLOCK - 2)


def test_lambada_jsonl(tmp_path: Path, shared_data: Path) -> None:
    path = shared_data / "lambada" / "lambada_test.jsonl"
    data = CorpusData(train="lambada", valid="lambada", tokenizer_name_or_path=gpt2(shared_data), block_size=BLOCK,
                      cache_dir=str(tmp_path), path=str(path))
    records = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(gpt2(shared_data))
    tokens = tokenizer([lambada(r) for r in records], add_special_tokens=False)["input_ids"]
    valid = data.valid_dataset()
    assert len(records) == 5153 and len(valid) == expected_block_count(tokens)
    first = valid[0]["input_ids"]
    assert first[0] == first[-1] == tokenizer.eos_token_id  # GPT-2: BOS = EOS = <|endoftext|>
    assert first[1 : 1 + len(tokens[0])].tolist() == tokens[0]  # "\n" + passage, detokenized


def test_wikitext2_test_split(tmp_path: Path, shared_data: Path) -> None:
    folder = shared_data / "wikitext2_raw"  # only wiki.test.raw: the test split works on its own
    data = CorpusData(train="wikitext2", valid="wikitext2", tokenizer_name_or_path=gpt2(shared_data),
                      block_size=BLOCK, cache_dir=str(tmp_path), path=str(folder))
    stream = data.token_stream("valid", data.valid_corpus, "test")
    lines = (folder / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    rows = [line if line.strip() else "" for line in lines]  # the hub's rows: blank lines are ""
    assert stream.num_documents == len(rows) == 4358
    tokenizer = AutoTokenizer.from_pretrained(gpt2(shared_data))
    expected = tokenizer([wikitext(r) for r in rows], add_special_tokens=False)["input_ids"]
    assert len(stream.tokens) == sum(len(t) + 1 for t in expected)
    with pytest.raises(FileNotFoundError, match="validation"):
        data.valid_dataset()  # no wiki.valid.raw in this copy: a clear error naming the split


def test_openwebtext_sample_streams_the_cached_blocks(tmp_path: Path, shared_data: Path) -> None:
    path = shared_data / "openwebtext_sample" / "openwebtext_first100docs.txt"

    def data(streaming: bool) -> CorpusData:
        return CorpusData(train="openwebtext", valid="openwebtext", tokenizer_name_or_path=gpt2(shared_data),
                          block_size=BLOCK, streaming=streaming, cache_dir=str(tmp_path), path=str(path))

    cached = data(streaming=False).train_dataset()
    streamed = [item["input_ids"] for item in data(streaming=True).train_dataset()]
    assert len(cached) == len(streamed) > 500
    assert all(torch.equal(cached[i]["input_ids"], s) for i, s in enumerate(streamed))
