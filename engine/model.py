"""Building the model the engine trains: the HF causal LM, partitioned at load under ZeRO-3, then PEFT.

Features are functions applied to the model in this order (engine/trainer.py calls them):

    1. build_model   weights (local directory, hub id through the HF cache, or random init), dtype, attention kernel; under ZeRO-3 the
                     model is built inside HfDeepSpeedConfig (engine/distributed's zero3_context)
                     so every rank holds only its partition
    2. apply_lora    LoRA adapters (PEFT): only they are trainable
    3. model.train() set by build_model; chunk-wise training replays dropout masks, so train mode is fine

Each function takes only its config section.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from engine.config import LoraConfig, ModelConfig

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def model_vocab_size(model_cfg: ModelConfig) -> int:
    """The embedding rows of the model the config names, without building it (for checking the data)."""
    return _hf_config(model_cfg).vocab_size


def check_weights(model_cfg: ModelConfig) -> None:
    """Before training starts: a local model directory holds weight files (planning and data inspection
    read only its config.json, so config load does not ask for them)."""
    from engine.file_checks import check_has_weights
    from engine.hub import is_hub_id

    if model_cfg.name_or_path is not None and not is_hub_id(str(model_cfg.name_or_path)):
        check_has_weights(Path(model_cfg.name_or_path), "model.name_or_path")  # a hub id's may be downloaded


def model_config(model_cfg: ModelConfig):
    """The model's transformers config, without building the model (for start-up checks)."""
    return _hf_config(model_cfg)


def _hf_config(model_cfg: ModelConfig):
    if model_cfg.hf_config is not None:
        kwargs = dict(model_cfg.hf_config)
        return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    with _remote_code_named(model_cfg):
        return AutoConfig.from_pretrained(
            model_cfg.name_or_path,
            local_files_only=_local_only(model_cfg),
            trust_remote_code=model_cfg.trust_remote_code,
        )


@contextlib.contextmanager
def _remote_code_named(model_cfg: ModelConfig):
    """transformers refuses a model with code of its own under trust_remote_code=False in a paragraph that
    names neither the key nor the file: one line naming both instead."""
    try:
        yield
    except ValueError as e:
        if model_cfg.trust_remote_code or "trust_remote_code" not in str(e):
            raise
        raise ValueError(
            f"model.name_or_path: {model_cfg.name_or_path!r} holds code of its own (auto_map in its "
            "config.json), which runs only with model.trust_remote_code: true"
        ) from None


def _local_only(model_cfg: ModelConfig) -> bool:
    """A directory is read as it is (never another revision fetched); a hub id goes through the HF cache,
    downloading only where HF_HUB_OFFLINE is unset (engine/hub.py; checked at config load)."""
    from engine.hub import is_hub_id

    return not is_hub_id(str(model_cfg.name_or_path))


def build_model(model_cfg: ModelConfig, seed: int) -> PreTrainedModel:
    """The causal LM in train mode. A random init (model.hf_config) is drawn from `seed`; note that under
    ZeRO-3 (inside zero3_context) the same seed draws different weights than without it (docs/design.md 5)."""
    kwargs = dict(dtype=DTYPES[model_cfg.dtype], attn_implementation=model_cfg.attn_implementation)
    torch.manual_seed(seed)
    if model_cfg.hf_config is not None:
        model = AutoModelForCausalLM.from_config(_hf_config(model_cfg), **kwargs)
    else:
        with _remote_code_named(model_cfg):
            model = AutoModelForCausalLM.from_pretrained(
                model_cfg.name_or_path,
                local_files_only=_local_only(model_cfg),
                trust_remote_code=model_cfg.trust_remote_code,
                **kwargs,
            )
    if model_cfg.router_aux_loss is not None:  # HF's own switch; engine/moe.py splits the loss by chunk
        model.config.output_router_logits = model_cfg.router_aux_loss
    # The chunk-wise code passes its own cache and use_cache=True per chunk; generation settings are moot.
    model.train()
    return model


def apply_lora(model: PreTrainedModel, lora_cfg: LoraConfig) -> torch.nn.Module:
    """Wrap in PEFT LoRA adapters when enabled: the base weights freeze, only the adapters train."""
    if not lora_cfg.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_cfg = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules
        if lora_cfg.target_modules == "all-linear"
        else list(lora_cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_cfg)
    model.train()
    return model
