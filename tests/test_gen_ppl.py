"""Generative perplexity: scoring against a slow reference, chunking, padding, loading, helpers.

The eval model is a tiny random GPT-2 (context 16) with a word-level tokenizer, saved to a
temporary directory, so everything runs on CPU in seconds and never touches the network.
"""

from __future__ import annotations

import math
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import constants
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import hub
import metrics
from metrics import GenerativePerplexity, truncate_at_eos, unigram_entropy

EOS = "<|endoftext|>"
WORDS = [f"w{i}" for i in range(29)]  # ids 1..29; EOS is id 0
N_POSITIONS = 16


def save_tiny_gpt2(directory: Path, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Path:
    """A random GPT-2 (2 layers, width 32, context 16) and its tokenizer in ``directory``."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=N_POSITIONS, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(directory)  # dropout 0.1: only eval mode is deterministic
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    vocab = {EOS: 0, **{word: i + 1 for i, word in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=EOS, eos_token=EOS)
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), tokenizer)


@pytest.fixture(scope="module")
def reference_model(model_dir: Path) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(model_dir).double().eval()


def text_of(ids: list[int]) -> str:
    return " ".join(WORDS[i - 1] for i in ids)


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(1, len(WORDS) + 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_nll(model: GPT2LMHeadModel, ids: list[int], bos_id: int = 0) -> torch.Tensor:
    """``-sum_t log softmax(logits_{t-1})[x_t]`` of ``[BOS] + ids``, one unbatched forward."""
    x = torch.tensor([bos_id, *ids])  # (T + 1,)
    with torch.no_grad():
        log_probs = model(x[None]).logits[0].double().log_softmax(-1)  # (T + 1, V)
    return -log_probs[:-1].gather(-1, x[1:, None]).sum()


def test_score_matches_slow_reference(model_dir: Path, reference_model: GPT2LMHeadModel) -> None:
    ids = random_ids(12, seed=1)
    scorer = GenerativePerplexity(str(model_dir), dtype=torch.float64)
    assert scorer.tokenizer(text_of(ids), add_special_tokens=False)["input_ids"] == ids
    (result,) = scorer.score([text_of(ids)])
    expected = reference_nll(reference_model, ids)
    torch.testing.assert_close(torch.tensor(result["nll_sum"], dtype=torch.float64), expected, rtol=1e-5, atol=1e-5)
    assert result["num_tokens"] == 12
    assert math.isclose(result["ppl"], math.exp(float(expected) / 12), rel_tol=1e-5)


def test_float32_model_is_close_to_float64_reference(model_dir: Path, reference_model: GPT2LMHeadModel) -> None:
    ids = random_ids(15, seed=2)
    (result,) = GenerativePerplexity(str(model_dir)).score([text_of(ids)])
    expected = float(reference_nll(reference_model, ids))
    assert math.isclose(result["nll_sum"], expected, rel_tol=1e-4)


@pytest.mark.parametrize(("max_length", "chunk_sizes"), [(None, [15, 15, 10]), (8, [7, 7, 7, 7, 7, 5])])
def test_long_text_is_scored_in_bos_prefixed_chunks(
    model_dir: Path, reference_model: GPT2LMHeadModel, max_length: int | None, chunk_sizes: list[int]
) -> None:
    ids = random_ids(40, seed=3)
    scorer = GenerativePerplexity(str(model_dir), dtype=torch.float64, max_length=max_length)
    (result,) = scorer.score([text_of(ids)])
    starts = [sum(chunk_sizes[:k]) for k in range(len(chunk_sizes))]
    expected = sum(reference_nll(reference_model, ids[s : s + n]) for s, n in zip(starts, chunk_sizes, strict=True))
    assert result["num_tokens"] == 40 == sum(chunk_sizes)
    torch.testing.assert_close(torch.tensor(result["nll_sum"], dtype=torch.float64), expected, rtol=1e-5, atol=1e-5)


def test_padding_in_a_batch_changes_nothing(model_dir: Path) -> None:
    texts = [text_of(random_ids(n, seed=n)) for n in (3, 40, 1, 11, 15, 16)] + [""]
    together = GenerativePerplexity(str(model_dir), dtype=torch.float64, batch_size=4).score(texts)
    alone = GenerativePerplexity(str(model_dir), dtype=torch.float64, batch_size=1)
    for text, batched in zip(texts, together, strict=True):
        (single,) = alone.score([text])
        assert batched["num_tokens"] == single["num_tokens"] == len(text.split())
        assert math.isclose(batched["nll_sum"], single["nll_sum"], rel_tol=1e-9, abs_tol=1e-9)
    assert together[-1]["nll_sum"] == 0.0 and math.isnan(together[-1]["ppl"])
    assert all(r["nll_sum"] > 0 and math.isfinite(r["ppl"]) for r in together[:-1])


def test_eval_model_and_tokenizer_are_loaded_once(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"model": 0, "tokenizer": 0}
    load_model, load_tokenizer = metrics.AutoModelForCausalLM.from_pretrained, metrics.AutoTokenizer.from_pretrained

    def counting_model(*args: Any, **kwargs: Any) -> Any:
        calls["model"] += 1
        return load_model(*args, **kwargs)

    def counting_tokenizer(*args: Any, **kwargs: Any) -> Any:
        calls["tokenizer"] += 1
        return load_tokenizer(*args, **kwargs)

    monkeypatch.setattr(metrics.AutoModelForCausalLM, "from_pretrained", counting_model)
    monkeypatch.setattr(metrics.AutoTokenizer, "from_pretrained", counting_tokenizer)
    scorer = GenerativePerplexity(str(model_dir), batch_size=2)
    assert calls == {"model": 1, "tokenizer": 1}
    first = scorer.score([text_of(random_ids(n, seed=n)) for n in (5, 30, 7, 2, 9)])
    second = scorer.score([text_of(random_ids(n, seed=n)) for n in (5, 30, 7, 2, 9)])
    assert calls == {"model": 1, "tokenizer": 1}
    assert first == second  # eval mode: dropout off, so repeated scoring is deterministic
    assert not scorer.model.training and not any(p.requires_grad for p in scorer.model.parameters())


def test_max_length_beyond_model_context_is_rejected(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="exceeds the eval model's context size 16"):
        GenerativePerplexity(str(model_dir), max_length=N_POSITIONS + 1)


def test_missing_local_directory_raises_clear_oserror(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(OSError, match="eval.gen_ppl_eval_model=/path/to/gpt2-large") as info:
        GenerativePerplexity(str(missing))
    assert str(missing) in str(info.value)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every socket connect is recorded and refused; the list of attempted addresses."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_unreachable_hub_fails_fast_from_the_cache_only(monkeypatch: pytest.MonkeyPatch, no_network: list) -> None:
    probes: list[str] = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # hub.hub_offline() also reads them now
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda endpoint, *args: probes.append(endpoint) or False)
    name = "mdlm-tests-no-such-org/no-such-eval-model"
    start = time.monotonic()
    with pytest.raises(OSError, match="hub is unreachable") as info:
        GenerativePerplexity(name)
    assert time.monotonic() - start < 10.0
    assert probes == [constants.ENDPOINT] and no_network == []
    for part in (repr(name), "eval.gen_ppl_eval_model=/path/to/gpt2-large", "HF_HUB_OFFLINE=1"):
        assert part in str(info.value)


def test_hf_hub_offline_skips_the_probe(monkeypatch: pytest.MonkeyPatch, no_network: list) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "hub_reachable", lambda *args: pytest.fail("probed the hub while offline"))
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set"):
        GenerativePerplexity("mdlm-tests-no-such-org/no-such-eval-model")
    assert no_network == []


def test_summary_is_token_weighted() -> None:
    results = [
        {"nll_sum": 10.0, "num_tokens": 5, "ppl": math.exp(2.0)},
        {"nll_sum": 3.0, "num_tokens": 1, "ppl": math.exp(3.0)},
        {"nll_sum": 0.0, "num_tokens": 0, "ppl": math.nan},
    ]
    out = GenerativePerplexity.summary(results)
    assert math.isclose(out["gen_ppl"], math.exp(13.0 / 6.0))  # not exp(2.5), the mean of per-sample NLLs
    assert math.isclose(out["mean_sample_ppl"], (math.exp(2.0) + math.exp(3.0)) / 2)
    assert (out["num_samples"], out["num_tokens"], out["num_empty"]) == (2, 6, 1)
    assert math.isnan(GenerativePerplexity.summary([results[2]])["gen_ppl"])


@pytest.mark.parametrize(
    ("ids", "skip_first", "expected"),
    [
        ([9, 1, 2, 9, 3, 9], True, [1, 2]),  # leading BOS (= EOS) dropped, cut at the next EOS
        ([1, 2, 9, 3], True, [1, 2]),  # no leading EOS: cut at the first one
        ([9, 1, 2, 3], True, [1, 2, 3]),  # no EOS after the leading one
        ([1, 2, 3], True, [1, 2, 3]),  # no EOS at all
        ([9, 9, 1], True, []),  # ends right after the BOS
        ([9, 1, 2], False, []),  # position 0 counts when not skipped
        ([], True, []),
    ],
)
def test_truncate_at_eos(ids: list[int], skip_first: bool, expected: list[int]) -> None:
    assert truncate_at_eos(ids, eos_id=9, skip_first=skip_first) == expected
    assert truncate_at_eos(torch.tensor(ids, dtype=torch.long), eos_id=9, skip_first=skip_first) == expected


def test_unigram_entropy_exact_values() -> None:
    assert unigram_entropy([7, 7, 7, 7]) == 0.0
    assert math.isclose(unigram_entropy([1, 2, 3, 4, 5]), math.log(5), rel_tol=1e-12)
    # counts (2, 1, 1) of n = 4: -(1/2 log 1/2 + 2 * 1/4 log 1/4) = 3/2 log 2
    assert math.isclose(unigram_entropy(torch.tensor([3, 1, 3, 2])), 1.5 * math.log(2), rel_tol=1e-12)
    assert math.isnan(unigram_entropy([]))


def test_gpt2_samples_truncated_decoded_and_rescored(tmp_path: Path, shared_data: Path) -> None:
    """The sample_eval path with the real GPT-2 tokenizer: only the text before the EOS is scored."""
    tokenizer = AutoTokenizer.from_pretrained(shared_data / "gpt2_tokenizer")
    model_path = save_tiny_gpt2(tmp_path / "tiny_gpt2_bpe", tokenizer)
    eos = tokenizer.eos_token_id
    body = tokenizer("The cat sat on the mat.", add_special_tokens=False)["input_ids"]
    tail = tokenizer(" Then it left.", add_special_tokens=False)["input_ids"]
    sample = [eos, *body, eos, *tail]  # a generated sample: BOS, text, EOS, text after it
    kept = truncate_at_eos(sample, eos)
    assert eos == 50256 and kept == body
    scorer = GenerativePerplexity(str(model_path))
    assert scorer.bos_id == eos
    (result,) = scorer.score([tokenizer.decode(kept)])
    assert result["num_tokens"] == len(body)
    reference = GPT2LMHeadModel.from_pretrained(model_path).double().eval()
    assert math.isclose(result["nll_sum"], float(reference_nll(reference, body, bos_id=eos)), rel_tol=1e-4)
