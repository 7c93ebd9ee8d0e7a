"""The evidence log on SQLite and on a real PostgreSQL server: records chain, an edited, removed or inserted
record is named by `audit evidence verify`, export writes in-toto Statements, migrations apply once, and
`audit check/scan --evidence` log the same records without a server."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from audit.cli import app
from audit.evidence import EvidenceLog, canonical_json, record_digest
from audit.evidence.log import GENESIS, MIGRATIONS, PREDICATE_TYPE, STATEMENT_TYPE

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL 15 server of its own in a temporary folder on a free loopback port, stopped afterwards.
    initdb refuses to run as root, so as root the server runs as the `postgres` system user."""
    if not (PG_BIN / "initdb").is_file() or not (PG_BIN / "pg_ctl").is_file():
        pytest.skip(f"PostgreSQL binaries not found in {PG_BIN} (install postgresql-15 to run these tests)")
    base = Path(tempfile.mkdtemp(prefix="audit-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(base)
            pytest.skip("running as root and no `postgres` user to run initdb as")
        os.chown(base, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = base / "data"
    subprocess.run([*prefix, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "audit"], check=True,
                   capture_output=True)
    subprocess.run([*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-o",
                    f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://audit@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*prefix, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "evidence.db")
    url = request.getfixturevalue("postgres")
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:  # a fresh database per test
        conn.exec_driver_sql("DROP TABLE IF EXISTS evidence, scan_jobs, audit_migrations")
    engine.dispose()
    return url


def _record(i: int, **extra) -> dict:
    return {"image": f"img{i}.png", "image_sha256": hashlib.sha256(str(i).encode()).hexdigest(),
            "verdict": "non-member", "probability": 0.1 * i, "caption": f"caption {i}", **extra}


def test_records_chain_and_verify_names_the_first_edited_record(db):
    log = EvidenceLog(db)
    added = [log.append(_record(i)) for i in range(5)]
    assert added[0]["prev_digest"] == GENESIS
    for prev, cur in zip(added, added[1:]):
        assert cur["prev_digest"] == prev["digest"]
    body = {k: v for k, v in added[2].items() if k not in ("seq", "prev_digest", "digest")}
    assert added[2]["digest"] == record_digest(added[1]["digest"], canonical_json(body))
    assert log.get(added[3]["id"]) == added[3]
    assert log.verify() | {"head": None} == {"ok": True, "records": 5, "first_bad": None, "head": None}
    ok = CliRunner().invoke(app, ["evidence", "verify", db])
    assert ok.exit_code == 0 and "5 records verify" in ok.stdout

    # Someone edits the verdict of record 3 inside its signed content, and its column to match.
    with log.engine.begin() as conn:
        edited = json.loads(conn.exec_driver_sql(f"SELECT body FROM evidence WHERE id = '{added[2]['id']}'")
                            .scalar()) | {"verdict": "member"}
        conn.execute(sa.text("UPDATE evidence SET body = :b, verdict = 'member' WHERE id = :i"),
                     {"b": canonical_json(edited), "i": added[2]["id"]})
    result = CliRunner().invoke(app, ["evidence", "verify", db])
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"error: {db}: record {added[2]['id']} (#{added[2]['seq']}) does not verify: its "
                                     "content does not match its digest (the record was edited); 2 records before "
                                     "it verify")


def test_a_column_edit_or_a_removed_record_is_named(db):
    log = EvidenceLog(db)
    added = [log.append(_record(i)) for i in range(4)]
    with log.engine.begin() as conn:
        conn.execute(sa.text("UPDATE evidence SET verdict = 'member' WHERE id = :i"), {"i": added[1]["id"]})
    bad = log.verify()["first_bad"]
    assert bad["id"] == added[1]["id"] and "verdict column" in bad["problem"]
    with log.engine.begin() as conn:
        conn.execute(sa.text("UPDATE evidence SET verdict = 'non-member' WHERE id = :i"), {"i": added[1]["id"]})
        conn.execute(sa.text("DELETE FROM evidence WHERE id = :i"), {"i": added[2]["id"]})
    bad = log.verify()["first_bad"]
    assert bad["id"] == added[3]["id"] and "removed or inserted" in bad["problem"]


def test_export_writes_records_with_in_toto_statements_by_time_and_job(db, tmp_path):
    log = EvidenceLog(db)
    first = log.append(_record(0))
    time.sleep(0.01)
    later = [log.append(_record(i, job_id="job-1", row_id=f"r{i}")) for i in (1, 2)]
    again = log.append(_record(1, job_id="job-1", row_id="r1"), skip_existing=True)
    assert again["id"] == later[0]["id"] and log.count() == 3  # a resumed scan logs each row once
    out = tmp_path / "export.jsonl"
    result = CliRunner().invoke(app, ["evidence", "export", db, "--out", str(out), "--job", "job-1"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["record"]["id"] for x in lines] == [r["id"] for r in later]
    statement = lines[0]["statement"]
    assert statement["_type"] == STATEMENT_TYPE and statement["predicateType"] == PREDICATE_TYPE
    assert statement["subject"] == [{"name": "img1.png", "digest": {"sha256": later[0]["image_sha256"]}}]
    CliRunner().invoke(app, ["evidence", "export", db, "--out", str(out), "--until", later[0]["time"]])
    assert [json.loads(x)["record"]["id"] for x in out.read_text().splitlines()] == [first["id"]]
    CliRunner().invoke(app, ["evidence", "export", db, "--out", str(out), "--since", later[0]["time"]])
    assert len(out.read_text().splitlines()) == 2


def test_migrations_apply_once_and_reopening_keeps_records(tmp_path):
    db = str(tmp_path / "e.db")
    log = EvidenceLog(db)
    log.append(_record(0))
    with log.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        names = list(conn.exec_driver_sql("SELECT name FROM audit_migrations ORDER BY name").scalars())
    assert names == [name for name, _ in MIGRATIONS]
    again = EvidenceLog(db)
    assert again.count() == 1 and again.verify()["ok"]


def test_reading_a_missing_database_is_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["evidence", "verify", str(tmp_path / "none.db")])
    assert result.exit_code == 1 and result.stderr.strip() == f"error: {tmp_path / 'none.db'}: no such evidence database"


@pytest.fixture(scope="module")
def toy_cli(tmp_path_factory):
    """The toy target's models loaded once for the CLI runs of this module (each command would load the same)."""
    from audit.features.compute import Models

    mp = pytest.MonkeyPatch()
    cache = {}
    load = Models.load.__func__

    def cached_load(cls, *args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = load(cls, *args, **kwargs)
        return cache[key]

    mp.setattr(Models, "load", classmethod(cached_load))
    from audit.toy import scenes

    root = tmp_path_factory.mktemp("cli")
    mp.setenv("AUDIT_HOME", str(root / "home"))  # the bundled heads, not heads registered on this machine
    images, captions = scenes.scene_images(5, "members", 3)
    folder = scenes.write_imagefolder(root / "set", images, captions, [None] * 3)
    yield {"root": root, "folder": folder, "captions": captions}
    mp.undo()


def test_check_and_scan_log_the_same_records_without_a_server(toy_cli, tmp_path):
    db = str(tmp_path / "evidence.db")
    image = toy_cli["folder"] / sorted(p.name for p in toy_cli["folder"].glob("*.png"))[0]
    result = CliRunner().invoke(app, ["check", str(image), "--caption", toy_cli["captions"][0], "--target", "toy",
                                      "--json", "--evidence", db])
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    (record_id,) = [line.removeprefix("evidence record: ") for line in result.stderr.splitlines()
                    if line.startswith("evidence record: ")]
    record = EvidenceLog(db).get(record_id)
    assert record["verdict"] == verdict["verdict"] and record["scores"] == verdict["scores"]
    assert record["image_sha256"] == hashlib.sha256(image.read_bytes()).hexdigest() and record["source"] == "check"

    out = tmp_path / "scan.jsonl"
    args = ["scan", str(toy_cli["folder"]), "--target", "toy", "--out", str(out), "--evidence", db, "-q"]
    assert CliRunner().invoke(app, args).exit_code == 0
    again = CliRunner().invoke(app, args + ["--resume"])
    assert again.exit_code == 0 and "evidence: 0 records added" in again.stderr
    log = EvidenceLog(db)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    scanned = [r for r in log.records() if r["source"] == "scan"]
    assert [r["row_id"] for r in scanned] == [x["id"] for x in rows]
    assert [r["probability"] for r in scanned] == [x["probability"] for x in rows]
    assert log.verify()["ok"] and log.count() == 4
