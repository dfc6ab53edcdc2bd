"""A tiny DeepSpeed training loop for checking cluster plumbing without the real trainer.

It behaves like launch/train.py where the launchers care: rank/world from the launcher's environment or from
MPI (DeepSpeed's mpi4py discovery), one JSONL line per step on rank 0 (`{"step", "loss"}`), DeepSpeed
checkpoints with resume from the latest one, and preemption handling (SIGTERM / SIGUSR1: finish the step, save,
exit 0). Each step's data depends only on (step, rank), so an interrupted-and-resumed run must log the same
losses as an uninterrupted one.

  deepspeed --num_gpus 2 scripts/cluster/ds_probe.py --out runs/probe --steps 20
  mpirun -np 2 python scripts/cluster/ds_probe.py --out runs/probe
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import time

import deepspeed
import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--out", required=True, help="directory for metrics.jsonl and ckpt/")
p.add_argument("--steps", type=int, default=10)
p.add_argument("--step-sleep", type=float, default=0.0, help="seconds of fake work per step")
p.add_argument("--save-every", type=int, default=0)
p.add_argument("--timeout", type=float, default=None, help="collective timeout (s); default DeepSpeed's")
p.add_argument("--local_rank", type=int, default=0)  # the deepspeed launcher appends it
args, _ = p.parse_known_args()

stop = {"signal": None}


def on_signal(signum, frame):
    stop["signal"] = signal.Signals(signum).name  # acted on at the end of the current step


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGUSR1, on_signal)

kw = {}
if args.timeout:
    kw["timeout"] = datetime.timedelta(seconds=args.timeout)
    # deepspeed.initialize makes its data-parallel group with dist.new_group(), which takes torch's default
    # timeout (30 min gloo, 10 min nccl) and not init_distributed's: lower that default too.
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = kw["timeout"]
deepspeed.init_distributed(
    dist_backend="gloo", distributed_port=int(os.environ.get("MASTER_PORT", 29500)), **kw
)
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
ds_config = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2},
    "zero_force_ds_cpu_optimizer": False,
}
# A torch optimizer: DeepSpeed's own AdamW would JIT-build another C++ op on CPU (minutes on 2 cores).
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
ckpt = os.path.join(args.out, "ckpt")
os.makedirs(args.out, exist_ok=True)
start = 0
if os.path.isfile(os.path.join(ckpt, "latest")):
    _, client = engine.load_checkpoint(ckpt)
    start = client["step"]
if rank == 0:
    print(f"probe: rank0 of {world} on {socket.gethostname()} starts at step {start}", flush=True)
metrics = open(os.path.join(args.out, "metrics.jsonl"), "a") if rank == 0 else None


def save(step):
    engine.save_checkpoint(ckpt, tag=f"step{step}", client_state={"step": step})


step = start
while step < args.steps:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 16, generator=g)
    y = x.sum(dim=1, keepdim=True).sin()
    loss = torch.nn.functional.mse_loss(engine(x), y)
    engine.backward(loss)
    engine.step()
    step += 1
    total = loss.detach().clone()
    dist.all_reduce(total)
    if metrics:
        metrics.write(json.dumps({"step": step, "loss": total.item() / world}) + "\n")
        metrics.flush()
    time.sleep(args.step_sleep)
    # Every rank must agree to stop at the same step (a signal may reach ranks at different steps).
    flag = torch.tensor([1.0 if stop["signal"] else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() > 0:
        save(step)
        if rank == 0:
            print(f"probe: {stop['signal'] or 'peer signal'}: saved step {step}, exiting 0", flush=True)
        dist.destroy_process_group()
        raise SystemExit(0)
    if args.save_every and step % args.save_every == 0:
        save(step)
save(step)
if rank == 0:
    print(f"probe: done at step {step}", flush=True)
dist.destroy_process_group()
