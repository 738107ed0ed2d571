"""Data pipeline speed: tokenization throughput, cache-load time and block reading rate.

    python bench/data_benchmark.py                       # PTB + GPT-2 tokenizer from ../shared/data
    python bench/data_benchmark.py --path DIR --tokenizer DIR_OR_NAME --corpus ptb

For each number of tokenization processes (``--procs``, default ``1,2``) the script builds the
train and validation splits into a fresh cache folder (:class:`dataloader.CorpusData`, the
same code path as training) and reports tokens/s of the build. Then it measures, with the
cache warm, the time to get both data sets ready (what every later run pays) and the rate at
which a DataLoader reads blocks. Prints a Markdown table and writes it to ``--out``
(default ``bench_results/data_<corpus>.md``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/data_benchmark.py`: make the repo importable
    sys.path.insert(0, str(ROOT))

from torch.utils.data import DataLoader  # noqa: E402

from dataloader import CorpusData  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"


def build(args: argparse.Namespace, cache_dir: Path, procs: int) -> tuple[CorpusData, float]:
    start = time.perf_counter()
    data = CorpusData(train=args.corpus, valid=args.corpus, tokenizer_name_or_path=args.tokenizer,
                      block_size=args.length, cache_dir=str(cache_dir), path=args.path, num_proc=procs)
    data.train_dataset()
    data.valid_dataset()
    return data, time.perf_counter() - start


def num_tokens(cache_dir: Path) -> int:
    return sum(json.loads(m.read_text())["num_tokens"] for m in cache_dir.glob("tokenized/*/meta.json"))


def read_rate(data: CorpusData, batch_size: int) -> float:
    """Blocks per second through a DataLoader over the training set (one pass, no workers)."""
    loader = DataLoader(data.train_dataset(), batch_size=batch_size)
    start = time.perf_counter()
    blocks = sum(batch["input_ids"].shape[0] for batch in loader)
    return blocks / (time.perf_counter() - start)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="ptb", help="data set name (corpora.CORPORA)")
    parser.add_argument("--path", default=str(SHARED_DATA / "ptb"), help="local copy of the data set")
    parser.add_argument("--tokenizer", default=str(SHARED_DATA / "gpt2_tokenizer"), help="tokenizer dir or name")
    parser.add_argument("--length", type=int, default=1024, help="block size")
    parser.add_argument("--procs", default="1,2", help="comma-separated numbers of tokenization processes")
    parser.add_argument("--batch", type=int, default=64, help="DataLoader batch size for the read rate")
    parser.add_argument("--out", type=Path, help="Markdown file (default bench_results/data_<corpus>.md)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.path and not Path(args.path).exists():
        raise SystemExit(f"--path {args.path} does not exist; pass a local copy of {args.corpus}")
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="mdlm-data-bench-"))
    try:
        for procs in (int(p) for p in args.procs.split(",")):
            cache_dir = scratch / f"procs{procs}"
            _, seconds = build(args, cache_dir, procs)
            tokens = num_tokens(cache_dir)
            rows.append(f"| build (tokenize + save), {procs} process(es) | {seconds:.2f} s | "
                        f"{tokens / seconds:,.0f} tokens/s ({tokens:,} tokens) |")
        data, seconds = build(args, cache_dir, procs)  # warm cache
        rows.append(f"| load from cache (train + validation ready) | {seconds:.3f} s | |")
        rate = read_rate(data, args.batch)
        rows.append(f"| read blocks of {args.length} (DataLoader, batch {args.batch}) | | {rate:,.0f} blocks/s "
                    f"({rate * args.length:,.0f} tokens/s) |")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table = "\n".join([
        f"## Data pipeline: {args.corpus} ({args.path}), tokenizer {args.tokenizer}",
        "",
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs. "
        f"Command: `python bench/data_benchmark.py {' '.join(argv)}`".rstrip(),
        "",
        "| step | time | throughput |",
        "|---|---|---|",
        *rows,
        "",
    ])
    print(table)
    out = args.out or ROOT / "bench_results" / f"data_{args.corpus}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"Wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
