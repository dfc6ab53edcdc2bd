"""The dimensions of a decoder that memory and time depend on, read from a transformers config (or its fields).

Three kinds of decoder layer are told apart:
  attention  Llama-shaped (RMSNorm, RoPE, GQA); keeps K/V for every token (the chunk-wise checkpoints)
  linear     a recurrent mixer with a fixed-size state (Gated DeltaNet as in Qwen3-Next / Qwen3.5, Mamba-2 as in
             Nemotron-H, Bamba, Falcon-H1, Granite-4 hybrid): keeps its conv + recurrent state at every chunk
             boundary instead of K/V per token (docs/design.md, hybrid models)
  MoE MLP    instead of the dense MLP: every expert's weights are stored, top-k of them run per token
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.unwrap import text_config

PRESETS: dict[str, dict] = {
    k: v for k, v in json.loads((Path(__file__).with_name("presets.json")).read_text()).items() if k[0] != "_"
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # the dense MLP's (or, with experts, each expert's) intermediate size
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    # hybrid: how many of the layers are linear (recurrent) mixers, and per such layer and sequence:
    linear_layers: int = 0
    rec_state: int = 0  # elements of the recurrent state checkpointed at each chunk boundary (float32)
    conv_state: int = 0  # elements of the conv state there (the model's dtype)
    linear_params: int = 0  # the mixer's weights
    linear_width: int = 0  # elements per token the mixer's autograd graph saves (projections, conv, gates)
    linear_split: int = (
        0  # what a sequence group's P must divide to split the mixers by heads (key heads, groups)
    )
    # MoE: experts per layer (0: dense MLP), experts run per token, shared expert's intermediate size
    experts: int = 0
    top_k: int = 0
    shared_intermediate: int = 0
    family: str = "llama"

    @classmethod
    def from_config(cls, cfg) -> ModelShape:
        """From a transformers config, a dict of its fields, a preset name or a ModelShape."""
        if isinstance(cfg, ModelShape):
            return cfg
        if isinstance(cfg, str):
            if cfg not in PRESETS:
                raise ValueError(f"unknown preset {cfg!r}; known: {', '.join(PRESETS)}")
            cfg = PRESETS[cfg]
        if not isinstance(cfg, Mapping):  # a transformers PretrainedConfig
            cfg = text_config(cfg).to_dict()
        cfg = cfg.get("text_config") or cfg  # multimodal wrappers keep the decoder under text_config
        missing = [
            k
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
            if k not in cfg
        ]
        if missing:
            raise ValueError(f"model config lacks {missing}")
        heads, hidden, layers = cfg["num_attention_heads"], cfg["hidden_size"], cfg["num_hidden_layers"]
        experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0
        shared = cfg.get("shared_expert_intermediate_size") or 0
        shared = shared or (cfg.get("moe_shared_expert_intermediate_size") or 0) * (
            cfg.get("n_shared_experts") or 0
        )
        inter = (
            (cfg.get("moe_intermediate_size") if experts else None)
            or cfg.get("intermediate_size")
            or 4 * hidden
        )
        return cls(
            hidden=hidden,
            layers=layers,
            heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            intermediate=inter,
            vocab=cfg["vocab_size"],
            tied=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)) or cfg.get("model_type") == "qwen2",
            experts=experts,
            top_k=(cfg.get("num_experts_per_tok") or 2) if experts else 0,
            shared_intermediate=shared,
            family=cfg.get("model_type", "llama"),
            **_linear_mixer(cfg, hidden, layers),
        )

    # ------------------------------------------------------------------------------------------ sizes

    def state_bytes(self, dtype_bytes: int = 2) -> int:
        """One linear layer's state at one boundary: recurrent in float32, conv in the model's dtype."""
        return 4 * self.rec_state + dtype_bytes * self.conv_state

    @property
    def attn_layers(self) -> int:
        return self.layers - self.linear_layers

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear of a (Llama-shaped) decoder layer; with experts, one expert's MLP."""
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }  # fmt: skip

    def mlp_params(self, active: bool = False) -> int:
        """One layer's MLP: dense, or every expert (active=True: the top-k run per token) + shared + router."""
        h = self.hidden
        if not self.experts:
            return 3 * h * self.intermediate
        n = self.top_k if active else self.experts
        return 3 * h * self.intermediate * n + 3 * h * self.shared_intermediate + h * self.experts

    def attn_params(self) -> int:
        bias = (self.q_width + 2 * self.kv_width) if self.qkv_bias else 0
        dims = self.linear_dims()
        return (
            sum(
                a * b
                for name, (a, b) in dims.items()
                if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
            )
            + bias
        )

    def layer_params(self, active: bool = False) -> int:
        """An attention layer's parameters (norms included)."""
        return self.attn_params() + self.mlp_params(active) + 2 * self.hidden

    def base_params(self, active: bool = False) -> int:
        embed = self.vocab * self.hidden
        mixers = self.attn_layers * self.attn_params() + self.linear_layers * self.linear_params
        per_layer = self.mlp_params(active) + 2 * self.hidden
        return embed * (1 if self.tied else 2) + mixers + self.layers * per_layer + self.hidden

    def lora_params(self, rank: int, targets) -> int:
        """LoRA on attention layers' projections (and the dense MLP's; experts are not adapted here)."""
        dims = self.linear_dims()
        attn = ("q_proj", "k_proj", "v_proj", "o_proj")
        n = sum(rank * (dims[t][0] + dims[t][1]) for t in targets if t in attn)
        mlp = 0 if self.experts else sum(rank * (dims[t][0] + dims[t][1]) for t in targets if t not in attn)
        return self.attn_layers * n + self.layers * mlp


def _linear_mixer(cfg: Mapping, hidden: int, layers: int) -> dict:
    """The linear (recurrent) layers of a hybrid config: how many, their state per boundary, weights and the
    per-token width of what their autograd graph saves. Raises for a hybrid family it cannot size."""
    types = cfg.get("layer_types") or cfg.get("layers_block_type") or []
    n = sum(t in ("linear_attention", "mamba", "mamba2") for t in types)
    if not types and cfg.get("full_attention_interval"):  # Qwen3-Next: every interval-th layer is attention
        n = layers - layers // cfg["full_attention_interval"]
    elif not types and _first(cfg, "ssm_state_size", "mamba_d_state"):  # Bamba: Mamba-2 but at these indices
        n = layers - len(cfg.get("attn_layer_indices") or [])
    if not n:
        return {}
    if types and len(types) != layers:  # block-type patterns list every layer (attention, MLP and mixers)
        n = round(n * layers / len(types))
    if "linear_num_value_heads" in cfg:  # Gated DeltaNet
        vh, kh = cfg["linear_num_value_heads"], cfg["linear_num_key_heads"]
        kd, vd = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
        key, value, kernel = kh * kd, vh * vd, cfg.get("linear_conv_kernel_dim", 4)
        conv = 2 * key + value
        rec, conv_state, split = vh * kd * vd, conv * kernel, kh
        params = hidden * (2 * key + 2 * value + 2 * vh) + conv * kernel + value * hidden + vd + 2 * vh
        # what transformers' torch path (torch_chunk_gated_delta_rule, 64-token blocks, float32) saves per
        # token, counted on a tiny Qwen3-Next: the projections, conv in/out, five [64 x 64] block matrices per
        # value head and ~23 head-sized tensors (q, k, v, their l2-normed, blocked and decayed forms)
        width = (2 * key + 2 * value + 2 * vh) + 2 * conv + 5 * vh * 64 + 23 * vh * max(kd, vd)
    elif _first(cfg, "ssm_state_size", "mamba_d_state"):  # Mamba-2 (the families spell its fields apart)
        heads = _first(cfg, "mamba_num_heads", "mamba_n_heads")
        head_dim = _first(cfg, "mamba_head_dim", "mamba_d_head")
        d_state = _first(cfg, "ssm_state_size", "mamba_d_state")
        groups = _first(cfg, "n_groups", "mamba_n_groups") or 1
        if not (heads and head_dim):
            raise ValueError(
                f"planner: {cfg.get('model_type')}: a Mamba config without Mamba-2 heads / head dim"
            )
        inner, kernel = heads * head_dim, _first(cfg, "conv_kernel", "mamba_d_conv") or 4
        conv = inner + 2 * groups * d_state
        rec, conv_state, split = heads * head_dim * d_state, conv * kernel, groups
        params = (
            hidden * (2 * inner + 2 * groups * d_state + heads) + conv * kernel + inner * hidden + 3 * heads
        )
        width = (2 * inner + 2 * groups * d_state + heads) + 2 * conv + 3 * inner
    else:
        raise ValueError(
            f"planner: {cfg.get('model_type')!r} has linear layers of a kind it cannot size "
            "(known: Gated DeltaNet linear_* fields, Mamba-2 ssm_state_size/mamba_* fields)"
        )
    return dict(
        linear_layers=n, rec_state=rec, conv_state=conv_state, linear_params=params, linear_width=width,
        linear_split=split,
    )  # fmt: skip


def _first(cfg: Mapping, *names: str):
    return next((cfg[n] for n in names if cfg.get(n)), None)


def load_model_config(model: str | None = None, hf_config: str | None = None) -> tuple[str, dict]:
    """(a name for it, its config fields) from a local HF model directory, a config JSON file, an inline
    JSON object or a preset name. Nothing is downloaded."""
    if (model is None) == (hf_config is None):
        raise ValueError("give exactly one of a local model directory and a config (file, JSON or preset)")
    if model is not None:
        path = Path(model) / "config.json"
        if not path.is_file():
            raise ValueError(f"model {model}: no config.json there (a local Hugging Face model directory)")
        return model, json.loads(path.read_text())
    if hf_config in PRESETS:
        return hf_config, dict(PRESETS[hf_config])
    if hf_config.lstrip().startswith("{"):
        return "inline config", json.loads(hf_config)
    path = Path(hf_config)
    if not path.is_file():
        raise ValueError(f"{hf_config!r}: neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    return hf_config, json.loads(path.read_text())
