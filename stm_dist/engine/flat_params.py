"""ZeRO 3 fetch unit "flat": each fetch unit's parameters as one flat tensor per optimizer group.

DeepSpeed's ZeRO 3 does its bookkeeping per parameter tensor: on every step each tensor is
gathered, waited for, released, copied into the gradient bucket, partitioned and normed in
Python. A ConvNeXt block has nine tensors (depth-wise conv, norm, two linears, layer scale);
here it has two, one per optimizer group (decayed and not), so DeepSpeed sees 302 -> 60 tensors
at unified_convnext_micro and its per-tensor Python falls by that factor (docs/perf.md). This is
FSDP's flat parameter, built beside DeepSpeed instead of inside it:

* `flatten(model, units, groups)` moves every trainable parameter of each unit into
  `unit.flat_params_<g>` (g: the index of its optimizer group, so weight decay, lr scale and
  layer id stay per group) and deletes the original registrations. A parameter in channels_last
  memory format is stored in that order, so the convolution still gets a channels_last weight.
* The unit's forward first sets each original attribute (`block.dwconv.weight`, ...) to a view
  of the gathered flat tensor, runs, and puts an empty placeholder back: autograd keeps what the
  backward needs, gradients flow through the views into the flat tensor, and no view keeps a
  gathered copy alive between steps.
* The original names are a property of the weights, not of this layout: `Layout.unflatten`
  turns any state dict holding flat tensors (the live module gathered, the EMA, a consolidated
  checkpoint) back into the model's own keys. The layout travels in every checkpoint.

The values, their optimizer and their gradients are those of the unflattened model: AdamW is
elementwise, the gradient norm is a sum over elements, and each view's gradient is the one the
original parameter would have had. A parameter the forward does not use gets a zero gradient
instead of none (AdamW then decays it; ours use every parameter).

What it costs: a view saved for the backward keeps its unit's gathered storage until the
backward has used it, which DeepSpeed's default limits (the whole model whole from forward to
backward) keep anyway; a config that bounds what is whole during a step
(ds_configs/variants/zero3_fp32_bounded.json) fetches by "block" instead.
"""
from __future__ import annotations

import torch
import torch.nn as nn

PREFIX = "flat_params_"
# What an original attribute holds outside its unit's forward (module reprs and `x.bias is None`
# checks must still work; no view may keep a gathered copy alive).
_EMPTY = torch.empty(0)


class FlatLayoutError(ValueError):
    pass


class Layout:
    """Which original parameters each flat tensor holds: {flat name: [(name, shape, channels_last)]},
    names relative to the model root."""

    def __init__(self, entries: dict[str, list[tuple[str, tuple, bool]]]):
        self.entries = entries

    def to_json(self) -> dict:
        return {k: [[n, list(s), cl] for n, s, cl in v] for k, v in self.entries.items()}

    @classmethod
    def from_json(cls, d: dict) -> "Layout":
        return cls({k: [(n, tuple(s), bool(cl)) for n, s, cl in v] for k, v in d.items()})

    def __eq__(self, other) -> bool:
        return isinstance(other, Layout) and self.to_json() == other.to_json()

    def unflatten(self, sd: dict) -> dict:
        """`sd` with every flat tensor replaced by the original parameters (views of it)."""
        out = {}
        for key, value in sd.items():
            entries = self.entries.get(key)
            if entries is None:
                out[key] = value
                continue
            flat = value.reshape(-1)
            sizes = [_numel(shape) for _, shape, _ in entries]
            if flat.numel() != sum(sizes):
                raise FlatLayoutError(f"{key}: {flat.numel()} values, its layout holds {sum(sizes)} "
                                      f"({len(entries)} parameters from {entries[0][0]} on)")
            for (name, shape, cl), chunk in zip(entries, flat.split(sizes)):
                out[name] = _shaped(chunk, shape, cl)
        return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _channels_last(p: torch.Tensor) -> bool:
    return p.dim() == 4 and not p.is_contiguous() and p.is_contiguous(memory_format=torch.channels_last)


def _shaped(chunk: torch.Tensor, shape, cl: bool) -> torch.Tensor:
    if cl:  # stored as (O, H, W, I): the same tensor, channels_last strides
        o, i, h, w = shape
        return chunk.view(o, h, w, i).permute(0, 3, 1, 2)
    return chunk.view(shape)


def _stored(p: torch.Tensor, cl: bool) -> torch.Tensor:
    return (p.permute(0, 2, 3, 1) if cl else p).reshape(-1)


def layout_of(module: nn.Module) -> Layout | None:
    return getattr(module, "_stm_flat_layout", None)


def unflatten(module: nn.Module, sd: dict) -> dict:
    """A state dict of `module` (or of its EMA) in the model's own keys."""
    layout = layout_of(module)
    return layout.unflatten(sd) if layout is not None else sd


# The attributes are plain instance attributes (no longer registered parameters): written into
# __dict__ directly, nn.Module.__setattr__'s checks cost more than the views.
def _bind(unit: nn.Module, slots) -> None:
    """Point every original attribute at its view of the (gathered) flat tensors."""
    for pname, sizes, entries in slots:
        for (mod, attr, shape, cl), chunk in zip(entries, getattr(unit, pname).split(sizes)):
            mod.__dict__[attr] = _shaped(chunk, shape, cl)


def _unbind(slots) -> None:
    for _, _, entries in slots:
        for mod, attr, _, _ in entries:
            mod.__dict__[attr] = _EMPTY


def _wrap_forward(unit: nn.Module, slots) -> None:
    inner = unit.forward
    # Outside dynamo's tracing, as DeepSpeed's own hooks at the same unit boundaries are
    # (wrapped here, not at import: torch.compiler.disable imports torch._dynamo, ~2.5 s, which
    # stm-export and other readers of this module's layouts do not need).
    bind, unbind = torch.compiler.disable(_bind), torch.compiler.disable(_unbind)

    def forward(*args, **kwargs):
        bind(unit, slots)
        try:
            return inner(*args, **kwargs)
        finally:
            unbind(slots)

    unit.forward = forward


def flatten(model: nn.Module, units: list[nn.Module], groups: list[dict]) -> list[dict]:
    """Flatten each unit's parameters per optimizer group (see the module docstring); returns the
    groups with the flat tensors in place of the originals and sets `model._stm_flat_layout`.
    Call before deepspeed.initialize, on the model every rank builds identically."""
    gid = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
    name_of = {id(p): n for n, p in model.named_parameters()}
    flats: dict[int, list] = {i: [] for i in range(len(groups))}
    moved: set[int] = set()
    layout: dict[str, list] = {}
    unit_name = {id(m): n for n, m in model.named_modules()}
    for unit in units:
        by_group: dict[int, list] = {}
        for mod in unit.modules():
            for attr, p in list(mod._parameters.items()):
                if p is None or id(p) not in gid:
                    continue  # frozen: not the optimizer's, DeepSpeed treats it on its own
                if id(p) in moved:
                    raise FlatLayoutError(f"{name_of[id(p)]} is shared between fetch units; "
                                          f"fetch by 'block' (zero3_fetch_unit) instead")
                moved.add(id(p))
                by_group.setdefault(gid[id(p)], []).append((mod, attr, p))
        slots = []
        for g, members in sorted(by_group.items()):
            cls = [_channels_last(p) for _, _, p in members]
            flat = nn.Parameter(torch.cat([_stored(p.detach(), cl) for (_, _, p), cl in zip(members, cls)]))
            pname = f"{PREFIX}{g}"
            for mod, attr, _ in members:
                del mod._parameters[attr]
            unit.register_parameter(pname, flat)
            entries = [(mod, attr, tuple(p.shape), cl) for (mod, attr, p), cl in zip(members, cls)]
            slots.append((pname, [p.numel() for _, _, p in members], entries))
            prefix = unit_name[id(unit)]
            layout[f"{prefix}.{pname}" if prefix else pname] = [
                (name_of[id(p)], tuple(p.shape), cl) for (_, _, p), cl in zip(members, cls)]
            flats[g].append(flat)
        if slots:
            _unbind(slots)
            _wrap_forward(unit, slots)
    if not layout:  # no units (gradient checkpointing): nothing was flattened
        return groups
    model._stm_flat_layout = Layout(layout)
    out = []
    for i, g in enumerate(groups):
        g = dict(g)
        g["params"] = [p for p in g["params"] if id(p) not in moved] + flats[i]
        out.append(g)
    return out

