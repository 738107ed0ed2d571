"""Detokenizers: hand-checked outputs (quirks of the paper's pipeline included), registry, real corpora."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import detokenizers
from detokenizers import DETOKENIZERS, get_detokenizer, lambada, lm1b, ptb, scientific_papers, wikitext

# ------------------------------------------------------------------ Penn Treebank


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the company 's N shares were n't sold <unk>", "the company's 1 shares weren't sold ?"),
        ("it costs $ N or # N \\/ share , investors ' money", "it costs $1 or #1 / share , investors' money"),
        (" N N N ", " 1 1 1 "),  # runs of N: the replacement is repeated
        (" the end \n the start", " the end\nthe start"),
        ("( a ) , b .", "( a ) , b ."),  # punctuation and brackets are left alone
    ],
)
def test_ptb(text: str, expected: str) -> None:
    assert ptb(text) == expected


# ------------------------------------------------------------------ WikiText


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the 1 @,@ 000 @-@ year = = Heading = = \n", "the 1,000-year == Heading ==\n"),
        (" = = = Sub heading = = = \n", " === Sub heading ===\n"),
        ("3 @.@ 5 km ( 2 @.@ 2 mi ) long", "3.5 km (2.2 mi) long"),
        ('1 @,@ 000 km , he said : " it \'s far " .', '1,000 km, he said: "it\'s far" .'),
        ("( a ) [ b ] { c } \" d \" ' e '", "(a) [b] {c} \"d\" 'e'"),
        ("is it ? yes ! the end .", "is it? yes! the end ."),  # a final " ." stays
        ("the players ' union", "the players' union"),
        ("temperature 25 ° C", "temperature 25°C"),
        (" N N N ", " 1 N 1 "),  # a single pass, unlike PTB
        ("/' 7/", "/'[0-9]/"),  # the paper's literal replacement text
    ],
)
def test_wikitext(text: str, expected: str) -> None:
    assert wikitext(text) == expected


def test_wikitext_is_not_idempotent() -> None:
    """Apply once: a second pass can still change the text (as on one line of wiki.test.raw)."""
    once = wikitext("K @-@ 1 Dynamite ! ! USA")
    assert once == "K-1 Dynamite! ! USA"
    assert wikitext(once) == "K-1 Dynamite!! USA"


# ------------------------------------------------------------------ One Billion Word


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('he said , " hello " .', 'he said, "hello" .'),
        ("is it ? yes . the end .", "is it? yes. the end."),
        ("wow !", "wow!"),
        ("visit http : / / example.com / page now !", "visit http://example.com/page now!"),
        ("price : $ 5 , or £ 3 ; ok ?", "price: $5, or £3; ok?"),
        ("it 's ( really ) [ true ] , i think .", "it's (really) [true], i think."),
        ("a { b } c", "a { b } c"),  # braces are not tightened here
    ],
)
def test_lm1b(text: str, expected: str) -> None:
    assert lm1b(text) == expected


# ------------------------------------------------------------------ LAMBADA


def test_lambada_straightens_quotes_and_prepends_newline() -> None:
    assert lambada("  \u201cHi,\u201d she said.  ") == '\n"Hi," she said.'
    assert lambada("\u2018single\u2019 stay") == "\n\u2018single\u2019 stay"
    assert lambada("") == "\n"


# ------------------------------------------------------------------ scientific papers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("the 1 @,@ 000 @-@ year , ok ?", "the 1,000-year, ok?"),
        # wikitext's " : " rule runs first, so the URL is only partly rebuilt
        ("visit http : / / example.com / page now !", "visit http:// example.com/page now!"),
        # wikitext's quote rule pairs a closing quote with the next opening one in plain prose
        ('"Yes," he said. "We go."', '"Yes,"he said."We go."'),
        ("( a ) \" d \" ' e '", "(a) \"d\"'e'"),  # lm1b's " '(\w+)" then glues the opening quote
    ],
)
def test_scientific_papers(text: str, expected: str) -> None:
    assert scientific_papers(text) == expected
    assert scientific_papers(text) == lm1b(wikitext(text))


# ------------------------------------------------------------------ registry


@pytest.mark.parametrize(
    ("name", "function"),
    [
        ("wikitext2", wikitext),
        ("wikitext103", wikitext),
        ("ptb", ptb),
        ("lm1b", lm1b),
        ("lambada", lambada),
        ("scientific_papers_arxiv", scientific_papers),
        ("scientific_papers_pubmed", scientific_papers),
    ],
)
def test_registry_names(name: str, function: object) -> None:
    assert DETOKENIZERS[name] is function
    assert get_detokenizer(name) is function


@pytest.mark.parametrize(
    "name", ["openwebtext", "openwebtext-train", "openwebtext-valid", "ag_news", "text8", "text8-crop"]
)
def test_data_sets_without_detokenizer(name: str) -> None:
    assert get_detokenizer(name) is None


def test_registry_is_exactly_the_paper_set() -> None:
    assert set(DETOKENIZERS) == {
        "wikitext2",
        "wikitext103",
        "ptb",
        "lm1b",
        "lambada",
        "scientific_papers_arxiv",
        "scientific_papers_pubmed",
    }
    assert detokenizers.PTB_NUMBER_PASSES == 10


# ------------------------------------------------------------------ real corpora (../shared/data)


def test_ptb_valid_has_no_tokenization_left(shared_data: Path) -> None:
    """Every PTB line (as the data set's rows) loses n't/'s splits, N, <unk> and \\/; a second pass is a no-op."""
    lines = (shared_data / "ptb" / "ptb.valid.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3370
    out = [ptb(line) for line in lines]
    joined = "\n".join(out)
    for leftover in (" n't", " 's", "<unk>", " N ", "\\/"):
        assert leftover not in joined, leftover
    # PTB has no "?" of its own, so every one comes from an <unk>
    assert joined.count("?") == sum(line.count("<unk>") for line in lines) > 0
    assert [ptb(line) for line in out] == out


def test_wikitext_test_joins_number_separators(shared_data: Path) -> None:
    lines = (shared_data / "wikitext2_raw" / "wiki.test.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    out = "".join(wikitext(line) for line in lines)
    for leftover in (" @-@ ", " @,@ ", " @.@ ", "= =", " 's"):
        assert leftover not in out, leftover


def test_lambada_records(shared_data: Path) -> None:
    with open(shared_data / "lambada" / "lambada_test.jsonl", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    out = [lambada(text) for text in texts]
    assert len(out) == 5153
    assert all(text.startswith("\n") and "\u201c" not in text and "\u201d" not in text for text in out)
    assert [lambada(text) for text in out] == out
