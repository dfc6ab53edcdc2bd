"""Config ergonomics: the user's ds_config sets what the YAML leaves out; lora.target_modules all-linear;
flash_attention_2 without its package is a config error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny import tiny_model

from engine.config import ConfigError, LoraConfig
from engine.config_load import load_config
from engine.distributed import derive_ds_config
from engine.model import apply_lora

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


def config_without(tmp_path: Path, section: str, *keys: str) -> str:
    raw = yaml.safe_load(TINY.read_text())
    for key in keys:
        raw[section].pop(key, None)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_ds_config_sets_what_the_yaml_leaves_out(tmp_path):
    ds = {
        "zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}},
        "gradient_clipping": 0.5,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-4, "betas": [0.9, 0.95]}},
    }
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    (tmp_path / "zero.json").write_text(json.dumps({"zero_optimization": ds["zero_optimization"]}))
    path = config_without(tmp_path, "deepspeed", "zero_stage")
    cfg = load_config(path, [f"--deepspeed.config_file={tmp_path}/zero.json"])
    assert cfg.deepspeed.zero_stage == 1 and cfg.deepspeed.offload_optimizer
    # optim.grad_clip and optim.lr are in the YAML: they stay, so the ds_config's values contradict them.
    with pytest.raises(ConfigError, match=r"'gradient_clipping' = 0.5 contradicts .*optim.grad_clip = 1.0"):
        load_config(path, [f"--deepspeed.config={json.dumps(ds)}"])
    path = config_without(tmp_path, "optim", "grad_clip", "lr")
    raw = yaml.safe_load(Path(path).read_text())
    raw["deepspeed"] = {"config_file": str(tmp_path / "ds.json")}
    Path(path).write_text(yaml.safe_dump(raw))
    cfg = load_config(path, [])
    assert (cfg.optim.grad_clip, cfg.optim.lr, cfg.optim.betas, cfg.deepspeed.zero_stage) == (
        0.5,
        2e-4,
        (0.9, 0.95),
        1,
    )
    out = derive_ds_config(cfg, 2)
    assert out["zero_optimization"]["stage"] == 1 and out["optimizer"]["params"]["lr"] == 2e-4
    # A key the YAML (or an override) sets still wins, and a contradiction is still an error.
    with pytest.raises(ConfigError, match=r"'zero_optimization.stage' = 1 contradicts the engine's value 2"):
        load_config(path, ["--deepspeed.zero_stage=2"])


def test_ds_config_contradicting_what_the_yaml_sets_is_an_error(tmp_path):
    ds = json.dumps({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}})
    assert load_config(str(TINY), [f"--deepspeed.config={ds}"]).deepspeed.offload_optimizer  # not in the YAML
    with pytest.raises(
        ConfigError, match=r"'zero_optimization.offload_optimizer.device' = 'cpu' contradicts .*'none'"
    ):
        load_config(str(TINY), [f"--deepspeed.config={ds}", "--deepspeed.offload_optimizer=false"])


def test_ds_config_auto_keeps_the_default(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": "auto"}}))
    path = config_without(tmp_path, "deepspeed", "zero_stage")
    assert load_config(path, [f"--deepspeed.config_file={tmp_path}/ds.json"]).deepspeed.zero_stage == 2


def test_lora_all_linear_adapts_every_linear_but_the_head(tmp_path):
    cfg = load_config(str(TINY), ["--lora.enabled=true", "--lora.target_modules=all-linear"])
    assert cfg.lora.target_modules == "all-linear"
    model = apply_lora(tiny_model("LlamaConfig", torch.float32), cfg.lora)
    adapted = {name.split(".")[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(
        ConfigError, match=r"lora.target_modules: expected list\[str\] or one of 'all-linear'"
    ):
        load_config(str(TINY), ["--lora.target_modules=all-linears"])
    with pytest.raises(ConfigError, match="must name at least one module, or be 'all-linear'"):
        LoraConfig(target_modules=[])


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
def test_flash_attention_without_its_package_is_a_config_error():
    with pytest.raises(ConfigError, match="'flash_attention_2' needs the flash-attn package"):
        load_config(str(TINY), ["--model.attn_implementation=flash_attention_2"])
