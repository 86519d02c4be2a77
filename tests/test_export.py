"""`neuron export`: CSV and Parquet exports equal the view for the same filter, on SQLite and on a real
PostgreSQL (tests/services.py), from the results of a real pipeline run; the filter only reads."""

from __future__ import annotations

import csv
import json
from datetime import UTC, date, datetime

import pytest
import typer.main
from click.testing import CliRunner
from sqlalchemy import create_engine, text

from .test_distributed import make_archive

pytestmark = pytest.mark.timeout(300)
# a colon inside quotes (not a bind parameter), a LIKE with % (not a driver placeholder), and a filter that keeps
# some rows but not all
WHERE = ("(label = 'Effusion' and probability > 0.0) or (file_path like '%study1%' and rank <= 3) "
         "or processed_at < '2000-01-01 12:30:00'")
BOOLEANS, TIMESTAMPS = {"untrained", "needs_review", "out_of_distribution"}, {"processed_at"}
FLOATS = {"probability", "uncertainty", "ood_score"}


@pytest.fixture(scope="module")
def databases(tmp_path_factory, servers, chest_small, models, untrained_settings) -> dict[str, str]:
    """One real run of two studies into SQLite and into PostgreSQL: {dialect: URL}."""
    from worker.embedded import run_folder
    from worker.pipeline import Pipeline

    from .services import reset_postgres

    tmp = tmp_path_factory.mktemp("export")
    make_archive(tmp / "archive", chest_small, studies=2)
    pg = servers[1].url
    reset_postgres(pg)
    urls = {"sqlite": f"sqlite:///{tmp / 'neuron.db'}", "postgresql": pg}
    for url in urls.values():
        settings = untrained_settings.with_(database_url=url, out_dir=tmp / "out")
        run_folder(tmp / "archive", settings, pipeline=Pipeline(models, settings))
    return urls


def export(*args: str):
    """``neuron export ARGS`` in this process; ``said`` is its output with the console's line wrapping undone."""
    from neuron_cli import app

    result = CliRunner().invoke(typer.main.get_command(app), ["export", *args])
    result.said = " ".join(result.output.split())
    return result


def view_rows(url: str, where: str, view: str = "findings") -> tuple[list[str], list[tuple]]:
    """``SELECT * FROM view WHERE (where)`` through the driver itself: column names and raw rows."""
    eng = create_engine(url)
    try:
        raw = eng.raw_connection()
        cur = raw.cursor()
        cur.execute(f"SELECT * FROM {view} WHERE ({where})")
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
        raw.close()
    finally:
        eng.dispose()
    return names, rows


def python_value(name: str, value):
    """A raw driver value as the view means it: SQLite keeps booleans as 0/1 and timestamps as naive UTC text."""
    if value is None:
        return None
    if name in BOOLEANS:
        return bool(value)
    if name in TIMESTAMPS:
        value = datetime.fromisoformat(value) if isinstance(value, str) else value
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if name == "study_date" and isinstance(value, str):
        return date.fromisoformat(value)
    return value


def csv_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, date | datetime):
        return value.isoformat()
    return repr(value) if isinstance(value, float) else str(value)


def ordered(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (r["sop_instance_uid"], r["frame"], r["model"], r["label"]))


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_csv_and_parquet_exports_equal_the_view_row_for_row(databases, dialect, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    url = databases[dialect]
    names, raw = view_rows(url, WHERE)
    expected = ordered([{n: python_value(n, v) for n, v in zip(names, row, strict=True)} for row in raw])
    _, everything = view_rows(url, "1 = 1")
    assert 0 < len(expected) < len(everything)

    result = export("--db", url, "--where", WHERE, "-o", str(tmp_path / "f.parquet"))
    assert result.exit_code == 0, result.output
    assert f"wrote {len(expected)} rows of findings" in result.said
    table = pq.read_table(tmp_path / "f.parquet")
    assert table.column_names == names
    schema = table.schema
    assert schema.field("probability").type == pa.float64() and schema.field("uncertainty").type == pa.float64()
    assert schema.field("processed_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("untrained").type == pa.bool_() and schema.field("needs_review").type == pa.bool_()
    assert schema.field("positive").type == pa.int64() and schema.field("frame").type == pa.int64()
    assert ordered(table.to_pylist()) == expected

    result = export("--db", url, "--where", WHERE, "-o", str(tmp_path / "f.csv"))
    assert result.exit_code == 0, result.output
    with open(tmp_path / "f.csv", newline="") as fh:
        header, *rows = list(csv.reader(fh))
    assert header == names
    assert sorted(rows) == sorted([csv_text(r[n]) for n in names] for r in expected)
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_bad_column_exits_2_naming_the_condition_and_the_views_columns(databases, dialect, tmp_path):
    result = export("--db", databases[dialect], "--where", "labl = 'Effusion'", "-o", str(tmp_path / "x.csv"))
    assert result.exit_code == 2, result.output
    out = result.said
    assert "labl = 'Effusion'" in out and "study_instance_uid, series_instance_uid, sop_instance_uid, frame" in out
    assert "Traceback" not in out and not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_condition_cannot_write_and_the_tables_stay_intact(databases, dialect, tmp_path):
    url = databases[dialect]

    def counts():
        eng = create_engine(url)
        with eng.connect() as conn:
            got = [conn.execute(text(f"select count(*) from {t}")).scalar_one()
                   for t in ("files", "instances", "predictions")]
        eng.dispose()
        return got

    before = counts()
    assert min(before) > 0
    attempts = {"1=1; DROP TABLE files": "a ';' outside quotes would start a second statement",
                "1=1); DELETE FROM predictions; --": "a ';' outside quotes",
                "1=1) -- it's\n; DROP TABLE files; SELECT (1": "a ';' outside quotes",  # a quote in a comment
                "sop_instance_uid in (DELETE FROM files RETURNING sop_instance_uid)": "does not run on the view"}
    if dialect == "postgresql":  # a function with a side effect: refused by the read-only transaction
        attempts["nextval('files_id_seq') > 0"] = "read-only transaction"
    for where, why in attempts.items():
        result = export("--db", url, "--where", where, "-o", str(tmp_path / "x.parquet"))
        assert result.exit_code == 2 and why in result.said, (where, result.output)
        assert "Traceback" not in result.said and not (tmp_path / "x.parquet").exists()
    assert counts() == before
    if dialect == "postgresql":
        eng = create_engine(url)
        with eng.connect() as conn:
            assert conn.execute(text("select last_value from files_id_seq")).scalar_one() == before[0]
        eng.dispose()
    # a ';' inside quotes is data, not a second statement
    result = export("--db", url, "--where", "label = 'a;b'", "-o", str(tmp_path / "none.csv"))
    assert result.exit_code == 0 and "wrote 0 rows" in result.said
    assert (tmp_path / "none.csv").read_text().startswith("study_instance_uid,")


def test_the_other_views_export_and_a_wrong_suffix_or_view_is_refused(databases, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    url = databases["sqlite"]
    result = export("--db", url, "--view", "study_findings", "-o", str(tmp_path / "s.parquet"))
    assert result.exit_code == 0 and "wrote 2 rows of study_findings" in result.said, result.output
    schema = pq.read_schema(tmp_path / "s.parquet")
    assert schema.field("screened_at").type == pa.timestamp("us", tz="UTC")
    assert schema.field("max_probability").type == pa.float64() and schema.field("instances").type == pa.int64()
    result = export("--db", url, "--view", "ingest_status", "--where", "status = 'done'", "-o", str(tmp_path / "i.csv"))
    assert result.exit_code == 0 and "wrote 2 rows of ingest_status" in result.said, result.output
    result = export("--db", url, "-o", str(tmp_path / "f.xlsx"))
    assert result.exit_code == 2 and ".xlsx" in result.said and ".parquet" in result.said
    result = export("--db", url, "--view", "patients", "-o", str(tmp_path / "f.csv"))
    assert result.exit_code == 2 and "findings, study_findings, ingest_status, reviews" in result.said


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_fhir_export_holds_an_observation_per_positive_row_the_condition_selects(databases, dialect, tmp_path):
    from fhir.resources.R4B.bundle import Bundle

    url = databases[dialect]
    names, raw = view_rows(url, WHERE)
    positive = sorted(r[names.index("probability")] for r in raw if r[names.index("positive")] == 1)
    assert positive
    result = export("--db", url, "--where", WHERE, "-o", str(tmp_path / "f.json"))
    assert result.exit_code == 0, result.output
    bundle = json.loads((tmp_path / "f.json").read_text())
    Bundle.model_validate(bundle)
    values = sorted(e["resource"]["valueQuantity"]["value"] for e in bundle["entry"]
                    if e["resource"]["resourceType"] == "Observation")
    assert values == positive
