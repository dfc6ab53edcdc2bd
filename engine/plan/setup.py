"""The training setup the planner evaluates (validated on construction), and memory sizes.

Python callers pass these as keywords of `plan`; `python -m engine.plan` builds them from a run config
(`setup_from_config` in engine/plan/cli.py), whose loader has already checked the ZeRO rules. The chunk
options default as engine.options.ChunkOptions does (one default each).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engine.options import ChunkOptions
from engine.plan.shape import LINEARS

GiB = 1 << 30
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
# transformers' attn_implementation names. "sdpa" is what the engine runs for it during a chunk-wise step:
# engine/attention.py's mask-free lower-right causal attention on grouped K/V heads (no [C, L] mask, no
# repeat_kv); "eager" builds the mask, repeats K/V per query head and keeps the probabilities.
ATTN = ("sdpa", "eager", "flash_attention_2")
DEVICES = ("cuda", "cpu")
BACKENDS = ("deepspeed", "local")
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)
_OPTIONS = ChunkOptions()  # the chunk options' defaults: the engine's
DEFAULT_LOSS_SLICE = _OPTIONS.loss_slice  # tokens per slice of the fused chunked cross-entropy


@dataclass(frozen=True)
class Setup:
    """Field meanings: see `engine.plan.plan`."""

    chunk_size: int
    dtype: str = "bfloat16"
    batch: int = 1
    zero_stage: int = 0
    world_size: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False
    lora_rank: int = 0
    lora_targets: tuple[str, ...] = LORA_DEFAULT_TARGETS
    lora_dtype: str | None = None
    attn: str = "sdpa"
    repeat_kv: bool | None = None
    backend: str = "deepspeed"
    offload_kv: bool | str = _OPTIONS.offload_kv  # True, False or "auto" (what does not fit goes to the host)
    device: str = "cuda"
    checkpoint_layers: bool = _OPTIONS.checkpoint_layers
    fused_loss: bool = _OPTIONS.fused_loss
    loss_slice: int = DEFAULT_LOSS_SLICE
    kv_grad_dtype: str | None = None  # None: ChunkOptions' default (never below the K/V dtype)
    kv_device_budget: int | None = (
        _OPTIONS.kv_device_budget
    )  # offload_kv "auto": K/V (+ grads) bytes on device
    sequence: int = 1  # parallel.sequence: ranks sharing one sequence (world_size counts all ranks)
    state_chunk: int | None = (
        None  # where linear layers' states are kept: every state_chunk tokens (chunk_size)
    )

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen dataclass)
        for name in ("dtype", "lora_dtype"):
            value = getattr(self, name) or self.dtype
            if value not in DTYPE_BYTES:
                raise ValueError(f"{name} {value!r} is not one of {list(DTYPE_BYTES)}")
            set_(name, value)
        if self.kv_grad_dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"kv_grad_dtype {self.kv_grad_dtype!r} is not float32 or bfloat16")
        # As the engine: ChunkOptions' default, never below the K/V's own dtype (float32 models keep
        # float32 K/V grads, float64 ones float64, float16 ones float32).
        wanted = self.kv_grad_dtype or _OPTIONS.kv_grad_dtype
        set_(
            "kv_grad_dtype",
            wanted if self.dtype == "bfloat16" else "float64" if self.dtype == "float64" else "float32",
        )
        for name in ("chunk_size", "batch", "world_size", "loss_slice", "sequence"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        # The run config's loader checks these for `--config`; Python callers of plan() get the same rules.
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(
                "offload_param needs zero_stage 3 (DeepSpeed offloads parameters only under ZeRO-3)"
            )
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be an integer >= 0, got {self.lora_rank!r}")
        bad = sorted(set(self.lora_targets) - set(LINEARS))
        if bad:
            raise ValueError(f"lora_targets {bad} are not among {LINEARS}")
        set_("lora_targets", tuple(self.lora_targets) if self.lora_rank else ())
        if self.attn not in ATTN:
            raise ValueError(f"attn {self.attn!r} is not one of {ATTN}")
        if self.device not in DEVICES:
            raise ValueError(f"device {self.device!r} is not one of {DEVICES}")
        if self.repeat_kv is None:  # see `plan`
            set_("repeat_kv", self.attn == "eager")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {BACKENDS}")
        if self.backend == "local" and (self.zero_stage or self.world_size != 1):
            raise ValueError("backend 'local' is one process without ZeRO: zero_stage 0, world_size 1")
        if self.sequence > 1 and (self.chunk_size % self.sequence or self.world_size % self.sequence):
            raise ValueError(
                f"sequence {self.sequence} must divide chunk_size ({self.chunk_size}) and world_size "
                f"({self.world_size})"
            )
        if self.sequence > 1 and self.attn != "sdpa":
            raise ValueError(
                f"sequence {self.sequence}: the engine runs its own attention there; attn 'sdpa'"
            )
        if self.offload_kv not in (True, False, "auto"):
            raise ValueError(f"offload_kv must be true, false or 'auto', got {self.offload_kv!r}")

    def replace(self, **changes) -> Setup:
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        return Setup(**{**fields, **changes})


def usable_memory(device_memory: int | str, reserve: int | str = GiB, margin: float = 0.10) -> int:
    """What the step's tensors may use: device memory minus a fixed reserve (CUDA context, cuBLAS/NCCL
    workspaces) minus a fraction `margin` of the rest (allocator caching and fragmentation)."""
    total, reserve = parse_bytes(device_memory), parse_bytes(reserve)
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    return max(0, int((total - reserve) * (1.0 - margin)))


def parse_bytes(text: int | str) -> int:
    """'24GiB' and '24G' -> 24 * 2**30, '24GB' -> 24 * 10**9, plain numbers are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(([KMGT])(i?)(B?))?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r} (e.g. 24GiB, 80GB, 512MiB)")
    number, unit, binary, suffix_b = float(m[1]), (m[3] or "").upper(), bool(m[4]), bool(m[5])
    if not unit:
        return int(number)
    base = 1024 if binary or not suffix_b else 1000  # "24G" means GiB, as nvidia-smi and torch print
    return int(number * base ** ("KMGT".index(unit) + 1))
