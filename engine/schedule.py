"""Which chunks pass 2 back-propagates and with what weight: the chunk schedule, validated in one place.

A `ChunkSchedule` is what `chunkwise_backward` runs (chunk size, SeCO or SpaCO, the sampler and its
probabilities); `check_chunking` holds every rule between those fields and is called both by the schedule
and by the run configuration's `chunking` section (engine/config.py), so a rule is written once and its
error names the key as the caller spells it (`chunking.sample_prob` in a config, `sample_prob` in Python).

Importance-sampled SpaCO. Chunk c is back-propagated independently with probability q_c and carries the
weight w_c = 1/q_c on its loss and on the K/V gradient relayed into it (engine/kv_cache.py). A gradient path
through chunks c1 < ... < cp survives with probability q_c1 ... q_cp and is weighted by 1/(q_c1 ... q_cp),
so every path, hence the gradient, is unbiased for any q_c in (0, 1]. The SFT policy
(`loss_chunks="always"`) sets q_c = 1 for chunks holding loss tokens and `sample_prob` for the others: the
answer always trains, only the context is sampled.

This module imports no torch at load time: validating a config must not pull in torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

MODES = ("seco", "spaco")
SAMPLERS = ("bernoulli", "fixed")
LOSS_CHUNKS = ("sampled", "always")


class ScheduleError(ValueError):
    """A user error in the chunking rules."""


def check_chunking(s: Any, prefix: str = "", error: type[ValueError] = ScheduleError) -> None:
    """Every rule between the chunking fields of `s` (a ChunkSchedule or the config's chunking section).

    `prefix` is how the caller names the fields ("chunking." in a run config); `error` the exception class
    the caller's users expect (the config raises its ConfigError). Fields `s` lacks count as unset.
    """
    p = prefix
    get = lambda name: getattr(s, name, None)  # noqa: E731

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise error(message)

    size = get("chunk_size")
    need(
        isinstance(size, int) and not isinstance(size, bool) and size >= 1,
        f"{p}chunk_size: must be an integer >= 1, got {size!r}",
    )
    mode, sampler = get("mode"), get("sampler") or "bernoulli"
    need(mode in MODES, f"{p}mode: {mode!r} is not one of {MODES}")
    need(sampler in SAMPLERS, f"{p}sampler: {sampler!r} is not one of {SAMPLERS}")
    loss_chunks = get("loss_chunks") or "sampled"
    need(loss_chunks in LOSS_CHUNKS, f"{p}loss_chunks: {loss_chunks!r} is not one of {LOSS_CHUNKS}")
    # A knob set while its feature is off is an error: the run would silently ignore it.
    if mode == "seco":
        _check_seco(get, p, loss_chunks, need)
    else:
        _check_spaco(get, p, sampler, loss_chunks, need)


def _check_seco(
    get: Callable[[str], Any], p: str, loss_chunks: str, need: Callable[[bool, str], None]
) -> None:
    """SeCO back-propagates every chunk: none of SpaCO's knobs may be set."""
    for name in ("sample_prob", "budget", "compensation_cap", "selected", "chunk_probs"):
        need(
            get(name) is None,
            f"{p}{name}: only used by {p}mode 'spaco' (mode is 'seco', which back-propagates every "
            "chunk); set it to null",
        )
    need(loss_chunks == "sampled", f"{p}loss_chunks: only used by {p}mode 'spaco' (mode is 'seco')")


def _check_spaco(
    get: Callable[[str], Any], p: str, sampler: str, loss_chunks: str, need: Callable[[bool, str], None]
) -> None:
    """SpaCO's draw: the probabilities (or t of k) and the cap on the compensation."""
    q = get("sample_prob")
    need(
        q is None or (isinstance(q, (int, float)) and not isinstance(q, bool) and 0.0 < q <= 1.0),
        f"{p}sample_prob: must be in (0, 1], got {q!r}",
    )
    probs = get("chunk_probs")
    if probs is not None:
        need(
            all(isinstance(x, (int, float)) and 0.0 < x <= 1.0 for x in probs),
            f"{p}chunk_probs: every q_c must be in (0, 1], got {list(probs)}",
        )
        need(sampler == "bernoulli", f"{p}chunk_probs: only used by {p}sampler 'bernoulli'")
        need(q is None, f"{p}chunk_probs: set either {p}chunk_probs or {p}sample_prob, not both")
        need(loss_chunks == "sampled", f"{p}chunk_probs: explicit q_c replace {p}loss_chunks 'always'")
    budget = get("budget")
    if sampler == "bernoulli":
        need(
            q is not None or probs is not None,
            f"{p}sample_prob: required for {p}mode 'spaco' with sampler 'bernoulli' "
            f"(or use sampler 'fixed' with {p}budget)",
        )
        need(budget is None, f"{p}budget: only used by sampler 'fixed'; set it to null")
    else:
        _check_fixed(p, budget, q, get("selected"), loss_chunks, need)
    cap = get("compensation_cap")
    # The factor 1/q is >= 1; a cap below 1 would scale selected chunks *down*.
    need(cap is None or cap >= 1.0, f"{p}compensation_cap: must be >= 1, got {cap}")


def _check_fixed(p: str, budget, q, selected, loss_chunks: str, need: Callable[[bool, str], None]) -> None:
    """The paper's t-of-k draw: t = budget, or round(sample_prob x number of chunks), or len(selected)."""
    given = [
        name for name, v in (("budget", budget), ("sample_prob", q), ("selected", selected)) if v is not None
    ]
    need(
        len(given) == 1,
        f"{p.rstrip('.') or 'chunking'}: sampler 'fixed' needs exactly one of {p}budget (chunks per step) "
        f"and {p}sample_prob (budget = round(sample_prob x chunks))"
        + (", or selected" if not p else "")
        + f"; got {given or 'none'}",
    )
    need(
        budget is None or (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1),
        f"{p}budget: must be an integer >= 1, got {budget!r}",
    )
    need(loss_chunks == "sampled", f"{p}loss_chunks: 'always' needs {p}sampler 'bernoulli' (per-chunk q_c)")


def check_budget(budget: int | None, num_chunks: int, where: str = "budget", error=ScheduleError) -> None:
    """The fixed sampler draws t distinct chunks: t cannot exceed the number of chunks."""
    if budget is not None and budget > num_chunks:
        raise error(f"{where}: {budget} is more than the {num_chunks} chunks of the sequence")


@dataclass(frozen=True)
class ChunkSchedule:
    """How one chunk-wise step runs: SeCO (every chunk) or SpaCO (a sampled subset, reweighted).

    chunk_size: tokens per chunk. mode: "seco" (exact) or "spaco" (unbiased estimate).
    sampler: "bernoulli" (each chunk independently with q_c, weight 1/q_c: unbiased) or "fixed" (the
    paper's t of k, weight k/t: biased for paths through 2+ chunks, docs/design.md section 3).
    sample_prob: q (bernoulli), or t = round(q k) (fixed). budget: t (fixed).
    loss_chunks: "always" gives chunks holding loss tokens q_c = 1 (bernoulli; the SFT policy).
    chunk_probs: explicit q_c per chunk (bernoulli), instead of sample_prob.
    selected: a given selection instead of a draw (tests, exact enumeration).
    compensation_cap: upper bound on every weight (trades bias for variance).
    """

    chunk_size: int
    mode: str = "seco"
    sampler: str = "bernoulli"
    sample_prob: float | None = None
    budget: int | None = None
    loss_chunks: str = "sampled"
    chunk_probs: tuple[float, ...] | None = None
    selected: tuple[int, ...] | None = None
    compensation_cap: float | None = None

    def __post_init__(self):
        for name in ("chunk_probs", "selected"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, name, tuple(v))
        check_chunking(self)

    @classmethod
    def from_config(cls, chunking: Any) -> ChunkSchedule:
        """The schedule of a run config's `chunking` section (same field names)."""
        names = ("chunk_size", "mode", "sampler", "sample_prob", "budget", "loss_chunks", "compensation_cap")
        return cls(**{n: getattr(chunking, n) for n in names if getattr(chunking, n, None) is not None})

    def probs(self, num_chunks: int, has_loss: Sequence[bool] | None = None) -> list[float]:
        """q_c of every chunk (1 for SeCO). `has_loss[c]`: chunk c holds loss tokens (policy "always")."""
        k = num_chunks
        if self.mode == "seco":
            return [1.0] * k
        if self.sampler == "fixed":
            t = self._fixed_t(k)
            return [t / k] * k
        if self.chunk_probs is not None:
            if len(self.chunk_probs) != k:
                raise ScheduleError(f"chunk_probs: {len(self.chunk_probs)} values for {k} chunks")
            return [float(x) for x in self.chunk_probs]
        q = float(self.sample_prob)
        if self.loss_chunks == "always":
            assert has_loss is not None and len(has_loss) == k, "policy 'always' needs the loss-chunk flags"
            return [1.0 if has_loss[c] else q for c in range(k)]
        return [q] * k

    def _fixed_t(self, k: int) -> int:
        if self.selected is not None:
            t = len(set(self.selected))
        else:
            t = self.budget if self.budget is not None else max(1, round(self.sample_prob * k))
        check_budget(t, k, "budget")
        return t


@dataclass(frozen=True)
class Draw:
    """One step's draw: `selected` chunks (ascending), `weights[i]` the weight of `selected[i]`, and the
    probability `probs[c]` with which chunk c was to be drawn (1 for SeCO)."""

    selected: list[int]
    weights: list[float]
    probs: list[float]

    def weight_of(self) -> dict[int, float]:
        return dict(zip(self.selected, self.weights))


def draw_chunks(
    schedule: ChunkSchedule, num_chunks: int, generator=None, has_loss: Sequence[bool] | None = None
) -> Draw:
    """The chunks pass 2 visits and the weight each carries. Same generator state, same draw (ranks agree).

    Bernoulli: chunk c with probability q_c, weight 1/q_c (unbiased, module docstring). Fixed t-of-k (the
    paper's Algorithm 2), weight k/t: paths through p >= 2 chunks survive with probability
    t(t-1)..(t-p+1) / (k(k-1)..(k-p+1)) < (t/k)^p, so they are under-weighted: biased, docs/design.md section 3.
    """
    import torch  # here, not at module level: see the module docstring

    s, k = schedule, num_chunks
    if s.mode == "seco":
        return Draw(list(range(k)), [1.0] * k, [1.0] * k)
    probs = s.probs(k, has_loss)
    selected = s.selected
    if s.sampler == "bernoulli":
        weights = [1.0 / q for q in probs]
        if selected is None:
            # One uniform per chunk whatever the q_c: equal q_c draw the chunks a scalar q draws.
            u = torch.rand(k, generator=generator)
            selected = [c for c in range(k) if u[c] < probs[c]]
    else:
        t = s._fixed_t(k)
        weights = [k / t] * k
        if selected is None:
            selected = torch.randperm(k, generator=generator)[:t].tolist()
    chosen = sorted({int(c) for c in selected})
    if any(c < 0 or c >= k for c in chosen):
        raise ScheduleError(f"selected={list(selected)} must hold chunk indices in [0, {k})")
    cap = s.compensation_cap
    return Draw(chosen, [weights[c] if cap is None else min(weights[c], cap) for c in chosen], probs)


def spaco_generator(seed: int, step: int, micro: int = 0):
    """The SpaCO draw of micro-batch `micro` of optimizer step `step` (a torch.Generator): identical on every
    rank (ZeRO deadlocks otherwise) and after a resume; each micro-batch of a step draws independently."""
    import numpy as np
    import torch  # here, not at module level: see the module docstring

    entropy = (
        (seed, step) if micro == 0 else (seed, step, micro)
    )  # micro-batch 0: the draw without accumulation
    (state,) = np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state))
