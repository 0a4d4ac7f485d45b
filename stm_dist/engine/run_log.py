"""What a run tells the user: a tqdm bar, TensorBoard scalars, a plain-text log and a JSON-lines
record of every optimizer step (losses written with full precision, so two runs can be compared
bit for bit). Only rank 0 writes; other ranks' messages go to stderr.
"""
from __future__ import annotations

import json
import os
import sys
import time

from tqdm import tqdm


class RunLog:
    def __init__(self, run_dir: str, rank: int):
        self.rank = rank
        self.main = rank == 0
        self.bar = None
        self.tb = None
        self._text = None
        self._jsonl = None
        if not self.main:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._text = open(os.path.join(run_dir, "train.log"), "a", buffering=1)
        self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except ImportError:
            self.info("tensorboard is not installed; scalars go to metrics.jsonl only")

    def start_progress(self, total_steps: int, initial_step: int):
        # The bar only where someone watches (a terminal); logs and tests get the text lines.
        if self.main:
            self.bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True,
                            disable=not sys.stderr.isatty())

    def info(self, msg: str, all_ranks: bool = False):
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        if self.main:
            if self.bar is not None and not self.bar.disable:
                self.bar.write(line)
            else:
                print(line, flush=True)
            if self._text:
                self._text.write(line + "\n")
        elif all_ranks:
            print(f"[rank {self.rank}] {line}", file=sys.stderr, flush=True)

    def step(self, record: dict):
        """One optimizer step: record has step, epoch, loss, lr, grad_norm, img_s, ..."""
        if not self.main:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        step = record["step"]
        if self.tb:
            for k in ("loss", "lr", "weight_decay", "grad_norm", "img_s", "mem_gb", "data_s"):
                if record.get(k) is not None:
                    self.tb.add_scalar(f"train/{k}", record[k], step)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(ep=record["epoch"], loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record.get('img_s', 0):.0f}", refresh=False)

    def record(self, record: dict):
        """Another kind of record (it has 'kind' and 'step'): metrics.jsonl only."""
        if self.main:
            self._jsonl.write(json.dumps(record) + "\n")

    def eval(self, record: dict):
        if not self.main:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        if self.tb:
            for k, v in record.items():
                if k.startswith(("top1", "top5", "loss")):
                    self.tb.add_scalar(f"eval/{k}", v, record["step"])
        self.info("eval " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in record.items() if k != "kind"))

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.tb:
            self.tb.close()
        for f in (self._text, self._jsonl):
            if f:
                f.close()
