"""The Python API: load a checkpoint, sample, score, save and push, from a notebook.

    from pipeline import Pipeline

    pipe = Pipeline.from_pretrained("outputs/quickstart/checkpoints/best.ckpt")
    samples = pipe.generate(2, sampler="first_hitting", seed=0)   # [Sample(text, tokens, nfe, seconds, seed)]
    scores = pipe.score(["the cat saw a dog ."], mc_samples=8)     # [Score(nll, stderr, num_tokens, exact)]

A :class:`Pipeline` is what ``python main.py mode=sample_eval eval.checkpoint_path=...`` builds,
built by the same functions: Hydra composes ``configs/`` with the given overrides, then
:func:`main.adopt_for_eval`, :func:`main.build_data` and :func:`main.build_for_eval`. Generation
is :func:`main.generate_from_config` (:func:`generation.sample_template` and
:func:`generation.generate_samples`, as ``sample_eval``); scoring is :meth:`algorithms.Algorithm.loss`
with :func:`algorithms.item_draws`, as ``ppl_eval``. Anything without a keyword argument is a Hydra
override, e.g. ``overrides=["data=openwebtext-split", "sampling.semi_ar=true"]``.

Scoring. A text is tokenized as the data pipeline does (no special tokens) and laid out as the
training blocks are, ``[BOS] t_1 .. t_n [EOS]``. A text longer than a block (``n > L - 2``) is
scored in consecutive blocks of ``L - 2`` tokens, each ``[BOS] chunk [EOS]`` (as
:func:`dataloader.wrap_documents` cuts documents); the last block is padded, and padding is
neither attended to nor scored. The score is the NLL bound per scored token (BOS and EOS
included, as ``ppl_eval`` counts them), in nats:

    S_k = sum_blocks sum_i loss_i^(k),   nll = mean_k S_k / num_tokens,   stderr = std_k(S_k) / sqrt(K) / num_tokens

over K = ``mc_samples`` draws of times and masks (:func:`algorithms.item_draws`, seeded by the
seed and the block's position in the call). An exact likelihood (AR) needs one pass: stderr 0.

Saving. :meth:`Pipeline.save_pretrained` writes our Hugging Face format
(:func:`checkpoints.export_hf`: ``config.json`` + ``model.safetensors``, the weights the pipeline
uses), the tokenizer's files and ``pipeline.json`` (the overrides it was built with), so that
``Pipeline.from_pretrained(dir)`` rebuilds the same pipeline, offline. Only DiT models (MDLM,
SEDD, D3PM, BD3-LM) have that format; an AR pipeline cannot be saved this way.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi, constants, snapshot_download
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import DictConfig, open_dict
from torch import Tensor
from tqdm import tqdm

import config_aliases
import hub
import main
import registry
from algorithms import item_draws
from checkpoints import HUB_REPO_ID, LoadedCheckpoint, export_hf
from dataloader import block_special_ids
from diffusion import Diffusion
from generation import make_sampler

PIPELINE_FILE = "pipeline.json"  # save_pretrained's record of the overrides the pipeline was built with
# What from_pretrained fetches of a hub repo besides the weights: the pipeline record and the tokenizer.
PIPELINE_FILES = [PIPELINE_FILE, "tokenizer*", "special_tokens_map.json", "vocab*", "merges.txt"]
# A mask uniform that no masking probability exceeds (q_xt masks where u < m_t <= 1): never masked.
NEVER_MASKED = 2.0


@dataclass(frozen=True)
class Sample:
    """One generated sample: its text, token ids, network calls, seconds (its share of the batch) and seed."""

    text: str
    tokens: list[int]
    nfe: int
    seconds: float
    seed: int


@dataclass(frozen=True)
class Score:
    """A text's NLL bound per token in nats (the exact NLL where ``exact``), its standard error over the
    Monte-Carlo draws (0 when exact, NaN with one draw) and the number of scored tokens."""

    nll: float
    stderr: float
    num_tokens: int
    exact: bool

    @property
    def nll_sum(self) -> float:
        """The bound on ``-log p(text)`` in nats (per-token NLL times tokens)."""
        return self.nll * self.num_tokens


@dataclass(frozen=True)
class Blocks:
    """Token blocks to score: ``x0`` (N, L) long, ``attention_mask`` (N, L) (0 = padding), ``scored`` (N, L)
    bool (the positions whose loss counts) and ``maskable`` (N, L) bool or None (which positions the
    forward process may mask; None = all)."""

    x0: Tensor
    attention_mask: Tensor
    scored: Tensor
    maskable: Tensor | None = None


@contextlib.contextmanager
def _hydra_config(cfg: DictConfig) -> Iterator[None]:
    """``HydraConfig`` set to ``cfg`` for the block (main's functions read the overrides from it), then restored."""
    instance = HydraConfig.instance()
    previous = instance.cfg
    instance.set_config(cfg)
    try:
        yield
    finally:
        instance.cfg = previous


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """``configs/config.yaml`` composed with ``overrides`` (the original's names accepted), hydra node included."""
    with initialize_config_dir(config_dir=str(registry.CONFIGS), version_base=None):
        return compose("config", overrides=config_aliases.translate(["mode=sample_eval", *overrides]),
                       return_hydra_config=True)


def _pipeline_folder(source: str) -> Path | None:
    """Where ``pipeline.json`` and the tokenizer of a saved pipeline would be: the directory itself, or
    for a hub repo id its snapshot of :data:`PIPELINE_FILES` (None when it cannot be had)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists() or not HUB_REPO_ID.fullmatch(source):
        return None
    try:
        return Path(snapshot_download(source, allow_patterns=PIPELINE_FILES, local_files_only=hub.hub_local_only()))
    except Exception:  # noqa: BLE001 - no record: load_checkpoint then says why the repo cannot be read
        return None


class Pipeline:
    """A checkpoint ready to sample and score: the model, its config and its data's tokenizer.

    Build it with :meth:`from_pretrained`. Attributes: ``cfg`` (the adopted config, as
    ``sample_eval`` has it), ``module`` (:class:`diffusion.Diffusion` with the EMA or raw weights),
    ``data`` (the data config's object; ``tokenizer`` is its tokenizer), ``loaded`` (the checkpoint),
    ``overrides`` and ``device``.
    """

    def __init__(self, cfg: DictConfig, module: Diffusion, data: Any, loaded: LoadedCheckpoint,
                 overrides: list[str], device: torch.device) -> None:
        self.cfg, self.module, self.data, self.loaded = cfg, module, data, loaded
        self.tokenizer = data.tokenizer
        self.overrides = list(overrides)
        self.device = device
        self.module.to(device).eval()

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path, device: str | torch.device | None = None,
                        use_ema: bool = True, overrides: Sequence[str] = ()) -> Pipeline:
        """Load our ``.ckpt``, the original MDLM's ``.ckpt``, a Hugging Face directory or hub repo id.

        Args:
            path_or_hub_id: anything ``eval.checkpoint_path`` accepts (:func:`checkpoints.load_checkpoint`).
            device: where the model runs; None = CUDA when available, else CPU.
            use_ema: the EMA weights where the checkpoint has them (else ``eval.disable_ema=true``).
            overrides: Hydra overrides, as on ``main.py``'s command line, e.g. ``["data=openwebtext-split",
                "sampler=first_hitting"]``. The data config (default ``synthetic``) gives the tokenizer.
                A directory written by :meth:`save_pretrained` adds the overrides it was built with
                (these come after them) and reads the tokenizer it holds.
        """
        source = str(path_or_hub_id)
        folder = _pipeline_folder(source)
        record_file = None if folder is None else folder / PIPELINE_FILE
        record = json.loads(record_file.read_text()) if record_file is not None and record_file.is_file() else {}
        given = [*record.get("overrides", []), *overrides, *([] if use_ema else ["eval.disable_ema=true"])]
        cfg = compose_config(given)
        with _hydra_config(cfg):
            with open_dict(cfg):
                del cfg["hydra"]  # as in `python main.py`: the task config without the hydra node
                cfg.eval.checkpoint_path = source  # set here, not as an override: any characters allowed
                if record and "tokenizer_name_or_path" in cfg.data and not _names(given, "data.tokenizer_name_or_path"):
                    cfg.data.tokenizer_name_or_path = str(folder)  # the saved tokenizer files
            main.validate_config(cfg)
            loaded = main.adopt_for_eval(cfg)
            data, vocab_size, mask_index = main.build_data(cfg)
            module = main.build_for_eval(cfg, loaded, vocab_size, mask_index, main.special_ids(data))
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return cls(cfg, module, data, loaded, list(given), device)

    def to(self, device: str | torch.device) -> Pipeline:
        """Move the model to ``device``; returns the pipeline."""
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def __repr__(self) -> str:
        algorithm = self.module.algorithm.name
        return (f"Pipeline({self.cfg.eval.checkpoint_path!r}, algorithm={algorithm}, model={self.cfg.model.name}, "
                f"length={self.cfg.model.length}, sampler={self.sampler_name(self.cfg)}, device={self.device})")

    @staticmethod
    def sampler_name(cfg: DictConfig) -> str:
        """The ``configs/sampler/`` name of ``cfg.sampler``."""
        return registry.option_of_class("sampler", get_class(cfg.sampler._target_))

    # ----------------------------------------------------------------- generation
    def generate(self, n: int, steps: int | None = None, sampler: str | None = None, prefix: str | None = None,
                 infill: str | None = None, seed: int | None = None, batch_size: int | None = None,
                 **sampler_options: Any) -> list[Sample]:
        """``n`` samples, as ``sample_eval`` draws them (:func:`main.generate_from_config`).

        Args:
            n: number of samples.
            steps: ``sampling.steps`` (samplers that read it); None = the config's.
            sampler: a ``configs/sampler/`` name; None = the pipeline's (the checkpoint's default).
            prefix, infill: ``sampling.prefix`` / ``sampling.infill`` (:func:`generation.sample_template`).
            seed: batch ``b`` is drawn with seed ``seed * 1_000_003 + b``; None = the config's ``seed``.
            batch_size: samples per batch (one network call serves a batch); None = ``n``.
            **sampler_options: the sampler's own options, e.g. ``temperature=0.9`` or ``top_p=0.9``.
        """
        if n < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError(f"n and batch_size must be >= 1, got n={n}, batch_size={batch_size}")
        cfg = self.sampling_config(steps, sampler, prefix, infill, seed, sampler_options)
        chosen = make_sampler(cfg.sampler, self.module.algorithm, bool(cfg.sampling.float64))
        batch_size = batch_size or n
        kept = self.module.sampler
        self.module.sampler = chosen  # generate_from_config samples with the module's sampler
        try:
            with self._on_device():
                records = main.generate_from_config(cfg, self.module, self.data, math.ceil(n / batch_size), batch_size)
        finally:
            self.module.sampler = kept
        return [Sample(r["text"], r["tokens"], r["nfe"], r["seconds"], r["seed"]) for r in records[:n]]

    def sampling_config(self, steps: int | None, sampler: str | None, prefix: str | None, infill: str | None,
                        seed: int | None, options: dict[str, Any]) -> DictConfig:
        """A copy of ``cfg`` with the sampler, its options, the template and the seed of one :meth:`generate` call."""
        cfg = copy.deepcopy(self.cfg)
        with open_dict(cfg):
            if sampler is not None:
                cfg.sampler = registry.load("sampler", sampler)  # unknown names: an error listing the valid ones
            name = self.sampler_name(cfg)
            settable = sorted(k for k in cfg.sampler if not k.startswith("_"))
            if steps is not None:
                if "steps" not in cfg.sampler:
                    raise ValueError(f"steps={steps}: sampler={name} takes no number of steps (its options: "
                                     f"{settable}); leave steps out.")
                cfg.sampling.steps = int(steps)
            for key, value in options.items():
                if key not in settable:
                    raise ValueError(f"{key}={value!r} is not an option of sampler={name}; its options: {settable}.")
                cfg.sampler[key] = value
            cfg.sampling.prefix, cfg.sampling.infill = prefix, infill
            cfg.seed = cfg.seed if seed is None else int(seed)
            cfg.trainer.accelerator = self.device.type  # generate_from_config moves the module there
        return cfg

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """Make ``"cuda"`` mean this pipeline's GPU (generate_from_config moves the module to ``"cuda"``)."""
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            yield

    # ----------------------------------------------------------------- scoring
    def score(self, texts: str | Sequence[str], mc_samples: int = 8, batch_size: int = 8,
              seed: int | None = None, progress: bool = False) -> list[Score]:
        """Each text's NLL bound per token (nats) with its standard error over ``mc_samples`` draws.

        The text is laid out as the training blocks (see the module docstring: BOS / EOS wrapping,
        longer texts in consecutive blocks); the loss is ``ppl_eval``'s. ``seed``: of the draws
        (None = the config's ``seed``, as ``ppl_eval``); ``progress``: a progress bar over the batches.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return []
        blocks, owners = self.text_blocks(texts)
        nll, counts = self.bound(blocks, mc_samples, batch_size, seed, progress=progress)  # (N, K), (N,)
        exact = self.module.algorithm.exact_likelihood
        scores = []
        for i in range(len(texts)):
            mine = owners == i
            totals, tokens = nll[mine].sum(0), int(counts[mine].sum())                   # (K,)
            stderr = 0.0 if exact else math.nan  # one draw of a bound: no estimate of its spread
            if not exact and totals.numel() > 1:
                stderr = float(totals.std() / math.sqrt(totals.numel())) / tokens
            scores.append(Score(float(totals.mean()) / tokens, stderr, tokens, exact))
        return scores

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the data pipeline tokenizes documents (no special tokens)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if self.module.algorithm.mask_index in ids:
            raise ValueError(f"{text[:60]!r} tokenizes to the mask id {self.module.algorithm.mask_index}, which "
                             "the model never sees as a clean token; remove it from the text.")
        return ids

    def text_blocks(self, texts: Sequence[str]) -> tuple[Blocks, Tensor]:
        """The blocks ``[BOS] chunk [EOS] [PAD]..`` of the texts (chunks of ``L - 2`` tokens) and, for each
        block, the index of its text (N,)."""
        length = int(self.cfg.model.length)
        bos, eos = block_special_ids(self.tokenizer)
        pad = getattr(self.data, "pad_id", eos)  # hidden from attention and not scored: any id
        rows, masks, owners = [], [], []
        for i, text in enumerate(texts):
            ids = self.encode(text)
            for start in range(0, max(len(ids), 1), length - 2):
                row = [bos, *ids[start:start + length - 2], eos]
                rows.append(row + [pad] * (length - len(row)))
                masks.append([1] * len(row) + [0] * (length - len(row)))
                owners.append(i)
        attention = torch.tensor(masks, dtype=torch.long)                                  # (N, L)
        return Blocks(torch.tensor(rows, dtype=torch.long), attention, attention.bool()), torch.tensor(owners)

    @torch.no_grad()
    def bound(self, blocks: Blocks, mc_samples: int = 8, batch_size: int = 8, seed: int | None = None,
              indices: Tensor | None = None, progress: bool = False) -> tuple[Tensor, Tensor]:
        """The loss of ``ppl_eval`` summed over each block's scored positions, per draw.

        For draw ``k`` of ``K`` and block ``g`` (``indices[n]``, default its position in ``blocks``, as
        ``ppl_eval`` uses the data-set index), the times and masks are :func:`algorithms.item_draws`
        ``(g, seed, k, K)``: a block's draws do not depend on the batch. Positions that are not
        ``maskable`` get a mask uniform of :data:`NEVER_MASKED`, so they stay clean (the context of a
        conditional bound). The loss's positions are the last ``L'`` of the block (``L' = L - 1`` for
        next-token models). Returns ``(nll (N, K) float64, scored tokens (N,))``; K = 1 for an exact
        likelihood.
        """
        if mc_samples < 1 or batch_size < 1:
            raise ValueError(f"mc_samples and batch_size must be >= 1, got {mc_samples} and {batch_size}")
        module, seed = self.module.eval(), self.cfg.seed if seed is None else seed
        draws_per_block = 1 if module.algorithm.exact_likelihood else mc_samples
        num_blocks, length = blocks.x0.shape
        indices = torch.arange(num_blocks) if indices is None else indices
        totals, counts = [], []
        for start in tqdm(range(0, num_blocks, batch_size), desc="scoring", disable=not progress):
            part = slice(start, start + batch_size)
            x0, attention = blocks.x0[part].to(self.device), blocks.attention_mask[part].to(self.device)
            scored, index = blocks.scored[part].to(self.device), indices[part].to(self.device)
            per_draw = []
            for k in range(draws_per_block):
                draws = item_draws(index, length, seed, k, draws_per_block)
                if blocks.maskable is not None:
                    draws.mask = torch.where(blocks.maskable[part].to(self.device), draws.mask, NEVER_MASKED)
                with self._autocast():
                    out = module.algorithm.loss(module.backbone, x0, attention, draws=draws)
                weight = scored[:, length - out.nll.shape[1]:]                              # (B, L')
                per_draw.append((out.nll.double() * weight).sum(-1))                       # (B,)
            totals.append(torch.stack(per_draw, 1).cpu())                                  # (B, K)
            counts.append((out.mask.bool() & weight).sum(-1).cpu())
        return torch.cat(totals), torch.cat(counts)

    def _autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA (as evaluation runs there), none on CPU."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------- saving
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (:func:`checkpoints.export_hf`, the weights this
        pipeline uses), the tokenizer's files and ``pipeline.json``; returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        weights = {f"backbone.{k}": v.detach().cpu() for k, v in self.module.backbone.state_dict().items()}
        current = LoadedCheckpoint(weights, None, self.loaded.config, self.loaded.format, self.loaded.source)
        export_hf(current, directory, use_ema=False)
        self.tokenizer.save_pretrained(str(directory))
        record = {"overrides": [o for o in self.overrides if not _is_key(o, "eval.disable_ema")],
                  "source": str(self.cfg.eval.checkpoint_path), "algorithm": self.module.algorithm.name}
        (directory / PIPELINE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        return directory

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False,
                    save_dir: str | Path | None = None, endpoint: str | None = None) -> str:
        """Upload :meth:`save_pretrained`'s folder to hub repo ``repo_id`` (created if needed); returns the
        commit URL.

        ``save_dir``: where the folder is written (kept); None = a temporary folder. ``endpoint``: the
        hub (None = ``HF_ENDPOINT`` / huggingface.co). Offline (``HF_HUB_OFFLINE``) or with the hub
        unreachable it fails at once with a ``ConnectionError`` that says how to save locally.
        """
        endpoint = endpoint or constants.ENDPOINT
        with tempfile.TemporaryDirectory() as scratch:
            folder = self.save_pretrained(save_dir if save_dir is not None else Path(scratch) / "pipeline")
            if hub.hub_offline() or not hub.hub_reachable(endpoint):
                reason = hub.hub_failure_reason(True, "")
                where = (f"The folder to push is in {folder}; upload it later with `hf upload {repo_id} {folder}`."
                         if save_dir is not None else
                         f"Save it locally with pipe.save_pretrained(DIR) and upload DIR later with "
                         f"`hf upload {repo_id} DIR`.")
                raise ConnectionError(f"Cannot push to {repo_id} at {endpoint}: {reason}. {where}")
            api = HfApi(endpoint=endpoint, token=token)
            api.create_repo(repo_id, private=private, exist_ok=True)
            commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                       commit_message=f"Upload {self.module.algorithm.name} pipeline")
        return str(commit.commit_url) if hasattr(commit, "commit_url") else str(commit)


def _is_key(override: str, key: str) -> bool:
    return override.partition("=")[0].lstrip("+~") == key


def _names(overrides: Sequence[str], key: str) -> bool:
    """Whether ``overrides`` set ``key``."""
    return any(_is_key(o, key) for o in overrides)

