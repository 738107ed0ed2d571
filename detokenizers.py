"""Detokenizers: undo the word-level tokenization some corpora ship with, before BPE/WordPiece.

Several benchmark corpora are distributed already split into space-separated tokens
("the company 's shares , "). The MDLM paper rewrites their raw text towards ordinary prose
before handing it to the GPT-2 / BERT tokenizer; to reproduce its numbers our text must match
that rewrite byte for byte, quirks included. Each function is a fixed, ordered list of
rewrite rules (plain substring replacements and regular expressions) applied left to right:

- :func:`wikitext` (wikitext2, wikitext103): joins the ``@-@`` / ``@,@`` / ``@.@`` number
  separators, pulls punctuation and ``'s`` back onto the preceding word, tightens spaces inside
  brackets and quotes, re-joins ``= = =`` headings, and also turns ``" N "`` into ``" 1 "``.
- :func:`ptb` (Penn Treebank): re-attaches ``'s`` and ``n't``, unescapes ``\\/``, maps the
  number placeholder ``N`` to ``1`` (repeated, so runs ``N N N`` are covered), ``$ 1`` and
  ``# 1`` to ``$1`` / ``#1`` and ``<unk>`` to ``?``.
- :func:`lm1b` (One Billion Word): rebuilds ``http://`` URLs, attaches apostrophes, sentence
  punctuation, quotes, brackets and currency signs.
- :func:`lambada`: straightens curly double quotes and returns ``"\\n" + text.strip()``.
- :func:`scientific_papers` (arXiv, PubMed): :func:`wikitext` followed by :func:`lm1b`.

:func:`get_detokenizer` maps a data set name to its function, or ``None`` for corpora that are
used as they are (openwebtext, ag_news, text8, ...).

Apply each exactly once: a second pass can change text again. :func:`wikitext` replaces
``" N "`` in a single pass (``" N N N "`` -> ``" 1 N 1 "``) and turns ``"! ! "`` into ``"!! "``
only the second time; its quote rule, run over ordinary prose (as for arXiv / PubMed), pairs a
closing quote with the next opening one and drops the spaces between them
(``'," he said. "We'`` -> ``',"he said."We'``). That is the paper's pipeline and is kept.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# One rewrite step: a literal substring (``str.replace``, every non-overlapping occurrence) or a
# compiled pattern (``Pattern.sub``), and its replacement.
Rule = tuple[str | re.Pattern[str], str]

# --- wikitext ---------------------------------------------------------------------------------
# Kept as in the paper's pipeline: the replacement is the literal text "/'[0-9]/", so a match
# such as "/' 7/" becomes "/'[0-9]/" (it almost never fires on real text).
WT_SLASH_QUOTE_DIGIT = re.compile(r"/' [0-9]/")
# Strip the spaces just inside a bracket or quote pair (lazy, so the closing delimiter is the first one).
WT_PARENS = re.compile(r"\(\s*([^\)]*?)\s*\)")
WT_SQUARE = re.compile(r"\[\s*([^\]]*?)\s*\]")
WT_CURLY = re.compile(r"{\s*([^}]*?)\s*}")
WT_DOUBLE_QUOTES = re.compile(r"\"\s*([^\"]*?)\s*\"")
WT_SINGLE_QUOTES = re.compile(r"'\s*([^']*?)\s*'")

DEGREE = chr(176)  # "°"

WIKITEXT_RULES: tuple[Rule, ...] = (
    ("s '", "s'"),
    (WT_SLASH_QUOTE_DIGIT, "/'[0-9]/"),
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    (" : ", ": "),
    (" ; ", "; "),
    (" . ", ". "),
    (" ! ", "! "),
    (" ? ", "? "),
    (" , ", ", "),
    (WT_PARENS, r"(\1)"),
    (WT_SQUARE, r"[\1]"),
    (WT_CURLY, r"{\1}"),
    (WT_DOUBLE_QUOTES, r'"\1"'),
    (WT_SINGLE_QUOTES, r"'\1'"),
    ("= = = =", "===="),
    ("= = =", "==="),
    ("= =", "=="),
    (f" {DEGREE} ", DEGREE),
    (" \n", "\n"),
    ("\n ", "\n"),
    (" N ", " 1 "),
    (" 's", "'s"),
)

# --- Penn Treebank ----------------------------------------------------------------------------
# str.replace skips overlapping matches, so " N N N " needs a second pass (two always reach the fixed
# point); the paper runs ten, kept here so the loop reads the same.
PTB_NUMBER_PASSES = 10

PTB_RULES_BEFORE_NUMBERS: tuple[Rule, ...] = (
    (" 's", "'s"),
    ("s ' ", "s' "),
    (" n't", "n't"),
    (" \n ", "\n"),
    ("\\/", "/"),
)
PTB_RULES_AFTER_NUMBERS: tuple[Rule, ...] = (
    ("$ 1", "$1"),
    ("# 1", "#1"),
    ("<unk>", "?"),
)

# --- One Billion Word -------------------------------------------------------------------------
LM1B_APOSTROPHE = re.compile(r" '(\w+)")  # " 's" -> "'s", " 'll" -> "'ll"
LM1B_PERIOD_INSIDE = re.compile(r" (\w+) \. ")
LM1B_PERIOD_AT_END = re.compile(r" (\w+) \.$")  # `$` without MULTILINE: end, or before a final "\n"
LM1B_QUESTION_AT_END = re.compile(r" \?$")
LM1B_EXCLAMATION_AT_END = re.compile(r" !$")
LM1B_DOUBLE_QUOTES = re.compile(r"\" ([^\"]+) \"")
LM1B_SINGLE_QUOTES = re.compile(r"' ([^']+) '")
LM1B_PARENS = re.compile(r"\( ([^()]+) \)")
LM1B_SQUARE = re.compile(r"\[ ([^\[\]]+) \]")

LM1B_RULES: tuple[Rule, ...] = (
    ("http : / / ", "http://"),
    ("https : / / ", "https://"),
    (LM1B_APOSTROPHE, r"'\1"),
    (LM1B_PERIOD_INSIDE, r" \1. "),
    (LM1B_PERIOD_AT_END, r" \1."),
    (" ? ", "? "),
    (LM1B_QUESTION_AT_END, "?"),
    (" ! ", "! "),
    (LM1B_EXCLAMATION_AT_END, "!"),
    (" , ", ", "),
    (" : ", ": "),
    (" ; ", "; "),
    (" / ", "/"),
    (LM1B_DOUBLE_QUOTES, r'"\1"'),
    (LM1B_SINGLE_QUOTES, r"'\1'"),
    (LM1B_PARENS, r"(\1)"),
    (LM1B_SQUARE, r"[\1]"),
    ("$ ", "$"),
    ("£ ", "£"),
)

# --- LAMBADA ----------------------------------------------------------------------------------
LAMBADA_RULES: tuple[Rule, ...] = (
    ("\u201c", '"'),  # left double quotation mark
    ("\u201d", '"'),  # right double quotation mark
)


def apply_rules(text: str, rules: Sequence[Rule]) -> str:
    """Apply ``rules`` to ``text`` in order: ``str.replace`` for strings, ``Pattern.sub`` for regexes."""
    for pattern, replacement in rules:
        if isinstance(pattern, str):
            text = text.replace(pattern, replacement)
        else:
            text = pattern.sub(replacement, text)
    return text


def wikitext(text: str) -> str:
    """Detokenize WikiText (wikitext-2 / wikitext-103 raw), e.g. ``"1 @,@ 000 @-@ year"`` -> ``"1,000-year"``."""
    return apply_rules(text, WIKITEXT_RULES)


def ptb(text: str) -> str:
    """Detokenize Penn Treebank, e.g. ``"company 's N shares were n't <unk>"`` -> ``"company's 1 shares weren't ?"``."""
    text = apply_rules(text, PTB_RULES_BEFORE_NUMBERS)
    for _ in range(PTB_NUMBER_PASSES):
        text = text.replace(" N ", " 1 ")
    return apply_rules(text, PTB_RULES_AFTER_NUMBERS)


def lm1b(text: str) -> str:
    """Detokenize One Billion Word, e.g. ``'he said , " hello " .'`` -> ``'he said, "hello" .'``."""
    return apply_rules(text, LM1B_RULES)


def lambada(text: str) -> str:
    """Straighten curly double quotes and return ``"\\n" + text.strip()`` (a leading newline, by design)."""
    return "\n" + apply_rules(text, LAMBADA_RULES).strip()


def scientific_papers(text: str) -> str:
    """Detokenize arXiv / PubMed articles: :func:`wikitext`, then :func:`lm1b`."""
    return lm1b(wikitext(text))


DETOKENIZERS: dict[str, Callable[[str], str]] = {
    "wikitext2": wikitext,
    "wikitext103": wikitext,
    "ptb": ptb,
    "lm1b": lm1b,
    "lambada": lambada,
    "scientific_papers_arxiv": scientific_papers,
    "scientific_papers_pubmed": scientific_papers,
}


def get_detokenizer(dataset_name: str) -> Callable[[str], str] | None:
    """The detokenizer the paper applies to ``dataset_name``, or ``None`` if its text is used as is."""
    return DETOKENIZERS.get(dataset_name)
