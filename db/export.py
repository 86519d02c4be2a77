"""`neuron export`: a public view, filtered by the user's own SQL condition, to CSV or Parquet.

The rows are exactly ``SELECT * FROM <view> WHERE (<condition>)``: the condition is the user's SQL over their own
database, so it is run as given, but only to read. The connection is read-only before the query runs (SQLite:
``PRAGMA query_only``; PostgreSQL: ``SET TRANSACTION READ ONLY``), and a ``;`` outside quotes is refused, so a second
statement never reaches the server. An error in the condition becomes one message naming the condition and the view's
columns.

Rows stream in chunks (a server-side cursor on PostgreSQL), so a million findings never sit in memory at once, and
the file appears under its name only once complete. Column types are the view's (reflected; SQLite leaves computed
columns untyped, for those ``COMPUTED_TYPES`` says what the view computes): probabilities are floats, timestamps UTC
timestamps (ISO 8601 in CSV), booleans booleans (``true``/``false`` in CSV), and NULL an empty CSV field.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool
from sqlalchemy.types import NullType, TypeEngine

from neuron.errors import NeuronError

VIEWS = ("findings", "study_findings", "ingest_status", "reviews")
FORMATS = {".csv": "csv", ".parquet": "parquet"}
CHUNK_ROWS = 10_000
EXAMPLE = "label = 'Effusion' and probability > 0.7"

# What the views compute, for SQLite, which reports no type for an expression (PostgreSQL reports them all).
COMPUTED_TYPES: dict[str, TypeEngine] = {
    "positive": sa.Integer(), "latest": sa.Integer(), "attempts": sa.Integer(), "instances": sa.Integer(),
    "positive_findings": sa.Integer(), "needs_review": sa.Integer(), "max_probability": sa.Float(),
    "screened_at": sa.DateTime(timezone=True), "status": sa.String(), "reason": sa.String(),
    "worker": sa.String(), "top_finding": sa.String(), "top_model": sa.String(),
    "review_reason": sa.String(), "outside_population": sa.String(), "gating_notes": sa.String(),
}
# Where one name means another type in another view: needs_review is a count in study_findings and a flag in
# findings and reviews (an expression there since the out-of-distribution and population flags joined it).
VIEW_COMPUTED_TYPES: dict[str, dict[str, TypeEngine]] = {
    "findings": {"needs_review": sa.Boolean(), "outside_population": sa.Integer()},
    "reviews": {"needs_review": sa.Boolean()},
}


class ExportRefused(NeuronError):
    """The export cannot run as asked (format, view or condition); the message says what to change. Exit code 2."""


@dataclass(frozen=True)
class Column:
    name: str
    type: TypeEngine


def output_format(path: Path) -> str:
    """'csv' or 'parquet', from the output file's suffix."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ExportRefused(f"output {str(path)!r}: the format comes from the suffix, and {path.suffix or 'none'!r} "
                            f"is not one of {', '.join(FORMATS)}, .json or .ndjson (FHIR); name the file e.g. "
                            f"effusion.parquet, effusion.csv or effusion.json")
    return fmt


def export_format(path: Path, fmt: str | None = None) -> str:
    """'csv', 'parquet' or 'fhir' (``db.fhir``: a .json Bundle or .ndjson): from the suffix, and ``--format`` when
    given must agree with it."""
    fhir = path.suffix.lower() in (".json", ".ndjson")
    if fmt is not None and fmt not in ("csv", "parquet", "fhir"):
        raise ExportRefused(f"--format {fmt!r} is not csv, parquet or fhir")
    if fhir and fmt in (None, "fhir"):
        return "fhir"
    if fmt == "fhir":
        raise ExportRefused(f"--format fhir writes a FHIR Bundle (.json) or NDJSON (.ndjson), not {str(path)!r}; "
                            f"name the file e.g. findings.json or findings.ndjson")
    found = output_format(path) if not fhir else "fhir"
    if fmt is not None and fmt != found:
        raise ExportRefused(f"--format {fmt} and the file {str(path)!r} disagree: the file's suffix says "
                            f"{found}; name it e.g. findings.{fmt}, or leave --format out")
    return found


def check_condition(where: str) -> str:
    """The condition as given, or ExportRefused when it holds a ``;`` outside string literals (a second statement).
    Quotes inside a comment open no string, so a comment cannot hide a ``;`` from this check."""
    i, n = 0, len(where)
    while i < n:
        ch = where[i]
        if ch in "'\"":
            end = where.find(ch, i + 1)
            i = n if end < 0 else end + 1  # a doubled quote is two literals in a row: the same characters
            continue
        if where.startswith("--", i):
            end = where.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if where.startswith("/*", i):
            end = where.find("*/", i + 2)
            i = n if end < 0 else end + 2
            continue
        if ch == ";":
            raise ExportRefused(f"--where {where!r}: a ';' outside quotes would start a second statement; an export "
                                f"runs one condition over the view, e.g. --where \"{EXAMPLE}\"")
        i += 1
    return where


def view_columns(conn: Connection, view: str) -> list[Column]:
    """The view's columns with their types, or ExportRefused naming the views this database has."""
    if view not in VIEWS:
        raise ExportRefused(f"--view {view!r} is not one of {', '.join(VIEWS)}")
    inspector = sa.inspect(conn)
    present = set(inspector.get_view_names())
    if view not in present:
        have = ", ".join(v for v in VIEWS if v in present) or "none"
        raise ExportRefused(f"this database has no view {view!r} (it has: {have}); run `neuron db upgrade --db URL` "
                            f"if it was created by an older Neuron")
    columns = []
    for c in inspector.get_columns(view):
        kind = c["type"]
        if isinstance(kind, NullType):
            kind = VIEW_COMPUTED_TYPES.get(view, {}).get(c["name"]) or COMPUTED_TYPES.get(c["name"], kind)
        columns.append(Column(c["name"], kind))
    return columns


def read_only(conn: Connection) -> None:
    """Before the user's condition runs, the connection can no longer write."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("PRAGMA query_only = ON")
    elif conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET TRANSACTION READ ONLY")
    else:  # pragma: no cover - Neuron runs on these two
        raise ExportRefused(f"exports run on SQLite and PostgreSQL, not {conn.dialect.name}")


def condition_refused(where: str | None, view: str, columns: Sequence[Column], exc: DBAPIError) -> ExportRefused:
    """The database refused the query of ``where``: one message with what it said and the columns the condition may
    use."""
    first = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
    names = ", ".join(c.name for c in columns)
    return ExportRefused(f"--where {where!r} does not run on the view {view} ({first}); an export only reads, and "
                         f"the condition may use these columns: {names}; e.g. --where \"{EXAMPLE}\"")


def _query(view: str, columns: Sequence[Column], where: str | None) -> sa.Select:
    """``SELECT <columns> FROM view WHERE (condition)``, typed so each value comes back as its Python type. The
    condition sits on its own lines (a trailing ``--`` comment cannot swallow the parenthesis) with its colons
    escaped (``'12:30'`` is text, not a bind parameter)."""
    stmt = sa.select(*(sa.column(c.name, c.type) for c in columns)).select_from(sa.table(view))
    if where is not None and where.strip():
        stmt = stmt.where(sa.text("(\n" + where.replace(":", "\\:") + "\n)"))
    return stmt


def _utc(value: datetime) -> datetime:
    """SQLite gives naive datetimes (Neuron writes UTC), PostgreSQL aware ones in the session's zone."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return _utc(value).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)  # floats: the shortest repr that reads back as the same float


def arrow_type(column: Column, sample: Sequence):
    """The Parquet column type: from the SQL type, else (an untyped expression) from the first values seen."""
    import pyarrow as pa

    kind = column.type
    try:
        python = kind.python_type if not isinstance(kind, NullType) else \
            next((type(v) for v in sample if v is not None), str)
    except NotImplementedError:  # a type without a Python equivalent: kept as its text
        python = str
    for base, arrow in ((bool, pa.bool_()), (int, pa.int64()), (float, pa.float64()),
                        (datetime, pa.timestamp("us", tz="UTC")), (date, pa.date32())):
        if issubclass(python, base):
            return arrow
    return pa.string()


def _rows(conn: Connection, view: str, columns: Sequence[Column], where: str | None,
          chunk_rows: int) -> Iterator[Sequence[sa.Row]]:
    """The matching rows, ``chunk_rows`` at a time, from a server-side cursor where the database has one."""
    result = conn.execution_options(stream_results=True, max_row_buffer=chunk_rows).execute(
        _query(view, columns, where))
    with result:
        yield from result.partitions(chunk_rows)


class _CsvSink:
    def __init__(self, path: Path, columns: Sequence[Column]):
        self.fh = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.out = csv.writer(self.fh)
        self.out.writerow([c.name for c in columns])

    def write(self, rows: Sequence[sa.Row]) -> None:
        self.out.writerows([csv_value(v) for v in row] for row in rows)

    def close(self) -> None:
        self.fh.close()

    def discard(self) -> None:
        self.fh.close()


class _ParquetSink:
    """One fixed schema for the whole file, decided from the view's types (and, for an untyped SQLite expression,
    the first chunk); each chunk is one row group."""

    def __init__(self, path: Path, columns: Sequence[Column]):
        self.path, self.columns, self.writer, self.schema = path, columns, None, None

    def write(self, rows: Sequence[sa.Row]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        values = [[row[i] for row in rows] for i in range(len(self.columns))]
        if self.writer is None:
            self.schema = pa.schema([pa.field(c.name, arrow_type(c, v)) for c, v in zip(self.columns, values,
                                                                                         strict=True)])
            self.writer = pq.ParquetWriter(self.path, self.schema)
        arrays = []
        for field, vals in zip(self.schema, values, strict=True):
            if pa.types.is_timestamp(field.type):
                vals = [None if v is None else _utc(v) for v in vals]
            elif pa.types.is_string(field.type):  # e.g. a Decimal or a UUID: its text
                vals = [v if v is None or isinstance(v, str) else str(v) for v in vals]
            arrays.append(pa.array(vals, type=field.type))
        self.writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))

    def close(self) -> None:
        if self.writer is None:  # no rows: still a valid file with the columns
            self.write([])
        self.writer.close()

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.close()


def export(url: str, view: str, where: str | None, output: Path, chunk_rows: int = CHUNK_ROWS) -> int:
    """Write the rows of ``view`` that match ``where`` to ``output`` (.csv or .parquet); returns how many. Its own
    connection (closed afterwards, never pooled): a read-only one must not serve anything else."""
    fmt = output_format(output)
    if where is not None:
        check_condition(where)
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return _export(conn, view, where, output, fmt, chunk_rows)
    finally:
        engine.dispose()


def _export(conn: Connection, view: str, where: str | None, output: Path, fmt: str, chunk_rows: int) -> int:
    read_only(conn)  # first: PostgreSQL takes the mode only before the transaction's first query
    columns = view_columns(conn, view)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    sink = _CsvSink(partial, columns) if fmt == "csv" else _ParquetSink(partial, columns)
    written = 0
    rows_in_chunks = _rows(conn, view, columns, where, chunk_rows)
    try:
        for rows in rows_in_chunks:
            sink.write(rows)
            written += len(rows)
        sink.close()
        partial.replace(output)  # the file appears under its name only once complete
    except DBAPIError as exc:
        raise condition_refused(where, view, columns, exc) from None
    finally:
        rows_in_chunks.close()  # the cursor, also when a chunk failed half way
        sink.discard()
        partial.unlink(missing_ok=True)
        conn.rollback()  # a read: nothing to keep
    return written
