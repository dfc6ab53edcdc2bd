"""Typed run configuration: dataclass sections, YAML + CLI overrides, validation, ds_config derivation.

Every section is its own dataclass so each part of the engine takes only its slice (the chunking code gets a
``ChunkingConfig``, the data code a ``DataConfig``). A config is built in three steps, all before any process
group exists, so a typo costs seconds instead of a queue slot:

1. ``_build``: one generic dataclass-from-dict builder checks structure and types (unknown keys with a
   suggestion, wrong types, Literal choices) and names the full dotted key in every error;
2. each section's ``__post_init__`` checks values and rules between its own fields (and ``Config``'s the
   rules between sections); these also run when a section is constructed by hand;
3. ``config_from_dict`` checks what needs the outside world: files exist, ``model.hf_config`` is a valid
   transformers config, the user's ds_config agrees with this config.

Usage: ``python -m engine.config --config configs/tiny-cpu.yaml --optim.lr=1e-3 [--world-size 2]``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "tiny-cpu.yaml"

# engine/data.py's ByteTokenizer: ids 0..255 are bytes, then pad, bos, eos (256, 257, 258). Not imported
# from there because that module pulls in torch, and validating a config should not.
BYTE_VOCAB_SIZE = 259


class ConfigError(ValueError):
    """A user error in the configuration (file, overrides or ds_config)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _expand(path: str | None) -> str | None:
    # Tildes inside `--data.path=~/x` are not expanded by the shell (only at the start of a word).
    return None if path is None else os.path.expanduser(path)


# --------------------------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # a local HF model directory
    hf_config: dict[str, Any] | None = None  # kwargs of AutoConfig.for_model, for a random init
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False

    def __post_init__(self):
        _require(
            (self.name_or_path is None) != (self.hf_config is None),
            "model: set exactly one of model.name_or_path (a local HF model directory) "
            "and model.hf_config (AutoConfig kwargs for a random init)",
        )
        if self.hf_config is not None:
            _require(
                isinstance(self.hf_config.get("model_type"), str),
                "model.hf_config.model_type: required (a string such as 'llama'): "
                "AutoConfig.for_model needs it to pick the config class",
            )
        self.name_or_path = _expand(self.name_or_path)


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self):
        _require(self.r >= 1, f"lora.r: must be >= 1, got {self.r}")
        _require(self.alpha >= 1, f"lora.alpha: must be >= 1, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, f"lora.dropout: must be in [0, 1), got {self.dropout}")
        _require(len(self.target_modules) > 0, "lora.target_modules: must name at least one module")


@dataclass
class DataConfig:
    kind: Literal["synthetic", "jsonl", "parquet", "text"] = "synthetic"
    path: str | None = None  # file or directory; required unless kind is synthetic
    text_field: str = "text"  # jsonl / parquet column holding the text
    tokenizer: str = "byte"  # "byte" (see BYTE_VOCAB_SIZE) or a local tokenizer directory
    seq_len: int = 2048
    packing: bool = True  # concatenate documents into full seq_len rows (else pad each document)
    batch_size: int = 1  # micro batch per data-parallel rank
    num_samples: int = 1000  # synthetic only
    synthetic_task: Literal["kv_recall", "passkey"] = "kv_recall"
    seed: int = 0

    def __post_init__(self):
        _require(
            self.seq_len >= 2, f"data.seq_len: must be >= 2 (one input and one target), got {self.seq_len}"
        )
        _require(self.batch_size >= 1, f"data.batch_size: must be >= 1, got {self.batch_size}")
        _require(self.num_samples >= 1, f"data.num_samples: must be >= 1, got {self.num_samples}")
        _require(self.seed >= 0, f"data.seed: must be >= 0, got {self.seed}")
        _require(bool(self.text_field), "data.text_field: must not be empty")
        _require(bool(self.tokenizer), "data.tokenizer: must be 'byte' or a tokenizer directory")
        if self.kind == "synthetic":
            # data.kind defaults to synthetic: a path here almost always means a forgotten data.kind.
            _require(
                self.path is None,
                f"data.path: set to {self.path!r} but data.kind is 'synthetic', which reads no file; "
                "set data.kind to jsonl, parquet or text (or data.path to null)",
            )
        else:
            _require(self.path is not None, f"data.path: required for data.kind {self.kind!r}")
        self.path = _expand(self.path)
        if self.tokenizer != "byte":
            self.tokenizer = _expand(self.tokenizer)


@dataclass
class ChunkingConfig:
    mode: Literal["seco", "spaco"] = "seco"  # seco: exact gradient; spaco: unbiased sampled estimate
    chunk_size: int = 256  # tokens per chunk
    sample_prob: float | None = None  # spaco + bernoulli: probability q that a chunk is back-propagated
    sampler: Literal["bernoulli", "fixed"] = (
        "bernoulli"  # fixed: the paper's t-of-k draw (biased, see DESIGN 3)
    )
    budget: int | None = None  # spaco + fixed: chunks drawn per step (t)
    compensation_cap: float | None = None  # spaco: upper bound on the 1/q factor (trades bias for variance)
    offload_kv: bool = False  # K/V and K/V grads in pinned host memory: device memory stays flat

    def __post_init__(self):
        _require(self.chunk_size >= 1, f"chunking.chunk_size: must be >= 1, got {self.chunk_size}")
        # A nullable knob set while its feature is off is an error: the run would silently ignore it.
        if self.mode == "seco":
            for name in ("sample_prob", "budget", "compensation_cap"):
                _require(
                    getattr(self, name) is None,
                    f"chunking.{name}: only used by chunking.mode 'spaco' (mode is 'seco'); set it to null",
                )
            return
        if self.sampler == "bernoulli":
            _require(
                self.sample_prob is not None,
                "chunking.sample_prob: required for chunking.mode 'spaco' with sampler 'bernoulli' "
                "(or use sampler 'fixed' with chunking.budget)",
            )
            _require(
                0.0 < self.sample_prob <= 1.0,
                f"chunking.sample_prob: must be in (0, 1], got {self.sample_prob}",
            )
            _require(self.budget is None, "chunking.budget: only used by sampler 'fixed'; set it to null")
        else:  # the paper's t-of-k draw: t = budget, or round(sample_prob x number of chunks)
            _require(
                (self.budget is None) != (self.sample_prob is None),
                "chunking: sampler 'fixed' needs exactly one of chunking.budget (chunks per step) "
                "and chunking.sample_prob (budget = round(sample_prob x chunks))",
            )
            _require(
                self.budget is None or self.budget >= 1, f"chunking.budget: must be >= 1, got {self.budget}"
            )
            _require(
                self.sample_prob is None or 0.0 < self.sample_prob <= 1.0,
                f"chunking.sample_prob: must be in (0, 1], got {self.sample_prob}",
            )
        if self.compensation_cap is not None:
            # The factor 1/q is >= 1; a cap below 1 would scale selected chunks *down*.
            _require(
                self.compensation_cap >= 1.0,
                f"chunking.compensation_cap: must be >= 1, got {self.compensation_cap}",
            )


@dataclass
class OptimConfig:
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    min_lr_ratio: float = 0.1  # final LR of cosine / linear decay, as a fraction of lr
    grad_clip: float | None = 1.0  # max global grad norm; null: no clipping
    seed: int = 42  # model init and the SpaCO draw (shared by all ranks)
    max_nonfinite_steps: int = 5  # abort after this many non-finite losses in a row

    def __post_init__(self):
        _require(self.steps >= 1, f"optim.steps: must be >= 1, got {self.steps}")
        _require(math.isfinite(self.lr) and self.lr > 0, f"optim.lr: must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        _require(
            all(0.0 <= b < 1.0 for b in self.betas), f"optim.betas: each must be in [0, 1), got {self.betas}"
        )
        _require(self.eps > 0, f"optim.eps: must be > 0, got {self.eps}")
        _require(
            0 <= self.warmup_steps <= self.steps,
            f"optim.warmup_steps: must be in [0, optim.steps={self.steps}], got {self.warmup_steps}",
        )
        _require(
            0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}"
        )
        _require(
            self.grad_clip is None or self.grad_clip > 0,
            f"optim.grad_clip: must be > 0 or null (no clipping), got {self.grad_clip}",
        )
        _require(self.seed >= 0, f"optim.seed: must be >= 0, got {self.seed}")
        _require(
            self.max_nonfinite_steps >= 1,
            f"optim.max_nonfinite_steps: must be >= 1, got {self.max_nonfinite_steps}",
        )


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    config_file: str | None = (
        None  # the user's own ds_config JSON; see derive_ds_config for what may be in it
    )
    config: dict[str, Any] | None = None  # the same, inline

    def __post_init__(self):
        _require(
            not self.offload_param or self.zero_stage == 3,
            f"deepspeed.offload_param: needs deepspeed.zero_stage 3 (only ZeRO-3 partitions parameters), "
            f"got zero_stage {self.zero_stage}",
        )
        _require(
            not self.offload_optimizer or self.zero_stage >= 1,
            "deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1 (stage 0 has no partitioned optimizer)",
        )
        _require(
            self.config_file is None or self.config is None,
            "deepspeed: set at most one of deepspeed.config_file and deepspeed.config",
        )
        self.config_file = _expand(self.config_file)


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    every: int = 1  # steps between log lines / TensorBoard points
    tensorboard: bool = True
    progress_bar: bool = True

    def __post_init__(self):
        _require(bool(self.dir), "logging.dir: must not be empty")
        _require(self.every >= 1, f"logging.every: must be >= 1, got {self.every}")
        self.dir = _expand(self.dir)


@dataclass
class CheckpointConfig:
    dir: str | None = None
    every: int | None = None  # steps between checkpoints; null: only at the end
    resume: str | None = None  # "auto": the latest checkpoint in dir if there is one; or a checkpoint path
    export: Literal["none", "lora", "hf"] = "none"  # written into dir at the end of training

    def __post_init__(self):
        if self.every is not None:
            _require(self.every >= 1, f"checkpoint.every: must be >= 1, got {self.every}")
        for name in ("every", "resume"):
            _require(
                getattr(self, name) is None or self.dir is not None,
                f"checkpoint.{name}: needs checkpoint.dir",
            )
        _require(self.export == "none" or self.dir is not None, "checkpoint.export: needs checkpoint.dir")
        self.dir = _expand(self.dir)
        if self.resume != "auto":
            self.resume = _expand(self.resume)


@dataclass
class Config:
    model: ModelConfig
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        chunks = -(-self.data.seq_len // self.chunking.chunk_size)  # rows are padded / packed to seq_len
        _require(
            self.chunking.budget is None or self.chunking.budget <= chunks,
            f"chunking.budget: {self.chunking.budget} is more than the {chunks} chunks of a sequence "
            f"(data.seq_len {self.data.seq_len} / chunking.chunk_size {self.chunking.chunk_size})",
        )
        _require(
            self.checkpoint.export != "lora" or self.lora.enabled,
            "checkpoint.export: 'lora' needs lora.enabled true (use 'hf' to export the full model)",
        )


# ----------------------------------------------------------------------------------------- the builder


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(c) for c in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp)) if get_origin(tp) is None else str(tp).replace("typing.", "")


def _got(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it in canonical form (int -> float, list -> tuple)."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:  # `lora:` with every key commented out loads as null: all defaults
            value = {}
        return value if isinstance(value, tp) else _build(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1:  # Optional[X]: X's own error is the precise one
            return _coerce(value, arms[0], key)
        for arm in arms:
            try:
                return _coerce(value, arm, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_got(value)}")
    if origin is Literal:
        # Compare types too: True == 1 in Python, but `zero_stage: true` is a mistake, not stage 1.
        if any(type(value) is type(c) and value == c for c in args):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: must be {_type_name(tp)}; got {_got(value)}{hint}")
    if origin is list:
        _require(isinstance(value, list), f"{key}: expected a list, got {_got(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        fixed = not (len(args) == 2 and args[1] is Ellipsis)
        ok = isinstance(value, (list, tuple)) and (not fixed or len(value) == len(args))
        _require(
            ok,
            f"{key}: expected a list of {len(args) if fixed else 'any number of'} items, got {_got(value)}",
        )
        item_types = args if fixed else [args[0]] * len(value)
        return tuple(
            _coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types, strict=True))
        )
    if origin is dict:
        _require(isinstance(value, dict), f"{key}: expected a mapping, got {_got(value)}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    # Scalars. bool is a subclass of int in Python, but `steps: true` is never meant as 1.
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    hint = " (quote it to make it a string)" if tp is str else ""
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_got(value)}{hint}")


def _build(cls: type, raw: Any, key: str) -> Any:
    """Build dataclass `cls` from a mapping; `key` is its dotted position ('' for the root)."""
    where = key or "config"
    _require(isinstance(raw, dict), f"{where}: expected a mapping of {cls.__name__} fields, got {_got(raw)}")
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" Did you mean '{_dotted(key, close[0])}'?" if close else ""
            raise ConfigError(
                f"unknown key '{_dotted(key, k)}'.{hint} Allowed keys in {where}: {', '.join(names)}"
            )
    for f in dataclasses.fields(cls):
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        _require(not no_default or f.name in raw, f"missing required key '{_dotted(key, f.name)}'")
    hints = get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], _dotted(key, k)) for k, v in raw.items()})


def _dotted(prefix: str, name: Any) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def config_to_dict(cfg: Any) -> Any:
    """Plain dicts / lists / scalars (YAML- and JSON-safe); `config_from_dict` turns it back into `cfg`."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


# ------------------------------------------------------------------------------------ YAML and overrides


class _Loader(yaml.SafeLoader):
    pass


# PyYAML implements YAML 1.1, where a float needs a dot: `lr: 1e-4` would load as the *string* "1e-4".
# Everyone writes it that way, so also read exponent-only numbers as floats (as YAML 1.2 does).
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_load(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from None


def _apply_override(raw: dict, item: str) -> None:
    """Apply `--a.b.c=value` to the raw dict; the value is parsed as YAML (`1e-4` float, `true` bool, `null`)."""
    dotted, sep, text = item[2:].partition("=")
    _require(
        item.startswith("--") and sep == "=" and all(dotted.split(".")),
        f"override {item!r}: expected --section.key=value",
    )
    parts = dotted.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:  # also reaches into dict fields that are null in the file (model.hf_config)
            child = node[part] = {}
        _require(
            isinstance(child, dict),
            f"override {item!r}: {'.'.join(parts[: i + 1])} is {child!r}, not a mapping",
        )
        node = child
    node[parts[-1]] = _yaml_load(text, f"override {item!r}")


def load_config(path: str | None, overrides: list[str], check_paths: bool = True) -> Config:
    """Read the YAML file (default: configs/tiny-cpu.yaml), apply `--section.key=value` overrides, validate.

    check_paths=False skips the existence checks of model / data / tokenizer / checkpoint / ds_config paths
    (for recipes whose paths are placeholders on this machine).
    """
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    _require(file.is_file(), f"config file not found: {file}")
    raw = _yaml_load(file.read_text(), str(file))
    raw = {} if raw is None else raw
    _require(isinstance(raw, dict), f"{file}: the top level must be a mapping of sections, got {_got(raw)}")
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw, check_paths=check_paths)


def config_from_dict(raw: dict, check_paths: bool = True) -> Config:
    """Build and fully validate a Config from plain data (a parsed YAML file, or config_to_dict output)."""
    cfg = _build(Config, copy.deepcopy(raw), "")
    _check_hf_config(cfg.model, cfg.data)
    if check_paths:
        _check_paths(cfg)
    # Check the user's ds_config now rather than at deepspeed.initialize (the world size comes later).
    if check_paths or cfg.deepspeed.config_file is None:
        _derive(cfg, world_size=None)
    return cfg


# ------------------------------------------------------------------------------- checks needing the world


def _check_paths(cfg: Config) -> None:
    checks = [
        ("model.name_or_path", cfg.model.name_or_path, Path.is_dir, "a local HF model directory"),
        ("data.path", cfg.data.path, Path.exists, "a data file or directory"),
        ("data.tokenizer", None if cfg.data.tokenizer == "byte" else cfg.data.tokenizer, Path.is_dir, "'byte' or a tokenizer directory"),
        ("checkpoint.resume", None if cfg.checkpoint.resume == "auto" else cfg.checkpoint.resume, Path.exists, "'auto' or a checkpoint path"),
        ("deepspeed.config_file", cfg.deepspeed.config_file, Path.is_file, "a ds_config JSON file"),
    ]  # fmt: skip
    for key, value, exists, what in checks:
        _require(value is None or exists(Path(value)), f"{key}: {value!r} not found (expected {what})")


def _check_hf_config(model: ModelConfig, data: DataConfig) -> None:
    """Build the transformers config now: catches a bad model_type, misspelt keys and token ids off the vocab."""
    if model.hf_config is None:
        return
    from transformers import CONFIG_MAPPING, AutoConfig  # slow import: only when a random init is asked for

    kwargs = dict(model.hf_config)
    model_type = kwargs.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"model.hf_config.model_type: unknown transformers model type {model_type!r}{hint}")
    cls = CONFIG_MAPPING[model_type]
    # transformers stores unknown kwargs as attributes without a word, so `hidden_sizee: 64` would be ignored.
    known = set(inspect.signature(cls.__init__).parameters) | set(cls.attribute_map)
    with contextlib.suppress(Exception):  # composite configs may not build without arguments
        known |= set(vars(cls()))
    for k in kwargs:
        if k not in known:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f"; did you mean 'model.hf_config.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key 'model.hf_config.{k}': not a {cls.__name__} field{hint}")
    try:
        hf = AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"model.hf_config: transformers rejects it: {e}") from None
    vocab = hf.vocab_size
    # Several families default bos/eos/pad to ids far above a tiny vocab and fail deep inside the model.
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(hf, name, None)
        for token in value if isinstance(value, list) else [value]:
            _require(
                token is None or 0 <= token < vocab,
                f"model.hf_config.{name}: {value} is outside the vocabulary (vocab_size {vocab}); set it explicitly",
            )
    if data.tokenizer == "byte":
        _require(
            vocab >= BYTE_VOCAB_SIZE,
            f"model.hf_config.vocab_size: {vocab} is too small for data.tokenizer 'byte' "
            f"(needs >= {BYTE_VOCAB_SIZE}: 256 bytes + pad/bos/eos)",
        )


# ----------------------------------------------------------------------------------------------- ds_config


_ABSENT = object()


def derive_ds_config(cfg: Config, world_size: int) -> dict:
    """The ds_config for deepspeed.initialize / HfDeepSpeedConfig: the user's own (deepspeed.config_file or
    deepspeed.config) with the keys the engine owns filled in from this config.

    Engine-owned keys: train_micro_batch_size_per_gpu, train_batch_size, gradient_accumulation_steps (always
    1: the chunks of one batch replace accumulation), gradient_clipping, bf16/fp16.enabled, optimizer (AdamW),
    scheduler (none: the engine steps its own LR schedule), zero_optimization.stage and the offload devices.
    An owned key the user set to the same value (or "auto") is fine; a different value is a ConfigError naming
    both. Every other key passes through unchanged.
    """
    _require(
        type(world_size) is int and world_size >= 1,
        f"world size: must be a positive int, got {world_size!r}",
    )
    return _derive(cfg, world_size)


def _agree(theirs: Any, ours: Any) -> bool:
    if isinstance(theirs, bool) or isinstance(ours, bool):
        return type(theirs) is type(ours) and theirs == ours
    if isinstance(ours, (int, float)):
        return isinstance(theirs, (int, float)) and float(theirs) == float(ours)
    if isinstance(ours, list):
        return (
            isinstance(theirs, (list, tuple)) and len(theirs) == len(ours) and all(map(_agree, theirs, ours))
        )
    if isinstance(ours, str):  # DeepSpeed matches optimizer names case-insensitively
        return isinstance(theirs, str) and theirs.lower() == ours.lower()
    return theirs == ours


def _contradiction(ds_key: str, theirs: Any, ours: Any, source: str) -> ConfigError:
    return ConfigError(
        f"ds_config key '{ds_key}' = {theirs!r} contradicts the engine's value {ours!r} (from {source}); "
        "the engine owns this key: remove it from the ds_config or make the two agree"
    )


def _mapping_at(ds: dict, dotted: str) -> dict:
    """The (created if absent) mapping at `dotted` inside the user's ds_config."""
    node = ds
    for i, part in enumerate(dotted.split(".")):
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        _require(
            isinstance(child, dict),
            f"ds_config key '{'.'.join(dotted.split('.')[: i + 1])}': expected a mapping",
        )
        node = child
    return node


def _user_ds_config(ds_cfg: DeepSpeedConfig) -> dict:
    if ds_cfg.config is not None:
        return copy.deepcopy(ds_cfg.config)
    if ds_cfg.config_file is None:
        return {}
    file = Path(ds_cfg.config_file)
    _require(
        file.is_file(), f"deepspeed.config_file: {str(file)!r} not found (expected a ds_config JSON file)"
    )
    try:
        ds = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed.config_file: {file} is not valid JSON: {e}") from None
    _require(isinstance(ds, dict), f"deepspeed.config_file: {file} must hold a JSON object")
    return ds


def _derive(cfg: Config, world_size: int | None) -> dict:
    ds = _user_ds_config(cfg.deepspeed)
    micro, dtype, optim = cfg.data.batch_size, cfg.model.dtype, cfg.optim
    if "bfloat16" in ds:  # DeepSpeed's alias of "bf16"
        _require("bf16" not in ds, "ds_config: set only one of 'bf16' and its alias 'bfloat16'")
        ds["bf16"] = ds.pop("bfloat16")

    owned = [  # (ds_config key, the engine's value, where that value comes from)
        ("train_micro_batch_size_per_gpu", micro, f"data.batch_size = {micro}"),
        ("gradient_accumulation_steps", 1, "chunk-wise backprop, which replaces gradient accumulation"),
        ("gradient_clipping", optim.grad_clip or 0.0, f"optim.grad_clip = {optim.grad_clip} (0: no clipping)"),
        ("bf16.enabled", dtype == "bfloat16", f"model.dtype = {dtype!r}"),
        ("fp16.enabled", dtype == "float16", f"model.dtype = {dtype!r}"),
        ("optimizer.type", "AdamW", "the engine's optimizer, AdamW configured by optim.*"),
        ("optimizer.params.lr", optim.lr, f"optim.lr = {optim.lr}"),
        ("optimizer.params.betas", list(optim.betas), f"optim.betas = {list(optim.betas)}"),
        ("optimizer.params.eps", optim.eps, f"optim.eps = {optim.eps}"),
        ("optimizer.params.weight_decay", optim.weight_decay, f"optim.weight_decay = {optim.weight_decay}"),
        ("zero_optimization.stage", cfg.deepspeed.zero_stage, f"deepspeed.zero_stage = {cfg.deepspeed.zero_stage}"),
    ]  # fmt: skip
    for ds_key, ours, source in owned:
        parent, _, leaf = ds_key.rpartition(".")
        node = _mapping_at(ds, parent) if parent else ds
        theirs = node.get(leaf, _ABSENT)
        if theirs is not _ABSENT and theirs != "auto" and not _agree(theirs, ours):
            raise _contradiction(ds_key, theirs, ours, source)
        node[leaf] = ours  # also normalises agreeing spellings ("adamw", 1 for 1.0)

    if ds.get("scheduler") is not None:
        raise _contradiction(
            "scheduler", ds["scheduler"], None, f"optim.schedule = {optim.schedule!r}, stepped by the engine"
        )
    ds.pop("scheduler", None)

    zero = ds["zero_optimization"]
    for old in ("cpu_offload", "cpu_offload_params", "cpu_offload_use_pin_memory"):
        _require(
            old not in zero,
            f"ds_config key 'zero_optimization.{old}': DeepSpeed's deprecated spelling; use "
            "deepspeed.offload_optimizer / deepspeed.offload_param (and zero_optimization.offload_*.* for tuning)",
        )
    for name, on in (
        ("offload_optimizer", cfg.deepspeed.offload_optimizer),
        ("offload_param", cfg.deepspeed.offload_param),
    ):
        if zero.get(name) is None and not on:
            continue
        section = _mapping_at(
            zero, name
        )  # keeps the user's tuning (pin_memory, nvme_path, buffer_count, ...)
        device = section.get("device")
        if device in (None, "auto"):
            section["device"] = "cpu" if on else "none"
        elif (device != "none") != on:  # "cpu" and "nvme" both mean offloading
            raise _contradiction(
                f"zero_optimization.{name}.device",
                device,
                "cpu" if on else "none",
                f"deepspeed.{name} = {on}",
            )

    if ds.get("train_batch_size") == "auto":
        del ds["train_batch_size"]
    total = ds.get("train_batch_size")
    if total is not None:
        _require(
            type(total) is int and total % micro == 0,
            f"ds_config key 'train_batch_size' = {total!r} is not a multiple of data.batch_size = {micro} "
            "(it must equal data.batch_size x world size, since gradient_accumulation_steps is 1)",
        )
        if world_size is not None and total != micro * world_size:
            raise ConfigError(
                f"ds_config key 'train_batch_size' = {total} contradicts the engine's value {micro * world_size} "
                f"(data.batch_size = {micro} x world size {world_size}, gradient_accumulation_steps 1); "
                "remove it from the ds_config or make the two agree"
            )
    if world_size is not None:
        ds["train_batch_size"] = micro * world_size

    _check_zero_section(zero)
    return ds


def _check_zero_section(zero: dict) -> None:
    """Let DeepSpeed's own schema reject misspelt zero_optimization keys now, not after the launch."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    try:
        DeepSpeedZeroConfig(**copy.deepcopy(zero))
    except Exception as e:  # pydantic.ValidationError, and whatever DeepSpeed's validators raise
        raise ConfigError(f"ds_config 'zero_optimization' rejected by DeepSpeed: {e}") from None


# ------------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.config",
        description="Print the resolved config (YAML) and the derived ds_config (JSON). "
        "Other arguments are overrides: --section.key=value.",
        allow_abbrev=False,  # otherwise argparse could read an override's prefix as one of its own options
    )
    parser.add_argument("--config", default=None, help=f"YAML file (default: {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--world-size", type=int, default=1, help="data-parallel ranks for the ds_config")
    parser.add_argument(
        "--no-check-paths", action="store_true", help="do not require model/data paths to exist"
    )
    args, overrides = parser.parse_known_args(argv)
    try:
        # DeepSpeed's logger writes to the stdout it finds at import (which happens in here): keep stdout
        # for the YAML + JSON so the output can be piped.
        with contextlib.redirect_stdout(sys.stderr):
            cfg = load_config(args.config, overrides, check_paths=not args.no_check_paths)
            ds = derive_ds_config(cfg, args.world_size)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    print(f"# ds_config (world size {args.world_size}):")
    print(json.dumps(ds, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
