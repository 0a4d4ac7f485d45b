"""One resume decision for all ranks: two real processes (gloo) whose checkpoint folders list
differently (rank 1 cannot see the newest COMPLETE marker, as with node-local disks or a stale
NFS attribute cache) both resume the tag rank 0 chose."""
import json
import os
import shutil

import torch.multiprocessing as mp

from engine_launch import free_port

from stm_dist.engine import checkpoint as ckpt


def _make(ckpt_dir, steps, complete):
    for s in steps:
        d = os.path.join(ckpt_dir, ckpt.tag_for(s))
        os.makedirs(d)
        with open(os.path.join(d, "stm_rank0.pt"), "wb") as f:
            f.write(b"x" * s)
        if s in complete:
            with open(os.path.join(d, ckpt.MARKER), "w") as f:
                json.dump({"step": s, "world_size": 2, "zero_stage": 1, "files": {"stm_rank0.pt": s}}, f)


def _worker(rank, port, dirs, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    own = ckpt.latest_complete(dirs[rank], warn=lambda m: None)
    src, found = ckpt.decide_resume(dirs[rank], None, rank, warn=lambda m: None)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"own": own[0] if own else None, "chosen": found[0], "src": src}, f)
    dist.destroy_process_group()


def test_ranks_with_different_listings_resume_the_same_tag(tmp_path):
    a, b = str(tmp_path / "node0" / "checkpoints"), str(tmp_path / "node1" / "checkpoints")
    _make(a, [2, 4], complete={2, 4})
    shutil.copytree(a, b)
    os.remove(os.path.join(b, ckpt.tag_for(4), ckpt.MARKER))  # rank 1 cannot see step 4 finished
    out = str(tmp_path / "r")
    mp.spawn(_worker, args=(free_port(), [a, b], out), nprocs=2, join=True)
    r0, r1 = (json.load(open(f"{out}.{r}")) for r in (0, 1))
    assert r1["own"] == ckpt.tag_for(2)  # its own scan would have resumed an older step
    assert r0["chosen"] == r1["chosen"] == ckpt.tag_for(4)
    assert r1["src"] == a  # rank 0's folder: with a shared filesystem it is everyone's


def test_fresh_moves_checkpoints_and_best_weights_aside_never_deletes(tmp_path):
    run = str(tmp_path)
    _make(os.path.join(run, "checkpoints"), [1, 2], complete={1, 2})
    best = ["best.pth", "best.pth.json", "best_ema.pth", "best_ema.pth.json"]  # what run_eval writes
    for name in best + ["notes.txt"]:
        with open(os.path.join(run, name), "w") as f:
            f.write(name)
    moved = ckpt.move_aside(run)
    assert os.path.basename(moved).startswith("checkpoints.moved-")
    assert sorted(os.listdir(moved)) == sorted([ckpt.tag_for(1), ckpt.tag_for(2), *best])
    assert os.path.exists(os.path.join(run, "notes.txt"))  # only the run's own outputs move
    for name in best:  # the fresh run starts with no best of its own
        assert not os.path.exists(os.path.join(run, name))
        assert open(os.path.join(moved, name)).read() == name
    # Only best files left behind (no checkpoint was ever saved): they are still set aside.
    with open(os.path.join(run, "best.pth"), "w") as f:
        f.write("again")
    second = ckpt.move_aside(run)  # within the same second as the first: a folder of its own
    assert second != moved and open(os.path.join(second, "best.pth")).read() == "again"
    assert open(os.path.join(moved, "best.pth")).read() == "best.pth"
    # --fresh on a run directory that does not exist yet: nothing to move, no error.
    assert ckpt.move_aside(os.path.join(run, "new_run")) is None
    assert not os.path.exists(os.path.join(run, "new_run"))
