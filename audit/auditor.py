"""Scoring query images in-process: the ``Auditor`` behind ``audit check`` and ``audit scan``.

An ``Auditor`` loads the target, embedder, captioner and heads once, computes each query's features exactly as
``audit features`` does (same n_gen, steps, guidance and seed as the feature store the heads were trained on), and
turns the heads' calibrated probabilities into ``Verdict`` objects.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Container, Iterable, Sequence

import numpy as np

from .errors import InputError, UsageError
from .attacks.inputs import base_attack, tiers_of
from .features.compute import FeaturesConfig, Models, batch_slices, featurize_rows
from .imagefolder import CaptionError, Row, clean_caption, read_caption_file, read_imagefolder
from .tiers import BLACK_BOX, GRAY_BOX, VARIATION, parse_tier, tier_name
from .verdict import VERDICTS, Verdict

log = logging.getLogger(__name__)

CAPTIONER_WARNING = "no caption was given: the captioner wrote it from the image ({caption!r}); a verdict on a " \
                    "caption the training data did not use is weaker evidence"


class Auditor:
    """Loaded models and heads that score images: ``check(image, caption)``, ``score_rows(rows)``, ``scan(dir)``.

    ``heads`` is a heads folder, or None for the heads registered for the target (``audit train --register`` or
    ``audit heads use`` registers them; the bundled toy target ships with its own); ``heads_source`` says which
    heads, and where they came from. ``attack`` picks the attack whose probability decides the verdict (default:
    the heads' default, attack IV when trained). ``decision`` (``budget``, the default, or ``balanced``),
    ``max_fpr`` and ``max_miss`` (default: ``max_fpr``) set the verdict rule (``audit.attacks.decision``): at a
    budget, thresholds are fitted on the heads' validation split (or, for cross-fitted heads, on their out-of-fold
    scores) when the Auditor is made. Feature settings (n_gen, steps, guidance, seed) come from the feature store
    the heads were trained on; pass them only to override (the heads may then not fit).
    ``reference``: the reference model heads trained on a store with ``--reference`` need (the same model: its
    weights hash must match the one recorded in the heads).
    ``tier``: score only the heads' attacks of these tiers (a ``--tier`` value: ``variation``, ``all``, a comma
    list), computing only their features; None, every tier the heads read. Without ``attack``, the heads' default
    decides if it is of those tiers, else their first attack of them.
    """

    def __init__(self, target: str, heads: str | Path | None = None, embedder: str | None = None,
                 captioner: str | None = None, attack: str | None = None, device: str = "cpu",
                 allow_pickle: bool = False, batch_size: int = 8, models: Models | None = None,
                 max_fpr: float = 0.01, decision: str = "budget", max_miss: float | None = None,
                 reference: str | None = None, tier: str | None = None, **overrides):
        from .attacks import resolve_heads
        from .attacks.decision import check_budget
        from .attacks.heads import provenance, provenance_line

        check_budget(max_fpr, max_miss, decision)  # before any model loads
        self.models = models or Models.load(target, embedder, captioner, device, allow_pickle, reference=reference)
        ids = self.models.identities()
        self.heads = resolve_heads(heads, ids["target"])
        self.heads.check_compatible(ids["target"], ids["embedder"], ids["captioner"])
        _check_reference(self.heads, ids.get("reference"))
        self.attacks = tier_attacks(self.heads, tier)
        self.attack = attack or default_attack(self.heads, self.attacks)
        if self.attack not in self.heads.attacks:
            raise UsageError(f"attack {self.attack!r} is not in {self.heads.path}; it has: "
                             f"{', '.join(self.heads.attacks)}")
        if self.attack not in self.attacks:
            raise UsageError(f"attack {self.attack!r} is {self.heads.tier(self.attack)}, not of --tier {tier}; the "
                             f"heads' attacks of that tier: {', '.join(self.attacks)}")
        self.decisions = self.heads.decisions(decision, max_fpr, max_miss)
        self.decision = self.decisions[self.attack]
        trained = ((self.heads.info.get("manifest") or {}).get("feature_store") or {}).get("config") or {}
        settings = {k: trained[k] for k in ("n_gen", "steps", "guidance", "seed", "pixel_size", "caption_tokens",
                                            "graybox_timesteps", "var_strengths", "n_var") if k in trained}
        for key in ("graybox_timesteps", "var_strengths"):
            if key in settings:
                settings[key] = tuple(settings[key])
        # Compute the tiers the scored attacks read, no more: gray-box attacks alone never generate an image.
        tiers = tiers_of(self.attacks) or parse_tier(trained.get("tier", BLACK_BOX))
        settings["tier"] = tier_name(tiers)
        if GRAY_BOX in tiers:
            self.models.denoiser()  # a target without gray-box access fails here, in one line
        if VARIATION in tiers:
            self.models.varier()  # likewise without variation access
        self.graybox_attacks = tuple(dict.fromkeys(
            base_attack(a) for a in self.attacks if self.heads.tier(a) == GRAY_BOX))
        unknown = sorted(set(overrides) - {"n_gen", "steps", "guidance", "seed"})
        if unknown:
            raise TypeError(f"unexpected argument(s) {unknown}")
        for k, v in overrides.items():
            if v is not None:
                if k in settings and settings[k] != v:
                    log.warning("%s=%r differs from the %r the heads were trained with", k, v, settings[k])
                settings[k] = v
        self.config = FeaturesConfig(target=str(target), batch_size=batch_size, missing_caption="captioner",
                                     reference=str(reference or ""), **settings).validate()
        self.target_name = ids["target"]["name"]
        self.heads_path = str(Path(self.heads.path).resolve())
        self.heads_source = provenance(self.heads)
        log.info(provenance_line(self.heads_source))

    def describe(self) -> dict:
        ref = {"reference": self.models.reference.identity()} if self.models.reference is not None else {}
        return {"target": self.models.generator.identity(), **ref, "heads": self.heads_path,
                "heads_source": self.heads_source, "attack": self.attack,
                "tier": self.heads.tier(self.attack), "decision": self.decision.to_dict(),
                "features": self.config.for_store()}

    @property
    def generates(self) -> bool:
        """Whether scoring generates images (the heads read black-box features)."""
        return BLACK_BOX in self.config.tiers

    # ------------------------------------------------------------------------------------------------ scoring

    def score_rows(self, rows: Sequence[Row], images: dict[int, np.ndarray] | None = None) -> list[Verdict]:
        """One Verdict per row, in order; rows that cannot be scored get their status and error, never an exception."""
        if not rows:
            return []
        batch = featurize_rows(rows, self.models, self.config, images, graybox_attacks=self.graybox_attacks)
        ok = [i for i, r in enumerate(rows) if r.ok]
        preds = self.heads.predict({k: v[ok] for k, v in batch.items()}, self.attacks) if ok else {}
        verdicts = []
        pos = {i: j for j, i in enumerate(ok)}
        for i, row in enumerate(rows):
            v = Verdict(image=row.path, id=row.id, target=self.target_name, status=row.status,
                        caption=row.caption, caption_source=row.caption_source, error=row.error,
                        heads=self.heads_path, heads_source=self.heads_source, warnings=list(row.warnings))
            if row.ok:
                j = pos[i]
                for attack, p in preds.items():
                    prob, rule = float(p["probability"][j]), self.decisions[attack]
                    v.scores[attack] = {"score": float(p["score"][j]), "probability": prob,
                                        "threshold": rule.member_threshold,
                                        "nonmember_threshold": rule.nonmember_threshold, "verdict": rule.decide(prob),
                                        "tier": p["tier"]}
                chosen = v.scores[self.attack]
                v.attack, v.probability, v.threshold = self.attack, chosen["probability"], chosen["threshold"]
                v.tier = chosen["tier"]
                v.verdict, v.decision = chosen["verdict"], self.decision.to_dict()
                v.warnings.extend(self.decision.notes)
                if row.caption_source == "captioner":
                    v.warnings.append(CAPTIONER_WARNING.format(caption=row.caption))
                v.warnings.extend(self.heads.warnings)
            verdicts.append(v)
        return verdicts

    def regenerate(self, captions: list[str]) -> np.ndarray:
        """The images this auditor's scoring generated from ``captions`` (same seed and settings), uint8
        [N, n_gen, H, W, 3]: generation is seeded per image, so they are made again exactly."""
        c = self.config
        return np.asarray(self.models.generator.generate(captions, c.n_gen, c.seed, c.steps, c.guidance))

    def check(self, image: str | Path, caption: str | None = None, pixels: np.ndarray | None = None) -> Verdict:
        """Score one image. Without ``caption``: a ``.txt`` file beside the image, else the captioner's caption.
        ``pixels``: the image already decoded (uint8 [H, W, 3])."""
        return self.score_rows([image_row(image, caption)], None if pixels is None else {0: pixels})[0]

    def scan(self, folder: str | Path, out: str | Path, resume: bool = False, quiet: bool = False) -> dict:
        """Score every image of a folder into a JSONL file (one line per row, flushed per row); see ``scan``.

        Rows are scored in the fixed slices of ``batch_slices`` (as ``audit features`` computes them), so a resumed
        scan, or one on a cluster, scores each row in the batch an uninterrupted scan would: a slice that a kill cut
        short is scored again whole and only its missing rows are written."""
        from .progress import progress
        from .report.jsonl import JsonlWriter, read_jsonl

        rows = read_imagefolder(folder)
        out = Path(out)
        if resume:
            check_resumable(out, read_jsonl(out)[0], self.describe())
        started = time.perf_counter()
        counts: Counter = Counter()
        with JsonlWriter(out, resume=resume, key="id") as writer:
            skipped = sum(r.id in writer for r in rows)
            counts["skipped (already in the results)"] = skipped
            with progress(total=len(rows), desc="scan", unit="image", quiet=quiet, initial=skipped) as bar:
                for start, stop in pending_slices(rows, self.config.batch_size, writer):
                    bar.update(write_verdicts(writer, [v.to_dict() for v in self.score_rows(rows[start:stop])],
                                              counts))
        return {"out": str(out), "rows": len(rows), "counts": scan_counts(counts),
                "seconds": round(time.perf_counter() - started, 2), **self.describe()}


def _check_reference(heads, reference: dict | None) -> None:
    """Heads trained with a reference model need that model; a reference the heads were not trained with is
    refused rather than silently computed."""
    from .attacks.inputs import uses_reference

    recorded = ((heads.info.get("manifest") or {}).get("feature_store") or {}).get("reference")
    needs = [a for a in heads.attacks if uses_reference(a)]
    if needs and reference is None:
        raise UsageError(f"{heads.path}: the heads' attacks {', '.join(needs)} compare the target with the reference "
                         f"model {(recorded or {}).get('name')!r}; pass it with --reference")
    if reference is not None and not recorded:
        raise UsageError(f"{heads.path}: these heads were trained without a reference model; leave --reference out")
    if reference is not None and recorded.get("hash") != reference.get("hash"):
        raise UsageError(f"{heads.path}: trained with reference {recorded.get('name')!r} (weights "
                         f"{recorded.get('hash')}), this run's reference is {reference.get('name')!r} (weights "
                         f"{reference.get('hash')})")


def tier_attacks(heads, tier: str | None) -> list[str]:
    """The heads' attacks of the tiers ``tier`` selects (a ``--tier`` value; None: all of them), in the heads'
    order, with the blind baseline at every tier (it reads only the query image and caption, which every tier
    has). A usage error naming the tiers the heads have when no attack is of those tiers."""
    if tier is None:
        return list(heads.attacks)
    wanted = parse_tier(tier)
    chosen = [a for a in heads.attacks if a == "blind" or heads.tier(a) in wanted]
    if not [a for a in chosen if a != "blind"]:
        have = tiers_of(heads.attacks) or (BLACK_BOX,)
        raise UsageError(f"tier {tier!r}: the heads in {heads.path} have no attack of that tier; their tiers: "
                         f"{', '.join(have)}")
    return chosen


def default_attack(heads, attacks: Sequence[str]) -> str:
    """The attack that decides when none is named: the heads' default if it is among ``attacks``, else the
    first of ``attacks`` that is not the blind baseline."""
    if heads.default_attack in attacks:
        return heads.default_attack
    return next((a for a in attacks if a != "blind"), attacks[0])


def pending_slices(rows: Sequence[Row], batch_size: int, done: Container[str]) -> list[tuple[int, int]]:
    """The fixed batches (``batch_slices``) of ``rows`` that hold a row whose id is not in ``done``."""
    return [(a, b) for a, b in batch_slices(len(rows), batch_size) if any(r.id not in done for r in rows[a:b])]


def write_verdicts(writer, verdicts: Iterable[dict], counts: Counter) -> int:
    """Append a scored batch's verdicts (as dicts) to the results, skipping rows already there; counts verdicts
    (or statuses) and returns how many rows were written."""
    written = 0
    for v in verdicts:
        if v["id"] in writer:
            continue
        writer.write(v)
        counts[v["verdict"] or v["status"]] += 1
        written += 1
    return written


def scan_counts(counts: Counter) -> dict:
    """A scan summary's counts: the three verdicts always (0 included: "no member" is part of the answer),
    statuses when they occur."""
    return {k: counts[k] for k in VERDICTS} | {k: v for k, v in counts.items() if v and k not in VERDICTS}


def check_resumable(out: Path, records: Iterable[dict], described: dict) -> None:
    """Refuse to extend a results file written with another target, heads, attack or verdict rule (naming the
    difference): one file holds verdicts of one rule. ``described`` is ``Auditor.describe()`` of the run asking
    to extend it."""
    first = next((r for r in records if r.get("status") == "ok"), None)
    if first is None:
        return
    mine_rule = described["decision"]
    theirs_rule = first.get("decision") or {}
    for key, mine, theirs in (
            ("target", described["target"]["name"], first.get("target")),
            ("heads", described["heads"], first.get("heads")), ("attack", described["attack"], first.get("attack")),
            ("decision rule", mine_rule["rule"], theirs_rule.get("rule", "balanced")),
            ("max-fpr", mine_rule["max_fpr"], theirs_rule.get("max_fpr")),
            ("max-miss", mine_rule["max_miss"], theirs_rule.get("max_miss"))):
        if theirs is not None and theirs != mine:
            raise UsageError(f"{out}: cannot resume, its rows were scored with {key} {theirs!r}, this run uses "
                             f"{mine!r}; pass the same options, or write to a new file")


def image_row(image: str | Path, caption: str | None = None) -> Row:
    """A Row for a single image: the caption argument, else ``IMAGE.txt``, else none (the captioner writes one)."""
    path = Path(image)
    row = Row(id=path.name, path=str(path))
    if caption is not None:
        row.caption, row.warnings = clean_caption(caption, "--caption")
        if row.caption is None:
            raise UsageError("--caption is empty; give a caption, or leave it out to have the captioner write one")
        row.caption_source = "argument"
        return row
    txt = path.with_suffix(".txt")
    if os.path.lexists(txt):
        try:
            # The caption beside a named image must stay in the image's folder (a link to another user's file or
            # to /proc/self/environ would put its content in the results).
            row.caption, row.warnings = clean_caption(read_caption_file(txt, path.parent), str(txt))
        except CaptionError as exc:
            raise InputError(str(exc)) from None
        row.caption_source = "txt" if row.caption else None
    return row


def write_scan_html(results: str | Path, out_html: str | Path, generate=None, images_root=None) -> str | None:
    """The HTML report of a scan's results, when this installation has the report module; else None (logged).
    ``generate`` (``Auditor.regenerate``) puts the generated images beside the gallery's queries;
    ``images_root``: the scanned folder, the only place its query images are read from."""
    try:
        from .report.html import write_scan_report
    except ImportError:
        log.warning("HTML reports are not available in this installation; %s was not written", out_html)
        return None
    write_scan_report(results, out_html, generate=generate, images_root=images_root)
    return str(out_html)
