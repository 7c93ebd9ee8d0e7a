"""HTML reports: self-contained, escaped, with the charts and images they promise, rendered by Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from audit.report.html import Predictions, write_evaluate_report, write_scan_report

EVIL = "<script>alert('x')</script>"


def _inline_images(page: str) -> list[Image.Image]:
    found = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in found]


def _assert_self_contained(page: str) -> None:
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//|file:)""", page), "external resource in the report"
    assert "<link" not in page


def _predictions(n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n // 2), np.zeros(n // 2)].astype(int)
    probs = {"II-S": np.clip(0.5 + 0.4 * (y - 0.5) + rng.normal(0, 0.15, n), 0, 1),
             "blind": np.clip(0.5 + rng.normal(0, 0.15, n), 0, 1)}
    return Predictions([f"img{i}.png" for i in range(n)], y, probs, {"II-S": 0.55, "blind": 0.5})


def _evaluation():
    m = {"accuracy": {"value": 0.8, "ci95": [0.7, 0.9]}, "auc": {"value": 0.875, "ci95": [0.8, 0.95]},
         "tpr_at_1pct_fpr": {"value": 0.25, "ci95": [0.0, 0.5]}, "tpr_at_0_1pct_fpr": 0.1, "n_test": 40}
    return {"attacks": {"II-S": m, "blind": {**m, "auc": {"value": 0.51, "ci95": [0.4, 0.6]}}},
            "default_attack": "II-S", "n_test": 40, "n_test_members": 20, "n_test_nonmembers": 20,
            "target": {"name": "toy", "hash": "abc123"}, "warnings": [EVIL]}


def test_evaluate_report_has_metrics_roc_histograms_and_escapes(tmp_path):
    out = write_evaluate_report(_evaluation(), tmp_path / "r.html", predictions=_predictions())
    page = out.read_text()
    _assert_self_contained(page)
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page
    assert "0.875" in page and "[0.800, 0.950]" in page and "weights abc123" in page
    for heading in ("ROC curves", "Score histograms", "Most member-like", "Least member-like"):
        assert heading in page
    images = _inline_images(page)
    assert len(images) == 2  # ROC + histograms; no store, so no thumbnails
    roc = np.asarray(images[0].convert("L"))
    assert roc.shape[1] > 600 and roc.std() > 10  # a drawn chart, not a blank canvas
    # most member-like come first: the highest-probability test row is in the first gallery
    pred = _predictions()
    top = pred.ids[int(np.argmax(pred.probability["II-S"]))]
    assert page.index(top) < page.index("Least member-like")


def test_evaluate_report_without_predictions_says_why(tmp_path):
    page = write_evaluate_report(_evaluation(), tmp_path / "r.html").read_text()
    assert "ROC curves and images left out" in page and "ROC curves</h2>" not in page
    assert "0.875" in page


def test_evaluate_report_reads_json_file_and_rejects_bad_json(tmp_path):
    (tmp_path / "e.json").write_text(json.dumps(_evaluation()))
    assert "0.875" in write_evaluate_report(tmp_path / "e.json", tmp_path / "r.html").read_text()
    (tmp_path / "bad.json").write_text("{")
    from audit.errors import InputError

    with pytest.raises(InputError, match="bad.json: not valid JSON"):
        write_evaluate_report(tmp_path / "bad.json", tmp_path / "r2.html")


def _scan_rows(tmp_path, n=6):
    rows = []
    for i in range(n):
        Image.new("RGB", (40, 30), (40 * i, 10, 200 - 30 * i)).save(tmp_path / f"q{i}.png")
        p = i / (n - 1)
        rows.append({"image": str(tmp_path / f"q{i}.png"), "id": f"q{i}.png", "target": "toy", "status": "ok",
                     "caption": f"caption {i} {EVIL}", "verdict": "member" if p >= 0.5 else "non-member",
                     "probability": p, "threshold": 0.5, "attack": "IV", "heads": "/h",
                     "scores": {"IV": {"probability": p, "threshold": 0.5}, "II-S": {"probability": 1 - p,
                                                                                      "threshold": 0.4}},
                     "warnings": ["blind baseline separated the auxiliary data"], "error": None})
    rows.append({"image": str(tmp_path / "bad.png"), "id": "bad.png", "target": "toy", "status": "unreadable",
                 "verdict": None, "probability": None, "error": f"{tmp_path}/bad.png: not a readable image {EVIL}"})
    return rows


def test_scan_report_counts_rows_shows_images_and_lists_errors(tmp_path):
    rows = _scan_rows(tmp_path)
    page = write_scan_report(rows, tmp_path / "scan.html", images_root=tmp_path).read_text()
    _assert_self_contained(page)
    assert EVIL not in page and "&lt;script&gt;" in page
    assert "unreadable" in page and "bad.png: not a readable image" in page
    assert "blind baseline separated the auxiliary data (6 rows)" in page
    images = _inline_images(page)
    thumbs = [im for im in images if im.size == (40, 30)]
    assert len(thumbs) == 6  # 3 most + 3 least member-like query images, read from their paths
    assert page.index("q5.png") < page.index("Least member-like") < page.index("q0.png", page.index("Least"))


def test_scan_report_from_jsonl_file(tmp_path):
    from audit.report.jsonl import JsonlWriter

    with JsonlWriter(tmp_path / "r.jsonl", key="id") as w:
        w.write_all(_scan_rows(tmp_path))
    page = write_scan_report(tmp_path / "r.jsonl", tmp_path / "scan.html").read_text()
    assert "q5.png" in page and "Rows that could not be scored" in page


CHROMIUM = next((shutil.which(n) for n in ("chromium-headless-shell", "chromium", "chromium-browser",
                                           "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium installed (apt-get install chromium-headless-shell)")
def test_report_renders_in_headless_chromium(tmp_path):
    out = write_evaluate_report(_evaluation(), tmp_path / "r.html", predictions=_predictions())
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1000,1400", f"--screenshot={shot}", out.as_uri()],
                   check=True, capture_output=True, timeout=120)
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert rgb.shape == (1400, 1000, 3)
    gray = rgb.mean(-1)
    colourful = (rgb.max(-1) - rgb.min(-1)) > 60  # the ROC lines and histogram bars, absent from an error page
    assert gray.std() > 20 and (gray < 100).mean() > 0.005 and colourful.mean() > 0.002


def test_long_captions_are_shortened_in_cards(tmp_path):
    rows = _scan_rows(tmp_path)
    rows[-2]["caption"] = "word " * 500
    page = write_scan_report(rows, tmp_path / "scan.html").read_text()
    assert "word " * 25 in page and "word " * 40 not in page and "…" in page


def _rule(member_t=0.8, nonmember_t=0.3):
    return {"rule": "budget", "attack": "IV", "max_fpr": 0.05, "max_miss": 0.05, "member_threshold": member_t,
            "nonmember_threshold": nonmember_t, "validation_fpr": 0.04, "validation_miss": 0.02,
            "fpr_resolution": 0.02, "miss_resolution": 0.02, "n_validation_nonmembers": 50,
            "n_validation_members": 50, "member_resolvable": True, "nonmember_resolvable": True, "notes": []}


def test_scan_report_counts_the_three_verdicts_and_names_the_rule(tmp_path):
    from audit.attacks.decision import Decision

    rows = _scan_rows(tmp_path)
    rule = Decision.from_dict(_rule())
    for r in rows[:-1]:
        r["verdict"], r["decision"], r["threshold"] = rule.decide(r["probability"]), _rule(), 0.8
        r["scores"]["IV"].update(threshold=0.8, nonmember_threshold=0.3)
    page = write_scan_report(rows, tmp_path / "scan.html").read_text()
    # p = 0, .2 | .4, .6 | .8, 1: two of each
    for verdict in ("member", "non-member", "inconclusive"):
        assert f"<dt>verdict {verdict}</dt><dd>2</dd>" in page, verdict
    assert "<dt>rule</dt><dd>max-fpr 0.05</dd>" in page
    cards = re.findall(r"P\(member\) ([0-9.]+) · ([a-z-]+)", page)
    assert cards and all(rule.decide(float(p)) == v for p, v in cards)


def test_evaluate_report_shows_what_the_verdicts_at_the_budget_do(tmp_path):
    from audit.attacks.decision import Decision

    ev = _evaluation()
    ev["decision"] = {"rule": "budget", "max_fpr": 0.05, "max_miss": 0.05}
    ev["attacks"]["II-S"]["verdicts"] = {**_rule(), "decided_fraction": {"value": 0.35, "ci95": [0.2, 0.5]},
                                         "fpr": {"value": 0.05, "ci95": [0.0, 0.15]},
                                         "precision": {"value": 0.875, "ci95": [0.6, 1.0]},
                                         "tpr": {"value": 0.35, "ci95": [0.15, 0.55]},
                                         "counts": {"member": 8, "non-member": 6, "inconclusive": 26}}
    pred = _predictions()
    pred.decisions = {a: Decision.from_dict({**_rule(0.7, 0.35), "attack": a}) for a in pred.probability}
    page = write_evaluate_report(ev, tmp_path / "r.html", predictions=pred).read_text()
    assert "Verdicts on the test split" in page and "Verdicts at max-fpr 0.05" in page
    assert "0.350 <span class=ci>[0.200, 0.500]</span>" in page and "8 / 6 / 26" in page
    # The gallery's verdicts are the three-way rule's, and an inconclusive card is neither right nor wrong.
    cards = re.findall(r"P\(member\) ([0-9.]+) · ([a-z-]+)<span class='([a-z]*)'>", page)
    assert cards and all(pred.decisions["II-S"].decide(float(p)) == v for p, v, _ in cards)
    assert all((mark == "") == (v == "inconclusive") for _, v, mark in cards)
