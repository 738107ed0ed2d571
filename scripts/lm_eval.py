"""Zero-shot tasks of lm-evaluation-harness on a checkpoint, through the ``mdlm`` model of lm_eval_adapter.py.

    python scripts/lm_eval.py outputs/quickstart/checkpoints/best.ckpt --tasks lambada_openai --mc-samples 32
    python scripts/lm_eval.py CKPT --tasks synthetic_lambada --include-path tests/data/lm_eval_task --limit 8

The checkpoint is anything ``Pipeline.from_pretrained`` reads; ``--override`` adds Hydra overrides
(e.g. ``--override data=openwebtext-split`` for a GPT-2 model). ``loglikelihood`` is the MDLM
conditional bound averaged over ``--mc-samples`` draws (a lower bound on the log-likelihood in
expectation; see lm_eval_adapter.py). Offline, a task must be local: ``--include-path DIR`` adds
the task YAMLs in DIR, whose data are local files. Prints lm-eval's table; ``--output FILE`` also
writes the results as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# `python scripts/lm_eval.py` puts scripts/ first on the path, where this file would shadow the lm_eval package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def evaluate(checkpoint: str, tasks: list[str], mc_samples: int = 32, limit: float | None = None,
             include_path: str | None = None, batch_size: int = 8, num_fewshot: int | None = None,
             seed: int | None = None, device: str | None = None, overrides: list[str] | None = None,
             bootstrap_iters: int = 1000) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of the checkpoint on ``tasks``; returns its results dict."""
    import lm_eval

    from lm_eval_adapter import MDLMHarness

    manager = task_manager(tasks, include_path)  # unknown names fail before the model is loaded
    model = MDLMHarness(checkpoint, mc_samples=mc_samples, batch_size=batch_size, seed=seed, device=device,
                        overrides=overrides or [])
    return lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                   task_manager=manager, log_samples=False,
                                   bootstrap_iters=bootstrap_iters)


def task_manager(tasks: list[str], include_path: str | None) -> Any:
    """lm-eval's ``TaskManager`` that knows ``tasks``: the include path alone when it has them all (indexing
    lm-eval's own ~15,000 task files takes seconds), else lm-eval's tasks too; unknown names are an error."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = f" or in --include-path {include_path}" if include_path else " (local tasks: --include-path DIR)"
        raise ValueError(f"unknown lm-eval task(s) {unknown}: not among lm-eval's tasks{where}.")
    return manager


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="our .ckpt, the original's .ckpt, a Hugging Face directory or hub repo")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names, e.g. lambada_openai")
    parser.add_argument("--mc-samples", type=int, default=32, help="draws per request of the bound (default 32)")
    parser.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    parser.add_argument("--include-path", default=None, help="a folder of extra task YAMLs (local tasks)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None, help="of the draws (default: the config's seed)")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    parser.add_argument("--override", action="append", default=[], help="a Hydra override, e.g. data=openwebtext-split")
    parser.add_argument("--bootstrap-iters", type=int, default=1000, help="for the metrics' standard errors")
    parser.add_argument("--output", type=Path, default=None, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    results = evaluate(args.checkpoint, [t for t in args.tasks.split(",") if t], args.mc_samples, limit,
                       args.include_path, args.batch_size, args.num_fewshot, args.seed, args.device, args.override,
                       args.bootstrap_iters)

    from lm_eval.utils import make_table

    print(make_table(results))
    if args.output is not None:
        args.output.write_text(json.dumps({"results": results["results"], "config": results.get("config")},
                                          indent=2, default=str) + "\n")
        print(f"Wrote {args.output}")
    return results


if __name__ == "__main__":
    main()
