"""`flexjob status` as a person runs it: a real terminal (a pty as its controlling tty), beside a real
`flexjob work` subprocess on a small job; the screen shows the rows advancing, and Ctrl-C (the
terminal's interrupt character, not a signal sent by hand) leaves it with exit code 0, no traceback."""
from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

from jobrunner.store.db import open_store
from jobrunner.io.enqueue import JobParams, enqueue
from tests.support.jobs import SAMPLE_PROMPTS, flexjob_command, write_prompts

ROWS = len(SAMPLE_PROMPTS) * 3
# Make the pty the child's controlling terminal (new session + TIOCSCTTY), then become flexjob.
IN_A_TERMINAL = [sys.executable, "-c", "import fcntl, os, sys, termios; os.setsid(); "
                 "fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execv(sys.executable, [sys.executable] + sys.argv[1:])"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]")


class Terminal:
    """A pty of 50x200 running one command; collects everything it prints."""

    def __init__(self, command: list[str], env: dict) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.process = subprocess.Popen(IN_A_TERMINAL + command[1:], stdin=slave, stdout=slave, stderr=slave,
                                        env=env, close_fds=True)
        os.close(slave)
        self.master = master
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO: the program exited and closed the terminal
                    return
                if not data:
                    return
                self.chunks.append(data)
            elif self.process.poll() is not None:
                return

    @property
    def text(self) -> str:
        return ANSI.sub("", b"".join(self.chunks).decode(errors="replace"))

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text)
            if found:
                return found
            assert self.process.poll() is None, f"status exited early:\n{self.text[-3000:]}"
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not on screen after {timeout}s:\n{self.text[-3000:]}")

    def ctrl_c(self) -> None:
        os.write(self.master, b"\x03")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.reader.join(timeout=5)
        os.close(self.master)


@pytest.mark.slow
@pytest.mark.timeout(180)  # includes making the tiny model (~20 s) when this runs first
def test_watch_shows_a_real_worker_advancing_and_exits_cleanly_on_ctrl_c(tmp_path, tiny_model, offload_dir):
    db_url = f"sqlite:///{tmp_path / 'flexjob.db'}"
    prompts = write_prompts(tmp_path / "prompts.parquet", SAMPLE_PROMPTS * 3)
    job = enqueue(open_store(db_url), prompts, model_dir=tiny_model, shard_rows=12, name="tty-run",
                  params=JobParams(max_new_tokens=24)).job
    env = {**os.environ, "TERM": "xterm-256color", "FLEXJOB_DB": db_url}
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    terminal = Terminal(flexjob_command("status", "--interval", "0.3"), env)  # --watch by default on a tty
    worker = None
    try:
        terminal.wait_for(rf"tty-run .*queued .*0/{ROWS} 0%", timeout=30)
        worker = subprocess.Popen(flexjob_command("work", "--exit-when-idle", "--gpu-batch-size", "2",
                                                  "--offload-dir", offload_dir),
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        terminal.wait_for(r"job \d+ shard \d+ block \d+", timeout=60)  # the worker's row, while it works
        log, _ = worker.communicate(timeout=90)
        assert worker.returncode == 0, log
        terminal.wait_for(rf"tty-run .*completed .*{ROWS}/{ROWS} 100%", timeout=15)
        terminal.ctrl_c()
        assert terminal.process.wait(timeout=15) == 0
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        terminal.close()
    screen = terminal.text
    assert "Traceback" not in screen and "interrupted" not in screen
    shown = [int(n) for n in re.findall(rf"tty-run .*? (\d+)/{ROWS} \d+%", screen)]
    assert shown[0] == 0 and shown[-1] == ROWS and shown == sorted(shown)
    assert len({n for n in shown if 0 < n < ROWS}) >= 2, f"no progress seen between 0 and {ROWS}: {sorted(set(shown))}"
    assert f"job {job.id} shard" in screen
