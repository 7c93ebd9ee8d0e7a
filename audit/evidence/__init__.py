"""The evidence log: every verdict as an append-only, hash-chained record in a database (SQLite by default,
PostgreSQL by URL), with the commands that verify and export it."""

from .log import (EvidenceLog, audit_db_url, canonical_json, export_jsonl, file_sha256, in_toto_statement,
                  record_digest, verdict_record)

__all__ = ["EvidenceLog", "audit_db_url", "canonical_json", "export_jsonl", "file_sha256", "in_toto_statement",
           "record_digest", "verdict_record"]
