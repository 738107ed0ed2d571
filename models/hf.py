"""The Hugging Face formats of MDLM (``kuleshov-group/mdlm-owt``) and BD3-LM, backed by our own DiT.

:class:`MDLMConfig` has the released ``config.json`` fields (model_type ``"mdlm"``) and
:class:`MDLMForMaskedLM` wraps :class:`models.dit.DiT` under the attribute ``backbone``, so its
state-dict names are the released ones (``backbone.vocab_embed.embedding``,
``backbone.blocks.N.attn_qkv.weight``, ...): a released ``model.safetensors`` loads into it
without remote code, and ``save_pretrained`` writes a directory that the released remote code
reads as well.

Importing this module registers both classes with ``AutoConfig`` and ``AutoModelForMaskedLM``
(and does nothing else), so after ``import models.hf``::

    model = AutoModelForMaskedLM.from_pretrained("path/to/exported_dir")
    logits = model(input_ids).logits  # (B, L, vocab_size)

:class:`BD3LMConfig` reads the ``config.json`` of the released BD3-LM
(``kuleshov-group/bd3lm-owt-block_size{4,8,16}``, model_type ``"bd3lm"``), whose weights carry
the same ``backbone.*`` names; :mod:`checkpoints` maps them into our DiT, which block diffusion
runs on ``x_t ⊕ x_0`` (:func:`block_diffusion.two_stream_logits`). It is not registered with
``AutoConfig``: there is no ``transformers`` model class for it here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from models.dit import DiT, Rotary

MODEL_TYPE = "mdlm"
BD3LM_MODEL_TYPE = "bd3lm"


class MDLMConfig(PretrainedConfig):
    """Configuration of the released MDLM (defaults: the OWT model ``kuleshov-group/mdlm-owt``).

    Args:
        vocab_size: token ids, the mask token included (GPT-2's 50257 + [MASK]).
        model_length: sequence length the model was trained on.
        hidden_dim: model width D.
        cond_dim: width of the noise-level embedding.
        n_blocks: transformer blocks.
        n_heads: attention heads.
        dropout: dropout of the residual branches (training only).
        time_conditioning: if False the network is fed sigma = 0 whatever ``timesteps`` says.
        parameterization: not in the released config; our exports record the training
            parameterization (``subs``, ``sedd``, ``d3pm``) so that evaluation picks it up.
        noise: not in the released config; our exports record the noise schedule config.
        subs_masking: not in the released config; our exports record it (D3PM only).
        algorithm: not in the released config; our exports record every option of the
            algorithm (the ``algorithm`` config node with ``_target_``), e.g. MDLM's change of
            variables, so that evaluation restores what training used. For a checkpoint with
            the original's flat keys it holds those MDLMConfig has no field for (``T``, ``training``).
    """

    model_type = MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 50258,
        model_length: int = 1024,
        hidden_dim: int = 768,
        cond_dim: int = 128,
        n_blocks: int = 12,
        n_heads: int = 12,
        dropout: float = 0.1,
        time_conditioning: bool = False,
        parameterization: str | None = None,
        noise: dict[str, Any] | None = None,
        subs_masking: bool | None = None,
        algorithm: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.model_length = model_length
        self.hidden_dim = hidden_dim
        self.cond_dim = cond_dim
        self.n_blocks = n_blocks
        self.n_heads = n_heads
        self.dropout = dropout
        self.time_conditioning = time_conditioning
        self.parameterization = parameterization
        self.algorithm = algorithm
        self.noise = noise
        self.subs_masking = subs_masking


class BD3LMConfig(PretrainedConfig):
    """Configuration of the released BD3-LM (defaults: ``kuleshov-group/bd3lm-owt-block_size4``'s file).

    Args:
        block_size: tokens per block L'; None when the file does not say (loading refuses it).
        vocab_size, model_length, hidden_dim, cond_dim, n_blocks, n_heads, dropout: as in
            :class:`MDLMConfig`.
        cross_attn: the network reads ``x_t ⊕ x_0`` under the block diffusion mask.
        adaln: the blocks and the output layer have adaLN modulation (fed sigma = 0 without
            time conditioning).
        attn_backend: the attention kernel used in training (``"sdpa"`` or ``"flex"``); the
            same attention either way.
        causal: causal attention in place of the block diffusion mask.
        time_conditioning: if False the network is fed sigma = 0.
        var_min: the weights hold the buffers ``sampling_eps_min`` / ``sampling_eps_max``, the
            clipped interval of training times that training's variance search chose.
        sampling_eps_min, sampling_eps_max: the interval the buffers started from.
    """

    model_type = BD3LM_MODEL_TYPE

    def __init__(
        self,
        block_size: int | None = None,
        vocab_size: int = 50258,
        model_length: int = 1024,
        cross_attn: bool = True,
        adaln: bool = True,
        attn_backend: str = "sdpa",
        causal: bool = False,
        hidden_dim: int = 768,
        cond_dim: int = 128,
        n_blocks: int = 12,
        n_heads: int = 12,
        dropout: float = 0.1,
        time_conditioning: bool = False,
        var_min: bool = True,
        sampling_eps_min: float = 1e-3,
        sampling_eps_max: float = 0.999,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.model_length = model_length
        self.cross_attn = cross_attn
        self.adaln = adaln
        self.attn_backend = attn_backend
        self.causal = causal
        self.hidden_dim = hidden_dim
        self.cond_dim = cond_dim
        self.n_blocks = n_blocks
        self.n_heads = n_heads
        self.dropout = dropout
        self.time_conditioning = time_conditioning
        self.var_min = var_min
        self.sampling_eps_min = sampling_eps_min
        self.sampling_eps_max = sampling_eps_max


class MDLMForMaskedLM(PreTrainedModel):
    """The released MDLM as a ``transformers`` model: ``input_ids (B, L), timesteps (B,) -> logits (B, L, V)``.

    ``backbone`` is our :class:`models.dit.DiT`; the logits are the DiT's raw output (the
    diffusion parameterization, e.g. SUBS, is applied by the caller, as in the original).
    """

    config_class = MDLMConfig
    base_model_prefix = "mdlm"
    main_input_name = "input_ids"

    def __init__(self, config: MDLMConfig) -> None:
        super().__init__(config)
        self.backbone = DiT(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_dim,
            cond_dim=config.cond_dim,
            n_blocks=config.n_blocks,
            n_heads=config.n_heads,
            dropout=config.dropout,
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Keep the DiT's own initialisation; only the rotary table is (re)computed when missing."""
        if isinstance(module, Rotary):
            head_dim = 2 * module.inv_freq.shape[0]
            module.inv_freq = Rotary(head_dim).inv_freq.to(module.inv_freq.device)

    def forward(
        self,
        input_ids: Tensor,
        timesteps: Tensor | None = None,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MaskedLMOutput | tuple[Tensor]:
        """Logits (B, L, V) of ``x0`` given ``input_ids`` (B, L) and the noise level ``timesteps`` (B,).

        ``timesteps`` is the total noise sigma; None or ``time_conditioning=False`` feeds
        sigma = 0. ``attention_mask`` (B, L), 1 = real token, hides padding keys.
        """
        if output_hidden_states:
            raise ValueError("MDLMForMaskedLM does not return hidden states; call it without output_hidden_states.")
        sigma = torch.zeros(input_ids.shape[0], device=input_ids.device)  # (B,)
        if timesteps is not None and self.config.time_conditioning:
            sigma = timesteps.reshape(input_ids.shape[0]).to(input_ids.device)
        logits = self.backbone(input_ids, sigma, attention_mask)  # (B, L, V)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return MaskedLMOutput(logits=logits) if return_dict else (logits,)


AutoConfig.register(MODEL_TYPE, MDLMConfig, exist_ok=True)
AutoModelForMaskedLM.register(MDLMConfig, MDLMForMaskedLM, exist_ok=True)
