"""An append-only, hash-chained log of verdicts in SQLite (default) or PostgreSQL, through SQLAlchemy.

Each record is a JSON object; its ``digest`` is the SHA-256 of the previous record's digest and the record's
canonical JSON (sorted keys, no spaces, UTF-8), so editing, inserting or deleting a record in the middle breaks
every digest after it, and ``verify`` names the first record that does not match. The schema is created and
upgraded by the migrations at the bottom of this file, applied in order when a log is opened.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlalchemy as sa

from ..errors import InputError, UsageError
from ..manifest import file_sha256

GENESIS = "0" * 64
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "urn:audit:verdict:v1"

metadata = sa.MetaData()
migrations_table = sa.Table(
    "audit_migrations", metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("applied_at", sa.String(40), nullable=False))
records_table = sa.Table(
    "evidence", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(40), nullable=False, unique=True),
    sa.Column("time", sa.String(40), nullable=False, index=True),
    sa.Column("job_id", sa.String(64), nullable=True, index=True),
    sa.Column("row_id", sa.Text, nullable=True),
    sa.Column("image_sha256", sa.String(64), nullable=True, index=True),
    sa.Column("verdict", sa.String(20), nullable=True),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("prev_digest", sa.String(64), nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),
    sa.UniqueConstraint("job_id", "row_id", name="evidence_job_row"))
jobs_table = sa.Table(
    "scan_jobs", metadata,
    sa.Column("id", sa.String(40), primary_key=True),
    sa.Column("state", sa.String(20), nullable=False, index=True),
    sa.Column("created_at", sa.String(40), nullable=False),
    sa.Column("started_at", sa.String(40), nullable=True),
    sa.Column("finished_at", sa.String(40), nullable=True),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("total", sa.Integer, nullable=False, default=0),
    sa.Column("done", sa.Integer, nullable=False, default=0),
    sa.Column("failed", sa.Integer, nullable=False, default=0),
    sa.Column("error", sa.Text, nullable=True))


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def record_digest(prev_digest: str, body: str) -> str:
    return hashlib.sha256(prev_digest.encode("ascii") + b"\n" + body.encode("utf-8")).hexdigest()


def audit_db_url(db: str | Path | None) -> str:
    """A database URL: ``postgresql://...``/``sqlite:///...`` as given, a file path as SQLite, None as
    ``$AUDIT_HOME/evidence.db``."""
    if db is None:
        from ..config import audit_home

        db = audit_home() / "evidence.db"
    text = str(db)
    if "://" in text:
        if text.startswith("postgresql://") or text.startswith("postgres://"):
            # psycopg 3 is the driver installed with the service extra.
            return "postgresql+psycopg://" + text.split("://", 1)[1]
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def _safe_url(url: str) -> str:
    """The URL for messages, without its password."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (a malformed URL is reported by the caller)
        return url


class EvidenceLog:
    """The evidence database: ``append`` records, ``get`` one, ``records`` in order, ``verify`` the chain.

    One writer at a time: appends hold a process lock and a database lock (SQLite ``BEGIN IMMEDIATE``,
    PostgreSQL ``LOCK TABLE``), so the chain stays linear even with several processes writing."""

    def __init__(self, db: str | Path | None = None):
        self.url = audit_db_url(db)
        self.sqlite = self.url.startswith("sqlite")
        if self.sqlite:
            path = Path(self.url.removeprefix("sqlite:///"))
            if self.url != "sqlite://" and not path.parent.is_dir():
                path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine = sa.create_engine(self.url, future=True, **({"connect_args": {"timeout": 30}}
                                                                     if self.sqlite else {"pool_pre_ping": True}))
        except (sa.exc.ArgumentError, ImportError, ValueError) as exc:
            raise UsageError(f"--db {_safe_url(self.url)}: not a database URL this tool can open ({exc})") from None
        if self.sqlite:
            self._sqlite_pragmas()
        self._lock = threading.Lock()
        try:
            migrate(self.engine)
        except sa.exc.OperationalError as exc:
            raise InputError(f"{_safe_url(self.url)}: cannot open the evidence database "
                             f"({str(exc.orig).strip().splitlines()[0]})") from None

    def _sqlite_pragmas(self) -> None:
        @sa.event.listens_for(self.engine, "connect")
        def _connect(dbapi_connection, _record):
            # Let SQLAlchemy's begin() emit our BEGIN IMMEDIATE (pysqlite would otherwise begin lazily).
            dbapi_connection.isolation_level = None
            cur = dbapi_connection.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.close()

        @sa.event.listens_for(self.engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------------------------------------- writing

    def append(self, record: dict, skip_existing: bool = False) -> dict:
        """Add ``record`` (its ``id`` and ``time`` are set here when absent) at the end of the chain; returns it
        with ``seq``, ``prev_digest`` and ``digest``. ``skip_existing``: when a record with the same
        ``job_id``/``row_id`` is already logged, return that one instead (a resumed scan logs each row once)."""
        record = dict(record)
        record.setdefault("id", uuid.uuid4().hex)
        record.setdefault("time", utc_now())
        with self._lock, self.engine.begin() as conn:
            if not self.sqlite:
                conn.exec_driver_sql("LOCK TABLE evidence IN SHARE ROW EXCLUSIVE MODE")
            if skip_existing and record.get("job_id") is not None and record.get("row_id") is not None:
                row = conn.execute(sa.select(records_table).where(
                    records_table.c.job_id == record["job_id"], records_table.c.row_id == record["row_id"])).first()
                if row is not None:
                    return _out(row)
            last = conn.execute(sa.select(records_table.c.digest).order_by(records_table.c.seq.desc())
                                .limit(1)).scalar()
            prev = last or GENESIS
            body = canonical_json(record)
            digest = record_digest(prev, body)
            result = conn.execute(records_table.insert().values(
                id=record["id"], time=record["time"], job_id=record.get("job_id"), row_id=record.get("row_id"),
                image_sha256=record.get("image_sha256"), verdict=record.get("verdict"), body=body,
                prev_digest=prev, digest=digest))
            seq = result.inserted_primary_key[0]
        return record | {"seq": seq, "prev_digest": prev, "digest": digest}

    # ---------------------------------------------------------------------------------------------- reading

    def get(self, record_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(records_table).where(records_table.c.id == record_id)).first()
        return None if row is None else _out(row)

    def records(self, since: str | None = None, until: str | None = None, job: str | None = None,
                batch: int = 500) -> Iterator[dict]:
        """Records in chain order, optionally those of one job or with ``since <= time < until`` (ISO UTC)."""
        query = sa.select(records_table).order_by(records_table.c.seq)
        if since:
            query = query.where(records_table.c.time >= since)
        if until:
            query = query.where(records_table.c.time < until)
        if job:
            query = query.where(records_table.c.job_id == job)
        last = 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(query.where(records_table.c.seq > last).limit(batch)).all()
            if not rows:
                return
            for row in rows:
                yield _out(row)
            last = rows[-1].seq

    def count(self, job: str | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(records_table)
        if job is not None:
            query = query.where(records_table.c.job_id == job)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar() or 0)

    def verify(self) -> dict:
        """Check the whole chain: ``{"ok", "records", "first_bad": None or {"seq", "id", "problem"}, "head"}``."""
        prev, n = GENESIS, 0
        query = sa.select(records_table).order_by(records_table.c.seq)
        last = 0
        while True:
            with self.engine.connect() as conn:
                rows = conn.execute(query.where(records_table.c.seq > last).limit(1000)).all()
            if not rows:
                return {"ok": True, "records": n, "first_bad": None, "head": prev}
            for row in rows:
                problem = _problem(row, prev)
                if problem:
                    return {"ok": False, "records": n, "head": prev,
                            "first_bad": {"seq": row.seq, "id": row.id, "problem": problem}}
                prev, n = row.digest, n + 1
            last = rows[-1].seq


def _problem(row, prev: str) -> str | None:
    """Why a stored record does not match the chain, or None."""
    if row.prev_digest != prev:
        return "its previous-digest does not match the record before it (a record was removed or inserted)"
    if record_digest(prev, row.body) != row.digest:
        return "its content does not match its digest (the record was edited)"
    try:
        body = json.loads(row.body)
    except json.JSONDecodeError:
        return "its content is not JSON"
    for column in ("id", "time", "job_id", "row_id", "image_sha256", "verdict"):
        if body.get(column) != getattr(row, column):
            return f"its {column} column ({getattr(row, column)!r}) differs from the signed content " \
                   f"({body.get(column)!r})"
    return None


def _out(row) -> dict:
    return json.loads(row.body) | {"seq": row.seq, "prev_digest": row.prev_digest, "digest": row.digest}


def in_toto_statement(record: dict) -> dict:
    """The record as an in-toto Statement whose subject is the checked image (by its SHA-256)."""
    name = record.get("image") or record.get("row_id") or record["id"]
    return {"_type": STATEMENT_TYPE,
            "subject": [{"name": str(name), "digest": {"sha256": record.get("image_sha256") or ""}}],
            "predicateType": PREDICATE_TYPE, "predicate": record}


def export_jsonl(log: EvidenceLog, out: str | Path, since: str | None = None, until: str | None = None,
                 job: str | None = None) -> int:
    """Write the chosen records to ``out``, one JSON line each: ``{"record": ..., "statement": ...}``."""
    from ..config import atomic_write_text

    lines = [canonical_json({"record": r, "statement": in_toto_statement(r)})
             for r in log.records(since=since, until=until, job=job)]
    atomic_write_text(Path(out), "".join(line + "\n" for line in lines))
    return len(lines)


# ----------------------------------------------------------------------------------------------- records

def heads_digest(heads_path: str | Path) -> str:
    """SHA-256 of heads.json, which records the SHA-256 of every ONNX head."""
    from ..attacks.train import HEADS_FILE

    path = Path(heads_path) / HEADS_FILE
    return _cached_sha256(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _cached_sha256(path: str, _mtime_ns: int) -> str:
    return file_sha256(path)


def verdict_record(verdict: dict, auditor, image_sha256: str | None, *, api_key_id: str | None = None,
                   job_id: str | None = None, row_id: str | None = None, source: str = "check") -> dict:
    """The evidence record of one verdict (a ``Verdict.to_dict()``) made by ``auditor``."""
    from .. import __version__
    from ..seeding import image_seeds

    cfg = auditor.config
    caption = verdict.get("caption")
    ids = auditor.models.identities()
    return {
        "image": verdict.get("image"), "image_sha256": image_sha256, "caption": caption,
        "caption_sha256": None if caption is None else hashlib.sha256(caption.encode("utf-8")).hexdigest(),
        "caption_source": verdict.get("caption_source"),
        "target": ids["target"], "embedder": ids["embedder"], "captioner": ids["captioner"],
        # Heads trained with a reference model read it too: the verdict depends on its weights.
        **({"reference": ids["reference"]} if ids.get("reference") else {}),
        "heads": {"path": auditor.heads_path, "sha256": heads_digest(auditor.heads_path)},
        "tool_version": __version__,
        "settings": {"tier": verdict.get("tier") or auditor.heads.tier(auditor.attack), "n_gen": cfg.n_gen,
                     "steps": cfg.steps, "guidance": cfg.guidance, "seed": cfg.seed,
                     "seeds": image_seeds(cfg.seed, caption, cfg.n_gen) if caption else None,
                     "attack": auditor.attack, "decision": verdict.get("decision") or auditor.decision.to_dict()},
        "status": verdict.get("status"), "error": verdict.get("error"), "attack": verdict.get("attack"),
        "scores": verdict.get("scores"), "probability": verdict.get("probability"),
        "threshold": verdict.get("threshold"), "verdict": verdict.get("verdict"),
        "warnings": verdict.get("warnings") or [], "api_key_id": api_key_id, "job_id": job_id, "row_id": row_id,
        "source": source,
    }


# -------------------------------------------------------------------------------------------- migrations

def _m001_evidence(conn) -> None:
    records_table.create(conn, checkfirst=True)


def _m002_scan_jobs(conn) -> None:
    jobs_table.create(conn, checkfirst=True)


# Applied in order, each once, recorded in audit_migrations; add new ones at the end, never edit old ones.
MIGRATIONS: list[tuple[str, Callable]] = [("m001_evidence", _m001_evidence), ("m002_scan_jobs", _m002_scan_jobs)]


def migrate(engine) -> list[str]:
    """Apply the migrations this database has not had; returns their names."""
    applied = []
    with engine.begin() as conn:
        if not engine.url.get_backend_name().startswith("sqlite"):
            # Two processes opening a new PostgreSQL database at once: one migrates, the other waits.
            conn.exec_driver_sql("SELECT pg_advisory_xact_lock(727274)")
        migrations_table.create(conn, checkfirst=True)
        done = set(conn.execute(sa.select(migrations_table.c.name)).scalars())
        for name, fn in MIGRATIONS:
            if name not in done:
                fn(conn)
                conn.execute(migrations_table.insert().values(name=name, applied_at=utc_now()))
                applied.append(name)
    return applied
