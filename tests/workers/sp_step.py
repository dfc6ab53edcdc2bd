"""One sequence-parallel chunk-wise step per case on a plain torch model, 2+ ranks on gloo; each rank saves
its (group-summed) gradients and stats. Launched by tests/test_sequence_parallel.py as P processes with
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (no torchrun).

Usage: python tests/workers/sp_step.py --out DIR --cases llama,lora,...
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sp_cases import (  # noqa: E402
    CASES,
    PEAKS,
    REFUSALS,
    SCORES,
    SWAPPED,
    run_case,
    score_case,
    spaco_expectation,
    step_peak,
)

from engine import sharded_mixers  # noqa: E402
from engine.sequence_parallel import SequenceGroup  # noqa: E402


def swapped_heads(case):
    """Each rank's heads run on the next rank's slices of the per-head parameters (a wrong shard order)."""
    from types import SimpleNamespace

    right = sharded_mixers._sliced
    sharded_mixers._sliced = lambda module, sliced, group: right(
        module, sliced, SimpleNamespace(size=group.size, rank=(group.rank + 1) % group.size)
    )
    try:
        return run_case(case, group)
    finally:
        sharded_mixers._sliced = right


p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--cases", required=True)
args = p.parse_args()

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
group = SequenceGroup()
for name in args.cases.split(","):
    if name.startswith("spaco_expectation"):  # spaco_expectation or spaco_expectation_uncompensated
        result = spaco_expectation(group, compensate=not name.endswith("uncompensated"))
    elif name in SCORES:
        result = score_case(CASES[SCORES[name]], group)
    elif name in PEAKS:
        result = step_peak(*PEAKS[name], group)
    elif name == SWAPPED:
        result = swapped_heads(CASES["qwen3_next"])
    elif name in REFUSALS:
        try:
            run_case(REFUSALS[name][0], group)
            result = {"error": None}
        except ValueError as e:
            result = {"error": str(e)}
    else:
        result = run_case(CASES[name], group)
    torch.save(result, os.path.join(args.out, f"{name}.{rank}.pt"))
dist.barrier()
dist.destroy_process_group()
