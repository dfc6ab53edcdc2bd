"""The HF model and text config behind the wrappers the engine meets (PEFT, multimodal configs)."""

from __future__ import annotations


def base_model(module):
    """The transformers model a PEFT model wraps (the module itself when it wraps none)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def text_config(config):
    """The decoder's config: a multimodal config's text part, else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config
