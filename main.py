"""Entry point: ``python main.py mode=train|ppl_eval|sample_eval [overrides]``.

Hydra composes ``configs/config.yaml``; this file builds data, model and trainer from it and
dispatches on ``mode`` through :data:`MODES`.
"""

from __future__ import annotations

import csv
import functools
import inspect
import json
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

import checkpoints
import config_aliases
import registry
import utils
from algorithms import Algorithm
from checkpoints import (
    LoadedCheckpoint,
    adopt_checkpoint,
    check_resumable,
    check_vocabulary,
    load_backbone_weights,
    load_checkpoint,
)
from dataloader import DataModule, block_special_ids, vocab_and_mask
from diffusion import Diffusion
from fault_tolerance import AtomicCheckpointIO, TrainingStopped, resume_checkpoint, under_slurm
from generation import (
    EntropyRejection,
    generate_samples,
    make_sampler,
    print_samples,
    reference_texts,
    sample_template,
    score_samples,
)
from metrics import GenerativePerplexity
from models.dit import set_attention_backend
from models.ema import ExponentialMovingAverage
from samplers import check_fits


# --------------------------------------------------------------------------- building blocks
def check_options_read(cfg: DictConfig, given: dict[str, str]) -> None:
    """An option given on the command line that the chosen algorithm does not read is an error.

    The options are the original's top-level names that ``configs/algorithm/*.yaml`` and
    ``configs/sampler/*.yaml`` read (``T: ${T}``, ``steps: ${sampling.steps}``, ...). An unread
    sampler option (``sampling.steps`` with the AR sampler) only gets a note: the original's
    scripts pass it to every model. Setting an option to its default in ``configs/config.yaml``
    is allowed (the original's command lines pass e.g. ``time_conditioning=false`` to every model).
    """
    algorithm, sampler = get_class(cfg.algorithm._target_), get_class(cfg.sampler._target_)
    own = registry.option_knobs("algorithm", registry.option_of_class("algorithm", algorithm))
    read = own | registry.option_knobs("sampler", registry.option_of_class("sampler", sampler))
    sampler_knobs = registry.option_knobs("sampler")
    # model.* (e.g. bd3lm's context_length: ${model.length}) is the model's setting, read by every run
    knobs = {k for k in registry.option_knobs("algorithm") | sampler_knobs if not k.startswith("model.")}
    unread = sorted(k for k in knobs if k in given and k not in read)
    defaults = OmegaConf.load(registry.CONFIGS / "config.yaml") if unread else None
    for knob in unread:
        if given[knob].lower() == str(OmegaConf.select(defaults, knob)).lower():
            continue
        if knob in sampler_knobs:
            print(f"Note: {knob}={given[knob]} is not read by sampler={sampler.name}; it has no effect.")
            continue
        raise ValueError(
            f"{knob}={given[knob]} is not an option of algorithm={algorithm.name}, so it would be ignored; remove it. "
            f"algorithm={algorithm.name} takes: {sorted(own) or 'none of them'}."
        )


def check_combination(cfg: DictConfig) -> None:
    """The backbone, algorithm and sampler fit together; otherwise an error naming the valid choices."""
    algorithm = get_class(cfg.algorithm._target_)
    backbone = get_class(cfg.backbone._target_)
    if algorithm.causal != bool(getattr(backbone, "causal", False)):
        needs = ("a causal backbone: backbone=ar (e.g. model=small-ar)" if algorithm.causal else
                 "a bidirectional backbone: backbone=dit, or backbone=dimamba with model=tiny-dimamba")
        raise ValueError(f"algorithm={algorithm.name} with backbone {backbone.__name__}: it needs {needs}.")
    if getattr(algorithm, "needs_block_attention", False) and not getattr(backbone, "block_attention", False):
        raise ValueError(f"algorithm={algorithm.name} needs a backbone that takes an attention mask and a KV cache: "
                         f"backbone=dit (got {backbone.__name__}).")
    check_fits(get_class(cfg.sampler._target_), algorithm,
               lambda: registry.samplers_accepting(algorithm.denoiser_kind))


def check_sampling(cfg: DictConfig) -> None:
    """``sampling.length`` and ``sampling.var_length`` fit the algorithm (checked before any work)."""
    sample_length(cfg)
    algorithm: type[Algorithm] = get_class(cfg.algorithm._target_)
    if cfg.sampling.var_length and not algorithm.var_length:
        raise ValueError(f"sampling.var_length=true applies to block diffusion (algorithm=bd3lm), which generates "
                         f"left to right; algorithm={algorithm.name} fills a fixed length: remove it.")
    if cfg.sampling.var_length and cfg.sampling.semi_ar:
        raise ValueError("sampling.var_length and sampling.semi_ar do not go together: choose one.")


def validate_config(cfg: DictConfig) -> None:
    """Reject invalid combinations before any data is loaded, naming the valid choices.

    In the evaluation modes the algorithm comes from the checkpoint, so :func:`adopt_for_eval`
    checks the options given on the command line after adopting it.
    """
    for key in (*config_aliases.RENAMED, *config_aliases.DROPPED):  # set in a config file, it would be ignored
        if OmegaConf.select(cfg, key) is not None:
            new = config_aliases.RENAMED.get(key)
            fix = (f"- override /{new}: NAME in its defaults list" if new and "." not in new else
                   f"{new} instead" if new else "nothing (remove it)")
            raise ValueError(f"{key} is set in a config file, but it moved: write {fix}. "
                             "(On the command line the original's names still work.)")
    if cfg.mode == "train":
        check_options_read(cfg, command_line_overrides())
        check_sampling(cfg)
    check_combination(cfg)


def build_module(cfg: DictConfig, vocab_size: int, mask_index: int, special_ids: tuple[int, ...] = ()) -> Diffusion:
    backbone = instantiate(cfg.backbone, vocab_size=vocab_size)
    set_attention_backend(backbone, cfg.attn_backend)
    if cfg.compile:  # in place: the state dict keeps its names (checkpoints do not change)
        backbone.compile(dynamic=True)
    algorithm = instantiate(cfg.algorithm)(mask_index=mask_index)
    sampler = make_sampler(cfg.sampler, algorithm, bool(cfg.sampling.float64))
    accelerator, _ = utils.resolve_accelerator(cfg.trainer.accelerator, 1)
    precision = utils.resolve_precision(cfg.trainer.precision, accelerator)
    optimizer = functools.partial(
        torch.optim.AdamW,
        lr=cfg.optim.lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        fused=utils.fused_adamw(cfg.optim.fused, precision, cfg.trainer.gradient_clip_val),
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
        sampler=sampler,
        special_ids=special_ids,
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


def check_memory(cfg: DictConfig, vocab_size: int, train_plan: utils.BatchPlan | None,
                 eval_plan: utils.BatchPlan) -> None:
    """On CPU, fail before allocating when a batch's logits alone would not fit in memory."""
    accelerator, _ = utils.resolve_accelerator(cfg.trainer.accelerator, cfg.trainer.devices)
    if accelerator != "cpu":
        return
    if train_plan is not None:
        utils.check_logits_memory(train_plan.per_device, cfg.model.length, vocab_size, "loader.batch_size", "train",
                                  hint=" per process (gradient accumulation keeps loader.global_batch_size)")
    utils.check_logits_memory(eval_plan.per_device, cfg.model.length, vocab_size, "loader.eval_batch_size", "eval")


def build_trainer(cfg: DictConfig, run_dir: Path) -> tuple[L.Trainer, utils.BatchPlan, utils.BatchPlan]:
    """The Lightning trainer plus the train and eval batch plans for this device count."""
    accelerator, devices = utils.resolve_accelerator(cfg.trainer.accelerator, cfg.trainer.devices)
    world_size = devices * cfg.trainer.num_nodes
    train_plan = utils.plan_batches(cfg.loader.global_batch_size, world_size, cfg.loader.batch_size)
    eval_plan = utils.plan_eval_batches(cfg.loader.eval_global_batch_size, world_size, cfg.loader.eval_batch_size)
    precision = utils.resolve_precision(cfg.trainer.precision, accelerator)
    deterministic = cfg.trainer.deterministic
    if deterministic == "auto":  # bit-identical CPU runs; on CUDA deterministic kernels cost speed (docs/clusters.md)
        deterministic = accelerator == "cpu"
    trainer = instantiate(
        cfg.trainer,
        accelerator=accelerator,
        devices=devices,
        precision=precision,
        deterministic=deterministic,
        accumulate_grad_batches=train_plan.accumulate,
        strategy=instantiate(cfg.strategy) if cfg.get("strategy") else "auto",
        callbacks=[instantiate(c) for c in cfg.callbacks.values()],
        # Under slurm the requeue signal is ours (fault_tolerance.PreemptionCheckpoint), not Lightning's.
        plugins=[AtomicCheckpointIO(), *([SLURMEnvironment(auto_requeue=False)] if under_slurm() else [])],
        logger=build_loggers(cfg, run_dir),
        default_root_dir=str(run_dir),
    )
    return trainer, train_plan, eval_plan


def make_datamodule(cfg: DictConfig, data: Any, train_plan: utils.BatchPlan, eval_plan: utils.BatchPlan) -> DataModule:
    """The data module; in ``ppl_eval`` its validation set is what ``eval.split`` names."""
    return DataModule(
        data,
        batch_size=train_plan.per_device,
        eval_batch_size=eval_plan.per_device,
        num_workers=cfg.loader.num_workers,
        pin_memory=cfg.loader.pin_memory,
        seed=cfg.seed,
        evaluate=cfg.mode == "ppl_eval",
        eval_split=cfg.eval.get("split"),
    )


def special_ids(data: Any) -> tuple[int, ...]:
    """The BOS / EOS ids of the data's blocks (left out of the content-only NLL)."""
    return tuple(sorted(set(block_special_ids(data.tokenizer))))


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


def choose_sampler(cfg: DictConfig, given: dict[str, str]) -> None:
    """After a checkpoint's algorithm was adopted: its default sampler, unless one was chosen.

    A sampler chosen on the command line is kept (and checked by :func:`check_combination`).
    ``sampler.<option>=`` overrides carry over to the default sampler (an option it lacks is an error).
    """
    algorithm = get_class(cfg.algorithm._target_)
    if "sampler" in given or get_class(cfg.sampler._target_).accepts == algorithm.denoiser_kind:
        return
    chosen, default = cfg.sampler, registry.load("sampler", algorithm.default_sampler)
    # sampler.<option>= given on the command line applies to the sampler that replaces the composed one.
    options = [key.removeprefix("sampler.") for key in given if key.startswith("sampler.")]
    unknown = [option for option in options if option not in default]
    if unknown:
        raise ValueError(
            f"sampler.{unknown[0]}={given['sampler.' + unknown[0]]} is not an option of sampler="
            f"{algorithm.default_sampler}, the sampler of the checkpoint's algorithm={algorithm.name}; its options: "
            f"{sorted(k for k in default if not k.startswith('_'))}.")
    for option in options:
        default[option] = chosen[option]
    with open_dict(cfg):
        cfg.sampler = default


def adopt_for_eval(cfg: DictConfig, loaded: LoadedCheckpoint | None = None) -> LoadedCheckpoint:
    """Read ``eval.checkpoint_path`` and set ``cfg``'s model, backbone, noise and algorithm to its.

    Accepts our checkpoints, the original MDLM code's (mdlm.ckpt, ar.ckpt, sedd.ckpt) and the
    Hugging Face format (see :mod:`checkpoints`). Architecture and every algorithm option come
    from the checkpoint (:func:`checkpoints.adopt_checkpoint`); evaluation options such as
    ``T``, and whatever the checkpoint does not record, from the command line. Runs before the
    data is built, so the data's blocks have the checkpoint's length.
    """
    if not cfg.eval.checkpoint_path:
        raise ValueError(f"mode={cfg.mode} needs eval.checkpoint_path=/path/to/checkpoints/last.ckpt.")
    if loaded is None:  # a caller that evaluates one checkpoint under several configs passes it in
        loaded = load_checkpoint(cfg.eval.checkpoint_path, trust_remote_code=bool(cfg.eval.get("trust_remote_code")))
    given = command_line_overrides()
    backbone = HydraConfig.get().runtime.choices.get("backbone") if "backbone" in given else None
    for note in adopt_checkpoint(cfg, loaded, given, backbone, allow_longer=bool(cfg.eval.allow_longer)):
        print(note)
    choose_sampler(cfg, given)
    check_options_read(cfg, given)
    check_combination(cfg)
    check_sampling(cfg)
    return loaded


def build_for_eval(cfg: DictConfig, loaded: LoadedCheckpoint, vocab_size: int, mask_index: int,
                   special_ids: tuple[int, ...] = ()) -> Diffusion:
    """The model of an adopted checkpoint (:func:`adopt_for_eval`) with its EMA (or raw) weights."""
    check_vocabulary(loaded, vocab_size, cfg.data.name)
    use_ema = loaded.ema is not None and not cfg.eval.disable_ema
    algorithm = OmegaConf.to_container(cfg.algorithm, resolve=True)
    options = ", ".join(f"{k}={v}" for k, v in algorithm.items() if not k.startswith("_") and k != "noise")
    given = command_line_overrides()
    print(
        f"Loaded {loaded.format} checkpoint {loaded.source}: backbone {loaded.backbone_kind}, model={cfg.model.name}, "
        f"algorithm={get_class(cfg.algorithm._target_).name} ({options}), "
        f"length {cfg.model.length}{' (from the command line)' if 'model.length' in given else ''}, "
        f"{'EMA' if use_ema else 'raw'} weights."
    )
    module = build_module(cfg, vocab_size, mask_index, special_ids)
    load_backbone_weights(module.backbone, loaded, use_ema)
    module.ema = None  # evaluation uses the loaded weights as they are (EMA or raw)
    return module


def load_for_eval(cfg: DictConfig, vocab_size: int, mask_index: int) -> Diffusion:
    """:func:`adopt_for_eval` then :func:`build_for_eval` (for data already built)."""
    return build_for_eval(cfg, adopt_for_eval(cfg), vocab_size, mask_index)


def generate_from_config(cfg: DictConfig, module: Diffusion, data: Any, num_batches: int,
                         batch_size: int, trace: bool = False) -> list[dict[str, Any]]:
    """``generation.generate_samples`` with the template, seed, semi-AR windows and device of ``cfg``
    (``trace``: with the unmasking trace, :mod:`denoising_trace`)."""
    accelerator, _ = utils.resolve_accelerator(cfg.trainer.accelerator, 1)
    module.to(accelerator)  # "cuda" or "cpu"
    s, sampler = cfg.sampling, module.sampler
    template = sample_template(data.tokenizer, sample_length(cfg), module.algorithm.mask_index,
                               sampler, prefix=s.prefix, infill=s.infill)
    semi_ar = (s.stride_length, s.num_strides) if s.semi_ar else None
    stop_token = block_special_ids(data.tokenizer)[1] if s.var_length else None
    rejection = None if s.min_entropy is None else EntropyRejection(float(s.min_entropy), int(s.entropy_window),
                                                                    int(s.max_retries))
    return generate_samples(module, sampler, template, data.tokenizer, num_batches, batch_size, cfg.seed,
                            semi_ar=semi_ar, source=data, stop_token=stop_token, rejection=rejection, trace=trace)


def sample_length(cfg: DictConfig) -> int:
    """Tokens to generate: ``sampling.length``, or ``model.length`` when null.

    Block diffusion generates any multiple of its block size, longer than the trained length
    too (its window slides); the other algorithms fill at most ``model.length`` positions
    (longer samples: ``sampling.semi_ar``).
    """
    algorithm: type[Algorithm] = get_class(cfg.algorithm._target_)
    length = cfg.sampling.length
    if length is None:
        return int(cfg.model.length)
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"sampling.length must be a positive integer or null (= model.length), got {length!r}")
    if algorithm.semi_ar and length > cfg.model.length:
        raise ValueError(
            f"sampling.length={length} is longer than model.length={cfg.model.length}, which algorithm="
            f"{algorithm.name} fills at once. For longer samples use semi-autoregressive windows "
            "(sampling.semi_ar=true sampling.stride_length=S sampling.num_strides=K), or block diffusion "
            "(algorithm=bd3lm), which generates any length."
        )
    block_size = cfg.algorithm.get("block_size")
    if block_size is not None and length % block_size:
        raise ValueError(f"sampling.length={length} must be a multiple of block_size={block_size}: "
                         f"e.g. {(length // block_size + 1) * block_size}")
    return length


# --------------------------------------------------------------------------- reports
@rank_zero_only
def report_likelihood(results: dict[str, float], title: str, exact: bool = False) -> None:
    """Print the NLL ("NLL" for an exact likelihood such as AR's, else "NLL bound") and its content-only part."""
    nll, err, name = results["nll"], results["nll_stderr"], "NLL" if exact else "NLL bound"
    print(f"\n{title}: {int(results['num_tokens']):,} tokens")
    print(f"  {name:<10} {nll:.4f} ± {err:.4f} nats/token   BPD {results['bpd']:.4f}   PPL {results['ppl']:.3f}")
    if "content_nll" in results and results["content_num_tokens"] != results["num_tokens"]:
        print(f"  content    {results['content_nll']:.4f} ± {results['content_nll_stderr']:.4f} nats/token   "
              f"PPL {results['content_ppl']:.3f}   ({int(results['content_num_tokens']):,} tokens: BOS / EOS left out)")
    if "true_nll" in results:
        truth, gap, gap_err = results["true_nll"], results["gap"], results["gap_stderr"]
        print(f"  true NLL   {truth:.4f} nats/token            (exact -log p of the same tokens under the source)")
        print(f"  gap        {gap:.4f} ± {gap_err:.4f} nats/token   (bound - truth; >= 0 up to Monte-Carlo error)")
    print()


# --------------------------------------------------------------------------- modes
def train(cfg: DictConfig, run_dir: Path) -> None:
    ckpt_path = Path(cfg.checkpointing.resume_ckpt_path)
    resume = resume_checkpoint(ckpt_path, run_dir) if cfg.checkpointing.resume_from_ckpt else None
    algorithm: type[Algorithm] = get_class(cfg.algorithm._target_)
    if algorithm.needs_pretrained and not cfg.training.from_pretrained and resume is None:
        raise ValueError(f"algorithm={algorithm.name} starts from a trained model, its teacher: add "
                         f"training.from_pretrained=/path/to/checkpoints/last.ckpt (e.g. a DUO run's). "
                         f"(No checkpoint to resume in {run_dir} either.)")
    data, vocab_size, mask_index = build_data(cfg)
    module = build_module(cfg, vocab_size, mask_index, special_ids(data))
    if cfg.training.from_pretrained and resume is None:  # a resumed run has its own weights
        init_from_pretrained(cfg, module, vocab_size)
    trainer, train_plan, eval_plan = build_trainer(cfg, run_dir)
    check_memory(cfg, vocab_size, train_plan, eval_plan)
    print(
        f"Batch: {train_plan.per_device} per device x {train_plan.world_size} processes "
        f"x {train_plan.accumulate} accumulation = {train_plan.global_size} sequences of {cfg.model.length} tokens."
    )
    datamodule = make_datamodule(cfg, data, train_plan, eval_plan)
    if resume is not None:
        check_resume(resume, module, run_dir)
        print(f"Resuming from {resume}")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=None if resume is None else str(resume))
    except TrainingStopped as stopped:
        # Preempted (SIGTERM) or about to hit the time limit (slurm's requeue signal): last.ckpt was
        # written (fault_tolerance.PreemptionCheckpoint). Exit as killed by that signal, so that a job
        # chain or scheduler does not take the run for finished.
        then = "The requeued job resumes" if stopped.signum != signal.SIGTERM else "Run the same command to resume"
        if trainer.is_global_zero:
            print(f"Training was stopped by {signal.Signals(stopped.signum).name} at step {stopped.step}; exiting "
                  f"with status {128 + stopped.signum}. {then} from {stopped.path}.")
        sys.exit(128 + stopped.signum)
    except SIGTERMException:  # Lightning's handler, before ours took over (setup): nothing trained yet
        print(f"Training was stopped by SIGTERM before it started; exiting with status {128 + signal.SIGTERM}.")
        sys.exit(128 + signal.SIGTERM)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    report_likelihood(module.last_val, "Final validation (EMA weights)", module.algorithm.exact_likelihood)
    if not trainer.is_global_zero:
        return
    if cfg.sampling.num_sample_log > 0:
        records = generate_from_config(cfg, module, data, 1, cfg.sampling.num_sample_log)
        print_samples(records, cfg.sampling.num_sample_log)
    experiment = HydraConfig.get().runtime.choices.get("experiment")
    prefix = f"python main.py{f' experiment={experiment}' if experiment else ''}"
    print(f"\nRun directory: {run_dir} (checkpoints/, csv/version_*/metrics.csv, config_train.yaml)")
    print(f"Evaluate:  {prefix} mode=ppl_eval eval.checkpoint_path={ckpt_path}")
    print(f"Sample:    {prefix} mode=sample_eval eval.checkpoint_path={ckpt_path}")


def init_from_pretrained(cfg: DictConfig, module: Diffusion, vocab_size: int) -> None:
    """``training.from_pretrained``: start from a checkpoint's weights (its EMA where it has one).

    Any format :func:`checkpoints.load_checkpoint` reads (ours, the original's, a Hugging Face
    directory or hub repo), e.g. an MDLM checkpoint to fine-tune as BD3-LM, as the paper does.
    The architecture must be the one configured (the same model sizes and backbone); the
    algorithm, noise schedule and length may differ. The optimizer, step count and EMA start
    afresh (the EMA from the loaded weights).
    """
    source = str(cfg.training.from_pretrained)
    loaded = load_checkpoint(source, trust_remote_code=bool(cfg.eval.get("trust_remote_code")))
    kind = checkpoints.backbone_kind(cfg.backbone._target_)
    if loaded.backbone_kind != kind or loaded.causal != module.algorithm.causal:
        raise ValueError(f"training.from_pretrained={source} holds {loaded.backbone_kind} weights "
                         f"({'causal' if loaded.causal else 'bidirectional'}), which algorithm="
                         f"{module.algorithm.name} with a {kind} backbone cannot start from.")
    check_vocabulary(loaded, vocab_size, cfg.data.name)
    try:
        load_backbone_weights(module.backbone, loaded, use_ema=loaded.ema is not None)
    except ValueError as error:
        raise ValueError(f"training.from_pretrained={source}: {error} Give the model sizes it was trained with "
                         f"(its config: {loaded.config.get('model')}).") from error
    if module.ema is not None:
        module.ema = ExponentialMovingAverage(module.trainable_parameters(), module.ema.decay)
    print(f"Starting from the {'EMA' if loaded.ema is not None else ''} weights of {loaded.format} checkpoint "
          f"{source} (training.from_pretrained); optimizer, steps and EMA start afresh.")


def check_resume(path: Path, module: Diffusion, run_dir: Path) -> None:
    """Refuse to resume from an unreadable or incompatible checkpoint, with the ways out."""
    ema = [p.shape for p in module.trainable_parameters()] if module.ema is not None else None
    try:
        check_resumable(path, module.state_dict(), ema)
    except ValueError as error:
        best = path.parent / "best.ckpt"
        valid_best = best.is_file() and best != path
        if valid_best:
            try:
                check_resumable(best, module.state_dict(), ema)
            except ValueError:
                valid_best = False
        ways = [f"move it away (mv {path} {path}.bad) to start over in this run directory",
                "run with checkpointing.resume_from_ckpt=false to start over (it will be overwritten)",
                "choose a new run directory with hydra.run.dir=..."]
        if valid_best:
            ways.append(f"resume from {best} (readable and compatible): checkpointing.resume_ckpt_path={best}")
        raise ValueError(
            f"The run directory {run_dir} holds a checkpoint that training cannot resume from: {error}\nWays out:\n  - "
            + "\n  - ".join(ways)
        ) from None


def eval_data_config(cfg: DictConfig, name: str) -> DictConfig:
    """The config of data set ``name`` for zero-shot evaluation of the model in ``cfg``.

    The corpus is the validation corpus of ``configs/data/<name>.yaml``; tokenizer, block size,
    wrapping, EOS insertion and cache come from the model's own data config (``data=...``), so
    every data set is prepared exactly as the model's training data was. ``eval.data_paths.<name>``
    points to a local copy.
    """
    choices = registry.corpus_names()
    if name not in choices:
        raise ValueError(f"eval.datasets: {name!r} is not a data set config; valid: {choices}")
    paths = cfg.eval.get("data_paths") or {}
    unknown = sorted(set(paths) - set(choices))
    if unknown:
        raise ValueError(f"eval.data_paths: {unknown} are not data set configs; valid: {choices}")
    base = cfg.data
    if "tokenizer_name_or_path" not in base:
        raise ValueError(
            f"eval.datasets needs the model's tokenizer, but data={base.name} has its own built-in vocabulary. "
            "Pass the data config the model was trained with, e.g. data=openwebtext-split."
        )
    own = registry.load("data", name)
    return OmegaConf.merge(own, {
        "name": name, "tokenizer_name_or_path": base.tokenizer_name_or_path, "block_size": cfg.model.length,
        "wrap": base.get("wrap", True), "insert_valid_eos": base.get("insert_valid_eos", True),
        "cache_dir": base.get("cache_dir"), "num_proc": base.get("num_proc"), "seed": cfg.seed,
        "streaming": False, "path": paths.get(name), "valid_path": None,
    })


@rank_zero_only
def report_table(results: dict[str, dict[str, float]], path: Path, quiet: bool = False) -> None:
    """Print the per-data-set table (unless ``quiet``) and write it as CSV."""
    columns = ("num_tokens", "nll", "nll_stderr", "bpd", "ppl", "content_num_tokens", "content_nll", "content_ppl")
    if not quiet:
        print("| data set | tokens | NLL (nats/token) | ± | BPD | PPL | content NLL | content PPL |\n"
              "|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if not quiet:
            print(f"| {name} | {int(r['num_tokens']):,} | {r['nll']:.4f} | {r['nll_stderr']:.4f} | {r['bpd']:.4f} "
                  f"| {r['ppl']:.2f} | {r['content_nll']:.4f} | {r['content_ppl']:.2f} |")
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["data", *columns])
        for name, r in results.items():
            writer.writerow([name, *(r[c] for c in columns)])


def ppl_eval(cfg: DictConfig, run_dir: Path) -> None:
    """The NLL bound on the run's data, or on each of ``eval.datasets``.

    Results are written after each data set. A data set that fails (e.g. a missing local copy)
    is recorded under ``failed`` in ``eval_results.json``, the others are still evaluated, and
    the run then exits with status 1.
    """
    loaded = adopt_for_eval(cfg)
    data, vocab_size, mask_index = build_data(cfg)
    module = build_for_eval(cfg, loaded, vocab_size, mask_index, special_ids(data))
    trainer, train_plan, eval_plan = build_trainer(cfg, run_dir)
    check_memory(cfg, vocab_size, None, eval_plan)
    names = list(cfg.eval.datasets) or [cfg.data.name]
    configs = {name: eval_data_config(cfg, name) for name in cfg.eval.datasets}  # unknown names fail up front
    results: dict[str, dict[str, float]] = {}
    failed: dict[str, str] = {}
    start = time.perf_counter()
    for index, name in enumerate(names):
        if len(names) > 1 and trainer.is_global_zero:  # which data set, and the time left, between their outputs
            print(utils.progress_line(index, len(names), time.perf_counter() - start, f"ppl_eval ({name} next)",
                                      unit="data set"))
        try:
            dataset = instantiate(configs[name]) if cfg.eval.datasets else data
            trainer.validate(module, datamodule=make_datamodule(cfg, dataset, train_plan, eval_plan), verbose=False)
        except Exception as error:  # noqa: BLE001 - recorded, reported, and the run exits non-zero
            if not cfg.eval.datasets:
                raise
            failed[name] = f"{type(error).__name__}: {error}"
            print(f"\nppl_eval on {name} failed: {failed[name]}\n")
        else:
            results[name] = module.last_val
            report_likelihood(module.last_val, f"Perplexity of {cfg.eval.checkpoint_path} on {name}",
                              module.algorithm.exact_likelihood)
        write_eval_results(trainer, run_dir, cfg, names, results, failed)
    if len(names) > 1 and trainer.is_global_zero:
        print(utils.progress_line(len(names), len(names), time.perf_counter() - start, "ppl_eval", unit="data set"))
    if failed:
        print(f"ppl_eval failed on {sorted(failed)}; the results of {sorted(results) or 'no data set'} are in "
              f"{run_dir / 'eval_results.json'}.")
        sys.exit(1)


def write_eval_results(trainer: L.Trainer, run_dir: Path, cfg: DictConfig, names: list[str],
                       results: dict[str, dict[str, float]], failed: dict[str, str]) -> None:
    """``eval_results.json`` (and with several data sets ``eval_results.csv``) as they stand."""
    if not trainer.is_global_zero:
        return
    if len(names) > 1:
        report_table(results, run_dir / "eval_results.csv", quiet=len(results) + len(failed) < len(names))
    first = results.get(names[0], {})
    payload = {**first, "data": names[0], "checkpoint": str(cfg.eval.checkpoint_path),
               "mc_samples": cfg.eval.mc_samples, "datasets": results, "failed": failed,
               "pending": [n for n in names if n not in results and n not in failed]}
    utils.write_json(run_dir / "eval_results.json", payload)
    if not payload["pending"]:
        print(f"Wrote {run_dir / 'eval_results.json'}{' and eval_results.csv' if len(names) > 1 else ''}")


def sample_eval(cfg: DictConfig, run_dir: Path) -> None:
    loaded = adopt_for_eval(cfg)
    data, vocab_size, mask_index = build_data(cfg)
    module = build_for_eval(cfg, loaded, vocab_size, mask_index)
    accelerator, devices = utils.resolve_accelerator(cfg.trainer.accelerator, cfg.trainer.devices)
    world_size = devices * cfg.trainer.num_nodes
    eval_plan = utils.plan_eval_batches(cfg.loader.eval_global_batch_size, world_size, cfg.loader.eval_batch_size)
    check_memory(cfg, vocab_size, None, eval_plan)
    scorer, reference = None, None
    truncate = cfg.eval.gen_ppl_truncate_at_eos
    if cfg.eval.compute_mauve:  # before sampling: a too-small evaluation split fails before the work
        reference = reference_texts(data, cfg.sampling.num_sample_batches * eval_plan.per_device, truncate)
    if cfg.eval.compute_generative_perplexity or cfg.eval.compute_mauve:  # fail early, load once
        scorer = GenerativePerplexity(cfg.eval.gen_ppl_eval_model, device="cuda" if accelerator == "cuda" else "cpu",
                                      batch_size=cfg.eval.gen_ppl_batch_size)
    records = generate_from_config(cfg, module, data, cfg.sampling.num_sample_batches, eval_plan.per_device,
                                   trace=bool(cfg.sampling.trace))
    summary = score_samples(records, data.tokenizer, scorer, truncate, reference, seed=cfg.seed)
    path = run_dir / "samples.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    print_samples(records, len(records))
    s = cfg.sampling
    summary.update(checkpoint=str(cfg.eval.checkpoint_path), sampler=records[0]["sampler"], steps=records[0]["steps"],
                   nfe=records[0]["nfe"], length=records[0]["length"], float64=bool(s.float64), semi_ar=bool(s.semi_ar),
                   eval_model=cfg.eval.gen_ppl_eval_model if scorer else None)
    if s.var_length:
        summary.update(length=max(r["length"] for r in records),
                       mean_length=sum(r["length"] for r in records) / len(records))
    if s.min_entropy is not None:
        summary.update(min_entropy=float(s.min_entropy), entropy_window=int(s.entropy_window),
                       redrawn=sum(r["retries"] > 0 for r in records),
                       low_entropy=sum(r["low_entropy"] for r in records))
    utils.write_json(run_dir / "sample_results.json", summary)
    if scorer is not None:
        print(f"--- generative perplexity ({cfg.eval.gen_ppl_eval_model}): {summary['gen_ppl']:.3f} over "
              f"{summary['num_tokens']:,} tokens; mean unigram entropy {summary['mean_entropy']:.3f} nats")
    if reference is not None:
        print(f"--- MAUVE against {len(reference)} held-out texts ({cfg.eval.gen_ppl_eval_model} features): "
              f"{summary['mauve']:.4f}")
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
    accelerator, devices = utils.resolve_accelerator(cfg.trainer.accelerator, cfg.trainer.devices)
    print(utils.configure_cpu_threads(processes=devices if accelerator == "cpu" else 1))
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(cfg.seed, workers=True)
    utils.print_config_tree(cfg, run_dir / f"config_{cfg.mode}.yaml")
    MODES[cfg.mode](cfg, run_dir)


@hydra.main(version_base=None, config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.argv[1:] = config_aliases.translate(sys.argv[1:])  # the original's override names (config_aliases.py)
    main()
