"""Config loading, validation and ds_config derivation (no distributed run, no model build)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.config import (
    DEFAULT_CONFIG_PATH,
    ChunkingConfig,
    Config,
    ConfigError,
    DeepSpeedConfig,
)
from engine.config_load import config_from_dict, config_to_dict, load_config, main
from engine.distributed import derive_ds_config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
TINY = str(DEFAULT_CONFIG_PATH)


def tiny(*overrides: str) -> Config:
    return load_config(TINY, list(overrides))


def error_of(*overrides: str, path: str = TINY, check_paths: bool = True) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides), check_paths=check_paths)
    return str(info.value)


# ------------------------------------------------------------------------------------------ shipped configs


def test_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {
        "tiny-cpu.yaml",
        "llama3-8b-lora-24gb.yaml",
        "spaco-zero2-multigpu.yaml",
        "zero3-offload-multinode.yaml",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_loads_and_derives(path):
    raw = yaml.safe_load(path.read_text())
    # Recipes point at the user's model and data; the default config must run as is.
    user_paths = "name_or_path" in raw["model"] or raw.get("data", {}).get("kind", "synthetic") != "synthetic"
    cfg = load_config(str(path), [], check_paths=not user_paths)
    for world in (1, 4):
        ds = derive_ds_config(cfg, world)
        assert ds["train_batch_size"] == cfg.data.batch_size * world
        assert ds["gradient_accumulation_steps"] == 1
        assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
        assert ds["optimizer"]["params"]["lr"] == cfg.optim.lr
        json.dumps(ds)
    # The dict form is YAML-safe and builds the same config again (checkpoints store it).
    as_dict = config_to_dict(cfg)
    yaml.safe_dump(as_dict)
    assert config_from_dict(as_dict, check_paths=not user_paths) == cfg


def test_tiny_cpu_is_the_default():
    cfg = load_config(None, [])
    assert cfg == tiny()
    assert cfg.model.hf_config["vocab_size"] == 259 and cfg.model.dtype == "float32"
    assert cfg.data.kind == "synthetic" and cfg.data.seq_len == 2048 and cfg.chunking.chunk_size == 256
    assert cfg.deepspeed.zero_stage == 2 and cfg.checkpoint.every == 20
    assert isinstance(cfg.optim.lr, float) and isinstance(cfg.optim.betas, tuple)


def test_recipe_paths_are_checked_unless_disabled():
    recipe = str(ROOT / "configs" / "llama3-8b-lora-24gb.yaml")
    assert "model.name_or_path" in error_of(path=recipe)
    cfg = load_config(recipe, [], check_paths=False)
    assert cfg.lora.enabled and cfg.model.dtype == "bfloat16" and cfg.deepspeed.offload_optimizer


# ------------------------------------------------------------------------------------------------ overrides


def test_overrides_are_parsed_as_yaml():
    cfg = tiny(
        "--optim.lr=1e-4",
        "--lora.enabled=true",
        "--model.hf_config.hidden_size=128",
        "--checkpoint.every=null",
        "--lora.target_modules=[q_proj, v_proj]",
        "--optim.betas=[0.9, 0.95]",
        "--logging.dir=runs/x=y",  # only the first '=' separates key and value
    )
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.lora.enabled is True
    assert cfg.model.hf_config["hidden_size"] == 128 and cfg.model.hf_config["num_hidden_layers"] == 2
    assert cfg.checkpoint.every is None
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.logging.dir == "runs/x=y"


def test_later_override_wins_and_int_is_accepted_for_float():
    cfg = tiny("--optim.lr=1", "--optim.lr=2")
    assert cfg.optim.lr == 2.0 and isinstance(cfg.optim.lr, float)


def test_override_reaches_into_null_dict_field():
    cfg = tiny("--deepspeed.config.zero_optimization.overlap_comm=true")
    assert derive_ds_config(cfg, 1)["zero_optimization"]["overlap_comm"] is True


@pytest.mark.parametrize("bad", ["optim.lr=1", "--optim.lr", "--optim..lr=1", "--=3"])
def test_malformed_override(bad):
    assert "--section.key=value" in error_of(bad)


def test_override_through_a_scalar():
    assert "optim.lr is 0.003, not a mapping" in error_of("--optim.lr.value=1")


# ------------------------------------------------------------------------------------------------- errors


def test_unknown_key_suggests_the_closest():
    msg = error_of("--chunking.chunksize=128")
    assert "'chunking.chunksize'" in msg and "did you mean 'chunking.chunk_size'" in msg.lower()
    assert "mode, chunk_size, sample_prob" in msg  # lists the allowed keys
    assert "did you mean 'optim'" in error_of("--optimizer.lr=1").lower()


def test_unknown_hf_config_key_suggests_the_closest():
    msg = error_of("--model.hf_config.hidden_sizee=64")
    assert "model.hf_config.hidden_sizee" in msg and "model.hf_config.hidden_size'" in msg


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--optim.steps=abc", "optim.steps: expected int, got str 'abc'"),
        ("--optim.steps=true", "optim.steps: expected int, got bool True"),  # bool is not an int
        ("--optim.steps=2.5", "optim.steps: expected int, got float 2.5"),
        ("--optim.lr=fast", "optim.lr: expected float, got str 'fast'"),
        ("--lora.enabled=1", "lora.enabled: expected bool, got int 1"),
        ("--lora.target_modules=q_proj", "lora.target_modules: expected list[str] or one of 'all-linear'"),
        ("--lora.target_modules=[q_proj, 3]", "lora.target_modules[1]: expected str, got int 3"),
        ("--optim.betas=[0.9]", "optim.betas: expected a list of 2 items"),
        ("--optim=3", "optim: expected a mapping of OptimConfig fields, got int 3"),
    ],
)
def test_wrong_type(override, expected):
    assert expected in error_of(override)


def test_bad_literal_names_the_choices():
    msg = error_of("--chunking.mode=sec")
    assert "chunking.mode: must be one of 'seco', 'spaco'" in msg and "did you mean 'seco'" in msg
    assert "one of 0, 1, 2, 3" in error_of("--deepspeed.zero_stage=true")  # True == 1, but not a stage
    assert "one of 0, 1, 2, 3" in error_of("--deepspeed.zero_stage=4")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (
            ["--data.kind=jsonl", "--data.path=/nonexistent/train.jsonl"],
            "data.path: '/nonexistent/train.jsonl' not found",
        ),
        (["--data.tokenizer=/nonexistent/tok"], "data.tokenizer: '/nonexistent/tok' not found"),
        (["--checkpoint.resume=/nonexistent/ckpt"], "checkpoint.resume: '/nonexistent/ckpt' not found"),
        (
            ["--deepspeed.config_file=/nonexistent/ds.json"],
            "deepspeed.config_file: '/nonexistent/ds.json' not found",
        ),
        (
            ["--model.hf_config=null", "--model.name_or_path=/nonexistent/m"],
            "model.name_or_path: '/nonexistent/m' not found",
        ),
    ],
)
def test_missing_file_names_the_key(overrides, expected):
    assert expected in error_of(*overrides)


def test_missing_config_file():
    assert "config file not found" in error_of(path="/nonexistent/x.yaml")


def test_offload_param_needs_stage_3():
    assert "deepspeed.offload_param: needs deepspeed.zero_stage 3" in error_of(
        "--deepspeed.offload_param=true"
    )
    assert tiny("--deepspeed.zero_stage=3", "--deepspeed.offload_param=true").deepspeed.offload_param
    with pytest.raises(ConfigError, match="offload_param"):
        DeepSpeedConfig(zero_stage=2, offload_param=True)  # section checks also run when built by hand


def test_spaco_rules():
    assert "chunking.sample_prob: required" in error_of("--chunking.mode=spaco")
    assert "(0, 1]" in error_of("--chunking.mode=spaco", "--chunking.sample_prob=1.5")
    assert "only used by chunking.mode 'spaco'" in error_of("--chunking.sample_prob=0.5")
    assert "exactly one of chunking.budget" in error_of("--chunking.mode=spaco", "--chunking.sampler=fixed")
    both = [
        "--chunking.mode=spaco",
        "--chunking.sampler=fixed",
        "--chunking.budget=2",
        "--chunking.sample_prob=0.5",
    ]
    assert "exactly one of chunking.budget" in error_of(*both)
    assert tiny(*both[:3]).chunking.budget == 2
    assert tiny(*both[:2], both[3]).chunking.sample_prob == 0.5  # budget = round(q x chunks)
    # 2048 tokens / 256 = 8 chunks: drawing 9 would fail mid-run, so it fails at load time.
    assert "more than the 8 chunks" in error_of(*both[:2], "--chunking.budget=9")
    assert tiny("--chunking.mode=spaco", "--chunking.sample_prob=0.25").chunking.sample_prob == 0.25
    fixed = ChunkingConfig(mode="spaco", sampler="fixed", budget=2, compensation_cap=2)
    assert fixed.budget == 2
    with pytest.raises(ConfigError, match="compensation_cap"):
        ChunkingConfig(mode="spaco", sample_prob=0.5, compensation_cap=0.5)


def test_value_and_cross_section_rules():
    assert "model: set exactly one" in error_of("--model.name_or_path=/m")
    assert "model.hf_config.model_type: required" in error_of("--model.hf_config={hidden_size: 64}")
    assert "did you mean 'llama'" in error_of("--model.hf_config.model_type=lama")
    assert "too small for data.tokenizer 'byte'" in error_of(
        "--model.hf_config.vocab_size=200",
        "--model.hf_config.pad_token_id=0",
        "--model.hf_config.bos_token_id=1",
        "--model.hf_config.eos_token_id=2",
    )
    assert "model.hf_config.pad_token_id: 256 is outside the vocabulary" in error_of(
        "--model.hf_config.vocab_size=100"
    )
    assert "data.kind is 'synthetic'" in error_of("--data.path=x.jsonl")
    assert "optim.warmup_steps" in error_of("--optim.warmup_steps=1000")
    assert "'lora' needs lora.enabled" in error_of("--checkpoint.export=lora")
    assert "checkpoint.every: needs checkpoint.dir" in error_of(
        "--checkpoint.dir=null", "--checkpoint.resume=null"
    )
    assert "data.seq_len: must be >= 2" in error_of("--data.seq_len=1")


# ---------------------------------------------------------------------------------------------- ds_config


def ds_override(ds: dict) -> str:
    return "--deepspeed.config=" + json.dumps(ds)


def test_ds_config_batch_size_contradiction():
    cfg = tiny(ds_override({"train_batch_size": 8}))  # fine for world size 8
    assert derive_ds_config(cfg, 8)["train_batch_size"] == 8
    with pytest.raises(ConfigError) as info:
        derive_ds_config(cfg, 2)
    assert "'train_batch_size' = 8" in str(info.value) and "2" in str(info.value)
    # Can never match when it is not a multiple of the micro batch: caught at load time already.
    assert "not a multiple of data.batch_size = 2" in error_of(
        ds_override({"train_batch_size": 3}), "--data.batch_size=2"
    )


@pytest.mark.parametrize(
    "ds, key, theirs, ours",
    [
        ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, "optimizer.params.lr", "0.1", "0.003"),
        ({"optimizer": {"type": "SGD"}}, "optimizer.type", "'SGD'", "'AdamW'"),
        ({"train_micro_batch_size_per_gpu": 2}, "train_micro_batch_size_per_gpu", "2", "1"),
        ({"gradient_clipping": 0.5}, "gradient_clipping", "0.5", "1.0"),
        ({"bf16": {"enabled": True}}, "bf16.enabled", "True", "False"),
        ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage", "3", "2"),
        ({"scheduler": {"type": "WarmupLR"}}, "scheduler", "'WarmupLR'", "None"),
    ],
)
def test_ds_config_conflict_names_key_and_both_values(ds, key, theirs, ours):
    msg = error_of(ds_override(ds))
    assert f"ds_config key '{key}' = " in msg and theirs in msg and ours in msg


def test_ds_config_agreeing_and_auto_values_are_filled_and_the_rest_passes_through():
    user = {
        "optimizer": {"type": "adamw", "params": {"lr": "auto", "betas": [0.9, 0.999], "torch_adam": True}},
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": False, "loss_scale": 0},
        "train_batch_size": "auto",
        "zero_optimization": {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 123456},
        "comms_logger": {"enabled": True, "verbose": False},
        "communication_data_type": "fp32",
    }
    ds = derive_ds_config(tiny(ds_override(user)), 3)
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 0.003, "betas": [0.9, 0.999], "torch_adam": True, "eps": 1e-8, "weight_decay": 0.0},
    }
    assert ds["bf16"] == {"enabled": False} and ds["fp16"] == {"enabled": False, "loss_scale": 0}
    assert ds["train_batch_size"] == 3 and ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 123456}
    assert ds["comms_logger"] == user["comms_logger"] and ds["communication_data_type"] == "fp32"
    assert "scheduler" not in ds


def test_ds_config_offload_and_precision_from_config():
    cfg = tiny(
        "--model.dtype=bfloat16",
        "--deepspeed.zero_stage=3",
        "--deepspeed.offload_optimizer=true",
        "--deepspeed.offload_param=true",
        "--optim.grad_clip=null",
        ds_override({"zero_optimization": {"offload_param": {"pin_memory": True}}}),
    )
    ds = derive_ds_config(cfg, 1)
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 0.0
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["zero_optimization"]["offload_param"] == {"pin_memory": True, "device": "cpu"}


def test_ds_config_file(tmp_path):
    good = tmp_path / "ds.json"
    good.write_text(
        json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}, "steps_per_print": 7})
    )
    ds = derive_ds_config(tiny(f"--deepspeed.config_file={good}"), 2)
    assert ds["steps_per_print"] == 7 and ds["zero_optimization"]["overlap_comm"] is True
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.5}}}))
    assert "'optimizer.params.weight_decay' = 0.5" in error_of(f"--deepspeed.config_file={bad}")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert "is not valid JSON" in error_of(f"--deepspeed.config_file={broken}")


def test_ds_config_misspelt_zero_key_is_rejected_by_deepspeed_schema():
    assert "overlap_comms" in error_of(ds_override({"zero_optimization": {"overlap_comms": True}}))


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_prints_yaml_and_ds_config(capsys):
    assert main(["--config", TINY, "--optim.lr=1e-3", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    config_part, ds_part = out.split("# ds_config (world size 2):\n")
    assert yaml.safe_load(config_part)["optim"]["lr"] == 1e-3
    assert json.loads(ds_part)["train_batch_size"] == 2


def test_cli_exit_code_2_on_config_error():
    proc = subprocess.run(
        [sys.executable, "-m", "engine.config_load", "--config", TINY, "--optim.lr_rate=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown key 'optim.lr_rate'")
    assert proc.stdout == ""


# ------------------------------------------------------------------------------- accumulation and epochs


def test_grad_accum_steps_from_the_config_or_the_ds_config():
    from engine.distributed import grad_accum_steps

    assert grad_accum_steps(tiny()) == 1
    assert grad_accum_steps(tiny("--optim.grad_accum_steps=3")) == 3
    mapped = tiny(ds_override({"gradient_accumulation_steps": 4}))
    assert mapped.optim.grad_accum_steps is None and grad_accum_steps(mapped) == 4
    assert (
        grad_accum_steps(tiny("--optim.grad_accum_steps=4", ds_override({"gradient_accumulation_steps": 4})))
        == 4
    )
    assert grad_accum_steps(tiny(ds_override({"gradient_accumulation_steps": "auto"}))) == 1
    # DeepSpeed's own accumulation stays 1 (its backward would divide by it); its batch is micro x world, the
    # user's train_batch_size the effective batch (micro x accumulation x world).
    ds = derive_ds_config(
        tiny("--data.batch_size=2", ds_override({"gradient_accumulation_steps": 4, "train_batch_size": 24})),
        3,
    )
    assert ds["gradient_accumulation_steps"] == 1 and ds["train_batch_size"] == 6
    msg = error_of("--optim.grad_accum_steps=2", ds_override({"gradient_accumulation_steps": 4}))
    assert "'gradient_accumulation_steps' = 4" in msg and "optim.grad_accum_steps = 2" in msg
    assert "positive int" in error_of(ds_override({"gradient_accumulation_steps": 0}))
    assert "optim.grad_accum_steps: must be >= 1" in error_of("--optim.grad_accum_steps=0")
    with pytest.raises(ConfigError, match="x optim.grad_accum_steps = 2 x world size 3"):
        derive_ds_config(tiny("--optim.grad_accum_steps=2", ds_override({"train_batch_size": 4})), 3)


def test_steps_or_epochs_exactly_one():
    assert "got both" in error_of("--optim.epochs=2")
    assert "got neither" in error_of("--optim.steps=null")
    assert "optim.epochs: must be > 0" in error_of("--optim.steps=null", "--optim.epochs=0")
    cfg = tiny("--optim.steps=null", "--optim.epochs=1.5", "--optim.warmup_steps=5")
    # 40 micro-batches per epoch and rank, 4 per optimizer step: 10 steps an epoch, 15 in 1.5 epochs
    assert cfg.optim.total_steps(micro_batches_per_epoch=40, grad_accum_steps=4) == 15
    assert cfg.optim.total_steps(micro_batches_per_epoch=30, grad_accum_steps=1) == 45
    # a fraction of a step rounds up; float products do not add a step
    assert cfg.optim.total_steps(micro_batches_per_epoch=41, grad_accum_steps=4) == 16
    assert (
        tiny("--optim.steps=null", "--optim.epochs=0.1", "--optim.warmup_steps=0").optim.total_steps(30, 1)
        == 3
    )
    with pytest.raises(ConfigError, match="optim.warmup_steps: must be in \\[0, 2\\].*optim.epochs = 1.5"):
        cfg.optim.total_steps(micro_batches_per_epoch=4, grad_accum_steps=3)
    assert tiny().optim.total_steps(micro_batches_per_epoch=1, grad_accum_steps=7) == 60


def test_peak_tflops_must_be_positive():
    assert "logging.peak_tflops: must be > 0" in error_of("--logging.peak_tflops=0")
    assert tiny("--logging.peak_tflops=312").logging.peak_tflops == 312.0
