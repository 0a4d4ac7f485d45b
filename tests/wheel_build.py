"""The wheel the package tests install, built from a copy of this tree in a process of its own.

tests/conftest.py starts the build as soon as the session has collected a test that needs it, at
the lowest CPU priority: compiling stm_dist._C (~1.5 min of CPU with cold objects) then runs on
whatever CPU the tests before test_package.py leave idle, instead of adding to the session.

The compiled objects are kept between sessions in a build cache (a copy of the tree with the
sources' times preserved, so ninja recompiles only what changed), one per environment: two
environments sharing one cache (their compile flags name their own torch headers) recompiled
each other's objects every session.

Run as a script: `python wheel_build.py OUT_DIR JOBS` builds the wheel into OUT_DIR."""
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BASE = os.environ.get("STM_DIST_WHEEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "stm_dist",
                                                                 "wheel_test")
CACHE = os.path.join(_BASE, hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12])
LOG = "build.log"
WHEEL_BUILD = "stm_wheel_build"  # the attribute of the pytest config holding the started Build


def _tree_files() -> list[str]:
    """What a checkout holds: tracked files and new ones git does not ignore."""
    p = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True)
    if p.returncode != 0:
        raise SystemExit(f"the wheel test copies the tree git lists: {p.stderr.decode()[-500:]}")
    return [f for f in p.stdout.decode().split("\0") if f and os.path.isfile(os.path.join(REPO, f))]


def _sync(src_dir: str):
    """`src_dir` becomes a copy of the tree; its build/ (ninja's objects) is kept."""
    if os.path.isdir(src_dir):
        for name in os.listdir(src_dir):
            if name != "build":
                path = os.path.join(src_dir, name)
                shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    for rel in _tree_files():
        dst = os.path.join(src_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(os.path.join(REPO, rel), dst)  # keeps the mtime ninja compares


def build(out: str, jobs: str) -> int:
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions at once share the cache one after the other
        src = os.path.join(CACHE, "src")
        _sync(src)
        env = dict(os.environ, STM_DIST_CUDA="0", MAX_JOBS=jobs,
                   PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
        return subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                               "--no-index", "-q", "-w", out, src], env=env, timeout=1200).returncode


class Build:
    """The build running in the background: `wait()` returns (exit status, its log's tail).
    `jobs`: parallel compiles; one beside the tests (a compile of the kernels peaks at ~1.1 GB,
    on top of the tests' own processes on a small CI machine)."""

    def __init__(self, out: str, jobs: int = 1):
        self.out = out
        os.makedirs(out, exist_ok=True)
        self._log = open(os.path.join(out, LOG), "w")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), out, str(jobs)], stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=lambda: os.nice(19))

    def wait(self, timeout=1500) -> tuple[int, str]:
        try:  # the session waits on it now: no test left to yield to (lowering needs privilege)
            os.setpriority(os.PRIO_PGRP, self.proc.pid, 0)
        except OSError:
            pass
        code = self.proc.wait(timeout=timeout)
        self._log.close()
        with open(os.path.join(self.out, LOG)) as f:
            return code, f.read()[-6000:]

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._log.close()


if __name__ == "__main__":
    sys.exit(build(sys.argv[1], sys.argv[2]))
