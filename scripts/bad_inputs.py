"""Run main.py on bad or unusual inputs, as a new user would, and print what each one gets.

    python scripts/bad_inputs.py [--out docs/bad_inputs.md]

Each case is a command line (and, for some, a file it prepares). The table says whether the run
ended with a clear error (exit != 0 and a message that names the option or the file and says
what to do), ran correctly, or neither. It trains one micro checkpoint first (about a minute on
2 CPU cores) so that the evaluation cases have something to load.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TINY = ["experiment=quickstart", "model.hidden_size=32", "model.cond_dim=16", "model.n_blocks=1", "model.n_heads=2",
        "model.length=16", "data.num_train_sequences=96", "data.num_valid_sequences=32", "loader.global_batch_size=8",
        "loader.eval_global_batch_size=16", "trainer.val_check_interval=4", "trainer.num_sanity_val_steps=1",
        "sampling.steps=8", "sampling.num_sample_log=0", "wandb.mode=disabled"]


@dataclass
class Case:
    """One bad input: the overrides, and the words a clear answer must contain."""

    name: str
    overrides: list[str]
    expect: list[str]           # all must appear in the output for the row to count as CLEAR
    ok_exit: bool = False       # True: the run is expected to succeed (a correct answer, not an error)
    setup: str = ""             # what the case prepares, for the table
    files: dict[str, bytes] = field(default_factory=dict)


def cases(work: Path, checkpoint: Path, gpt2_checkpoint: Path) -> list[Case]:
    ckpt = f"eval.checkpoint_path={checkpoint}"
    tokenizer = SHARED / "gpt2_tokenizer"
    return [
        Case("infill text without a [MASK]", [*TINY, "mode=sample_eval", ckpt, "sampling.infill=the cat"],
             ["no [MASK] or [MASK:n] marker", "sampling.prefix"]),
        Case("model.length far beyond the trained length", [*TINY, "mode=sample_eval", ckpt, "model.length=4096"],
             ["longer than the 16 tokens", "semi_ar", "eval.allow_longer=true"]),
        Case("model.length = 1e9", [*TINY, "mode=sample_eval", ckpt, "model.length=1000000000"],
             ["longer than the 16 tokens", "eval.allow_longer=true"]),
        Case("GPT-2 data, default batch 512 on CPU", ["data=text_files", f"data.train_path={work / 'text.txt'}",
             f"data.tokenizer_name_or_path={tokenizer}", "model=micro", "model.length=128", "wandb.mode=disabled",
             "trainer.accelerator=cpu"], ["loader.batch_size", "GiB", "trainer=cpu"],
             setup="a 400-paragraph text file"),
        Case("eval batch sizes that do not divide", [*TINY, "loader.eval_global_batch_size=30",
             "loader.eval_batch_size=8", "trainer.max_steps=2"], ["Final validation"], ok_exit=True),
        Case("an eval batch size of 0", [*TINY, "loader.eval_batch_size=0"], ["loader.eval_batch_size must be >= 1"]),
        Case("non-UTF-8 text file", ["data=text_files", f"data.train_path={work / 'latin.txt'}",
             f"data.tokenizer_name_or_path={tokenizer}", "model=micro", "model.length=16", "trainer=cpu",
             "wandb.mode=disabled"], ["latin.txt is not valid utf-8 text at byte", "data.encoding="],
             setup="a latin-1 file"),
        Case("random bytes as last.ckpt", [*TINY, f"hydra.run.dir={work / 'random'}"],
             ["cannot resume from", "not a file written by torch.save", "resume_from_ckpt=false"],
             setup="checkpoints/last.ckpt = random bytes"),
        Case("truncated last.ckpt", [*TINY, f"hydra.run.dir={work / 'truncated'}"],
             ["cannot resume from", "truncated", "resume_from_ckpt=false"], setup="checkpoints/last.ckpt cut in half"),
        Case("another model's last.ckpt", [*TINY, "model.hidden_size=64", f"hydra.run.dir={work / 'foreign'}"],
             ["cannot resume from", "written by another model", "hydra.run.dir="],
             setup="checkpoints/last.ckpt of hidden size 32"),
        Case("sampling.steps=0 in train mode", [*TINY, "sampling.steps=0", "trainer.max_steps=4"],
             ["sampler steps must be an integer >= 1"]),
        Case("an option the algorithm does not take", [*TINY, "subs_masking=true"],
             ["subs_masking=true is not an option of algorithm=mdlm"]),
        Case("a sampler that does not fit the algorithm", [*TINY, "parameterization=sedd", "sampling.predictor=ddpm"],
             ["valid choices: ['analytic']"]),
        Case("a model option contradicting the checkpoint", [*TINY, "mode=ppl_eval", ckpt, "time_conditioning=true"],
             ["trained with time_conditioning=False", "leave it out"]),
        Case("a data set name that does not exist", [*TINY, "mode=ppl_eval", ckpt, "eval.datasets=[nope]"],
             ["is not a data set config; valid"]),
        Case("your own text, scored whole at the trained length", ["mode=ppl_eval", f"eval.checkpoint_path="
             f"{gpt2_checkpoint}", "data=text_files", f"data.train_path={work / 'text.txt'}", "wandb.mode=disabled",
             "loader.eval_global_batch_size=16"], ["length 16", "NLL bound", "tokenizer the checkpoint was trained"],
             ok_exit=True, setup="a GPT-2 micro model trained at length 16; the text file"),
    ]


def prepare(work: Path, checkpoint: Path) -> None:
    """The files the cases use."""
    (work / "text.txt").write_text("\n\n".join(f"Paragraph {i}: the cat sat on the mat." for i in range(400)))
    (work / "latin.txt").write_bytes("caf\u00e9 au lait\n\nencore un caf\u00e9\n".encode("latin-1") * 20)
    blob = checkpoint.read_bytes()
    for name, content in (("random", os.urandom(4096)), ("truncated", blob[: len(blob) // 2]), ("foreign", blob)):
        (work / name / "checkpoints").mkdir(parents=True, exist_ok=True)
        (work / name / "checkpoints" / "last.ckpt").write_bytes(content)


def run(overrides: list[str], work: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    if not any(o.startswith("hydra.run.dir=") for o in overrides):
        overrides = [*overrides, f"hydra.run.dir={tempfile.mkdtemp(dir=work)}"]
    return subprocess.run([sys.executable, "main.py", *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def verdict(case: Case, proc: subprocess.CompletedProcess) -> tuple[str, str]:
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "Error:" in line or line.startswith("Error")]
    expected = [line for line in output.splitlines() if case.expect[0] in line]
    message = (expected if case.ok_exit else errors)[-1:] or (output.strip().splitlines() or [""])[-1:]
    message = message[0]
    clear = all(word in output for word in case.expect)
    if case.ok_exit:
        if proc.returncode == 0:
            return ("CORRECT" if clear else "SILENT"), message
        return "UNCLEAR", message
    if proc.returncode == 0:
        return "SILENT", message
    return ("CLEAR" if clear else "UNCLEAR"), message


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train = run([*TINY, "trainer.max_steps=8", f"hydra.run.dir={work / 'trained'}"], work)
        if train.returncode != 0:
            sys.exit(f"training the micro checkpoint failed:\n{train.stdout[-2000:]}\n{train.stderr[-2000:]}")
        checkpoint = work / "trained" / "checkpoints" / "last.ckpt"
        prepare(work, checkpoint)
        gpt2 = run(["data=text_files", f"data.train_path={work / 'text.txt'}", "model=micro", "model.length=16",
                    f"data.tokenizer_name_or_path={SHARED / 'gpt2_tokenizer'}", "trainer=cpu", "trainer.max_steps=2",
                    "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "trainer.num_sanity_val_steps=0",
                    "loader.global_batch_size=4", "loader.eval_global_batch_size=4", "sampling.num_sample_log=0",
                    "wandb.mode=disabled", f"hydra.run.dir={work / 'gpt2'}"], work)
        if gpt2.returncode != 0:
            sys.exit(f"training the GPT-2 micro checkpoint failed:\n{gpt2.stdout[-2000:]}\n{gpt2.stderr[-2000:]}")
        rows = []
        for case in cases(work, checkpoint, work / "gpt2" / "checkpoints" / "last.ckpt"):
            proc = run(case.overrides, work)
            result, message = verdict(case, proc)
            shown = ["$TINY", *case.overrides[len(TINY):]] if case.overrides[: len(TINY)] == TINY else case.overrides
            command = "python main.py " + " ".join(o.replace(str(work), "$WORK").replace(str(SHARED), "$SHARED")
                                                   for o in shown)
            rows.append((case.name, case.setup, command, proc.returncode, result, message.replace(str(work), "$WORK")))
            print(f"[{result}] {case.name}: exit {proc.returncode}", flush=True)
    date = datetime.date.today().isoformat()
    lines = [f"Made by `python scripts/bad_inputs.py --out docs/bad_inputs.md` on {date} (CPU). `$TINY` is a "
             f"micro quickstart run: `{' '.join(TINY)}`; `$WORK` the script's scratch folder; `$SHARED` "
             "../shared/data (real tokenizers).", "",
             "| case | prepared | exit | result | what the user reads (last error line) |", "|---|---|---|---|---|"]
    for name, setup, command, code, result, message in rows:
        message = message.replace("|", "\\|")[:300]
        lines.append(f"| {name}<br>`{command}` | {setup} | {code} | {result} | {message} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        header = ("# Bad and unusual inputs\n\nWhat a new user gets for inputs that used to give a wrong answer "
                  "with exit 0 (SILENT) or an error without a usable message (UNCLEAR). CLEAR: exit != 0 with a "
                  "message that names the option or file and says what to do; CORRECT: the run does the right "
                  "thing.\n\n")
        args.out.write_text(header + table)


if __name__ == "__main__":
    main()
