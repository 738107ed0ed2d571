"""Replay how samples were denoised, from the trace ``sample_eval sampling.trace=true`` writes.

    python scripts/replay.py RUN_DIR/samples.jsonl                      # sample 0, animated
    python scripts/replay.py RUN_DIR/samples.jsonl --index 3 --delay 0  # every frame, one after another
    python scripts/replay.py RUN_DIR/samples.jsonl --png order.png      # heat map of all samples
    python scripts/replay.py RUN_DIR/samples.jsonl --summary            # one line per sample: the order

Each record of samples.jsonl then holds ``trace`` (per position: the denoiser call that
unmasked it, counted from 0 over the whole generation; -1 = given; null = still masked at the
end), ``trace_remasks`` and ``trace_pieces`` (the text of each token; they join to the record's
``text``), so no tokenizer or checkpoint is needed here (see ``denoising_trace.py``).

Replay: one frame at the start (given tokens only) and one after each call that unmasked
something; a masked position shows as ``░`` the width of the token it becomes (the layout never
moves). The last frame is the sample's text. Positions a sampler remasked (ReMDM) appear at
their last unmasking.

Summary, over the n generated positions: the Spearman correlation rho of step with position,
and the locality ``1 - mean |s_(i+1) - s_i| / mean_(a != b) |s_a - s_b|`` (s: steps in position
order; 1 when neighbours are unmasked together, 0 on average for a random order). ``rho >= 0.9``
reads as left to right (also block by block), ``rho <= -0.9`` right to left; ``|rho|`` and
``|locality|`` both below ``3 / sqrt(n - 1)`` as random order (a uniformly random order gives rho
of standard deviation 1 / sqrt(n - 1), and locality less: 0.08 at n = 64); otherwise "other",
"local" when the locality is at least 0.5 (confidence decoding, semi-AR windows).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

PLACEHOLDER = "░"
LEFT_TO_RIGHT = 0.9  # |rho| at or above: a sequential order
RANDOM_SIGMAS = 3.0  # |rho| and |locality| below this many times 1 / sqrt(n - 1): random
LOCAL = 0.5          # locality at or above: neighbours unmasked close together


def load(path: Path) -> list[dict[str, Any]]:
    """The records of ``path`` (samples.jsonl), each with its trace; an error names the setting that writes one."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"{path} holds no samples")
    if "trace" not in records[0]:
        raise SystemExit(f"{path} holds no trace: sample with python main.py mode=sample_eval ... sampling.trace=true")
    return records


def shade(piece: str) -> str:
    """A masked token: ``░`` for each of its characters, its whitespace kept."""
    return "".join(c if c.isspace() else PLACEHOLDER for c in piece)


def frames(record: dict[str, Any], highlight: bool = False) -> list[tuple[str, str]]:
    """(header, text) per frame: the start, then after each call that unmasked a position.

    A position is shown from the frame of its step on (given ones, step -1, from the start).
    Positions still masked at the end (step null) stay shaded, and a last frame shows them as the
    text does; so the last frame is always the text. ``highlight``: the positions the frame's own
    call unmasked in reverse video (ANSI).
    """
    steps, pieces = record["trace"], record["trace_pieces"]
    decided = sorted({s for s in steps if s is not None and s >= 0})
    total = sum(s is not None and s >= 0 for s in steps)
    keys: list[int | None] = [-1, *decided] + ([None] if None in steps else [])
    out = []
    for k in keys:
        text = "".join(
            (f"\x1b[7m{p}\x1b[0m" if highlight and s == k and k >= 0 else p)
            if k is None or (s is not None and s <= k) else shade(p)
            for p, s in zip(pieces, steps, strict=True)
        )
        if k is None:
            header = f"end: {steps.count(None)} positions still masked"
        elif k < 0:
            header = "start (given tokens)"
        else:
            done = sum(s is not None and 0 <= s <= k for s in steps)
            header = f"call {k} of NFE {record.get('nfe', '?')}: +{steps.count(k)}, {done}/{total} unmasked"
        out.append((header, text))
    return out


def replay(record: dict[str, Any], delay: float, out: Any = sys.stdout) -> None:
    """Print the frames; with ``delay > 0`` on a terminal, each redraws the screen after ``delay`` s."""
    animate = delay > 0 and out.isatty()
    name = f"sample {record.get('index_in_batch', '?')} (seed {record.get('seed', '?')}, {record.get('sampler', '?')})"
    for header, text in frames(record, highlight=out.isatty()):
        if animate:
            out.write("\x1b[H\x1b[2J")  # cursor home, clear screen
        out.write(f"--- {name}, {header}\n{text}\n")
        out.flush()
        if delay > 0:
            time.sleep(delay)


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their mean rank."""
    order = np.argsort(values, kind="stable")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def decided(steps: list[int | None]) -> tuple[np.ndarray, np.ndarray]:
    """Positions and steps (n,) of the generated positions (step >= 0), in position order."""
    pairs = [(i, s) for i, s in enumerate(steps) if s is not None and s >= 0]
    return np.array([i for i, _ in pairs], dtype=float), np.array([s for _, s in pairs], dtype=float)


def spearman(steps: list[int | None]) -> float:
    """Spearman rho of step against position over the generated positions (nan: fewer than 2 distinct steps)."""
    position, step = decided(steps)
    if len(np.unique(step)) < 2:
        return math.nan
    return float(np.corrcoef(ranks(position), ranks(step))[0, 1])


def locality(steps: list[int | None]) -> float:
    """``1 - mean |s_(i+1) - s_i| / mean_(a != b) |s_a - s_b|`` over the generated positions in order.

    0 for a random order (neighbours are as far apart in time as any two positions), 1 when
    neighbours are unmasked by the same call; left to right and confidence decoding score high.
    """
    _, step = decided(steps)
    n = len(step)
    spread = np.abs(step[:, None] - step[None, :]).sum() / max(n * (n - 1), 1)
    return math.nan if n < 3 or spread == 0 else float(1.0 - np.abs(np.diff(step)).mean() / spread)


def order_of(steps: list[int | None]) -> str:
    """The order a trace looks like (see the module docstring)."""
    rho, local, n = spearman(steps), locality(steps), len(decided(steps)[1])
    if math.isnan(rho) or n < 3:
        return f"{n} positions in one call: no order"
    bound = RANDOM_SIGMAS / math.sqrt(n - 1)
    if rho >= LEFT_TO_RIGHT or rho <= -LEFT_TO_RIGHT:
        verdict = "left to right" if rho > 0 else "right to left"
    elif abs(rho) < bound and abs(local) < bound:
        verdict = "random order"
    elif local >= LOCAL:
        verdict = "other: local (neighbours unmasked close together, as by confidence or in windows)"
    else:
        verdict = "other"
    return (f"rho {rho:+.3f}, locality {local:+.3f} over {n} positions (random: both within {bound:.3f} of 0) "
            f"-> {verdict}")


def summary(records: list[dict[str, Any]]) -> list[str]:
    """One line per record: its NFE, calls that unmasked something, remaskings and order."""
    lines = []
    for i, r in enumerate(records):
        calls = len({s for s in r["trace"] if s is not None and s >= 0})
        remasks = sum(r.get("trace_remasks", []))
        lines.append(f"#{i} {r.get('sampler', '?')} NFE {r.get('nfe', '?')}, {calls} calls unmasked something, "
                     f"{remasks} remaskings: {order_of(r['trace'])}")
    return lines


def default_title(record: dict[str, Any]) -> str:
    """The sampler, its steps, semi-AR windows and NFE of a record."""
    parts = [str(record.get("sampler", "?"))]
    if record.get("steps") is not None:
        parts.append(f"{record['steps']} steps")
    if record.get("num_strides"):
        parts.append(f"semi-AR: {record['num_strides']} more windows of +{record['stride_length']}")
    return f"{', '.join(parts)}, NFE {record.get('nfe', '?')}: the call that unmasked each position"


def heat_map(records: list[dict[str, Any]], path: Path, title: str | None = None) -> None:
    """PNG: rows = samples, columns = positions, colour = the call that unmasked the position.

    Given positions are light grey, positions still masked at the end white.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    length = max(len(r["trace"]) for r in records)
    steps = np.full((len(records), length), np.nan)  # (samples, positions)
    given = np.zeros(steps.shape, dtype=bool)
    for i, r in enumerate(records):
        for j, s in enumerate(r["trace"]):
            given[i, j] = s == -1
            steps[i, j] = np.nan if s is None or s < 0 else s
    top = max(np.nanmax(steps) if np.isfinite(steps).any() else 0.0, 1.0)
    cmap, norm = plt.get_cmap("viridis"), Normalize(0.0, top)
    image = cmap(norm(np.nan_to_num(steps)))  # (samples, positions, 4)
    image[given] = (0.85, 0.85, 0.85, 1.0)
    image[~given & np.isnan(steps)] = (1.0, 1.0, 1.0, 1.0)
    fig, ax = plt.subplots(figsize=(min(12.0, 2.0 + length / 8), 1.2 + 0.28 * len(records)))
    ax.imshow(image, aspect="auto", interpolation="nearest")
    ax.set_xlabel("position")
    ax.set_ylabel("sample")
    ax.set_title(title or default_title(records[0]), fontsize=10)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="denoiser call", pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("samples", type=Path, help="samples.jsonl of mode=sample_eval sampling.trace=true")
    parser.add_argument("--index", type=int, default=0, help="which sample to replay (default 0)")
    parser.add_argument("--delay", type=float, default=0.15, help="seconds per frame; 0 prints every frame at once")
    parser.add_argument("--png", type=Path, help="write the heat map of all samples here (no replay)")
    parser.add_argument("--title", help="the heat map's title")
    parser.add_argument("--summary", action="store_true", help="one line per sample: its order (no replay)")
    args = parser.parse_args(argv)
    records = load(args.samples)
    if args.summary:
        print("\n".join(summary(records)))
    if args.png:
        heat_map(records, args.png, args.title)
        print(f"Wrote {args.png}")
    if args.summary or args.png:
        return
    if not 0 <= args.index < len(records):
        raise SystemExit(f"--index {args.index}: {args.samples} holds samples 0..{len(records) - 1}")
    replay(records[args.index], args.delay)


if __name__ == "__main__":
    main()
