"""Building a Config: YAML file + ``--section.key=value`` overrides -> typed, validated ``engine.config.Config``.

All before any process group exists, so a typo costs seconds instead of a queue slot:

1. ``_build``: one generic dataclass-from-dict builder checks structure and types (unknown keys with a
   suggestion, wrong types, Literal choices) and names the full dotted key in every error;
2. each section's ``__post_init__`` (engine/config.py) checks values and the rules between its fields;
3. ``config_from_dict`` checks what needs the outside world: files exist, ``model.hf_config`` is a valid
   transformers config, the user's ds_config agrees with this config (engine/distributed/ds_config.py derives it).

Why a small builder of our own rather than a library (dacite, tyro, jsonargparse): the error messages are
the point (the full dotted key, the expected type, the closest valid key, ``steps: true`` refused as an
int), and about 100 lines cover the engine's plain nested dataclasses.

Usage: ``python -m engine.config_load --config configs/tiny-cpu.yaml --optim.lr=1e-3 [--world-size 2]``.
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
import reprlib
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from engine.config import (
    BYTE_VOCAB_SIZE,
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    _require,
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


# A value in an error message is cut to a few items per level: a huge (or alias-built) value must not be
# rendered whole, whatever its size.
_SHORT = reprlib.Repr()  # (keyword arguments only from Python 3.12)
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 120, 120
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6


def _got(value: Any) -> str:
    return f"{type(value).__name__} {_SHORT.repr(value)}"


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
        errors = []
        for arm in arms:
            try:
                return _coerce(value, arm, key)
            except ConfigError as e:
                errors.append((arm, e))
        for arm, e in errors:  # a list where a list is allowed: its own error names the bad item
            if isinstance(value, list) and get_origin(arm) is list:
                raise e
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
        # .inf / .nan load as floats: `weight_decay: .inf` would turn every weight into NaN on step 1
        _require(math.isfinite(value), f"{key}: must be a finite number, got {value}")
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


# Configs may use a few anchors/aliases (`<<: *defaults`); a "billion laughs" document nests aliases so that
# a 1.6 KB file stands for billions of items, which any walk over the value (coercion, an error message)
# expands. Refused beyond this many alias uses per document, while composing (before anything expands).
MAX_YAML_ALIASES = 16


class _Loader(yaml.SafeLoader):
    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases = getattr(self, "_aliases", 0) + 1
            if self._aliases > MAX_YAML_ALIASES:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"more than {MAX_YAML_ALIASES} aliases (*name): refused",
                    self.peek_event().start_mark,
                )
        return super().compose_node(parent, index)


# PyYAML implements YAML 1.1, where a float needs a dot: `lr: 1e-4` would load as the *string* "1e-4".
# Everyone writes it that way, so also read exponent-only numbers as floats (as YAML 1.2 does).
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str, where: str) -> Any:
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, "", where, set())
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from None
    except RecursionError:  # PyYAML composes recursively: `[[[[...` thousands deep
        raise ConfigError(f"{where}: invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _check_duplicate_keys(node: yaml.Node, path: str, where: str, seen: set[int]) -> None:
    """A key given twice in one mapping: YAML keeps the last silently (a second `optim:` section replaces
    the first). Refused, naming the key and both lines. Keys merged in with `<<: *anchor` may be
    overridden: they are not this mapping's own keys."""
    if id(node) in seen:  # an alias: its node was checked where it was defined
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, f"{path}[{i}]", where, seen)
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            _check_duplicate_keys(value_node, path, where, seen)
            continue
        key, line = key_node.value, key_node.start_mark.line + 1
        if key in first_line:
            raise ConfigError(
                f"{where}: duplicate key '{_dotted(path, key)}' at lines {first_line[key]} and {line} "
                "(YAML would keep only the last)"
            )
        first_line[key] = line
        _check_duplicate_keys(value_node, _dotted(path, key), where, seen)


def _read_utf8(file: Path) -> str:
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{file}: not UTF-8 text (byte {e.start}, line {line}: {e.reason})") from None


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
    node[parts[-1]] = yaml_load(text, f"override {item!r}")


def load_config(path: str | None, overrides: list[str], check_paths: bool = True) -> Config:
    """Read the YAML file (default: configs/tiny-cpu.yaml), apply `--section.key=value` overrides, validate.

    check_paths=False skips the existence checks of model / data / tokenizer / checkpoint / ds_config paths
    (for recipes whose paths are placeholders on this machine).
    """
    file = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    _require(file.is_file(), f"config file not found: {file}")
    raw = yaml_load(_read_utf8(file), str(file))
    raw = {} if raw is None else raw
    _require(isinstance(raw, dict), f"{file}: the top level must be a mapping of sections, got {_got(raw)}")
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw, check_paths=check_paths)


def config_from_dict(raw: dict, check_paths: bool = True) -> Config:
    """Build and fully validate a Config from plain data (a parsed YAML file, or config_to_dict output)."""
    cfg = _build(Config, _follow_ds_config(copy.deepcopy(raw), check_paths), "")
    _check_hf_config(cfg.model, cfg.data)
    if check_paths:  # what this machine must have: files, and the attention kernel's package
        _check_paths(cfg)
        _check_attention(cfg.model)
        from engine.trackers import check_installed

        check_installed(cfg.logging)
    # Check the user's ds_config now rather than at deepspeed.initialize (the world size comes later).
    if check_paths or cfg.deepspeed.config_file is None:
        from engine.distributed import check_ds_config  # imports DeepSpeed: only once the file parsed

        check_ds_config(cfg)
    return cfg


# ------------------------------------------------------------------------------ the user's ds_config

# Run config keys that the user's ds_config may set instead: (section, key, ds_config key, to our value).
# A key the YAML leaves out takes the ds_config's value ("auto" and absent: the YAML default stays), so a
# ds_config with zero_optimization.stage 1 is not contradicted by the default deepspeed.zero_stage 2.
_FROM_DS_CONFIG = [
    ("deepspeed", "zero_stage", "zero_optimization.stage", lambda v: v),
    ("deepspeed", "offload_optimizer", "zero_optimization.offload_optimizer.device", lambda v: v != "none"),
    ("deepspeed", "offload_param", "zero_optimization.offload_param.device", lambda v: v != "none"),
    ("data", "batch_size", "train_micro_batch_size_per_gpu", lambda v: v),
    ("optim", "grad_clip", "gradient_clipping", lambda v: v or None),  # 0: no clipping
    ("optim", "lr", "optimizer.params.lr", lambda v: v),
    ("optim", "betas", "optimizer.params.betas", lambda v: v),
    ("optim", "eps", "optimizer.params.eps", lambda v: v),
    ("optim", "weight_decay", "optimizer.params.weight_decay", lambda v: v),
]


def _follow_ds_config(raw: dict, check_paths: bool) -> dict:
    """`raw` with the keys it leaves out filled from the user's ds_config (see _FROM_DS_CONFIG)."""
    ds_raw = raw.get("deepspeed")
    if not isinstance(ds_raw, dict) or (ds_raw.get("config") is None and ds_raw.get("config_file") is None):
        return raw
    if ds_raw.get("config") is None and not check_paths:
        return raw  # a placeholder ds_config path on this machine: nothing to read
    from engine.config import DeepSpeedConfig
    from engine.distributed.ds_config import user_ds_config

    source = {k: ds_raw[k] for k in ("config", "config_file") if ds_raw.get(k) is not None}
    user = user_ds_config(_build(DeepSpeedConfig, source, "deepspeed"))
    _check_finite(user, "ds_config")  # JSON reads Infinity / NaN, YAML .inf / .nan: DeepSpeed would take them
    for section, key, ds_key, convert in _FROM_DS_CONFIG:
        value: Any = user
        for part in ds_key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        ours = raw.get(section)
        if value is None or value == "auto" or (isinstance(ours, dict) and key in ours):
            continue
        _require(ours is None or isinstance(ours, dict), f"{section}: expected a mapping, got {_got(ours)}")
        raw[section] = {**(ours or {}), key: convert(value)}
    return raw


# ------------------------------------------------------------------------------- checks needing the world


def _check_paths(cfg: Config) -> None:
    from engine.hub import check_hub_id, is_hub_id

    # A hub id (owner/name) where a model or tokenizer directory is expected: its cached snapshot gets the
    # file checks; not cached, it must be downloadable (not HF_HUB_OFFLINE).
    model_dir, tokenizer_dir = (
        cfg.model.name_or_path,
        None if cfg.data.tokenizer == "byte" else cfg.data.tokenizer,
    )
    if model_dir is not None and is_hub_id(model_dir):
        model_dir = check_hub_id(model_dir, "model.name_or_path")
    if tokenizer_dir is not None and is_hub_id(tokenizer_dir):
        tokenizer_dir = check_hub_id(tokenizer_dir, "data.tokenizer")
    checks = [
        ("model.name_or_path", model_dir, Path.is_dir, "a local HF model directory or a hub id"),
        ("data.tokenizer", tokenizer_dir, Path.is_dir, "'byte', a tokenizer directory or a hub id"),
        ("checkpoint.resume", None if cfg.checkpoint.resume == "auto" else cfg.checkpoint.resume, Path.exists, "'auto' or a checkpoint path"),
        ("deepspeed.config_file", cfg.deepspeed.config_file, Path.is_file, "a ds_config JSON file"),
        ("data.chat_template", _template_file(cfg.data.chat_template), Path.is_file, "a Jinja template file or the template text"),
    ]  # fmt: skip
    for key, value, exists, what in checks:
        _require(value is None or exists(Path(value)), f"{key}: {value!r} not found (expected {what})")
    from engine.data.readers import is_hub_id  # a hub dataset id is resolved when the data is read

    data_paths = [("data.path", cfg.data.path), ("eval.path", cfg.eval.path)] + [
        (f"data.mixture[{i}].path", m.path) for i, m in enumerate(cfg.data.mixture or [])
    ]
    for key, value in data_paths:
        ok = value is None or Path(value).exists() or is_hub_id(value)
        _require(ok, f"{key}: {value!r} not found (expected a data file or directory, or a hub dataset id)")
    for key, value in (("checkpoint.dir", cfg.checkpoint.dir), ("logging.dir", cfg.logging.dir)):
        if value is not None:
            _check_writable_dir(key, Path(value))
    # Files the libraries reading them would report without naming them (or only after the process group).
    from engine.file_checks import check_json_files, check_model_dir

    if model_dir is not None:
        check_model_dir(Path(model_dir), "model.name_or_path: file")
    if tokenizer_dir is not None:
        check_json_files(Path(tokenizer_dir), "data.tokenizer: file")


def _template_file(spec: str | None) -> str | None:
    """data.chat_template names a file unless it is the template text itself."""
    return None if spec is None or "{{" in spec or "{%" in spec else spec


def _check_writable_dir(key: str, path: Path) -> None:
    """An output directory is written first at the end of step 1 (logs) or at the first save: a path that is
    a file or cannot be written would be found after the run. Nothing is created here (a failed start
    writes nothing); the nearest existing ancestor must be a directory this process can write into."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    where = f"{str(path)!r}" if existing == path else f"{str(path)!r}: {str(existing)!r}"
    _require(existing.is_dir(), f"{key}: {where} is a file, not a directory")
    _require(
        os.access(existing, os.W_OK | os.X_OK),
        f"{key}: {str(path)!r} is not writable"
        + ("" if existing == path else f" ({str(existing)!r} is not)"),
    )


def _check_attention(model: ModelConfig) -> None:
    """flash_attention_2 needs the flash-attn package; without it transformers fails on rank 0 at load."""
    import importlib.util

    _require(
        model.attn_implementation != "flash_attention_2"
        or importlib.util.find_spec("flash_attn") is not None,
        "model.attn_implementation: 'flash_attention_2' needs the flash-attn package, which is not installed "
        "(pip install flash-attn --no-build-isolation, on a CUDA machine); or use 'sdpa'",
    )


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
    _check_finite(kwargs, "model.hf_config")
    try:
        hf = AutoConfig.for_model(model_type, **kwargs)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"model.hf_config: transformers rejects it: {e}") from None
    # transformers stores unknown kwargs as attributes without a word, so `hidden_sizee: 64` would be ignored.
    # Keys it consumes without a field of that name (`rope_scaling`, `rope_theta` into `rope_parameters`,
    # `torch_dtype`) are its backward-compatible spellings and are kept.
    known = set(inspect.signature(cls.__init__).parameters) | set(cls.attribute_map)
    with contextlib.suppress(Exception):  # composite configs may not build without arguments
        known |= set(vars(cls()))
    for k in kwargs:
        if k not in known and k in vars(hf):
            close = difflib.get_close_matches(k, sorted(known), n=1)
            hint = f"; did you mean 'model.hf_config.{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key 'model.hf_config.{k}': not a {cls.__name__} field{hint}")
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


def _check_finite(value: Any, key: str) -> None:
    """Untyped nested values (model.hf_config, the user's ds_config) get the typed keys' rule: no .inf / .nan."""
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(value, float):
        _require(math.isfinite(value), f"{key}: must be a finite number, got {value}")


# ------------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.config_load",
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
            from engine.distributed import derive_ds_config

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
