"""`deepspeed --hostfile` as DeepSpeed users run it: pdsh over ssh to two host entries that are
this machine, and the `--no_ssh --node_rank` mode with one launcher per "node". Both train the
real stm-train for a few steps with two processes (one per host entry)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from harness import REPO, launch_env, read_metrics, tiny_overrides, tool
from services import Sshd, free_port, listeners_of

pytestmark = pytest.mark.slow
STEPS = 3
CONFIG = os.path.join(REPO, "configs", "demo_digits.yaml")


def _train_args(shards: str, run_dir: str) -> list[str]:
    return [tool("stm-train"), "--config", CONFIG, *tiny_overrides(shards, STEPS, micro_batch=16),
            f"run.out_dir={run_dir}"]


def _check_two_process_run(run_dir: str):
    with open(os.path.join(run_dir, "train.log")) as f:
        log = f.read()
    assert "2 process(es)" in log, log[-2000:]
    assert "finished:" in log, log[-2000:]
    losses, evals = read_metrics(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert evals and evals[STEPS]["top1"] >= 0
    with open(os.path.join(run_dir, "checkpoints", f"step{STEPS:09d}", "COMPLETE")) as f:
        assert json.load(f)["world_size"] == 2


@pytest.fixture
def sshd(tmp_path):
    server = Sshd(str(tmp_path / "sshd"))
    os.makedirs(server.root)
    try:
        yield server.start()
    finally:
        server.stop()


def test_deepspeed_hostfile_pdsh_over_ssh(sshd, digits_shards, tmp_path):
    # Only loopback: the throwaway sshd must not be reachable from outside.
    assert listeners_of(sshd.proc.pid) == [f"127.0.0.1:{sshd.port}"]
    work = tmp_path / "launch"
    work.mkdir()
    (work / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    # pdsh starts remote shells with almost no environment: the venv script and .deepspeed_env
    # (read from the working directory) carry what the ranks need.
    (work / "venv.sh").write_text(f"export PATH={os.path.dirname(tool('stm-train'))}:$PATH\n")
    (work / ".deepspeed_env").write_text("DS_ACCELERATOR=cpu\nOMP_NUM_THREADS=1\nPYTHONUNBUFFERED=1\n")
    run_dir = str(tmp_path / "run")
    cmd = ["deepspeed", "--hostfile", "hostfile", "--venv_script", str(work / "venv.sh"),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *_train_args(digits_shards, run_dir)]
    env = launch_env(PATH=f"{sshd.bin_dir}:{launch_env()['PATH']}")
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    # Both host entries ran a rank, each reached through ssh.
    assert "localhost: " in out and "127.0.0.1: " in out, out[-3000:]
    _check_two_process_run(run_dir)


def test_deepspeed_hostfile_no_ssh_node_rank(digits_shards, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # names are only keys without ssh
    run_dir = str(tmp_path / "run")
    port = str(free_port())
    launchers = [
        subprocess.Popen(["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                          "--master_addr", "127.0.0.1", "--master_port", port,
                          *_train_args(digits_shards, run_dir)],
                         cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
        for rank in (0, 1)
    ]
    outs = []
    try:
        for p in launchers:
            outs.append(p.communicate(timeout=400)[0])
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(launchers, outs)):
        assert p.returncode == 0, f"node_rank {rank}:\n{out[-4000:]}"
    _check_two_process_run(run_dir)


def test_usr1_to_one_rank_stops_every_rank_after_the_same_step(digits_shards, tmp_path):
    """The ranks receive a preemption signal at different moments (here only one gets it); they
    must still agree on the step to stop after, save one complete checkpoint, and exit 75."""
    import re
    import signal

    run_dir = str(tmp_path / "run")
    args = _train_args(digits_shards, run_dir)
    args = [a if not a.startswith("schedule.max_steps=") else "schedule.max_steps=40" for a in args]
    proc = subprocess.Popen(["deepspeed", "--num_accelerators", "2", "--master_port", str(free_port()), *args],
                            cwd=tmp_path, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    try:
        pids = []
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"process (\d+) spawned with command", line)
            if m:
                pids.append(int(m.group(1)))
            if re.search(r"step 2/40", line):
                break
        assert len(pids) == 2, "".join(lines[-50:])
        os.kill(pids[1], signal.SIGUSR1)  # rank 1 only
        lines.extend(proc.stdout)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines)
    assert proc.returncode == 75, out[-4000:]
    # Rank 0 never got the signal, yet stopped: on rank 1's, through the all-reduced flag.
    stopped = re.findall(r"stopping after step (\d+): another rank received", out)
    assert len(stopped) == 1, out[-3000:]
    k = int(stopped[0])
    assert 2 <= k < 40
    losses, _ = read_metrics(run_dir)
    assert max(losses) == k
    with open(os.path.join(run_dir, "checkpoints", f"step{k:09d}", "COMPLETE")) as f:
        marker = json.load(f)
    # The checkpoint is collective: complete at step k with 2 ranks means rank 1 saved the same step.
    assert marker["step"] == k and marker["world_size"] == 2
