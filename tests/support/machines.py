"""Simulated machines on one host, for chaos runs: each is a Linux pid, UTS and mount namespace
(`unshare --pid --fork --mount-proc --uts`) with its own host name, FLEXJOB_HOME, working directory
and disk tier. A worker's host id is the boot id plus its pid namespace (jobrunner.worker.liveness),
so workers of one machine see each other's processes (a dead one is taken over at once) while
between machines only a lease's expiry frees a shard, as between real machines. Needs root.

Workers are `flexjob work` processes started in a machine with nsenter; the driver signals them by
their pid out here, and the store knows them by (host name, pid in their namespace).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.jobs import flexjob_command

UNSHARE = ("unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--uts")


def namespaces_unavailable() -> str | None:
    """Why machines cannot be simulated here, or None when they can."""
    if os.geteuid() != 0:
        return "simulating machines needs root (unshare of pid and UTS namespaces)"
    for tool in ("unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    done = subprocess.run([*UNSHARE, "true"], capture_output=True, text=True)
    if done.returncode != 0:
        return f"unshare failed: {done.stderr.strip() or done.returncode}"
    return None


def _child_pid(pid: int, timeout_s: float = 30.0) -> int:
    """The pid (out here) of the single child of `pid`, once it exists."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        if children:
            return int(children[0])
        time.sleep(0.02)
    raise RuntimeError(f"process {pid} started no child within {timeout_s} s")


def _inner_pid(pid: int) -> int:
    """The pid of process `pid` (out here) in its own, innermost pid namespace."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise RuntimeError(f"no NSpid for process {pid}")


def wait_stopped(pid: int, timeout_s: float = 5.0) -> None:
    """Until a SIGSTOP to process `pid` has taken effect (state T in /proc): what is read of it
    next is final. Signals are delivered asynchronously."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return  # gone
        if state in ("T", "t"):
            return
        time.sleep(0.005)


@dataclass
class SimWorker:
    """A `flexjob work` process in a machine: `proc` is nsenter, `pid` the worker out here."""
    machine: Machine
    proc: subprocess.Popen
    pid: int
    inner_pid: int

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        """Signal the worker. nsenter stops itself when its child stops, so a SIGCONT (and a
        SIGKILL, after which nsenter must reap) goes to nsenter too."""
        targets = (self.pid, self.proc.pid) if sig in (signal.SIGCONT, signal.SIGKILL) else (self.pid,)
        for pid in targets:
            try:
                os.kill(pid, signal.SIGCONT if pid == self.proc.pid else sig)
            except ProcessLookupError:
                pass

    def wait_stopped(self) -> None:
        wait_stopped(self.pid)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait()


@dataclass
class Machine:
    """One simulated machine: its namespaces' first process (`init`) and its directories."""
    name: str
    root: Path
    init: subprocess.Popen
    init_pid: int
    workers: list[SimWorker] = field(default_factory=list)
    started: int = 0

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def cwd(self) -> Path:
        return self.root / "cwd"

    @property
    def offload(self) -> Path:
        return self.root / "offload"

    def start_worker(self, *work_args: str) -> SimWorker:
        """`flexjob work WORK_ARGS --offload-dir <its own>` in this machine, logging under its root."""
        log = open(self.root / f"worker-{self.started}.log", "wb")
        self.started += 1
        env = os.environ | {"FLEXJOB_HOME": str(self.home), "PYTHONPATH": str(Path(__file__).parents[2])}
        proc = subprocess.Popen(["nsenter", "-t", str(self.init_pid), "-p", "-u", "-m", f"-w{self.cwd}",
                                 *flexjob_command("work", *work_args, "--offload-dir", str(self.offload))],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        pid = _child_pid(proc.pid)
        worker = SimWorker(machine=self, proc=proc, pid=pid, inner_pid=_inner_pid(pid))
        self.workers.append(worker)
        return worker

    def running(self) -> list[SimWorker]:
        self.workers = [w for w in self.workers if w.alive()]
        return self.workers

    def shut_down(self) -> None:
        for w in self.workers:
            w.kill()
        self.init.kill()  # unshare --kill-child then kills the namespace's pid 1, and with it the rest
        self.init.wait()


def start_machine(name: str, root: Path) -> Machine:
    """A machine named `name` (its host name inside) with its directories under `root`."""
    for sub in ("home", "cwd", "offload"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    init = subprocess.Popen([*UNSHARE, "sh", "-c", f"hostname {name} && exec sleep infinity"])
    init_pid = _child_pid(init.pid)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{init_pid}/comm").read_text().strip() != "sleep":  # its host name is set
        if time.monotonic() > deadline:
            raise RuntimeError(f"machine {name} did not start")
        time.sleep(0.02)
    return Machine(name=name, root=root, init=init, init_pid=init_pid)
