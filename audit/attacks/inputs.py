"""What each attack sees: one function per attack, from a feature-store batch to the head's input array.

Training, evaluation, ``check`` and ``scan`` all build inputs here, so a head never sees features built another way.
Every input is invariant to the order of the ``n_gen`` generated images (means, and sorted cosines), and nothing
here looks at labels or at other rows: a single query is featurised exactly as it would be in a batch.

A batch is the dict ``FeatureStore.read()`` returns: ``query_pixels`` uint8 [N,P,P,3], ``gen_pixels`` uint8
[N,G,P,P,3], ``query_img_emb`` [N,D], ``gen_img_emb`` [N,G,D], ``caption_emb`` [N,D], ``gen_caption_emb`` [N,G,D]
(black-box tier), and ``graybox_loss``, ``graybox_pia``, ``graybox_secmi`` float32 [N,K], each attack's error at
the K gray-box timesteps, ``graybox_clid`` [N,K',3] (gray-box tier; see ``features.graybox``), and
``var_pixel_dist``, ``var_clip_dist`` [N,S,V], ``var_mean_pixel_dist`` [N,S], ``var_pixel_pair``, ``var_clip_pair``
[N,S,P]: the distances of the target's V variations of the query at S strengths to it and to each other (variation
tier; ``features.variation``); with a reference model, ``ref_`` + each black-box and gray-box key: the same
features computed on the reference (``features.reference``).

Every attack names its access tier (``audit.tiers``). Each gray-box attack comes twice: ``PIA`` is a head (MLP) over
the log of its per-timestep error vector; ``PIA-score`` is the paper's untrained single score, minus the log of the
mean error over the timesteps (lower error = more member-like), which the same machinery standardises, calibrates
and thresholds on validation data like any head. The variation attacks likewise: ``var-pixel`` (pixel distances),
``var-clip`` (embedding distances), ``var-all`` (both) are MLPs over per-strength summaries, ``var-*-score`` their
untrained scores (minus the log distance, averaged over the strengths).

With a reference model in the store, every attack ``X`` but the blind baseline also comes as ``X-ref``: the same
head over the target's input, the reference's and their difference (target minus reference); and every attack with
a single membership score as ``X-ref-score``: target's score minus reference's, untrained, standardised on the
training split's non-members only (kind ``calibrated``: a z-score against non-members, never pooled over labels).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from ..errors import InputError, UnknownNameError
from ..tiers import BLACK_BOX, GRAY_BOX, TIERS, VARIATION


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    name: str
    # "pixel" (CNN over [N, G, C, P, P]), "semantic" (MLP over [N, F]) or "score" (no trainable weights: the
    # single column of [N, 1] is the score, standardised and calibrated like a head's); "calibrated": a score
    # standardised on the non-members only
    kind: str
    build: Callable[[Mapping[str, np.ndarray]], np.ndarray]
    needs: tuple[str, ...]  # batch keys it reads
    description: str
    tier: str = BLACK_BOX


def _unit(x: np.ndarray) -> np.ndarray:
    # Store embeddings are L2-normalised already; renormalising keeps cosines exact if a backend drifts.
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def _cos_to_each(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of a [N, D] to each b[:, j] of [N, G, D] -> [N, G]."""
    return np.einsum("nd,ngd->ng", _unit(a), _unit(b))


def _order_free(cos: np.ndarray) -> np.ndarray:
    """[N, K] similarities -> sorted (descending) values and their mean: the same whatever the image order."""
    return np.concatenate([-np.sort(-cos, axis=1), cos.mean(axis=1, keepdims=True)], axis=1)


def _pairwise_gen(g: np.ndarray) -> np.ndarray:
    """Cosines between the generated images of one query, order-free; [1.0] when there is only one."""
    n, k, _ = g.shape
    if k < 2:
        return np.ones((n, 1), np.float32)
    u = _unit(g)
    sims = np.einsum("ngd,nhd->ngh", u, u)
    iu = np.triu_indices(k, 1)
    return _order_free(sims[:, iu[0], iu[1]])


def _pixels(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32) / 255.0


def attack_i_p(b: Mapping[str, np.ndarray]) -> np.ndarray:
    g = _pixels(b["gen_pixels"])  # [N, G, P, P, 3]
    return np.ascontiguousarray(g.transpose(0, 1, 4, 2, 3))  # [N, G, 3, P, P]


def attack_ii_p(b: Mapping[str, np.ndarray]) -> np.ndarray:
    g = _pixels(b["gen_pixels"])
    q = np.broadcast_to(_pixels(b["query_pixels"])[:, None], g.shape)
    x = np.concatenate([q, g, q - g], axis=-1)  # [N, G, P, P, 9]
    return np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3))


def attack_i_s(b: Mapping[str, np.ndarray]) -> np.ndarray:
    g = _unit(b["gen_img_emb"])
    return np.concatenate([g.mean(1), g.std(1), _pairwise_gen(g)], axis=1)


def attack_ii_s(b: Mapping[str, np.ndarray]) -> np.ndarray:
    q, g = _unit(b["query_img_emb"]), _unit(b["gen_img_emb"])
    gm = g.mean(1)
    dist = np.abs(q[:, None] - g).mean(1)
    return np.concatenate([q, gm, q - gm, dist, _order_free(_cos_to_each(q, g))], axis=1)


def attack_iii_x(b: Mapping[str, np.ndarray]) -> np.ndarray:
    c, g = _unit(b["caption_emb"]), _unit(b["gen_img_emb"])
    gm = g.mean(1)
    return np.concatenate([c, gm, c * gm, _order_free(_cos_to_each(c, g))], axis=1)


def attack_iii_t(b: Mapping[str, np.ndarray]) -> np.ndarray:
    c, t = _unit(b["caption_emb"]), _unit(b["gen_caption_emb"])
    tm = t.mean(1)
    return np.concatenate([c, tm, c - tm, _order_free(_cos_to_each(c, t))], axis=1)


def attack_iv(b: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([attack_i_s(b), attack_ii_s(b), attack_iii_x(b), attack_iii_t(b)], axis=1)


def attack_blind(b: Mapping[str, np.ndarray]) -> np.ndarray:
    q, c = _unit(b["query_img_emb"]), _unit(b["caption_emb"])
    return np.concatenate([q, c, np.sum(q * c, axis=1, keepdims=True)], axis=1)


# Error vectors are positive with a long tail: their logs are closer to Gaussian for the head's standardisation.
_LOG_FLOOR = 1e-12


def _log_errors(b: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    return np.log(np.maximum(np.asarray(b[key], dtype=np.float64), _LOG_FLOOR)).astype(np.float32)


def _graybox_head(key: str) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    return lambda b: _log_errors(b, key)


def _graybox_score(key: str) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    def build(b: Mapping[str, np.ndarray]) -> np.ndarray:
        mean = np.asarray(b[key], dtype=np.float64).mean(axis=1, keepdims=True)
        return (-np.log(np.maximum(mean, _LOG_FLOOR))).astype(np.float32)

    return build


def attack_clid(b: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per CLiD timestep: log conditional loss and the log-ratios unconditional/conditional, masked/conditional."""
    logs = np.log(np.maximum(np.asarray(b["graybox_clid"], np.float64), _LOG_FLOOR))  # [N, K', 3]
    out = np.concatenate([logs[..., :1], logs[..., 1:] - logs[..., :1]], axis=2)
    return out.reshape(len(out), -1).astype(np.float32)


def clid_score(b: Mapping[str, np.ndarray]) -> np.ndarray:
    """The paper's discrepancy: unconditional and masked-caption losses minus the conditional one, averaged over the
    two and the timesteps (higher: the caption helps more, member-like)."""
    x = np.asarray(b["graybox_clid"], np.float64)
    return (x[..., 1:] - x[..., :1]).mean(axis=(1, 2))[:, None].astype(np.float32)


def _graybox_specs() -> tuple[AttackSpec, ...]:
    what = {
        "loss": ("graybox_loss", "denoising loss ||eps_theta(x_t, t) - eps||^2 at fresh seeded noise eps"),
        "PIA": ("graybox_pia", "PIA (Kong et al. 2023): ||eps_theta(x_t, t) - eps_theta(x_0, 0)||_4^4 with "
                               "x_t built from eps_theta(x_0, 0)"),
        "SecMI": ("graybox_secmi", "SecMI (Duan et al. 2023): ||x_s - denoise(invert(x_s))||^2 along a DDIM "
                                   "inversion of x_0"),
    }
    out = []
    for name, (key, desc) in what.items():
        out.append(AttackSpec(name, "semantic", _graybox_head(key), (key,),
                              f"{desc}: log error at each timestep -> MLP", GRAY_BOX))
        out.append(AttackSpec(f"{name}-score", "score", _graybox_score(key), (key,),
                              f"{desc}: minus the log of its mean over the timesteps, untrained", GRAY_BOX))
    clid = "CLiD (Zhai et al. 2024): conditional vs unconditional and masked-caption denoising losses"
    out.append(AttackSpec("CLiD", "semantic", attack_clid, ("graybox_clid",),
                          f"{clid}: log loss and log-ratios at each timestep -> MLP", GRAY_BOX))
    out.append(AttackSpec("CLiD-score", "score", clid_score, ("graybox_clid",),
                          f"{clid}: their mean discrepancy, untrained", GRAY_BOX))
    return tuple(out)


# Black-box attacks' single scores (higher: member-like), for the reference-calibrated scores: the mean cosine of
# what each attack compares. I-P and IV have no single score.
def _mean_cos_query_gen(b):
    return _cos_to_each(b["query_img_emb"], b["gen_img_emb"]).mean(1, keepdims=True)


def _neg_pixel_mse(b):
    g, q = _pixels(b["gen_pixels"]), _pixels(b["query_pixels"])[:, None]
    return -((g - q) ** 2).mean(axis=(1, 2, 3, 4))[:, None]


def _mean_pairwise_gen(b):
    return _pairwise_gen(b["gen_img_emb"])[:, -1:]


_BLACK_BOX_SCORES = {
    "I-S": _mean_pairwise_gen,
    "II-P": _neg_pixel_mse,
    "II-S": _mean_cos_query_gen,
    "III-X": lambda b: _cos_to_each(b["caption_emb"], b["gen_img_emb"]).mean(1, keepdims=True),
    "III-T": lambda b: _cos_to_each(b["caption_emb"], b["gen_caption_emb"]).mean(1, keepdims=True),
}
REF_PREFIX = "ref_"
# Features the reference computes too (the query side is shared).
_MODEL_KEYS = ("gen_captions", "gen_pixels", "gen_img_emb", "gen_caption_emb", "graybox_loss", "graybox_pia",
               "graybox_secmi", "graybox_clid")


class _ReferenceView(Mapping):
    """A feature batch as the reference model saw it: each model key replaced by its ``ref_`` copy."""

    def __init__(self, batch: Mapping[str, np.ndarray]):
        self.batch = batch

    def __getitem__(self, key):
        return self.batch[REF_PREFIX + key] if key in _MODEL_KEYS else self.batch[key]

    def __iter__(self):
        return (k for k in self.batch if not k.startswith(REF_PREFIX))

    def __len__(self):
        return sum(1 for _ in self)


def _ref_head(spec: AttackSpec) -> AttackSpec:
    axis = 2 if spec.kind == "pixel" else 1  # pixel inputs [N, G, C, P, P] stack on channels

    def build(b):
        t, r = spec.build(b), spec.build(_ReferenceView(b))
        return np.concatenate([t, r, t - r], axis=axis)

    needs = spec.needs + tuple(REF_PREFIX + k for k in spec.needs if k in _MODEL_KEYS)
    return AttackSpec(f"{spec.name}-ref", spec.kind, build, needs,
                      f"{spec.name} on the target and on the reference model, and their difference", spec.tier)


def _ref_score(name: str, score: Callable, needs: tuple[str, ...], tier: str) -> AttackSpec:
    def build(b):
        return (np.asarray(score(b), np.float64) - np.asarray(score(_ReferenceView(b)), np.float64)).astype(np.float32)

    needs = needs + tuple(REF_PREFIX + k for k in needs if k in _MODEL_KEYS)
    return AttackSpec(f"{name}-ref-score", "calibrated", build, needs,
                      f"{name}'s score on the target minus on the reference model, untrained, standardised on "
                      "non-members", tier)


def _reference_specs(specs: tuple[AttackSpec, ...]) -> tuple[AttackSpec, ...]:
    out = []
    for spec in specs:
        if spec.name == "blind" or spec.tier == VARIATION:  # the variation tier has no reference features yet
            continue
        if spec.kind == "score":
            out.append(_ref_score(spec.name.removesuffix("-score"), spec.build, spec.needs, spec.tier))
        else:
            out.append(_ref_head(spec))
            if spec.name in _BLACK_BOX_SCORES:
                out.append(_ref_score(spec.name, _BLACK_BOX_SCORES[spec.name], spec.needs, spec.tier))
    return tuple(out)


def _log(x) -> np.ndarray:
    return np.log(np.maximum(np.asarray(x, dtype=np.float64), _LOG_FLOOR))


def _summary(dist, pair) -> np.ndarray:
    """[N, S, V] distances to the query and [N, S, P] between variations -> [N, S * 6]: per strength the mean,
    spread, least and largest log distance to the query (order-free over the seeds), and the mean and spread of
    the log distances between the variations (zeros with one variation)."""
    d, p = _log(dist), _log(pair)
    parts = [d.mean(2), d.std(2), d.min(2), d.max(2)]
    if p.shape[2]:
        parts += [p.mean(2), p.std(2)]
    else:
        parts += [np.zeros(d.shape[:2]), np.zeros(d.shape[:2])]
    return np.stack(parts, axis=2).reshape(len(d), -1)


def attack_var_pixel(b: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([_summary(b["var_pixel_dist"], b["var_pixel_pair"]),
                           _log(b["var_mean_pixel_dist"])], axis=1).astype(np.float32)


def attack_var_clip(b: Mapping[str, np.ndarray]) -> np.ndarray:
    return _summary(b["var_clip_dist"], b["var_clip_pair"]).astype(np.float32)


def attack_var_all(b: Mapping[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([attack_var_pixel(b), attack_var_clip(b)], axis=1)


def score_var_pixel(b: Mapping[str, np.ndarray]) -> np.ndarray:
    """ReDiffuse's statistic: minus the log pixel distance of the variations' average to the query, averaged over
    the strengths."""
    return (-_log(b["var_mean_pixel_dist"]).mean(axis=1, keepdims=True)).astype(np.float32)


def score_var_clip(b: Mapping[str, np.ndarray]) -> np.ndarray:
    """Minus the log of the mean embedding distance of the variations to the query, averaged over the strengths."""
    mean = np.asarray(b["var_clip_dist"], np.float64).mean(axis=2)
    return (-_log(mean).mean(axis=1, keepdims=True)).astype(np.float32)


def score_var_all(b: Mapping[str, np.ndarray]) -> np.ndarray:
    return ((score_var_pixel(b) + score_var_clip(b)) / 2).astype(np.float32)


_VAR_PIXEL = ("var_pixel_dist", "var_pixel_pair", "var_mean_pixel_dist")
_VAR_CLIP = ("var_clip_dist", "var_clip_pair")


def _variation_specs() -> tuple[AttackSpec, ...]:
    return (
        AttackSpec("var-pixel", "semantic", attack_var_pixel, _VAR_PIXEL,
                   "variations' pixel distances to the query (per strength: mean, spread, extremes; their average's "
                   "distance; distances between them) -> MLP", VARIATION),
        AttackSpec("var-pixel-score", "score", score_var_pixel, ("var_mean_pixel_dist",),
                   "ReDiffuse: minus the log pixel distance of the variations' average to the query, untrained",
                   VARIATION),
        AttackSpec("var-clip", "semantic", attack_var_clip, _VAR_CLIP,
                   "variations' image-embedding distances to the query and to each other, per strength -> MLP",
                   VARIATION),
        AttackSpec("var-clip-score", "score", score_var_clip, ("var_clip_dist",),
                   "minus the log mean image-embedding distance of the variations to the query, untrained",
                   VARIATION),
        AttackSpec("var-all", "semantic", attack_var_all, _VAR_PIXEL + _VAR_CLIP,
                   "var-pixel and var-clip inputs together -> MLP", VARIATION),
        AttackSpec("var-all-score", "score", score_var_all, ("var_mean_pixel_dist", "var_clip_dist"),
                   "the mean of var-pixel-score and var-clip-score, untrained", VARIATION),
    )


_SEMANTIC_ALL = ("query_img_emb", "gen_img_emb", "caption_emb", "gen_caption_emb")

_BASE_SPECS = (
        AttackSpec("I-P", "pixel", attack_i_p, ("gen_pixels",), "generated pixels -> CNN (quality)"),
        AttackSpec("I-S", "semantic", attack_i_s, ("gen_img_emb",),
                   "generated image embeddings: mean, spread, pairwise cosines -> MLP (quality)"),
        AttackSpec("II-P", "pixel", attack_ii_p, ("query_pixels", "gen_pixels"),
                   "query, generated and their difference, pixels -> CNN (reconstruction)"),
        AttackSpec("II-S", "semantic", attack_ii_s, ("query_img_emb", "gen_img_emb"),
                   "query and generated image embeddings, differences, sorted cosines -> MLP (reconstruction)"),
        AttackSpec("III-X", "semantic", attack_iii_x, ("caption_emb", "gen_img_emb"),
                   "caption text embedding vs generated image embeddings, sorted cosines -> MLP (faithfulness)"),
        AttackSpec("III-T", "semantic", attack_iii_t, ("caption_emb", "gen_caption_emb"),
                   "caption vs captions of the generated images, text embeddings -> MLP (faithfulness)"),
        AttackSpec("IV", "semantic", attack_iv, _SEMANTIC_ALL, "I-S, II-S, III-X and III-T inputs together -> MLP"),
        *_graybox_specs(),
        *_variation_specs(),
        AttackSpec("blind", "semantic", attack_blind, ("query_img_emb", "caption_emb"),
                   "query-side only (query image and caption embeddings, their cosine): the distribution-shift "
                   "baseline"),
)
ATTACKS: dict[str, AttackSpec] = {s.name: s for s in (*_BASE_SPECS, *_reference_specs(_BASE_SPECS))}

# The paper's attacks, in its order; `blind` is trained alongside whenever any attack is.
PAPER_ATTACKS = ("I-P", "I-S", "II-P", "II-S", "III-X", "III-T", "IV")
GRAYBOX_ATTACKS = ("loss", "loss-score", "PIA", "PIA-score", "SecMI", "SecMI-score", "CLiD", "CLiD-score")
VARIATION_ATTACKS = ("var-pixel", "var-pixel-score", "var-clip", "var-clip-score", "var-all", "var-all-score")


def base_attack(name: str) -> str:
    """The attack whose features ``name`` reads: ``PIA-ref-score`` -> ``PIA``."""
    return name.removesuffix("-score").removesuffix("-ref").removesuffix("-score")


def uses_reference(name: str) -> bool:
    return any(k.startswith(REF_PREFIX) for k in get_attack(name).needs)


def tier_of(attack: str) -> str:
    return get_attack(attack).tier


def available_attacks(batch: Mapping[str, object]) -> tuple[str, ...]:
    """Every attack whose features ``batch`` (a feature batch, or the names of a store's datasets) holds, in
    registry order, the blind baseline last."""
    keys = set(batch)
    names = [n for n, s in ATTACKS.items() if n != "blind" and set(s.needs) <= keys]
    return (*names, "blind")


def tiers_of(attacks) -> tuple[str, ...]:
    """The tiers whose features ``attacks`` read (the blind baseline reads only query-side features)."""
    used = {tier_of(a) for a in attacks if a != "blind"}
    return tuple(t for t in TIERS if t in used)


def get_attack(name: str) -> AttackSpec:
    try:
        return ATTACKS[name]
    except KeyError:
        raise UnknownNameError(f"unknown attack {name!r}; valid attacks are: {', '.join(ATTACKS)}") from None


def parse_attacks(spec: str | None) -> tuple[str, ...]:
    """``"I-S,IV"`` -> ("I-S", "IV", "blind"); None or "all" -> every attack. The blind baseline is always added."""
    if spec is None or spec.strip().lower() == "all":
        names = list(PAPER_ATTACKS)
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
        if not names:
            raise UnknownNameError(f"no attack named in {spec!r}; valid attacks are: {', '.join(ATTACKS)}")
    for n in names:
        get_attack(n)
    if "blind" not in names:
        names.append("blind")
    return tuple(dict.fromkeys(names))


def build_inputs(batch: Mapping[str, np.ndarray], attack: str) -> np.ndarray:
    """The float32 input of ``attack``'s head for every row of ``batch``."""
    spec = get_attack(attack)
    missing = [k for k in spec.needs if k not in batch]
    if missing:
        hint = (f"; compute them with `audit features --tier {spec.tier}` (or --tier all)"
                if all(k.startswith(("graybox_", "gen_", "var_")) for k in missing) else "")
        if all(k.startswith(REF_PREFIX) for k in missing):
            hint = "; compute them with `audit features --reference MODEL` (the reference model's features)"
        raise InputError(f"attack {attack} ({spec.tier}): the feature batch lacks {missing}{hint}")
    return np.ascontiguousarray(spec.build(batch), dtype=np.float32)


def input_signature(batch: Mapping[str, np.ndarray]) -> dict:
    """What the heads' inputs depend on beyond the attack: n_gen, embedding dim, pixel size."""
    sig = {}
    if "gen_img_emb" in batch:
        sig["n_gen"] = int(np.shape(batch["gen_img_emb"])[1])
        sig["embedding_dim"] = int(np.shape(batch["gen_img_emb"])[2])
    elif "query_img_emb" in batch:
        sig["embedding_dim"] = int(np.shape(batch["query_img_emb"])[1])
    if "gen_pixels" in batch:
        sig["n_gen"] = int(np.shape(batch["gen_pixels"])[1])
        sig["pixel_size"] = int(np.shape(batch["gen_pixels"])[2])
    for key in ("graybox_loss", "graybox_pia", "graybox_secmi"):
        if key in batch:
            sig["graybox_timesteps"] = int(np.shape(batch[key])[1])
    for key in ("var_pixel_dist", "var_clip_dist"):
        if key in batch:
            sig["var_strengths"], sig["n_var"] = (int(v) for v in np.shape(batch[key])[1:3])
    if "graybox_clid" in batch:
        sig["clid_timesteps"] = int(np.shape(batch["graybox_clid"])[1])
    return sig
