"""What the training benchmarks share: each mode runs in its own `deepspeed` launch of the
benchmark module in worker mode, whose rank 0 writes the measurement as JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


def launch(module: str, procs: int, forward, what: str) -> dict:
    """Run `deepspeed --module module *forward(result_path)` with `procs` processes (the venv's
    launcher, DeepSpeed's accelerator chosen as training would, one thread a rank); returns the
    JSON rank 0 wrote, or raises naming `what` with the launch's output."""
    from stm_dist.engine.distributed import _free_port, accelerator_name

    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("DS_ACCELERATOR", accelerator_name())
    env.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "r.json")
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_accelerators", str(procs),
               "--master_port", str(_free_port()), "--module", module] + forward(result)
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode != 0 or not os.path.exists(result):
            raise RuntimeError(f"{what} failed (exit {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        with open(result) as f:
            return json.load(f)


def finish_worker(measure, result_path: str):
    """Worker mode: run `measure()` on every rank, rank 0 writes its result, the rank ends."""
    import torch.distributed as dist

    from stm_dist.engine.distributed import finish

    r = measure()
    if dist.get_rank() == 0:
        with open(result_path, "w") as f:
            json.dump(r, f)
    finish(0)
