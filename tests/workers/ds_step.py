"""Chunk-wise training steps under the deepspeed launcher, several cases per launch (a launcher start costs
more than a tiny model's step); rank 0 saves each case's result as OUT_DIR/NAME.pt.

Usage: deepspeed --num_gpus 2 tests/workers/ds_step.py --cases cases.json --out-dir DIR
where cases.json maps a case name to its arguments:
       --zero 2 [--offload-optimizer] [--offload-param] [--lora] [--mode seco|spaco] [--optim sgd|adamw]
       [--packed] [--loss-chunks always] [--model llama|moe|nemotron_h] [--memory] [--sp P]
       [--accum N [--no-span] | --and-accum N]
Each case builds its model, DeepSpeed engine and optimizer afresh; the cases of one launch share the process
group and, with --sp, one sequence-parallel mpu (all cases of a launch have the same P).

--accum N: N micro-batches per data-parallel rank in one optimizer step (engine/accumulation.py), on
ds_reference's accum_batch (data-parallel rank d's micro-batch i is row (world / P) x i + d); the result
also holds the number of gradient reductions the step made (`reductions`).
--no-span (negative control): each micro-batch a step of its own (its own step context, its last backward an
accumulation boundary), as chunkwise_backward calls without the trainer's accumulation are.
--and-accum N: the one step, then such an accumulated step on the same engine; its result is under
"accum" (`params` after it), so a case covers accumulation without another launcher start.
"""

import argparse
import contextlib
import json
import os
import sys

import deepspeed
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ds_reference import (  # noqa: E402
    accum_batch,
    build,
    global_batch,
    lora_wrap,
    make_optimizer,
    packed_positions,
)

from engine.accumulation import count_step_tokens, step_context  # noqa: E402
from engine.chunkwise import ChunkOptions, ChunkSchedule, chunkwise_backward  # noqa: E402
from engine.distributed import unlink_shm_comm_buffers  # noqa: E402
from engine.zero3_leaves import mark_moe_blocks_as_leaves  # noqa: E402

CASE = argparse.ArgumentParser()
CASE.add_argument("--zero", type=int, required=True)
CASE.add_argument("--offload-optimizer", action="store_true")
CASE.add_argument("--offload-param", action="store_true")
CASE.add_argument("--lora", action="store_true")
CASE.add_argument("--mode", default="seco")
CASE.add_argument("--optim", default="sgd", choices=["sgd", "adamw"])
CASE.add_argument("--packed", action="store_true")  # documents packed per row (position_ids restart)
CASE.add_argument("--loss-chunks", default="sampled")
CASE.add_argument(
    "--model", default="llama"
)  # llama | moe (Mixtral + router aux loss) | a tiny_hybrid family
CASE.add_argument("--memory", action="store_true")  # checkpoint_layers + fused_loss (2 tokens per slice)
CASE.add_argument("--sp", type=int, default=1)  # ranks per sequence (DeepSpeed's sequence-parallel mpu)
CASE.add_argument("--accum", type=int, default=0)
CASE.add_argument("--no-span", action="store_true")
CASE.add_argument("--and-accum", type=int, default=0)


class Case:
    """One case's DeepSpeed engine over a fresh model, with its chunk schedule and options."""

    def __init__(self, args, mpu, rank: int, world: int):
        self.args, self.rank, self.world = args, rank, world
        model = build(args.model)
        if args.lora:
            model = lora_wrap(model)
        zero = {"stage": args.zero}
        if args.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu"}
        if args.offload_param:
            zero["offload_param"] = {"device": "cpu"}
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": zero,
            "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told otherwise
            "zero_force_ds_cpu_optimizer": False,
            "zero_allow_untested_optimizer": True,  # plain SGD: its update is the gradient
        }
        if args.zero == 3:  # as engine.distributed.initialize does
            mark_moe_blocks_as_leaves(model)
        opt = make_optimizer(args.optim, [p for p in model.parameters() if p.requires_grad])
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config, mpu=mpu)
        kw = {"sample_prob": 1.0, "loss_chunks": args.loss_chunks} if args.mode == "spaco" else {}
        self.schedule = ChunkSchedule(chunk_size=8, mode=args.mode, **kw)
        # --memory: checkpointed chunks and the fused loss; else the whole-chunk loss
        memory = ChunkOptions(checkpoint_layers=True, loss_slice=2)
        self.options = memory if args.memory else ChunkOptions(fused_loss=False)

    def count_reductions(self) -> list[int]:
        """Spy on the ZeRO optimizer's bucket reduction (one call reduces every gradient in its bucket; the tiny
        model fits one bucket): the sizes of the non-empty buckets it reduced. Stage 0: the engine's all-reduce
        of every gradient at an accumulation boundary (one entry per call)."""
        args, engine, seen = self.args, self.engine, []
        if args.zero == 0:
            real_allreduce = engine.buffered_allreduce_fallback

            def spy_allreduce(*a, **k):
                seen.append(sum(1 for p in engine.module.parameters() if p.grad is not None))
                return real_allreduce(*a, **k)

            engine.buffered_allreduce_fallback = spy_allreduce
            return seen
        optimizer = engine.optimizer
        name = (
            "reduce_ipg_grads"
            if args.zero in (1, 2)
            else "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads"
        )
        real = getattr(optimizer, name)

        def spy(*a, **k):
            n = sum(len(b.params) for b in optimizer.ipg_buckets.values())
            if n:
                seen.append(n)
            return real(*a, **k)

        setattr(optimizer, name, spy)
        return seen

    def accumulated_step(self, accum: int) -> dict:
        """`accum` micro-batches per data-parallel rank, their loss tokens counted over all of them and all
        ranks first (the P ranks of a sequence group share their rows)."""
        args, engine, schedule, options = self.args, self.engine, self.schedule, self.options
        ids, labels, mask = accum_batch()
        dp, dp_rank = self.world // args.sp, self.rank // args.sp
        micro = []
        for i in range(accum):
            row = dp * i + dp_rank
            n = int(mask[row].sum())
            micro.append({"input_ids": ids[row : row + 1, :n], "labels": labels[row : row + 1, :n]})
        tokens = count_step_tokens(engine, micro, copies=args.sp)
        reductions = self.count_reductions()
        loss = 0.0
        with contextlib.nullcontext() if args.no_span else step_context(engine):
            for i, b in enumerate(micro):
                stats = chunkwise_backward(
                    engine, **b, schedule=schedule, options=options, num_items_in_batch=tokens.loss_tokens,
                    last_micro_batch=args.no_span or i == accum - 1,
                )  # fmt: skip
                loss += stats.loss
        return {"loss": loss, "tokens": tokens.loss_tokens, "reductions": reductions}

    def one_step(self) -> dict:
        # The ranks of a sequence group share their rows; data-parallel groups split the global batch.
        args, engine, schedule, options = self.args, self.engine, self.schedule, self.options
        dp, dp_rank = self.world // args.sp, self.rank // args.sp
        rows = slice(dp_rank, None, dp)
        ids, labels, mask = (t[rows] for t in global_batch())
        pos = packed_positions()[rows] if args.packed else None
        if ids.shape[0] == 1:
            n = int(mask[0].sum())  # uneven lengths: each rank sees only its own unpadded length
            ids, labels, mask = ids[:, :n], labels[:, :n], mask[:, :n]
            pos = None if pos is None else pos[:, :n]
        stats = chunkwise_backward(
            engine,
            ids,
            labels=labels,
            attention_mask=mask,
            position_ids=pos,
            schedule=schedule,
            options=options,
        )
        return {
            "loss": stats.loss, "tokens": stats.num_tokens, "kv_bytes": stats.kv_bytes,
            "state_bytes": stats.state_bytes,
        }  # fmt: skip

    def weights(self) -> dict[str, torch.Tensor]:
        state = {}
        for name, p in self.engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], enabled=self.args.zero == 3):
                state[name] = p.detach().clone().float()
        return state

    def run(self) -> dict:
        args = self.args
        result = self.accumulated_step(args.accum) if args.accum else self.one_step()
        self.engine.step()
        result["params"] = self.weights()
        if args.and_accum:
            result["accum"] = self.accumulated_step(args.and_accum)
            self.engine.step()
            result["accum"]["params"] = self.weights()
        self.engine.destroy()
        return result


def main() -> None:
    top = argparse.ArgumentParser()
    top.add_argument("--cases", required=True)
    top.add_argument("--out-dir", required=True)
    top.add_argument("--local_rank", type=int, default=0)
    run = top.parse_args()
    with open(run.cases) as f:
        cases = {name: CASE.parse_args(argv) for name, argv in json.load(f).items()}
    deepspeed.init_distributed(dist_backend="gloo")
    unlink_shm_comm_buffers()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sps = {args.sp for args in cases.values()}
    assert len(sps) == 1, f"one sequence-parallel size per launch, got {sps}"
    mpu = None
    if sps != {1}:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu

        mpu.initialize_sequence_parallel(sps.pop())
    for name, args in cases.items():
        result = Case(args, mpu, rank, world).run()
        if rank == 0:
            torch.save(result, os.path.join(run.out_dir, f"{name}.pt"))
    # Leave together and tear the process group down before exit: ZeRO-3's offload threads otherwise race the
    # interpreter's shutdown ("terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # Even so, a rank can still die in the interpreter's teardown after the barrier (exit 250): the results are
    # written and the group is gone, so skip the teardown, where DeepSpeed's native threads meet static
    # destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


main()
