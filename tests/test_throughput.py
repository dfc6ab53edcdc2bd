"""engine/throughput.py: model FLOPs, MFU, the peak, ETA formatting and the start-up summary."""

from __future__ import annotations

import pytest
import torch
from ds_reference import lora_wrap
from tiny import BASE, tiny_model

from engine.throughput import FlopModel, format_duration, mfu, parameter_counts, peak_tflops, summary_lines


def test_model_flops_per_token_and_per_attention_pair():
    model = tiny_model()
    trainable, total = parameter_counts(model)
    embed = model.get_input_embeddings().weight.numel()
    assert trainable == total == sum(p.numel() for p in model.parameters())
    flops = FlopModel(model)
    assert flops.per_token == 6 * (total - embed)  # full fine-tune: 6 x the matmul parameters
    head_dim = BASE["hidden_size"] // BASE["num_attention_heads"]
    assert flops.per_pair == 6 * BASE["num_hidden_layers"] * BASE["num_attention_heads"] * head_dim
    assert flops.step_flops(10, 100) == 10 * flops.per_token + 100 * flops.per_pair
    # LoRA: the frozen weights get no weight gradient (4 x), the adapters 6 x
    lora = lora_wrap(tiny_model(dtype=torch.float32))
    t, n = parameter_counts(lora)
    assert 0 < t < n and FlopModel(lora).per_token == 4 * (n - embed) + 2 * t


def test_mfu_needs_a_peak():
    assert peak_tflops(312.0) == 312.0
    if not torch.cuda.is_available():
        assert peak_tflops(None) is None
    assert mfu(1e12, 1.0, None, 1) is None
    assert mfu(2e12, 2.0, 1.0, 2) == pytest.approx(0.5)  # 1 TFLOP/s achieved over 2 devices of 1 TFLOPS


def test_summary_and_duration():
    lines = summary_lines(
        trainable=1000, total=4000, rows=100, tokens=51200, world=2, micro=1, accum=4, seq_len=1024,
        chunk_size=256, micro_batches_per_epoch=50, total_steps=25,
    )  # fmt: skip
    text = "\n".join(lines)
    assert (
        "1.00K trainable of 4.00K (25.00%)" in text
        and "100 rows of up to 1024 tokens, 51.20K non-padding" in text
    )
    assert "effective batch: 8 rows = data.batch_size 1 x 4 micro-batches x 2 data-parallel ranks" in text
    assert "8.19K token slots (~4.10K non-padding)" in text
    assert "25 optimizer steps, 12.5 per epoch (2 epochs); chunks per row: 4" in text
    assert (
        format_duration(59.6) == "1:00"
        and format_duration(3725) == "1:02:05"
        and format_duration(float("inf")) == "?"
    )


def test_known_cuda_devices_give_their_peak(monkeypatch):
    """Without logging.peak_tflops, a CUDA device's name picks its data-sheet peak (the more specific name
    first: H100 PCIe before H100, L40S and L40 before L4); an unknown device gives no MFU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cases = {
        "NVIDIA H100 80GB HBM3": 989.0,
        "NVIDIA H100 PCIe": 756.0,
        "NVIDIA H200": 989.0,
        "NVIDIA A100-SXM4-80GB": 312.0,
        "NVIDIA L40S": 362.0,
        "NVIDIA L40": 181.0,
        "NVIDIA L4": 121.0,
        "NVIDIA GeForce RTX 3090": 71.0,
        "Tesla T4": None,
    }
    for name, want in cases.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, name=name: name)
        assert peak_tflops(None) == want, name
    assert peak_tflops(50.0) == 50.0  # the configured peak wins over the device's


def test_dataset_tokens_of_every_kind_of_training_set(tmp_path):
    """The start-up summary's token count: the attention masks' sum, for padded, packed, synthetic and SFT
    rows, eval.split's training rows (a Subset) and a mixture's drawn rows."""
    import json
    from pathlib import Path

    from torch.utils.data import Subset

    from engine.config import DataConfig, MixtureSource
    from engine.data import ByteTokenizer, SyntheticDataset, build_dataset, load_tokenizer
    from engine.throughput import dataset_tokens

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "word " * n}) + "\n" for n in (3, 40, 7, 90, 12)))
    tok = ByteTokenizer()
    padded = build_dataset(DataConfig(kind="documents", path=str(docs), seq_len=64, packing=False), tok)
    packed = build_dataset(DataConfig(kind="documents", path=str(docs), seq_len=64), tok)
    sft_dir = Path(__file__).resolve().parent / "data" / "sft"
    sft_cfg = DataConfig(kind="chat", path=str(sft_dir / "chat.jsonl"), tokenizer=str(sft_dir / "tokenizer"))
    sft = build_dataset(sft_cfg, load_tokenizer(str(sft_dir / "tokenizer")))
    mixture = build_dataset(
        DataConfig(kind="documents", seq_len=64, packing=False, mixture=[
            MixtureSource(path=str(docs), weight=1.0), MixtureSource(path=str(docs), weight=3.0)]),
        tok,
    )  # fmt: skip
    sets = [
        padded,
        packed,
        sft,
        SyntheticDataset("kv_recall", 64, 6, 0, tok),
        Subset(padded, [0, 3, 4]),
        mixture,
    ]
    for ds in sets:
        assert dataset_tokens(ds) == sum(int(ds[i]["attention_mask"].sum()) for i in range(len(ds))), ds
    assert dataset_tokens(Subset(padded, [0, 3, 4])) < dataset_tokens(padded)
