"""Engines, sessions and schema upgrades. SQLAlchemy errors are translated here."""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event, insert, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.errors import ConfigError, DatabaseTransientError, ServiceUnavailable
from pipeline.redact import shorten

#: The top-level migrations/ of a source checkout (installed packages carry their own copy).
_CHECKOUT_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def migrations_dir() -> Path:
    """The Alembic scripts: `pipeline.migrations` when installed, else the checkout's folder.

    A wheel maps the repository's top-level migrations/ into the package (pyproject.toml),
    so an installed pipeline finds them without a checkout; an editable install or a bare
    checkout uses the folder itself.
    """
    try:
        packaged = resources.files("pipeline.migrations")
    except ModuleNotFoundError:
        packaged = None
    if packaged is not None and packaged.joinpath("env.py").is_file():
        return Path(str(packaged))
    return _CHECKOUT_MIGRATIONS


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain postgresql:// URLs (SQLAlchemy would pick psycopg2)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def safe_url(url: str) -> str:
    """The URL with any password hidden, fit for messages."""
    try:
        return make_url(normalize_url(url)).render_as_string(hide_password=True)
    except Exception:
        return "<database url>"


def url_problem(url: str) -> str | None:
    """Why `url` cannot be a lineage database URL (scheme, driver, SQLite path), or None."""
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(normalize_url(url))
    except (ArgumentError, ValueError, TypeError):
        return "not a database URL (expected e.g. sqlite:///pipeline.db or postgresql://host/db)"
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        return (
            f"unknown database scheme {shorten(parsed.drivername, 40)!r} "
            "(use sqlite:///path or postgresql://...)"
        )
    except Exception as exc:  # a broken third-party dialect plugin
        return f"cannot load the database dialect: {shorten(str(exc))}"
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        return (
            f"the driver for {shorten(parsed.drivername, 40)!r} is not installed"
            f" ({shorten(exc.name or str(exc), 40)})"
        )
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_path_problem(parsed.database)
    return None


def _sqlite_path_problem(database: str | None) -> str | None:
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database).expanduser()
    if path.is_dir():
        return f"the SQLite path {shorten(str(path), 200)} is a folder"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        return f"the SQLite path's parent {shorten(str(parent), 200)} is not a folder"
    return None


def make_engine(url: str, *, threads: int = 5) -> Engine:
    """An engine for `url`; SQLite gets WAL, a busy timeout and foreign keys. A server
    database keeps a connection for each of the `threads` that use the engine at once (a
    worker's task threads and its sweeper): fewer would open and close one per task."""
    problem = url_problem(url)
    if problem:
        raise ConfigError(f"PIPELINE_DATABASE_URL={shorten(safe_url(url))}: {problem}")
    url = normalize_url(url)
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        # A local file has no connection to lose: no ping before every transaction.
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().parent
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"PIPELINE_DATABASE_URL={shorten(safe_url(url))}: cannot create the folder "
                    f"{shorten(str(folder))}: {exc.strerror or exc}"
                ) from None
    else:
        kwargs.update(pool_size=threads, max_overflow=5, pool_recycle=1800, pool_pre_ping=True)
        kwargs["connect_args"] = {"connect_timeout": 5}
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


_WRITERS: weakref.WeakKeyDictionary[Engine, threading.RLock] = weakref.WeakKeyDictionary()


def serialized(engine: Engine) -> contextlib.AbstractContextManager[Any]:
    """What a transaction on `engine` holds while it runs: for SQLite, one lock per engine.

    SQLite has one writer at a time, and a writer that finds the file locked sleeps and
    tries again (1, 2, 5, 10, 15 ms ...): eight task threads writing at once would start
    their POSTs tens of milliseconds apart. Queued on a lock, each starts the moment the
    one before commits. PostgreSQL needs nothing of the kind.
    """
    if engine.dialect.name != "sqlite":
        return contextlib.nullcontext()
    lock = _WRITERS.get(engine)
    if lock is None:
        lock = _WRITERS.setdefault(engine, threading.RLock())
    return lock


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def insert_many(
    connection: Connection,
    table: Table,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    constants: Mapping[str, Any] | None = None,
    *,
    chunk: int = 5000,
) -> None:
    """INSERT `rows` (values in `columns` order) with `constants` in every row.

    Core's executemany runs every value of every row through its column's type (a datetime
    converted and formatted, an enum checked, JSON serialised) and builds a dict per row;
    for a 100,000-item run that was most of the time spent recording it. The same type
    processors run here, but a constant's once, and rows reach the driver as they are.
    Every column with a Python-side default must be given (in `columns` or `constants`).
    """
    dialect = connection.dialect
    fixed = dict(constants or {})
    compiled = insert(table).compile(
        dialect=dialect, column_keys=[*columns, *fixed], for_executemany=True
    )
    names = list(compiled.positiontup or []) if dialect.positional else list(compiled.binds)
    missing = sorted(set(names) - set(columns) - set(fixed))
    if missing:
        raise ValueError(f"insert_many into {table.name}: no value for {', '.join(missing)}")

    def processor(name: str) -> Any:
        return compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)

    fixed = {
        name: process(value) if (process := processor(name)) else value
        for name, value in fixed.items()
    }
    position = {name: n for n, name in enumerate(columns)}
    # Per statement parameter: (index in a row, its processor, None), or (None, None, value).
    slots = [
        (position[name], processor(name), None) if name in position else (None, None, fixed[name])
        for name in names
    ]

    def values(row: Sequence[Any]) -> list[Any]:
        return [
            constant if n is None else process(row[n]) if process else row[n]
            for n, process, constant in slots
        ]

    if dialect.name == "postgresql":
        _copy_rows(connection, table, names, (values(row) for row in rows))
        return
    sql = str(compiled)
    batches = iter(rows)
    while batch := list(itertools.islice(batches, chunk)):
        if dialect.positional:
            params: list[Any] = [tuple(values(row)) for row in batch]
        else:
            params = [dict(zip(names, values(row), strict=True)) for row in batch]
        connection.exec_driver_sql(sql, params)


def _copy_rows(
    connection: Connection, table: Table, names: Sequence[str], rows: Iterable[Sequence[Any]]
) -> None:
    """PostgreSQL: COPY the rows in, in the connection's transaction (twice as fast as an
    executemany of INSERTs, a tenth of its CPU). Driver errors are wrapped as SQLAlchemy's."""
    quote = connection.dialect.identifier_preparer
    columns = ", ".join(quote.quote(table.c[name].name) for name in names)
    sql = f"COPY {quote.format_table(table)} ({columns}) FROM STDIN"
    raw: Any = connection.connection.dbapi_connection  # psycopg's: it has cursor().copy()
    dbapi = connection.dialect.loaded_dbapi
    try:
        with raw.cursor() as cursor, cursor.copy(sql) as copy:
            for row in rows:
                copy.write_row(row)
    except dbapi.Error as exc:
        raise DBAPIError.instance(sql, None, exc, dbapi.Error) from exc


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (we hand out plain values)."""
    return sessionmaker(engine, expire_on_commit=False)


def check(engine: Engine) -> None:
    """Raise ServiceUnavailable with one line if the database cannot be reached."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise ServiceUnavailable(
            f"cannot reach the database {safe_url(str(engine.url))}: {_first_line(exc)}"
        ) from None


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn SQLAlchemy errors into the pipeline's: connection trouble is transient."""
    try:
        yield
    except (OperationalError, DBAPIError) as exc:
        if isinstance(exc, OperationalError) or exc.connection_invalidated:
            raise DatabaseTransientError(f"database error: {_first_line(exc)}") from exc
        raise


def alembic_config(url: str) -> Any:
    """An Alembic Config pointing at this project's migrations and the given database."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Upgrade the database schema to `revision` with Alembic."""
    from alembic import command
    from alembic.util import CommandError

    folder = migrations_dir()
    if not (folder / "env.py").is_file():
        raise ConfigError(f"the database migrations are missing (looked in {folder})")
    try:
        if revision == "head" and _create_fresh_sqlite(url):
            return
        command.upgrade(alembic_config(url), revision)
    except CommandError as exc:  # e.g. an unknown revision, or a database stamped newer
        raise ConfigError(
            f"cannot upgrade the database {safe_url(url)} to {shorten(revision, 40)}: "
            f"{shorten(_first_line(exc), 200)}"
        ) from None
    except (OperationalError, DBAPIError) as exc:
        raise ServiceUnavailable(
            f"cannot upgrade the database {safe_url(url)}: {shorten(_first_line(exc), 200)}"
        ) from None
    except SQLAlchemyError as exc:
        raise ConfigError(
            f"cannot upgrade the database {safe_url(url)}: {shorten(_first_line(exc), 200)}"
        ) from None


def _create_fresh_sqlite(url: str) -> bool:
    """A new embedded SQLite file: create the schema at once and stamp it at head.

    Replaying every migration on an empty file takes about a second of a short run; the
    models and the migrations agree (`alembic check` runs in the test suite), so the result
    is the same schema. Any file that already has tables is upgraded the usual way.
    """
    from alembic import command
    from sqlalchemy import inspect

    from pipeline.models import Base

    if make_url(normalize_url(url)).get_backend_name() != "sqlite":
        return False
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            if inspect(conn).get_table_names():
                return False
            Base.metadata.create_all(conn)
    finally:
        engine.dispose()
    command.stamp(alembic_config(url), "head")
    return True


def current_revision(engine: Engine) -> str | None:
    """The Alembic revision stamped in the database, or None for an empty one."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    """The newest revision in migrations/."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(migrations_dir())).get_current_head()
