"""The denoising view: traces of real samplers on a tiny real model, the CLI, and the replay script.

The model is a tiny randomly initialised DiT (MDLM, and BD3-LM with blocks of 4) over the
built-in corpus's words: the order in which a sampler unmasks does not need a trained
network, and what each sampler guarantees about that order is checked against it. The CLI
tests sample from a checkpoint trained with the CLI (the shared fixture of test_main_e2e).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ROOT
from hydra import compose, initialize_config_dir
from test_main_e2e import TINY, run_main, trained  # noqa: F401 - the shared trained-model fixture
from torch import Tensor

import main
from config_aliases import translate
from dataloader import decode, vocab_and_mask
from denoising_trace import GIVEN, UNDECIDED, DenoisingTrace, TraceRecorder, token_pieces
from generation import generate_samples, make_sampler, sample_template
from samplers import ARSampler
from synthetic import MarkovSource, build_tokenizer

TOKENIZER = build_tokenizer(MarkovSource.from_seed(0))
VOCAB, MASK = vocab_and_mask(TOKENIZER)
L = 16       # TINY's model.length
BATCH = 4
REPLAY = ROOT / "scripts" / "replay.py"


def _load_replay() -> Any:
    spec = importlib.util.spec_from_file_location("replay", REPLAY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


replay = _load_replay()


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models (conftest.one_thread)


def config(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose("config", overrides=translate([*TINY, "checkpointing.save_dir=unused", *overrides]))


@pytest.fixture(scope="module")
def mdlm() -> Any:
    torch.manual_seed(0)
    return main.build_module(config(), VOCAB, MASK).eval()


@pytest.fixture(scope="module")
def bd3lm() -> Any:
    torch.manual_seed(0)
    return main.build_module(config("algorithm=bd3lm", "block_size=4"), VOCAB, MASK).eval()


def sampler_for(module: Any, *overrides: str) -> Any:
    return make_sampler(config(*overrides).sampler, module.algorithm)


def sample(module: Any, sampler: Any, trace: bool = True, template: Tensor | None = None,
           semi_ar: tuple[int, int] | None = None, seed: int = 0) -> list[dict[str, Any]]:
    template = torch.full((1, L), MASK) if template is None else template
    return generate_samples(module, sampler, template, TOKENIZER, 1, BATCH, seed, semi_ar=semi_ar, trace=trace)


# --------------------------------------------------------------------------- the definition
def reference_steps(states: list[Tensor]) -> Tensor:
    """The definition, position by position: ``states`` = [sampler input, call inputs ..., output]."""
    x = states[0]
    steps = torch.where(x == MASK, UNDECIDED, GIVEN)
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            for k in range(1, len(states) - 1):  # call k - 1's input -> call k's input (or the output)
                before, after = int(states[k][b, i]), int(states[k + 1][b, i])
                if before == MASK and after != MASK or before != MASK != after and before != after:
                    steps[b, i] = k - 1
                elif before != MASK and after == MASK:
                    steps[b, i] = UNDECIDED
    return steps


def test_a_hand_made_run_follows_the_definition() -> None:
    """Unmasked, remasked, redrawn, given: each step is the call after which the position last changed."""
    a, b, c, d = 10, 11, 12, 13
    seen: list[dict[str, Any]] = []

    def denoiser(xt: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        seen.append(kwargs)
        return torch.zeros(*xt.shape, VOCAB)

    denoiser.selects_rows = True  # type: ignore[attr-defined]
    denoiser.vocab_size = VOCAB  # type: ignore[attr-defined]
    start = torch.tensor([[MASK, MASK, MASK, a, MASK]])
    trace = DenoisingTrace(denoiser, start, MASK)
    assert trace.selects_rows and trace.vocab_size == VOCAB and not hasattr(trace, "time_conditioned")
    inputs = [start, torch.tensor([[b, MASK, MASK, a, c]]), torch.tensor([[b, MASK, c, a, c]]),
              torch.tensor([[MASK, MASK, c, a, MASK]]), torch.tensor([[d, MASK, b, a, MASK]])]
    output = torch.tensor([[d, a, b, a, MASK]])
    rows = torch.tensor([[True, False, False, False, False]])
    for x in inputs:
        trace(x, torch.zeros(1), rows=rows)
    steps, remasks = trace.finish(output)
    # position 0: unmasked by call 0, remasked, unmasked again by call 3; 1: by the last call (4);
    # 2: by call 1, redrawn by call 3; 3: given; 4: unmasked by call 0, remasked, masked at the end.
    assert steps.tolist() == [[3, 4, 3, GIVEN, UNDECIDED]] and remasks.tolist() == [[1, 0, 1, 0, 1]]
    assert seen == [{"rows": rows}] * 5 and trace.calls == 5
    assert torch.equal(steps, reference_steps([start, *inputs, output]))


def test_remdm_trace_matches_the_definition_on_every_call(mdlm) -> None:
    """ReMDM remasks: a reference built from every call's input agrees with the trace, remaskings included."""
    sampler = sampler_for(mdlm, "sampler=remdm", "sampling.steps=24", "sampler.eta=0.5", "sampler.strategy=all")
    inputs: list[Tensor] = []

    def spy(xt: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        inputs.append(xt.clone())
        return mdlm.algorithm.denoiser(mdlm.backbone)(xt, sigma, **kwargs)

    x = torch.full((BATCH, L), MASK)
    trace = DenoisingTrace(spy, x, MASK)
    out = sampler.sample(trace, x, generator=torch.Generator().manual_seed(0))
    steps, remasks = trace.finish(out.tokens)
    assert remasks.sum() > 0 and out.nfe == len(inputs) == trace.calls
    assert torch.equal(steps, reference_steps([x, *inputs, out.tokens]))
    assert (steps >= 0).all() and (steps < out.nfe).all()


def test_uniform_state_trace_is_the_last_change_and_leaves_the_samples() -> None:
    """UDLM / DUO: the prior draw before call 0 is no decision; each step is the last call that changed the
    position, every later change counts in ``remasks``, and tracing changes no sample."""
    torch.manual_seed(0)
    duo = main.build_module(config("algorithm=duo", "algorithm.curriculum_end=0", "algorithm.curriculum_start=0"),
                            VOCAB, MASK).eval()
    sampler = sampler_for(duo, "algorithm=duo", "sampling.steps=6")  # uniform_ancestral, greedy tail (default)
    inputs: list[Tensor] = []

    def spy(xt: Tensor, sigma: Tensor, **kwargs: Any) -> Tensor:
        inputs.append(xt.clone())
        return duo.algorithm.denoiser(duo.backbone)(xt, sigma, **kwargs)

    spy.vocab_size = duo.algorithm.denoiser(duo.backbone).vocab_size  # type: ignore[attr-defined]
    x = torch.full((BATCH, L), MASK)
    x[:, 0] = 1  # a given token
    trace = DenoisingTrace(spy, x, MASK)
    out = sampler.sample(trace, x, generator=torch.Generator().manual_seed(0))
    steps, remasks = trace.finish(out.tokens)
    assert out.nfe == len(inputs) == trace.calls == 7 and (inputs[0] != MASK).all()  # the prior, drawn first
    assert torch.equal(steps, reference_steps([x, *inputs, out.tokens]))
    assert (steps[:, 0] == GIVEN).all() and (steps[:, 1:] >= UNDECIDED).all() and (steps[:, 1:] < 7).all()
    changes = sum((a != b).long() for a, b in zip([*inputs[1:], out.tokens], inputs, strict=False))
    assert torch.equal(remasks, changes)  # every change after the prior draw
    for semi_ar in (None, (4, 3)):
        plain, traced = sample(duo, sampler, False, semi_ar=semi_ar), sample(duo, sampler, True, semi_ar=semi_ar)
        assert [r["tokens"] for r in plain] == [r["tokens"] for r in traced] and "sample" not in vars(sampler)


# --------------------------------------------------------------------------- through generate_samples
SAMPLERS = {
    "ddpm": ["sampler=ddpm"],
    "ddpm_cache": ["sampler=ddpm_cache", "sampling.steps=64"],
    "first_hitting": ["sampler=first_hitting"],
    "remdm": ["sampler=remdm", "sampling.steps=24", "sampler.eta=0.5", "sampler.strategy=all"],
    "confidence": ["sampler=confidence", "sampling.steps=16", "sampler.block_length=4"],
}


@pytest.mark.parametrize("semi_ar", [None, (4, 3)], ids=["whole", "semi_ar"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_tracing_does_not_change_the_samples(mdlm, name: str, semi_ar: tuple[int, int] | None) -> None:
    sampler = sampler_for(mdlm, *SAMPLERS[name])
    plain, traced = sample(mdlm, sampler, False, semi_ar=semi_ar), sample(mdlm, sampler, True, semi_ar=semi_ar)
    assert [r["tokens"] for r in plain] == [r["tokens"] for r in traced]
    assert [r["nfe"] for r in plain] == [r["nfe"] for r in traced]
    assert "trace" not in plain[0] and "sample" not in vars(sampler)  # the format without it; the patch undone
    for r in traced:
        assert len(r["trace"]) == len(r["tokens"]) == len(r["trace_pieces"]) == L + (semi_ar[0] * semi_ar[1]
                                                                                     if semi_ar else 0)
        assert all(0 <= s < r["nfe"] for s in r["trace"])  # noise removal: every position decided by a call
        assert "".join(r["trace_pieces"]) == r["text"]


def test_first_hitting_unmasks_one_position_per_call(mdlm) -> None:
    sampler = sampler_for(mdlm, "sampler=first_hitting")
    for r in sample(mdlm, sampler):
        assert sorted(r["trace"]) == list(range(L)) and r["nfe"] == L
    template = sample_template(TOKENIZER, L, MASK, sampler, prefix="the old cat")
    given = int((template != MASK).sum())  # BOS and three words
    for r in sample(mdlm, sampler, template=template):
        assert r["trace"][:given] == [GIVEN] * given == [-1] * 4
        assert sorted(r["trace"][given:]) == list(range(L - given)) and r["nfe"] == L - given


def test_ddpm_cache_decides_like_ddpm_and_skips_the_calls_that_decide_nothing(mdlm) -> None:
    """Same draws: the same positions unmask at the same steps. ddpm calls the network at all 64 steps,
    ddpm_cache only at those where some position of the batch unmasks, so its trace is the dense rank
    of ddpm's over the batch."""
    ddpm = sample(mdlm, sampler_for(mdlm, "sampler=ddpm", "sampling.steps=64"))
    cache = sample(mdlm, sampler_for(mdlm, "sampler=ddpm_cache", "sampling.steps=64"))
    ddpm_steps = np.array([r["trace"] for r in ddpm])  # (B, L)
    cache_steps = np.array([r["trace"] for r in cache])
    distinct = np.unique(ddpm_steps)
    assert ddpm[0]["nfe"] >= 64 and len(distinct) < ddpm[0]["nfe"]  # some of ddpm's calls decide nothing
    assert np.array_equal(np.searchsorted(distinct, ddpm_steps), cache_steps)
    assert cache[0]["nfe"] == len(distinct) and set(np.unique(cache_steps)) == set(range(cache[0]["nfe"]))


def test_confidence_with_blocks_finishes_each_block_before_the_next(mdlm) -> None:
    for r in sample(mdlm, sampler_for(mdlm, *SAMPLERS["confidence"])):
        steps = np.array(r["trace"]).reshape(L // 4, 4)  # (blocks, block_length)
        assert sorted(r["trace"]) == list(range(L))  # 16 steps for 16 positions: one per call
        assert (steps.max(axis=1)[:-1] < steps.min(axis=1)[1:]).all()


@pytest.mark.parametrize("name", ["ddpm_cache", "first_hitting"])
def test_semi_ar_steps_increase_across_strides(mdlm, name: str) -> None:
    stride, strides = 4, 3
    for r in sample(mdlm, sampler_for(mdlm, *SAMPLERS[name]), semi_ar=(stride, strides)):
        steps = np.array(r["trace"])
        for k in range(1, strides + 1):  # window k generates positions [L + (k - 1) S, L + k S)
            new = steps[L + (k - 1) * stride: L + k * stride]
            assert new.min() > steps[: L + (k - 1) * stride].max()
        if name == "first_hitting":
            assert sorted(r["trace"]) == list(range(L + stride * strides)) == list(range(r["nfe"]))


def test_masks_a_window_leaves_are_decided_by_a_later_one(mdlm) -> None:
    """Without noise removal and with eps = 0.5 each window leaves about half its positions masked; the
    next window generates those in its kept part, so their step is that window's, and only the
    positions still masked in the output have none (null)."""
    sampler = sampler_for(mdlm, "sampler=ddpm_cache", "sampling.noise_removal=false", "sampling.eps=0.5")
    records = sample(mdlm, sampler, semi_ar=(4, 3))
    first_window = sample(mdlm, sampler, semi_ar=None)  # the same seed: the first window alone
    left = 0
    for r, first in zip(records, first_window, strict=True):
        assert [s is None for s in r["trace"]] == [t == MASK for t in r["tokens"]]
        left += sum(a == MASK != b for a, b in zip(first["tokens"], r["tokens"][:L], strict=True))
    assert left > 0  # some masks of the first window were generated by a later one


def test_given_tokens_of_an_infill_template_get_minus_one(mdlm) -> None:
    sampler = sampler_for(mdlm, "sampler=ddpm_cache")
    template = sample_template(TOKENIZER, L, MASK, sampler, infill="the [MASK:2] cat saw [MASK] dog .")
    given = (template[0] != MASK).tolist()
    for r in sample(mdlm, sampler, template=template):
        assert [s == GIVEN for s in r["trace"]] == given
        assert all(s >= 0 for s, g in zip(r["trace"], given, strict=True) if not g)


def test_block_diffusion_is_traced_block_by_block(bd3lm) -> None:
    """BD3-LM samples each block with its own denoiser; the trace lays the runs onto their blocks
    (a prefix that fills the first block costs it no run)."""
    sampler = bd3lm.sampler
    template = sample_template(TOKENIZER, L, MASK, sampler, prefix="the old cat")  # block 0 given
    for kv_cache in (True, False):
        bd3lm.algorithm.kv_cache = kv_cache
        plain, traced = sample(bd3lm, sampler, False, template), sample(bd3lm, sampler, True, template)
        assert [r["tokens"] for r in plain] == [r["tokens"] for r in traced]
        for r in traced:
            steps = np.array(r["trace"]).reshape(L // 4, 4)  # (blocks, block_size)
            assert (steps[0] == GIVEN).all() and (steps[1:] >= 0).all()
            assert (steps.max(axis=1)[1:-1] < steps.min(axis=1)[2:]).all()


def test_the_ar_sampler_is_refused(mdlm) -> None:
    with pytest.raises(ValueError, match="sampler=ar drives the causal model itself"):
        sample(mdlm, ARSampler(mask_index=MASK), template=torch.tensor([[2] + [MASK] * (L - 1)]))
    with pytest.raises(ValueError, match="sampler=ar"):
        TraceRecorder(ARSampler(mask_index=MASK), MASK)


def test_token_pieces_join_to_the_text(shared_data: Path) -> None:
    """Byte-level BPE splits a character over tokens: it goes to the token that completes it."""
    from transformers import AutoTokenizer

    gpt2 = AutoTokenizer.from_pretrained(shared_data / "gpt2_tokenizer")
    ids = gpt2("The café in 日本 🎉 ok")["input_ids"] + [50257, 50256] + gpt2(" end")["input_ids"]
    pieces = token_pieces(gpt2, ids, 50257)
    assert "".join(pieces) == decode(gpt2, torch.tensor([ids]), 50257)[0]
    assert "\ufffd" not in "".join(pieces) and "🎉" in pieces and " [MASK]" in "".join(pieces)


# --------------------------------------------------------------------------- replay
def test_summary_names_the_order() -> None:
    rng = np.random.default_rng(0)
    middle_out = [abs(i - 32) for i in range(64)]  # grows from a seed in the middle: rho 0, neighbours close
    evens_first = [i // 2 if i % 2 == 0 else 32 + i // 2 for i in range(64)]  # rho 0.5, neighbours far apart
    assert replay.order_of(list(range(64))).endswith("left to right")
    assert replay.order_of([-1, -1, *range(62)[::-1]]).endswith("right to left")
    assert replay.order_of(rng.permutation(64).tolist()).endswith("random order")
    assert replay.order_of(middle_out).endswith("as by confidence or in windows)")
    assert replay.order_of(evens_first).endswith("-> other")
    assert replay.order_of([0, 0, 0, None]).endswith("no order")
    # neighbours: |diffs| 0 3 0 1 0, mean 0.8; all 15 pairs: 4 x 3 + 4 x 2 + 4 x 1 = 24, mean 1.6
    assert replay.locality([3, 3, 0, 0, 1, 1]) == pytest.approx(1 - 0.8 / 1.6)


def test_frames_reveal_each_position_once_and_end_with_the_text() -> None:
    record = {"trace": [-1, 2, 0, None, 0], "trace_pieces": ["", "a", " bb", " [MASK]", " c"], "text": "a bb [MASK] c",
              "nfe": 3}
    frames = replay.frames(record)
    assert [text for _, text in frames] == ["░ ░░ ░░░░░░ ░", "░ bb ░░░░░░ c", "a bb ░░░░░░ c", "a bb [MASK] c"]
    assert frames[-1][1] == record["text"] and frames[1][0].startswith("call 0 of NFE 3: +2, 2/3")


@pytest.fixture(scope="module")
def traced_run(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    run_dir = tmp_path_factory.mktemp("traced")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # a 32-wide model: one thread is fastest
        run_main(run_dir, "mode=sample_eval", f"eval.checkpoint_path={trained[0]}/checkpoints/last.ckpt",
                 "wandb.mode=disabled", "sampling.num_sample_batches=1", "loader.eval_global_batch_size=3",
                 "sampler=first_hitting", "sampling.trace=true")
    return run_dir / "samples.jsonl"


def test_sample_eval_writes_the_trace(traced_run: Path) -> None:
    records = [json.loads(line) for line in traced_run.read_text().splitlines()]
    assert len(records) == 3
    for r in records:
        assert sorted(r["trace"]) == list(range(L)) and r["trace_remasks"] == [0] * L
        assert "".join(r["trace_pieces"]) == r["text"] and {"tokens", "nfe", "seed", "seconds"} <= set(r)


def test_replay_prints_frames_ending_with_the_text_and_draws_the_heat_map(traced_run: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPLAY), str(traced_run), "--index", "1", "--delay", "0"],
                          capture_output=True, text=True, check=True, timeout=60)
    record = json.loads(traced_run.read_text().splitlines()[1])
    lines = proc.stdout.splitlines()
    headers, texts = lines[0::2], lines[1::2]
    assert len(headers) == len(texts) == 1 + L and all(h.startswith("--- sample 1 ") for h in headers)
    assert texts[-1] == record["text"] and "░" not in texts[-1] and set(texts[0]) <= {"░", " "}
    shaded = [t.count("░") for t in texts]
    assert shaded == sorted(shaded, reverse=True) and shaded[0] > 0 == shaded[-1]  # a token more per call
    png = tmp_path / "order.png"
    replay.main([str(traced_run), "--png", str(png)])
    import matplotlib.image

    image = matplotlib.image.imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 100 and image.shape[1] > 200
