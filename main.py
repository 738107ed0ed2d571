"""Entry point: ``python main.py mode=train|ppl_eval|sample_eval [overrides]``.

Hydra composes ``configs/config.yaml``; this file builds data, model and trainer from it and
dispatches on ``mode`` through :data:`MODES`.
"""

from __future__ import annotations

import csv
import functools
import inspect
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

import utils
from algorithms import build_algorithm
from checkpoints import check_compatible, load_checkpoint
from dataloader import DataModule, vocab_and_mask
from diffusion import Diffusion
from fault_tolerance import AtomicCheckpointIO, resume_checkpoint
from generation import generate_samples, load_scorer, print_samples, sample_evaluator, score_samples

CORPUS_TARGET = "dataloader.CorpusData"  # the data configs that eval.datasets can name
# Config keys that define the network; for evaluation they come from the checkpoint. (T is
# not one: a continuous-time model can be evaluated with any discrete T.)
ARCHITECTURE_KEYS = ("model", "backbone", "noise", "parameterization", "time_conditioning", "subs_masking")


# --------------------------------------------------------------------------- building blocks
def validate_config(cfg: DictConfig) -> None:
    """Reject invalid combinations before any data is loaded, naming the valid choices."""
    backbone = HydraConfig.get().runtime.choices.get("backbone")
    if (cfg.parameterization == "ar") != (backbone == "ar"):
        raise ValueError(
            f"parameterization={cfg.parameterization} with backbone={backbone}: the AR baseline needs "
            "backbone=ar parameterization=ar (e.g. model=small-ar); diffusion parameterizations need a "
            "bidirectional backbone (backbone=dit or backbone=dimamba with model=tiny-dimamba)."
        )
    algorithm = build_algorithm(cfg.parameterization, mask_index=0, **algorithm_options(cfg))
    valid = getattr(algorithm, "samplers", ())
    if cfg.parameterization != "ar" and cfg.sampling.predictor not in valid:
        raise ValueError(
            f"sampling.predictor={cfg.sampling.predictor} does not apply to parameterization={cfg.parameterization}; "
            f"valid choices: {list(valid)}."
        )


def algorithm_options(cfg: DictConfig) -> dict[str, Any]:
    return {
        "noise": instantiate(cfg.noise),
        "sampling_eps": cfg.training.sampling_eps,
        "antithetic_sampling": cfg.training.antithetic_sampling,
        "time_conditioning": cfg.time_conditioning,
        "T": cfg.T,
        "subs_masking": cfg.subs_masking,
        "importance_sampling": cfg.training.importance_sampling,
        "change_of_variables": cfg.training.change_of_variables,
    }


def build_module(cfg: DictConfig, vocab_size: int, mask_index: int) -> Diffusion:
    backbone = instantiate(cfg.backbone, vocab_size=vocab_size)
    algorithm = build_algorithm(cfg.parameterization, mask_index=mask_index, **algorithm_options(cfg))
    optimizer = functools.partial(
        torch.optim.AdamW,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
    )
    return Diffusion(
        backbone=backbone,
        algorithm=algorithm,
        optimizer=optimizer,
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        ema_decay=cfg.training.ema,
        run_config=OmegaConf.to_container(cfg, resolve=True),
        seed=cfg.seed,
        mc_samples=cfg.eval.mc_samples,
    )


def build_loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    # A new csv/version_N/ per run, so a resumed or evaluation run never overwrites earlier metrics.
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="csv")]
    valid = ("offline", "online", "disabled")
    if cfg.wandb.mode not in valid:
        raise ValueError(f"wandb.mode={cfg.wandb.mode!r} is not one of {valid}.")
    if cfg.wandb.mode != "disabled":
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project=cfg.wandb.project,
                name=cfg.wandb.name,
                group=cfg.wandb.group,
                notes=cfg.wandb.notes,
                tags=list(cfg.wandb.tags),
                save_dir=str(run_dir),
                offline=cfg.wandb.mode == "offline",
            )
        )
    return loggers


def build_trainer(cfg: DictConfig, run_dir: Path) -> tuple[L.Trainer, utils.BatchPlan, utils.BatchPlan]:
    """The Lightning trainer plus the train and eval batch plans for this device count."""
    accelerator, devices = utils.resolve_accelerator(cfg.trainer.accelerator, cfg.trainer.devices)
    world_size = devices * cfg.trainer.num_nodes
    train_plan = utils.plan_batches(cfg.loader.global_batch_size, world_size, cfg.loader.batch_size)
    eval_plan = utils.plan_batches(cfg.loader.eval_global_batch_size, world_size, cfg.loader.eval_batch_size)
    precision = cfg.trainer.precision
    if precision == "auto":
        precision = utils.default_precision(accelerator)
    trainer = instantiate(
        cfg.trainer,
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        accumulate_grad_batches=train_plan.accumulate,
        strategy=instantiate(cfg.strategy) if cfg.get("strategy") else "auto",
        callbacks=[instantiate(c) for c in cfg.callbacks.values()],
        plugins=[AtomicCheckpointIO()],
        logger=build_loggers(cfg, run_dir),
        default_root_dir=str(run_dir),
    )
    return trainer, train_plan, eval_plan


def make_datamodule(cfg: DictConfig, data: Any, train_plan: utils.BatchPlan, eval_plan: utils.BatchPlan) -> DataModule:
    return DataModule(
        data,
        batch_size=train_plan.per_device,
        eval_batch_size=eval_plan.per_device,
        num_workers=cfg.loader.num_workers,
        pin_memory=cfg.loader.pin_memory,
        seed=cfg.seed,
    )


def build_data(cfg: DictConfig) -> Any:
    target = hydra.utils.get_class(cfg.data._target_)
    accepted = set(inspect.signature(target).parameters)
    unknown = sorted(k for k in cfg.data if k != "_target_" and k not in accepted)
    if unknown:
        experiment = HydraConfig.get().runtime.choices.get("experiment")
        hint = f" (experiment={experiment} sets data keys for its own data set)" if experiment else ""
        raise ValueError(
            f"data={cfg.data.name} does not take {unknown}{hint}. Its keys: {sorted(accepted - {'self'})}."
        )
    data = instantiate(cfg.data)
    return data, *vocab_and_mask(data.tokenizer)


# --------------------------------------------------------------------------- checkpoints
def command_line_overrides() -> dict[str, str]:
    """``{key: value}`` of the ``key=value`` overrides on the command line (``+``/``++`` dropped)."""
    given: dict[str, str] = {}
    for override in HydraConfig.get().overrides.task:
        key, sep, value = override.partition("=")
        if sep and not key.startswith("~"):
            given[key.lstrip("+")] = value
    return given


def adopt_checkpoint_architecture(cfg: DictConfig, architecture: dict[str, Any], given: dict[str, str]) -> None:
    """Set the architecture keys the checkpoint records; ``model.length`` stays if given on the command line.

    Keys the checkpoint does not record (the released Hugging Face model has no parameterization
    or noise schedule) keep the command line's values.
    """
    length = cfg.model.length
    with open_dict(cfg):
        for key in ARCHITECTURE_KEYS:
            if key not in architecture:
                continue
            value = architecture[key]
            if key in given and not isinstance(value, dict) and given[key].lower() != str(value).lower():
                print(f"Note: {key}={given[key]} on the command line is ignored; the checkpoint's {key}={value} "
                      "is used.")
            cfg[key] = value
        if "model.length" in given:
            cfg.model.length = length


def load_for_eval(cfg: DictConfig, vocab_size: int, mask_index: int) -> Diffusion:
    """Build the model recorded in ``eval.checkpoint_path`` and load its (EMA) weights.

    Accepts our checkpoints, the original MDLM code's (mdlm.ckpt, ar.ckpt, sedd.ckpt) and the
    Hugging Face format (see :mod:`checkpoints`). The architecture comes from the checkpoint;
    ``model.length`` and whatever the checkpoint does not record from the command line.
    """
    if not cfg.eval.checkpoint_path:
        raise ValueError(f"mode={cfg.mode} needs eval.checkpoint_path=/path/to/checkpoints/last.ckpt.")
    loaded = load_checkpoint(cfg.eval.checkpoint_path, trust_remote_code=bool(cfg.eval.get("trust_remote_code")))
    given = command_line_overrides()
    backbone = HydraConfig.get().runtime.choices.get("backbone") if "backbone" in given else None
    check_compatible(loaded, cfg.parameterization, given.get("parameterization"), backbone)
    adopt_checkpoint_architecture(cfg, loaded.config, given)
    use_ema = loaded.ema is not None and not cfg.eval.disable_ema
    print(
        f"Loaded {loaded.format} checkpoint {loaded.source}: backbone {loaded.backbone_kind}, model={cfg.model.name}, "
        f"parameterization={cfg.parameterization}, time_conditioning={cfg.time_conditioning}, "
        f"length {cfg.model.length}{' (from the command line)' if 'model.length' in given else ''}, "
        f"{'EMA' if use_ema else 'raw'} weights."
    )
    if loaded.vocab_size is not None and loaded.vocab_size != vocab_size:
        raise ValueError(
            f"The checkpoint's vocabulary has {loaded.vocab_size} entries but data={cfg.data.name} gives {vocab_size}: "
            "evaluate with the data/tokenizer the model was trained on."
        )
    module = build_module(cfg, vocab_size, mask_index)
    samplers = module.algorithm.samplers
    if cfg.mode == "sample_eval" and cfg.parameterization != "ar" and cfg.sampling.predictor not in samplers:
        raise ValueError(
            f"the checkpoint is a parameterization={cfg.parameterization} model; sampling.predictor="
            f"{cfg.sampling.predictor} does not apply to it. Valid choices: {list(samplers)}."
        )
    names = [n for n, p in module.named_parameters() if p.requires_grad] if use_ema else None
    weights = {k.removeprefix("backbone."): v for k, v in loaded.weights(names).items()}
    try:
        module.backbone.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        message = f"The weights in {loaded.source} do not fit the model built from its config: {error}"
        raise ValueError(message) from error
    module.ema = None  # evaluation uses the loaded weights as they are (EMA or raw)
    return module


# --------------------------------------------------------------------------- reports
@rank_zero_only
def report_likelihood(results: dict[str, float], title: str) -> None:
    nll, err = results["nll"], results["nll_stderr"]
    print(f"\n{title}: {int(results['num_tokens']):,} tokens")
    print(f"  NLL bound  {nll:.4f} ± {err:.4f} nats/token   BPD {results['bpd']:.4f}   PPL {results['ppl']:.3f}")
    if "true_nll" in results:
        truth, gap, gap_err = results["true_nll"], results["gap"], results["gap_stderr"]
        print(f"  true NLL   {truth:.4f} nats/token            (exact -log p of the same tokens under the source)")
        print(f"  gap        {gap:.4f} ± {gap_err:.4f} nats/token   (bound - truth; >= 0 up to Monte-Carlo error)")
    print()


# --------------------------------------------------------------------------- modes
def train(cfg: DictConfig, run_dir: Path) -> None:
    data, vocab_size, mask_index = build_data(cfg)
    module = build_module(cfg, vocab_size, mask_index)
    if cfg.eval.compute_generative_perplexity:
        module.sample_evaluator = sample_evaluator(cfg, data, mask_index)
    trainer, train_plan, eval_plan = build_trainer(cfg, run_dir)
    print(
        f"Batch: {train_plan.per_device} per device x {train_plan.world_size} processes "
        f"x {train_plan.accumulate} accumulation = {train_plan.global_size} sequences of {cfg.model.length} tokens."
    )
    datamodule = make_datamodule(cfg, data, train_plan, eval_plan)
    ckpt_path = Path(cfg.checkpointing.resume_ckpt_path)
    resume = resume_checkpoint(ckpt_path, run_dir) if cfg.checkpointing.resume_from_ckpt else None
    if resume is not None:
        print(f"Resuming from {resume}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=None if resume is None else str(resume))
    trainer.validate(module, datamodule=datamodule, verbose=False)
    report_likelihood(module.last_val, "Final validation (EMA weights)")
    if not trainer.is_global_zero:
        return
    if cfg.sampling.num_sample_log > 0:
        records = generate_samples(cfg, module, data, mask_index, 1, cfg.sampling.num_sample_log)
        print_samples(records, cfg.sampling.num_sample_log)
    experiment = HydraConfig.get().runtime.choices.get("experiment")
    prefix = f"python main.py{f' experiment={experiment}' if experiment else ''}"
    print(f"\nRun directory: {run_dir} (checkpoints/, csv/version_*/metrics.csv, config_train.yaml)")
    print(f"Evaluate:  {prefix} mode=ppl_eval eval.checkpoint_path={ckpt_path}")
    print(f"Sample:    {prefix} mode=sample_eval eval.checkpoint_path={ckpt_path}")


def eval_data_config(cfg: DictConfig, name: str) -> DictConfig:
    """The config of data set ``name`` for zero-shot evaluation of the model in ``cfg``.

    The corpus is the validation corpus of ``configs/data/<name>.yaml``; tokenizer, block size,
    wrapping, EOS insertion and cache come from the model's own data config (``data=...``), so
    every data set is prepared exactly as the model's training data was. ``eval.data_paths.<name>``
    points to a local copy.
    """
    folder = Path(__file__).resolve().parent / "configs" / "data"
    choices = sorted(p.stem for p in folder.glob("*.yaml") if OmegaConf.load(p).get("_target_") == CORPUS_TARGET)
    if name not in choices:
        raise ValueError(f"eval.datasets: {name!r} is not a data set config; valid: {choices}")
    base = cfg.data
    if "tokenizer_name_or_path" not in base:
        raise ValueError(
            f"eval.datasets needs the model's tokenizer, but data={base.name} has its own built-in vocabulary. "
            "Pass the data config the model was trained with, e.g. data=openwebtext-split."
        )
    own = OmegaConf.load(folder / f"{name}.yaml")
    paths = cfg.eval.get("data_paths") or {}
    return OmegaConf.merge(own, {
        "name": name, "tokenizer_name_or_path": base.tokenizer_name_or_path, "block_size": cfg.model.length,
        "wrap": base.get("wrap", True), "insert_valid_eos": base.get("insert_valid_eos", True),
        "cache_dir": base.get("cache_dir"), "num_proc": base.get("num_proc"), "seed": cfg.seed,
        "streaming": False, "path": paths.get(name), "valid_path": None,
    })


@rank_zero_only
def report_table(results: dict[str, dict[str, float]], path: Path) -> None:
    """Print the per-data-set table and write it as CSV."""
    columns = ("num_tokens", "nll", "nll_stderr", "bpd", "ppl")
    print("| data set | tokens | NLL (nats/token) | ± | BPD | PPL |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {int(r['num_tokens']):,} | {r['nll']:.4f} | {r['nll_stderr']:.4f} | {r['bpd']:.4f} "
              f"| {r['ppl']:.2f} |")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["data", *columns])
        for name, r in results.items():
            writer.writerow([name, *(r[c] for c in columns)])


def ppl_eval(cfg: DictConfig, run_dir: Path) -> None:
    data, vocab_size, mask_index = build_data(cfg)
    module = load_for_eval(cfg, vocab_size, mask_index)
    trainer, train_plan, eval_plan = build_trainer(cfg, run_dir)
    names = list(cfg.eval.datasets) or [cfg.data.name]
    results: dict[str, dict[str, float]] = {}
    for name in names:
        dataset = instantiate(eval_data_config(cfg, name)) if cfg.eval.datasets else data
        trainer.validate(module, datamodule=make_datamodule(cfg, dataset, train_plan, eval_plan), verbose=False)
        results[name] = module.last_val
        report_likelihood(module.last_val, f"Perplexity of {cfg.eval.checkpoint_path} on {name}")
    if trainer.is_global_zero:
        if len(results) > 1:
            report_table(results, run_dir / "eval_results.csv")
        payload = {**results[names[0]], "data": names[0], "checkpoint": str(cfg.eval.checkpoint_path),
                   "mc_samples": cfg.eval.mc_samples, "datasets": results}
        utils.write_json(run_dir / "eval_results.json", payload)
        print(f"Wrote {run_dir / 'eval_results.json'}{' and eval_results.csv' if len(results) > 1 else ''}")


def sample_eval(cfg: DictConfig, run_dir: Path) -> None:
    data, vocab_size, mask_index = build_data(cfg)
    module = load_for_eval(cfg, vocab_size, mask_index)
    _, devices = utils.resolve_accelerator(cfg.trainer.accelerator, cfg.trainer.devices)
    world_size = devices * cfg.trainer.num_nodes
    eval_plan = utils.plan_batches(cfg.loader.eval_global_batch_size, world_size, cfg.loader.eval_batch_size)
    scorer = load_scorer(cfg) if cfg.eval.compute_generative_perplexity else None  # fail early, load once
    records = generate_samples(cfg, module, data, mask_index, cfg.sampling.num_sample_batches, eval_plan.per_device)
    summary = score_samples(records, data.tokenizer, scorer, cfg.eval.gen_ppl_truncate_at_eos)
    path = run_dir / "samples.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print_samples(records, len(records))
    s = cfg.sampling
    summary.update(checkpoint=str(cfg.eval.checkpoint_path), sampler=records[0]["sampler"], steps=s.steps,
                   nfe=records[0]["nfe"], length=records[0]["length"], float64=bool(s.float64), semi_ar=bool(s.semi_ar),
                   eval_model=cfg.eval.gen_ppl_eval_model if scorer else None)
    utils.write_json(run_dir / "sample_results.json", summary)
    if scorer is not None:
        print(f"--- generative perplexity ({cfg.eval.gen_ppl_eval_model}): {summary['gen_ppl']:.3f} over "
              f"{summary['num_tokens']:,} tokens; mean unigram entropy {summary['mean_entropy']:.3f} nats")
    print(f"Wrote {path} and {run_dir / 'sample_results.json'}")


MODES: dict[str, Callable[[DictConfig, Path], None]] = {
    "train": train,
    "ppl_eval": ppl_eval,
    "sample_eval": sample_eval,
}


def run(cfg: DictConfig) -> None:
    if cfg.mode not in MODES:
        raise ValueError(f"Unknown mode={cfg.mode!r}. Valid modes: {sorted(MODES)}.")
    validate_config(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(cfg.seed, workers=True)
    utils.print_config_tree(cfg, run_dir / f"config_{cfg.mode}.yaml")
    MODES[cfg.mode](cfg, run_dir)


@hydra.main(version_base=None, config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
