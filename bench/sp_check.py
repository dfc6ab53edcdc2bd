"""The sequence-parallel part of the GPU acceptance command (bench/gpu_check.py): P ranks share one sequence.

P processes (one GPU each with NCCL; with --device cpu, gloo processes: the CPU check of this code) run one
SeCO step of gpu_check's tiny Llama (float32, GQA, batch 2 with right padding, a length P does not divide)
with a SequenceGroup of all P ranks. Rank 0 compares the group's gradient with plain full-sequence backprop
of the same weights in float64 on its device (passes at <= 1e-4 of the gradient's scale, as gpu_check's
float32 exactness) and its K/V bytes with one process's chunk-wise step (1/P of them, padding aside).

    python bench/sp_check.py --device cuda --ranks 2      # 2+ GPUs
    python bench/sp_check.py --device cpu --ranks 2       # gloo on CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
CHUNK = 8


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", HERE / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def worker(device_type: str, out: str) -> None:
    import torch.distributed as dist

    from engine.chunkwise import ChunkSchedule, chunkwise_backward
    from engine.sequence_parallel import SequenceGroup

    gc = _gpu_check()
    cuda = device_type == "cuda"
    rank = int(os.environ["RANK"])
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    batch = gc.tiny_batch(device)
    ids, labels, mask = batch
    model = gc.tiny_model(device, torch.float32, "sdpa")
    group = SequenceGroup()
    stats = chunkwise_backward(
        model,
        ids,
        labels=labels,
        attention_mask=mask,
        schedule=ChunkSchedule(chunk_size=CHUNK),
        sequence_group=group,
    )
    got = gc.flat_grads(model)
    if rank == 0:
        ref = gc.gradient_of(gc.tiny_model(device, torch.float64, "sdpa"), batch, None)
        one = gc.tiny_model(device, torch.float32, "sdpa")
        single = chunkwise_backward(
            one, ids, labels=labels, attention_mask=mask, schedule=ChunkSchedule(chunk_size=CHUNK)
        )
        scale = float(ref.abs().max())
        err = float((got - ref).abs().max()) / scale
        # per token: the sequence is right-padded to a multiple of P
        ratio = (stats.kv_bytes / stats.seq_len) / (single.kv_bytes / single.seq_len)
        p = group.size
        res = dict(
            ranks=p, rel_err=err, kv_ratio=ratio, passed=bool(err <= 1e-4 and abs(ratio - 1 / p) < 1e-9)
        )
        Path(out).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def run(device_type: str, ranks: int, out: Path) -> dict:
    """Start the ranks (RANK / WORLD_SIZE / MASTER_* in their environment) and return rank 0's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(ranks))
    cmd = [sys.executable, __file__, "--worker", "--device", device_type, "--out", str(out)]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs = [
        subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), **pipes) for r in range(ranks)
    ]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    if any(p.returncode for p in procs):
        return {"ranks": ranks, "passed": False, "error": "\n".join(log[-2000:] for log in logs)}
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--worker", action="store_true")
    p.add_argument("--out", default=str(HERE / "results" / ".sp_check.json"))
    a = p.parse_args(argv)
    if a.worker:
        worker(a.device, a.out)
        return 0
    res = run(a.device, a.ranks, Path(a.out))
    print(json.dumps(res))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
