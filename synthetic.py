"""The built-in corpus: a first-order Markov chain over English words with known entropy.

The chain is generated offline and deterministically from a seed, so the default run needs
no download, and every quantity a likelihood model is judged against is exact:

- the true negative log-likelihood of any sequence (:meth:`MarkovSource.log_prob`);
- the entropy rate ``H(X_{t+1} | X_t)`` (:meth:`MarkovSource.entropy_rate`), the best
  achievable NLL per token of a long sequence;
- the exact posterior marginals ``p(x_i | observed positions)``
  (:meth:`MarkovSource.posterior_marginals`), i.e. the optimal MDLM denoiser.

Construction. Words come in categories (determiners, adjectives, nouns, transitive and
intransitive verbs, adverbs, prepositions, conjunctions and the sentence end ``"."``). A
category-level grammar ``G[c, c']`` says which category may follow which. Within the next
category ``c'``, every word ``w`` has its own sparse preference ``q_w(. | c')``: Zipf weights
``r^{-s}`` on ``K`` favourite successors drawn from the seed, plus a smoothing mass ``eps``
spread uniformly over all words of ``c'``. The transition matrix is

    T[w, v] = G[cat(w), cat(v)] * q_w(v | cat(v)),

which is row-stochastic, irreducible (every category leads back to ``"."``, and the
smoothing reaches every word of an allowed category) and aperiodic (sentences of length 3
and 4 both return to ``"."``). The sparse preferences make the entropy rate well below
half the unigram entropy, so context matters and a model that ignores it is visibly worse.

Every sequence starts as if a sentence just ended: ``x_1 ~ start = T["."]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor
from transformers import PreTrainedTokenizerFast

END = "."

# Word lists by category (every word appears once across all lists), as whitespace-separated
# strings to keep them compact.
DETERMINERS = tuple(
    """
    the this that every each some one no my your his her our their another any
    """.split()
)
ADJECTIVES = tuple(
    """
    old young small large quiet bright dark happy sad red green blue little tall short cold warm strange
    gentle clever lazy busy brave tired hungry wild calm proud shy ancient heavy lonely curious silent
    golden wooden broken hidden distant narrow empty noisy friendly patient careful sleepy rusty tiny
    famous humble
    """.split()
)
NOUNS = tuple(
    """
    cat dog bird horse child farmer teacher doctor king queen sailor baker river mountain forest garden
    house village city road bridge tower window door table book letter song story ship boat train lamp
    clock key box stone tree flower field lake sea island castle market school library kitchen wolf fox
    rabbit owl fish mouse bear lion painter poet soldier merchant student friend stranger neighbor
    captain pilot musician hunter shepherd goat apple bread cake coin ring hat coat candle mirror map
    wall hill valley cloud star moon storm wind fire boy girl
    """.split()
)
TRANSITIVE_VERBS = tuple(
    """
    saw found followed watched carried opened closed painted visited crossed built chased heard loved
    helped met reached touched pushed pulled lifted dropped held kept wanted needed liked called greeted
    remembered forgot brought stole sold bought fed answered hid washed guarded
    """.split()
)
INTRANSITIVE_VERBS = tuple(
    """
    slept laughed smiled sang danced walked ran jumped fell rose stopped waited returned vanished
    appeared listened whispered cried wandered arrived stayed rested shouted trembled glowed sighed
    worked played swam flew
    """.split()
)
ADVERBS = tuple(
    """
    quickly slowly quietly loudly happily sadly carefully suddenly softly gently early late again away
    home today yesterday together alone outside inside there here badly bravely calmly eagerly patiently
    proudly silently
    """.split()
)
PREPOSITIONS = tuple(
    """
    in on near under over behind beside across through into toward with without from past around along
    beyond above below
    """.split()
)
CONJUNCTIONS = ("and", "but", "or")

CATEGORIES: dict[str, tuple[str, ...]] = {
    "end": (END,),
    "det": DETERMINERS,
    "adj": ADJECTIVES,
    "noun": NOUNS,
    "vt": TRANSITIVE_VERBS,
    "vi": INTRANSITIVE_VERBS,
    "adv": ADVERBS,
    "prep": PREPOSITIONS,
    "conj": CONJUNCTIONS,
}

# Category grammar G[c][c'] = P(next category c' | current category c); rows sum to 1.
GRAMMAR: dict[str, dict[str, float]] = {
    "end": {"det": 1.0},
    "det": {"adj": 0.35, "noun": 0.65},
    "adj": {"adj": 0.08, "noun": 0.92},
    "noun": {"vt": 0.35, "vi": 0.25, "prep": 0.15, "conj": 0.10, "end": 0.15},
    "vt": {"det": 1.0},
    "vi": {"adv": 0.35, "prep": 0.35, "end": 0.30},
    "adv": {"end": 0.55, "prep": 0.30, "conj": 0.15},
    "prep": {"det": 1.0},
    "conj": {"det": 1.0},
}

# Within-category preferences: Zipf weights r^-ZIPF_EXPONENT on NUM_FAVOURITES successors,
# plus SMOOTHING mass spread uniformly over the category (keeps the chain irreducible).
NUM_FAVOURITES = 4
ZIPF_EXPONENT = 1.0
SMOOTHING = 0.05

SOURCE_STREAM = 0  # np.random.default_rng([seed, SOURCE_STREAM]) builds the chain

# Word-level tokenizer: special tokens first, then the words: token id = WORD_OFFSET + word id.
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[MASK]", "[UNK]")
PAD_ID, BOS_ID, EOS_ID, MASK_ID, UNK_ID = range(len(SPECIAL_TOKENS))
WORD_OFFSET = len(SPECIAL_TOKENS)


def _word_preference(rng: np.random.Generator, size: int) -> np.ndarray:
    """A sparse distribution over ``size`` words: ``(1-eps) * Zipf(K favourites) + eps / size``.

    Returns (size,) float64 summing to 1. With ``size <= K`` all words are favourites.
    """
    k = min(NUM_FAVOURITES, size)
    zipf = np.arange(1, k + 1, dtype=np.float64) ** -ZIPF_EXPONENT  # (k,)
    probs = np.full(size, SMOOTHING / size)  # (size,)
    probs[rng.choice(size, size=k, replace=False)] += (1.0 - SMOOTHING) * zipf / zipf.sum()
    return probs


def _entropy(probs: Tensor) -> Tensor:
    """``-sum p log p`` over the last dimension, with ``0 log 0 = 0``."""
    return -torch.special.xlogy(probs, probs).sum(-1)


@dataclass
class MarkovSource:
    """A first-order Markov chain over ``W`` words.

    ``words`` (W,) strings; ``transition`` (W, W) float64 row-stochastic,
    ``transition[u, v] = p(x_{t+1} = v | x_t = u)``; ``start`` (W,) float64, the law of
    ``x_1`` (the row of ``"."``: every sequence starts as if a sentence just ended).
    """

    words: list[str]
    transition: Tensor  # (W, W) float64
    start: Tensor  # (W,) float64

    @classmethod
    def from_seed(cls, seed: int) -> MarkovSource:
        """Build the chain described in the module docstring from ``seed`` (deterministic)."""
        rng = np.random.default_rng([seed, SOURCE_STREAM])
        words = [word for category in CATEGORIES.values() for word in category]
        index = {word: i for i, word in enumerate(words)}
        transition = np.zeros((len(words), len(words)))  # (W, W)
        for category, members in CATEGORIES.items():
            for word in members:
                for next_category, weight in GRAMMAR[category].items():
                    successors = [index[w] for w in CATEGORIES[next_category]]
                    preference = _word_preference(rng, len(successors))
                    transition[index[word], successors] = weight * preference
        transition = torch.from_numpy(transition)
        return cls(words=words, transition=transition, start=transition[index[END]].clone())

    @property
    def num_words(self) -> int:
        return len(self.words)

    def stationary(self) -> Tensor:
        """The stationary law ``pi`` (W,) float64: ``pi T = pi``, ``sum pi = 1``.

        Solved as the linear system ``(T^T - I) pi = 0`` with one equation replaced by the
        normalisation (unique because the chain is irreducible).
        """
        system = self.transition.T - torch.eye(self.num_words, dtype=torch.float64)  # (W, W)
        system[-1] = 1.0
        rhs = torch.zeros(self.num_words, dtype=torch.float64)
        rhs[-1] = 1.0
        return torch.linalg.solve(system, rhs)

    def unigram_entropy(self) -> float:
        """``H(X) = -sum_w pi(w) log pi(w)`` in nats, under the stationary law."""
        return float(_entropy(self.stationary()))

    def entropy_rate(self) -> float:
        """``H(X_{t+1} | X_t) = -sum_u pi(u) sum_v T[u, v] log T[u, v]`` in nats."""
        return float(self.stationary() @ _entropy(self.transition))

    def sample(self, num_sequences: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """Draw (num_sequences, length) int64 word ids: ``x_1 ~ start``, ``x_{i+1} ~ T[x_i]``.

        Inverse-CDF sampling: ``x = #{v : F[x_prev, v] <= u}`` with ``u ~ U[0, 1)`` and ``F``
        the row-wise CDF, normalised so that its last column is exactly 1 (so a word is always
        found, and a zero-probability word never is). Vectorised by grouping the sequences
        that share the previous word: O(N log W) per step.
        """
        table = torch.cat([self.start[None], self.transition]).numpy()  # (W+1, W)
        cdf = np.cumsum(table, axis=1)  # row 0: start; row u+1: T[u]
        cdf /= cdf[:, -1:]
        out = np.empty((num_sequences, length), dtype=np.int64)
        prev_row = np.zeros(num_sequences, dtype=np.int64)  # (N,) row of cdf to use
        for i in range(length):
            u = rng.random(num_sequences)  # (N,)
            order = np.argsort(prev_row, kind="stable")  # (N,)
            bounds = np.searchsorted(prev_row[order], np.arange(len(cdf) + 1))  # (W+2,)
            for row in np.flatnonzero(np.diff(bounds)):
                group = order[bounds[row] : bounds[row + 1]]
                out[group, i] = np.searchsorted(cdf[row], u[group], side="right")
            prev_row = out[:, i] + 1
        return out

    def log_prob(self, word_ids: Tensor) -> Tensor:
        """``log p(x) = log start[x_1] + sum_i log T[x_i, x_{i+1}]``; (N, n) -> (N,) float64.

        ``-inf`` for sequences with a zero-probability transition.
        """
        word_ids = torch.as_tensor(word_ids, dtype=torch.long)
        log_t = self.transition.log()  # (W, W)
        first = self.start.log()[word_ids[:, 0]]  # (N,)
        steps = log_t[word_ids[:, :-1], word_ids[:, 1:]]  # (N, n-1)
        return first + steps.sum(-1)

    def posterior_marginals(self, word_ids: Tensor, observed: Tensor) -> Tensor:
        """Exact ``p(x_i = w | x_j for all observed j)``; (N, n), (N, n) -> (N, n, W) float64.

        Forward-backward with per-step normalisation. With evidence ``e_i = onehot(x_i)`` at
        observed positions and ``1`` elsewhere:

            a_1 ∝ start * e_1,   a_{i+1} ∝ (a_i T) * e_{i+1}
            b_n = 1,             b_i ∝ T (e_{i+1} * b_{i+1})
            p(x_i | obs) = a_i * b_i / sum_w a_i(w) b_i(w).

        Observed positions come back one-hot. ``word_ids`` at unobserved positions are
        ignored. Raises ``ValueError`` if the observed words have probability zero.
        """
        word_ids = torch.as_tensor(word_ids, dtype=torch.long)
        observed = torch.as_tensor(observed, dtype=torch.bool)
        num, length = word_ids.shape
        evidence = torch.ones(num, length, self.num_words, dtype=torch.float64)  # (N, n, W)
        safe_ids = torch.where(observed, word_ids, 0)  # unobserved ids may be anything
        onehot = torch.nn.functional.one_hot(safe_ids, self.num_words).to(torch.float64)
        evidence = torch.where(observed[..., None], onehot, evidence)

        forward = torch.empty_like(evidence)  # (N, n, W)
        message = self.start.expand(num, -1)  # (N, W) prior of x_1
        for i in range(length):
            forward[:, i] = _normalise(message * evidence[:, i])
            message = forward[:, i] @ self.transition
        backward = torch.empty_like(evidence)  # (N, n, W)
        backward[:, -1] = 1.0
        for i in range(length - 2, -1, -1):
            backward[:, i] = _normalise((evidence[:, i + 1] * backward[:, i + 1]) @ self.transition.T)
        return _normalise(forward * backward)


def _normalise(weights: Tensor) -> Tensor:
    """Divide by the sum over the last dimension; ``ValueError`` if some sum is zero."""
    total = weights.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError("the observed words have probability zero under the Markov chain")
    return weights / total


def build_tokenizer(source: MarkovSource) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for ``source``: split on whitespace, one token per word.

    Ids: ``[PAD]=0, [BOS]=1, [EOS]=2, [MASK]=3, [UNK]=4`` (set as the pad/bos/eos/mask/unk
    tokens), then ``token id = WORD_OFFSET + word id`` with ``WORD_OFFSET = 5``. Decoding joins
    words with single spaces, so ``decode(encode(text)) == text`` for single-spaced text of
    known words. No special tokens are added when encoding.
    """
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *source.words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        mask_token="[MASK]",
        unk_token="[UNK]",
        clean_up_tokenization_spaces=False,  # keep " ." as is: the round trip is exact
    )
