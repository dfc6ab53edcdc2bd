"""Loading checkpoint files without ever running code from them.

A `.pt` file is a pickle: loaded with torch.load(weights_only=False), as DeepSpeed's TorchCheckpointEngine
does, a crafted file in a checkpoint directory runs arbitrary code on `resume: auto`. Every checkpoint file
this engine reads goes through `load_file` instead: torch's weights-only unpickler, which rebuilds tensors
and plain Python values only, plus the four DeepSpeed types its ZeRO optimizer states hold (`DEEPSPEED_TYPES`),
allowed for the duration of one load only (torch.serialization.safe_globals is a context, not a
process-wide registration). DeepSpeed's own loader is routed through it by `deepspeed_loads_safely`, which
swaps the engine's checkpoint engine for the duration of engine.load_checkpoint.

Failures become `CheckpointError` (a ValueError: the launcher reports it and exits 2) naming the file and
what is wrong: a refused type, or a truncated / corrupt / non-checkpoint file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: refused content, truncated, corrupt, or the wrong run.
    `reason`: what is wrong with the file, without the file's name or advice (for callers that name it in
    their own words)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = message if reason is None else reason


def _deepspeed_types() -> list[type]:
    # Imported lazily: the module must be usable (and its errors testable) without DeepSpeed's import cost.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # ZeRO 1-3 optimizer states: the loss scaler object, the stage as an enum, the fragment map's named tuples.
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


# torch's weights-only refusal names the offending global or opcode in one line of a long message.
_UNSUPPORTED = re.compile(r"Unsupported [^\n]{1,200}?(?= was not an allowed|\n|$)")


def load_file(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """torch.load(weights_only=True) with DeepSpeed's optimizer-state types allowed for this call only."""
    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # checked before opening: a named pipe would block
            raise ValueError("not a regular file (a named pipe, socket or device?)")
        _check_format(path)
        with torch.serialization.safe_globals(_deepspeed_types()):
            # mmap needs the zip format; the legacy one (ds_config checkpoint_serialization: false) loads whole
            mmap = mmap and zipfile.is_zipfile(path)
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = _UNSUPPORTED.search(str(e))
        what = found.group(0) if found else str(e).strip().splitlines()[0][:200]
        reason = (
            "refused: it holds something other than tensors, plain values and DeepSpeed's optimizer-state "
            f"types ({what})"
        )
        advice = (
            "loading it could run code, so it is not loaded. Only resume from checkpoints this engine wrote"
        )
        raise _unusable(path, reason, advice) from None
    except FileNotFoundError:
        raise _unusable(path, "is missing") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as e:
        # torch's zip reader raises RuntimeError for a truncated or non-zip file, pickle EOFError / others for a
        # damaged record; either way the file cannot be used, and the message says which one it is.
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        reason = f"is truncated or corrupt ({type(e).__name__}: {first})"
        advice = "resume from an older checkpoint (checkpoint.resume=PATH/global_stepN) or delete this one"
        raise _unusable(path, reason, advice) from None


def _unusable(path: Path, reason: str, advice: str = "") -> CheckpointError:
    message = f"checkpoint file {str(path)!r} {reason}" + (f"; {advice}" if advice else "")
    return CheckpointError(message, reason)


def _check_format(path: Path) -> None:
    """torch.save writes a zip archive (DeepSpeed's default too) or, in its legacy format, a pickle starting
    with the PROTO opcode; anything else (an empty or cut-off file, text, parquet ...) is not a checkpoint."""
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as f:
        head = f.read(1)
    if head != b"\x80":
        raise ValueError(
            "not a torch checkpoint: neither a zip archive nor a pickle" + (" (empty)" if not head else "")
        )


class _SafeLoads:
    """DeepSpeed's checkpoint engine with its `load` replaced by `load_file`; everything else delegated."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_file(path, map_location=map_location)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@contextlib.contextmanager
def deepspeed_loads_safely(engine: Any) -> Iterator[None]:
    """Within the block, every file engine.load_checkpoint reads (model states, ZeRO optimizer shards; all
    go through engine.checkpoint_engine.load in DeepSpeed's non-universal path) is loaded by `load_file`."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _SafeLoads(inner)
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
