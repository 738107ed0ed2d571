"""The LightningModule: wires backbone, algorithm, EMA, optimizer and metrics.

The math lives in ``algorithms.py`` (losses), ``noise_schedule.py`` and ``samplers.py``;
this module only orchestrates training, validation and sampling.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn

from algorithms import Algorithm, Draws, LossOutput, item_draws
from metrics import NLLMetric
from models.ema import ExponentialMovingAverage, clean_name, gather_shards, scatter_full
from samplers import SampleOutput, Sampler, semi_ar_sample


def step_seed(seed: int, rank: int, epoch: int, batch_idx: int) -> int:
    """A 63-bit seed that is a pure function of the training batch's coordinates."""
    return int(np.random.SeedSequence([seed, rank, epoch, batch_idx]).generate_state(2, np.uint64)[0] >> np.uint64(1))


OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]


class Diffusion(L.LightningModule):
    """Trains and evaluates a masked diffusion LM.

    Args:
        backbone: ``(tokens (B, L), sigma (B,)) -> logits (B, L, V)``.
        algorithm: the parameterization and its loss (:mod:`algorithms`).
        optimizer: builds the optimizer from the trainable parameters.
        lr_scheduler: builds a per-step LR scheduler from the optimizer, or None.
        ema_decay: EMA decay (0 disables EMA). EMA weights are used for validation and
            sampling and saved in checkpoints under ``ema``.
        run_config: the resolved run config, saved in checkpoints under ``config``.
        seed: the global random state is re-seeded before every training batch from
            ``(seed, rank, epoch, batch index)`` (:func:`step_seed`), so the noise and dropout of
            a batch do not depend on what ran before it: a run resumed from a checkpoint draws
            exactly the random numbers of the uninterrupted run.
        mc_samples: time / mask draws per validation sequence (the NLL is their mean).
        sampler: the run's sampler (``configs/sampler/``), used for samples during training
            (:class:`callbacks.GenerativePerplexityCallback`) and after it.
        special_ids: the BOS / EOS ids, left out of the content-only NLL (``content_nll``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        algorithm: Algorithm,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        ema_decay: float = 0.9999,
        run_config: dict[str, Any] | None = None,
        seed: int = 0,
        mc_samples: int = 1,
        sampler: Sampler | None = None,
        special_ids: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.algorithm = algorithm
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.run_config = run_config
        self.seed = seed
        if mc_samples < 1:
            raise ValueError(f"eval.mc_samples must be >= 1; got {mc_samples}")
        self.mc_samples = mc_samples
        self.sampler = sampler
        self.ema = ExponentialMovingAverage(self.trainable_parameters(), ema_decay) if ema_decay > 0 else None
        self._ema_active = False  # the EMA weights are swapped in (ema_weights)
        # The outermost FSDP module when the EMA holds FSDP shards (shard_ema, from on_fit_start under strategy=fsdp).
        self._fsdp_root: nn.Module | None = None
        self._trainable_names = [n for n, p in self.named_parameters() if p.requires_grad]
        self.val_metric = NLLMetric()
        # The same NLL on content tokens only: without the BOS / EOS positions (special_ids), which
        # the paper's accounting includes for diffusion models (see docs/evaluation.md).
        self.special_ids = tuple(special_ids)
        self.content_metric = NLLMetric()
        self.last_val: dict[str, float] = {}

    # ----------------------------------------------------------------- parameters, EMA
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Swap the EMA weights in for the duration of the block.

        Re-entrant: inside an active swap (validation holds one from its start to its end, and
        callbacks such as :class:`callbacks.GenerativePerplexityCallback` sample inside it) it
        does nothing, so the raw weights stored by the outer swap are never overwritten.
        """
        if self.ema is None or self._ema_active:
            yield
            return
        self.ema.store(self.trainable_parameters())
        self.ema.copy_to(self.trainable_parameters())
        self._ema_active = True
        try:
            yield
        finally:
            self._ema_active = False
            self.ema.restore(self.trainable_parameters())

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.trainable_parameters())

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The EMA as full tensors (gathered from the shards under FSDP), and the training weights in
        the state dict even while the EMA weights are swapped in (a save during validation)."""
        if self.ema is not None:
            shadow, raw = self.ema.shadow_params, self.ema.collected_params
            if self._fsdp_root is not None:  # collective: every rank saves (only rank 0 writes)
                root, params = self._fsdp_parameters()
                shadow = gather_shards(root, params, shadow)
                raw = gather_shards(root, params, raw) if self._ema_active else []
            checkpoint["ema"] = {**self.ema.state_dict(), "shadow_params": shadow, "collected_params": []}
            if self._ema_active:
                self._put_back_training_weights(checkpoint["state_dict"], raw)
        if self.run_config is not None:
            checkpoint["config"] = self.run_config

    def _put_back_training_weights(self, state: dict[str, Tensor], raw: list[Tensor]) -> None:
        """The state dict was taken with the EMA weights in the parameters' places; ``raw`` are the
        training weights (full tensors, in ``trainable_parameters`` order) that the swap kept aside."""
        if not state:
            return  # a rank that writes nothing (FSDP gathers to rank 0)
        by_param = dict(zip(map(id, self.trainable_parameters()), raw, strict=True))
        for name, param in self.named_parameters(remove_duplicate=False):  # tied weights under every name
            if id(param) in by_param:
                key = clean_name(name)
                if key not in state:
                    raise RuntimeError(f"Saving during an EMA swap: parameter {key} is not in the state dict "
                                       f"(keys like {list(state)[:3]}); cannot put the training weights back.")
                state[key] = by_param[id(param)].to(state[key].device)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None and "ema" in checkpoint:
            state = checkpoint["ema"]
            if self._fsdp_root is not None:  # full tensors in the checkpoint -> this rank's shards
                if len(state["shadow_params"]) != len(self.ema.shadow_params):
                    self.ema.load_state_dict(state)  # the error that says which checkpoint does not fit
                root, params = self._fsdp_parameters()
                state = {**state, "shadow_params": scatter_full(root, params, state["shadow_params"]),
                         "collected_params": []}
            self.ema.load_state_dict(state)

    # ----------------------------------------------------------------- FSDP
    def _fsdp_parameters(self) -> tuple[nn.Module, dict[str, nn.Parameter]]:
        """The outermost FSDP module and the trainable parameters by their full-state-dict names, in
        the order of ``trainable_parameters`` (and of the EMA's tensors)."""
        params = {clean_name(n): p for n, p in self.named_parameters() if p.requires_grad}
        if list(params) != self._trainable_names:
            raise RuntimeError("FSDP changed the order of the parameters; the EMA tensors would not line up "
                               f"with them (first names now {list(params)[:3]}, before {self._trainable_names[:3]}).")
        return self._fsdp_root, params

    def shard_ema(self, root: nn.Module) -> None:
        """Under FSDP (``root``: the outermost FSDP module around this one, ``use_orig_params=True``):
        from now on the EMA holds this rank's shards of the averages, like the parameters, and its
        checkpoint entry is gathered to and scattered from full tensors. Called by ``on_fit_start``."""
        if self.ema is None or self._fsdp_root is not None:
            return
        self.__dict__["_fsdp_root"] = root  # a reference, not a submodule (root contains this module)
        _, params = self._fsdp_parameters()
        self.ema.shadow_params = scatter_full(root, params, self.ema.shadow_params)

    # ----------------------------------------------------------------- training
    def _loss(self, batch: dict[str, Any], draws: Draws | None = None) -> LossOutput:
        # batch["padded"]: whether the batch has padding, decided on the CPU by the data module
        # (checking the mask on the GPU would synchronise with it every step); None = unknown.
        return self.algorithm.loss(
            self.backbone, batch["input_ids"], batch["attention_mask"], batch.get("padded"), draws=draws
        )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(step_seed(self.seed, self.global_rank, self.current_epoch, batch_idx))
        for key, value in self.algorithm.on_train_batch_start(self.global_step).items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=False)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self._loss(batch)
        loss = out.nll.sum() / out.mask.sum()
        # Logged lazily: Lightning reads the value only every `log_every_n_steps`.
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_fit_start(self) -> None:
        # Before a checkpoint is restored (FSDP restores after setup and on_fit_start).
        if isinstance(self.trainer.strategy, FSDPStrategy):
            self.shard_ema(self.trainer.strategy.model)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by the global gradient norm; under FSDP through the root module's ``clip_grad_norm_``.

        With sharded gradients, ``torch.nn.utils.clip_grad_norm_`` would use each process's
        local norm; FSDP's own method reduces the norm over all shards first.
        """
        if not gradient_clip_val:
            return
        if isinstance(self.trainer.strategy, FSDPStrategy):
            if gradient_clip_algorithm not in (None, "norm"):
                raise ValueError(f"strategy=fsdp clips by norm only; got {gradient_clip_algorithm=}")
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ----------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._ema_context = self.ema_weights()
        self._ema_context.__enter__()

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Per-sequence NLL averaged over ``mc_samples`` time / mask draws.

        With the data-set ``index`` of each sequence in the batch (validation loaders of
        :class:`dataloader.DataModule`), the draws are :func:`algorithms.item_draws`: the result
        does not depend on the batch size or on the number of processes.
        """
        nll_sum, content_sum = 0.0, 0.0
        for sample in range(self.mc_samples):
            draws = None
            if "index" in batch:
                draws = item_draws(batch["index"], batch["input_ids"].shape[1], self.seed, sample, self.mc_samples)
            out = self._loss(batch, draws)
            if sample == 0:  # the scored positions and their tokens are the same for every draw
                content = self._content_mask(out)                                      # (B, L')
            nll_sum = nll_sum + out.nll.sum(-1, dtype=torch.float64)
            content_sum = content_sum + (out.nll * content).sum(-1, dtype=torch.float64)
        self.val_metric.update(nll_sum / self.mc_samples, out.mask.sum(-1), batch.get("true_nll"))
        self.content_metric.update(content_sum / self.mc_samples, content.sum(-1))
        if self._fitting():
            self.algorithm.on_validation_batch(self.backbone, batch, batch_idx, self.all_gather)

    def _fitting(self) -> bool:
        """Validation inside ``trainer.fit`` after the sanity check (not ppl_eval, not the final validate)."""
        trainer = self._trainer
        return trainer is not None and trainer.state.fn == "fit" and not trainer.sanity_checking

    def _content_mask(self, out: LossOutput) -> Tensor:
        """(B, L') the scored positions whose token is not BOS / EOS."""
        if not self.special_ids:
            return out.mask
        special = torch.tensor(self.special_ids, device=out.tokens.device)
        return out.mask * ~torch.isin(out.tokens, special)

    def on_validation_epoch_end(self) -> None:
        results = {k: float(v) for k, v in self.val_metric.compute().items()}
        content = self.content_metric.compute()
        results.update({f"content_{k}": float(content[k]) for k in ("nll", "nll_stderr", "num_tokens", "ppl")})
        self.val_metric.reset()
        self.content_metric.reset()
        self._ema_context.__exit__(None, None, None)
        self.last_val = results
        for key in ("nll", "bpd", "ppl", "true_nll", "gap"):
            if key in results:
                self.log(f"val/{key}", results[key], prog_bar=key in ("nll", "true_nll"))
        if self._fitting():
            for key, value in self.algorithm.on_validation_end().items():
                self.log(f"val/{key}", value)

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(
        self,
        sampler: Sampler,
        x: Tensor,
        generator: torch.Generator | None = None,
        progress: bool = False,
        semi_ar: tuple[int, int] | None = None,
        stop_token: int | None = None,
    ) -> SampleOutput:
        """Fill the masked positions of ``x`` (B, L) with the EMA weights in eval mode.

        The sampler gets the algorithm's denoiser (for AR, the causal backbone with its KV
        cache). ``semi_ar = (stride_length, num_strides)``:
        semi-autoregressive continuation (:func:`samplers.semi_ar_sample`), output
        ``(B, L + num_strides * stride_length)``. ``stop_token``: variable length, for algorithms
        that generate left to right by blocks (``algorithm.var_length``); see their ``sample``.
        """
        if stop_token is not None and not self.algorithm.var_length:
            raise ValueError(f"sampling.var_length applies to block diffusion (algorithm=bd3lm), which generates "
                             f"left to right; algorithm={self.algorithm.name} fills a fixed length: set "
                             "sampling.var_length=false")
        was_training = self.training
        self.eval()
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if x.is_cuda else contextlib.nullcontext()
        try:
            with self.ema_weights(), autocast:
                if semi_ar is not None:
                    if not self.algorithm.semi_ar:
                        raise ValueError(f"sampling.semi_ar does not apply to algorithm={self.algorithm.name}: it "
                                         "generates block by block, any length (set the template's length)")
                    denoiser = self.algorithm.denoiser(self.backbone)
                    return semi_ar_sample(sampler, denoiser, x, *semi_ar, generator=generator, progress=progress)
                extra = {} if stop_token is None else {"stop_token": stop_token}
                return self.algorithm.sample(sampler, self.backbone, x, generator=generator, progress=progress,
                                             **extra)
        finally:
            self.train(was_training)
