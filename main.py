"""Entry point: ``python main.py mode=train|ppl_eval|sample_eval [overrides]``.

Hydra composes ``configs/config.yaml``; this file builds data, model and trainer from it and
dispatches on ``mode`` through :data:`MODES`.
"""

from __future__ import annotations

import functools
import json
import math
import time
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
from dataloader import DataModule, block_special_ids, decode, vocab_and_mask
from diffusion import Diffusion
from samplers import ARSampler, Sampler, build_sampler

# Config keys that define the network; for evaluation they come from the checkpoint. (T is
# not one: a continuous-time model can be evaluated with any discrete T.)
ARCHITECTURE_KEYS = ("model", "backbone", "noise", "parameterization", "time_conditioning", "subs_masking")


# --------------------------------------------------------------------------- building blocks
def check_supported(cfg: DictConfig) -> None:
    """Reject options whose implementation has not landed yet, instead of ignoring them."""
    pending = {
        "sampling.semi_ar": (cfg.sampling.semi_ar, "semi-autoregressive sampling is not implemented yet"),
        "eval.compute_generative_perplexity": (
            cfg.eval.compute_generative_perplexity,
            "generative perplexity is not implemented yet",
        ),
    }
    for key, (active, reason) in pending.items():
        if active:
            raise ValueError(f"{key}={OmegaConf.select(cfg, key)}: {reason}. Remove the override.")


def validate_config(cfg: DictConfig) -> None:
    """Reject invalid combinations before any data is loaded, naming the valid choices."""
    check_supported(cfg)
    backbone = HydraConfig.get().runtime.choices.get("backbone")
    if (cfg.parameterization == "ar") != (backbone == "ar"):
        raise ValueError(
            f"parameterization={cfg.parameterization} with backbone={backbone}: the AR baseline needs "
            "backbone=ar parameterization=ar (e.g. model=small-ar); diffusion parameterizations need a "
            "bidirectional backbone (backbone=dit)."
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
    data = instantiate(cfg.data)
    return data, *vocab_and_mask(data.tokenizer)


# --------------------------------------------------------------------------- checkpoints
def load_for_eval(cfg: DictConfig, vocab_size: int, mask_index: int) -> Diffusion:
    """Build the model recorded in ``eval.checkpoint_path`` and load its (EMA) weights."""
    path = Path(cfg.eval.checkpoint_path)
    if not cfg.eval.checkpoint_path:
        raise ValueError(f"mode={cfg.mode} needs eval.checkpoint_path=/path/to/checkpoints/last.ckpt.")
    if not path.is_file():
        raise FileNotFoundError(f"eval.checkpoint_path={path} does not exist (relative paths start at {Path.cwd()}).")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    saved = checkpoint.get("config")
    if saved is not None:
        length = cfg.model.length
        length_given = any(o.startswith("model.length=") for o in HydraConfig.get().overrides.task)
        with open_dict(cfg):
            for key in ARCHITECTURE_KEYS:
                if key in saved:
                    cfg[key] = saved[key]
            if length_given:
                cfg.model.length = length
        print(
            f"Architecture from the checkpoint: model={cfg.model.name}, parameterization={cfg.parameterization}, "
            f"length {cfg.model.length}{' (from the command line)' if length_given else ''}."
        )
    ckpt_vocab = checkpoint["state_dict"]["backbone.vocab_embed.embedding"].shape[0]
    if ckpt_vocab != vocab_size:
        raise ValueError(
            f"The checkpoint's vocabulary has {ckpt_vocab} entries but data={cfg.data.name} gives {vocab_size}: "
            "evaluate with the data/tokenizer the model was trained on."
        )
    module = build_module(cfg, vocab_size, mask_index)
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)
    if not cfg.eval.disable_ema:
        module.use_ema_weights_permanently()
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


def make_sampler(cfg: DictConfig, module: Diffusion, mask_index: int) -> Sampler | ARSampler:
    """The sampler for this parameterization: ``sampling.predictor``, or the AR sampler for ``ar``."""
    s = cfg.sampling
    if cfg.parameterization == "ar":
        return ARSampler(mask_index, temperature=s.temperature, top_p=s.top_p, use_cache=s.kv_cache)
    options: dict[str, Any] = {"time_conditioning": cfg.time_conditioning} if s.predictor == "ddpm_cache" else {}
    noise = module.algorithm.noise
    return build_sampler(s.predictor, noise=noise, mask_index=mask_index, steps=s.steps, eps=s.eps,
                         noise_removal=s.noise_removal, **options)


def generate_samples(
    cfg: DictConfig, module: Diffusion, data: Any, mask_index: int, num_batches: int, batch_size: int
) -> list[dict[str, Any]]:
    """Sample ``num_batches`` batches; one record per sample (text, sampler, steps, nfe, seconds, seed)."""
    accelerator, _ = utils.resolve_accelerator(cfg.trainer.accelerator, 1)
    device = torch.device("cuda" if accelerator == "cuda" else "cpu")
    module.to(device)
    sampler = make_sampler(cfg, module, mask_index)
    prefix_id = block_special_ids(data.tokenizer)[0]  # BOS, the AR sampler's given first token
    records = []
    for batch_index in range(num_batches):
        seed = cfg.seed * 1_000_003 + batch_index
        generator = torch.Generator(device).manual_seed(seed)
        x = torch.full((batch_size, cfg.model.length), mask_index, dtype=torch.long, device=device)
        if isinstance(sampler, ARSampler):
            x[:, 0] = prefix_id
        start = time.perf_counter()
        out = module.generate(sampler, x, generator=generator, progress=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        texts = decode(data.tokenizer, out.tokens.cpu(), mask_index)
        true_nll = data.true_nll_of(out.tokens.cpu()) if getattr(data, "has_true_nll", False) else None
        for i, text in enumerate(texts):
            record = {
                "text": text,
                "sampler": cfg.sampling.predictor,
                "steps": cfg.sampling.steps,
                "nfe": out.nfe,
                "seconds": seconds / batch_size,
                "seed": seed,
                "index_in_batch": i,
            }
            if true_nll is not None:
                record["true_nll_per_token"] = float(true_nll[i]) / cfg.model.length
            records.append(record)
    return records


def print_samples(records: list[dict[str, Any]], limit: int) -> None:
    for r in records[:limit]:
        where = f"seed {r['seed']}, #{r['index_in_batch']}"
        print(f"--- sample ({where}, {r['sampler']}, {r['steps']} steps, NFE {r['nfe']})")
        print(r["text"])
    if records:
        seconds = sum(r["seconds"] for r in records) / len(records)
        print(f"--- {len(records)} samples, {seconds:.3f} s/sample, NFE {records[0]['nfe']}")
        scored = [r["true_nll_per_token"] for r in records if "true_nll_per_token" in r]
        possible = [v for v in scored if math.isfinite(v)]
        if scored:
            mean = f"{sum(possible) / len(possible):.4f} nats/token" if possible else "n/a"
            print(
                f"--- {len(possible)}/{len(scored)} samples are possible under the source (the rest contain a word "
                f"pair or a BOS/EOS placement it never produces); their true NLL: {mean}"
            )


# --------------------------------------------------------------------------- modes
def train(cfg: DictConfig, run_dir: Path) -> None:
    data, vocab_size, mask_index = build_data(cfg)
    module = build_module(cfg, vocab_size, mask_index)
    trainer, train_plan, eval_plan = build_trainer(cfg, run_dir)
    print(
        f"Batch: {train_plan.per_device} per device x {train_plan.world_size} processes "
        f"x {train_plan.accumulate} accumulation = {train_plan.global_size} sequences of {cfg.model.length} tokens."
    )
    datamodule = make_datamodule(cfg, data, train_plan, eval_plan)
    ckpt_path = Path(cfg.checkpointing.resume_ckpt_path)
    resume = cfg.checkpointing.resume_from_ckpt and ckpt_path.is_file()
    if resume:
        print(f"Resuming from {ckpt_path}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if resume else None)
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


def ppl_eval(cfg: DictConfig, run_dir: Path) -> None:
    data, vocab_size, mask_index = build_data(cfg)
    module = load_for_eval(cfg, vocab_size, mask_index)
    trainer, train_plan, eval_plan = build_trainer(cfg, run_dir)
    trainer.validate(module, datamodule=make_datamodule(cfg, data, train_plan, eval_plan), verbose=False)
    results = module.last_val
    report_likelihood(results, f"Perplexity evaluation of {cfg.eval.checkpoint_path} on {cfg.data.name}")
    if trainer.is_global_zero:
        payload = {**results, "checkpoint": str(cfg.eval.checkpoint_path), "data": cfg.data.name}
        utils.write_json(run_dir / "eval_results.json", payload)
        print(f"Wrote {run_dir / 'eval_results.json'}")


def sample_eval(cfg: DictConfig, run_dir: Path) -> None:
    data, vocab_size, mask_index = build_data(cfg)
    module = load_for_eval(cfg, vocab_size, mask_index)
    _, devices = utils.resolve_accelerator(cfg.trainer.accelerator, cfg.trainer.devices)
    world_size = devices * cfg.trainer.num_nodes
    eval_plan = utils.plan_batches(cfg.loader.eval_global_batch_size, world_size, cfg.loader.eval_batch_size)
    records = generate_samples(cfg, module, data, mask_index, cfg.sampling.num_sample_batches, eval_plan.per_device)
    path = run_dir / "samples.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print_samples(records, len(records))
    print(f"Wrote {path}")


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
