"""The single-process reference shared by the DeepSpeed workers and the tests that compare with them."""

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tiny import grads_of, tiny_batch, tiny_model
from tiny import packed_positions as tiny_packed_positions
from tiny_hybrid import tiny_hybrid

LR = 1e-2


def make_optimizer(name, params):
    # SGD's update is the gradient itself, so it checks scale too; Adam is blind to a uniform gradient scale.
    if name == "sgd":
        return torch.optim.SGD(params, lr=LR)
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


# The MoE case: Mixtral with its router load-balancing loss in HF's loss (output_router_logits), coefficient
# large enough that the aux term is a real part of the router's gradient.
MOE = dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5)


def build(model: str = "llama"):
    if model == "moe":
        return tiny_model("MixtralConfig", torch.float32, seed=0, **MOE)
    if model != "llama":  # a hybrid family of tests/tiny_hybrid.py
        return tiny_hybrid(model, torch.float32)
    return tiny_model("LlamaConfig", torch.float32, seed=0)


def moe_reference(model, ids, labels, mask, rows_per_rank: int = 1):
    """Data-parallel convention for the router loss: CE over the global batch (as one process) plus coef x
    the mean over ranks of the aux loss HF computes on each rank's own batch (each row of `ids`, unpadded),
    which is what data-parallel training with HF's per-rank `.loss` averages to. `rows_per_rank` > 1: each
    data-parallel group (a sequence-parallel group) holds that many rows, padded as the batch is."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask).logits
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    groups = ids.shape[0] // rows_per_rank
    for r in range(0, ids.shape[0], rows_per_rank):
        rows = slice(r, r + rows_per_rank)
        n = int(mask[rows].sum(-1).max())
        aux = model(input_ids=ids[rows, :n], attention_mask=mask[rows, :n]).aux_loss
        loss = loss + model.router_aux_loss_coef * aux / groups
    loss.backward()
    grads = grads_of(model)
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


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


# Gradient accumulation: 2 ranks x 2 micro-batches of one sequence each, of uneven true lengths (rank r's
# micro-batch i is row 2 * i + r), the -100 span of tiny_batch in row 0.
ACCUM_LENGTHS = [37, 29, 33, 21]


def accum_batch():
    ids, labels, _ = tiny_batch(batch=4, seq=37, seed=4, pad_from=None, ignore=(5, 9))
    mask = torch.zeros_like(ids)
    for r, n in enumerate(ACCUM_LENGTHS):
        mask[r, :n] = 1
    return ids.masked_fill(mask == 0, 0), labels.masked_fill(mask == 0, -100), mask
