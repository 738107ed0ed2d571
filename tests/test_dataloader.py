"""Data sets by config: the synthetic corpus, text files, wrapping, tokenizers, decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from dataloader import (
    SyntheticData,
    TextFiles,
    block_special_ids,
    decode,
    load_tokenizer,
    vocab_and_mask,
    wrap_documents,
)
from synthetic import BOS_ID, EOS_ID, MASK_ID, WORD_OFFSET

# ------------------------------------------------------------------ synthetic data


@pytest.fixture(scope="module")
def synthetic() -> SyntheticData:
    return SyntheticData(block_size=32, num_train_sequences=2_000, num_valid_sequences=200, seed=0)


def test_synthetic_blocks_have_bos_words_eos(synthetic: SyntheticData) -> None:
    train, valid = synthetic.train_dataset(), synthetic.valid_dataset()
    assert len(train) == 2_000 and len(valid) == 200
    assert synthetic.has_true_nll
    item = train[0]
    assert set(item) == {"input_ids", "attention_mask", "true_nll"}
    assert item["input_ids"].shape == (32,) and item["input_ids"].dtype == torch.long
    assert torch.equal(item["attention_mask"], torch.ones(32, dtype=torch.long))
    assert item["true_nll"].shape == () and item["true_nll"].dtype == torch.float64
    for blocks in (train.blocks, valid.blocks):
        assert (blocks[:, 0] == BOS_ID).all() and (blocks[:, -1] == EOS_ID).all()
        inner = blocks[:, 1:-1]
        assert (inner >= WORD_OFFSET).all() and (inner < len(synthetic.tokenizer)).all()


def test_synthetic_items_batch_with_the_default_collate(synthetic: SyntheticData) -> None:
    batch = next(iter(DataLoader(synthetic.train_dataset(), batch_size=8)))
    assert batch["input_ids"].shape == (8, 32) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].shape == (8, 32)
    assert batch["true_nll"].shape == (8,) and batch["true_nll"].dtype == torch.float64


def test_synthetic_true_nll_is_minus_log_prob_of_the_words(synthetic: SyntheticData) -> None:
    train = synthetic.train_dataset()
    words = train.blocks[:, 1:-1].long() - WORD_OFFSET
    torch.testing.assert_close(train.true_nll, -synthetic.source.log_prob(words), rtol=0, atol=0)
    assert (train.true_nll > 0).all() and torch.isfinite(train.true_nll).all()
    torch.testing.assert_close(synthetic.true_nll_of(train.blocks), train.true_nll, rtol=0, atol=0)


def test_true_nll_of_is_infinite_for_blocks_that_are_not_well_formed(synthetic: SyntheticData) -> None:
    blocks = synthetic.valid_dataset().blocks[:5].long().clone()
    blocks[0, 0] = EOS_ID  # no BOS
    blocks[1, -1] = BOS_ID  # no EOS
    blocks[2, 7] = MASK_ID  # special token inside
    blocks[3, 1:3] = WORD_OFFSET + synthetic.source.words.index(".")  # ". ." never occurs
    nll = synthetic.true_nll_of(blocks)
    assert torch.isinf(nll[:4]).all() and torch.isfinite(nll[4])


def test_synthetic_splits_are_deterministic_and_independent(synthetic: SyntheticData) -> None:
    again = SyntheticData(block_size=32, num_train_sequences=2_000, num_valid_sequences=200, seed=0)
    assert torch.equal(again.train_dataset().blocks, synthetic.train_dataset().blocks)
    assert torch.equal(again.valid_dataset().blocks, synthetic.valid_dataset().blocks)
    # Train and valid come from different streams: the valid blocks are not the first train blocks.
    assert not torch.equal(synthetic.train_dataset().blocks[:200], synthetic.valid_dataset().blocks)
    other = SyntheticData(block_size=32, num_train_sequences=200, num_valid_sequences=20, seed=1)
    assert not torch.equal(other.valid_dataset().blocks, synthetic.valid_dataset().blocks[:20])


def test_synthetic_tokenizer_round_trip(synthetic: SyntheticData) -> None:
    tokenizer = synthetic.tokenizer
    assert vocab_and_mask(tokenizer) == (WORD_OFFSET + synthetic.source.num_words, MASK_ID)
    block = synthetic.valid_dataset().blocks[0].tolist()
    text = tokenizer.decode(block, skip_special_tokens=True)
    assert tokenizer.encode(text) == block[1:-1]
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert decode(tokenizer, torch.tensor([block]), MASK_ID) == [text]


def test_synthetic_rejects_blocks_without_room_for_a_word() -> None:
    with pytest.raises(ValueError, match="block_size"):
        SyntheticData(block_size=2)


# ------------------------------------------------------------------ wrapping


def test_wrap_documents_inserts_eos_and_cuts_blocks() -> None:
    bos, eos = 90, 99
    blocks = wrap_documents([[1, 2, 3], [4, 5], [6]], block_size=5, bos_id=bos, eos_id=eos)
    # stream 1 2 3 E 4 5 E 6 E (9 tokens) -> 3 chunks of 3
    expected = [[bos, 1, 2, 3, eos], [bos, eos, 4, 5, eos], [bos, eos, 6, eos, eos]]
    assert blocks.dtype == torch.long and blocks.tolist() == expected


def test_wrap_documents_drops_the_remainder() -> None:
    blocks = wrap_documents([[1, 2, 3, 4], [5, 6, 7]], block_size=4, bos_id=0, eos_id=9)
    # stream 1 2 3 4 9 5 6 7 9 (9 tokens) -> floor(9 / 2) = 4 blocks, the final 9 dropped
    assert blocks.tolist() == [[0, 1, 2, 9], [0, 3, 4, 9], [0, 9, 5, 9], [0, 6, 7, 9]]


@pytest.mark.parametrize("block_size", [3, 7, 16, 64])
def test_wrap_documents_block_count(block_size: int) -> None:
    rng = np.random.default_rng(block_size)
    docs = [rng.integers(10, 100, size=rng.integers(0, 40)).tolist() for _ in range(30)]
    total = sum(len(doc) + 1 for doc in docs)
    blocks = wrap_documents(docs, block_size, bos_id=1, eos_id=2)
    assert blocks.shape == (total // (block_size - 2), block_size)
    assert (blocks[:, 0] == 1).all() and (blocks[:, -1] == 2).all()
    stream = [token for doc in docs for token in [*doc, 2]]
    assert blocks[:, 1:-1].flatten().tolist() == stream[: blocks.shape[0] * (block_size - 2)]


def test_wrap_documents_errors() -> None:
    with pytest.raises(ValueError, match=r"only 5 tokens .* needs at least 6"):
        wrap_documents([[1, 2], [3]], block_size=8, bos_id=0, eos_id=9)
    with pytest.raises(ValueError, match="only 0 tokens"):
        wrap_documents([], block_size=8, bos_id=0, eos_id=9)
    with pytest.raises(ValueError, match="block_size"):
        wrap_documents([[1, 2, 3]], block_size=2, bos_id=0, eos_id=9)


# ------------------------------------------------------------------ text files

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def word_tokenizer(tmp_path: Path, specials: dict[str, str], name: str = "tok") -> Path:
    """Save a real word-level tokenizer (specials first, then WORDS) and return its folder."""
    vocab = {token: i for i, token in enumerate([*specials.values(), *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials.get("unk_token")))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **specials)
    folder = tmp_path / name
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tokenizer_dir(tmp_path: Path) -> Path:
    return word_tokenizer(tmp_path, {"unk_token": "[UNK]", "bos_token": "[BOS]", "eos_token": "[EOS]"})


def ids_of(text: str) -> list[int]:
    """Token ids of ``text`` under ``tokenizer_dir`` (3 specials first)."""
    return [3 + WORDS.index(word) for word in text.split()]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_text_files_from_a_folder_a_file_and_a_list(tmp_path: Path, tokenizer_dir: Path) -> None:
    folder = tmp_path / "corpus"
    b = write(folder / "b.txt", "gamma delta\n\nepsilon\n")
    a = write(folder / "a.txt", "alpha beta\n\n\n  beta alpha  \n")
    write(folder / "notes.md", "theta theta theta")  # not *.txt: ignored
    valid = write(tmp_path / "valid.txt", "zeta eta zeta eta zeta eta")
    docs = ["alpha beta", "beta alpha", "gamma delta", "epsilon"]  # a.txt then b.txt
    expected = wrap_documents([ids_of(d) for d in docs], 4, bos_id=1, eos_id=2)
    for train_path in (str(folder), [str(a), str(b)]):
        data = TextFiles(train_path, str(tokenizer_dir), block_size=4, valid_path=str(valid))
        assert not data.has_true_nll
        assert data.documents()["train"] == docs
        assert torch.equal(data.train_dataset().blocks, expected)
        item = data.valid_dataset()[0]
        assert set(item) == {"input_ids", "attention_mask"}
        assert item["input_ids"].tolist() == [1, *ids_of("zeta eta"), 2]
    single = TextFiles(str(a), str(tokenizer_dir), block_size=4, valid_path=str(valid))
    assert single.documents()["train"] == ["alpha beta", "beta alpha"]
    batch = next(iter(DataLoader(single.train_dataset(), batch_size=2)))
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"].sum() == 8


@pytest.mark.parametrize(
    ("separator", "expected"),
    [
        ("blank_line", ["alpha beta\ngamma", "delta"]),
        ("line", ["alpha beta", "gamma", "delta"]),
        ("file", ["alpha beta\ngamma\n\ndelta"]),
    ],
)
def test_document_separators(tmp_path: Path, tokenizer_dir: Path, separator: str, expected: list[str]) -> None:
    train = write(tmp_path / "train.txt", "alpha beta\ngamma\n\ndelta\n")
    data = TextFiles(str(train), str(tokenizer_dir), 4, valid_path=str(train), document_separator=separator)
    assert data.documents()["train"] == expected


def test_validation_split_takes_the_last_documents(tmp_path: Path, tokenizer_dir: Path) -> None:
    docs = [" ".join(WORDS[i : i + 3]) for i in range(5)] * 2  # 10 documents
    train = write(tmp_path / "train.txt", "\n".join(docs))
    data = TextFiles(str(train), str(tokenizer_dir), 4, valid_fraction=0.2, document_separator="line")
    assert data.documents() == {"train": docs[:8], "valid": docs[8:]}
    tiny = TextFiles(str(train), str(tokenizer_dir), 4, valid_fraction=0.01, document_separator="line")
    assert tiny.documents()["valid"] == docs[9:]  # at least one document
    assert tiny.valid_dataset().blocks.shape == (2, 4)  # 3 words + EOS = 4 tokens, 2 per block
    whole = TextFiles(str(train), str(tokenizer_dir), 4, document_separator="file")
    with pytest.raises(ValueError, match="1 document"):
        whole.documents()


def test_relative_paths_are_relative_to_the_working_directory(
    tmp_path: Path, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "data" / "t.txt", "alpha beta gamma\n\ndelta epsilon\n")
    monkeypatch.chdir(tmp_path)
    data = TextFiles("data/t.txt", str(tokenizer_dir), 4, valid_path="data")
    assert data.documents()["valid"] == ["alpha beta gamma", "delta epsilon"]


def test_text_files_errors(tmp_path: Path, tokenizer_dir: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        TextFiles(str(missing), str(tokenizer_dir), 8)
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_folder"):
        TextFiles(str(tmp_path / "empty_folder"), str(tokenizer_dir), 8)
    short = write(tmp_path / "short.txt", "alpha beta")
    data = TextFiles(str(short), str(tokenizer_dir), block_size=8, valid_path=str(short))
    with pytest.raises(ValueError, match=r"train split .*short.txt.*only 3 tokens.*block_size=8 needs at least 6"):
        data.train_dataset()
    empty = write(tmp_path / "empty.txt", "\n\n")
    with pytest.raises(ValueError, match="only 0 tokens"):
        TextFiles(str(short), str(tokenizer_dir), 4, valid_path=str(empty)).valid_dataset()
    with pytest.raises(ValueError, match="document_separator"):
        TextFiles(str(short), str(tokenizer_dir), 4, document_separator="paragraph")  # type: ignore[arg-type]


# ------------------------------------------------------------------ tokenizers


def test_block_special_ids_fall_back_from_bos_to_eos_to_cls(tmp_path: Path) -> None:
    eos_only = load_tokenizer(str(word_tokenizer(tmp_path, {"unk_token": "[UNK]", "eos_token": "[EOS]"}, "e")))
    assert block_special_ids(eos_only) == (1, 1)
    bert_like = load_tokenizer(str(word_tokenizer(tmp_path, {"cls_token": "[CLS]", "sep_token": "[SEP]"}, "b")))
    assert block_special_ids(bert_like) == (0, 1)
    bare = load_tokenizer(str(word_tokenizer(tmp_path, {"unk_token": "[UNK]"}, "n")))
    with pytest.raises(ValueError, match="no BOS, EOS, CLS or SEP"):
        block_special_ids(bare)


def test_vocab_and_mask_with_and_without_a_mask_token(tmp_path: Path, tokenizer_dir: Path) -> None:
    without = load_tokenizer(str(tokenizer_dir))
    assert vocab_and_mask(without) == (3 + len(WORDS) + 1, 3 + len(WORDS))
    with_mask = load_tokenizer(str(word_tokenizer(tmp_path, {"unk_token": "[UNK]", "mask_token": "[MASK]"}, "m")))
    assert vocab_and_mask(with_mask) == (2 + len(WORDS), 1)


def test_decode_renders_masks_and_skips_special_tokens(tokenizer_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tokenizer_dir))
    _, mask = vocab_and_mask(tokenizer)  # outside the vocabulary
    ids = torch.tensor([[1, *ids_of("alpha beta"), mask, mask, *ids_of("gamma"), 2], [1, mask, 3, 4, 5, 6, 2]])
    assert decode(tokenizer, ids, mask) == ["alpha beta [MASK] [MASK] gamma", "[MASK] alpha beta gamma delta"]


def test_unknown_hub_tokenizer_fails_fast_with_a_clear_message() -> None:
    with pytest.raises(OSError) as error:
        load_tokenizer("no-such-org/no-such-tokenizer-5c1f")
    message = str(error.value)
    assert "no-such-org/no-such-tokenizer-5c1f" in message
    assert "local directory" in message and "data.tokenizer_name_or_path=" in message and "HF_HUB_OFFLINE" in message


def test_missing_local_tokenizer_directory_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing_tok"):
        load_tokenizer(str(tmp_path / "missing_tok"))


# ------------------------------------------------------------------ real tokenizers and text


def test_ptb_with_the_gpt2_tokenizer(shared_data: Path) -> None:
    data = TextFiles(
        str(shared_data / "ptb" / "ptb.valid.txt"),
        str(shared_data / "gpt2_tokenizer"),
        block_size=128,
        document_separator="line",
    )
    assert vocab_and_mask(data.tokenizer) == (50258, 50257)
    assert block_special_ids(data.tokenizer) == (50256, 50256)
    for dataset in (data.train_dataset(), data.valid_dataset()):
        blocks = dataset.blocks
        assert blocks.shape[0] > 0 and blocks.shape[1] == 128
        assert (blocks[:, 0] == 50256).all() and (blocks[:, -1] == 50256).all()
        assert blocks.max() < 50257
    documents = data.documents()
    assert documents["train"][0].startswith("consumers may want to move their telephones")
    text = decode(data.tokenizer, data.train_dataset().blocks[:1], 50257)[0]
    assert text.startswith("consumers may want to move their telephones")


def test_bert_tokenizer_uses_cls_and_sep(shared_data: Path) -> None:
    tokenizer = load_tokenizer(str(shared_data / "bert_base_uncased"))
    assert block_special_ids(tokenizer) == (101, 102)
    assert vocab_and_mask(tokenizer) == (30522, 103)
    ids = torch.tensor([[101, *tokenizer.encode("the cat sat", add_special_tokens=False), 103, 102]])
    assert decode(tokenizer, ids, 103) == ["the cat sat [MASK]"]
