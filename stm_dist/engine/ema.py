"""Exponential moving average of the fp32 master weights, sharded like ZeRO.

Each rank averages only the slice of every parameter it owns: at ZeRO 3 exactly the partition
DeepSpeed keeps on that rank (`param.ds_tensor`, which in fp32 mode *is* the master); at ZeRO
0-2, where every rank holds whole parameters, the same even split by rank. EMA memory per rank
therefore falls as 1/world, the update is one fused `torch._foreach_lerp_` over local tensors
(no communication per step), and the full average is gathered only when evaluation or an
export asks for it. Buffers (BatchNorm statistics, Swin's integer index) are small and identical
on every rank: each rank keeps them whole. Only floating-point state is averaged; integer
buffers are copied (the original's timm 0.6.7 ModelEma truncated Swin's relative_position_index,
spec §9.3). The average is kept in float32 whatever precision the model trains in.

Checkpoints hold each rank's slices (`state_dict()` per rank); `assemble()` puts any number of
them back together without a process group (stm-export), and `load_state_dict()` re-slices
them for a new world size.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def _chunk(p, zero_stage: int, world: int) -> tuple[int, int]:
    """(numel, per-rank chunk) of a parameter, in DeepSpeed's ZeRO-3 layout when it applies."""
    if zero_stage == 3 and hasattr(p, "ds_tensor"):
        return int(p.ds_numel), int(p.ds_tensor.numel())
    n = p.numel()
    return n, -(-n // world)


class ShardedEMA:
    def __init__(self, module: torch.nn.Module, decay: float, zero_stage: int = 0, rank: int = 0, world: int = 1):
        self.decay, self.zero_stage, self.rank, self.world = decay, zero_stage, rank, world
        self._params, self._buffers, self.meta = [], [], {}
        self.frags: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        for name, t in module.state_dict(keep_vars=True).items():
            if isinstance(t, torch.nn.Parameter):
                numel, chunk = _chunk(t, zero_stage, world)
                start = min(rank * chunk, numel)
                n = min(chunk, numel - start)
                shape = tuple(getattr(t, "ds_shape", t.shape))
                self.meta[name] = {"shape": shape, "numel": numel, "chunk": chunk}
                self._params.append((name, t, start, n))
                self.frags[name] = self._source(t, start, n).detach().float().clone()
            else:
                self._buffers.append((name, t))
                self.buffers[name] = t.detach().float().clone() if t.is_floating_point() else t.detach().clone()

    def _source(self, p, start: int, n: int) -> torch.Tensor:
        if self.zero_stage == 3 and hasattr(p, "ds_tensor"):
            return p.ds_tensor.view(-1)[:n]
        return p.detach().view(-1)[start:start + n]

    @torch.no_grad()
    def update(self):
        # Views are taken afresh each step: DeepSpeed may re-point .data into its flat buffers.
        dst, src = [], []
        for name, p, start, n in self._params:
            if n:
                dst.append(self.frags[name])
                s = self._source(p, start, n)
                src.append(s if s.dtype == torch.float32 else s.float())
        if dst:
            torch._foreach_lerp_(dst, src, 1.0 - self.decay)
        for name, b in self._buffers:
            e = self.buffers[name]
            if e.is_floating_point():
                e.lerp_(b.detach().float(), 1.0 - self.decay)
            else:
                e.copy_(b)

    def local_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.frags.values()) + list(self.buffers.values()))

    # -- checkpoint: one state per rank
    def state_dict(self) -> dict:
        return {"world": self.world, "zero_stage": self.zero_stage, "rank": self.rank, "meta": self.meta,
                "frags": {k: v.detach().cpu().clone() for k, v in self.frags.items()},
                "buffers": {k: v.detach().cpu().clone() for k, v in self.buffers.items()}}

    def load_state_dict(self, states: list[dict]):
        """`states`: every saved rank's state_dict(), in rank order (any world size)."""
        full = assemble(states)
        missing = set(self.meta) | set(self.buffers)
        missing -= set(full)
        unexpected = set(full) - set(self.meta) - set(self.buffers)
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
        for name, _, start, n in self._params:
            self.frags[name].copy_(full[name].reshape(-1)[start:start + n])
        for name in self.buffers:
            self.buffers[name].copy_(full[name])

    # -- the whole average (collective)
    @torch.no_grad()
    def full_state(self) -> dict:
        """Every rank gets the full EMA state dict (fp32 floats); a collective over all ranks."""
        if self.world == 1:
            return assemble([self.state_dict()])
        pieces = []
        for name, _, _, n in self._params:
            f = self.frags[name]
            chunk = self.meta[name]["chunk"]
            pieces.append(f if n == chunk else torch.cat([f, f.new_zeros(chunk - n)]))
        flat = torch.cat(pieces) if pieces else torch.zeros(0)
        if dist.get_backend() == "nccl":
            flat = flat.cuda()
        out = [torch.empty_like(flat) for _ in range(self.world)]
        dist.all_gather(out, flat)
        state = dict(self.buffers)
        off = 0
        for name, _, _, _ in self._params:
            m = self.meta[name]
            whole = torch.cat([o[off:off + m["chunk"]] for o in out])[:m["numel"]]
            state[name] = whole.view(m["shape"]).to(self.frags[name].device)
            off += m["chunk"]
        return state


def assemble(states: list[dict]) -> dict:
    """Full EMA state dict from all ranks' saved states (no process group needed)."""
    states = sorted(states, key=lambda s: s["rank"])
    if len(states) != states[0]["world"]:
        raise ValueError(f"EMA was saved by {states[0]['world']} ranks, {len(states)} state(s) given")
    out = {k: v.clone() for k, v in states[0]["buffers"].items()}
    for name, m in states[0]["meta"].items():
        whole = torch.cat([s["frags"][name].reshape(-1) for s in states])
        if whole.numel() != m["numel"]:
            raise ValueError(f"EMA slices of {name} hold {whole.numel()} values, the parameter has {m['numel']}")
        out[name] = whole.view(m["shape"])
    return out


def gathered(module: torch.nn.Module, zero_stage: int):
    """Context in which ZeRO-3 partitioned parameters are whole (read-only); a no-op otherwise."""
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
