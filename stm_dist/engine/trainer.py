"""The training loop. What it runs on is built beside it: the model (model_setup.py), the
DeepSpeed engine and precision (ds_setup.py, step.py), the input (data_feed.py), the training
state a checkpoint restores (train_state.py), the run's checkpoints (run_checkpoints.py) and the
evaluations (run_eval.py).
"""
from __future__ import annotations

import os
import time

import torch

from . import checkpoint as ckpt
from . import config as config_mod
from . import ds_setup
from . import preemption
from .data_feed import DataFeed
from .distributed import accelerator_name, init
from .ema import ShardedEMA
from .model_setup import build_model, build_train_model  # noqa: F401  (build_model: used by tools)
from .tasks import task_for
from .run_checkpoints import RunCheckpoints, prepare_run_dir
from .run_eval import BestCheckpoints, dump_live_weights, evaluate_run, lr_groups, val_loader
from .run_log import RunLog
from .schedule import Schedules, steps_per_epoch
from .step import StepRunner, compile_engine, configure_cuda_speed, soft_target_cross_entropy  # noqa: F401
from .step_meter import StepMeter
from .train_state import TrainState, rng_state, seed_all, set_rng_state


INPUT_BOUND = 0.2  # share of a log interval spent in feed.next_step() above which the log says so


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    def __init__(self, cfg):
        self.cfg = cfg
        preemption.install()  # before the slow setup: a USR1 there must not kill the rank
        self.rank, self.world, self.device = init()
        self.accel = accelerator_name()
        on_cuda = self.accel == "cuda"
        # eval_every_epochs 0: no evaluation at all (and no val shards needed), e.g. smoke runs.
        self.validates = cfg.train.eval_every_epochs > 0
        config_mod.check_paths(cfg, need_val=self.validates)
        self.run_dir = os.path.abspath(cfg.run.out_dir)
        moved = prepare_run_dir(cfg, self.run_dir, self.rank)
        self.log = RunLog(self.run_dir, self.rank)
        if moved:
            self.log.info(f"--fresh: moved the earlier checkpoints aside to {moved}")

        from stm_dist.data import read_manifest

        self.task = task_for(cfg)
        t = cfg.train
        self.accum = ds_setup.grad_accum_steps(t.global_batch, t.micro_batch, self.world)
        self.num_train = int(read_manifest(cfg.data.train_shards, cfg.data.train_split)["num_samples"])
        if steps_per_epoch(self.num_train, t.global_batch) == 0:
            raise config_mod.ConfigError(
                f"'train.global_batch' ({t.global_batch}) is larger than the training set "
                f"({self.num_train} samples in {cfg.data.train_shards})")
        self.feed = DataFeed(cfg, self.rank, self.accum, "cuda" if on_cuda else "cpu", self.run_dir, self.task)
        # The loop's epochs end where the loader's plan does: a grouped plan (detection's aspect
        # groups) drops each group's remainder, so it can be shorter than num_train // global_batch.
        self.iters_per_epoch = len(self.feed.loader)
        self.sched = Schedules(cfg.optim, cfg.schedule, self.iters_per_epoch)
        self.total_steps = self.sched.total_steps
        if cfg.schedule.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.schedule.max_steps)

        seed_all(t.seed)  # identical initial weights on every rank
        channels_last = on_cuda if t.channels_last is None else t.channels_last
        model, groups = build_train_model(cfg, self.world, channels_last, log=self.log.info, task=self.task)

        self.ckpts = RunCheckpoints(cfg, self.run_dir, self.rank, self.world, self.log)
        load_dir, universal = self.ckpts.prepare_load()
        built = ds_setup.build(cfg, self.world, self.accel, load_universal=universal)
        self.zero_stage = built.zero_stage
        self.precision = built.precision.name
        if on_cuda:
            configure_cuda_speed()
        self.engine, self.optimizer = ds_setup.initialize(built, model, groups, cfg, self.task.fetch_units)
        if on_cuda if t.compile is None else t.compile:
            compile_engine(self.engine, self.zero_stage)
        self.runner = StepRunner(self.engine, self.optimizer, built, cfg.optim.clip_grad, self.device,
                                 channels_last=channels_last, task=self.task)
        self.meter = StepMeter(t.log_every, self.device, self.world)
        self.state = TrainState(self.feed, self._new_ema() if t.ema else None, self.runner, t.seed,
                                self.rank, self.world)

        self._last_eval = -1
        if self.ckpts.resume:
            self.ckpts.load(self.engine, self.state, load_dir, universal, new_ema=self._new_ema)
        else:
            seed_all(t.seed + self.rank)
        zero = f"ZeRO {self.zero_stage}" + (f" (fetch unit {built.fetch_unit})" if self.zero_stage == 3 else "")
        self.log.info(f"model {cfg.model.name}, {self.world} process(es), {zero}, "
                      f"{self.precision}, global batch {t.global_batch} = {t.micro_batch} x {self.world} "
                      f"x accumulation {self.accum}, {self.iters_per_epoch} steps/epoch, "
                      f"{self.total_steps} steps to run, run dir {self.run_dir}")

    def _new_ema(self):
        # EMA of the fp32 master weights, sharded like ZeRO (engine/ema.py).
        return ShardedEMA(self.engine.module, self.cfg.train.ema_decay, self.zero_stage, self.rank, self.world)

    # The loop reads and advances the position through these; TrainState holds it.
    step = property(lambda self: self.state.step, lambda self, v: setattr(self.state, "step", v))
    epoch = property(lambda self: self.state.epoch, lambda self, v: setattr(self.state, "epoch", v))
    step_in_epoch = property(lambda self: self.state.step_in_epoch,
                             lambda self, v: setattr(self.state, "step_in_epoch", v))
    ema = property(lambda self: self.state.ema)

    @property
    def last_epoch(self) -> int:
        """The epoch the latest step belongs to (at an epoch's end self.epoch has moved on)."""
        return self.epoch - 1 if self.step_in_epoch == 0 and self.epoch > 0 else self.epoch
    resume = property(lambda self: self.ckpts.resume)

    def save(self) -> str:
        return self.ckpts.save(self.engine, self.state, self.zero_stage, self.precision)

    def evaluate(self) -> dict:
        epoch = self.last_epoch  # the epoch evaluated, as in the train records of its steps
        results = {"kind": "eval", "step": self.step, "epoch": epoch}
        # Building the evaluation copies draws random initial weights: keep the training streams
        # as they were, so whether an evaluation runs (or is re-run after a resume) cannot
        # change the training that follows.
        saved_rng = rng_state()
        if getattr(self, "_best", None) is None:  # the step this start began at: see BestCheckpoints
            self._best = BestCheckpoints(self.run_dir, self.rank, self.cfg.model.name, self.state,
                                         getattr(self, "_first_step", self.step), self.log.info, self.task.metric)
        if getattr(self, "_val_loader", None) is None:
            self._val_loader = val_loader(self.cfg, self.rank, self.world, self.accel == "cuda", self.task)
        results.update(evaluate_run(self.cfg, self.engine.module, self.zero_stage, self.ema, self.rank,
                                    self.world, self.device, self.accel == "cuda", step=self.step,
                                    epoch=epoch, best=self._best, loader=self._val_loader, task=self.task,
                                    out_dir=os.path.join(self.run_dir, "eval")))
        set_rng_state(saved_rng)
        self.log.eval(results)
        if self.cfg.optim.layer_decay is not None:  # the lr each group trained with at this step
            self.log.record({"kind": "lr_groups", "step": self.step, "groups": lr_groups(self.optimizer)})
        self._last_eval = self.step
        self.state.eval_pending = None
        return results

    def _run_pending_eval(self):
        """After a resume: the evaluation the saved checkpoint was written before, unless the
        killed run finished it (metrics.jsonl has it), so the metrics show it once."""
        epoch = self.state.eval_pending
        if self.ckpts.eval_recorded(self.step):
            self.log.info(f"evaluation of epoch {epoch} (step {self.step}) is already in metrics.jsonl")
            self._last_eval = self.step
            self.state.eval_pending = None
        else:
            self.log.info(f"evaluation pending for epoch {epoch} (step {self.step}): the run stopped "
                          f"before it finished; running it now")
            self.evaluate()

    # ---------------------------------------------------------------- the loop
    def _one_step(self):
        lr = self.sched.apply(self.optimizer.param_groups, self.step)
        t0 = time.perf_counter()  # host time only: no device sync on the hot path
        micro_batches = self.feed.next_step()
        data_s = time.perf_counter() - t0
        for j, micro_batch in enumerate(micro_batches):
            inputs, targets = self.task.prepare(micro_batch)
            loss = self.runner.micro_step(inputs, targets, first=j == 0, last=j == self.accum - 1)
            self.meter.add_micro(loss)
        self.step += 1
        self.step_in_epoch += 1
        if self.ema is not None:
            self.ema.update()
        self.meter.end_step({"kind": "train", "step": self.step, "epoch": self.epoch, "lr": lr,
                             "weight_decay": float(self.sched.wd[self.step - 1]),
                             "batch": self.cfg.train.global_batch, "data_s": data_s, "time": time.time()})

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
        # The first step of a start also builds the input pipeline and warms the kernels (3x a later
        # step in the detection demo): once later steps exist, the rate comes from them alone.
        for rec in records:
            if rec["step"] == self._first_step + 1:
                self._t_first = rec["time"]
        done = self.step - self._first_step
        if done > 1 and self._t_first is not None:
            per_step = (time.time() - self._t_first) / (done - 1)
        else:
            per_step = (time.time() - self._t_start) / max(1, done)
        eta = per_step * (self.total_steps - self.step)
        share = self.meter.last_data_share
        # The first step of a start includes building the input pipeline: not a sign of a slow input.
        bound = (f"; input-bound: {100 * share:.0f}% of the step time waited for data (more data.num_threads, "
                 f"backend dali, device decoding or faster storage would help)"
                 if share > INPUT_BOUND and records[0]["step"] > self._first_step + 1 else "")
        self.log.info(f"epoch {self.epoch} step {self.step}/{self.total_steps} loss {last['loss']:.4f} "
                      f"lr {last['lr']:.3e} {last['img_s']:.0f} img/s data {100 * share:.0f}% "
                      f"ETA {eta / 60:.1f} min{bound}")
        return stop

    def _preempted(self) -> int:
        self.log.info(f"stopping after step {self.step}: {preemption.received() or 'another rank'}"
                      f" received; checkpoint {ckpt.tag_for(self.step)} holds the run, exit "
                      f"{preemption.EXIT_PREEMPTED} (restart with the same run dir to resume)")
        self.log.close()
        return preemption.EXIT_PREEMPTED

    def train(self) -> int:
        cfg, every = self.cfg, self.cfg.checkpoint.every_steps
        self.log.start_progress(self.total_steps, self.step)
        self.engine.train()
        self._t_start, self._first_step, self._t_first = time.time(), self.step, None
        last_saved = self.step if self.resume else -1
        if self.state.eval_pending is not None:
            self._run_pending_eval()
        try:
            while self.step < self.total_steps:
                if self.step_in_epoch == 0:
                    self.feed.set_epoch(self.epoch)
                stop = False
                while self.step_in_epoch < self.iters_per_epoch and self.step < self.total_steps:
                    self._one_step()
                    stop = False
                    if self.meter.full or self.step == 1 or self.step == self.total_steps:
                        stop = self._flush()
                    # An epoch's last step is saved below, after the epoch is closed (the data
                    # position is then in the next epoch, and an evaluation due is recorded).
                    if (every and self.step % every == 0 and self.step < self.total_steps
                            and self.step_in_epoch < self.iters_per_epoch):
                        self.save()
                        last_saved = self.step
                    if stop and self.step < self.total_steps and self.step_in_epoch < self.iters_per_epoch:
                        if last_saved != self.step:
                            self.save()
                        return self._preempted()
                if self.step_in_epoch >= self.iters_per_epoch:
                    self.feed.end_epoch()
                    stop = self._flush() or stop
                    epoch_done = self.epoch
                    self.epoch += 1
                    self.step_in_epoch = 0
                    ep_every = cfg.checkpoint.every_epochs
                    eval_due = self.validates and (epoch_done + 1) % cfg.train.eval_every_epochs == 0
                    if eval_due:  # a checkpoint written now records that this evaluation has not run
                        self.state.eval_pending = epoch_done
                    save_due = (ep_every and self.epoch % ep_every == 0) or (every and self.step % every == 0)
                    if (save_due or stop) and last_saved != self.step:
                        self.save()
                        last_saved = self.step
                    if stop and self.step < self.total_steps:  # its evaluation stays pending
                        return self._preempted()
                    if eval_due:
                        self.evaluate()
            self._flush()
            if last_saved != self.step:
                if self.validates and self._last_eval != self.step:
                    self.state.eval_pending = self.last_epoch
                self.save()
            if self.validates and self._last_eval != self.step:
                self.evaluate()
            if cfg.run.dump_live_weights:
                dump_live_weights(self.engine.module, self.zero_stage, self.rank,
                                  os.path.join(self.run_dir, "live_weights.pt"))
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
