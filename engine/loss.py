"""Fused chunked cross-entropy: a chunk's loss with at most one slice of tokens' logits alive.

A chunk of n tokens over a vocabulary V has n x V logits (fp32 for the loss), and autograd keeps them and
their gradient: at n = 1024, V = 128K that is 0.5 GiB each, often more than the chunk's other activations.
Here the LM head runs slice by slice from the chunk's final hidden states, and each slice's gradient (with
respect to the hidden states and the head's weight) is computed right away, in the same forward, from the
slice's softmax; backward only scales those gradients by the incoming one. No logits outlive their slice,
and the head's weight is read in the forward only.

How the model is reached: a forward pre-hook on the model's output embedding (the LM head) takes the
hidden states the model is about to project, computes the fused loss, and hands the head an empty input, so
the model's own forward (PEFT, DeepSpeed and its hooks included) runs as always and its logits are empty.
The head module is therefore called once per chunk, so under ZeRO-3 its weight is gathered once per chunk
by DeepSpeed's own module hook (which runs before ours), not once per slice. ZeRO-3 releases the weight
after the head's forward and gathers it again only when backward passes through the head's output; the
precomputed weight gradient would otherwise reach a released (partitioned) parameter, and the 2-rank step
did not complete. So under ZeRO-3 the chunk's loss also adds the sum of the head's empty output (exactly
0): backward then enters the head, DeepSpeed re-gathers its weight, and the weight's gradient (ours plus
the empty projection's zero) accumulates on the gathered parameter, where ZeRO-3's reduce hook expects it.

The model's own logit post-processing is reproduced: final-logit softcapping (Gemma-2/3), logit scaling
(Cohere `logit_scale`, Granite `logits_scaling`). Because an unknown family could do something else after
the head, the first step of each model runs it on one token per row (no grad, no cache) and compares its logits
with ours; a mismatch (or a head we cannot read: a PEFT adapter on it, a non-Linear head) makes the step use
the whole-chunk path, logged once per reason.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.documents import IGNORE
from engine.unwrap import base_model, text_config

logger = logging.getLogger(__name__)
_logged: set[str] = set()  # log each fallback reason once per process
# Whether a model's logits are lm_head(h) with the known post-processing: a property of its structure,
# checked by one forward the first time a model is seen, not on every step.
_verified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.warning("fused loss: %s; using the whole-chunk loss", reason)


def logit_transform(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the model's forward does to `lm_head(h)` before its loss, for the families that do something."""
    base = base_model(model)
    cfg = text_config(base.config)
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(base, "logit_scale", None)  # Cohere keeps it on the CausalLM module
    divide = getattr(cfg, "logits_scaling", None)  # Granite
    scale = scale if isinstance(scale, (int, float)) else None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divide is not None:
            logits = logits / divide
        if cap is not None:  # in the order and dtype of Gemma-2's forward
            logits = torch.tanh(logits / cap) * cap
        return logits

    # The factor when the transform is a plain scaling (None: it is not), for the in-place loss.
    factor = (1.0 if scale is None else scale) / (1.0 if divide is None else divide)
    transform.linear_scale = None if cap is not None else factor
    return transform


class _FusedCE(torch.autograd.Function):
    """Summed CE of transform(h W^T + b) over `targets`, slice by slice; grads computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, slice_tokens, grads):
        h = hidden.reshape(-1, hidden.shape[-1])
        t = targets.reshape(-1).to(h.device)
        acc = torch.promote_types(h.dtype, torch.float32)  # HF's loss: float32 at least
        total = torch.zeros((), dtype=acc, device=h.device)
        want_h, want_w, want_b = grads
        grad_h = torch.zeros_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        grad_b = (
            torch.zeros(bias.shape, dtype=acc, device=bias.device) if want_b and bias is not None else None
        )
        for a in range(0, h.shape[0], slice_tokens):
            x, y = h[a : a + slice_tokens], t[a : a + slice_tokens]
            if not (y != IGNORE).any():
                continue  # no target: no loss, zero gradient
            if not any(grads):
                total += _ce(transform(F.linear(x, weight, bias)), y, acc)
                continue
            loss, dlogits = _slice_loss_and_grad(F.linear(x, weight, bias), y, transform, acc)
            total += loss
            if want_h:
                grad_h[a : a + slice_tokens] = dlogits.to(weight.dtype) @ weight
            if grad_w is not None:
                grad_w.addmm_(dlogits.t(), x.to(acc))
            if grad_b is not None:
                grad_b += dlogits.sum(0)
            del dlogits
        ctx.grad_h = None if grad_h is None else grad_h.view_as(hidden)
        ctx.grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        ctx.grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return total

    @staticmethod
    def backward(ctx, g):
        # In place: the precomputed gradients are ours, and a copy would double the head's gradient.
        grads = [None if x is None else x.mul_(g.to(x.dtype)) for x in (ctx.grad_h, ctx.grad_w, ctx.grad_b)]
        ctx.grad_h = ctx.grad_w = ctx.grad_b = None
        return (*grads, None, None, None, None)


def _slice_loss_and_grad(logits, y, transform, acc) -> tuple[torch.Tensor, torch.Tensor]:
    """A slice's summed CE and its gradient with respect to the (untransformed) logits, in `acc`.

    Without a non-linear transform (every family but the softcapping ones) this works in place on one
    float32 [slice x V] buffer: the softmax overwrites the logits and becomes the gradient
    (softmax - one-hot, times the logit scale). Through autograd it would hold four such buffers (logits,
    log-softmax, the NLL gradient, the log-softmax gradient), which at a 128K vocabulary is most of the
    fused loss's own peak."""
    if transform.linear_scale is None:  # softcapping: the slice's own small graph
        with torch.enable_grad():
            z = logits.detach().requires_grad_()
            loss = _ce(transform(z), y, acc)
            (dz,) = torch.autograd.grad(loss, z)
        return loss.detach(), dz.to(acc)
    z = logits.to(acc)  # a new buffer for low-precision logits; the logits themselves in float32
    del logits
    if transform.linear_scale != 1.0:
        z.mul_(transform.linear_scale)
    valid = y != IGNORE
    rows = torch.arange(len(y), device=y.device)
    target = z[rows, y.clamp(min=0)]
    top = z.amax(dim=1, keepdim=True)
    z.sub_(top).exp_()
    norm = z.sum(dim=1, keepdim=True)
    loss = ((norm.log() + top).squeeze(1) - target)[valid].sum()
    z.div_(norm)  # softmax
    z[rows[valid], y[valid]] -= 1.0
    z[~valid] = 0.0
    if transform.linear_scale != 1.0:
        z.mul_(transform.linear_scale)  # d(scale * logits) / d logits
    return loss, z


def _ce(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return F.cross_entropy(logits.to(dtype), targets, ignore_index=IGNORE, reduction="sum")


def fused_ce_sum(hidden, weight, bias, targets, transform, slice_tokens: int) -> torch.Tensor:
    """Summed CE (float32 at least) of the chunk, as the model's loss over `transform(linear(hidden))`."""
    need = torch.is_grad_enabled()
    grads = (
        need and hidden.requires_grad,
        need and weight.requires_grad,
        need and bias is not None and bias.requires_grad,
    )
    return _FusedCE.apply(hidden, weight, bias, targets, transform, slice_tokens, grads)


@dataclass
class _Result:
    loss: torch.Tensor | None = None


class FusedLoss:
    """One step's fused loss: `with fused.chunk(targets) as r:` around a chunk's forward fills `r.loss` and
    leaves the model's logits empty. `FusedLoss.build` returns None (the caller then uses the whole-chunk
    path) when the head is not a plain Linear or the model's logits are not what we would compute."""

    def __init__(self, head: torch.nn.Linear, transform, slice_tokens: int):
        self.head, self.transform, self.slice_tokens = head, transform, slice_tokens
        self.partitioned = hasattr(head.weight, "ds_id")  # ZeRO-3 (see the module docstring)

    @classmethod
    def build(
        cls, module, slice_tokens: int, forward_one_token: Callable[[], torch.Tensor]
    ) -> FusedLoss | None:
        """`forward_one_token()` runs the model (as the step does, without a cache) on one token per row and
        returns its logits: the check that the model's post-processing is the one we reproduce. It runs
        without grad, with the RNG (dropout) state put back afterwards."""
        if isinstance(slice_tokens, bool) or not isinstance(slice_tokens, int) or slice_tokens < 1:
            raise ValueError(f"loss_slice must be an integer >= 1 (tokens per slice), got {slice_tokens!r}")
        base = base_model(module)
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        if type(head) is not torch.nn.Linear:  # a PEFT adapter on the head, or no head at all
            _log_once(
                f"{type(base).__name__}'s output embedding is {type(head).__name__}, not a plain Linear"
            )
            return None
        fused = cls(head, logit_transform(module), slice_tokens)
        if base not in _verified:
            _verified[base] = fused._logits_match(head, forward_one_token)
        if not _verified[base]:
            _log_once(f"{type(base).__name__}'s logits are not lm_head(h) with the known softcapping/scaling")
            return None
        return fused

    def _logits_match(self, head: torch.nn.Linear, forward_one_token: Callable[[], torch.Tensor]) -> bool:
        expected = []

        def capture(mod, args):
            expected.append(self.transform(F.linear(args[0], mod.weight, mod.bias)))

        handle = head.register_forward_pre_hook(capture)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                logits = forward_one_token()
        finally:
            handle.remove()
        if not expected or logits.shape != expected[-1].shape or logits.dtype != expected[-1].dtype:
            return False  # e.g. Mamba-2 casts its logits to float32: its loss is not ours in float64
        return bool(torch.allclose(logits, expected[-1]))

    @contextlib.contextmanager
    def chunk(self, targets: torch.Tensor):
        result = _Result()

        def pre_hook(module, args):
            (hidden,) = args
            # Under ZeRO-3 the weight is gathered here, once per chunk (DeepSpeed's module hook ran first).
            result.loss = fused_ce_sum(
                hidden, module.weight, module.bias, targets, self.transform, self.slice_tokens
            )
            return (hidden[:, :0],)  # the model's own projection: of nothing

        def post_hook(module, args, output):
            # ZeRO-3: the empty output (as DeepSpeed's own hook returned it) joins the loss, so that
            # backward enters the head and DeepSpeed gathers its weight again before the gradient lands.
            result.loss = result.loss + output.sum().to(result.loss.dtype)

        handles = [self.head.register_forward_pre_hook(pre_hook)]
        if self.partitioned:
            handles.append(self.head.register_forward_hook(post_hook))
        try:
            yield result
        finally:
            for handle in handles:
                handle.remove()
