"""launch/train.py with faults injected through trainer.Faults (the engine reads no test-only environment).

Usage: python tests/workers/faulty_train.py [--nan-steps=2,3] [--no-loss-steps=3] [--crash-in-save=6]
       [--enospc-in-save=STEP] [--rank-only=R] [--enospc-in-log=STEP] TRAIN_ARGS...
       (also under the deepspeed launcher, in place of launch/train.py)

--nan-steps       steps whose logits are multiplied by NaN (a divergence)
--crash-in-save   the step whose save raises once its files are written and before it is committed
--enospc-in-save  the step whose checkpoint files fail to write with OSError(ENOSPC), as on a full disk
--rank-only       apply the write fault on this rank only (default: every rank)
--enospc-in-log   from this step on, writing the metrics file fails with OSError(ENOSPC)
--no-loss-steps   steps whose batch has every label ignored (-100): no loss token anywhere
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from one_rank import launcher  # noqa: E402

from engine import trainer  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--nan-steps", default="")
    p.add_argument("--crash-in-save", type=int, default=None)
    p.add_argument("--enospc-in-save", type=int, default=None)
    p.add_argument("--rank-only", type=int, default=None)
    p.add_argument("--enospc-in-log", type=int, default=None)
    p.add_argument("--no-loss-steps", default="")
    args, rest = p.parse_known_args()
    write = None
    if args.enospc_in_save is not None:
        import torch

        def write(obj, path: str) -> None:
            rank = int(os.environ.get("RANK", 0))
            if f"global_step{args.enospc_in_save}" in path and args.rank_only in (None, rank):
                with open(path, "wb") as f:  # a partly written file, as a full disk leaves it
                    f.write(b"PK\x03\x04")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
            torch.save(obj, path)

    faults = trainer.Faults(
        nan_steps=frozenset(int(s) for s in args.nan_steps.split(",") if s.strip()),
        crash_in_save=args.crash_in_save,
        write=write,
        log_full_from=args.enospc_in_log,
        no_loss_steps=frozenset(int(s) for s in args.no_loss_steps.split(",") if s.strip()),
    )
    return launcher().main(rest, faults)


if __name__ == "__main__":
    sys.exit(main())
