"""The single-process reference shared by the DeepSpeed workers and the tests that compare with them."""

import torch
from peft import LoraConfig, get_peft_model
from tiny import packed_positions as tiny_packed_positions
from tiny import tiny_batch, tiny_model

LR = 1e-2


def make_optimizer(name, params):
    # SGD's update is the gradient itself, so it checks scale too; Adam is blind to a uniform gradient scale.
    if name == "sgd":
        return torch.optim.SGD(params, lr=LR)
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def build():
    return tiny_model("LlamaConfig", torch.float32, seed=0)


def lora_wrap(model):
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"])
    )
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def global_batch():
    """Two sequences of different true lengths (37 and 29 tokens): one per rank."""
    return tiny_batch(batch=2, seq=37, pad_from=29, ignore=(5, 9))


# Packed rows for the 2-rank packing case: document lengths per row of global_batch() (row 1 holds 29 real
# tokens, then padding).
PACKED_DOCS = [[10, 15, 12], [20, 9]]


def packed_positions():
    return tiny_packed_positions(PACKED_DOCS, global_batch()[0].shape[1])
