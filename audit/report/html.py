"""Self-contained HTML reports for ``audit scan`` and ``audit evaluate``.

One file, no network: charts and thumbnails are inline base64 PNGs, styles are inline, there is no script. Every
string from the data (file names, captions, error messages) is HTML-escaped, since it comes from people we do not
know.

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
import html
import io
import logging
import os
from collections import Counter
from pathlib import Path
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
    store = store if store is not None else evaluation.get("store")
    heads = heads if heads is not None else evaluation.get("heads")
    notes: list[str] = []
    if predictions is None and store and heads:
        try:
            predictions = evaluation_predictions(store, heads, evaluation.get("decision"))
        except (ArtifactError, InputError, OSError) as exc:
            notes.append(f"ROC curves and images left out: {exc}")
    elif predictions is None:
        notes.append("ROC curves and images left out: no feature store and heads to recompute the test predictions")
    default = evaluation.get("default_attack") or (next(iter(predictions.probability)) if predictions else None)
    parts = [_header(title or "audit evaluate", _evaluate_facts(evaluation))]
    parts.append(_warnings(list(evaluation.get("warnings") or []) + notes))
    parts.append(_section("Metrics on the test split", _metrics_table(evaluation)))
    parts.append(_verdicts_section(evaluation))
    if predictions is not None:
        parts.append(_section("ROC curves", _img(_roc_png(predictions), "ROC curves", width=960)
                              + "<p class=note>Step curves on the test split; the dashed grey line is the blind "
                                "baseline (no generated image). Right: log scale, where low-FPR behaviour shows."
                                "</p>"))
        parts.append(_section("Score histograms", _img(_hist_png(predictions.probability, predictions.member,
                                                                 predictions.lines()), "histograms", width=960)))
        if default in predictions.probability:
            parts.append(_gallery_section(predictions.ids, predictions.probability[default],
                                          predictions.verdicts(default), default, store, top_k,
                                          labels=dict(zip(predictions.ids, predictions.member.tolist()))))
    return _write(out_html, parts)


def write_scan_report(results: Iterable[Mapping] | str | os.PathLike, out_html: str | os.PathLike,
                      store: str | os.PathLike | None = None, title: str | None = None, top_k: int = 6,
                      images_root: str | os.PathLike | None = None,
                      generate: Callable[[list[str]], np.ndarray] | None = None) -> Path:
    """Write the scan report from the scan's result rows (a list of dicts, or the JSONL file).

    ``store``: a feature store holding the scanned rows (by id), for the generated images beside each query.
    ``generate``: captions -> uint8 [N, n_gen, H, W, 3] with the scan's seed and settings (``Auditor.regenerate``):
    without a store, the gallery's rows are generated again, which gives the very images they were scored on.
    ``images_root``: where relative ``image`` paths in the rows live (default: as written, then beside the JSONL).
    """
    if isinstance(results, (str, os.PathLike)):
        images_root = images_root if images_root is not None else Path(results).parent
        rows, _ = read_jsonl(results)
    else:
        rows = [dict(r) for r in results]
    scored = [r for r in rows if r.get("status") == "ok" and r.get("probability") is not None]
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
    parts = [_header(title or "audit scan", facts)]
    parts.append(_warnings(_counted(w for r in scored for w in r.get("warnings") or [])))
    parts.append(_section("Rows", _counts_table(rows)))
    if scored:
        by_attack: dict[str, list[float]] = {}
        lines: dict[str, dict[str, float | None]] = {}
        for r in scored:
            for a, s in (r.get("scores") or {}).items():
                if isinstance(s, Mapping) and s.get("probability") is not None:
                    by_attack.setdefault(a, []).append(float(s["probability"]))
                    lines[a] = {"member": s.get("threshold"), "non-member": s.get("nonmember_threshold")}
        if not by_attack:
            by_attack = {attack: [float(r["probability"]) for r in scored]}
            lines = {attack: {"member": scored[0].get("threshold"),
                              "non-member": (rule or {}).get("nonmember_threshold")}}
        probs = {a: np.asarray(v) for a, v in by_attack.items()}
        parts.append(_section("P(member) histograms", _img(_hist_png(probs, None, lines), "histograms",
                                                           width=960)))
        ids = [str(r.get("id") or r.get("image")) for r in scored]
        rows_by_id = {i: r for i, r in zip(ids, scored)}
        parts.append(_gallery_section(ids, np.array([float(r["probability"]) for r in scored]),
                                      [str(r.get("verdict")) for r in scored], attack, store, top_k,
                                      rows_by_id=rows_by_id, images_root=images_root, generate=generate))
    parts.append(_section("Rows that could not be scored", _error_table([r for r in rows if r.get("status") != "ok"])))
    return _write(out_html, parts)


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


def _query_image(row: Mapping | None, images_root) -> np.ndarray | None:
    from ..imagefolder import ImageError, load_image

    if not row or not row.get("image"):
        return None
    path = Path(str(row["image"]))
    candidates = [path] if path.is_absolute() or images_root is None else [path, Path(images_root) / path]
    for p in candidates:
        if p.is_file():
            try:
                return load_image(p)
            except ImageError as exc:
                log.warning("report: %s", exc)
                return None
    return None


def _regenerated_images(chosen: Sequence[str], rows_by_id: Mapping | None, images_root, generate
                        ) -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """(query pixels, generated pixels, caption) of the chosen rows, generating their images again."""
    picked = []
    for rid in dict.fromkeys(chosen):
        row = (rows_by_id or {}).get(rid)
        query = _query_image(row, images_root)
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
                     images_root=None, generate=None) -> str:
    order = np.argsort(-np.asarray(probs), kind="stable")
    k = min(top_k, len(order) // 2 if len(order) > 1 else len(order))
    top, bottom = list(order[:k]), list(order[::-1][:k])
    chosen = [ids[i] for i in top + bottom]
    pixels = _store_images(store, chosen)
    if not pixels and generate is not None:
        pixels = _regenerated_images(chosen, rows_by_id, images_root, generate)
    body = ""
    for heading, picks in (("Most member-like", top), ("Least member-like", bottom)):
        cards = "".join(_card(ids[i], float(probs[i]), verdicts[i], pixels.get(ids[i]),
                              labels.get(ids[i]) if labels else None,
                              rows_by_id.get(ids[i]) if rows_by_id else None, images_root) for i in picks)
        body += f"<h3>{heading}</h3><div class=gallery>{cards}</div>"
    if pixels and all(len(v[1]) == 0 for v in pixels.values()):
        note = "Query images (the attacks' store holds no generated images: gray-box attacks read none)."
    elif pixels:
        note = "Query image, then the images the target generated from its caption."
    else:
        note = ("Query images only: pass the feature store (or write the report with `audit scan --report`, which "
                "generates them again) to show the generated images beside them.")
    return _section(f"Images ({html.escape(str(attack))})", f"<p class=note>{note}</p>{body}")


def _card(rid: str, prob: float, verdict: str, pixels, label: int | None, row: Mapping | None,
          images_root) -> str:
    imgs = ""
    if pixels is not None:
        query, gens, stored_caption = pixels
        row = row or {"caption": stored_caption}
        imgs = _img(_thumb_png(query), "query", cls="q") + "".join(_img(_thumb_png(g), "generated") for g in gens)
    else:
        query = _query_image(row, images_root)
        imgs = _img(_thumb_png(query), "query", cls="q") if query is not None else "<div class=noimg>no image</div>"
    truth = "" if label is None else f" · truth: {'member' if label == 1 else 'non-member'}"
    right = "" if label is None or verdict not in ("member", "non-member") else (
        " ok" if (label == 1) == (verdict == "member") else " miss")
    caption = str((row or {}).get("caption") or "")
    if len(caption) > MAX_CAPTION_SHOWN:  # a 2,000-character caption would stretch its card down the page
        caption = caption[:MAX_CAPTION_SHOWN].rstrip() + " …"
    cap = f"<div class=cap>{html.escape(caption)}</div>" if caption else ""
    return (f"<figure class=card><div class=imgs>{imgs}</div><figcaption><b>{html.escape(rid)}</b><br>"
            f"P(member) {prob:.3f} · {html.escape(verdict)}<span class='{right.strip()}'>{html.escape(truth)}</span>{cap}"
            "</figcaption></figure>")


# ------------------------------------------------------------------------------------------------ tables and page

def _fmt_metric(m: Any) -> str:
    if isinstance(m, Mapping):
        v, ci = m.get("value"), m.get("ci95")
        text = _num(v)
        if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(x is not None for x in ci):
            text += f" <span class=ci>[{_num(ci[0])}, {_num(ci[1])}]</span>"
        return text
    return _num(m)


def _num(v: Any) -> str:
    if v is None:
        return "–"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return html.escape(str(v))
    return "–" if not np.isfinite(f) else f"{f:.3f}"


def _metrics_table(evaluation: Mapping) -> str:
    attacks = evaluation.get("attacks") or {}
    cols = [("accuracy", "accuracy"), ("auc", "AUC"), ("tpr_at_1pct_fpr", "TPR @ 1% FPR"),
            ("tpr_at_0_1pct_fpr", "TPR @ 0.1% FPR")]
    head = "<tr><th>attack</th><th>tier</th>" + "".join(f"<th>{c}</th>" for _, c in cols) + "<th>n test</th></tr>"
    body = ""
    for name, m in attacks.items():
        cls = " class=blind" if name == "blind" else (" class=default" if name == evaluation.get("default_attack")
                                                      else "")
        cells = "".join(f"<td>{_fmt_metric(m.get(k))}</td>" for k, _ in cols)
        body += (f"<tr{cls}><td>{html.escape(name)}</td><td>{html.escape(str(m.get('tier') or '–'))}</td>{cells}"
                 f"<td>{_num_int(m.get('n_test', evaluation.get('n_test')))}</td></tr>")
    note = ("<p class=note>Accuracy at the two-way threshold fitted on the validation split (maximising "
            "balanced accuracy); brackets: bootstrap 95% "
            "intervals. <i>blind</i> sees no generated image: if it separates members from non-members, the two "
            "sets differ in distribution and the other rows are not evidence of training.</p>")
    return f"<table>{head}{body}</table>{note}"


def _rule_text(decision: Mapping | None) -> str:
    from ..attacks.decision import rule_text

    return rule_text(dict(decision) if decision else None)


_VERDICT_COLS = [("decided_fraction", "decided"), ("fpr", "FPR"), ("precision", "precision"), ("tpr", "TPR"),
                 ("miss_rate", "miss rate")]


def _verdicts_section(evaluation: Mapping) -> str:
    from ..attacks.evaluate import calibration_text

    attacks = {a: m["verdicts"] for a, m in (evaluation.get("attacks") or {}).items()
               if isinstance(m, Mapping) and isinstance(m.get("verdicts"), Mapping)}
    if not attacks:
        return ""
    head = ("<tr><th>attack</th>" + "".join(f"<th>{c}</th>" for _, c in _VERDICT_COLS)
            + "<th>member / non-member / inconclusive</th><th>member ≥</th><th>non-member &lt;</th></tr>")
    body = ""
    for name, v in attacks.items():
        cls = " class=blind" if name == "blind" else (" class=default" if name == evaluation.get("default_attack")
                                                      else "")
        c = v.get("counts") or {}
        cells = "".join(f"<td>{_fmt_metric(v.get(k))}</td>" for k, _ in _VERDICT_COLS)
        body += (f"<tr{cls}><td>{html.escape(name)}</td>{cells}<td>{c.get('member', 0)} / {c.get('non-member', 0)}"
                 f" / {c.get('inconclusive', 0)}</td><td>{_num(v.get('member_threshold'))}</td>"
                 f"<td>{_num(v.get('nonmember_threshold'))}</td></tr>")
    first = next(iter(attacks.values()))
    fitted_on = (calibration_text(evaluation["calibration"]) if evaluation.get("calibration") else
                 f"the validation split ({first.get('n_validation_nonmembers')} non-members, "
                 f"{first.get('n_validation_members')} members)")
    note = (f"<p class=note>Verdicts at {html.escape(_rule_text(evaluation.get('decision')))}, thresholds fitted on "
            f"{html.escape(fitted_on)} and applied to the test rows. FPR: member verdicts per "
            "test non-member (what the budget bounds); precision: members among member verdicts; TPR: member "
            "verdicts per test member; miss rate: non-member verdicts per test member. – : no threshold (the "
            "budget cannot be resolved with these validation rows) or no verdict to measure.</p>")
    return _section("Verdicts on the test split", f"<table>{head}{body}</table>{note}")


def _num_int(v: Any) -> str:
    return "–" if v is None else html.escape(str(v))


def _counts_table(rows: list[Mapping]) -> str:
    status = Counter(str(r.get("status")) for r in rows)
    verdict = Counter(str(r.get("verdict")) for r in rows if r.get("status") == "ok")
    cells = "".join(f"<tr><td>status</td><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in status.most_common())
    cells += "".join(f"<tr><td>verdict</td><td>{html.escape(k)}</td><td>{v}</td></tr>"
                     for k, v in verdict.most_common())
    return f"<table><tr><th></th><th>value</th><th>rows</th></tr>{cells}</table>"


def _error_table(bad: list[Mapping]) -> str:
    if not bad:
        return "<p>Every row was scored.</p>"
    body = "".join(f"<tr><td>{html.escape(str(r.get('id') or r.get('image')))}</td>"
                   f"<td>{html.escape(str(r.get('status')))}</td><td>{html.escape(str(r.get('error') or ''))}</td></tr>"
                   for r in bad[:MAX_ERROR_ROWS])
    more = (f"<p class=note>… and {len(bad) - MAX_ERROR_ROWS} more (see the JSONL).</p>"
            if len(bad) > MAX_ERROR_ROWS else "")
    return f"<table class=errors><tr><th>row</th><th>status</th><th>error</th></tr>{body}</table>{more}"


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


def _header(title: str, facts: Mapping[str, Any]) -> str:
    items = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts.items()
                    if v is not None)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"<h1>{html.escape(title)}</h1><dl class=facts>{items}</dl><p class=meta>audit {__version__} · {when}</p>"


def _warnings(warnings: list[str]) -> str:
    if not warnings:
        return ""
    items = "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
    return f"<div class=warn><b>Warnings</b><ul>{items}</ul></div>"


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _img(png: bytes, alt: str, width: int | None = None, cls: str | None = None) -> str:
    w = f" style='width:{width}px;max-width:100%'" if width else ""
    c = f" class={cls}" if cls else ""
    return f"<img{c}{w} alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


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


def _write(out_html: str | os.PathLike, parts: list[str]) -> Path:
    out = Path(out_html)
    page = ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            "<meta name=viewport content='width=device-width,initial-scale=1'>"
            f"<title>audit report</title><style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    atomic_write_text(out, page)
    log.info("report written to %s (%d KiB)", out, len(page) // 1024)
    return out
