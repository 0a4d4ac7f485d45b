"""The training loop: DeepSpeed engine, per-iteration schedules, EMA, evaluation, checkpoints.

Data sharding is by *micro-batch slot*, not by rank: a global batch is `global_batch /
micro_batch` slots, slot k reads shard k of that many, and rank r runs slots
r*accum .. r*accum+accum-1 as its accumulation micro-steps. The global batch of every step is
therefore the same whatever the world size, which is what lets a run saved on 2 processes
continue on 1 (or 8) with the same data and the same loss.
"""
from __future__ import annotations

import os
import time

import torch

from . import checkpoint as ckpt
from . import config as config_mod
from . import ds_setup
from . import preemption
from . import recipe as recipe_mod
from .distributed import accelerator_name, barrier, init
from .ema import ShardedEMA, gathered
from .evaluate import evaluate
from .run_log import RunLog
from .schedule import Schedules, steps_per_epoch
from .step import StepRunner, configure_cuda_speed, prepare_model, soft_target_cross_entropy  # noqa: F401
from .step_meter import StepMeter
from .train_state import TrainState, seed_all


class NonFiniteLoss(RuntimeError):
    pass


def build_model(cfg, for_eval: bool = False):
    from stm_dist.models import create_model

    kw = {"num_classes": cfg.model.num_classes, "img_size": cfg.model.img_size,
          "layer_scale_init_value": cfg.model.layer_scale_init_value}
    if cfg.model.drop_path_rate is not None and not for_eval:
        kw["drop_path_rate"] = cfg.model.drop_path_rate
    return create_model(cfg.model.name, **kw)


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        preemption.install()  # before the slow setup: a USR1 there must not kill the rank
        self.rank, self.world, self.device = init()
        self.accel = accelerator_name()
        config_mod.check_paths(cfg)
        self.run_dir = os.path.abspath(cfg.run.out_dir)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        moved = None
        if self.rank == 0:
            if cfg.run.fresh:
                moved = ckpt.move_aside(self.run_dir)
            os.makedirs(self.ckpt_dir, exist_ok=True)
            first = os.path.join(self.run_dir, "config.yaml")
            if not os.path.exists(first):  # the run's first config stays; every start is appended below
                config_mod.dump(cfg, first)
            config_mod.append_history(cfg, os.path.join(self.run_dir, "config_history.yaml"),
                                      time.strftime("%Y-%m-%d %H:%M:%S %z"))
        barrier()
        self.log = RunLog(self.run_dir, self.rank)
        if moved:
            self.log.info(f"--fresh: moved the earlier checkpoints aside to {moved}")

        from stm_dist.data import build_train_loader, read_manifest

        t = cfg.train
        self.accum = ds_setup.grad_accum_steps(t.global_batch, t.micro_batch, self.world)
        manifest = read_manifest(cfg.data.train_shards, "train")
        self.num_train = int(manifest["num_samples"])
        self.iters_per_epoch = steps_per_epoch(self.num_train, t.global_batch)
        if self.iters_per_epoch == 0:
            raise config_mod.ConfigError(
                f"'train.global_batch' ({t.global_batch}) is larger than the training set "
                f"({self.num_train} samples in {cfg.data.train_shards})")
        self.sched = Schedules(cfg.optim, cfg.schedule, self.iters_per_epoch)
        self.total_steps = self.sched.total_steps
        if cfg.schedule.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.schedule.max_steps)

        self.num_slots = t.global_batch // t.micro_batch
        self.my_slots = [self.rank * self.accum + j for j in range(self.accum)]
        dev = "cuda" if self.accel == "cuda" else "cpu"
        self.loaders = [
            build_train_loader(cfg.data.train_shards, t.micro_batch, rank=slot, world_size=self.num_slots,
                               seed=t.seed, img_size=cfg.model.img_size, device=dev,
                               num_threads=cfg.data.num_threads, randaug=cfg.data.randaug,
                               backend=cfg.data.backend)
            for slot in self.my_slots
        ]

        seed_all(t.seed)  # identical initial weights on every rank
        model = build_model(cfg)
        if cfg.model.pretrained:
            from stm_dist.models.pretrained import load_pretrained

            load_pretrained(model, cfg.model.pretrained)
        from stm_dist.models.param_groups import param_groups

        on_cuda = self.accel == "cuda"
        channels_last = on_cuda if t.channels_last is None else t.channels_last
        model = prepare_model(model, self.world, channels_last)  # SyncBatchNorm, memory format
        groups = param_groups(model, weight_decay=cfg.optim.weight_decay)

        # One decision for all ranks: rank 0 reads the directory and tells the others (node-local
        # disks or NFS attribute caches can show ranks different listings).
        self.src_dir, self.resume = ckpt.decide_resume(self.ckpt_dir, cfg.run.resume_from, self.rank,
                                                       warn=self.log.info)
        if self.resume:
            self._check_recipe(*self.resume)
        load_dir, universal = self.src_dir, False
        # ZeRO 0 saves whole (replicated) optimizer state, which loads at any world size;
        # DeepSpeed's universal conversion would fail on it (no per-rank optimizer files).
        if self.resume and int(self.resume[1]["world_size"]) != self.world and int(self.resume[1]["zero_stage"]) > 0:
            universal = True
            load_dir = os.path.join(self.run_dir, "checkpoints_universal")
            if self.rank == 0:
                ckpt.to_universal(self.src_dir, self.resume[0], load_dir,
                                  int(self.resume[1]["zero_stage"]), log=self.log.info)
            barrier()
        built = ds_setup.build(cfg, self.world, self.accel, load_universal=universal)
        self.zero_stage = built.zero_stage
        self.precision = built.precision.name
        if on_cuda:
            configure_cuda_speed()
        self.engine, self.optimizer = ds_setup.initialize(built, model, groups, cfg)
        if on_cuda if t.compile is None else t.compile:
            self.engine.compile()
        self.runner = StepRunner(self.engine, self.optimizer, built, cfg.optim.clip_grad, self.device,
                                 channels_last=channels_last)
        self.meter = StepMeter(t.log_every, self.device, self.world)
        # EMA of the fp32 master weights, sharded like ZeRO (engine/ema.py).
        ema = ShardedEMA(self.engine.module, t.ema_decay, self.zero_stage, self.rank, self.world) if t.ema else None
        self.state = TrainState(self.my_slots, self.loaders, ema, self.runner, t.seed, self.rank, self.world)

        from stm_dist.data import BatchAugment

        a = cfg.augment
        self.batch_aug = BatchAugment(mixup=a.mixup, cutmix=a.cutmix, switch_prob=a.switch_prob,
                                      smoothing=a.smoothing, reprob=a.reprob,
                                      num_classes=cfg.model.num_classes)
        self._last_eval = -1
        if self.resume:
            self._load(load_dir, universal)
        else:
            seed_all(t.seed + self.rank)
        self.log.info(f"model {cfg.model.name}, {self.world} process(es), ZeRO {self.zero_stage}, "
                      f"{self.precision}, global batch {t.global_batch} = {t.micro_batch} x {self.world} "
                      f"x accumulation {self.accum}, {self.iters_per_epoch} steps/epoch, "
                      f"{self.total_steps} steps to run, run dir {self.run_dir}")

    # ---------------------------------------------------------------- checkpoints
    # The loop reads and advances the position through these; TrainState holds it.
    step = property(lambda self: self.state.step, lambda self, v: setattr(self.state, "step", v))
    epoch = property(lambda self: self.state.epoch, lambda self, v: setattr(self.state, "epoch", v))
    step_in_epoch = property(lambda self: self.state.step_in_epoch,
                             lambda self, v: setattr(self.state, "step_in_epoch", v))
    ema = property(lambda self: self.state.ema)

    def _client_state(self) -> dict:
        return dict(self.state.state_dict(), config_hash=recipe_mod.recipe_hash(recipe_mod.recipe(self.cfg)), config=self.cfg.to_dict())

    def _check_recipe(self, tag: str, marker: dict):
        where = os.path.join(self.src_dir, tag)
        if "recipe" not in marker:  # written before recipes were recorded
            if marker.get("config_hash") != recipe_mod.recipe_hash(recipe_mod.recipe(self.cfg)):
                self.log.info(f"warning: {where} records no recipe to compare; continuing it")
            return
        diffs = recipe_mod.differences(marker["recipe"], recipe_mod.recipe(self.cfg))
        if not diffs:
            return
        listing = "\n  ".join(diffs)
        if self.cfg.run.allow_recipe_change:
            self.log.info(f"run.allow_recipe_change=true: continuing {where} with a changed recipe:\n  {listing}")
            return
        raise config_mod.ConfigError(
            f"{where} was trained with another recipe (saved -> now):\n  {listing}\n"
            f"Use another run.out_dir, pass --fresh to move these checkpoints aside, or set "
            f"run.allow_recipe_change=true to continue with the change.")

    def save(self) -> str:
        meta = {"world_size": self.world, "zero_stage": self.zero_stage, "precision": self.precision,
                "model": self.cfg.model.name, "epoch": self.epoch, "config_hash": recipe_mod.recipe_hash(recipe_mod.recipe(self.cfg)),
                "recipe": recipe_mod.recipe(self.cfg)}
        tag = ckpt.save(self.engine, self.ckpt_dir, self.step, self._client_state(), meta,
                        self.cfg.checkpoint.keep_last, self.rank)
        self.log.info(f"saved checkpoint {tag} (epoch {self.epoch}, step {self.step})")
        return tag

    def _load(self, load_dir: str, universal: bool):
        tag, marker = self.resume
        tag_dir = os.path.join(self.src_dir, tag)
        path, _ = self.engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {os.path.join(load_dir, tag)}")
        saved_world = int(marker["world_size"])
        clients = ckpt.load_all_clients(tag_dir, saved_world)
        t = self.cfg.train
        self.state.load_state_dict(clients, tag_dir, log=self.log.info, new_ema=lambda: ShardedEMA(
            self.engine.module, t.ema_decay, self.zero_stage, self.rank, self.world))
        self.log.info(f"resumed from {tag_dir} at epoch {self.epoch}, step {self.step}"
                      + (f" (saved by {saved_world} processes, loaded via universal checkpoint)" if universal else ""))

    # ---------------------------------------------------------------- evaluation
    def _eval_copy(self, state: dict | None = None):
        model = build_model(self.cfg, for_eval=True).to(self.device)
        if state is None:
            with gathered(self.engine.module, self.zero_stage):
                state = {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()}
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        return model

    def evaluate(self) -> dict:
        from stm_dist.data import build_val_loader, read_manifest

        cfg = self.cfg
        expected = int(read_manifest(cfg.data.val_shards, "val")["num_samples"])
        results = {"kind": "eval", "step": self.step, "epoch": self.epoch}
        models = [("", self._eval_copy())]
        if self.ema is not None:
            models.append(("_ema", self._eval_copy(self.ema.full_state())))
        for suffix, model in models:
            loader = build_val_loader(cfg.data.val_shards, cfg.data.eval_batch, rank=self.rank,
                                      world_size=self.world, img_size=cfg.model.img_size,
                                      crop_pct=cfg.data.crop_pct,
                                      device="cuda" if self.accel == "cuda" else "cpu",
                                      num_threads=cfg.data.num_threads, backend=cfg.data.backend)
            r = evaluate(model, loader, self.device, expected_samples=expected)
            results.update({f"top1{suffix}": r["top1"], f"top5{suffix}": r["top5"], f"loss{suffix}": r["loss"]})
        self.log.eval(results)
        self._last_eval = self.step
        return results

    def _dump_live_weights(self):
        with gathered(self.engine.module, self.zero_stage):
            state = {k: v.detach().clone() for k, v in self.engine.module.state_dict().items()}
        if self.rank == 0:
            torch.save(state, os.path.join(self.run_dir, "live_weights.pt"))

    # ---------------------------------------------------------------- the loop
    def _one_step(self, iters):
        lr = self.sched.apply(self.optimizer.param_groups, self.step)
        for j in range(self.accum):
            images, labels = next(iters[j])
            images, targets = self.batch_aug(images, labels)
            loss = self.runner.micro_step(images, targets, first=j == 0, last=j == self.accum - 1)
            self.meter.add_micro(loss)
        self.step += 1
        self.step_in_epoch += 1
        if self.ema is not None:
            self.ema.update()
        self.meter.end_step({"kind": "train", "step": self.step, "epoch": self.epoch, "lr": lr,
                             "weight_decay": float(self.sched.wd[self.step - 1]),
                             "batch": self.cfg.train.global_batch})

    def _flush(self) -> bool:
        """Collective, every log_every steps: write the pending step records; True = stop now
        (a rank received a stop signal). Raises NonFiniteLoss naming the first bad step."""
        records, stop, first_bad = self.meter.flush(preemption.received() is not None)
        if not records:
            return stop
        last = records[-1]
        last["grad_norm"] = self.runner.read_grad_norm()
        if self.runner.scaler is not None:
            last["loss_scale"] = self.runner.scaler.current(self.zero_stage)
        if torch.cuda.is_available():
            last["mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:  # peak resident memory of this process (Linux reports KiB)
            import resource

            last["mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        for rec in records:
            self.log.step(rec)
        if first_bad is not None:
            raise NonFiniteLoss(f"non-finite loss at step {first_bad} (epoch {self.epoch}); the optimizer "
                                f"skipped the non-finite update(s), stopping at step {self.step}")
        eta = (time.time() - self._t_start) / max(1, self.step - self._first_step) * (self.total_steps - self.step)
        self.log.info(f"epoch {self.epoch} step {self.step}/{self.total_steps} loss {last['loss']:.4f} "
                      f"lr {last['lr']:.3e} {last['img_s']:.0f} img/s ETA {eta / 60:.1f} min")
        return stop

    def train(self) -> int:
        cfg, every = self.cfg, self.cfg.checkpoint.every_steps
        self.log.start_progress(self.total_steps, self.step)
        self.engine.train()
        self._t_start, self._first_step = time.time(), self.step
        last_saved = self.step if self.resume else -1
        try:
            while self.step < self.total_steps:
                if self.step_in_epoch == 0:
                    for ld in self.loaders:
                        ld.set_epoch(self.epoch)
                iters = [iter(ld) for ld in self.loaders]
                while self.step_in_epoch < self.iters_per_epoch and self.step < self.total_steps:
                    self._one_step(iters)
                    stop = False
                    if self.meter.full or self.step == 1 or self.step == self.total_steps:
                        stop = self._flush()
                    if every and self.step % every == 0 and self.step < self.total_steps:
                        self.save()
                        last_saved = self.step
                    if stop and self.step < self.total_steps:
                        if last_saved != self.step:
                            self.save()
                        self.log.info(f"stopping after step {self.step}: {preemption.received() or 'another rank'}"
                                      f" received; checkpoint {ckpt.tag_for(self.step)} holds the run, exit "
                                      f"{preemption.EXIT_PREEMPTED} (restart with the same run dir to resume)")
                        self.log.close()
                        return preemption.EXIT_PREEMPTED
                if self.step_in_epoch >= self.iters_per_epoch:
                    self._flush()
                    epoch_done = self.epoch
                    self.epoch += 1
                    self.step_in_epoch = 0
                    ep_every = cfg.checkpoint.every_epochs
                    if ep_every and self.epoch % ep_every == 0 and last_saved != self.step:
                        self.save()
                        last_saved = self.step
                    if cfg.data.val_shards and (epoch_done + 1) % cfg.train.eval_every_epochs == 0:
                        self.evaluate()
            self._flush()
            if last_saved != self.step:
                self.save()
            if cfg.data.val_shards and self._last_eval != self.step:
                self.evaluate()
            if cfg.run.dump_live_weights:
                self._dump_live_weights()
        except NonFiniteLoss as e:
            if last_saved == self.step:
                self.log.info(f"stopping: {e}; checkpoint {ckpt.tag_for(self.step)} holds the weights")
            else:
                self.log.info(f"stopping: {e}; saving checkpoint {ckpt.tag_for(self.step)}, whose weights "
                              f"never took a non-finite update")
                self.save()
            self.log.close()
            return 2
        self.log.info(f"finished: {self.step} steps in {(time.time() - self._t_start) / 60:.1f} min")
        self.log.close()
        return 0
