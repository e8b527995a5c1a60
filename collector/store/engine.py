"""The store's engine: connections and transactions on SQLite or PostgreSQL, migrations, and
the statement builders every table family's writes share.

A plain `postgresql://` URL uses psycopg 3 on SQLAlchemy 2 and psycopg2 on 1.4 (whose dialects
predate psycopg 3; Debian 12: python3-psycopg2); an explicit `postgresql+driver://` is kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from kvmeter.collector.schema import KEY_COLUMNS, schema_version
from kvmeter.collector.schema_migrations import MIGRATIONS
from kvmeter.collector.store import sequence


def engine_url(url: str) -> str:
    """Map plain `postgresql://` to the installed psycopg driver; keep other URLs as given."""
    if url.startswith(("postgresql://", "postgres://")):
        rest = url.split("://", 1)[1]
        # SQLAlchemy 2 has the psycopg 3 dialect; 1.4 (Debian 12) only psycopg2.
        driver = "psycopg" if int(sa.__version__.split(".")[0]) >= 2 else "psycopg2"
        return f"postgresql+{driver}://{rest}"
    return url


def _passwords(url: sa.engine.URL) -> list[str]:
    """The URL's passwords: its own and a `?password=` (libpq takes either)."""
    query = url.query.get("password")
    found = [str(url.password)] if url.password else []
    return found + ([query] if isinstance(query, str) else list(query or ()))


def shown_url(url: str) -> str:
    """The store's URL as logs and errors may show it: its passwords hidden."""
    try:
        parsed = sa.engine.make_url(url)
    except Exception:  # not a URL SQLAlchemy reads: its scheme only
        return url.split("://", 1)[0] + "://(unreadable)" if "://" in url else "(not a database URL)"
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "***"})
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def without_secret(text: str, url: str) -> str:
    """`text` (a driver's or SQLAlchemy's error) with `url` and its passwords replaced."""
    text = text.replace(url, shown_url(url))
    try:
        passwords = _passwords(sa.engine.make_url(url))
    except Exception:
        return text
    for password in passwords:
        text = text.replace(password, "***")
    return text


class StoreTooNew(RuntimeError):
    """The store was migrated by a newer kvmeter than this one."""


KNOWN_VERSION = max(v for v, _ in MIGRATIONS)  # the newest schema this code knows
# How often a writer re-reads the store's schema version: a newer replica of a rolling upgrade
# may migrate it under this one, which must then stop writing (its code does not know the schema).
SCHEMA_CHECK_S = 2.0
_ANALYZE = "kvmeter_analyze_after_commit"  # conn.info: tables whose statistics this write outdated
log = logging.getLogger(__name__)


def analyze_after_commit(conn: Connection, table: str) -> None:
    """PostgreSQL: read `table`'s statistics again once this write commits. For a burst of rows
    the planner must not take for none: autovacuum analyzes a table only after a tenth of it
    changed, and until then a plan made for one pending row can cost a join of every pending
    row with every other (the hand-off's claim: 22 s at 10,000 items, store/outbox.py)."""
    if conn.dialect.name == "postgresql":
        conn.info.setdefault(_ANALYZE, set()).add(table)


def _too_new(found: int) -> StoreTooNew:
    return StoreTooNew(
        f"the store is at schema version {found}, newer than this kvmeter's {KNOWN_VERSION}: "
        "run the kvmeter release that wrote it (or a later one)"
    )


def now_ms() -> int:
    return int(time.time() * 1000)


class StoreCore:
    """Engine, transactions and schema; the table families' mixins build on it."""

    def __init__(self, url: str, *, pool_size: int = 5, outbox: bool = False):
        """outbox: finalization and adjustments also write billable items to the hand-off's
        outbox (when [handoff] is configured: nothing else would ever send them)."""
        self.outbox = outbox
        # Costs of the outbox's items: set where a tariff is configured (store/item_costs.py).
        self.pricing: Any = None  # item_costs.Pricing
        self.url = engine_url(url)
        if self.url.startswith("sqlite"):
            self.engine = _sqlite_engine(self.url)
        else:
            try:
                self.engine = sa.create_engine(self.url, pool_size=pool_size, pool_pre_ping=True)
            except (ImportError, sa.exc.NoSuchModuleError) as exc:
                driver = self.url.split("://", 1)[0]
                hint = " (Debian 12: apt install python3-psycopg2)" if driver.endswith("psycopg2") else ""
                raise RuntimeError(f"no database driver for {driver}{hint}: {exc}") from None
        self.dialect = self.engine.dialect.name
        self.is_postgres = self.dialect == "postgresql"
        self._sql_cache: dict[str, str] = {}  # statements built once, by purpose
        self.schema_check_s = SCHEMA_CHECK_S
        self._schema_checked: float | None = None  # monotonic; None: not migrated here, no check
        self._found_too_new: int | None = None  # once seen, every later write is refused

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions -------------------------------------------------------------------------
    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A read-write transaction (SQLite: BEGIN IMMEDIATE, one writer at a time). Events and
        adjustments it made get their seq last, just before the commit (store/sequence.py)."""
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(kvmeter_write=True)
                sequence.clear(conn)
                conn.info.pop(_ANALYZE, None)
                with conn.begin():
                    yield conn
                    self._check_schema(conn)  # last: a migration committed meanwhile is seen
                    sequence.assign(conn)
                outdated = conn.info.pop(_ANALYZE, set())
        except sa.exc.DBAPIError as exc:
            # A newer schema refuses the old statements (a column they leave NULL, ...): say so,
            # before isolation.py takes the database's refusal for a bad record's.
            self._check_schema_after(exc)
            raise
        self._analyze(outdated)  # committed, and its connection back in the pool

    def _analyze(self, tables: Iterable[str]) -> None:
        """ANALYZE these tables (analyze_after_commit), each in its own transaction; a failure
        is logged and changes nothing else (autovacuum's analyze comes later)."""
        for table in sorted(tables):
            try:
                with self.engine.connect() as conn:
                    conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text(f"ANALYZE {table}"))
            except sa.exc.DBAPIError as exc:
                log.warning("ANALYZE %s failed: %s", table, exc)

    def _check_schema(self, conn: Connection) -> None:
        """Refuse (roll back) the write once the store is newer than this code: a newer replica
        migrated it. Read at most every schema_check_s, not per write."""
        if self._found_too_new is None:
            if self._schema_checked is None or time.monotonic() - self._schema_checked < self.schema_check_s:
                return
            found = conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0
            self._schema_checked = time.monotonic()
            if found <= KNOWN_VERSION:
                return
            self._found_too_new = int(found)
        raise _too_new(self._found_too_new)

    def _check_schema_after(self, error: Exception) -> None:
        """A write failed: StoreTooNew if the store is newer than this code (read at once)."""
        if self._schema_checked is None:  # not migrated here: not checked
            return
        if self._found_too_new is None:
            self._schema_checked = float("-inf")
            try:
                with self.engine.connect() as conn, conn.begin():
                    self._check_schema(conn)
                return  # not newer: the write's own error stands
            except sa.exc.DBAPIError:  # the database is down: the write's own error says so
                return
            except StoreTooNew:
                pass
        raise _too_new(self._found_too_new or 0) from error

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # -- schema -------------------------------------------------------------------------------
    def migrate(self) -> int:
        """Apply pending migrations; safe when several replicas start at once."""
        with self.write() as conn:
            if self.is_postgres:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7346201)"))
            schema_version.create(conn, checkfirst=True)
            done = {row[0] for row in conn.execute(sa.select(schema_version.c.version))}
            if done and max(done) > KNOWN_VERSION:
                # A newer kvmeter's store (a downgrade): this code does not know its schema, and
                # writing it could lose or misread what the newer one keeps.
                raise _too_new(max(done))
            for version, migration in MIGRATIONS:
                if version not in done:
                    migration(conn)
                    conn.execute(sa.insert(schema_version).values(version=version, applied_ms=now_ms()))
            self._schema_checked = time.monotonic()  # from now on, writes re-check it
            return KNOWN_VERSION

    def database_ms(self, conn: Connection) -> int | None:
        """The database server's clock (ms since the epoch), the one every replica shares;
        None on SQLite (its writers run on one host, with one clock)."""
        if not self.is_postgres:
            return None
        query = sa.text("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS bigint)")
        return int(conn.execute(query).scalar_one())

    def version(self) -> int:
        with self.read() as conn:
            return int(conn.execute(sa.select(sa.func.max(schema_version.c.version))).scalar() or 0)

    def _insert(self, table: sa.Table) -> Any:
        if self.is_postgres:
            return postgresql.insert(table)
        return sqlite.insert(table)

    def _upsert_rows(
        self,
        conn: Connection,
        table: sa.Table,
        columns: Sequence[str],
        rows: list[tuple[Any, ...]],
        value: str,
        *,
        add: bool,
    ) -> None:
        """Upsert plain tuples (values in `columns` order; the key first): a new key inserts its
        row, a known key adds the row's `value` column to its own (add) or takes it, and takes
        its updated_ms.

        The hot write path. The statement text is built once per table and run through the
        driver directly: SQLAlchemy's per-row parameter processing cost more than the
        database's work. SQLite: one prepared statement, executemany. PostgreSQL (psycopg 3 or
        psycopg2): one statement over one array per column (unnest), one round trip, and a
        short text the driver parses once (a multi-row VALUES is re-parsed on every call). The
        rows' keys are distinct: ON CONFLICT DO UPDATE may touch a row once per statement."""
        cache_key = f"{table.name}:{value}:{'add' if add else 'set'}"
        sql = self._sql_cache.get(cache_key)
        if sql is None:
            sql = self._sql_cache[cache_key] = self._upsert_sql(table, columns, value, add=add)
        if self.is_postgres:
            conn.exec_driver_sql(sql, [tuple(list(values) for values in zip(*rows, strict=True))])
        else:
            conn.exec_driver_sql(sql, rows)

    def _upsert_sql(self, table: sa.Table, columns: Sequence[str], value: str, *, add: bool) -> str:
        quote = self.engine.dialect.identifier_preparer.quote
        name, column = quote(table.name), quote(value)
        if self.is_postgres:
            source = self._pg_unnest(table, columns)
        else:
            source = "VALUES (" + ", ".join(["?"] * len(columns)) + ")"
        new_value = f"{name}.{column} + excluded.{column}" if add else f"excluded.{column}"
        if add and not self.is_postgres:
            # SQLite turns an int64 overflow into a REAL (bytes lost to rounding); NULL instead
            # fails the column's NOT NULL, as PostgreSQL's `bigint out of range` fails the
            # statement: either way isolation.py dead-letters the record (unstorable).
            new_value = f"CASE WHEN typeof({new_value}) = 'integer' THEN {new_value} END"
        return (
            f"INSERT INTO {name} ({', '.join(quote(c) for c in columns)}) {source} "
            f"ON CONFLICT ({', '.join(quote(c) for c in KEY_COLUMNS)}) DO UPDATE SET "
            f"{column} = {new_value}, {quote('updated_ms')} = excluded.{quote('updated_ms')}"
        )

    def _pg_unnest(self, table: sa.Table, columns: Sequence[str]) -> str:
        """`SELECT * FROM unnest(<one array parameter per column>)`: any number of rows in one
        statement whose text never changes. Arrays of the base types (text[], not
        varchar(n)[]: an explicit cast would truncate a long value silently; the insert's own
        assignment cast refuses it). psycopg 3 dumps arrays in binary (%b) at a third of its
        text format's cost."""
        mark = "%b" if self.engine.dialect.driver == "psycopg" else "%s"
        types = [
            "bytea" if isinstance(table.c[c].type, sa.LargeBinary) else pg_array_type(table.c[c].type)
            for c in columns
        ]
        return "SELECT * FROM unnest(" + ", ".join(f"{mark}::{t}[]" for t in types) + ")"


def slices(items: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    """Consecutive parts of at most `size` items: IN lists and multi-row VALUES stay bounded."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def pg_array_type(column_type: Any) -> str:
    for kind, name in ((sa.Boolean, "boolean"), (sa.BigInteger, "bigint"), (sa.Integer, "integer")):
        if isinstance(column_type, kind):
            return name
    if isinstance(column_type, sa.String):
        return "text"
    raise TypeError(f"no PostgreSQL array type for {column_type!r}")


def _sqlite_engine(url: str) -> Engine:
    path = url.split("///", 1)[1] if "///" in url else ""
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 60})

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's begin event issue BEGIN itself (pysqlite's own is deferred and late).
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # offsets are committed after us: a commit must last
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # Writers take the write lock up front: a read-then-write transaction never hits BUSY.
        write = conn.get_execution_options().get("kvmeter_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
