"""Config values that YAML or transformers would take silently: duplicate keys (YAML keeps the last),
non-finite floats (NaN weights after step 1), and transformers' backward-compatible config keys (kept,
while misspelt ones are still refused)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError
from engine.config_load import load_config, yaml_load

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny-cpu.yaml"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def error_of(path: str | None, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides), check_paths=False)
    return str(e.value)


def test_duplicate_key_names_the_key_and_both_lines(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 3.0e-3\n  steps: 5\n  lr: 1.0e-3\n")
    msg = error_of(path)
    assert "duplicate key 'optim.lr' at lines 2 and 4" in msg and "c.yaml" in msg


def test_duplicate_section_names_both_lines(tmp_path):
    """A second `optim:` section would replace the first (its lr became the default)."""
    path = write(tmp_path, "optim:\n  lr: 3.0e-3\ndata:\n  seq_len: 64\noptim:\n  steps: 5\n")
    assert "duplicate key 'optim' at lines 1 and 5" in error_of(path)


def test_merge_keys_may_be_overridden():
    """`<<: *anchor` then a key of the mapping's own is YAML's way to override: not a duplicate."""
    text = "base: &o {lr: 3.0e-3, steps: 7}\noptim:\n  <<: *o\n  lr: 2.0e-3\n"
    assert yaml_load(text, "c.yaml")["optim"] == {"lr": 2.0e-3, "steps": 7}
    with pytest.raises(ConfigError, match="duplicate key 'optim.lr' at lines 4 and 5"):
        yaml_load(text + "  lr: 1.0e-3\n", "c.yaml")


def test_every_shipped_config_has_no_duplicate_keys():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(str(path), [], check_paths=False)


@pytest.mark.parametrize("key", ["optim.weight_decay", "optim.eps", "optim.lr", "optim.grad_clip"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_floats_are_refused_by_name(key, value):
    msg = error_of(str(CONFIG), [f"--{key}={value}"])
    assert f"{key}: must be a finite number" in msg


def test_non_finite_in_a_file_and_in_hf_config(tmp_path):
    text = CONFIG.read_text().replace("  weight_decay: 0.0", "  weight_decay: .inf", 1)
    assert "optim.weight_decay: must be a finite number, got inf" in error_of(write(tmp_path, text))
    msg = error_of(str(CONFIG), ["--model.hf_config.rms_norm_eps=.nan"])
    assert "model.hf_config.rms_norm_eps: must be a finite number" in msg


def test_non_finite_in_the_users_ds_config(tmp_path):
    """Inline (YAML .inf) or a JSON file (Infinity, NaN: Python's json reads them): refused naming the
    ds_config key, also where the engine does not own the key; the finite file is taken (the control)."""
    inline = "--deepspeed.config={zero_optimization: {stage: 2, reduce_bucket_size: .inf}}"
    assert "ds_config.zero_optimization.reduce_bucket_size: must be a finite number" in error_of(
        str(CONFIG), [inline]
    )
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8}}')
    load_config(str(CONFIG), [f"--deepspeed.config_file={ds}"], check_paths=True)
    ds.write_text('{"zero_optimization": {"stage": 2, "reduce_bucket_size": NaN}}')
    with pytest.raises(
        ConfigError, match=r"ds_config\.zero_optimization\.reduce_bucket_size: must be a finite"
    ):
        load_config(str(CONFIG), [f"--deepspeed.config_file={ds}"], check_paths=True)


def test_backward_compatible_hf_config_keys_are_accepted():
    rope = "--model.hf_config.rope_scaling={rope_type: linear, factor: 2.0}"
    cfg = load_config(str(CONFIG), [rope, "--model.hf_config.rope_theta=500000.0"], check_paths=False)
    assert cfg.model.hf_config["rope_scaling"]["factor"] == 2.0
    from engine.model import build_model

    model = build_model(cfg.model, seed=0)
    assert model.config.rope_parameters["factor"] == 2.0 and model.config.rope_parameters["rope_theta"] == 5e5
    # a key transformers only stores (and the model never reads) is still refused, with a suggestion
    assert "unknown key 'model.hf_config.rope_scalling'" in error_of(
        str(CONFIG), [rope.replace("scaling", "scalling")]
    )


def test_yaml_nested_thousands_deep_is_one_error(tmp_path):
    path = write(tmp_path, "optim: " + "[" * 3000 + "]" * 3000 + "\n")
    assert "c.yaml: invalid YAML: nested too deeply" in error_of(path)
