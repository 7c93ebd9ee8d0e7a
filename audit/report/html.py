"""Self-contained HTML reports for ``audit scan`` and ``audit evaluate``.

One file, no network: charts and thumbnails are inline base64 PNGs, styles are inline, there is no script. The page
is rendered by Jinja2 from ``templates/report.html`` with autoescape on: every string from the data (file names,
captions, error messages, any field of an evaluation JSON) is text, never markup, since it comes from people we do
not know. A scan report embeds only images under the scanned folder (``images_root``), named by their row ids.

- ``write_evaluate_report(evaluation, out_html, store=..., heads=...)``: the metrics table (blind baseline
  included), what the verdicts at the evaluation's budget do on the test split (fraction decided, FPR, precision,
  TPR, verdict counts), ROC curves (linear and log FPR), score histograms of members and non-members per attack
  with the member and non-member thresholds, and the most and least member-like test images beside their
  generated images.
- ``write_scan_report(results, out_html, store=...)``: status and verdict counts (member / non-member /
  inconclusive) and the rule that made them, histograms of P(member) with the thresholds, the most and least
  member-like images (beside their generated images when a feature store is given), and every row that could not
  be scored with its reason.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import functools
import io
import logging
import os
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

from .. import __version__
from ..config import atomic_write_text, read_json
from ..errors import ArtifactError, InputError
from ..verdict import VERDICTS
from .jsonl import read_jsonl

log = logging.getLogger(__name__)

THUMB = 112  # CSS pixels of a thumbnail
MAX_ERROR_ROWS = 500  # unscored rows listed in a scan report; the rest are counted
MAX_CAPTION_SHOWN = 160  # characters of a caption shown under its image


@dataclasses.dataclass
class Predictions:
    """Per-row probabilities of each attack on labelled rows (the evaluation's test split)."""

    ids: list[str]
    member: np.ndarray  # int 1/0
    probability: dict[str, np.ndarray]
    threshold: dict[str, float]  # the two-way (balanced-accuracy) threshold
    decisions: dict[str, Any] | None = None  # attack -> audit.attacks.decision.Decision: the three-way rule

    def lines(self) -> dict[str, dict[str, float | None]]:
        """Per attack, the thresholds the histograms draw."""
        if not self.decisions:
            return {a: {"member": t} for a, t in self.threshold.items()}
        return {a: {"member": d.member_threshold, "non-member": d.nonmember_threshold}
                for a, d in self.decisions.items()}

    def verdicts(self, attack: str) -> list[str]:
        p = self.probability[attack]
        if self.decisions and attack in self.decisions:
            return list(self.decisions[attack].decide_all(p))
        return ["member" if x >= self.threshold[attack] else "non-member" for x in p]


# ------------------------------------------------------------------------------------------------ public API

def write_evaluate_report(evaluation: Mapping | str | os.PathLike, out_html: str | os.PathLike,
                          store: str | os.PathLike | None = None, heads: str | os.PathLike | None = None,
                          predictions: Predictions | None = None, title: str | None = None, top_k: int = 6) -> Path:
    """Write the evaluation report. ``evaluation`` is the dict (or JSON file) of ``audit evaluate --json``.

    The ROC curves, histograms and images need the test rows' probabilities: pass ``predictions``, or let them be
    recomputed from the feature store and heads (``store``/``heads``, defaulting to the paths the evaluation
    records). Without either, the report holds the metrics table only and says why.
    """
    evaluation = _load_json(evaluation)
    # Paths an evaluation JSON names are used only when they are strings (a hand-made file may hold anything).
    store = store if store is not None else _text_or_none(evaluation.get("store"))
    heads = heads if heads is not None else _text_or_none(evaluation.get("heads"))
    notes: list[str] = []
    if predictions is None and store and heads:
        try:
            predictions = evaluation_predictions(store, heads, _mapping(evaluation.get("decision")))
        except (ArtifactError, InputError, OSError) as exc:
            notes.append(f"ROC curves and images left out: {exc}")
    elif predictions is None:
        notes.append("ROC curves and images left out: no feature store and heads to recompute the test predictions")
    default = _text_or_none(evaluation.get("default_attack")) or (next(iter(predictions.probability))
                                                                  if predictions else None)
    sections = [_section("Metrics on the test split", table=_metrics_table(evaluation), notes=[_METRICS_NOTE])]
    sections += _verdicts_section(evaluation)
    if predictions is not None:
        sections.append(_section("ROC curves", images=[_img(_roc_png(predictions), "ROC curves", width=960)],
                                 notes=["Step curves on the test split; the dashed grey line is the blind baseline "
                                        "(no generated image). Right: log scale, where low-FPR behaviour shows."]))
        sections.append(_section("Score histograms", images=[_img(_hist_png(
            predictions.probability, predictions.member, predictions.lines()), "histograms", width=960)]))
        if default in predictions.probability:
            sections.append(_gallery_section(predictions.ids, predictions.probability[default],
                                             predictions.verdicts(default), default, store, top_k,
                                             labels=dict(zip(predictions.ids, predictions.member.tolist()))))
    warnings = [str(w) for w in _as_list(evaluation.get("warnings"))] + notes
    return _write(out_html, title or "audit evaluate", _evaluate_facts(evaluation), warnings, sections)


def write_scan_report(results: Iterable[Mapping] | str | os.PathLike, out_html: str | os.PathLike,
                      store: str | os.PathLike | None = None, title: str | None = None, top_k: int = 6,
                      images_root: str | os.PathLike | None = None,
                      generate: Callable[[list[str]], np.ndarray] | None = None) -> Path:
    """Write the scan report from the scan's result rows (a list of dicts, or the JSONL file).

    ``store``: a feature store holding the scanned rows (by id), for the generated images beside each query.
    ``generate``: captions -> uint8 [N, n_gen, H, W, 3] with the scan's seed and settings (``Auditor.regenerate``):
    without a store, the gallery's rows are generated again, which gives the very images they were scored on.
    ``images_root``: the scanned folder; a row's query image is embedded only when its id names a file under it
    (no absolute path, no ``..``, no symlink leading out), read as ``open_user_file`` reads folders; others are
    shown as not embedded. Default: the JSONL's folder (None for rows given as dicts: nothing is read).
    """
    if isinstance(results, (str, os.PathLike)):
        images_root = images_root if images_root is not None else Path(results).parent
        rows, _ = read_jsonl(results)
    else:
        rows = list(results)
    rows = [_clean_row(r) for r in rows if isinstance(r, Mapping)]
    scored = [r for r in rows if r.get("status") == "ok" and _finite(r.get("probability")) is not None]
    for r in scored:
        r["probability"] = _finite(r["probability"])
    attack = Counter(r.get("attack") for r in scored).most_common(1)[0][0] if scored else None
    tier = next((r.get("tier") for r in scored if r.get("attack") == attack and r.get("tier")), None)
    rule = _first(scored, "decision")
    facts = {
        "target": _first(rows, "target"), "heads": _first(rows, "heads"),
        "attack": f"{attack} ({tier})" if tier else attack,
        "rows": len(rows), "scored": len(scored),
        **{f"verdict {v}": sum(r.get("verdict") == v for r in scored) for v in VERDICTS},
        "rule": _rule_text(rule) if scored else None,
    }
    sections = [_section("Rows", table=_counts_table(rows))]
    if scored:
        by_attack: dict[str, list[float]] = {}
        lines: dict[str, dict[str, float | None]] = {}
        for r in scored:
            scores = r.get("scores")
            for a, s in (scores.items() if isinstance(scores, Mapping) else ()):
                if isinstance(s, Mapping) and _finite(s.get("probability")) is not None:
                    by_attack.setdefault(str(a), []).append(_finite(s["probability"]))
                    lines[str(a)] = {"member": _finite(s.get("threshold")),
                                     "non-member": _finite(s.get("nonmember_threshold"))}
        if not by_attack:
            by_attack = {str(attack): [float(r["probability"]) for r in scored]}
            lines = {str(attack): {"member": _finite(scored[0].get("threshold")),
                                   "non-member": _finite(_mapping(rule).get("nonmember_threshold"))}}
        probs = {a: np.asarray(v) for a, v in by_attack.items()}
        sections.append(_section("P(member) histograms", images=[_img(_hist_png(probs, None, lines), "histograms",
                                                                      width=960)]))
        ids = [str(r.get("id") or r.get("image")) for r in scored]
        rows_by_id = {i: r for i, r in zip(ids, scored)}
        sections.append(_gallery_section(ids, np.array([float(r["probability"]) for r in scored]),
                                         [str(r.get("verdict")) for r in scored], attack, store, top_k,
                                         rows_by_id=rows_by_id, images_root=images_root, generate=generate))
    scored_ids = {id(r) for r in scored}
    sections.append(_error_section([r for r in rows if id(r) not in scored_ids]))
    warnings = _counted(str(w) for r in scored for w in _as_list(r.get("warnings")))
    return _write(out_html, title or "audit scan", facts, warnings, sections)


def evaluation_predictions(store: str | os.PathLike, heads: str | os.PathLike,
                           decision: Mapping | None = None) -> Predictions:
    """Recompute the test split's probabilities of every attack from the store and heads an evaluation used, and
    the verdict rules at the evaluation's ``decision`` (``{"rule", "max_fpr", "max_miss"}``; default: max-fpr
    0.01)."""
    from ..attacks import load_heads
    from ..attacks.evaluate import test_rows
    from ..features.store import FeatureStore

    fs = FeatureStore.open(store)
    h = load_heads(heads, target=fs.manifest.get("target"))
    batch = fs.read(ok_only=True)
    rows = test_rows(batch, h, str(store))
    sub = {k: np.asarray(v)[rows] for k, v in batch.items() if np.ndim(v) >= 1 and len(v) == len(batch["ids"])}
    preds = h.predict(sub)
    d = dict(decision or {})
    rules = h.decisions(d.get("rule") or "budget", d.get("max_fpr") or 0.01, d.get("max_miss"))
    return Predictions(
        ids=[str(i) for i in sub["ids"]], member=np.asarray(sub["member"]).astype(int),
        probability={a: np.asarray(p["probability"], np.float64) for a, p in preds.items()},
        threshold={a: float(p["threshold"]) for a, p in preds.items()},
        decisions={a: rules[a] for a in preds},
    )


# ------------------------------------------------------------------------------------------------ charts

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    _plt().close(fig)
    return buf.getvalue()


def _roc_png(pred: Predictions) -> bytes:
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    y = pred.member
    for attack, p in pred.probability.items():
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        style = {"linestyle": "--", "color": "grey"} if attack == "blind" else {}
        for ax in axes:
            ax.plot(fpr, tpr, drawstyle="steps-post", label=f"{attack} (AUC {roc_auc_score(y, p):.3f})", **style)
    for ax, scale in zip(axes, ("linear", "log")):
        ax.plot([1e-3, 1], [1e-3, 1], color="black", linewidth=0.6)
        ax.set_xscale(scale)
        ax.set_yscale(scale)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.grid(alpha=0.3)
        if scale == "log":
            lo = 1.0 / max(2, int((y == 0).sum()))
            ax.set_xlim(lo / 2, 1)
            ax.set_ylim(lo / 2, 1.05)
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _hist_png(probs: Mapping[str, np.ndarray], labels: np.ndarray | None,
              thresholds: Mapping[str, Mapping[str, float | None]]) -> bytes:
    """Histograms per attack; ``thresholds``: attack -> {"member": t, "non-member": t} (None: not drawn)."""
    plt = _plt()
    names = list(probs)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.5 * cols + 0.5, 2.2 * rows + 0.3), squeeze=False)
    bins = np.linspace(0, 1, 21)
    for ax, name in zip(axes.flat, names):
        p = np.asarray(probs[name], np.float64)
        if labels is None:
            ax.hist(p, bins=bins, color="#4c72b0")
        else:
            ax.hist(p[labels == 0], bins=bins, alpha=0.6, color="#4c72b0", label="non-member")
            ax.hist(p[labels == 1], bins=bins, alpha=0.6, color="#dd8452", label="member")
        for side, t in (thresholds.get(name) or {}).items():
            if t is not None and 0 <= t <= 1:
                ax.axvline(t, color="#c33" if side == "member" else "#26a", linewidth=1,
                           linestyle=":" if side == "member" else "--")
        ax.set_title(name, fontsize=10)
        ax.set_xlim(0, 1)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if labels is not None:
        axes.flat[0].legend(fontsize=7)
    fig.supxlabel("P(member); red dotted: member at or above, blue dashed: non-member below (between: "
                  "inconclusive)", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _thumb_png(image: np.ndarray, max_side: int = 128) -> bytes:
    im = Image.fromarray(np.asarray(image, np.uint8))
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ images

def _store_images(store: str | os.PathLike | None,
                  ids: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """(query pixels, generated pixels, caption) of the given ids from a feature store; {} without a store."""
    if not store or not ids:
        return {}
    import h5py

    try:
        with h5py.File(store, "r") as f:
            n = int(f.attrs.get("n_committed", len(f["ids"])))
            all_ids = [str(i) for i in f["ids"].asstr()[:n]]
            where = {i: k for k, i in enumerate(all_ids)}
            idx = sorted({where[i] for i in ids if i in where})
            if not idx:
                return {}
            q = f["query_pixels"][idx]
            # A gray-box store holds no generated images: the gallery shows the queries alone.
            g = f["gen_pixels"][idx] if "gen_pixels" in f else np.zeros((len(idx), 0), np.uint8)
            captions = [str(c) for c in f["caption"].asstr()[idx]]
    except (OSError, KeyError) as exc:
        log.warning("%s: cannot read images for the report (%s)", store, exc)
        return {}
    return {all_ids[k]: (q[j], g[j], captions[j]) for j, k in enumerate(idx)}


def _query_image(row: Mapping | None, images_root) -> tuple[np.ndarray | None, str]:
    """A scan row's query pixels, read only from under ``images_root`` by the row's id; else (None, why not)."""
    from ..imagefolder import ImageError, load_image

    rid = (row or {}).get("id")
    if images_root is None or not isinstance(rid, str) or not rid:
        return None, "not embedded"
    rel = PurePosixPath(rid)
    if rel.is_absolute() or ".." in rel.parts or "\\" in rid or "\x00" in rid:
        return None, "not embedded (not under the scanned folder)"
    try:
        return load_image(Path(images_root) / rel, root=images_root), ""
    except ImageError as exc:
        log.warning("report: %s", exc)
        return None, ("not embedded (not under the scanned folder)" if exc.status == "outside_folder"
                      else f"not embedded ({exc.status})")


def _regenerated_images(chosen: Sequence[str], rows_by_id: Mapping | None, images_root, generate
                        ) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """(query pixels, generated pixels, caption) of the chosen rows, generating their images again."""
    picked = []
    for rid in dict.fromkeys(chosen):
        row = (rows_by_id or {}).get(rid)
        query, _ = _query_image(row, images_root)
        if query is not None and row.get("caption"):
            picked.append((rid, query, str(row["caption"])))
    if not picked:
        return {}
    try:
        gens = np.asarray(generate([c for _, _, c in picked]))
    except Exception as exc:  # a report must not fail a finished scan (a service gone since, ...)
        log.warning("report: cannot generate the gallery's images again (%s); showing query images only", exc)
        return {}
    return {rid: (query, gens[j], caption) for j, (rid, query, caption) in enumerate(picked)}


def _gallery_section(ids: Sequence[str], probs: np.ndarray, verdicts: Sequence[str], attack: str | None, store,
                     top_k: int, labels: Mapping[str, int] | None = None, rows_by_id: Mapping | None = None,
                     images_root=None, generate=None) -> dict:
    order = np.argsort(-np.asarray(probs), kind="stable")
    k = min(top_k, len(order) // 2 if len(order) > 1 else len(order))
    top, bottom = list(order[:k]), list(order[::-1][:k])
    chosen = [ids[i] for i in top + bottom]
    pixels = _store_images(store, chosen)
    if not pixels and generate is not None:
        pixels = _regenerated_images(chosen, rows_by_id, images_root, generate)
    groups = [{"heading": heading,
               "cards": [_card(ids[i], float(probs[i]), verdicts[i], pixels.get(ids[i]),
                               labels.get(ids[i]) if labels else None,
                               rows_by_id.get(ids[i]) if rows_by_id else None, images_root) for i in picks]}
              for heading, picks in (("Most member-like", top), ("Least member-like", bottom))]
    if pixels and all(len(v[1]) == 0 for v in pixels.values()):
        note = "Query images (the attacks' store holds no generated images: gray-box attacks read none)."
    elif pixels:
        note = "Query image, then the images the target generated from its caption."
    else:
        note = ("Query images only: pass the feature store (or write the report with `audit scan --report`, which "
                "generates them again) to show the generated images beside them.")
    return _section(f"Images ({attack})", gallery={"note": note, "groups": groups})


def _card(rid: str, prob: float, verdict: str, pixels, label: int | None, row: Mapping | None,
          images_root) -> dict:
    no_image = "no image"
    if pixels is not None:
        query, gens, stored_caption = pixels
        row = row or {"caption": stored_caption}
        images = [_img(_thumb_png(query), "query", cls="q")] + [_img(_thumb_png(g), "generated") for g in gens]
    else:
        query, no_image = _query_image(row, images_root)
        images = [_img(_thumb_png(query), "query", cls="q")] if query is not None else []
    truth = "" if label is None else f" · truth: {'member' if label == 1 else 'non-member'}"
    right = "" if label is None or verdict not in ("member", "non-member") else (
        "ok" if (label == 1) == (verdict == "member") else "miss")
    caption = str((row or {}).get("caption") or "")
    if len(caption) > MAX_CAPTION_SHOWN:  # a 2,000-character caption would stretch its card down the page
        caption = caption[:MAX_CAPTION_SHOWN].rstrip() + " …"
    return {"id": rid, "probability": f"{prob:.3f}", "verdict": verdict, "mark": right, "truth": truth,
            "caption": caption, "images": images, "no_image": no_image}


# ------------------------------------------------------------------------------------------------ tables and page

def _fmt_metric(m: Any) -> str | dict:
    """A metric cell: a number, or ``{"text", "ci"}`` for a value with its bootstrap interval."""
    if isinstance(m, Mapping):
        ci = m.get("ci95")
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(x is not None for x in ci):
            return {"text": _num(m.get("value")), "ci": [_num(ci[0]), _num(ci[1])]}
        return _num(m.get("value"))
    return _num(m)


def _num(v: Any) -> str:
    f = _finite(v)
    if f is None:
        return "–" if v is None or isinstance(v, (int, float)) else str(v)
    return f"{f:.3f}"


def _finite(v: Any) -> float | None:
    """A finite number, or None (a results file may hold anything in a number's place)."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.number)):
        return None
    f = float(v)
    return f if np.isfinite(f) else None


_TEXT_FIELDS = ("id", "image", "status", "verdict", "attack", "tier", "target", "heads", "caption", "error")


def _clean_row(row: Mapping) -> dict:
    """A results row whose text fields are strings (or None), whatever a hand-made file put there."""
    row = dict(row)
    for k in _TEXT_FIELDS:
        if row.get(k) is not None and not isinstance(row[k], str):
            row[k] = str(row[k])
    return row


def _text_or_none(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else ([] if v is None else [v])


def _mapping(v: Any) -> Mapping:
    return v if isinstance(v, Mapping) else {}


def _row_class(name: Any, evaluation: Mapping) -> str | None:
    return "blind" if name == "blind" else ("default" if name == evaluation.get("default_attack") else None)


_METRICS_NOTE = ("Accuracy at the two-way threshold fitted on the validation split (maximising balanced accuracy); "
                 "brackets: bootstrap 95% intervals. blind sees no generated image: if it separates members from "
                 "non-members, the two sets differ in distribution and the other rows are not evidence of training.")


def _metrics_table(evaluation: Mapping) -> dict:
    attacks = _mapping(evaluation.get("attacks"))
    cols = [("accuracy", "accuracy"), ("auc", "AUC"), ("tpr_at_1pct_fpr", "TPR @ 1% FPR"),
            ("tpr_at_0_1pct_fpr", "TPR @ 0.1% FPR")]
    rows = []
    for name, m in attacks.items():
        m = _mapping(m)
        cells = [str(name), str(m.get("tier") or "–")] + [_fmt_metric(m.get(k)) for k, _ in cols]
        n_test = m.get("n_test", evaluation.get("n_test"))
        rows.append({"cls": _row_class(name, evaluation), "cells": cells + ["–" if n_test is None else str(n_test)]})
    return {"head": ["attack", "tier"] + [c for _, c in cols] + ["n test"], "rows": rows}


def _rule_text(decision: Mapping | None) -> str:
    from ..attacks.decision import rule_text

    try:
        return rule_text(dict(decision) if isinstance(decision, Mapping) else None)
    except (TypeError, ValueError, KeyError):  # a hand-edited results file: say so rather than fail the report
        return "unknown rule"


_VERDICT_COLS = [("decided_fraction", "decided"), ("fpr", "FPR"), ("precision", "precision"), ("tpr", "TPR"),
                 ("miss_rate", "miss rate")]


def _verdicts_section(evaluation: Mapping) -> list[dict]:
    from ..attacks.evaluate import calibration_text

    attacks = {a: m["verdicts"] for a, m in _mapping(evaluation.get("attacks")).items()
               if isinstance(m, Mapping) and isinstance(m.get("verdicts"), Mapping)}
    if not attacks:
        return []
    rows = []
    for name, v in attacks.items():
        c = _mapping(v.get("counts"))
        cells = [str(name)] + [_fmt_metric(v.get(k)) for k, _ in _VERDICT_COLS]
        cells += [f"{c.get('member', 0)} / {c.get('non-member', 0)} / {c.get('inconclusive', 0)}",
                  _num(v.get("member_threshold")), _num(v.get("nonmember_threshold"))]
        rows.append({"cls": _row_class(name, evaluation), "cells": cells})
    first = next(iter(attacks.values()))
    calibration = evaluation.get("calibration")
    fitted_on = (calibration_text(calibration) if isinstance(calibration, Mapping) else
                 f"the validation split ({first.get('n_validation_nonmembers')} non-members, "
                 f"{first.get('n_validation_members')} members)")
    note = (f"Verdicts at {_rule_text(evaluation.get('decision'))}, thresholds fitted on "
            f"{fitted_on} and applied to the test rows. FPR: member verdicts per "
            "test non-member (what the budget bounds); precision: members among member verdicts; TPR: member "
            "verdicts per test member; miss rate: non-member verdicts per test member. – : no threshold (the "
            "budget cannot be resolved with these validation rows) or no verdict to measure.")
    head = (["attack"] + [c for _, c in _VERDICT_COLS]
            + ["member / non-member / inconclusive", "member ≥", "non-member <"])
    return [_section("Verdicts on the test split", table={"head": head, "rows": rows}, notes=[note])]


def _counts_table(rows: list[Mapping]) -> dict:
    status = Counter(str(r.get("status")) for r in rows)
    verdict = Counter(str(r.get("verdict")) for r in rows if r.get("status") == "ok")
    body = [{"cells": ["status", k, str(v)]} for k, v in status.most_common()]
    body += [{"cells": ["verdict", k, str(v)]} for k, v in verdict.most_common()]
    return {"head": ["", "value", "rows"], "rows": body}


def _error_section(bad: list[Mapping]) -> dict:
    title = "Rows that could not be scored"
    if not bad:
        return _section(title, text="Every row was scored.")
    rows = [{"cells": [str(r.get("id") or r.get("image")), str(r.get("status")), str(r.get("error") or "")]}
            for r in bad[:MAX_ERROR_ROWS]]
    more = ([f"… and {len(bad) - MAX_ERROR_ROWS} more (see the JSONL)."] if len(bad) > MAX_ERROR_ROWS else [])
    return _section(title, table={"cls": "errors", "head": ["row", "status", "error"], "rows": rows}, notes=more)


def _evaluate_facts(ev: Mapping) -> dict:
    target = ev.get("target") or None
    if isinstance(target, Mapping):
        target = f"{target.get('name')} (weights {target.get('hash')})"
    return {"target": target,
            "heads": ev.get("heads"), "store": ev.get("store"), "default attack": ev.get("default_attack"),
            "test rows": f"{ev.get('n_test')} ({ev.get('n_test_members')} members, "
                         f"{ev.get('n_test_nonmembers')} non-members)"}


def _first(rows: list[Mapping], key: str) -> Any:
    return next((r[key] for r in rows if r.get(key)), None)


def _counted(items: Iterable[str]) -> list[str]:
    return [f"{w} ({n} rows)" if n > 1 else w for w, n in Counter(items).most_common()]


def _section(title: str, **content) -> dict:
    """One ``<section>`` of the page: any of ``table`` ({head, rows: [{cls, cells}], cls}), ``text``,
    ``images``, ``gallery`` and ``notes``, rendered in that order by the template."""
    return {"title": title, **content}


def _img(png: bytes, alt: str, width: int | None = None, cls: str | None = None) -> dict:
    return {"b64": base64.b64encode(png).decode(), "alt": alt, "width": width, "cls": cls}


def _load_json(evaluation) -> dict:
    if isinstance(evaluation, Mapping):
        return dict(evaluation)

    path = Path(evaluation)
    return read_json(path, missing="evaluation JSON not found", error=InputError)


_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1000px;
color:#222;padding:0 16px}
h1{margin-bottom:4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}h3{margin:14px 0 6px}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:8px 0}dt{color:#666}dd{margin:0}
.meta,.note{color:#777;font-size:13px}table{border-collapse:collapse;font-size:14px}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:left}th{background:#f5f5f5}
tr.blind{color:#777;font-style:italic}tr.default{font-weight:bold}.ci{color:#888;font-size:12px;font-weight:normal}
.warn{background:#fff4e5;border:1px solid #f0b46c;padding:8px 14px;margin:14px 0;border-radius:4px}
.gallery{display:flex;flex-wrap:wrap;gap:10px}.card{margin:0;border:1px solid #ddd;border-radius:4px;padding:6px;
width:calc(50% - 28px);font-size:13px}.imgs{display:flex;gap:4px;flex-wrap:wrap}
.imgs img{width:{T}px;height:{T}px;image-rendering:pixelated;border:1px solid #eee}
.imgs img.q{border:2px solid #333}.cap{color:#555;margin-top:2px;overflow-wrap:anywhere}
.noimg{width:{T}px;height:{T}px;background:#eee;color:#999;display:flex;align-items:center;justify-content:center}
.ok{color:#2a7}.miss{color:#c33}table.errors td{overflow-wrap:anywhere;max-width:600px}
""".replace("{T}", str(THUMB))


@functools.lru_cache(maxsize=1)
def _environment():
    """One Jinja2 environment per process: it caches the compiled template (compiling takes ~0.2 s)."""
    import jinja2

    # The CSS is this module's constant, not data: the one value marked safe.
    return jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                              autoescape=True)


def _write(out_html: str | os.PathLike, title: str, facts: Mapping[str, Any], warnings: list[str],
           sections: list[dict]) -> Path:
    from markupsafe import Markup

    out = Path(out_html)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = _environment().get_template("report.html").render(
        title=title, facts=[(k, str(v)) for k, v in facts.items() if v is not None], warnings=warnings,
        sections=[s for s in sections if s], version=__version__, when=when, css=Markup(_CSS)) + "\n"
    atomic_write_text(out, page)
    log.info("report written to %s (%d KiB)", out, len(page) // 1024)
    return out
