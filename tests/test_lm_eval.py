"""lm_eval_adapter.MDLMHarness and scripts/lm_eval.py on a tiny quickstart checkpoint, offline: a local task end to
end, and the conditional bound against a slow reference written from the formula."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from tiny_quickstart import tiny_checkpoint

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from algorithms import item_draws  # noqa: E402
from lm_eval_adapter import MDLMHarness, request_indices  # noqa: E402
from pipeline import Pipeline  # noqa: E402
from synthetic import WORD_OFFSET  # noqa: E402

TASK_DIR = ROOT / "tests" / "data" / "lm_eval_task"
MC = 4


def load_script():
    spec = importlib.util.spec_from_file_location("lm_eval_script", ROOT / "scripts" / "lm_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def request(kind: str, *args: object) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def harness(checkpoint: Path) -> MDLMHarness:
    return MDLMHarness(Pipeline.from_pretrained(checkpoint, device="cpu"), mc_samples=MC)


@pytest.fixture(scope="module")
def sharp(checkpoint: Path) -> MDLMHarness:
    """The tiny model with its weights redrawn from N(0, 0.5^2), seeded: 8 steps leave the DiT's zero-initialized
    output layers near zero, so its predictions hardly depend on the input; these do, strongly."""
    pipe = Pipeline.from_pretrained(checkpoint, device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in pipe.module.backbone.parameters():
            parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return MDLMHarness(pipe, mc_samples=MC)


def test_local_task_end_to_end_reports_the_adapters_own_numbers(checkpoint: Path, harness: MDLMHarness,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """scripts/lm_eval.py on the local LAMBADA-style task: its acc and perplexity are the adapter's."""
    results = load_script().main([str(checkpoint), "--tasks", "synthetic_lambada", "--include-path", str(TASK_DIR),
                                  "--limit", "8", "--mc-samples", str(MC)])
    assert "synthetic_lambada" in capsys.readouterr().out  # the table
    docs = [json.loads(line)["text"].split(" ") for line in (TASK_DIR / "synthetic_lambada.jsonl").open()][:8]
    own = harness.loglikelihood([request("loglikelihood", " ".join(w[:-1]), " " + w[-1]) for w in docs])
    reported = results["results"]["synthetic_lambada"]
    assert reported["acc,none"] == pytest.approx(sum(g for _, g in own) / len(own))
    assert reported["perplexity,none"] == pytest.approx(math.exp(-sum(ll for ll, _ in own) / len(own)), rel=1e-6)


@pytest.mark.slow  # indexes lm-eval's own ~15,000 task files (6 s)
def test_unknown_task_names_the_way_to_local_tasks() -> None:
    with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['no_such_task'\].*--include-path"):
        load_script().evaluate("never/loaded", ["no_such_task"], mc_samples=1)


def reference_bound(pipe: Pipeline, context: list[int], continuation: list[int], index: int) -> float:
    """E_t[ w(t) sum_{masked continuation i} -log p(x0_i | x_t) ] over MC fixed draws, loglinear: w(t) = 1/t.

    Written from the formula: t = (1 - eps_t) u + eps_t (training.sampling_eps), masking probability
    m = (1 - eps) t (the loglinear schedule's eps), only continuation positions maskable, positions after
    it masked throughout, the network's mask logit excluded.
    """
    length, mask = pipe.cfg.model.length, pipe.module.algorithm.mask_index
    x0 = torch.tensor([1, *context, *continuation] + [mask] * (length - 1 - len(context) - len(continuation)))
    positions = range(1 + len(context), 1 + len(context) + len(continuation))
    total = 0.0
    for k in range(MC):
        draws = item_draws(torch.tensor([index]), length, pipe.cfg.seed, k, MC)
        t = (1 - pipe.cfg.training.sampling_eps) * float(draws.time[0]) + pipe.cfg.training.sampling_eps
        m = (1 - pipe.cfg.noise.eps) * t
        xt = x0.clone()
        masked = [i for i in positions if float(draws.mask[0, i]) < m]
        xt[masked] = mask
        with torch.no_grad():
            logits = pipe.module.backbone(xt[None], torch.zeros(1))[0].double()              # (L, V)
        logits[:, mask] = -math.inf
        log_p = logits.log_softmax(-1)
        total += sum(-float(log_p[i, x0[i]]) for i in masked) / t
    return total / MC


def test_conditional_bound_matches_the_formula(sharp: MDLMHarness) -> None:
    harness, pipe = sharp, sharp.pipe
    assert pipe.cfg.noise._target_ == "noise_schedule.LogLinear" and pipe.module.algorithm.name == "mdlm"
    pairs = [("the old cat saw", " the dog"), ("", "my bear slept ."), ("no cake stole no lake beyond that", " short")]
    got = harness.loglikelihood([request("loglikelihood", *pair) for pair in pairs])
    for (context, continuation), index, (ll, _) in zip(pairs, request_indices(pairs).tolist(), got, strict=True):
        ids = pipe.encode(context + continuation)
        split = len(pipe.encode(context)) if context else 0
        expected = reference_bound(pipe, ids[:split], ids[split:], index)
        assert expected > 0 and -ll == pytest.approx(expected, rel=1e-4)


def test_draws_of_a_request_do_not_depend_on_the_others(harness: MDLMHarness) -> None:
    a, b = request("loglikelihood", "the old cat", " saw"), request("loglikelihood", "my bear", " slept .")
    assert harness.loglikelihood([a, b]) == harness.loglikelihood([b, a])[::-1]


def test_is_greedy_is_the_one_step_argmax_at_a_masked_continuation(sharp: MDLMHarness) -> None:
    harness, pipe, mask = sharp, sharp.pipe, sharp.pipe.module.algorithm.mask_index
    context = pipe.encode("the old cat saw")
    x = torch.tensor([[1, *context] + [mask] * (pipe.cfg.model.length - 1 - len(context))])
    with torch.no_grad():
        logits = pipe.module.backbone(x, torch.zeros(1))[0, 1 + len(context)]
    logits[mask] = -math.inf
    words = [int(i) for i in logits.argsort(descending=True) if int(i) >= WORD_OFFSET][:2]  # the two likeliest words
    best, second = (pipe.tokenizer.decode([w]) for w in words)
    (_, first_greedy), (_, second_greedy) = harness.loglikelihood(
        [request("loglikelihood", "the old cat saw", " " + best), request("loglikelihood", "the old cat saw",
                                                                          " " + second)])
    assert first_greedy is (int(logits.argmax()) == words[0]) and second_greedy is False


def test_rolling_is_the_unconditional_bound_and_generation_stops_at_until(harness: MDLMHarness) -> None:
    text = "the old cat saw the dog ."
    (rolling,) = harness.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert rolling == pytest.approx(-harness.pipe.score(text, mc_samples=MC)[0].nll_sum)
    (free,) = harness.generate_until([request("generate_until", "the old cat", {"until": [], "max_gen_toks": 6})])
    stop = free.split()[2]  # the third generated word
    (cut,) = harness.generate_until([request("generate_until", "the old cat", {"until": [stop], "max_gen_toks": 6})])
    assert len(free.split()) == 6 and cut == free.split(stop)[0] and len(cut) < len(free)
    sample = harness.pipe.generate(1, prefix="the old cat", seed=harness.seed)[0]
    assert sample.text.startswith("the old cat" + free)


def test_ar_gives_the_exact_conditional_log_likelihood(tmp_path: Path) -> None:
    """An AR checkpoint (the original's format, random weights): loglikelihood is the exact teacher-forced sum,
    the same for any mc_samples, and is_greedy the teacher-forced argmax check."""
    from test_checkpoints import SYNTHETIC_VOCAB, write_original_checkpoint

    write_original_checkpoint(tmp_path / "ar.ckpt", "ar", vocab=SYNTHETIC_VOCAB)
    pipe = Pipeline.from_pretrained(tmp_path / "ar.ckpt", device="cpu", overrides=["parameterization=ar",
                                                                                     "backbone=ar", "model.length=8"])
    harness, mask = MDLMHarness(pipe, mc_samples=1), pipe.module.algorithm.mask_index
    with torch.no_grad():  # the model's next word after "the old cat": a greedy continuation
        following = pipe.module.backbone(torch.tensor([[1, *pipe.encode("the old cat")]]), None)[0, -1]  # (V,)
    best_word = int(following[WORD_OFFSET:].argmax()) + WORD_OFFSET  # the likeliest word
    best = pipe.tokenizer.decode([best_word])
    pairs = [("the old cat", " saw the"), ("", "my bear"), ("the old cat", " " + best)]
    got = harness.loglikelihood([request("loglikelihood", *pair) for pair in pairs])
    assert got == MDLMHarness(pipe, mc_samples=5).loglikelihood([request("loglikelihood", *p) for p in pairs])
    for (context, continuation), (ll, greedy) in zip(pairs, got, strict=True):
        ids = [1, *pipe.encode(context + continuation)]
        start = len(ids) - len(pipe.encode(continuation))
        with torch.no_grad():
            logits = pipe.module.backbone(torch.tensor([ids]), None)[0].double()             # (n, V)
        logits[:, mask] = -math.inf
        log_p = logits.log_softmax(-1)
        assert ll == pytest.approx(sum(float(log_p[i - 1, ids[i]]) for i in range(start, len(ids))), rel=1e-5)
        assert greedy is all(int(log_p[i - 1].argmax()) == ids[i] for i in range(start, len(ids)))
    (score,) = pipe.score("the old cat saw the dog", mc_samples=4)
    assert got[2][1] is (int(following.argmax()) == best_word)
    assert score.exact and score.stderr == 0 and score.num_tokens == 7  # 6 words + EOS (BOS is given)
