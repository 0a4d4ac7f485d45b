"""Short commands of one test run side by side (each is mostly imports, on one core): start()
them all, then finish() each in turn and assert on its result."""
import subprocess


def start(cmd: list, **kw) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(p: subprocess.Popen, timeout: float = 300) -> subprocess.CompletedProcess:
    stdout, stderr = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
