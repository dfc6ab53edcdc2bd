"""Train: parse, build, train, close.

    deepspeed --num_gpus 2 launch/train.py --config configs/tiny-cpu.yaml --optim.steps=100
    python launch/train.py --config configs/tiny-cpu.yaml          # one process, no launcher
    python launch/preemptible.py deepspeed --num_gpus 2 launch/train.py ...  # TERM/USR1 reach every rank

Arguments other than --config are overrides `--section.key=value` (values parsed as YAML).
Exit codes: 0 done (or preempted by SIGTERM/SIGUSR1 after saving a checkpoint), 2 a user error (config,
paths, data, tokenizer; reported before anything is written), 1 anything else (including divergence).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from engine import supervise  # noqa: E402
from engine.config import DEFAULT_CONFIG_PATH  # noqa: E402
from engine.config_load import load_config  # noqa: E402


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description="Chunk-wise long-context fine-tuning. Other arguments: --section.key=value overrides.",
        allow_abbrev=False,  # an override such as --conf... must never be taken for --config
    )
    parser.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="YAML run config")
    # The deepspeed launcher appends --local_rank=N; the rank comes from LOCAL_RANK in the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None, faults=None) -> int:
    """`faults` (trainer.Faults) is for tests only (tests/workers/faulty_train.py)."""
    args, overrides = parse(argv)
    try:
        cfg = load_config(args.config, overrides)
        from engine import trainer  # after the config: a typo is reported without the heavy imports

        run = trainer.setup(cfg)
    except (ValueError, OSError) as e:  # ConfigError is a ValueError; missing files are OSErrors
        # Every rank of a node reads the same config and files, so hits the same error: said once per node.
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        return 2
    rank = trainer.dist.get_rank()
    supervise.register(rank, trainer.dist.get_world_size())  # launch/preemptible.py forwards signals to it
    code = _run(trainer, run, faults or trainer.Faults())
    supervise.report(rank, code)
    return code


def _run(trainer, run, faults) -> int:
    try:
        summary = trainer.run_loop(run, faults)
    except (trainer.TrainingDiverged, trainer.checkpoint.SaveFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except trainer.checkpoint.UnsafePath as e:  # a link planted in checkpoint.dir during the run
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        trainer.close(run)
    first, last = summary["first_step"] + 1, summary["last_step"]
    if run.metrics.enabled:
        status = "preempted" if summary["preempted"] else "done"
        print(
            f"{status}: steps {first}..{last}" if first <= last else f"done: already at step {last}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
