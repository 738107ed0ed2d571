"""Seconds per 1,024 generated tokens: BD3-LM with and without its KV cache, against MDLM.

    python bench/block_diffusion_benchmark.py            # micro DiT, GPT-2 vocabulary, L = 1,024
    python bench/block_diffusion_benchmark.py --quick    # smoke run (L = 64), seconds

Every row samples one sequence of ``--length`` tokens with the first-hitting sampler (exact in
law; one network call per masked token, so NFE is the same for every row but the cache fills),
from a randomly perturbed DiT of size ``--size`` (``configs/model/``) with ``--vocab`` tokens:

- BD3-LM, block size L' in ``--block-sizes``, with the KV cache (each call runs the L' tokens
  of the current block against the cached clean prefix; a finished block costs one more call
  to join the cache) and without it (each call runs the clean prefix and the block);
- MDLM over the whole sequence (each call runs all L tokens).

Prints a Markdown table and writes it to ``--out`` (default ``results/bd3lm_speed.md``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/block_diffusion_benchmark.py`
    sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from algorithms import MDLM  # noqa: E402
from block_diffusion import BD3LM  # noqa: E402
from first_hitting import FirstHittingSampler  # noqa: E402
from models.dit import DiT  # noqa: E402
from noise_schedule import LogLinear  # noqa: E402

PERTURB_STD = 0.02  # random weights with non-trivial logits


def build_dit(size: str, vocab: int, seed: int) -> DiT:
    model = OmegaConf.load(ROOT / "configs" / "model" / f"{size}.yaml")
    torch.manual_seed(seed)
    dit = DiT(vocab, hidden_size=model.hidden_size, cond_dim=model.cond_dim, n_blocks=model.n_blocks,
              n_heads=model.n_heads, dropout=0.0)
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * PERTURB_STD)
    return dit.eval()


def time_sample(algorithm: MDLM | BD3LM, dit: DiT, sampler: FirstHittingSampler, length: int,
                seed: int) -> tuple[float, int]:
    x = torch.full((1, length), algorithm.mask_index)
    start = time.perf_counter()
    with torch.no_grad():
        out = algorithm.sample(sampler, dit, x, generator=torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - start
    assert (out.tokens != algorithm.mask_index).all()
    return seconds, out.nfe


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="micro", help="configs/model/ name (default micro)")
    parser.add_argument("--vocab", type=int, default=50258, help="vocabulary, mask included (GPT-2: 50258)")
    parser.add_argument("--length", type=int, default=None, help="tokens per sample (default 1,024; --quick: 64)")
    parser.add_argument("--block-sizes", default="4,16")
    parser.add_argument("--quick", action="store_true", help="L = 64: seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bd3lm_speed.md")
    args = parser.parse_args(argv)
    if args.length is None:
        args.length = 64 if args.quick else 1024
    block_sizes = [int(b) for b in args.block_sizes.split(",")]
    noise = LogLinear()
    mask = args.vocab - 1
    dit = build_dit(args.size, args.vocab, args.seed)
    sampler = FirstHittingSampler(noise, mask)
    rows = []
    for block_size in block_sizes:
        for kv_cache in (True, False):
            algorithm = BD3LM(noise, mask, block_size=block_size, kv_cache=kv_cache, context_length=args.length).eval()
            seconds, nfe = time_sample(algorithm, dit, sampler, args.length, args.seed)
            rows.append((f"BD3-LM L'={block_size}", "yes" if kv_cache else "no", nfe, seconds))
            print(rows[-1], flush=True)
    seconds, nfe = time_sample(MDLM(noise, mask).eval(), dit, sampler, args.length, args.seed)
    rows.append(("MDLM", "-", nfe, seconds))
    print(rows[-1], flush=True)
    per = 1024 / args.length
    threads = torch.get_num_threads()
    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS",) if k in os.environ)
    lines = [
        "# BD3-LM sampling speed: with and without the KV cache, against MDLM",
        "",
        f"Command: `{env}{shlex.join(['python', 'bench/block_diffusion_benchmark.py', *argv])}`",
        f"Date: {datetime.date.today().isoformat()}; CPU ({platform.processor() or platform.machine()}, "
        f"{threads} threads), torch {torch.__version__}, fp32.",
        f"Model: a randomly perturbed `{args.size}` DiT, vocabulary {args.vocab:,}; one sample of {args.length:,} "
        "tokens, batch 1; first-hitting sampler (one call per masked token, float64 draws).",
        "",
        "| model | KV cache | NFE | seconds per sample | seconds per 1,024 tokens | speed-up vs MDLM |",
        "|---|---|---|---|---|---|",
    ]
    mdlm_seconds = rows[-1][3]
    for name, cache, nfe, secs in rows:
        lines.append(f"| {name} | {cache} | {nfe:,} | {secs:.2f} | {secs * per:.2f} | {mdlm_seconds / secs:.1f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
