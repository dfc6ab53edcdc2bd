"""Recurrent mixers of hybrid models split by heads over a sequence group (engine/sequence_parallel.py).

A gated delta rule or Mamba-2 mixer is per head after its input projections: each head's short convolution
(per channel), recurrence and gated norm read that head's channels only; the heads meet again in the output
projection. So the attention switch carries over. Rank r holds m = C / P tokens of a chunk of C:

    in-projections on the m tokens (all channels)   [b, m, C_proj]
      -> one all-to-all (every projection) to rank r's channel block of the whole chunk   [b, C, C_proj / P]
    the mixer's own forward (transformers' code) on a shard view of the module, from and to the cache
      -> all-to-all of the out-projection's input back to the m tokens   [b, m, C_out]
    the out-projection (all channels)

The shard view is the mixer's class with its head counts divided by P and its per-head parameters (conv
weights, dt_bias, A_log, D, a grouped norm's weight) sliced to rank r's heads, with gradient to the full
parameters; its projections are the switches above. The mixer reads and writes its conv and recurrent
states through the cache as always, so the boundary states the cache checkpoints (engine/state_cache.py) are
rank r's heads' only: 1/P per rank, and their deposit and relay work per shard unchanged.

Channel blocks. A projection's output is a concatenation of segments (Qwen3.5's in_proj_qkv: q | k | v),
each a run of heads (or head groups); rank r's block is the r-th 1/P of every segment, in segment order,
which is the layout the view's forward expects of its narrower projection. Qwen3-Next packs q, k, v, z per
key-head group, one segment. A value head reads the key head h_v // (H_v / H_k) and a Mamba-2 head the
group h // (H / G), so splitting key heads (groups) and value heads (heads) in the same P runs keeps every
head with its key head (group): P must divide the key heads (groups); otherwise the mixer runs gathered.

The view reads its input only through the projections: it is handed a stride-0 placeholder of the whole
chunk's shape [b, C, hidden] (its forward takes the batch size and chunk length from it), and each
projection checks that it is given that placeholder, so a forward that transformed its input first is an
error, not a silent mistake.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn


@dataclass(frozen=True)
class MixerLayout:
    """How one mixer class splits by heads; each callable takes the (whole) mixer module."""

    projections: Callable[[nn.Module], dict[str, tuple[int, ...]]]  # input projection -> output segments
    sliced: Callable[[nn.Module], dict[str, tuple[int, ...]]]  # "child.param" or "param" -> dim-0 segments
    sizes: Callable[[nn.Module, int], dict[str, int]]  # the view's head counts and widths for P ranks
    unit: Callable[[nn.Module], int]  # what P must divide (key heads, groups)
    output: str = "out_proj"
    # children with sliced tensors that the forward calls as modules (they get a view of their own); the
    # others' tensors it reads directly (conv1d's weight and bias go to a conv function)
    called: tuple[str, ...] = ()


def _gdn_sliced(m) -> dict[str, tuple[int, ...]]:
    conv = (m.key_dim, m.key_dim, m.value_dim)  # the conv runs over q | k | v
    return {
        "conv1d.weight": conv,
        "conv1d.bias": conv,
        "dt_bias": (m.num_v_heads,),
        "A_log": (m.num_v_heads,),
    }


def _gdn_sizes(m, p: int) -> dict[str, int]:
    names = ("num_k_heads", "num_v_heads", "key_dim", "value_dim", "conv_dim")
    return {n: getattr(m, n) // p for n in names}


QWEN3_NEXT_GDN = MixerLayout(  # in_proj_qkvz / in_proj_ba: q, k, v, z (b, a) packed per key-head group
    projections=lambda m: {
        "in_proj_qkvz": (m.in_proj_qkvz.out_features,),
        "in_proj_ba": (2 * m.num_v_heads,),
    },
    sliced=_gdn_sliced,
    sizes=_gdn_sizes,
    unit=lambda m: m.num_k_heads,
)
QWEN3_5_GDN = MixerLayout(
    projections=lambda m: {
        "in_proj_qkv": (m.key_dim, m.key_dim, m.value_dim),
        "in_proj_z": (m.value_dim,),
        "in_proj_b": (m.num_v_heads,),
        "in_proj_a": (m.num_v_heads,),
    },
    sliced=_gdn_sliced,
    sizes=_gdn_sizes,
    unit=lambda m: m.num_k_heads,
)


def _mamba2_sliced(m) -> dict[str, tuple[int, ...]]:
    bc = m.n_groups * m.ssm_state_size
    conv = (m.intermediate_size, bc, bc)  # the conv runs over x | B | C
    heads = (m.num_heads,)
    return {
        "conv1d.weight": conv, "conv1d.bias": conv, "dt_bias": heads, "A_log": heads, "D": heads,
        "norm.weight": (m.intermediate_size,),  # normalised per group: rank r's groups only
    }  # fmt: skip


NEMOTRON_H_MAMBA2 = MixerLayout(  # in_proj: gate | x | B | C | dt
    projections=lambda m: {
        "in_proj": (m.intermediate_size, *_mamba2_sliced(m)["conv1d.weight"], m.num_heads),
    },
    sliced=_mamba2_sliced,
    sizes=lambda m, p: {
        n: getattr(m, n) // p for n in ("num_heads", "intermediate_size", "n_groups", "conv_dim")
    },
    unit=lambda m: m.n_groups,
    called=("norm",),
)

# By class: the layout is a fact about that class's forward. Classes not here run gathered.
LAYOUTS = {
    "Qwen3NextGatedDeltaNet": QWEN3_NEXT_GDN,
    "Qwen3_5GatedDeltaNet": QWEN3_5_GDN,
    "Qwen3_5MoeGatedDeltaNet": QWEN3_5_GDN,
    "NemotronHMamba2Mixer": NEMOTRON_H_MAMBA2,
}


def layout_of(mixer: nn.Module, p: int) -> MixerLayout | None:
    """The mixer's layout if it can be split over P ranks: a known class, P dividing its key heads (groups),
    and parameters that are whole tensors (ZeRO-3 partitions them; its hooks gather a module's parameters
    only around that module's own forward, not the slices taken here)."""
    layout = LAYOUTS.get(type(mixer).__name__)
    if layout is None or layout.unit(mixer) % p:
        return None
    if any(hasattr(t, "ds_id") for t in mixer.parameters()):
        return None
    return layout


def block(segments: tuple[int, ...], p: int, r: int) -> torch.Tensor:
    """Indices of rank r's channels: the r-th 1/P of every segment, in segment order."""
    parts, start = [], 0
    for n in segments:
        assert n % p == 0, (segments, p)
        w = n // p
        parts.append(torch.arange(start + r * w, start + (r + 1) * w))
        start += n
    return torch.cat(parts)


def _view(module: nn.Module, tensors: dict, children: dict, sizes: dict) -> nn.Module:
    """An instance of `module`'s class sharing its attributes, with `tensors` / `children` / `sizes` in place
    of its own: nothing of `module` changes, and the view has no hooks of its own (it is never called through
    nn.Module's hooks; the real mixer's call around it is)."""
    view = type(module).__new__(type(module))
    nn.Module.__init__(view)
    state = {k: v for k, v in vars(module).items() if not k.startswith("_")}
    for replaced in (module._parameters, module._buffers, module._modules, tensors, children, sizes):
        state.update(replaced)
    for k, v in state.items():
        object.__setattr__(view, k, v)
    return view


def _sliced(module: nn.Module, sliced: dict, group) -> tuple[dict, dict]:
    """Rank r's slices of the per-head parameters: (own tensors, {child: a namespace of its tensors})."""
    own, nested = {}, {}
    for path, segments in sliced.items():
        child, _, name = path.rpartition(".")
        holder = module.get_submodule(child) if child else module
        t = getattr(holder, name)
        if t is not None:
            t = t.index_select(0, block(segments, group.size, group.rank).to(t.device))
        (nested.setdefault(child, {}) if child else own)[name] = t
    return own, nested


def shard_view(module: nn.Module, layout: MixerLayout, group, tokens: torch.Tensor, placeholder) -> nn.Module:
    """The view of `module` that runs rank r's heads over the chunk whose m tokens `tokens` this rank holds."""
    own, nested = _sliced(module, layout.sliced(module), group)
    children = {}
    for name, tensors in nested.items():
        called = name in layout.called
        children[name] = (
            _view(module.get_submodule(name), tensors, {}, {}) if called else SimpleNamespace(**tensors)
        )
    switch = _Projections(module, layout.projections(module), group, tokens, placeholder)
    children.update({name: switch.output(name) for name in switch.names})
    out = module.get_submodule(layout.output)
    children[layout.output] = lambda y: out(group.channels_to_sequence(y))
    return _view(module, own, children, layout.sizes(module, group.size))


class _Projections:
    """The view's input projections. At the first call all of them run on this rank's tokens and switch to
    rank r's channel blocks in one all-to-all (each projection's block side by side in every rank's part);
    each projection then returns its own block. One collective per mixer forward, however many projections."""

    def __init__(self, module: nn.Module, projections: dict, group, tokens: torch.Tensor, placeholder):
        self.names = list(projections)
        self.projections = [(module.get_submodule(n), segments) for n, segments in projections.items()]
        self.group, self.tokens, self.placeholder = group, tokens, placeholder
        self.switched: dict[str, torch.Tensor] | None = None

    def output(self, name: str):
        def project(x: torch.Tensor) -> torch.Tensor:
            if x is not self.placeholder:
                raise RuntimeError(
                    "a sequence-parallel mixer's projection was given something other than the mixer's input: "
                    "its forward transforms the input before projecting, which the head-sharded path cannot see"
                )
            if self.switched is None:
                self.switched = self._switch()
            return self.switched[name]

        return project

    def _switch(self) -> dict[str, torch.Tensor]:
        p, (b, m, _) = self.group.size, self.tokens.shape
        parts = []
        for proj, segments in self.projections:
            y = proj(self.tokens)
            if len(segments) > 1:  # rank-contiguous channel blocks
                order = torch.cat([block(segments, p, r) for r in range(p)])
                y = y.index_select(-1, order.to(y.device))
            parts.append(y.reshape(b, m, p, -1))
        both = self.group.channels_to_heads(torch.cat(parts, dim=-1).reshape(b, m, -1))
        return dict(zip(self.names, both.split([t.shape[-1] for t in parts], dim=-1)))


def sharded_forward(module: nn.Module, layout: MixerLayout, group, *args, **kwargs):
    """The mixer's forward for one rank of the group: its tokens in, its tokens of the output out."""
    if args:
        tokens, rest = args[0], args[1:]
    else:
        tokens, rest = kwargs.pop("hidden_states"), ()
    if kwargs.get("attention_mask") is not None:
        raise RuntimeError("a sequence-parallel mixer got an attention mask of its shard's tokens")
    b, m, h = tokens.shape
    placeholder = tokens.new_zeros(()).expand(b, group.size * m, h)
    view = shard_view(module, layout, group, tokens, placeholder)
    return type(module).forward(view, placeholder, *rest, **kwargs)


@contextlib.contextmanager
def head_sharded(mixers: list[tuple[nn.Module, MixerLayout]], group):
    """For one step, each mixer runs `sharded_forward` (through its own call, hooks included)."""
    saved = [(m, m.__dict__.get("forward")) for m, _ in mixers]
    for m, layout in mixers:
        m.forward = lambda *a, _m=m, _l=layout, **k: sharded_forward(_m, _l, group, *a, **k)
    try:
        yield
    finally:
        for m, previous in saved:
            if previous is None:
                del m.forward
            else:
                m.forward = previous
