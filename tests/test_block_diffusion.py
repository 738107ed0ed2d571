"""Block diffusion (BD3-LM): the attention mask, the vectorized loss against slow references, its limits.

- the mask equals a brute-force reading of its definition for several (L, L');
- the vectorized loss (one pass over x_t ⊕ x_0) equals a slow loop that runs each block after
  its clean prefix, to 1e-5;
- L' = L is MDLM's loss exactly (same draws);
- L' = 1 with every token masked is the autoregressive likelihood computed token by token.
"""

from __future__ import annotations

import pytest
import torch
from test_sample_eval import eval_lm  # noqa: F401 - a tiny GPT-2 eval LM over the built-in corpus

from algorithms import MDLM, Draws, subs_nelbo
from block_diffusion import BD3LM, block_diffusion_mask, two_stream_logits
from models.dit import DiT
from noise_schedule import LogLinear

VOCAB, MASK = 13, 12


def random_dit(seed: int = 0) -> DiT:
    """A small DiT with every weight random (the zero-initialised adaLN and output layer included)."""
    torch.manual_seed(seed)
    model = DiT(VOCAB, hidden_size=32, cond_dim=16, n_blocks=2, n_heads=4, dropout=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def brute_force_mask(length: int, block_size: int) -> torch.Tensor:
    """The definition read literally: positions 0..L-1 are x_t, L..2L-1 are x_0."""
    allowed = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for q in range(2 * length):
        for k in range(2 * length):
            q_noisy, k_noisy = q < length, k < length
            q_block, k_block = (q % length) // block_size, (k % length) // block_size
            if q_noisy:  # a noisy block sees itself and the clean blocks before it
                allowed[q, k] = (k_noisy and k_block == q_block) or (not k_noisy and k_block < q_block)
            else:  # a clean block sees the clean blocks up to its own, never a noisy token
                allowed[q, k] = not k_noisy and k_block <= q_block
    return allowed


@pytest.mark.parametrize(("length", "block_size"), [(1, 1), (4, 1), (4, 2), (6, 3), (8, 8), (12, 4)])
def test_mask_matches_its_definition(length: int, block_size: int) -> None:
    assert torch.equal(block_diffusion_mask(length, block_size), brute_force_mask(length, block_size))


def test_mask_rejects_a_block_size_that_does_not_divide() -> None:
    with pytest.raises(ValueError, match="must divide"):
        block_diffusion_mask(10, 4)
    with pytest.raises(ValueError, match="block_size=4 must divide the sequence length 10"):
        BD3LM(LogLinear(), MASK, block_size=4).check_length(10)


def block_causal_logits(model: DiT, clean_prefix: torch.Tensor, noisy_block: torch.Tensor,
                        block_size: int) -> torch.Tensor:
    """Slow reference: run [clean prefix ; noisy block] with block-causal attention, return the block's logits."""
    x = torch.cat([clean_prefix, noisy_block], dim=1)  # (B, P + L')
    block = torch.arange(x.shape[1]) // block_size
    mask = block[:, None] >= block[None, :]  # (S, S): a block sees the blocks up to its own
    sigma = torch.zeros(x.shape[0])
    return model(x, sigma, attn_mask=mask)[:, -noisy_block.shape[1]:]


@pytest.mark.parametrize("block_size", [1, 2, 4, 8])
def test_vectorized_loss_equals_a_loop_over_blocks(block_size: int) -> None:
    model, length = random_dit(), 8
    algorithm = BD3LM(LogLinear(), MASK, block_size=block_size)
    x0 = torch.randint(0, MASK, (3, length))
    draws = Draws(time=torch.rand(3), mask=torch.rand(3, length))
    out = algorithm.loss(model, x0, torch.ones(3, length), draws=draws)

    t, xt = algorithm.forward_process(x0, draws)
    per_block = algorithm.block_times(3, length // block_size, "cpu", draws)  # (B, nb): one time per block
    torch.testing.assert_close(t, per_block.repeat_interleave(block_size, dim=1), atol=0, rtol=0)
    weight = algorithm.noise(t).nelbo_weight  # (B, L)
    expected = torch.zeros(3, length, dtype=torch.float64)
    for start in range(0, length, block_size):
        block = slice(start, start + block_size)
        logits = block_causal_logits(model, x0[:, :start], xt[:, block], block_size)
        ones = torch.ones(3)
        expected[:, block] = subs_nelbo(logits, x0[:, block], xt[:, block], MASK, ones).double() * weight[:, block]
    assert (xt == MASK).any() and (xt != MASK).any()
    torch.testing.assert_close(out.nll.double(), expected, atol=1e-5, rtol=1e-5)


def test_block_size_L_is_mdlm() -> None:
    model, length = random_dit(1), 8
    x0 = torch.randint(0, MASK, (4, length))
    draws = Draws(time=torch.rand(4), mask=torch.rand(4, length))
    ones = torch.ones(4, length)
    bd3lm = BD3LM(LogLinear(), MASK, block_size=length).eval()
    mdlm = MDLM(LogLinear(), MASK).eval()
    torch.testing.assert_close(bd3lm.loss(model, x0, ones, draws=draws).nll,
                               mdlm.loss(model, x0, ones, draws=draws).nll, atol=1e-5, rtol=1e-5)


def test_block_size_1_fully_masked_is_the_autoregressive_likelihood() -> None:
    """Every x_t token masked, L' = 1: token i is predicted from x_0[:i] alone, as an AR model."""
    model, length = random_dit(2), 6
    x0 = torch.randint(0, MASK, (2, length))
    xt = torch.full_like(x0, MASK)
    sigma = torch.zeros(2)
    log_p = two_stream_logits(model, xt, x0, 1, sigma).double().log_softmax(-1)  # mask logit is never the target
    vectorized = -log_p.gather(-1, x0[..., None]).squeeze(-1)  # (B, L)
    for i in range(length):  # one token at a time: the prefix x0[:i], then a mask
        x = torch.cat([x0[:, :i], torch.full((2, 1), MASK)], dim=1)
        causal = torch.ones(i + 1, i + 1, dtype=torch.bool).tril()
        logits = model(x, sigma, attn_mask=causal)[:, -1].double()
        torch.testing.assert_close(vectorized[:, i], -logits.log_softmax(-1).gather(-1, x0[:, i:i + 1]).squeeze(-1))


def test_training_times_are_clipped_evaluation_times_are_not() -> None:
    algorithm = BD3LM(LogLinear(), MASK, block_size=4, clip_min=0.3, clip_max=0.8)
    t = algorithm.block_times(64, 4, "cpu")
    assert t.shape == (64, 4) and t.min() >= 0.3 and t.max() <= 0.8
    algorithm.eval()
    t = algorithm.block_times(64, 4, "cpu")
    assert t.min() < 0.1 and t.max() > 0.9  # [sampling_eps, 1]: the unclipped bound


def test_antithetic_block_times_fill_every_stratum() -> None:
    t = BD3LM(LogLinear(), MASK, block_size=2, clip_min=0.0).block_times(4, 8, "cpu")  # 32 blocks
    strata = (t.flatten() * 32).floor().long().sort().values
    assert torch.equal(strata, torch.arange(32))


def test_padding_is_hidden_from_real_tokens() -> None:
    model, length = random_dit(3), 8
    algorithm = BD3LM(LogLinear(), MASK, block_size=2)
    x0 = torch.randint(0, MASK, (1, length))
    draws = Draws(time=torch.rand(1), mask=torch.rand(1, length))
    padded = x0.clone()
    padded[:, 6:] = 5  # different "padding" tokens after position 6
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    a = algorithm.loss(model, x0, mask, draws=draws).nll
    b = algorithm.loss(model, padded, mask, draws=draws).nll
    torch.testing.assert_close(a, b)
    assert (a[:, 6:] == 0).all()


def test_time_conditioning_is_refused() -> None:
    with pytest.raises(ValueError, match="time_conditioning=false"):
        BD3LM(LogLinear(), MASK, block_size=2, time_conditioning=True)


# --------------------------------------------------------------------------- the clip search
def test_clip_intervals_are_the_papers_grid() -> None:
    from block_diffusion import clip_intervals

    intervals = clip_intervals([0.5, 0.6, 0.7, 0.8, 0.9], 0.05)
    assert len(intervals) == 36 and intervals[0] == (1e-3, 1.0)
    width_half = [x for interval in intervals[1:12] for x in interval]  # width 0.5: [0, 0.5] ... [0.5, 1]
    assert width_half == pytest.approx([x for k in range(11) for x in (max(0.05 * k, 1e-3), 0.05 * k + 0.5)])
    assert all(1e-3 <= lo < hi <= 1.0 for lo, hi in intervals)
    assert intervals[-3:] == [(1e-3, 0.9), (0.05, 0.95), (0.1, 1.0)]  # width 0.9
    with pytest.raises(ValueError, match="clip_search_widths must be in"):
        clip_intervals([1.5], 0.05)


def test_clip_search_picks_the_interval_of_least_variance_and_keeps_it() -> None:
    model = random_dit(9)
    algorithm = BD3LM(LogLinear(), MASK, block_size=4, clip_search_widths=[0.5, 0.8], clip_search_batches=2).eval()
    batches = [{"input_ids": torch.randint(0, MASK, (3, 12)), "attention_mask": torch.ones(3, 12)} for _ in range(3)]
    torch.manual_seed(0)
    for index, batch in enumerate(batches):  # the third batch is past clip_search_batches
        algorithm.on_validation_batch(model, batch, index, gather=lambda t: t)
    torch.manual_seed(0)  # the slow reference: the same draws, in the same order
    totals = [0.0] * len(algorithm.clip_search.intervals)
    for batch in batches[:2]:
        for k, interval in enumerate(algorithm.clip_search.intervals):
            nll = algorithm.loss(model, batch["input_ids"], batch["attention_mask"], interval=interval).nll.detach()
            per_block = torch.stack([nll[:, b * 4:(b + 1) * 4].mean(-1) for b in range(3)], dim=1)  # (B, 3)
            totals[k] += float(per_block.double().var())
    assert algorithm.clip_search.totals == pytest.approx(totals, rel=1e-9)
    best = min(range(len(totals)), key=totals.__getitem__)
    logged = algorithm.on_validation_end()
    assert (logged["clip_min"], logged["clip_max"]) == algorithm.clip_search.intervals[best]
    assert logged["clip_variance"] == pytest.approx(totals[best] / 2)
    assert (algorithm.clip_min, algorithm.clip_max) == algorithm.clip_search.intervals[best]
    algorithm.train()
    times = algorithm.block_times(64, 4, "cpu")
    assert times.min() >= algorithm.clip_min and times.max() <= algorithm.clip_max  # training uses it
    fresh = BD3LM(LogLinear(), MASK, block_size=4)
    fresh.load_state_dict(algorithm.state_dict())  # a resumed run keeps the interval
    assert (fresh.clip_min, fresh.clip_max) == (algorithm.clip_min, algorithm.clip_max)
    assert algorithm.clip_search.totals == [0.0] * len(totals) and algorithm.on_validation_end() == {}


# --------------------------------------------------------------------------- sampling, exact in law
class ToyBlockBackbone(torch.nn.Module):
    """The exact conditionals of test_samplers.py's toy joint (L = 3), as a backbone for block sampling.

    It gets [clean prefix ; block] (B, S <= 3) and returns log p(x0 | these tokens) at those
    positions: the later positions are unknown (masked) to it, as the block-causal mask makes them.
    """

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        from test_samplers import LOG_TABLE, L, state_index
        assert attn_mask is not None and attn_mask.shape == (x.shape[1], x.shape[1])
        full = torch.cat([x, torch.full((x.shape[0], L - x.shape[1]), TOY_MASK)], dim=1)  # (B, L)
        return LOG_TABLE[state_index(full)][:, : x.shape[1]]


TOY_MASK = 3


@pytest.mark.parametrize("block_size", [1, 3])
def test_block_by_block_sampling_follows_the_exact_joint(block_size: int) -> None:
    """First-hitting inside each block (exact in law) gives the toy's exact joint, given a prefix or not."""
    from conftest import build_sampler
    from test_first_hitting import conditional_law, shifted
    from test_samplers import assert_matches

    algorithm = BD3LM(LogLinear(), TOY_MASK, block_size=block_size, kv_cache=False).eval()
    sampler = build_sampler("first_hitting", noise=LogLinear(), mask_index=TOY_MASK)
    for start in [(TOY_MASK,) * 3, (1, TOY_MASK, TOY_MASK)]:
        x = torch.tensor(start).expand(40_000, 3).clone()
        out = algorithm.sample(sampler, ToyBlockBackbone(), x, generator=torch.Generator().manual_seed(0))
        law = conditional_law(start)
        assert_matches(out.tokens, law)
        with pytest.raises(AssertionError, match="p-value"):
            assert_matches(out.tokens, shifted(law))
        assert out.nfe == sum(t == TOY_MASK for t in start)  # a given block costs nothing


def test_ddpm_cache_runs_its_steps_in_every_block() -> None:
    from conftest import build_sampler

    algorithm = BD3LM(LogLinear(), TOY_MASK, block_size=1, kv_cache=False).eval()
    sampler = build_sampler("ddpm_cache", noise=LogLinear(), mask_index=TOY_MASK, steps=4)
    out = algorithm.sample(sampler, ToyBlockBackbone(), torch.full((8, 3), TOY_MASK),
                           generator=torch.Generator().manual_seed(0))
    assert (out.tokens != TOY_MASK).all() and 3 <= out.nfe <= 3 * 4  # per block: 1..4 calls (one per unmasking time)


# --------------------------------------------------------------------------- the KV cache
def test_cached_and_uncached_logits_agree() -> None:
    model, block_size = random_dit(4), 4
    algorithm = BD3LM(LogLinear(), MASK, block_size=block_size)
    x = torch.randint(0, MASK, (2, 3 * block_size))
    xt = x[:, 2 * block_size:].clone()
    xt[:, [0, 2]] = MASK
    sigma = torch.zeros(2)
    uncached = algorithm.block_denoiser(model, x[:, : 2 * block_size])(xt, sigma)
    cache = model.new_cache()
    cache.store = True
    for b in range(2):  # the prefix joins the cache one block at a time, as the sampler does it
        model(x[:, b * block_size:(b + 1) * block_size], sigma, cache=cache)
    cache.store = False
    assert cache.length == cache.position == 2 * block_size
    cached = algorithm.cached_denoiser(model, cache)(xt, sigma)
    finite = uncached > -1e5
    assert torch.equal(finite, cached > -1e5)
    torch.testing.assert_close(cached[finite], uncached[finite], atol=1e-5, rtol=1e-5)
    assert cache.length == 2 * block_size  # reading does not store


@pytest.mark.parametrize("sampler_name", ["first_hitting", "ddpm_cache"])
def test_sampling_with_and_without_the_cache_gives_the_same_tokens(sampler_name: str) -> None:
    from conftest import build_sampler

    model, length, block_size = random_dit(5), 12, 4
    steps = {"steps": 16} if sampler_name == "ddpm_cache" else {}
    sampler = build_sampler(sampler_name, noise=LogLinear(), mask_index=MASK, **steps)
    x = torch.full((3, length), MASK)
    x[:, :2] = torch.tensor([1, 2])  # a prefix inside the first block
    outs = {}
    for kv_cache in (True, False):
        algorithm = BD3LM(LogLinear(), MASK, block_size=block_size, kv_cache=kv_cache).eval()
        outs[kv_cache] = algorithm.sample(sampler, model, x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(outs[True].tokens, outs[False].tokens)
    assert (outs[True].tokens[:, :2] == torch.tensor([1, 2])).all() and (outs[True].tokens != MASK).all()
    assert outs[True].nfe == outs[False].nfe + length // block_size - 1  # one cache fill per finished block


def test_samples_longer_than_the_context_slide_a_window() -> None:
    from conftest import build_sampler

    model, block_size = random_dit(6), 4
    sampler = build_sampler("first_hitting", noise=LogLinear(), mask_index=MASK)
    x = torch.full((2, 5 * block_size), MASK)  # 20 tokens, context 8: the network never sees more than 8
    for kv_cache in (True, False):
        algorithm = BD3LM(LogLinear(), MASK, block_size=block_size, kv_cache=kv_cache, context_length=8).eval()
        out = algorithm.sample(sampler, model, x, generator=torch.Generator().manual_seed(0))
        assert (out.tokens != MASK).all() and out.tokens.shape == (2, 20)
    seen = []
    model.register_forward_hook(lambda module, args, kwargs_out: seen.append(args[0].shape[1]))
    algorithm = BD3LM(LogLinear(), MASK, block_size=block_size, kv_cache=False, context_length=8).eval()
    algorithm.sample(sampler, model, x, generator=torch.Generator().manual_seed(0))
    assert max(seen) == 8


# --------------------------------------------------------------------------- variable length, rejection
EOS = 7


class NeverEOS(torch.nn.Module):
    """A random DiT that never predicts EOS: the only EOS in a sample are the template's."""

    def __init__(self) -> None:
        super().__init__()
        self.dit = random_dit(7)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        logits = self.dit(x, sigma, **kwargs).clone()
        logits[..., EOS] = -1e9
        return logits

    def new_cache(self, window: int | None = None):
        return self.dit.new_cache(window)


@pytest.mark.parametrize("kv_cache", [True, False])
def test_variable_length_stops_after_the_block_where_every_sequence_has_ended(kv_cache: bool) -> None:
    from conftest import build_sampler

    sampler = build_sampler("first_hitting", noise=LogLinear(), mask_index=MASK)
    algorithm = BD3LM(LogLinear(), MASK, block_size=4, kv_cache=kv_cache).eval()
    x = torch.full((3, 24), MASK)
    x[0, 0] = EOS  # a leading BOS with EOS's id (GPT-2) does not end a sequence ...
    x[0, 5] = EOS  # ... the first EOS after position 0 does
    x[1, 9] = EOS
    x[2, 13] = EOS
    out = algorithm.sample(sampler, NeverEOS(), x, generator=torch.Generator().manual_seed(0), stop_token=EOS)
    assert out.tokens.shape == (3, 16)  # block 3 (positions 12-15) is the last: blocks 4 and 5 are never drawn
    assert out.lengths.tolist() == [6, 10, 14]
    assert (out.tokens != MASK).all() and (out.tokens[:, 1:] == EOS).sum() == 3
    masked = int((x[:, :16] == MASK).view(3, 4, 4).sum(-1).max(0).values.sum())  # first-hitting: a block's most masks
    assert out.nfe == masked + (3 if kv_cache else 0)  # + a cache fill after each finished block but the last
    x[2, 13] = MASK  # now sequence 2 never ends: every block is drawn
    out = algorithm.sample(sampler, NeverEOS(), x, generator=torch.Generator().manual_seed(0), stop_token=EOS)
    assert out.tokens.shape == (3, 24) and out.lengths.tolist() == [6, 10, 24]
    assert algorithm.sample(sampler, NeverEOS(), x, generator=torch.Generator().manual_seed(0)).lengths is None


def test_low_entropy_samples_are_redrawn_and_flagged() -> None:
    import functools

    from conftest import build_sampler

    from diffusion import Diffusion
    from generation import EntropyRejection, generate_samples
    from metrics import unigram_entropy

    class Tokenizer:  # decodes ids as words (the records' text)
        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    module = Diffusion(backbone=random_dit(8), algorithm=BD3LM(LogLinear(), MASK, block_size=4),
                       optimizer=functools.partial(torch.optim.SGD, lr=0.1), ema_decay=0)
    sampler = build_sampler("first_hitting", noise=LogLinear(), mask_index=MASK)
    template = torch.full((1, 12), MASK)

    def draw(rejection):
        return generate_samples(module, sampler, template, Tokenizer(), 2, 4, seed=3, rejection=rejection)

    plain = draw(None)
    entropies = sorted(unigram_entropy(r["tokens"][-8:]) for r in plain)
    threshold = (entropies[2] + entropies[3]) / 2  # about half of the first draws fall below
    rejection = EntropyRejection(threshold, window=8, max_retries=3)
    records = draw(rejection)
    assert [r["retries"] for r in records] != [0] * 8
    for first, record in zip(plain, records, strict=True):
        kept = unigram_entropy(first["tokens"][-8:]) >= threshold
        assert (record["retries"] == 0) == kept  # accepted at once, or drawn again
        assert (record["tokens"] == first["tokens"]) == kept
        assert record["low_entropy"] == (unigram_entropy(record["tokens"][-8:]) < threshold)
        assert record["low_entropy"] <= (record["retries"] == 3)  # flagged only after every retry
    assert [r["tokens"] for r in draw(rejection)] == [r["tokens"] for r in records]  # redraws are seeded
    always = draw(EntropyRejection(100.0, window=8, max_retries=2))
    assert all(r["retries"] == 2 and r["low_entropy"] for r in always)
    with pytest.raises(ValueError, match="entropy_window"):
        EntropyRejection(4.0, window=0)


# --------------------------------------------------------------------------- from the command line
def test_train_evaluate_and_sample_from_the_command_line(tmp_path, eval_lm) -> None:  # noqa: F811
    import json

    from test_main_e2e import run_main

    run_main(tmp_path, "algorithm=bd3lm", "block_size=4", "trainer.max_steps=4", "wandb.mode=disabled",
             "training.clip_search_widths=[0.5,0.9]", "training.clip_search_batches=1")
    metrics = next(tmp_path.glob("csv/version_*/metrics.csv")).read_text()
    assert "val/clip_min" in metrics and "val/clip_max" in metrics  # the clip search ran and was logged
    checkpoint = f"eval.checkpoint_path={tmp_path}/checkpoints/last.ckpt"
    run_main(tmp_path / "ppl", "mode=ppl_eval", checkpoint, "wandb.mode=disabled")
    results = json.loads((tmp_path / "ppl" / "eval_results.json").read_text())
    assert results["nll"] > 0 and "true_nll" in results
    tokens = {}
    for kv_cache in ("true", "false"):
        run_dir = tmp_path / f"sample_{kv_cache}"
        run_main(run_dir, "mode=sample_eval", checkpoint, "sampler=first_hitting", f"sampling.kv_cache={kv_cache}",
                 "sampling.num_sample_batches=1", "loader.eval_global_batch_size=4", "wandb.mode=disabled")
        records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
        assert len(records) == 4 and all(len(r["tokens"]) == 16 for r in records)
        tokens[kv_cache] = [r["tokens"] for r in records]
        assert records[0]["nfe"] == 16 + (3 if kv_cache == "true" else 0)  # + one cache fill per finished block
    assert tokens["true"] == tokens["false"]
    run_dir = tmp_path / "sample_long"  # past the trained length, ending at EOS, with the rejection on
    run_main(run_dir, "mode=sample_eval", checkpoint, "sampling.length=24", "sampling.var_length=true",
             "sampling.min_entropy=1.0", "sampling.entropy_window=8", "sampling.num_sample_batches=1",
             "loader.eval_global_batch_size=4", "wandb.mode=disabled", "eval.compute_generative_perplexity=true",
             f"eval.gen_ppl_eval_model={eval_lm}")
    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert all(r["length"] <= 24 and "retries" in r for r in records) and max(r["length"] for r in records) > 16
    summary = json.loads((run_dir / "sample_results.json").read_text())
    assert summary["min_entropy"] == 1.0 and "mean_length" in summary and "redrawn" in summary
    assert summary["gen_ppl"] > 1 and all(r["gen_num_tokens"] <= r["length"] for r in records)
    with pytest.raises(AssertionError, match="must be a multiple of block_size=4: e.g. 24"):
        run_main(tmp_path / "bad_length", "mode=sample_eval", checkpoint, "sampling.length=22", "wandb.mode=disabled")
    with pytest.raises(AssertionError, match="trained with block_size=4 but the command line says block_size=8"):
        run_main(tmp_path / "bad", "mode=ppl_eval", checkpoint, "block_size=8", "wandb.mode=disabled")


def test_fine_tuning_starts_from_an_mdlm_checkpoint(tmp_path) -> None:
    """training.from_pretrained: a BD3-LM starts from an MDLM checkpoint's EMA weights; the sizes must match."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from test_checkpoints import SYNTHETIC_VOCAB, save_trained_checkpoint
    from test_main_e2e import ROOT, TINY

    import main
    from config_aliases import translate

    pretrained = save_trained_checkpoint(tmp_path, [])  # an MDLM, with an EMA ...
    checkpoint = torch.load(pretrained, weights_only=True)
    ema = [torch.randn_like(t) for t in checkpoint["ema"]["shadow_params"]]  # ... that differs from its weights
    checkpoint["ema"]["shadow_params"] = ema
    torch.save(checkpoint, pretrained)

    def bd3lm(*overrides: str):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
            cfg = compose("config", overrides=translate([*TINY, f"checkpointing.save_dir={tmp_path}", "algorithm=bd3lm",
                                                         "block_size=4", f"training.from_pretrained={pretrained}",
                                                         *overrides]))
        return cfg, main.build_module(cfg, SYNTHETIC_VOCAB, SYNTHETIC_VOCAB - 1)

    cfg, module = bd3lm()
    main.init_from_pretrained(cfg, module, SYNTHETIC_VOCAB)
    assert type(module.algorithm).__name__ == "BD3LM" and OmegaConf.select(cfg, "training.from_pretrained")
    for p, shadow, start in zip(module.trainable_parameters(), module.ema.shadow_params, ema, strict=True):
        assert torch.equal(p, start) and torch.equal(shadow, start)  # the EMA weights, and a fresh EMA of them
    cfg, module = bd3lm("model.hidden_size=64")
    with pytest.raises(ValueError, match="Give the model sizes it was trained with"):
        main.init_from_pretrained(cfg, module, SYNTHETIC_VOCAB)
