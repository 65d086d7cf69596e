"""The `flexjob` command: the click group (`main`, in jobrunner.cli.main) and one module per command
group; each parses options and calls the library. Importing this package registers every command.

Exit codes (every command):
  0    success; also Ctrl-C leaving `flexjob status --watch` (the way out), and a worker stopped by
       SIGTERM/Ctrl-C after saving its progress
  1    a problem the user can fix (bad input, unknown job, refused plan or budget, unreachable
       store): one `error:` line and a `hint:` line on stderr
  2    usage error (unknown option, bad value, conflicting options: click)
  3    an internal error (a bug: run again with --debug for the traceback, and report it)
  130  interrupted (Ctrl-C) anywhere else

Environment variables (FLEXJOB_DB, FLEXJOB_HOME, COLUMNS): see `flexjob --help` (jobrunner.cli.main).
"""
from jobrunner.cli import engine_commands, job_commands, plan_commands, status_commands  # noqa: F401
from jobrunner.cli.main import main

__all__ = ["main"]
