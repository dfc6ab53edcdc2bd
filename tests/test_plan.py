"""The planner (engine/plan/): its predictions against measured peaks, and its arithmetic.

What is compared. `MemoryTracker.peak_bytes` (CPU: every live tensor storage allocated inside the block,
beyond what was live on entry) around `chunkwise_backward(model, ids, schedule=ChunkSchedule(chunk_size=C))`
(the whole-chunk loss unless a case names the fused one), for a tiny random Llama
whose weights exist and whose trainable `.grad` tensors are allocated (zeros) before entering, after one
warm-up step (one-time lazy allocations are not the step's). The prediction is `plan(..., backend="local",
device="cpu").step_bytes`: K/V checkpoints + their float32 gradients + the float32 gradient sums
chunkwise_backward keeps for 16-bit parameters + the last chunk's saved activations + the largest backward
transient (cross-entropy of the logits, lm_head backward, one layer's attention backward, an MLP weight
gradient, or the final cast of the sums); with offload_kv, plus `kv_host` (host memory is the same RAM here).
Weights, `.grad` and optimizer states exist before the step and are not part of it.

device="cpu" because the engine differs there: sdpa gets grouped K/V heads (no repeat_kv copies) and KV
offload neither prefetches nor stages its deposit. PEFT keeps adapters in float32 unless the model is cast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from engine import plan as planner
from engine.chunkwise import ChunkOptions, ChunkSchedule, chunkwise_backward
from engine.memory import MemoryTracker
from engine.plan import Breakdown, GiB, ModelShape, longest_sequence, parse_bytes, plan, usable_memory

TOLERANCE = 0.15
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Case:
    name: str
    seq_len: int = 512
    chunk: int = 128
    dtype: str = "float32"
    attn: str = "sdpa"
    lora: tuple | None = None  # (rank, target modules, adapter dtype)
    batch: int = 1
    offload_kv: bool = False
    shape: dict = field(default_factory=dict)  # overrides of the tiny Llama below
    config_cls: str = "LlamaConfig"
    engine: dict = field(default_factory=dict)  # chunkwise_backward's memory options


TINY = dict(layers=2, hidden=128, inter=352, heads=4, kv_heads=2, vocab=1000)
CASES = [
    Case("fp32-gqa-sdpa"),
    Case("fp32-mha-3layers-longer", seq_len=1024, chunk=256, shape=dict(layers=3, kv_heads=4)),
    Case("bf16-full-small-chunks", chunk=64, dtype="bfloat16"),
    Case("bf16-lora-fp32-adapters", dtype="bfloat16", lora=(8, QKVO, "float32")),
    Case(
        "bf16-lora-mlp-wider",
        dtype="bfloat16",
        lora=(8, ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), "bfloat16"),
        shape=dict(hidden=256, inter=688, heads=8),
    ),
    Case("fp32-eager", attn="eager"),
    Case(
        "bf16-eager-lora-mha",
        dtype="bfloat16",
        attn="eager",
        lora=(4, QKVO, "bfloat16"),
        shape=dict(kv_heads=4),
    ),
    Case("fp32-lora-attention-peak", seq_len=1024, chunk=64, lora=(4, QKVO, "float32"), shape=dict(vocab=64)),
    Case("fp32-batch2-mlp-backward-peak", chunk=64, batch=2, shape=dict(vocab=64)),
    Case("fp32-offload-kv-mha", seq_len=1024, chunk=64, offload_kv=True, shape=dict(kv_heads=4, vocab=64)),
    Case("bf16-offload-kv-lora", dtype="bfloat16", lora=(8, QKVO, "bfloat16"), offload_kv=True),
    # Long against the chunk, small vocabulary: the mask-free attention keeps nothing that grows with L but
    # K/V and their gradients (transformers' sdpa kept a [C, L] mask, a third of this peak).
    Case("fp32-sdpa-long-no-mask", seq_len=4096, chunk=256, shape=dict(layers=4, vocab=64)),
    # MoE (tiny Mixtral, 4 experts, top-2): every expert's weights, the router and top-k expert activations
    Case("fp32-moe-mixtral", config_cls="MixtralConfig", shape=dict(num_local_experts=4, num_experts_per_tok=2)),
    Case("bf16-moe-mixtral-lora", dtype="bfloat16", lora=(8, QKVO, "bfloat16"), config_cls="MixtralConfig",
         shape=dict(num_local_experts=4, num_experts_per_tok=2)),
    # hybrid (tiny Qwen3-Next, 3 Gated DeltaNet layers : 1 attention layer): states at chunk boundaries, and
    # what transformers' torch path of the gated delta rule saves
    Case("fp32-hybrid-qwen3-next", config_cls="Qwen3NextConfig", shape=dict(
        layers=4, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
        linear_value_head_dim=32, linear_conv_kernel_dim=4, num_experts=0, mlp_only_layers=[0, 1, 2, 3],
        layer_types=["linear_attention"] * 3 + ["full_attention"])),
    # the memory options: checkpointed chunks, the fused loss, bf16 K/V grads
    Case("fp32-checkpoint-layers", chunk=256, seq_len=1024, shape=dict(layers=4), engine=dict(checkpoint_layers=True)),
    Case("fp32-fused-loss", chunk=256, seq_len=1024, shape=dict(vocab=4000), engine=dict(fused_loss=True, loss_slice=64)),
    Case("bf16-ckpt-fused-bf16-kv-grads", dtype="bfloat16", chunk=256, seq_len=1024, shape=dict(vocab=4000, layers=3),
         engine=dict(checkpoint_layers=True, fused_loss=True, loss_slice=64, kv_grad_dtype="bfloat16")),
]  # fmt: skip


def tiny_llama(case: Case):
    shape = {**TINY, **case.shape}
    torch.manual_seed(0)
    extra = {k: v for k, v in shape.items() if k not in TINY}
    cfg = getattr(transformers, case.config_cls)(
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=shape["vocab"],
        max_position_embeddings=case.seq_len,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=case.attn)
    model = model.to(DTYPES[case.dtype])
    if case.lora is not None:
        rank, targets, adapter_dtype = case.lora
        model = get_peft_model(model, LoraConfig(r=rank, target_modules=list(targets), lora_dropout=0.0))
        if adapter_dtype == case.dtype:
            model = model.to(DTYPES[adapter_dtype])  # else PEFT's float32 adapters stay
    model.train()
    return cfg, model


def measure(case: Case):
    cfg, model = tiny_llama(case)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg.vocab_size, (case.batch, case.seq_len), generator=gen)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    # The whole-chunk loss unless the case names the fused one.
    engine = {"fused_loss": False, **case.engine}
    kw = dict(
        schedule=ChunkSchedule(chunk_size=case.chunk),
        options=ChunkOptions(offload_kv=case.offload_kv, **engine),
    )
    chunkwise_backward(model, ids[:, : 2 * case.chunk], **kw)  # warm-up
    for p in trainable:
        p.grad.zero_()
    with MemoryTracker("cpu") as mt:
        stats = chunkwise_backward(model, ids, **kw)
    rank, targets, adapter_dtype = case.lora or (0, QKVO, None)
    predicted = plan(
        cfg,
        dtype=case.dtype,
        chunk_size=case.chunk,
        seq_len=case.seq_len,
        batch=case.batch,
        attn=case.attn,
        lora_rank=rank,
        lora_targets=targets,
        lora_dtype=adapter_dtype,
        offload_kv=case.offload_kv,
        backend="local",
        device="cpu",
        **engine,
    )
    return mt.peak_bytes, predicted, stats


@pytest.fixture
def one_thread():
    """Memory does not depend on it; time does: on a busy machine one thread is several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_prediction_matches_measured_peak(case, one_thread):
    measured, predicted, stats = measure(case)
    expected = predicted.step_bytes + predicted.kv_host
    err = expected / measured - 1
    print(
        f"{case.name:<32} measured {measured / 2**20:8.3f} MiB  predicted {expected / 2**20:8.3f} MiB"
        f"  error {err:+.1%}  (peak: {predicted.peak_phase})"
    )
    assert abs(err) <= TOLERANCE, (case, measured, predicted)
    # the cache's own count of its buffers (the hybrid's state gradients live in autograd, not in its count)
    if "layer_types" not in case.shape:
        assert predicted.kv + predicted.kv_grads + predicted.kv_host == stats.kv_bytes


# ---------------------------------------------------------------------------------------- arithmetic


def test_llama3_8b_sizes():
    p = plan("llama3-8b", dtype="bfloat16", chunk_size=256, seq_len=16384, lora_rank=8)
    assert p.kv == 2 * GiB  # docs/design.md 4: 128 KiB per token in bf16, 16K tokens -> 2 GiB
    assert p.kv_grads == 2 * GiB  # bfloat16, chunkwise_backward's default for bf16 models
    assert (
        plan("llama3-8b", chunk_size=256, seq_len=16384, lora_rank=8, kv_grad_dtype="float32").kv_grads
        == 4 * GiB
    )
    assert p.params - p.trainable == pytest.approx(8.03e9, rel=0.002)
    assert p.trainable == 32 * 8 * ((4096 + 4096) * 2 + (4096 + 1024) * 2)  # q, o and k, v adapters
    assert p.weights == pytest.approx(2 * p.params, rel=1e-9)
    assert p.total == sum(getattr(p, c) for c in Breakdown.COMPONENTS)
    # eager's GQA copies (4 x KV per layer) and probabilities grow with L; the engine's sdpa keeps nothing
    # that grows with L but K/V and their gradients, like flash-attn.
    flash = plan("llama3-8b", chunk_size=256, seq_len=16384, lora_rank=8, attn="flash_attention_2")
    eager = plan("llama3-8b", chunk_size=256, seq_len=16384, lora_rank=8, attn="eager")
    assert p.activations == flash.activations and p.seq_activations == flash.seq_activations == 0
    assert eager.seq_activations >= 4 * p.kv


def test_zero_partitions_and_offload():
    kw = dict(dtype="bfloat16", chunk_size=512, seq_len=8192)
    s0 = plan("llama2-7b", zero_stage=0, **kw)
    s1 = plan("llama2-7b", zero_stage=1, world_size=8, **kw)
    s2 = plan("llama2-7b", zero_stage=2, world_size=8, **kw)
    s3 = plan("llama2-7b", zero_stage=3, world_size=8, **kw)
    assert s0.optimizer == 12 * s0.trainable  # fp32 master + two moments
    assert s1.optimizer == pytest.approx(s0.optimizer / 8, abs=8)
    assert s1.grads == s0.grads and s2.grads < s1.grads
    assert s3.weights < s2.weights == s0.weights
    off = plan("llama2-7b", zero_stage=3, world_size=8, offload_optimizer=True, offload_param=True, **kw)
    assert off.optimizer == 0 and off.weights < s3.weights and off.host > 0
    # the step's own memory does not depend on how the static state is placed
    assert s0.step_bytes == s3.step_bytes == off.step_bytes


def test_kv_offload():
    kw = dict(chunk_size=256, lora_rank=8, zero_stage=2, offload_optimizer=True, attn="flash_attention_2")
    on = plan("llama3-8b", seq_len=32768, offload_kv=True, **kw)
    off = plan("llama3-8b", seq_len=32768, **kw)
    assert on.kv == on.kv_grads == 0 and on.kv_host == off.kv + off.kv_grads
    assert on.host == off.host + on.kv_host and on.total < off.total
    # With eager the K/V copies repeat_kv makes for GQA stay on the device, offload or not.
    eager = plan("llama3-8b", seq_len=32768, offload_kv=True, **{**kw, "attn": "eager"})
    assert eager.seq_activations >= 4 * off.kv
    # Host memory bounds the sequence once K/V live there.
    free = longest_sequence("llama3-8b", device_memory="80GiB", offload_kv=True, **kw)
    bounded = longest_sequence("llama3-8b", device_memory="80GiB", host_memory="64GiB", offload_kv=True, **kw)
    assert 0 < bounded < free
    assert plan("llama3-8b", seq_len=bounded, offload_kv=True, **kw).host <= 64 * GiB
    assert plan("llama3-8b", seq_len=bounded + 256, offload_kv=True, **kw).host > 64 * GiB


def test_longest_sequence_is_tight():
    for kw in (
        dict(dtype="bfloat16", chunk_size=256, lora_rank=8, zero_stage=2, offload_optimizer=True),
        dict(dtype="bfloat16", chunk_size=1024, attn="flash_attention_2", lora_rank=16),
        dict(dtype="bfloat16", chunk_size=512, zero_stage=3, world_size=8, attn="eager"),
    ):
        n = longest_sequence("llama3-8b", device_memory="80GiB", **kw)
        budget = usable_memory("80GiB")
        assert n > 0 and n % kw["chunk_size"] == 0
        assert plan("llama3-8b", seq_len=n, **kw).total <= budget
        assert plan("llama3-8b", seq_len=n + kw["chunk_size"], **kw).total > budget
    assert longest_sequence("llama3-8b", device_memory="8GiB", chunk_size=256) == 0  # weights alone: 15 GiB


def test_safety_margin_and_sizes():
    assert parse_bytes("24GiB") == parse_bytes("24G") == 24 * GiB
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("512MiB") == 512 << 20 and parse_bytes(7) == 7
    assert usable_memory("24GiB", reserve="1GiB", margin=0.1) == int(23 * GiB * 0.9)
    assert usable_memory("24GiB", reserve=0, margin=0.0) == 24 * GiB
    small = longest_sequence("llama3-8b", device_memory="24GiB", margin=0.2, chunk_size=256, lora_rank=8)
    large = longest_sequence("llama3-8b", device_memory="24GiB", margin=0.0, chunk_size=256, lora_rank=8)
    assert small < large
    for bad in ("lots", "24XB", ""):
        with pytest.raises(ValueError):
            parse_bytes(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(dtype="int8"),
        dict(zero_stage=4),
        dict(offload_param=True, zero_stage=2),
        dict(offload_optimizer=True),
        dict(lora_rank=-1),
        dict(lora_rank=4, lora_targets=("qkv",)),
        dict(attn="flash"),
        dict(chunk_size=0),
        dict(seq_len=0),
        dict(backend="local", zero_stage=2),
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        plan("llama3-8b", **{"chunk_size": 256, "seq_len": 1024, **kwargs})


def test_model_config_sources(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=97)
    as_dict = plan(cfg.to_dict(), chunk_size=16, seq_len=64).total
    assert plan(cfg, chunk_size=16, seq_len=64).total == as_dict
    cfg.save_pretrained(tmp_path)
    name, fields = planner.load_model_config(model=str(tmp_path))
    assert plan(fields, chunk_size=16, seq_len=64).total == as_dict
    with pytest.raises(ValueError):
        plan("no-such-preset", chunk_size=16, seq_len=64)


LLAMA_24GB = [
    "--config",
    "configs/llama3-8b-lora-24gb.yaml",
    "--preset",
    "llama3-8b",
    "--device-memory",
    "24GiB",
]
LLAMA_24GB_KW = dict(
    chunk_size=256,
    lora_rank=8,
    zero_stage=2,
    offload_optimizer=True,
    attn="sdpa",
    fused_loss=True,
)


def test_cli_reads_a_run_config_and_the_launchers_overrides(capsys):
    assert planner.main([*LLAMA_24GB, "--chunk-sizes", "256,512", "--chunking.offload_kv=false"]) == 0
    out = capsys.readouterr().out
    n = longest_sequence("llama3-8b", device_memory="24GiB", **LLAMA_24GB_KW)
    assert f"longest sequence that fits: {n} tokens" in out and "chunk 512" in out
    for row in Breakdown.COMPONENTS + ("total", "peak phase", "step time (s)"):
        assert f"  {row} " in out
    # the same --section.key=value vocabulary as the launcher
    assert planner.main([*LLAMA_24GB, "--model.attn_implementation=sdpa", "--lora.r=16"]) == 0
    out = capsys.readouterr().out
    n = longest_sequence(
        "llama3-8b",
        device_memory="24GiB",
        offload_kv=True,
        **{**LLAMA_24GB_KW, "attn": "sdpa", "lora_rank": 16},
    )
    assert f"longest sequence that fits: {n} tokens" in out and "LoRA r=16" in out
    assert "micro-batches per optimizer step" not in out
    # accumulation: the same memory (one micro-batch at a time), N x the time per optimizer step
    assert (
        planner.main(
            [*LLAMA_24GB, "--model.attn_implementation=sdpa", "--lora.r=16", "--optim.grad_accum_steps=4"]
        )
        == 0
    )
    accum = capsys.readouterr().out
    assert (
        "accum      4 micro-batches per optimizer step: memory as one micro-batch; an optimizer step takes 4 x"
        in accum
    )

    def table(text: str) -> list[str]:  # without the command line and the accumulation line
        return [line for line in text.splitlines() if not line.startswith(("# ", "accum "))]

    assert table(accum) == table(out)
    # the config loader's rules and messages, not the planner's own
    assert planner.main([*LLAMA_24GB, "--deepspeed.offload_param=true"]) == 2
    assert "deepspeed.offload_param: needs deepspeed.zero_stage 3" in capsys.readouterr().err
    assert planner.main([*LLAMA_24GB, "--chunking.chunk_sizee=3"]) == 2
    assert "chunking.chunk_size" in capsys.readouterr().err  # the loader's closest valid key


def test_cli_model_shape_from_the_config(capsys, tmp_path):
    # tiny-cpu.yaml's model.hf_config; no --preset needed
    assert planner.main(["--config", "configs/tiny-cpu.yaml", "--device", "cpu", "--seq-lens", "1K"]) == 0
    assert "hidden 64, 2 layers" in capsys.readouterr().out
    # a model directory that is not here: the error says what to give
    assert planner.main(["--config", "configs/llama3-8b-lora-24gb.yaml"]) == 2
    assert "--preset" in capsys.readouterr().err
    transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4).save_pretrained(
        tmp_path
    )
    rc = planner.main(["--config", "configs/llama3-8b-lora-24gb.yaml", f"--model.name_or_path={tmp_path}"])
    assert rc == 0 and "hidden 64" in capsys.readouterr().out


def test_chunk_size_auto(capsys):
    kw = dict(LLAMA_24GB_KW, chunk_size=1)
    budget = usable_memory("24GiB")

    def fits(chunk: int) -> bool:
        return plan("llama3-8b", seq_len=8192, **{**kw, "chunk_size": chunk}).total <= budget

    largest = planner.choose_chunk_size("llama3-8b", seq_len=8192, device_memory=budget, **kw)
    assert largest >= 128 and fits(largest) and not fits(2 * largest)
    argv = [*LLAMA_24GB, "--chunking.chunk_size=auto", "--chunking.offload_kv=false", "--data.seq_len=8192"]
    assert planner.main(argv) == 0
    out = capsys.readouterr().out
    assert f"-> {largest}" in out and f"chunk {largest} " in out
    fastest = planner.choose_chunk_size(
        "llama3-8b", seq_len=8192, device_memory=budget, prefer="fastest", **kw
    )
    assert fits(fastest)
    with pytest.raises(ValueError, match="prefer"):
        planner.choose_chunk_size("llama3-8b", seq_len=8192, device_memory=budget, prefer="best", **kw)


# ----------------------------------------------------------------------------- the memory options, time


def test_checkpoint_layers_and_fused_loss_shrink_the_chunk():
    kw = dict(
        chunk_size=1024, seq_len=32768, lora_rank=8, zero_stage=2, offload_optimizer=True, fused_loss=False
    )
    fuse = dict(kw, fused_loss=True)
    base = plan("llama3-8b", kv_grad_dtype="float32", **kw)
    ckpt = plan("llama3-8b", checkpoint_layers=True, **kw)
    fused = plan("llama3-8b", **fuse)
    # a checkpointed chunk keeps one hidden state per layer (+ one layer's graph during its backward)
    assert ckpt.activations < base.activations / 4
    # the fused loss never holds more than a slice's float32 logits: the cross-entropy stops being the peak
    assert fused.transient < base.transient / 3 and base.peak_phase == "ce"
    both = plan("llama3-8b", checkpoint_layers=True, **fuse)
    assert both.total < min(ckpt.total, fused.total)
    # and under ZeRO-3 too (the head's weight gathered once per chunk)
    zero3 = dict(kw, zero_stage=3)
    assert plan("llama3-8b", **dict(fuse, zero_stage=3)).transient < plan("llama3-8b", **zero3).transient / 3
    bf16 = plan("llama3-8b", kv_grad_dtype="bfloat16", **kw)
    assert bf16.kv_grads == base.kv_grads // 2 and bf16.kv == base.kv
    # never below the K/V's own dtype: a float32 model keeps float32 K/V gradients
    assert plan("llama3-8b", dtype="float32", kv_grad_dtype="bfloat16", **kw).kv_grads == base.kv_grads


def test_offload_kv_auto_keeps_what_fits_on_the_device():
    kw = dict(chunk_size=1024, lora_rank=8, zero_stage=2, offload_optimizer=True, checkpoint_layers=True,
              fused_loss=True)  # fmt: skip
    budget = usable_memory("24GiB")
    short = plan("llama3-8b", seq_len=8192, offload_kv="auto", device_memory=budget, **kw)
    assert short.kv_host == 0 and short.kv > 0  # everything fits: nothing moves
    long = plan("llama3-8b", seq_len=262144, offload_kv="auto", device_memory=budget, **kw)
    full = plan("llama3-8b", seq_len=262144, offload_kv=True, **kw)
    assert 0 < long.kv_host < full.kv_host and long.total <= budget
    assert long.kv + long.kv_grads + long.kv_host == full.kv_host
    # auto reaches at least as far as all-on-host, and farther than all-on-device
    on_host = longest_sequence("llama3-8b", device_memory="24GiB", host_memory="64GiB", offload_kv=True, **kw)
    auto = longest_sequence("llama3-8b", device_memory="24GiB", host_memory="64GiB", offload_kv="auto", **kw)
    on_device = longest_sequence("llama3-8b", device_memory="24GiB", **kw)
    assert auto > on_host > on_device
    with pytest.raises(ValueError, match="auto"):
        plan("llama3-8b", seq_len=8192, offload_kv="auto", **kw)


def test_step_time():
    kw = dict(chunk_size=1024, lora_rank=8, zero_stage=2, offload_optimizer=True)
    t = planner.predict_time("llama3-8b", seq_len=32768, tflops=100, **kw)
    # SeCO: one forward more than plain backprop (2 forwards + backward); LoRA backward ~ one forward
    forward = 2 * 7.5e9 * 32768 + 4 * 4096 * 32 * 32768**2 / 2  # 2 x weights x tokens + causal attention
    assert 2.5 * forward < t.flops < 4 * forward
    assert planner.predict_time("llama3-8b", seq_len=32768, tflops=50, **kw).compute_s == pytest.approx(
        2 * t.compute_s
    )
    spaco = planner.predict_time("llama3-8b", seq_len=32768, tflops=100, selected=4, **kw)
    assert spaco.flops < 0.5 * t.flops
    ckpt = planner.predict_time("llama3-8b", seq_len=32768, tflops=100, checkpoint_layers=True, **kw)
    assert ckpt.flops > t.flops
    # K/V offload: the prefix comes over the link once per chunk and pass: traffic ~ L^2 / C
    off = [
        planner.predict_time("llama3-8b", seq_len=n, offload_kv=True, **kw).host_bytes for n in (32768, 65536)
    ]
    assert 3.5 < off[1] / off[0] < 4.5 and t.host_bytes < off[0] / 100
    big = planner.predict_time("llama3-8b", seq_len=65536, offload_kv=True, **{**kw, "chunk_size": 4096})
    assert big.host_bytes < off[1] / 3  # longer chunks, fewer prefix copies


def test_hybrid_and_moe_presets():
    nxt = ModelShape.from_config("qwen3-next-80b-a3b")
    assert nxt.linear_layers == 36 and nxt.attn_layers == 12 and nxt.experts == 512 and nxt.top_k == 10
    assert nxt.base_params() == pytest.approx(80e9, rel=0.05)
    assert nxt.base_params(active=True) == pytest.approx(3.9e9, rel=0.25)  # "A3B": ~3B active + embeddings
    kw = dict(chunk_size=1024, lora_rank=8)
    a, b = plan("qwen3-next-80b-a3b", seq_len=65536, **kw), plan("qwen3-next-80b-a3b", seq_len=131072, **kw)
    kv_token = 2 * 12 * nxt.kv_width * 2  # only the 12 attention layers keep K/V
    states = 36 * nxt.state_bytes(2)  # each linear layer's state, once per chunk boundary
    assert b.kv - a.kv == kv_token * 65536 + 64 * states
    assert states == pytest.approx(74 * 2**20, rel=0.01)  # engine/state_cache.py's bytes per boundary (bf16)
    bamba = ModelShape.from_config(transformers.BambaConfig().to_dict())
    assert bamba.linear_layers * bamba.state_bytes(2) == pytest.approx(258 * 2**20, rel=0.01)
    mix = ModelShape.from_config("mixtral-8x7b")
    assert mix.base_params() == pytest.approx(46.7e9, rel=0.02) and mix.base_params(
        active=True
    ) == pytest.approx(12.9e9, rel=0.03)
    dense_like = plan("mixtral-8x7b", seq_len=8192, **kw)
    assert dense_like.weights == pytest.approx(2 * 46.7e9, rel=0.02)
    granite = ModelShape.from_config(transformers.GraniteMoeHybridConfig().to_dict())  # Mamba-2 + MoE
    assert granite.linear_layers == 32 and granite.experts == 8
    assert (
        granite.state_bytes(2) == 4 * 128 * 64 * 256 + 2 * (128 * 64 + 2 * 256) * 4
    )  # float32 SSM + conv state
    with pytest.raises(ValueError, match="cannot size"):
        ModelShape.from_config(dict(model_type="x", hidden_size=8, num_hidden_layers=4, num_attention_heads=2,
                                    vocab_size=9, layer_types=["linear_attention"] * 3 + ["full_attention"]))  # fmt: skip
