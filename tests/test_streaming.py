"""data.streaming=true: OpenWebText blocks made on the fly, sharded, and resumable by skipping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from dataloader import CorpusData, DataModule, StreamingBlocks, WrappedBlocks

WORDS = "the quick brown fox jumps over the lazy dog while a small bird sings".split()


def write_owt(path: Path, num_documents: int = 30) -> Path:
    """OpenWebText-like plain text: documents separated by blank lines, of varying length."""
    docs = [" ".join(WORDS[(d + k) % len(WORDS)] for k in range(5 + 3 * (d % 7))) for d in range(num_documents)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


def make_data(tmp_path: Path, path: Path, streaming: bool) -> CorpusData:
    return CorpusData(train="openwebtext", valid="openwebtext", tokenizer_name_or_path="text8", block_size=24,
                      streaming=streaming, cache_dir=str(tmp_path / "cache"), path=str(path))


def blocks_of(dataset: StreamingBlocks) -> list[torch.Tensor]:
    return [item["input_ids"] for item in dataset]


def test_one_shard_streams_exactly_the_cached_blocks(tmp_path: Path) -> None:
    path = write_owt(tmp_path / "owt.txt")
    streamed = blocks_of(make_data(tmp_path, path, streaming=True).train_dataset())
    cached = make_data(tmp_path, path, streaming=False).train_dataset()
    assert isinstance(cached, WrappedBlocks) and len(streamed) == len(cached) > 5
    assert all(torch.equal(s, cached[i]["input_ids"]) for i, s in enumerate(streamed))


def test_ranks_take_disjoint_documents_and_skip_resumes(tmp_path: Path) -> None:
    path = write_owt(tmp_path / "owt.txt", num_documents=60)
    data = make_data(tmp_path, path, streaming=True)
    shards = []
    for rank in range(2):
        dataset = StreamingBlocks(data, "openwebtext")
        dataset.configure(rank=rank, world_size=2, batch_size=2)
        shards.append(blocks_of(dataset))
    assert shards[0] and shards[1] and not torch.equal(shards[0][0], shards[1][0])
    resumed = StreamingBlocks(data, "openwebtext")
    resumed.configure(rank=1, world_size=2, batch_size=2, skip_batches=3)
    rest = blocks_of(resumed)
    assert len(rest) == len(shards[1]) - 6
    assert all(torch.equal(a, b) for a, b in zip(rest, shards[1][6:], strict=True))


def test_workers_interleave_and_resume_exactly(tmp_path: Path) -> None:
    """With 2 DataLoader workers, batch i comes from worker i mod 2; skipping c batches resumes at batch c."""
    path = write_owt(tmp_path / "owt.txt", num_documents=80)
    data = make_data(tmp_path, path, streaming=True)

    def batches(skip: int) -> list[torch.Tensor]:
        dataset = StreamingBlocks(data, "openwebtext")
        dataset.configure(rank=0, world_size=1, batch_size=2, skip_batches=skip)
        loader = DataLoader(dataset, batch_size=2, num_workers=2, drop_last=True)
        return [b["input_ids"] for b in loader]

    full, rest = batches(0), batches(3)
    assert len(full) > 6
    # Both workers run to their own end, so the tail lengths can differ by the interleaving; the
    # resumed sequence must be exactly the uninterrupted one from batch 3 on, as far as both go.
    assert all(torch.equal(a, b) for a, b in zip(rest, full[3:], strict=False))
    assert len(rest) >= len(full) - 3 - 1


def test_datamodule_configures_the_stream_from_its_state(tmp_path: Path) -> None:
    data = make_data(tmp_path, write_owt(tmp_path / "owt.txt"), streaming=True)
    module = DataModule(data, batch_size=2, eval_batch_size=2)
    module.load_state_dict({"epoch": 0, "batches": 2, "batch_size": 2, "world_size": 1})
    loader = module.train_dataloader()
    assert isinstance(loader.dataset, StreamingBlocks) and loader.dataset.skip_batches == 2


def test_streaming_reads_jsonl_and_is_rejected_where_it_does_not_apply(tmp_path: Path) -> None:
    path = tmp_path / "owt.jsonl"
    path.write_text("\n".join(json.dumps({"text": " ".join(WORDS[: 4 + d])}) for d in range(10)) + "\n")
    assert len(blocks_of(make_data(tmp_path, path, streaming=True).train_dataset())) > 0
    with pytest.raises(ValueError, match="streaming"):
        CorpusData(train="ptb", valid="ptb", tokenizer_name_or_path="text8", block_size=24, streaming=True)
