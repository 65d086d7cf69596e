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

Environment variables:
  FLEXJOB_DB     the job store, as for --db: a SQLAlchemy URL (postgresql+psycopg2://user@host/db)
                 or a SQLite file path; default sqlite:///flexjob.db in the current directory.
                 Passwords in it are printed masked (jobrunner.store.db_url.mask_url); prefer
                 ~/.pgpass or PGPASSWORD to a password in the URL.
  FLEXJOB_HOME   the disk-tier directory (--offload-dir / --disk-dir default) and where
                 `flexjob profile` stores host profiles; default ./.flexjob
  COLUMNS        the width `flexjob status` renders at when printing into a pipe (default 160)
"""
from jobrunner.cli import engine_commands, job_commands, plan_commands, status_commands  # noqa: F401
from jobrunner.cli.main import main

__all__ = ["main"]
