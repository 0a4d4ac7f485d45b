"""Training precision: fp32 master weights, the forward under autocast, fp16 loss scaling.

The recipe (spec §6) trained fp32 weights under fp16 autocast: residual stream, gradients,
their all-reduce and BatchNorm statistics stay fp32, only the matmuls/convs run in 16 bits.
That matters here more than usual: with layer scale 1e-6, `x + gamma * f(x)` in pure bf16
rounds to `x`, so every residual branch would be invisible at initialisation.

So DeepSpeed always runs in its fp32 mode (the module it holds *is* the fp32 master; ZeRO
accumulates and reduces fp32 gradients) and we put `torch.autocast` around the forward
ourselves, rather than using DeepSpeed's `torch_autocast` section, because in DeepSpeed 0.19
that section (a) reduces Linear/Conv gradients in the 16-bit dtype, (b) under ZeRO 1-3 pairs
fp16 with a torch GradScaler whose inf check is per rank and whose clipping sees scaled
gradients, and (c) does not cover the loss. One context of ours behaves the same at every
ZeRO stage and around a torch.compile'd module.

The DeepSpeed JSON names the mode in its `mixed_precision` section (ours; removed before the
JSON reaches DeepSpeed):
    {"dtype": "fp32" | "bf16" | "fp16" | "pure_bf16", "loss_scale": {...}}   (loss_scale: fp16 only)
`pure_bf16` is DeepSpeed's bf16 mode (weights, inputs and buffers in bf16) under an explicit name.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch

from .config import ConfigError

MODES = ("fp32", "bf16", "fp16", "pure_bf16")
SECTION = "mixed_precision"
# torch.amp.GradScaler's defaults, which the original's timm NativeScaler used.
LOSS_SCALE_DEFAULTS = {"init_scale": 2.0 ** 16, "growth_factor": 2.0, "backoff_factor": 0.5,
                       "growth_interval": 2000}
PURE_BF16_WARNING = ("pure_bf16: weights, activations and BatchNorm statistics are bf16; with "
                     "layer_scale_init_value=1e-6 every residual branch rounds away at initialisation "
                     "(x + 1e-6 * f(x) == x in bf16). Use 'bf16' (fp32 weights under autocast) to train the recipe.")


@dataclass
class Precision:
    name: str = "fp32"
    loss_scale: dict = field(default_factory=dict)

    @property
    def autocast_dtype(self):
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def input_dtype(self):
        """What the batch is cast to before the forward (DeepSpeed's bf16 module needs bf16 input)."""
        return torch.bfloat16 if self.name == "pure_bf16" else torch.float32

    @property
    def param_dtype(self):
        return torch.bfloat16 if self.name == "pure_bf16" else torch.float32

    def autocast(self, device_type: str):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)


def parse(ds: dict, path: str) -> Precision:
    """Read (and remove) the `mixed_precision` section of a DeepSpeed JSON dict."""
    for key in ("bf16", "fp16", "torch_autocast"):
        if ds.get(key, {}).get("enabled"):
            hint = {"bf16": '"mixed_precision": {"dtype": "bf16"} for fp32 weights under bf16 autocast '
                            '(the recipe), or {"dtype": "pure_bf16"} for DeepSpeed\'s all-bf16 mode',
                    "fp16": '"mixed_precision": {"dtype": "fp16", "loss_scale": {...}}',
                    "torch_autocast": '"mixed_precision": {"dtype": "bf16"} (stm-train runs the autocast itself)'}[key]
            raise ConfigError(f"'deepspeed.config' {path}: section '{key}' is managed by stm-train; "
                              f"remove it and write {hint}")
    sec = ds.pop(SECTION, None) or {}
    if not isinstance(sec, dict):
        raise ConfigError(f"'deepspeed.config' {path}: '{SECTION}' must be an object, got {sec!r}")
    unknown = set(sec) - {"dtype", "loss_scale"}
    if unknown:
        raise ConfigError(f"'deepspeed.config' {path}: unknown key(s) {sorted(unknown)} in '{SECTION}' "
                          f"(allowed: dtype, loss_scale)")
    name = sec.get("dtype", "fp32")
    if name not in MODES:
        raise ConfigError(f"'deepspeed.config' {path}: '{SECTION}.dtype' is {name!r}; choose one of {MODES}")
    ls = sec.get("loss_scale")
    if name == "fp16":
        if not isinstance(ls, dict):
            raise ConfigError(f"'deepspeed.config' {path}: '{SECTION}.dtype' fp16 needs '{SECTION}.loss_scale' "
                              f"(dynamic loss scaling; e.g. {LOSS_SCALE_DEFAULTS}); fp16 without it underflows")
        bad = set(ls) - set(LOSS_SCALE_DEFAULTS)
        if bad:
            raise ConfigError(f"'deepspeed.config' {path}: unknown key(s) {sorted(bad)} in '{SECTION}.loss_scale' "
                              f"(allowed: {sorted(LOSS_SCALE_DEFAULTS)})")
        ls = dict(LOSS_SCALE_DEFAULTS, **ls)
        if not (ls["init_scale"] > 0 and ls["growth_factor"] > 1 and 0 < ls["backoff_factor"] < 1
                and int(ls["growth_interval"]) >= 1):
            raise ConfigError(f"'deepspeed.config' {path}: '{SECTION}.loss_scale' {ls} out of range "
                              f"(init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1)")
    elif ls is not None:
        raise ConfigError(f"'deepspeed.config' {path}: '{SECTION}.loss_scale' only applies to dtype fp16 (got {name})")
    if name == "pure_bf16":
        warnings.warn(PURE_BF16_WARNING, stacklevel=2)
        ds["bf16"] = {"enabled": True}
        # DeepSpeed casts parameters but not buffers; BatchNorm then fails (PLATFORM.md).
        ds.setdefault("data_types", {})["buffer_dtype"] = "bf16"
    return Precision(name, ls or {})


class LossScaler:
    """Dynamic loss scale with torch GradScaler's rule: back off on a non-finite gradient, grow
    after `growth_interval` clean steps.

    ZeRO 1-3: DeepSpeed's optimizer takes the scale through `override_loss_scale` (it scales the
    loss, unscales before clipping and skips the step when any rank's gradient is non-finite, so
    the decision is the same on every rank); we update the scale from its overflow flag.
    ZeRO 0: the gradients are whole and already all-reduced (identical on every rank), so we
    unscale them and update the scale on the device, with no host synchronisation.
    """

    def __init__(self, cfg: dict, device):
        self.cfg = dict(LOSS_SCALE_DEFAULTS, **cfg)
        self.scale = float(self.cfg["init_scale"])
        self.good_steps = 0
        self.scale_t = torch.full((1,), self.scale, dtype=torch.float32, device=device)
        self.tracker_t = torch.zeros((1,), dtype=torch.int32, device=device)

    # -- ZeRO 1-3 (host side: DeepSpeed has already read its overflow flag)
    def update(self, overflow: bool):
        c = self.cfg
        if overflow:
            self.scale = max(self.scale * c["backoff_factor"], 2.0 ** -24)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps == int(c["growth_interval"]):
                self.scale *= c["growth_factor"]
                self.good_steps = 0

    # -- ZeRO 0 (device side)
    def update_device(self, found_inf: torch.Tensor):
        c = self.cfg
        torch._amp_update_scale_(self.scale_t, self.tracker_t, found_inf, c["growth_factor"],
                                 c["backoff_factor"], int(c["growth_interval"]))

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps,
                "scale_t": self.scale_t.cpu(), "tracker_t": self.tracker_t.cpu()}

    def load_state_dict(self, sd: dict):
        self.scale, self.good_steps = float(sd["scale"]), int(sd["good_steps"])
        self.scale_t.copy_(sd["scale_t"])
        self.tracker_t.copy_(sd["tracker_t"])

    def current(self, zero_stage: int) -> float:
        """The scale now (ZeRO 0 reads the device value: call it at the log interval only)."""
        return float(self.scale_t.item()) if zero_stage == 0 else self.scale
