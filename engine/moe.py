"""Mixture-of-experts router loss across chunks: HF's load-balancing loss, exact, one chunk at a time.

With `config.output_router_logits = True`, HF's causal LMs return

    loss = CE + coef * aux,   aux = E * sum_e f_e * P_e

(transformers' `load_balancing_loss_func`, the Switch Transformer loss). Over the router logits of every MoE
layer l and every unmasked token t (R = layers x unmasked tokens rows in all):

    f_e = #{(l, t): e in top_k(softmax(logits_lt))} / R      routed fraction, piecewise constant: no gradient
    P_e = sum_(l, t) softmax(logits_lt)_e / R                 mean router probability, a sum over tokens

Both are means over the *unsplit* batch, so a chunk cannot compute its own aux. But f_e is known once pass 1
has seen every chunk (we accumulate the routing counts, with the padding mask, as HF does), and P_e is a sum
over tokens: chunk c's share  E * sum_e f_e * P_e,c  (P_e,c: chunk c's probability sum over the global R)
adds up over chunks to aux, and its gradient is exactly aux's gradient through chunk c's router logits.
Pass 2 backprops  w * (CE_c / N + coef * aux_c)  per chunk: exact under SeCO, unbiased under SpaCO (w = 1/q,
the chunk's aux share travels the same K/V paths as its CE).

The router logits are taken exactly where HF's `output_router_logits` takes them (the modules and output
index of the model's `_can_record_outputs["router_logits"]`), by forward hooks that live for one chunk
forward. HF's own capture cannot be switched on per chunk: the causal LM would then compute its aux on the
chunk's logits against the prefix + chunk mask (a shape error).

Data parallel: HF computes aux on each rank's own batch, and data-parallel training averages the gradients,
so the objective is  CE over the global batch + coef * (mean over ranks of each rank's aux), which is what
the engine computes under DeepSpeed (each rank's aux share is not multiplied by the world size).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from transformers import PreTrainedModel
from transformers.models.mixtral import modeling_mixtral
from transformers.utils.output_capturing import OutputRecorder

from engine.unwrap import base_model

# The formula split here is the code of transformers' Mixtral `load_balancing_loss_func`; ~30 MoE families
# carry a verbatim copy. A family whose function is different code is refused, never approximated.
_STANDARD = modeling_mixtral.load_balancing_loss_func.__code__


def _is_standard(fn) -> bool:
    code = getattr(fn, "__code__", None)
    return code is not None and (code.co_code, code.co_names) == (_STANDARD.co_code, _STANDARD.co_names)


class RouterLoss:
    """The load-balancing loss of one chunk-wise step: routing counts from pass 1, chunk shares in pass 2."""

    def __init__(self, base: PreTrainedModel, num_experts: int, top_k: int, coef: float, mask):
        self.family = base.config.model_type
        self.num_experts, self.top_k, self.coef = num_experts, top_k, coef
        self.mask = mask  # [batch, seq] (HF's attention_mask) or None: every row counts
        self.taps = _router_taps(base)
        if not self.taps:
            raise ValueError(
                f"{self.family}: output_router_logits is set but no router module was found to take the "
                "router logits from (the model's _can_record_outputs['router_logits'])"
            )
        self.captured: list[torch.Tensor] = []
        self.span = (0, 0)
        self.counts = self.prob_sum = None  # [E] float64 / accumulator dtype, summed over layers and tokens
        self.rows = 0.0  # R: unmasked rows over all layers

    @classmethod
    def for_model(cls, module, attention_mask: torch.Tensor | None) -> RouterLoss | None:
        """The router loss HF's own `.loss` adds for this model, or None when it adds none.

        Raises ValueError for a family whose router loss the engine cannot split by chunk."""
        base = base_model(module)
        cfg = base.config
        z_loss = getattr(base, "z_loss_coefficient", 0.0) or 0.0
        if z_loss > 0:  # bamba: HF's loss adds z * mean(logsumexp(logits)^2) over every position
            raise ValueError(
                f"{cfg.model_type}: z_loss_coefficient={z_loss} adds a z-loss on the LM logits (a mean over all "
                "positions, padding included) to HF's loss, which chunk-wise training does not compute; set "
                "z_loss_coefficient=0"
            )
        if not getattr(cfg, "output_router_logits", False):
            return None
        fn = getattr(sys.modules.get(type(base).__module__), "load_balancing_loss_func", None)
        if fn is None:  # the family records router logits but its loss has no router term (e.g. afmoe)
            return None
        if not _is_standard(fn):
            raise ValueError(
                f"{cfg.model_type}: output_router_logits=True adds a router loss that is not the Switch/"
                "Mixtral load-balancing formula the engine splits by chunk (its load_balancing_loss_func "
                "differs, e.g. doge's product-key routing normalised by top_k); set output_router_logits="
                "False to train without it"
            )
        coef = getattr(base, "router_aux_loss_coef", getattr(base, "aux_loss_coef", None))
        experts, top_k = getattr(base, "num_experts", None), getattr(base, "num_experts_per_tok", None)
        if coef is None or experts is None or top_k is None:
            raise ValueError(
                f"{cfg.model_type}: cannot read the router loss's coefficient, number of experts and top-k "
                "from the model (router_aux_loss_coef, num_experts, num_experts_per_tok)"
            )
        return cls(base, int(experts), int(top_k), float(coef), attention_mask)

    @contextlib.contextmanager
    def capture(self, start: int, end: int):
        """Record the router logits of one forward of the chunk [start, end); hooks removed afterwards (so a
        recompute inside backward, e.g. activation checkpointing, records nothing)."""
        self.captured, self.span = [], (start, end)

        def hook_for(index: int):
            def hook(_module, _args, output):
                out = output[index] if isinstance(output, tuple) else output
                if out is not None:
                    self.captured.append(out)

            return hook

        handles = [m.register_forward_hook(hook_for(i)) for m, i in self.taps]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _layers(self):
        """(softmax probabilities [rows, E], row mask [rows] or None) of each captured layer."""
        s, e = self.span
        mask = None if self.mask is None else self.mask[:, s:e].reshape(-1)
        for logits in self.captured:
            logits = logits.reshape(-1, logits.shape[-1])
            if mask is not None and logits.shape[0] != mask.numel():
                raise ValueError(
                    f"{self.family}: router logits have {logits.shape[0]} rows for a chunk of "
                    f"{mask.numel()} tokens; the load-balancing loss needs one row per token"
                )
            probs = torch.softmax(logits, dim=-1)  # in the logits' dtype, as HF
            yield probs, None if mask is None else mask.to(probs.device)

    def observe(self) -> None:
        """Pass 1 (no grad): add this chunk's routing counts and probability sums."""
        for probs, mask in self._layers():
            acc = torch.promote_types(probs.dtype, torch.float32)  # HF sums in float32; float64 keeps float64
            if self.counts is None:
                self.counts = torch.zeros(self.num_experts, dtype=torch.float64, device=probs.device)
                self.prob_sum = torch.zeros(self.num_experts, dtype=acc, device=probs.device)
            chosen = torch.topk(probs, self.top_k, dim=-1).indices.reshape(-1)
            w = torch.ones(probs.shape[0], dtype=torch.float64, device=probs.device) if mask is None else mask
            self.counts.scatter_add_(0, chosen, w.to(torch.float64).repeat_interleave(self.top_k))
            p = probs.to(acc)
            self.prob_sum += (p if mask is None else p * mask.to(acc).unsqueeze(-1)).sum(0)
            self.rows += float(probs.shape[0] if mask is None else mask.sum())
        self.captured = []

    def chunk_share(self) -> torch.Tensor:
        """Pass 2: coef * E * sum_e f_e * P_e,c of the chunk just recomputed, with its gradient."""
        share = None
        for probs, mask in self._layers():
            p = probs.to(torch.promote_types(probs.dtype, torch.float32))
            s = (p if mask is None else p * mask.to(p.dtype).unsqueeze(-1)).sum(0)
            share = s if share is None else share + s
        self.captured = []
        if share is None or not self.rows:
            return torch.zeros(())
        f = (self.counts / self.rows).to(share.dtype)
        return self.coef * self.num_experts * (f * share).sum() / self.rows

    def value(self) -> float:
        """aux itself (HF's `aux_loss`, without the coefficient), from pass 1."""
        if self.counts is None or not self.rows:
            return float("nan")
        f, p = self.counts / self.rows, self.prob_sum.double() / self.rows
        return float(self.num_experts * (f * p).sum())


def _router_taps(base: PreTrainedModel) -> list[tuple[torch.nn.Module, int]]:
    """(module, output index) pairs HF's `output_router_logits` records from, matched as transformers'
    output capturing matches them (target class or class-name suffix, optional layer name)."""
    specs = getattr(base, "_can_record_outputs", None) or {}
    recorded = specs.get("router_logits")
    if recorded is None:
        return []
    taps = []
    for spec in recorded if isinstance(recorded, list) else [recorded]:
        if not isinstance(spec, OutputRecorder):  # a bare class or class name records output index 1
            spec = OutputRecorder(
                target_class=None if isinstance(spec, str) else spec,
                index=1,
                class_name=spec if isinstance(spec, str) else None,
            )
        for name, m in base.named_modules():
            full = "." + name
            hit = (spec.target_class is not None and isinstance(m, spec.target_class)) or (
                spec.class_name is not None and full.endswith(spec.class_name)
            )
            if hit and spec.layer_name is not None:
                hit = "." + spec.layer_name.strip(".") + "." in full + "."
            if hit:
                taps.append((m, spec.index))
    return taps
