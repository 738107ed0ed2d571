"""Lightning callbacks of this project that are not in Lightning itself (``configs/callbacks/``)."""

from __future__ import annotations

from typing import Any

import lightning as L

from generation import generate_samples, sample_template, score_samples
from metrics import GenerativePerplexity


class GenerativePerplexityCallback(L.Callback):
    """After each validation, ``num_samples`` samples scored by an eval LM: ``val/gen_ppl``, ``val/entropy``.

    The samples come from the module's own sampler (``Diffusion.sampler``, the run's
    ``sampler`` config) with the EMA weights, unconditionally, on global rank 0; they are
    scored by :class:`metrics.GenerativePerplexity` (the eval LM is loaded once, at the start
    of fitting, so a wrong name fails before training). The sanity-check validation is skipped.

    Args:
        enabled: off by default (``eval.compute_generative_perplexity``); when off it does nothing.
        eval_model: hub name or local directory of a causal LM (``eval.gen_ppl_eval_model``).
        batch_size: eval LM batch size.
        num_samples: samples per validation.
        truncate_at_eos: score only the text before a sample's first EOS.
        length: sample length (``model.length``).
        seed: samples of the n-th validation use seed ``seed + n``.
    """

    def __init__(
        self,
        enabled: bool = False,
        eval_model: str = "gpt2-large",
        batch_size: int = 8,
        num_samples: int = 4,
        truncate_at_eos: bool = True,
        length: int = 1024,
        seed: int = 1,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"eval.gen_ppl_num_samples must be >= 1, got {num_samples}.")
        self.enabled = enabled
        self.eval_model = eval_model
        self.batch_size = batch_size
        self.num_samples = num_samples
        self.truncate_at_eos = truncate_at_eos
        self.length = length
        self.seed = seed
        self.scorer: GenerativePerplexity | None = None
        self.calls = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.enabled and stage == "fit" and self.scorer is None and trainer.is_global_zero:
            device = trainer.strategy.root_device
            self.scorer = GenerativePerplexity(self.eval_model, device=str(device), batch_size=self.batch_size)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.scorer is None or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if pl_module.sampler is None:
            raise ValueError("eval.compute_generative_perplexity needs a sampler on the module (Diffusion.sampler).")
        data = trainer.datamodule.data
        sampler = pl_module.sampler
        template = sample_template(data.tokenizer, self.length, pl_module.algorithm.mask_index, sampler)
        records = generate_samples(pl_module, sampler, template, data.tokenizer, 1, self.num_samples,
                                   self.seed + self.calls)
        self.calls += 1
        summary = score_samples(records, data.tokenizer, self.scorer, self.truncate_at_eos)
        pl_module.log("val/gen_ppl", summary["gen_ppl"], rank_zero_only=True)
        pl_module.log("val/entropy", summary["mean_entropy"], rank_zero_only=True)
