"""The run configuration's schema: one dataclass per section, a docstring per field.

Every section is its own dataclass so each part of the engine takes only its slice (the chunking code gets a
``ChunkingConfig``, the data code a ``DataConfig``). Each section's ``__post_init__`` checks its values and the
rules between its own fields (``Config``'s the rules between sections); these also run when a section is
built by hand. This module imports only the standard library: reading YAML and ``--section.key=value``
overrides, the typed coercion and the checks that need transformers or the file system live in
``engine/config_load.py``; the ds_config derivation in ``engine/distributed/ds_config.py``.

The docstring under each field is its documentation: docs/configuration.md's table is generated from
them (``python -m engine.config_doc --write``; ``tests/test_config_doc.py`` fails when the two drift).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.options import check_options
from engine.schedule import check_budget, check_chunking

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "configs" / "tiny-cpu.yaml"

# engine/data's ByteTokenizer: ids 0..255 are bytes, then pad, bos, eos (256, 257, 258). Not imported
# from there because that package pulls in torch, and validating a config should not.
BYTE_VOCAB_SIZE = 259


class ConfigError(ValueError):
    """A user error in the configuration (file, overrides or ds_config)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _expand(path: str | None) -> str | None:
    # Tildes inside `--data.path=~/x` are not expanded by the shell (only at the start of a word).
    return None if path is None else os.path.expanduser(path)


# --------------------------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    name_or_path: str | None = None
    """A local HF model directory, or a hub id (owner/name) loaded through the local HF cache, downloaded
    unless HF_HUB_OFFLINE is set (exactly one of this and `hf_config`)."""

    hf_config: dict[str, Any] | None = None
    """`AutoConfig.for_model` kwargs for a random init (`model_type` required)."""

    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "bfloat16"
    """Weights and compute dtype."""

    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    """transformers' attention kernel (flash_attention_2 on GPU: docs/memory-and-planner.md)."""

    trust_remote_code: bool = False
    """Let transformers run the model directory's own modelling code."""

    router_aux_loss: bool | None = None
    """MoE: train on HF's `.loss` with the router load-balancing loss (sets the model config's
    `output_router_logits`; its `router_aux_loss_coef` weights it); null keeps the model config's setting."""

    def __post_init__(self):
        _require(
            (self.name_or_path is None) != (self.hf_config is None),
            "model: set exactly one of model.name_or_path (a local HF model directory) "
            "and model.hf_config (AutoConfig kwargs for a random init)",
        )
        if self.hf_config is not None:
            _require(
                isinstance(self.hf_config.get("model_type"), str),
                "model.hf_config.model_type: required (a string such as 'llama'): "
                "AutoConfig.for_model needs it to pick the config class",
            )
        self.name_or_path = _expand(self.name_or_path)


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train PEFT LoRA adapters instead of the full model."""

    r: int = 8
    """LoRA rank."""

    alpha: int = 16
    """LoRA scaling numerator (the update is scaled by alpha / r)."""

    dropout: float = 0.0
    """Dropout on the LoRA input, in [0, 1)."""

    target_modules: list[str] | Literal["all-linear"] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Names of the linear layers that get adapters, or all-linear (PEFT's shorthand: every linear layer but
    the output head)."""

    def __post_init__(self):
        _require(self.r >= 1, f"lora.r: must be >= 1, got {self.r}")
        _require(self.alpha >= 1, f"lora.alpha: must be >= 1, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, f"lora.dropout: must be in [0, 1), got {self.dropout}")
        _require(
            self.target_modules == "all-linear"
            or (isinstance(self.target_modules, list) and len(self.target_modules) > 0),
            f"lora.target_modules: must name at least one module, or be 'all-linear'; got {self.target_modules!r}",
        )


@dataclass
class MixtureSource:
    path: str
    """A file, directory, save_to_disk directory or hub dataset id, as `data.path`."""

    weight: float = 1.0
    """Relative share of the mixture's rows (> 0)."""

    format: Literal["auto", "jsonl", "json", "parquet", "csv", "text", "arrow"] | None = None
    """How its files are stored; null: `data.format`."""

    chat_format: Literal["messages", "sharegpt"] | None = None
    """data.kind chat: how its conversations are laid out (`messages` or `sharegpt`, as `data.chat_format`),
    so one mixture can hold both; null: `data.chat_format`."""

    def __post_init__(self):
        _require(bool(self.path), "data.mixture[].path: must not be empty")
        _require(
            math.isfinite(self.weight) and self.weight > 0,
            f"data.mixture[].weight: must be > 0, got {self.weight} (for {self.path!r})",
        )
        self.path = _expand(self.path)


@dataclass
class DataConfig:
    kind: Literal["synthetic", "documents", "jsonl", "parquet", "text", "chat", "prompt_completion"] = (
        "synthetic"
    )
    """What the records are. documents: raw text, one document per record (`text_field`), stored as
    `format` says; jsonl / parquet / text: documents stored in that format (text: one document per file);
    chat: conversations rendered by the tokenizer's chat template, loss on assistant turns only (see
    `chat_format`); prompt_completion: records with a prompt and a completion, loss on the completion only."""

    path: str | None = None
    """A file, a directory of files (a hub-style layout such as data/train-00000-of-00002.parquet reads the
    train split), a `datasets` save_to_disk directory, or a hub dataset id (read through the local HF cache).
    Required unless `kind` is synthetic or `mixture` is set."""

    format: Literal["auto", "jsonl", "json", "parquet", "csv", "text", "arrow"] = "auto"
    """How the files are stored (any kind but synthetic; jsonl / parquet / text kinds imply theirs). auto:
    from each file's extension (.jsonl .json .parquet .csv .txt .md .arrow)."""

    mixture: list[MixtureSource] | None = None
    """Several datasets of this `kind`, instead of `path`: a list of {path, weight, format, chat_format}. Every row of
    every dataset is rendered; the mixture has as many rows as they together, each drawn from dataset i with
    probability weight_i / sum(weights) (from `seed`, deterministic), reusing a dataset's rows in a fixed
    shuffled order when it is drawn more often than it has rows."""

    text_field: str = "text"
    """Documents: the record field (column) holding the text (text files are one document each)."""

    tokenizer: str = "byte"
    """`byte` (259 ids, no download), a local tokenizer directory, or a hub id (as model.name_or_path)."""

    seq_len: int = 2048
    """Tokens per sequence."""

    packing: bool = True
    """Concatenate documents into full `seq_len` rows, with document boundaries: `position_ids` restart per
    document, so documents never attend to each other (chat / prompt_completion: whole samples share a
    row); false: one document per row, right-padded."""

    pad_to: Literal["longest", "seq_len"] = "longest"
    """Rows with padding (packing false, or SFT rows not filled): longest pads a batch only to its longest row
    (fewer chunks run; the same gradient); seq_len pads every batch to `seq_len`. With chunking.budget a
    batch keeps at least budget x chunk_size tokens."""

    group_by_length: bool = False
    """Batch rows of similar lengths together (sorted within windows of 64 steps' rows, the windows still
    shuffled), so that pad_to longest saves more; every epoch still covers every row."""

    messages_field: str | None = None
    """chat: the record field holding the conversation; null: `messages` (chat_format messages) or
    `conversations` (sharegpt)."""

    chat_format: Literal["messages", "sharegpt"] = "messages"
    """chat: messages: a list of {role, content} with roles system / user / assistant / tool; sharegpt: a list
    of {from, value} with from human / gpt / system / tool (mapped to user / assistant / system / tool)."""

    chat_keys: dict[str, str] | None = None
    """chat: the message keys holding the role and the content, {role: KEY, content: KEY}, when they differ
    from the `chat_format`'s."""

    chat_roles: dict[str, str] | None = None
    """chat: role names of the data mapped to system / user / assistant / tool (e.g. {bot: assistant}), on
    top of the `chat_format`'s own mapping."""

    prompt_field: str = "prompt"
    """prompt_completion: the record field holding the prompt."""

    completion_field: str = "completion"
    """prompt_completion: the record field holding the completion (the loss-bearing part)."""

    assistant_loss: Literal["all", "last", "per_turn"] = "all"
    """chat: loss on every assistant turn, or on the last one only; per_turn: one sample per assistant turn
    (the conversation up to it, loss on it), for templates that render earlier turns differently from the
    last (Qwen3-style), with which `all` is refused."""

    chat_template: str | None = None
    """chat: a Jinja chat template (a file, or the template text itself) used instead of the tokenizer's;
    one with {% generation %} markers gives the loss mask directly."""

    truncation: Literal["split", "left", "drop", "error"] | None = None
    """A row's worth of tokens exceeded (counted in the start-up and `python -m engine.data` summaries).
    Documents without packing: split (the default: several rows, every token trained on), drop (skip the
    document) or error. chat / prompt_completion: left (the default: drop the oldest tokens, keep the answer;
    a sample whose last answer alone exceeds `seq_len` is an error), drop or error. Packed documents are
    never cut short, but the tokens after the last full row are dropped and counted."""

    batch_size: int = 1
    """Micro batch per data-parallel rank."""

    num_samples: int = 1000
    """Synthetic only: number of sequences."""

    synthetic_task: Literal["kv_recall", "passkey"] = "kv_recall"
    """Synthetic only: key-value recall or passkey retrieval."""

    seed: int = 0
    """Synthetic data and the shuffling of the stream."""

    def __post_init__(self):
        _require(
            self.seq_len >= 2, f"data.seq_len: must be >= 2 (one input and one target), got {self.seq_len}"
        )
        _require(self.batch_size >= 1, f"data.batch_size: must be >= 1, got {self.batch_size}")
        _require(self.num_samples >= 1, f"data.num_samples: must be >= 1, got {self.num_samples}")
        _require(self.seed >= 0, f"data.seed: must be >= 0, got {self.seed}")
        _require(bool(self.text_field), "data.text_field: must not be empty")
        _require(bool(self.tokenizer), "data.tokenizer: must be 'byte' or a tokenizer directory")
        _require(
            self.kind != "chat" or self.tokenizer != "byte",
            "data.tokenizer: data.kind 'chat' needs a local tokenizer directory with a chat template "
            "(the byte tokenizer has none)",
        )
        _require(
            self.chat_template is None or self.kind == "chat",
            f"data.chat_template: applies to data.kind chat only (data.kind is {self.kind!r})",
        )
        self._check_sources_and_policies()
        if self.kind == "synthetic":
            # data.kind defaults to synthetic: a path here almost always means a forgotten data.kind.
            _require(
                self.path is None,
                f"data.path: set to {self.path!r} but data.kind is 'synthetic', which reads no file; "
                "set data.kind to jsonl, parquet, text, chat or prompt_completion (or data.path to null)",
            )
        else:
            _require(
                self.path is not None or self.mixture is not None,
                f"data.path: required for data.kind {self.kind!r} (or data.mixture)",
            )
            _require(
                self.path is None or self.mixture is None, "data: set only one of data.path and data.mixture"
            )
        self.path = _expand(self.path)
        if self.tokenizer != "byte":
            self.tokenizer = _expand(self.tokenizer)

    def _check_sources_and_policies(self) -> None:
        """data.format / mixture / truncation / chat mapping against data.kind (resolves truncation's default)."""
        documents = self.kind in ("documents", "jsonl", "parquet", "text")
        sft = self.kind in ("chat", "prompt_completion")
        formats = [("data.format", self.format)] + [
            (f"data.mixture[{i}].format", m.format) for i, m in enumerate(self.mixture or []) if m.format
        ]
        for key, fmt in formats:
            _require(
                self.kind not in ("jsonl", "parquet", "text") or fmt in ("auto", self.kind),
                f"{key}: {fmt!r} contradicts data.kind {self.kind!r} (which implies its format); "
                "use data.kind documents to choose the format",
            )
            _require(
                not sft or fmt != "text",
                f"{key}: 'text' holds plain documents, not data.kind {self.kind!r} records; use jsonl, json, "
                "parquet, csv or arrow",
            )
        _require(
            self.chat_format == "messages" or self.kind == "chat",
            f"data.chat_format: {self.chat_format!r} applies to data.kind chat only",
        )
        for i, m in enumerate(self.mixture or []):
            _require(
                m.chat_format is None or self.kind == "chat",
                f"data.mixture[{i}].chat_format: {m.chat_format!r} applies to data.kind chat only",
            )
        _require(
            self.mixture is None or self.kind != "synthetic",
            "data.mixture: needs a file data.kind (documents, jsonl, parquet, text, chat or prompt_completion)",
        )
        _require(
            self.mixture is None or len(self.mixture) >= 1, "data.mixture: must list at least one dataset"
        )
        allowed = ("split", "drop", "error") if documents else ("left", "drop", "error")
        if self.truncation is None and (documents or sft):
            self.truncation = allowed[0]
        _require(
            self.truncation is None or self.truncation in allowed or not (documents or sft),
            f"data.truncation: {self.truncation!r} does not apply to data.kind {self.kind!r}; "
            f"use one of {', '.join(allowed)}",
        )
        for key, mapping, values in (
            ("chat_keys", self.chat_keys, None),
            ("chat_roles", self.chat_roles, ("system", "user", "assistant", "tool")),
        ):
            if mapping is None:
                continue
            _require(self.kind == "chat", f"data.{key}: applies to data.kind chat only")
            if values is None:
                bad = sorted(set(mapping) - {"role", "content"})
                _require(not bad, f"data.chat_keys: unknown {bad}; allowed keys: role, content")
            else:
                bad = sorted(v for v in mapping.values() if v not in values)
                _require(not bad, f"data.chat_roles: {bad} not among {', '.join(values)}")


@dataclass
class ChunkingConfig:
    mode: Literal["seco", "spaco"] = "seco"
    """seco: the exact gradient; spaco: an unbiased sampled estimate."""

    chunk_size: int | Literal["auto"] = 256
    """Tokens per chunk. auto: the planner's choice at start-up (engine/plan), the largest of 128, 256, ...
    (up to data.seq_len) whose step fits in this device's memory (the host's on CPU), printed."""

    sample_prob: float | None = None
    """spaco: probability q that a chunk is back-propagated (sampler fixed: t = round(q x chunks))."""

    sampler: Literal["bernoulli", "fixed"] = "bernoulli"
    """bernoulli (unbiased) or fixed: the paper's t-of-k draw (biased: docs/design.md section 3)."""

    budget: int | None = None
    """spaco with sampler fixed: chunks drawn per step (t)."""

    compensation_cap: float | None = None
    """spaco: upper bound on the weight 1/q or k/t (trades bias for variance)."""

    loss_chunks: Literal["sampled", "always"] = "sampled"
    """spaco with sampler bernoulli: always back-propagates every chunk holding loss tokens (q = 1) and
    samples only the others with sample_prob (the SFT policy: the answer always trains); sampled treats all
    chunks alike."""

    offload_kv: bool | Literal["auto"] = False
    """K/V and K/V grads in pinned host memory. true: all of them (device memory stays flat); auto: the layers
    that fit in kv_device_budget stay on the device, only the rest go to the host."""

    kv_device_budget: int | None = None
    """offload_kv auto: bytes of device memory the K/V and K/V grads may take (null: on CUDA, what is free when
    the first layer is placed, less 20% of the device's total)."""

    kv_grad_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """What K/V gradients accumulate in, never below the K/V's own dtype: it matters for bf16 models only
    (float32 and float64 models keep float32 / float64 K/V gradients, float16 ones float32). bfloat16 measured
    as accurate as float32 against plain bf16 backprop at 64 chunks (docs/memory-and-planner.md)."""

    checkpoint_layers: bool = False
    """Recompute each decoder layer in the chunk's backward: a chunk then holds its layers' inputs plus one
    layer's activations, so chunks can be several times longer in the same memory (exact)."""

    fused_loss: bool = True
    """Each chunk's loss loss_slice tokens per row at a time, never the chunk's whole logits (exact; heads
    it cannot reproduce fall back to the whole-chunk loss, logged once). false: the model's own loss."""

    loss_slice: int = 128
    """fused_loss: tokens per row in one slice (its float32 logits: loss_slice x batch x vocab x 4 bytes)."""

    def __post_init__(self):
        # The rules of ChunkSchedule and ChunkOptions, written once (engine/schedule.py, engine/options.py).
        if self.chunk_size == "auto":  # resolved at start-up (engine/chunk_auto.py), then checked again
            _require(
                self.budget is None,
                "chunking.budget: counts chunks of a chunk size; set chunking.chunk_size (not auto) with it",
            )
            check_chunking(dataclasses.replace(self, chunk_size=1), prefix="chunking.", error=ConfigError)
        else:
            check_chunking(self, prefix="chunking.", error=ConfigError)
        check_options(self, prefix="chunking.", error=ConfigError)


@dataclass
class OptimConfig:
    steps: int | None = None
    """Optimizer steps of the run (set exactly one of this and `epochs`)."""

    epochs: float | None = None
    """Passes over the training rows instead of `steps`: steps = ceil(epochs x micro-batches per epoch per
    rank / grad_accum_steps) (set exactly one of this and `steps`)."""

    grad_accum_steps: int | None = None
    """Micro-batches of `data.batch_size` rows per optimizer step on each rank (effective batch = data.batch_size
    x this x data-parallel ranks; the gradient is exactly that of the loss over the whole effective batch).
    null: the ds_config's gradient_accumulation_steps if it sets one, else 1."""

    lr: float = 1e-4
    """AdamW peak learning rate."""

    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""

    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""

    eps: float = 1e-8
    """AdamW epsilon."""

    warmup_steps: int = 0
    """Steps of linear warmup from 0 to `lr`."""

    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    """LR after the warmup."""

    min_lr_ratio: float = 0.1
    """Final LR of the cosine / linear decay, as a fraction of `lr`."""

    grad_clip: float | None = 1.0
    """Max global gradient norm; null: no clipping."""

    seed: int = 42
    """Model init and SpaCO's draw (shared by all ranks)."""

    max_nonfinite_steps: int = 5
    """Abort after this many non-finite losses in a row (a single one is skipped and logged)."""

    def __post_init__(self):
        _require(
            (self.steps is None) != (self.epochs is None),
            "optim: set exactly one of optim.steps (optimizer steps) and optim.epochs (passes over the data); "
            + ("got both (set the other to null)" if self.steps is not None else "got neither"),
        )
        _require(self.steps is None or self.steps >= 1, f"optim.steps: must be >= 1, got {self.steps}")
        _require(
            self.epochs is None or (math.isfinite(self.epochs) and self.epochs > 0),
            f"optim.epochs: must be > 0, got {self.epochs}",
        )
        _require(
            self.grad_accum_steps is None or self.grad_accum_steps >= 1,
            f"optim.grad_accum_steps: must be >= 1 or null, got {self.grad_accum_steps}",
        )
        _require(math.isfinite(self.lr) and self.lr > 0, f"optim.lr: must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        _require(
            all(0.0 <= b < 1.0 for b in self.betas), f"optim.betas: each must be in [0, 1), got {self.betas}"
        )
        _require(self.eps > 0, f"optim.eps: must be > 0, got {self.eps}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if self.steps is not None:
            self.total_steps(micro_batches_per_epoch=1, grad_accum_steps=1)  # warmup_steps <= steps
        _require(
            0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}"
        )
        _require(
            self.grad_clip is None or self.grad_clip > 0,
            f"optim.grad_clip: must be > 0 or null (no clipping), got {self.grad_clip}",
        )
        _require(self.seed >= 0, f"optim.seed: must be >= 0, got {self.seed}")
        _require(
            self.max_nonfinite_steps >= 1,
            f"optim.max_nonfinite_steps: must be >= 1, got {self.max_nonfinite_steps}",
        )

    def total_steps(self, micro_batches_per_epoch: int, grad_accum_steps: int) -> int:
        """Optimizer steps of the run: `steps`, or `epochs` over an epoch of `micro_batches_per_epoch` batches
        per rank taken `grad_accum_steps` at a time (the last step of a fractional epoch is a whole one)."""
        if self.steps is not None:
            total = self.steps
        else:
            # rounded first: a float product such as 0.1 x 30 must not become 4 steps
            total = max(1, math.ceil(round(self.epochs * micro_batches_per_epoch / grad_accum_steps, 9)))
        _require(
            self.warmup_steps <= total,
            f"optim.warmup_steps: must be in [0, {total}] (the run's optimizer steps"
            + ("" if self.steps is not None else f" from optim.epochs = {self.epochs}")
            + f"), got {self.warmup_steps}",
        )
        return total


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage."""

    offload_optimizer: bool = False
    """Optimizer states (and the step) on the CPU; needs `zero_stage` >= 1."""

    offload_param: bool = False
    """Parameters on the CPU; needs `zero_stage` 3."""

    config_file: str | None = None
    """Your own ds_config JSON, used unchanged except the keys the engine owns (micro batch,
    train_batch_size, gradient_clipping, bf16/fp16, optimizer, no scheduler), whose contradictions are errors;
    its gradient_accumulation_steps maps onto optim.grad_accum_steps."""

    config: dict[str, Any] | None = None
    """The same as `config_file`, inline (at most one of the two)."""

    def __post_init__(self):
        _require(
            not self.offload_param or self.zero_stage == 3,
            f"deepspeed.offload_param: needs deepspeed.zero_stage 3 (only ZeRO-3 partitions parameters), "
            f"got zero_stage {self.zero_stage}",
        )
        _require(
            not self.offload_optimizer or self.zero_stage >= 1,
            "deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1 (stage 0 has no partitioned optimizer)",
        )
        _require(
            self.config_file is None or self.config is None,
            "deepspeed: set at most one of deepspeed.config_file and deepspeed.config",
        )
        self.config_file = _expand(self.config_file)


@dataclass
class ParallelConfig:
    sequence: int = 1
    """Ranks that share one sequence (Ulysses sequence parallelism inside each chunk, K/V stored as head
    shards: K/V memory per rank 1/P); the world size must be a multiple of it, data parallelism is world / P.
    It must divide chunking.chunk_size and the model's attention heads (docs/sequence-parallel.md)."""

    def __post_init__(self):
        _require(
            type(self.sequence) is int and self.sequence >= 1,
            f"parallel.sequence: must be an int >= 1, got {self.sequence!r}",
        )


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    """metrics.jsonl, metrics.png (drawn when the run ends) and the TensorBoard events (in tensorboard/run-<UTC
    start time>/, one subdirectory per run; a resumed run continues the latest) go here."""

    every: int = 1
    """Steps between log lines / TensorBoard points."""

    tensorboard: bool = True
    """Write TensorBoard scalars (the same as listing tensorboard in `report_to`)."""

    progress_bar: bool = True
    """A progress bar on rank 0, only when stderr is a terminal (not under Slurm, mpirun or a redirect)."""

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] | None = None
    """Trackers that get the scalars (rank 0, every `every` steps) and the run config (once); null: tensorboard
    alone (none with `tensorboard` false). wandb and mlflow are optional extras: pip install
    'seco-engine[wandb]' / '[mlflow]'; WANDB_MODE=offline and the like apply."""

    project: str = "seco-engine"
    """wandb project / mlflow experiment name."""

    mlflow_tracking_uri: str | None = None
    """mlflow: where runs go (a server, sqlite:///FILE, ...); null: MLFLOW_TRACKING_URI, else a file store in
    `dir`/mlruns (mlflow 3 accepts it only with MLFLOW_ALLOW_FILE_STORE=true)."""

    peak_tflops: float | None = None
    """Peak dense TFLOPS of one device, which MFU is measured against; null: the known bf16 peak of the CUDA
    device (none on CPU or an unknown device: no MFU)."""

    def __post_init__(self):
        _require(bool(self.dir), "logging.dir: must not be empty")
        _require(
            self.peak_tflops is None or (math.isfinite(self.peak_tflops) and self.peak_tflops > 0),
            f"logging.peak_tflops: must be > 0 or null, got {self.peak_tflops}",
        )
        _require(self.every >= 1, f"logging.every: must be >= 1, got {self.every}")
        _require(
            self.report_to is None or self.tensorboard,
            "logging.tensorboard: false and logging.report_to both say which trackers run; use report_to "
            "alone (leave tensorboard out of it)",
        )
        if self.report_to is not None:
            dup = sorted({t for t in self.report_to if self.report_to.count(t) > 1})
            _require(not dup, f"logging.report_to: {dup} listed more than once")
        _require(bool(self.project), "logging.project: must not be empty")
        self.dir = _expand(self.dir)

    def trackers(self) -> list[str]:
        """The trackers that run: report_to, or TensorBoard alone as logging.tensorboard says."""
        if self.report_to is not None:
            return list(self.report_to)
        return ["tensorboard"] if self.tensorboard else []


@dataclass
class CheckpointConfig:
    dir: str | None = None
    """Where checkpoints (and the export) are written; null: no checkpoints."""

    every: int | None = None
    """Steps between checkpoints; null: only at the end."""

    resume: str | None = None
    """`auto`: the latest checkpoint in `dir` if there is one; or a checkpoint path."""

    resume_weights_only: bool = False
    """With `resume` a checkpoint path (outside `dir`): start from its weights, and its optimizer states when
    the world size is the same (ZeRO 0-2 also from another world size, weights only), at step 0 with a fresh
    data stream and RNG: a new run on new data, or on another number of ranks. Once `dir` holds this run's
    own checkpoints, a restart resumes those exactly."""

    export: Literal["none", "lora", "hf"] = "none"
    """Written into `dir`/export at the end: lora (the PEFT adapter) or hf (a full model, LoRA merged)."""

    keep_last: int | None = None
    """Keep only the newest N complete checkpoints (older ones are deleted after each save); null: keep all.
    The newest complete checkpoint and one being written are never deleted."""

    keep_best: bool = False
    """With keep_last: also keep the checkpoint with the lowest eval/loss (needs eval.path or eval.split, and
    checkpoint.every a multiple of eval.every, so that every checkpoint has an eval loss)."""

    def __post_init__(self):
        _require(
            self.keep_last is None or self.keep_last >= 1,
            f"checkpoint.keep_last: must be >= 1 or null (keep all), got {self.keep_last}",
        )
        _require(
            not self.keep_best or self.keep_last is not None,
            "checkpoint.keep_best: needs checkpoint.keep_last (without it every checkpoint is kept anyway)",
        )
        _require(self.keep_last is None or self.dir is not None, "checkpoint.keep_last: needs checkpoint.dir")
        if self.every is not None:
            _require(self.every >= 1, f"checkpoint.every: must be >= 1, got {self.every}")
        for name in ("every", "resume"):
            _require(
                getattr(self, name) is None or self.dir is not None,
                f"checkpoint.{name}: needs checkpoint.dir",
            )
        _require(self.export == "none" or self.dir is not None, "checkpoint.export: needs checkpoint.dir")
        self.dir = _expand(self.dir)
        if self.resume != "auto":
            self.resume = _expand(self.resume)
        if self.resume_weights_only:
            _require(
                self.resume not in (None, "auto"),
                "checkpoint.resume_weights_only: needs checkpoint.resume set to a checkpoint path (not auto)",
            )
            inside = Path(self.dir).resolve() in Path(str(self.resume)).resolve().parents
            _require(
                not inside and Path(self.dir).resolve() != Path(str(self.resume)).resolve(),
                f"checkpoint.resume_weights_only: checkpoint.resume {self.resume!r} is inside checkpoint.dir "
                f"{self.dir!r}; the new run's steps restart at 0, so its checkpoints need a directory of their own",
            )


@dataclass
class RetrievalConfig:
    lengths: list[int] = field(default_factory=list)
    """Item lengths in tokens, the heatmap's columns (up to the longest sequence that trains); empty: no
    retrieval evaluation."""

    depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Where the key sits in the filler, as a fraction of it (0: first, 1: right before the question)."""

    task: Literal["passkey", "needle"] = "passkey"
    """passkey: one number to recall; needle: a number named by a word, asked for by that word."""

    key_digits: int = 5
    """Digits of the number to recall (exact match of all of them scores; chance is 10^-key_digits)."""

    items: int = 4
    """Items per (length, depth) cell; accuracy is the fraction answered exactly."""

    seed: int = 0
    """Draws the keys and the filler; the same seed gives the same items at every evaluation."""

    def __post_init__(self):
        for length in self.lengths:
            _require(length >= 2, f"eval.retrieval.lengths: each must be >= 2 tokens, got {length}")
        _require(
            len(set(self.lengths)) == len(self.lengths),
            f"eval.retrieval.lengths: repeated lengths in {self.lengths}",
        )
        _require(len(self.depths) > 0, "eval.retrieval.depths: must hold at least one depth")
        for depth in self.depths:
            _require(0.0 <= depth <= 1.0, f"eval.retrieval.depths: each must be in [0, 1], got {depth}")
        _require(
            len(set(self.depths)) == len(self.depths),
            f"eval.retrieval.depths: repeated depths in {self.depths}",
        )
        _require(
            1 <= self.key_digits <= 18, f"eval.retrieval.key_digits: must be in 1..18, got {self.key_digits}"
        )
        _require(self.items >= 1, f"eval.retrieval.items: must be >= 1, got {self.items}")
        _require(self.seed >= 0, f"eval.retrieval.seed: must be >= 0, got {self.seed}")


@dataclass
class EvalConfig:
    path: str | None = None
    """Held-out data: a file or directory read like `data.path` (the same `data.kind` and fields)."""

    split: float | None = None
    """Instead of `path`: this fraction of the training rows, drawn from `data.seed`, is held out for
    evaluation and never trained on."""

    every: int | None = None
    """Steps between evaluations; null: after the last step only (there is always one after the last)."""

    max_samples: int | None = None
    """Evaluate the first N held-out rows only; null: all of them."""

    seq_len: int | None = None
    """`path` only: tokens per eval row; null: `data.seq_len`. Any length that trains also evaluates."""

    batch_size: int | None = None
    """Eval rows per rank per forward; null: `data.batch_size`."""

    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    """Long-context retrieval (needle / passkey) at a grid of lengths x depths, at every evaluation."""

    def __post_init__(self):
        _require(self.path is None or self.split is None, "eval: set at most one of eval.path and eval.split")
        _require(
            self.split is None or 0.0 < self.split < 1.0, f"eval.split: must be in (0, 1), got {self.split}"
        )
        for name in ("every", "max_samples", "batch_size"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"eval.{name}: must be >= 1 or null, got {value}")
        _require(
            self.seq_len is None or self.seq_len >= 2,
            f"eval.seq_len: must be >= 2 or null, got {self.seq_len}",
        )
        _require(
            self.seq_len is None or self.path is not None,
            "eval.seq_len: only with eval.path (eval.split rows are training rows of data.seq_len)",
        )
        _require(
            self.every is None or self.enabled,
            "eval.every: nothing to evaluate; set eval.path, eval.split or eval.retrieval.lengths",
        )
        self.path = _expand(self.path)

    @property
    def has_loss(self) -> bool:
        """Whether there is a held-out set to compute eval/loss on."""
        return self.path is not None or self.split is not None

    @property
    def enabled(self) -> bool:
        return self.has_loss or bool(self.retrieval.lengths)


@dataclass
class Config:
    model: ModelConfig
    """The model to train."""

    lora: LoraConfig = field(default_factory=LoraConfig)
    """PEFT LoRA."""

    data: DataConfig = field(default_factory=DataConfig)
    """Tokenizer, documents, rows and batches."""

    chunking: ChunkingConfig = field(default_factory=ChunkingConfig)
    """How a sequence is split and back-propagated."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """AdamW and its schedule."""

    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    """ZeRO and offload."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """How ranks share the work beyond data parallelism."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics."""

    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints, resume and export."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Validation loss and long-context retrieval during training."""

    def __post_init__(self):
        size = self.chunking.chunk_size
        chunks = 1 if size == "auto" else -(-self.data.seq_len // size)  # rows are padded / packed to seq_len
        check_budget(
            self.chunking.budget,
            chunks,
            f"chunking.budget (data.seq_len {self.data.seq_len} / chunking.chunk_size {self.chunking.chunk_size})",
            ConfigError,
        )
        _require(
            self.checkpoint.export != "lora" or self.lora.enabled,
            "checkpoint.export: 'lora' needs lora.enabled true (use 'hf' to export the full model)",
        )
        _check_eval(self)
        _check_parallel(self)


def _check_parallel(cfg: Config) -> None:
    """The rules between the parallel section and the others (the world size is checked at start-up)."""
    p = cfg.parallel.sequence
    _require(
        cfg.chunking.chunk_size == "auto" or cfg.chunking.chunk_size % p == 0,
        f"parallel.sequence: {p} must divide chunking.chunk_size ({cfg.chunking.chunk_size}): each rank holds "
        "chunk_size / P tokens of every chunk",
    )


def _check_eval(cfg: Config) -> None:
    """The rules between the eval section and the others."""
    _require(
        cfg.eval.path is None or cfg.data.kind != "synthetic",
        "eval.path: data.kind 'synthetic' reads no file; use eval.split to hold out synthetic rows",
    )
    keep_best = cfg.checkpoint.keep_best
    _require(
        not keep_best or cfg.eval.has_loss,
        "checkpoint.keep_best: needs an eval loss (set eval.path or eval.split)",
    )
    every, eval_every = cfg.checkpoint.every, cfg.eval.every
    _require(
        not keep_best or every is None or (eval_every is not None and every % eval_every == 0),
        f"checkpoint.keep_best: checkpoint.every ({every}) must be a multiple of eval.every ({eval_every}), "
        "so that every checkpoint has an eval loss",
    )
