"""How the CLI reports an internal error: one line and a hint, which with --debug no longer asks
for --debug."""
from __future__ import annotations

import subprocess

from tests.support.jobs import flexjob_command

# pyarrow.csv made unimportable in a real subprocess: writing a CSV then fails inside the library,
# the way a bug would.
BROKEN = "import sys; sys.modules['pyarrow.csv'] = None; from jobrunner.cli import main; main()"


def run(*args: str) -> subprocess.CompletedProcess:
    argv = flexjob_command(*args)
    return subprocess.run([argv[0], "-c", BROKEN, *argv[3:]], capture_output=True, text=True, timeout=120)


def test_internal_error_hint_depends_on_debug(tmp_path):
    plain = run("jobs", "--db", "sqlite:///nowhere/x.db")  # reaches the store code: a user error, rc 1
    assert plain.returncode == 1 and plain.stderr.startswith("error: no job store at nowhere/x.db")
    crashed = run("enqueue", str(tmp_path / "p.csv"), "--model", str(tmp_path), "--db",
                  f"sqlite:///{tmp_path / 'f.db'}")
    debug = run("--debug", "enqueue", str(tmp_path / "p.csv"), "--model", str(tmp_path), "--db",
                f"sqlite:///{tmp_path / 'f.db'}")
    assert crashed.returncode == 3 and debug.returncode == 3
    assert crashed.stderr.splitlines()[-1] == "hint: run again with --debug for the traceback, and report it"
    assert "Traceback" in debug.stderr
    assert debug.stderr.splitlines()[-1] == "hint: please report it with the traceback above"


def test_engine_budget_error_names_the_flag_that_sets_the_budget(tiny_model, tmp_path):
    """The engine names its parameter (cpu_mem_gib); the CLI prints the flag the user typed."""
    proc = subprocess.run(flexjob_command("generate", "--model", tiny_model, "--prompt", "hi", "--percent",
                                          "100", "0", "100", "0", "100", "0", "--cpu-mem", "0.01",
                                          "--offload-dir", tmp_path / "o"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    error, hint = proc.stderr.splitlines()[-2:]
    assert error.startswith("error: policy ") and error.endswith("but --cpu-mem allows 0.01 GiB"), error
    assert "cpu_mem_gib" not in proc.stderr
    assert hint == "hint: raise --cpu-mem, move more weights or cache to disk, or use a smaller block"
