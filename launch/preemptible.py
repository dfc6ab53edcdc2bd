"""Run a training command so that TERM / USR1 / INT (docker stop, scancel, a terminal's Ctrl-C) reach every
rank: each finishes its step, the checkpoint is saved, and this exits 0. See engine/supervise.py for why
DeepSpeed's own launcher needs it and how it works.

    python launch/preemptible.py deepspeed --num_gpus 8 launch/train.py --config configs/x.yaml
    python launch/preemptible.py python launch/train.py --config configs/x.yaml

The Docker image uses it as its entry point (PID 1). Single node: ranks on other nodes (pdsh) are not
reached; under Slurm use srun (one task per rank), where each rank gets the signal itself.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from engine.supervise import supervise  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(supervise(sys.argv[1:]))
