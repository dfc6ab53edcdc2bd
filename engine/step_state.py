"""State a chunk-wise step keeps across its two passes besides the K/V: the RNG each chunk's pass-1
forward saw (replayed for its recompute, so dropout masks match), and 16-bit parameters' gradients
accumulated in float32 across chunks."""

from __future__ import annotations

import torch


class RngReplay:
    """Saves the RNG before each chunk's pass-1 forward and replays it for the recompute (dropout)."""

    def __init__(self, device: torch.device, active: bool):
        self.cuda = device.type == "cuda"
        self.device = device
        self.active, self.states = active, {}

    def save(self, key) -> None:
        if self.active:
            cuda_state = torch.cuda.get_rng_state(self.device) if self.cuda else None
            self.states[key] = (torch.get_rng_state(), cuda_state)

    def restore(self, key) -> None:
        if self.active:
            cpu_state, cuda_state = self.states[key]
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state(cuda_state, self.device)


class Fp32GradAccumulation:
    """Accumulate 16-bit parameters' gradients across chunks in float32, rounding once at the end.

    Plain backprop rounds each weight gradient once; adding k chunk contributions in bf16 rounds k times
    (1.7x the error of plain backprop: docs/design.md 4b). Under DeepSpeed its fp32 accumulation does this.
    """

    def __init__(self, params: list[torch.Tensor], enabled: bool):
        low = (torch.float16, torch.bfloat16)
        self.params = [p for p in params if p.dtype in low] if enabled else []
        self.acc, self.handles = {}, []

    def __enter__(self):
        for p in self.params:
            self.acc[p] = torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float()
            p.grad = None
            self.handles.append(p.register_post_accumulate_grad_hook(self._take))
        return self

    def _take(self, p: torch.Tensor) -> None:
        self.acc[p].add_(p.grad)
        p.grad = None

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        for p in self.params:
            p.grad = self.acc.pop(p).to(p.dtype)
