"""The `flexjob` click group: error handling, exit codes, global options. Command modules add
their commands to `main` (jobrunner.cli imports them all)."""
from __future__ import annotations

import sys
import traceback

import click

from engine.errors import EngineInputError
from jobrunner.cli.engine_errors import cli_message
from jobrunner.errors import UserError

EXIT_USER_ERROR = 1
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130


class FlexjobGroup(click.Group):
    """Turns known errors into one readable line plus a hint; the traceback only with --debug."""

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (UserError, EngineInputError) as exc:
            if debug:
                traceback.print_exc()
            _print_error(*(cli_message(exc) if isinstance(exc, EngineInputError) else (str(exc), exc.hint)))
            sys.exit(EXIT_USER_ERROR)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except Exception as exc:  # a bug: keep the user's screen readable unless asked
            if debug:
                traceback.print_exc()
            _print_error(f"internal error: {type(exc).__name__}: {exc}",
                         "please report it with the traceback above" if debug
                         else "run again with --debug for the traceback, and report it")
            sys.exit(EXIT_INTERNAL_ERROR)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The store's location depends on FLEXJOB_HOME / FLEXJOB_DB when help is asked for.
        from jobrunner.store.db import store_location

        formatter.write_paragraph()
        with formatter.indentation():
            formatter.write_text(EPILOG.format(store=store_location()))


def _print_error(message: str, hint: str) -> None:
    click.echo(f"error: {message}", err=True)
    if hint:
        click.echo(f"hint: {hint}", err=True)


EPILOG = """\b
Environment:
  FLEXJOB_DB    job store URL: sqlite:///path.db, or postgresql://user@host/db for workers on many
                machines (pip install 'flexjob[postgres]'); default sqlite:///$FLEXJOB_HOME/flexjob.db
  FLEXJOB_HOME  the default job store; also the disk tier, weight store and hardware profiles
                (default: the user data directory, e.g. ~/.local/share/flexjob)
\b
Job store: {store}
\b
Exit codes: 0 ok, 1 user error (one line + hint; --debug for the traceback),
  2 usage error, 3 internal error, 130 interrupted."""


@click.group(cls=FlexjobGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="flexjob")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """flexjob: run big offline LLM batches on small hardware, resumably.

    \b
    Quick start:
      flexjob demo                                  # whole path on a generated model
      flexjob enqueue prompts.parquet --model DIR
      flexjob work --gpu-mem 8 --cpu-mem 30
      flexjob status
      flexjob results JOB -o out.parquet
    """
    ctx.obj = {"debug": debug}
