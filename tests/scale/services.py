"""Throwaway daemons for the scale tests: sshd for DeepSpeed's pdsh launcher, and a one-node
slurm (munged + slurmctld + slurmd). Everything lives in a temp folder, listens on 127.0.0.1
only, uses its own ports, and is stopped by the fixture that started it, even on failure.

CI starts from a fresh machine, so missing Debian packages are installed here (root needed).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

APT_PACKAGES = {"pdsh": "/usr/bin/pdsh", "openssh-server": "/usr/sbin/sshd",
                "openssh-client": "/usr/bin/ssh-keygen", "slurm-wlm": "/usr/sbin/slurmctld",
                "munge": "/usr/sbin/munged"}


class ServiceError(RuntimeError):
    pass


def ensure_packages(names: list[str]):
    missing = [n for n in names if not os.path.exists(APT_PACKAGES[n])]
    if not missing:
        return
    if os.geteuid() != 0:
        raise ServiceError(f"Debian packages {missing} are missing and installing them needs root: "
                           f"apt-get install -y {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # The packages' install scripts must not start system daemons (an sshd on 0.0.0.0:22):
    # Debian's policy-rc.d hook, exit 101 = "not allowed", unless the machine already has one.
    policy = "/usr/sbin/policy-rc.d"
    own_policy = not os.path.exists(policy)
    if own_policy:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise ServiceError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                                   f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    finally:
        if own_policy:
            os.remove(policy)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout: float, what: str, poll: float = 0.5, log: str | None = None):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(poll)
    tail = ""
    if log and os.path.isfile(log):
        with open(log, errors="replace") as f:
            tail = "\n--- " + log + " ---\n" + f.read()[-3000:]
    raise ServiceError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop(proc: subprocess.Popen | None, name: str, timeout: float = 15):
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def listeners_of(pid: int) -> list[str]:
    """"addr:port" of every TCP socket the process `pid` listens on (read from /proc, so no
    iproute2 is needed); IPv6 addresses are shown in brackets."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] != "0A" or cols[9] not in inodes:  # 0A = LISTEN
                    continue
                addr_hex, port_hex = cols[1].split(":")
                raw = bytes.fromhex(addr_hex)
                if v6:
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    addr = "[" + socket.inet_ntop(socket.AF_INET6, words) + "]"
                else:
                    addr = socket.inet_ntoa(raw[::-1])
                found.append(f"{addr}:{int(port_hex, 16)}")
    return sorted(found)


class Sshd:
    """sshd on 127.0.0.1:<port>, key-only, one throwaway key; `bin_dir` holds an `ssh` that
    uses this instance's client config (put it first on PATH: DeepSpeed and pdsh call `ssh`)."""

    def __init__(self, root: str):
        self.root = root
        self.port = free_port()
        self.bin_dir = os.path.join(root, "bin")
        self.proc = None

    def start(self):
        ensure_packages(["openssh-server", "openssh-client", "pdsh"])
        r = self.root
        os.makedirs(self.bin_dir, exist_ok=True)
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation directory
        for key in ("host_key", "client_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(r, key)],
                           check=True)
        shutil.copy(os.path.join(r, "client_key.pub"), os.path.join(r, "authorized_keys"))
        user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        with open(os.path.join(r, "sshd_config"), "w") as f:
            f.write(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {r}/host_key
AuthorizedKeysFile {r}/authorized_keys
PidFile {r}/sshd.pid
AllowUsers {user}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
X11Forwarding no
AllowTcpForwarding no
""")
        with open(os.path.join(r, "ssh_config"), "w") as f:
            f.write(f"""Host localhost 127.0.0.1
  Port {self.port}
  IdentityFile {r}/client_key
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  BatchMode yes
  LogLevel ERROR
""")
        wrapper = os.path.join(self.bin_dir, "ssh")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\nexec /usr/bin/ssh -F {r}/ssh_config "$@"\n')
        os.chmod(wrapper, 0o755)
        log = os.path.join(r, "sshd.log")
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", os.path.join(r, "sshd_config")],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT)
        wait_for(lambda: listening(self.port) or self.proc.poll() is not None, 20, "sshd to listen", log=log)
        if self.proc.poll() is not None:
            raise ServiceError(f"sshd exited with {self.proc.returncode}; see {log}")
        return self

    def stop(self):
        stop(self.proc, "sshd")


class Slurm:
    """A one-node slurm cluster on this machine: munged, slurmctld and slurmd with a private
    config, state and munge socket under `root`. `env` is what slurm commands need (SLURM_CONF);
    jobs inherit it from sbatch."""

    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.host = socket.gethostname().split(".")[0]
        self.ctld_port, self.slurmd_port = free_port(), free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=self.conf)

    def _spawn(self, name: str, cmd: list[str]):
        log = os.path.join(self.root, f"{name}.out")
        self.procs[name] = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)

    def _node_resources(self) -> tuple[int, int]:
        out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, env=self.env).stdout
        fields = dict(kv.split("=", 1) for kv in out.split() if "=" in kv)
        return int(fields.get("CPUs", os.cpu_count() or 1)), int(fields.get("RealMemory", 1024))

    def start(self):
        ensure_packages(["slurm-wlm", "munge"])
        r = self.root
        for d in ("munge", "state", "spool"):
            os.makedirs(os.path.join(r, d), mode=0o700, exist_ok=True)
        key = os.path.join(r, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o600)
        sock = os.path.join(r, "munge", "munge.socket")
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                               f"--pid-file={r}/munge/munged.pid", f"--log-file={r}/munge/munged.log",
                               f"--seed-file={r}/munge/munged.seed"])
        wait_for(lambda: os.path.exists(sock) or self.procs["munged"].poll() is not None, 20,
                 "munged's socket", log=os.path.join(r, "munged.out"))
        if self.procs["munged"].poll() is not None:
            raise ServiceError(f"munged exited; see {r}/munged.out and {r}/munge/munged.log")
        cpus, mem = self._node_resources()
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=stmtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={sock},cred_expire=10
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
# Start a requeued job as soon as its begin time passes, not at the next 60 s scheduling pass.
SchedulerParameters=sched_interval=2
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
        wait_for(lambda: listening(self.ctld_port) or self.procs["slurmctld"].poll() is not None, 30,
                 "slurmctld to listen", log=os.path.join(r, "slurmctld.log"))
        self._spawn("slurmd", ["slurmd", "-D", "-f", self.conf, "-N", self.host])
        wait_for(self._node_idle, 60, f"node {self.host} to be idle in sinfo", poll=1,
                 log=os.path.join(r, "slurmd.log"))
        return self

    def _node_idle(self) -> bool:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise ServiceError(f"{name} exited with {p.returncode}; see {self.root}/{name}.out "
                                   f"and {self.root}/{name}.log")
        out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout
        return out.strip().startswith("idle")

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=kw.pop("env", self.env), **kw)
        if check and proc.returncode != 0:
            raise ServiceError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def job_state(self, job_id: str) -> dict:
        """scontrol's fields of a job (JobState, ExitCode, Restarts, ...), one dict per array task."""
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return [dict(kv.split("=", 1) for kv in line.split() if "=" in kv) for line in out.splitlines() if line.strip()]

    def daemon_pids(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items() if p.poll() is None}

    def cancel_all(self, timeout: float = 60):
        """Cancel every job of this cluster and wait until none is left."""
        if self.procs.get("slurmctld") is None or self.procs["slurmctld"].poll() is not None:
            return
        ids = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
        if ids:
            self.run(["scancel", "--full", *ids], check=False)
            try:
                wait_for(lambda: not self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip(),
                         timeout, "cancelled jobs to leave the queue", poll=1)
            except ServiceError:
                pass

    def stop(self):
        self.cancel_all()
        # slurmd first (it ends running jobs' steps), then the controller, then munge.
        for name in ("slurmd", "slurmctld", "munged"):
            stop(self.procs.get(name), name, timeout=30)
