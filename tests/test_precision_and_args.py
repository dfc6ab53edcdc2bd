"""Mixed precision (bfloat16) error against float64, and clear errors for bad arguments."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import grads_of, reference_grads, rel_error, tiny_batch, tiny_model

from engine.chunkwise import ChunkOptions, ChunkSchedule, chunkwise_backward
from engine.kv_cache import ChunkKVCache


def test_bf16_chunkwise_error_within_1_5x_of_plain_bf16_backprop():
    fp64 = tiny_model("LlamaConfig", torch.float64, seed=3)
    bf16 = copy.deepcopy(fp64).to(torch.bfloat16)
    fp64.load_state_dict(
        {k: v.to(torch.float64) for k, v in bf16.state_dict().items()}
    )  # same rounded weights
    ids, labels, mask = tiny_batch(batch=2, seq=256, pad_from=240, ignore=(10, 30))
    _, exact = reference_grads(fp64, ids, labels, mask)
    _, plain = reference_grads(bf16, ids, labels, mask)
    bf16.zero_grad(set_to_none=True)
    chunkwise_backward(
        bf16, ids, labels=labels, attention_mask=mask, schedule=ChunkSchedule(chunk_size=4)
    )  # 64 chunks
    chunk = grads_of(bf16)
    assert all(g.dtype == torch.bfloat16 for g in chunk.values())
    e_plain, e_chunk = rel_error(plain, exact), rel_error(chunk, exact)
    print(f"bf16 error vs fp64: plain {e_plain:.3e}, chunk-wise {e_chunk:.3e}, ratio {e_chunk / e_plain:.2f}")
    assert e_chunk <= 1.5 * e_plain


def test_kv_gradients_accumulate_in_float32():
    cache = ChunkKVCache(num_layers=1, seq_len=8)
    k = torch.zeros(1, 2, 4, 16, dtype=torch.bfloat16)
    cache.layers[0].update(k, k)
    assert cache.layers[0].k_buf.dtype == torch.bfloat16
    assert cache.layers[0].k_grad.dtype == torch.float32 and cache.layers[0].v_grad.dtype == torch.float32


@pytest.fixture(scope="module")
def model():
    return tiny_model("LlamaConfig", torch.float32)


BAD = [
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": 2.5}, "chunk_size"),
    ({"chunk_size": 4, "mode": "sparse"}, "mode"),
    ({"chunk_size": 4, "mode": "spaco", "sample_prob": 0.5, "sampler": "topk"}, "sampler"),
    ({"chunk_size": 4, "mode": "spaco", "sample_prob": 0.0}, "sample_prob"),
    ({"chunk_size": 4, "mode": "spaco", "sample_prob": 1.5}, "sample_prob"),
    ({"chunk_size": 4, "mode": "spaco"}, "sample_prob"),
    ({"chunk_size": 4, "mode": "spaco", "sampler": "fixed", "budget": 11}, "budget"),
    ({"chunk_size": 4, "mode": "spaco", "sampler": "fixed", "budget": 0}, "budget"),
    ({"chunk_size": 4, "mode": "spaco", "sample_prob": 0.5, "selected": [0, 12]}, "selected"),
    ({"chunk_size": 4, "sample_prob": 0.5}, "sample_prob"),
]


@pytest.mark.parametrize("kwargs,name", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_arguments_name_the_argument(model, kwargs, name):
    ids, labels, mask = tiny_batch()
    with pytest.raises(ValueError, match=name):
        chunkwise_backward(model, ids, labels=labels, attention_mask=mask, schedule=ChunkSchedule(**kwargs))


def test_bad_tensors_name_the_argument(model):
    ids, labels, mask = tiny_batch()
    with pytest.raises(ValueError, match="labels"):
        chunkwise_backward(model, ids, labels=labels[:, :-1], schedule=ChunkSchedule(chunk_size=4))
    with pytest.raises(ValueError, match="attention_mask"):
        chunkwise_backward(model, ids, attention_mask=mask[:1], schedule=ChunkSchedule(chunk_size=4))
    left = torch.ones_like(mask)
    left[1, :3] = 0
    with pytest.raises(ValueError, match="attention_mask: only right padding"):
        chunkwise_backward(model, ids, attention_mask=left, schedule=ChunkSchedule(chunk_size=4))
    with pytest.raises(ValueError, match="input_ids"):
        chunkwise_backward(model, ids.float(), schedule=ChunkSchedule(chunk_size=4))
    with pytest.raises(ValueError, match="input_ids"):
        chunkwise_backward(model, ids[:, :1], schedule=ChunkSchedule(chunk_size=4))


def test_the_chunking_is_a_schedule_and_the_options_chunk_options(model):
    """No loose chunking keywords: schedule= and options= are the only way in, and each is its dataclass."""
    ids, labels, mask = tiny_batch()
    with pytest.raises(TypeError, match="chunk_size"):
        chunkwise_backward(model, ids, chunk_size=4)
    with pytest.raises(TypeError, match="fused_loss"):
        chunkwise_backward(model, ids, schedule=ChunkSchedule(chunk_size=4), fused_loss=False)
    with pytest.raises(ValueError, match="schedule: expected"):
        chunkwise_backward(model, ids, schedule={"chunk_size": 4})
    with pytest.raises(ValueError, match="options: expected"):
        chunkwise_backward(model, ids, schedule=ChunkSchedule(chunk_size=4), options={"fused_loss": False})
    with pytest.raises(ValueError, match="loss_slice"):
        ChunkOptions(loss_slice=0)
    with pytest.raises(ValueError, match="offload_kv"):
        ChunkOptions(offload_kv="host")
