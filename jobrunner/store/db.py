"""Opening the job store: URL resolution, SQLite durability settings, migrations to head.

The default is the SQLite file `$FLEXJOB_HOME/flexjob.db` (jobrunner.home: one per user, whatever
the current directory); `--db` / `FLEXJOB_DB` take a URL: `sqlite:///path.db`, or
`postgresql://user@host/db` for workers on many machines (driver: psycopg 3, the `postgres` extra).
A value that is not a URL is refused rather than taken as a file name, so a typo never becomes a
new, empty store. Read-only commands open with `must_exist` and never create a store.

SQLite settings and why:
- WAL: readers (`status`, `jobs`) never block the worker's commits.
- synchronous=FULL: in WAL mode NORMAL may lose the last commits on power loss; a registered
  result part must never be forgotten.
- busy_timeout: concurrent workers wait for the write lock instead of failing.
- Write transactions start with BEGIN IMMEDIATE (see `write_begin`): a deferred transaction that
  reads and then writes can fail with SQLITE_BUSY at once, without waiting for the timeout.
"""
from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, InterfaceError, NoSuchModuleError, OperationalError

from jobrunner.errors import StoreUnreachable, UserError
from jobrunner.home import default_store_path

ENV_VAR = "FLEXJOB_DB"
URL_HINT = "use sqlite:////absolute/path/flexjob.db or postgresql://user@host/db"
POSTGRES_INSTALL = "pip install 'flexjob[postgres]'"
SQLITE_BUSY_TIMEOUT_MS = 60_000
# Execution option that makes a SQLite transaction take the write lock up front.
WRITE_OPTION = "flexjob_write"


def default_url() -> str:
    return f"sqlite:///{default_store_path()}"


def resolve_url(db: str | None = None) -> str:
    """--db beats FLEXJOB_DB beats the default; `postgresql://` means the psycopg (3) driver."""
    url = db or os.environ.get(ENV_VAR) or default_url()
    if "://" not in url:
        raise UserError(f"--db / {ENV_VAR} value {describe_url(url)!r} is not a database URL",
                        f"for a SQLite file write sqlite:///{Path(url).expanduser().resolve()}; "
                        "for a server postgresql://user@host/db")
    scheme, rest = url.split("://", 1)
    if scheme == "postgresql":
        url = f"postgresql+psycopg://{rest}"
    return url


def store_location() -> str:
    """Where commands without --db find the store, as `flexjob --help` prints it."""
    configured = os.environ.get(ENV_VAR)
    if not configured:
        return f"{default_url()} (the default)"
    try:
        return f"{describe_url(resolve_url(configured))} (from {ENV_VAR})"
    except UserError as exc:
        return f"none: {exc}"


def describe_url(engine_or_url: Engine | str) -> str:
    """The URL as it may be printed: password and secret query parameters masked."""
    from jobrunner.store.db_url import mask_url

    if isinstance(engine_or_url, Engine):
        return mask_url(engine_or_url.url.render_as_string(hide_password=False))
    return mask_url(str(engine_or_url))


def open_store(db: str | None = None, *, migrate: bool = True, must_exist: bool = False) -> Engine:
    """An Engine on the job store, migrated to the newest schema this code knows.

    With `must_exist` (read-only commands) a missing SQLite file is refused instead of created."""
    url_text = resolve_url(db)
    try:
        url = make_url(url_text)
    except ArgumentError:
        raise UserError(f"cannot parse database URL {describe_url(url_text)!r}", URL_HINT) from None
    if url.get_backend_name() == "sqlite":
        engine = _sqlite_engine(url, must_exist=must_exist, is_default=db is None and not os.environ.get(ENV_VAR))
    else:
        engine = _server_engine(url)
    if migrate:
        migrate_to_head(engine)
    return engine


def _server_engine(url) -> Engine:
    try:
        return create_engine(url, pool_pre_ping=True)
    except NoSuchModuleError:
        raise UserError(f"unknown database URL scheme {url.drivername!r} in {describe_url(str(url))}",
                        URL_HINT) from None
    except ModuleNotFoundError as exc:
        hint = POSTGRES_INSTALL if url.get_backend_name() == "postgresql" else f"install the {exc.name} package"
        raise UserError(f"the database driver {exc.name!r} for {url.drivername} URLs is not installed",
                        hint) from None


def _sqlite_engine(url, *, must_exist: bool, is_default: bool) -> Engine:
    if url.database and url.database != ":memory:":
        path = Path(url.database).expanduser()
        if must_exist and not path.is_file():
            raise UserError(f"no job store at {path}",
                            "enqueue a job first (that creates it), or point --db / FLEXJOB_DB at the store "
                            "the workers use")
        if is_default:
            path.parent.mkdir(parents=True, exist_ok=True)
        parent = Path(url.database).expanduser().resolve().parent
        if not parent.is_dir():
            raise UserError(f"cannot create database {url.database}: directory {parent} does not exist",
                            "create the directory or pass another --db")
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own handling defers it).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION)
                             else "BEGIN")

    return engine


def write_engine(engine: Engine) -> Engine:
    """The same engine, but its transactions take SQLite's write lock at BEGIN (no-op elsewhere)."""
    return engine.execution_options(**{WRITE_OPTION: True})


def _alembic_config() -> Config:
    import migrations

    cfg = Config()
    # __path__ rather than __file__: an editable install made before migrations/ had an
    # __init__.py maps it as a namespace package, which has no __file__.
    cfg.set_main_option("script_location", str(Path(list(migrations.__path__)[0])))
    return cfg


def schema_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def migrate_to_head(engine: Engine) -> None:
    """Upgrade an older database (or create a new one); refuse one newer than this code."""
    cfg = _alembic_config()
    script = ScriptDirectory.from_config(cfg)
    head = script.get_current_head()
    try:
        current = schema_revision(engine)
    except (OperationalError, InterfaceError) as exc:
        raise StoreUnreachable(f"cannot open database {describe_url(engine)}: {exc.orig}",
                               "check the --db URL / FLEXJOB_DB and that the server is running") from None
    if current == head:
        return
    known = {rev.revision for rev in script.walk_revisions()}
    if current is not None and current not in known:
        raise UserError(
            f"database {describe_url(engine)} has schema revision {current}, newer than this flexjob "
            f"(which knows up to {head})",
            "upgrade flexjob on this machine (pip install -U flexjob), or use another --db")
    with write_engine(engine).begin() as conn:
        if conn.dialect.name == "postgresql":
            # Two workers starting at once must not both create the tables.
            conn.execute(text("SELECT pg_advisory_xact_lock(727272)"))
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
