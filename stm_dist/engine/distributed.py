"""Process-group setup shared by train and eval, under `deepspeed`, `torchrun` or a bare process."""
from __future__ import annotations

import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_defaults():
    """A bare `python -m ...` gets a world of one; DeepSpeed would otherwise look for mpi4py."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def accelerator_name() -> str:
    """'cuda' when a GPU is visible, else 'cpu'; DS_ACCELERATOR wins when set."""
    name = os.environ.get("DS_ACCELERATOR")
    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def quiet_known_warnings():
    """DeepSpeed 0.19 calls collectives torch 2.14 has renamed; the FutureWarning repeats on
    every rank and step and says nothing the user can act on."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.\w+` is deprecated")
    # SyncBatchNorm's differentiable all-reduce (torch.distributed.nn): its suggested replacement
    # has no autograd; the warning would repeat every micro-step.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated")


def init(use_deepspeed: bool = True):
    """Start the process group (gloo on CPU, nccl on GPUs); return (rank, world_size, device)."""
    quiet_known_warnings()
    set_single_process_defaults()
    accel = accelerator_name()
    os.environ.setdefault("DS_ACCELERATOR", accel)
    backend = "nccl" if accel == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        if use_deepspeed:
            import deepspeed

            deepspeed.init_distributed(dist_backend=backend, verbose=False)
            if accel == "cpu":
                _unlink_shm_buffer()
        else:
            torch.distributed.init_process_group(backend=backend)
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def _unlink_shm_buffer():
    """DeepSpeed's CPU shared-memory all-reduce creates /dev/shm/deepspeed_allreduce_buffer_* (67 MB
    per rank) and never removes it, so every run, killed or not, left its buffers in RAM (19 GB
    of /dev/shm after a day of tests). Once every rank has mapped every buffer (the barrier:
    each rank's init opened its peers' before returning), the names can go; the mappings stay."""
    torch.distributed.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}")
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum a few float64 scalars over ranks (deterministic for a fixed world size)."""
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def finish(code: int):
    """End the rank with exit status `code`. Ending with os._exit after flushing avoids the rare
    gloo worker-thread crash during interpreter shutdown (PLATFORM.md); a failed run still
    exits non-zero."""
    import sys

    if torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # the group may already be broken on failure; exit status says so
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
