"""`flexjob profile` warns, in one line on stderr, when its profile was measured on a busy host."""
from __future__ import annotations

from click.testing import CliRunner

from engine.planning.hardware import HardwareProfile
from engine.planning.profile_store import profile_path
from jobrunner.cli import main

HOST = HardwareProfile(host="box", disk_read_gbps=1.1, disk_write_gbps=1.3, matmul_flops={"cpu": {"bfloat16": 4e11}},
                       created_at=1e12)  # "fresh" for a long time: reused, not measured again
LOAD = {"load_avg": 11.6, "cores": 2, "spread": 1.2, "cpu_share": 0.31}


def _profile(tmp_path, prof: HardwareProfile, *args: str):
    home, disk = tmp_path / "home", tmp_path / "disk"
    prof.replace(disk_dir=str(disk)).save(profile_path(disk, home))
    return CliRunner().invoke(main, ["profile", "--disk-dir", str(disk), *args], env={"FLEXJOB_HOME": str(home)})


def test_a_busy_profile_is_shown_with_a_one_line_warning_and_a_hint(tmp_path):
    result = _profile(tmp_path, HOST.replace(busy=True, load_seen=LOAD))
    assert result.exit_code == 0, result.output
    [warning] = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert "busy" in warning and "load 11.6 on 2 cores" in warning and "31% of a core free" in warning
    assert "flexjob profile --refresh" in warning and "quiet machine" in warning
    assert "disk read" in result.stdout


def test_the_json_of_a_busy_profile_stays_readable_and_says_busy(tmp_path):
    result = _profile(tmp_path, HOST.replace(busy=True, load_seen=LOAD), "--json")
    assert result.exit_code == 0, result.output
    prof = HardwareProfile.from_json(result.stdout)
    assert prof.busy and prof.load_seen == LOAD
    assert result.stderr.startswith("warning: this host was busy")


def test_a_quiet_profile_has_no_warning(tmp_path):
    result = _profile(tmp_path, HOST.replace(load_seen={**LOAD, "load_avg": 0.3, "cpu_share": 0.98}))
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output and "disk read" in result.stdout
