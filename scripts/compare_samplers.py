"""Every sampler at several step counts, measured against held-out text and, on the built-in corpus, the truth.

    python scripts/compare_samplers.py                      # both models, writes results/samplers.{md,json,png}
    python scripts/compare_samplers.py --models builtin --num-samples 16 --out /tmp/samplers   # a quick look

Models (``--models``): ``builtin``, the quickstart model on the built-in Markov corpus (train it
with ``bash scripts/quickstart.sh``), and ``ptb``, a micro DiT on PTB with GPT-2 tokens (the
command that trains it is printed when its checkpoint is missing). Each is loaded once, the way
``main.py mode=sample_eval`` loads it (same functions, same config composition); each row is
what ``python main.py mode=sample_eval <model overrides> <row overrides>`` samples.

Steps ``T`` = L/4, L, 4L and 16L (``L``: the model's length). Per row:

- NFE (network calls per batch) and seconds per sample;
- generative perplexity and MAUVE against as many held-out blocks, both from the eval LM
  (default ``smollm2-135m``, offline), and the mean unigram entropy of the samples' tokens;
- on the built-in corpus: the fraction of samples the source can produce at all, the source's
  true NLL per token of those, and (its tokens are words) the word entropy, next to the same
  numbers for held-out source text.

The first row of each table is held-out data scored like samples (MAUVE: against a second,
disjoint held-out set), the ceiling a sampler can reach.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/compare_samplers.py`: make the repo importable
    sys.path.insert(0, str(ROOT))

import main as entry  # noqa: E402
import utils  # noqa: E402
from generation import make_sampler, score_samples, scored_text  # noqa: E402
from metrics import GenerativePerplexity, mauve_score  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
PTB = SHARED_DATA / "ptb"
PTB_DATA = [
    "data=text_files", f"data.train_path={PTB / 'ptb.train.txt'}", f"data.valid_path={PTB / 'ptb.valid.txt'}",
    f"data.tokenizer_name_or_path={SHARED_DATA / 'gpt2_tokenizer'}", "data.document_separator=line",
]


@dataclass(frozen=True)
class Model:
    label: str
    checkpoint: Path
    overrides: list[str]  # the data (and recipe) the checkpoint was trained on
    train_command: str  # how to make the checkpoint when it is missing


MODELS: dict[str, Model] = {
    "builtin": Model("built-in Markov corpus, quickstart model (micro DiT, L = 64)",
                     ROOT / "outputs/quickstart/checkpoints/best.ckpt", ["experiment=quickstart"],
                     "bash scripts/quickstart.sh"),
    "ptb": Model("PTB, GPT-2 tokens (micro DiT, L = 64)", ROOT / "outputs/ptb_micro/checkpoints/last.ckpt", PTB_DATA,
                 "python main.py " + " ".join(PTB_DATA) + " model=micro model.length=64 loader.global_batch_size=16 "
                 "loader.eval_global_batch_size=32 trainer.max_steps=2000 trainer.val_check_interval=1000 "
                 "optim.lr=1e-3 lr_scheduler.num_warmup_steps=100 training.ema=0.999 hydra.run.dir=outputs/ptb_micro"),
}


@dataclass(frozen=True)
class Setting:
    """One line of the plot: a sampler with fixed options, run at the step counts it takes."""

    name: str
    overrides: list[str]
    steps: str = "all"  # all | fixed (no T: first-hitting, threshold) | up_to_L | from_L
    by_steps: dict[str, list[str]] = field(default_factory=dict)  # "below_L" | "from_L": extra overrides
    exact: bool = False
    every_step: bool = False  # one network call per step (NFE = T): --max-nfe skips the larger T


SETTINGS = [
    Setting("ddpm", ["sampler=ddpm"], exact=True, every_step=True),
    Setting("ddpm_cache", ["sampler=ddpm_cache"], exact=True),
    Setting("ddpm_cache p=0.9", ["sampler=ddpm_cache", "sampler.top_p=0.9"]),
    Setting("first_hitting", ["sampler=first_hitting"], steps="fixed", exact=True),
    Setting("remdm cap", ["sampler=remdm"], by_steps={"below_L": ["sampler.eta=0.04", "sampler.strategy=all"]},
            exact=True, every_step=True),
    Setting("remdm cap p=0.9", ["sampler=remdm", "sampler.top_p=0.9"],
            by_steps={"below_L": ["sampler.eta=0.04", "sampler.strategy=all"]}, every_step=True),
    Setting("remdm rescale", ["sampler=remdm", "sampler.schedule=rescale"], steps="from_L", exact=True,
            every_step=True),
    Setting("remdm conf", ["sampler=remdm", "sampler.schedule=conf"], steps="from_L", every_step=True),
    Setting("confidence", ["sampler=confidence"], steps="up_to_L"),
    Setting("threshold 0.9", ["sampler=confidence", "sampler.threshold=0.9"], steps="fixed"),
]


def shown(text: str) -> str:
    """A command as the report shows it: paths relative to the repository (../shared for the shared data)."""
    return text.replace(f"{ROOT.parent}/shared/", "../shared/").replace(f"{ROOT}/", "")


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``python main.py <overrides>`` runs with, HydraConfig set as in a run."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def step_counts(setting: Setting, length: int, factors: list[float], max_nfe: int | None = None) -> list[int | None]:
    counts = [max(1, round(f * length)) for f in factors]
    if setting.every_step and max_nfe is not None:
        counts = [t for t in counts if t <= max_nfe]
    if setting.steps == "fixed":
        return [None]
    if setting.steps == "up_to_L":
        return [t for t in counts if t <= length]
    if setting.steps == "from_L":
        return [t for t in counts if t >= length]
    return counts


def row_overrides(setting: Setting, steps: int | None, length: int) -> list[str]:
    extra = [] if steps is None else [f"sampling.steps={steps}"]
    if steps is not None:
        extra += setting.by_steps.get("below_L" if steps < length else "from_L", [])
    return [*setting.overrides, *extra]


def summarize(records: list[dict[str, Any]], summary: dict[str, float]) -> dict[str, Any]:
    """The table's numbers for one row of samples (after :func:`generation.score_samples`)."""
    out: dict[str, Any] = {
        "nfe": float(np.mean([r["nfe"] for r in records])), "seconds_per_sample": summary["seconds_per_sample"],
        "gen_ppl": summary.get("gen_ppl"), "entropy": summary["mean_entropy"], "mauve": summary.get("mauve"),
    }
    true_nll = [r["true_nll_per_token"] for r in records if "true_nll_per_token" in r]
    if true_nll:
        possible = [v for v in true_nll if math.isfinite(v)]
        out["possible"] = len(possible) / len(true_nll)
        out["true_nll"] = float(np.mean(possible)) if possible else math.nan
    return out


def held_out_records(data: Any, num: int, offset: int = 0) -> list[dict[str, Any]]:
    """``num`` evaluation blocks of ``data`` as sample records (NFE 0), evenly spaced from ``offset``; with a
    source of known law, each with its ``true_nll_per_token``."""
    dataset = data.evaluation_dataset()
    indices = (np.arange(num) * (len(dataset) // num) + offset).tolist()
    tokens = torch.stack([dataset[i]["input_ids"] for i in indices])  # (N, L)
    records = [{"tokens": t.tolist(), "nfe": 0, "seconds": 0.0} for t in tokens]
    if getattr(data, "has_true_nll", False):
        for record, nll in zip(records, data.true_nll_of(tokens).tolist(), strict=True):
            record["true_nll_per_token"] = nll / tokens.shape[1]
    return records


class Comparison:
    """One model loaded once; samples and scores each row."""

    def __init__(self, model: Model, scorer: GenerativePerplexity, num_samples: int, batch_size: int,
                 seed: int) -> None:
        self.model, self.scorer, self.seed = model, scorer, seed
        batch_size = min(batch_size, num_samples)
        self.num_batches, self.batch_size = math.ceil(num_samples / batch_size), batch_size
        self.base = [*model.overrides, "mode=sample_eval", f"eval.checkpoint_path={model.checkpoint}", f"seed={seed}"]
        cfg = compose_config(self.base)
        entry.validate_config(cfg)
        self.loaded = entry.adopt_for_eval(cfg)
        self.data, vocab_size, mask_index = entry.build_data(cfg)
        self.module = entry.build_for_eval(cfg, self.loaded, vocab_size, mask_index)
        self.length = int(cfg.model.length)
        self.truncate = bool(cfg.eval.gen_ppl_truncate_at_eos)
        n = self.num_batches * batch_size
        self.reference, self.second_reference = self.held_out(n, 0), self.held_out(n, 1)
        self.reference_features = scorer.features(self.texts(self.reference))

    def held_out(self, num: int, offset: int) -> list[dict[str, Any]]:
        """``num`` evaluation blocks as sample records: evenly spaced, shifted by ``offset`` (disjoint sets)."""
        blocks = len(self.data.evaluation_dataset())
        if blocks < 2 * num:
            raise SystemExit(f"{self.model.label}: the evaluation split has {blocks} blocks, fewer than "
                             f"2 x {num}: use fewer --num-samples")
        return held_out_records(self.data, num, offset)

    def texts(self, records: list[dict[str, Any]]) -> list[str]:
        """What the eval LM reads of each record (:func:`generation.scored_text`)."""
        return [scored_text(r["tokens"], self.data.tokenizer, self.truncate) for r in records]

    def scored(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        summary = score_samples(records, self.data.tokenizer, self.scorer, self.truncate)
        summary["mauve"] = mauve_score(self.scorer.features(self.texts(records)), self.reference_features,
                                       seed=self.seed)
        return summarize(records, summary)

    def data_row(self) -> dict[str, Any]:
        return {"sampler": "held-out data", "steps": None, "exact": True, "command": "",
                "example": self.texts(self.second_reference[:1])[0][:160], **self.scored(self.second_reference)}

    def row(self, setting: Setting, steps: int | None) -> dict[str, Any]:
        overrides = row_overrides(setting, steps, self.length)
        cfg = compose_config([*self.base, *overrides])
        entry.validate_config(cfg)
        entry.adopt_for_eval(cfg, self.loaded)  # sample_eval's checks and sampler choice; the file is read once
        self.module.sampler = make_sampler(cfg.sampler, self.module.algorithm, bool(cfg.sampling.float64))
        records = entry.generate_from_config(cfg, self.module, self.data, self.num_batches, self.batch_size)
        command = shown("python main.py " + " ".join(shlex.quote(o) for o in [*self.base, *overrides]))
        return {"sampler": setting.name, "steps": steps, "exact": setting.exact, "command": command,
                "example": records[0]["text"][:160], **self.scored(records)}


# --------------------------------------------------------------------------- report
COLUMNS = [("gen_ppl", "gen PPL", "{:.1f}"), ("entropy", "entropy", "{:.3f}"), ("mauve", "MAUVE", "{:.3f}"),
           ("possible", "possible", "{:.0%}"), ("true_nll", "true NLL", "{:.3f}")]


def fmt(value: Any, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else spec.format(value)


def table(rows: list[dict[str, Any]], base: str) -> str:
    keys = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    lines = ["| sampler | T | exact | NFE | s/sample | " + " | ".join(c[1] for c in keys) + " | overrides |",
             "|---" * (6 + len(keys)) + "|"]
    for r in rows:
        overrides = r["command"].removeprefix(base).strip()
        numbers = " | ".join(fmt(r.get(k), spec) for k, _, spec in keys)
        lines.append(f"| {r['sampler']} | {fmt(r['steps'], '{:,}')} | {'yes' if r['exact'] else 'no'} | "
                     f"{r['nfe']:.0f} | {r['seconds_per_sample']:.3f} | {numbers} | "
                     + (f"`{overrides}` |" if overrides else "|"))
    return "\n".join(lines)


def write_report(results: dict[str, dict[str, Any]], args: argparse.Namespace, command: str, minutes: float) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    parts = [
        "# Samplers compared against held-out text and the known source",
        "",
        f"Command: `{command}` ({datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} CPU threads, {minutes:.0f} min). Eval LM for gen PPL and MAUVE features: "
        f"`{args.eval_model}`.",
        "",
        "Columns: T = `sampling.steps` (none where the sampler sets its own number of calls); exact = exact in law "
        "(samples the model's distribution, up to the time discretization for T-step samplers); NFE = network calls "
        "per batch; gen PPL = token-weighted perplexity under the eval LM; entropy = mean unigram entropy of a "
        "sample's tokens (nats); MAUVE against as many held-out blocks (1 = indistinguishable; coarse at these "
        "sample sizes: compare it with the held-out data row, scored the same way against a disjoint held-out set). "
        "On the built-in corpus: possible = fraction of samples the source can produce, true NLL = the source's "
        "NLL per token of those (nats; held-out data: the source's entropy rate), entropy = word entropy (its "
        "tokens are words). Each row is `python main.py <model overrides> <overrides>`.",
        "",
        f"![quality against NFE]({Path(args.out).with_suffix('.png').name})",
    ]
    for result in results.values():
        parts += ["", f"## {result['label']}", "",
                  f"Model overrides: `{result['base']}`; {result['num_samples']} samples of {result['length']} "
                  "tokens per row." + (f" Samplers that call the network at every step (ddpm, remdm) ran up to "
                                       f"T = {result['max_nfe']} here (`--max-nfe`): their cost grows with T."
                                       if result.get("max_nfe") else ""),
                  "", table(result["rows"], result["base"])]
    out.with_suffix(".md").write_text("\n".join(parts) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"Wrote {out.with_suffix('.md')}, {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def plot(results: dict[str, dict[str, Any]], path: Path | None = None) -> Any:
    """One row of panels per model, x = NFE per batch; saved to ``path`` if given; returns the Figure."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("mauve", "MAUVE (higher is better)"), ("gen_ppl", "gen PPL (eval LM)"),
               ("entropy", "unigram entropy (nats)"), ("possible", "fraction the source can produce"),
               ("true_nll", "true NLL of those (nats/token)")]
    fig, axes = plt.subplots(len(results), len(metrics), figsize=(4.2 * len(metrics), 3.4 * len(results)),
                             squeeze=False)
    for row_axes, result in zip(axes, results.values(), strict=True):
        data = next(r for r in result["rows"] if r["sampler"] == "held-out data")
        for ax, (key, title) in zip(row_axes, metrics, strict=True):
            if data.get(key) is None:
                ax.axis("off")
                continue
            names = dict.fromkeys(r["sampler"] for r in result["rows"] if r["sampler"] != "held-out data")
            for name in names:
                points = sorted((r["nfe"], r[key]) for r in result["rows"] if r["sampler"] == name
                                and r.get(key) is not None and math.isfinite(r[key]))
                if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=name)
            ax.axhline(data[key], color="black", linestyle="--", linewidth=1, label="held-out data")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("NFE per batch")
            ax.set_title(f"{title}\n{result['short']}", fontsize=9)
            if key == "gen_ppl":
                ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["builtin", "ptb"])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="MODEL=PATH",
                        help="another checkpoint for a model, e.g. ptb=/path/last.ckpt")
    parser.add_argument("--samplers", nargs="+", choices=[s.name for s in SETTINGS], default=None,
                        metavar="NAME", help=f"default: all of {[s.name for s in SETTINGS]}")
    parser.add_argument("--factors", nargs="+", type=float, default=[0.25, 1, 4, 16], help="T as multiples of L")
    parser.add_argument("--max-nfe", nargs="*", default=[], metavar="MODEL=N",
                        help="skip the T > N rows of samplers that call the network every step, e.g. ptb=256")
    parser.add_argument("--num-samples", nargs="+", default=["64"], metavar="N|MODEL=N",
                        help="samples per row: a default and per-model values, e.g. 64 ptb=16")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "results" / "samplers"), help="path stem of the .md/.json/.png")
    args = parser.parse_args()
    args.max_nfe = {k: int(v) for k, v in (item.split("=", 1) for item in args.max_nfe)}
    num_samples = {k: int(v) for k, v in (item.split("=", 1) for item in args.num_samples if "=" in item)}
    default_samples = next((int(item) for item in args.num_samples if "=" not in item), 64)
    start = time.perf_counter()
    print(utils.configure_cpu_threads(processes=1))
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    settings = [s for s in SETTINGS if args.samplers is None or s.name in args.samplers]
    models = {name: MODELS[name] for name in args.models}
    for name, model in models.items():  # every checkpoint is checked before the eval LM loads
        if name in checkpoints:
            models[name] = model = Model(model.label, Path(checkpoints[name]), model.overrides, model.train_command)
        if not model.checkpoint.is_file():
            raise SystemExit(f"{model.checkpoint} not found: train it with\n  {model.train_command}\n"
                             f"or pass --checkpoint {name}=/path/to/last.ckpt")
    scorer = GenerativePerplexity(args.eval_model, batch_size=16)
    results: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        torch.manual_seed(args.seed)
        comparison = Comparison(model, scorer, num_samples.get(name, default_samples), args.batch_size, args.seed)
        rows = [comparison.data_row()]
        for setting in settings:
            for steps in step_counts(setting, comparison.length, args.factors, args.max_nfe.get(name)):
                rows.append(comparison.row(setting, steps))
                r = rows[-1]
                print(f"[{name}] {r['sampler']:>18} T={fmt(steps, '{}'):>5}: NFE {r['nfe']:.0f}, "
                      f"{r['seconds_per_sample']:.3f} s/sample, gen PPL {fmt(r['gen_ppl'], '{:.1f}')}, "
                      f"entropy {r['entropy']:.3f}, MAUVE {r['mauve']:.3f}"
                      + (f", possible {r['possible']:.0%}, true NLL {r['true_nll']:.3f}" if "possible" in r else ""),
                      flush=True)
        base = shown("python main.py " + " ".join(shlex.quote(o) for o in comparison.base))
        results[name] = {"label": model.label, "short": name, "base": base, "length": comparison.length,
                         "num_samples": comparison.num_batches * comparison.batch_size, "rows": rows,
                         "max_nfe": args.max_nfe.get(name)}
    command = shown("python scripts/compare_samplers.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    write_report(results, args, command.strip(), (time.perf_counter() - start) / 60)


if __name__ == "__main__":
    main()
