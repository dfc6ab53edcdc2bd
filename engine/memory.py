"""Peak tensor memory of a block of code, on CPU and GPU.

Used to show that chunk-wise training keeps memory bounded by one chunk: wrap a forward/backward in
``MemoryTracker`` and compare ``peak_bytes`` across sequence lengths or chunk sizes.

What is measured:
- CUDA: the caching allocator's own counters (``max_memory_allocated`` minus what was allocated on entry).
  Exact for tensors, blind to allocator reserve/fragmentation and to memory outside PyTorch (cuBLAS
  workspaces, NCCL buffers).
- CPU (and any non-CUDA device): a ``TorchDispatchMode`` sees the output of every aten op, including those
  run by the autograd engine during ``backward()``. Each output storage not seen before (and not an input of
  that op, so views and in-place ops don't count) is added to a live total; a ``weakref.finalize`` on the
  storage subtracts it when the storage dies. ``peak_bytes`` is the maximum of that total.

Limits of the CPU mode: it counts tensor storages only, at op granularity. Not counted are scratch buffers
a kernel allocates and frees inside itself (e.g. fused attention), allocator fragmentation/caching, Python
objects, and tensors that don't come out of an aten op (``torch.from_numpy``, storages created directly).
Storages that were alive before entering are never counted, even if they grow (``resize_``) inside.
For whole-process numbers use ``peak_rss_bytes()`` in a fresh process.
"""

from __future__ import annotations

import resource
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storages(t: torch.Tensor) -> Iterator[torch.UntypedStorage]:
    """The storages backing a tensor (sparse tensors have several, none of their own)."""
    if t.layout == torch.sparse_coo:
        parts: tuple[torch.Tensor, ...] = (t._indices(), t._values())
    elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
        parts = (t.crow_indices(), t.col_indices(), t.values())
    elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
        parts = (t.ccol_indices(), t.row_indices(), t.values())
    else:
        parts = (t,)
    for p in parts:
        try:
            yield p.untyped_storage()
        except (NotImplementedError, RuntimeError):
            pass  # wrapper subclasses etc. have no storage of their own: nothing we can attribute


def _tensor_storages(tree: Any) -> Iterator[torch.UntypedStorage]:
    for x in tree_flatten(tree)[0]:
        if isinstance(x, torch.Tensor):
            yield from _storages(x)
        elif isinstance(x, torch.UntypedStorage):  # e.g. Tensor.set_(storage)
            yield x


class _StorageCounter(TorchDispatchMode):
    """Dispatch mode that reports every newly allocated output storage to the tracker."""

    def __init__(self, tracker: MemoryTracker):
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # lift_fresh returns its input, but that input was just built from Python data by torch.tensor()
        # outside our view: it is a new allocation all the same.
        fresh = func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default)
        inputs = set() if fresh else {id(s) for s in _tensor_storages((args, kwargs))}
        for s in _tensor_storages(out):
            if id(s) not in inputs:
                self.tracker._track(s)
        return out


class MemoryTracker:
    """Context manager measuring peak tensor bytes allocated inside it, beyond what was live on entry.

    >>> with MemoryTracker() as mt:
    ...     loss = model(x).sum(); loss.backward()
    >>> mt.peak_bytes
    """

    def __init__(self, device: torch.device | str | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # CPU mode state. A re-entrant lock because a finalizer can fire on this very thread whenever a
        # storage dies, including while _track holds the lock.
        self._lock = threading.RLock()
        self._live: dict[int, int] = {}  # id(storage) -> nbytes, for tracked storages still alive
        self._current = 0
        self._peak = 0
        self._mode: _StorageCounter | None = None
        # CUDA mode state
        self._entry = 0
        self._cuda_peak: int | None = None  # frozen on exit

    # ---- CPU mode bookkeeping -----------------------------------------------------------------------

    def _track(self, s: torch.UntypedStorage) -> None:
        if s.device.type != self.device.type:
            return  # e.g. meta tensors: no memory behind them
        key = id(s)  # stable while the storage lives: storages keep their Python object (torch >= 2.1)
        with self._lock:
            if key in self._live:
                return  # a view of (or the same) storage we already count
            n = s.nbytes()
            self._live[key] = n
            self._current += n
            self._peak = max(self._peak, self._current)
        # Fires when the C++ storage is freed (last tensor/view gone), not when this Python handle goes.
        f = weakref.finalize(s, self._release, key)
        f.atexit = False  # nothing to report at interpreter shutdown

    def _release(self, key: int) -> None:
        with self._lock:
            self._current -= self._live.pop(key, 0)

    # ---- public API -------------------------------------------------------------------------------

    @property
    def peak_bytes(self) -> int:
        """Peak bytes allocated since entering, beyond what was live on entry."""
        if not self.is_cuda:
            return self._peak
        if self._cuda_peak is not None:
            return self._cuda_peak
        return max(0, torch.cuda.max_memory_allocated(self.device) - self._entry)

    @property
    def current_bytes(self) -> int:
        """Bytes allocated since entering that are still live (CUDA: net change of allocated bytes)."""
        if not self.is_cuda:
            return self._current
        return torch.cuda.memory_allocated(self.device) - self._entry

    def __enter__(self) -> MemoryTracker:
        if self.is_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self._entry = torch.cuda.memory_allocated(self.device)
            self._cuda_peak = None
        else:
            self._mode = _StorageCounter(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.is_cuda:
            self._cuda_peak = max(0, torch.cuda.max_memory_allocated(self.device) - self._entry)
        else:
            assert self._mode is not None
            self._mode.__exit__(*exc)
            self._mode = None
            # Storages still alive keep their finalizers, so current_bytes stays truthful after exit.


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (whole process, never decreases)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS reports bytes, Linux KiB
