"""One optimizer step of the DeepSpeed engine without a host synchronisation per micro-step.

Forward under the run's autocast, soft-target cross-entropy in fp32, backward, optimizer step.
The loss comes back as a detached device tensor; the trainer sums those on the device and
reads them at the log interval. Non-finite gradients never reach the weights: ZeRO 1-3 skip
such a step inside DeepSpeed (it checks the gradient norm once per optimizer step anyway),
and at ZeRO 0 the fused AdamW is handed a device-side `found_inf` flag, as torch's GradScaler
does, so the check costs no synchronisation.
"""
from __future__ import annotations

import os

import torch

from . import ds_setup
from . import sync_bn
from .precision import LossScaler
from .tasks.classification import soft_target_cross_entropy  # noqa: F401  (benchmarks import it here)


def configure_cuda_speed():
    """TF32 matmuls/convs and cudnn autotuning, as the original set them."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


class StepRunner:
    def __init__(self, engine, optimizer, built: ds_setup.Built, clip_grad: float, device,
                 channels_last: bool = False, task=None):
        """`task`: what a batch is and its loss (engine/tasks/); None = classification."""
        self.engine, self.optimizer, self.built = engine, optimizer, built
        if task is None:
            from .tasks.classification import ClassificationTask

            task = ClassificationTask(None)
        self.task = task
        self.precision = built.precision
        self.zero_stage = built.zero_stage
        self.clip_grad = clip_grad
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        self.scaler = LossScaler(self.precision.loss_scale, self.device) if self.precision.name == "fp16" else None
        if self.scaler is not None and not built.own_optimizer:
            # fp32-mode ZeRO checks overflow only through the gradient norm; ask for the explicit check.
            optimizer.check_grad_overflow = True
        self._ones = torch.ones(1, device=self.device)
        self.grad_norm = None  # ZeRO 0: a device tensor; else DeepSpeed's value

    def forward_loss(self, inputs, targets) -> torch.Tensor:
        return self.task.forward_loss(self.engine, inputs, targets, self.device, self.precision, self.channels_last)

    def micro_step(self, images, targets, first: bool, last: bool) -> torch.Tensor:
        if first and self.scaler is not None and not self.built.own_optimizer:
            self.optimizer.override_loss_scale(self.scaler.scale)
        loss = self.forward_loss(images, targets)
        if self.scaler is not None and self.built.own_optimizer:
            self.engine.backward(loss * self.scaler.scale_t[0])
        else:
            self.engine.backward(loss)
        if last and self.built.own_optimizer:
            self._zero0_unscale_clip()
        self.engine.step()
        if last and self.scaler is not None and not self.built.own_optimizer:
            self.scaler.update(bool(getattr(self.optimizer, "overflow", False)))
        return loss.detach()

    def train_step(self, batches) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches [(inputs, targets), ...]."""
        total = None
        for j, (x, t) in enumerate(batches):
            loss = self.micro_step(x, t, first=j == 0, last=j == len(batches) - 1)
            total = loss if total is None else total + loss
        return total / len(batches)

    @torch.no_grad()
    def _zero0_unscale_clip(self):
        # At ZeRO 0 the gradients are whole and already all-reduced, so every rank reaches
        # the same found_inf: no collective is needed to agree on skipping.
        grads = [p.grad for p in self.params if p.grad is not None]
        found = torch.zeros(1, device=self.device)
        inv = self._ones if self.scaler is None else self.scaler.scale_t.reciprocal()
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)
        if self.clip_grad > 0:
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad, foreach=True)
        self.optimizer.found_inf = found.view(())  # fused AdamW wants a 0-dim flag
        if self.scaler is not None:
            self.scaler.update_device(found)

    def read_grad_norm(self):
        """The last step's gradient norm as a float (a host sync at ZeRO 0: log steps only)."""
        if self.built.own_optimizer:
            return None if self.grad_norm is None else float(self.grad_norm)
        gn = self.engine.get_global_grad_norm()
        return None if gn is None else float(gn)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, sd: dict):
        if self.scaler is not None and sd.get("scaler") is not None:
            self.scaler.load_state_dict(sd["scaler"])


def prepare_model(model: torch.nn.Module, world_size: int, channels_last: bool) -> torch.nn.Module:
    """What every training model gets before DeepSpeed wraps it.

    channels_last applies to the activations only (StepRunner converts each batch; cudnn then
    picks NHWC kernels from the input): DeepSpeed's broadcast views every parameter as bytes,
    which needs stride(-1) == 1, and ZeRO 1/2 re-point parameters into flat NCHW buffers anyway."""
    sync_bn.convert(model)
    return model


def compile_engine(engine, zero_stage: int):
    """torch.compile the engine's module (`train.compile`).

    Under ZeRO 3 with parameters fetched per block, the same block code runs once per block
    with that block's gathered weights; torch's automatic dynamic shapes then turns the second
    shape it sees into symbols, and inductor fails to lower the block (torch 2.14 CPU: "cannot
    determine truth value of Relational" in get_stride_order). Static shapes compile each block
    shape once instead."""
    engine.compile(compile_kwargs={"dynamic": False} if zero_stage == 3 else {})


def build_engine(model, precision: str = "bf16", zero_stage: int = 1, global_batch: int = 128,
                 micro_batch: int = 128, compile: bool = False, channels_last: bool = True, lr: float = 1e-3,
                 weight_decay: float = 0.05, clip_grad: float = 5.0, ds_config: str | None = None) -> StepRunner:
    """The trainer's engine on a bare model, for benchmarks (needs the process group up).

    ds_config: a DeepSpeed JSON to use instead of the shipped ds_configs/zero{stage}_{precision}.json
    (zero_stage and precision are then read from it)."""
    from stm_dist.models.param_groups import param_groups

    from stm_dist import package_data

    from .config import ExperimentConfig
    from .distributed import accelerator_name

    world = torch.distributed.get_world_size()
    accel = accelerator_name()
    device = torch.device("cuda", torch.cuda.current_device()) if accel == "cuda" else torch.device("cpu")
    configure_cuda_speed()
    cfg = ExperimentConfig()
    cfg.train.global_batch, cfg.train.micro_batch = global_batch, micro_batch
    cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.clip_grad = lr, weight_decay, clip_grad
    cfg.deepspeed.config = ds_config or os.path.join(package_data.folder("ds_configs") or "ds_configs",
                                                     f"zero{zero_stage}_{precision}.json")
    built = ds_setup.build(cfg, world, accel)
    model = prepare_model(model, world, channels_last).to(device)
    groups = param_groups(model, weight_decay=weight_decay)
    engine, optimizer = ds_setup.initialize(built, model, groups, cfg)
    if compile:
        compile_engine(engine, built.zero_stage)
    for g in optimizer.param_groups:
        g["lr"] = lr
    return StepRunner(engine, optimizer, built, clip_grad, device, channels_last=channels_last)
