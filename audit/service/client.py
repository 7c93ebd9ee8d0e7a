"""``api.Client(url)``: the service from Python, returning what the local API returns (a ``Verdict``)."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import AuditError, InputError


class ServiceError(AuditError):
    """The service answered with an error; the message is its one line, with the HTTP status."""


class Client:
    """``Client("http://127.0.0.1:8000", api_key=None).check(image, caption)`` -> Verdict (with
    ``evidence_id``), as ``api.check`` would give for the service's models. ``api_key`` defaults to
    ``$AUDIT_API_KEY``."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0):
        import httpx

        self.url = url.rstrip("/")
        key = api_key if api_key is not None else os.environ.get("AUDIT_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs):
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceError(f"{self.url}: cannot reach the service ({exc})") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = response.text.strip().splitlines()[0] if response.text.strip() else response.reason_phrase
            raise ServiceError(f"{self.url}{path}: {response.status_code} {message}")
        return response

    def info(self) -> dict:
        return self._call("GET", "/v1/info").json()

    def ready(self) -> bool:
        import httpx

        try:
            return self.http.get("/v2/health/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def check(self, image: str | Path, caption: str | None = None, *, target: str | None = None,
              heads: str | None = None, attack: str | None = None, max_fpr: float | None = None,
              tier: str | None = None):
        """The service's Verdict for ``image``; without ``caption``, ``IMAGE.txt`` as ``audit check`` reads it,
        else the service's captioner writes one."""
        from ..auditor import image_row
        from ..verdict import Verdict

        path = Path(image)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        row = image_row(path, caption)  # the caption exactly as the local command would take it
        fields = {k: str(v) for k, v in (("target", target), ("heads", heads), ("attack", attack),
                                         ("max_fpr", max_fpr), ("tier", tier)) if v is not None}
        if row.caption is not None:
            fields["caption"] = row.caption if row.caption_source == "txt" else caption
            fields["caption_source"] = row.caption_source
        with open(path, "rb") as fh:
            answer = self._call("POST", "/v1/checks", data=fields, files={"image": (str(image), fh)}).json()
        evidence_id = answer.pop("evidence_id", None)
        verdict = Verdict.from_dict(answer)
        verdict.evidence_id = evidence_id
        return verdict

    def scan(self, folder: str, **options) -> dict:
        """Start a scan job on a folder under one of the service's data roots; returns the job."""
        return self._call("POST", "/v1/scans", json={"folder": str(folder), **options}).json()

    def job(self, job_id: str) -> dict:
        return self._call("GET", f"/v1/scans/{job_id}").json()

    def evidence(self, record_id: str) -> dict:
        return self._call("GET", f"/v1/evidence/{record_id}").json()


__all__ = ["Client", "ServiceError"]
