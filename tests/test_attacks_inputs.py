"""Feature construction of each attack (audit/attacks/inputs.py), on features of the tiny real-architecture models."""

import numpy as np
import pytest

from audit.attacks.inputs import (ATTACKS, GRAYBOX_ATTACKS, PAPER_ATTACKS, VARIATION_ATTACKS, available_attacks,
                                  build_inputs, get_attack, parse_attacks, tier_of)
from audit.errors import InputError, UnknownNameError
from audit.features.graybox import graybox_errors
from audit.features.variation import DATASETS as VARIATION_KEYS, variation_features

G = 3  # three generated images per query, so "sorted" and "pairwise" are not trivial


@pytest.fixture(scope="module")
def tiny_batch(tiny_world):
    """What the feature store holds for 3 toy scenes, computed with the tiny target, CLIP and BLIP."""
    from audit.models.captioners import TransformersBlipCaptioner
    from audit.models.embedders import TransformersCLIPEmbedder
    from audit.targets.diffusion import DiffusersGenerator
    from audit.toy import scenes

    gen = DiffusersGenerator.from_folder(tiny_world["target"])
    emb = TransformersCLIPEmbedder(tiny_world["clip"])
    cap = TransformersBlipCaptioner(tiny_world["blip"])
    images, captions = scenes.scene_images(0, "public", 3)
    gen_px = gen.generate(captions, G, seed=0, steps=2)  # [3, G, R, R, 3]
    flat = gen_px.reshape(-1, *gen_px.shape[2:])
    gen_caps = cap.caption(flat, max_new_tokens=8)
    n = len(captions)
    errors, _ = graybox_errors(gen.denoiser(), images, captions, (100, 300, 500), seed=0)
    variations = variation_features(gen, emb, images, captions, (0.5, 1.0), 3, 2, seed=0)  # 2 strengths, 3 seeds
    return {
        **errors,
        **variations,
        "ids": np.array([f"q{i}" for i in range(n)]),
        "member": np.array([1, 0, 1], np.int8),
        "query_pixels": images,
        "gen_pixels": gen_px,
        "query_img_emb": emb.embed_images(images),
        "gen_img_emb": emb.embed_images(flat).reshape(n, G, -1),
        "caption_emb": emb.embed_texts(captions),
        "gen_caption_emb": emb.embed_texts(gen_caps).reshape(n, G, -1),
    }


@pytest.fixture(scope="module")
def ref_batch(tiny_batch):
    """The tiny batch with reference features: each model feature of the next query (real values, not the row's)."""
    from audit.attacks.inputs import _MODEL_KEYS

    return {**tiny_batch, **{"ref_" + k: np.roll(tiny_batch[k], 1, axis=0) for k in _MODEL_KEYS if k in tiny_batch}}


BASE_ATTACKS = [a for a in ATTACKS if "-ref" not in a]
REF_ATTACKS = [a for a in ATTACKS if "-ref" in a]


def _expected_shape(attack, n, d, p):
    if attack.endswith("-ref-score"):
        return (n, 1)
    if attack.endswith("-ref"):  # the target's input, the reference's and their difference
        shape = list(_expected_shape(attack.removesuffix("-ref"), n, d, p))
        shape[2 if len(shape) == 5 else 1] *= 3
        return tuple(shape)
    if attack == "CLiD":  # log conditional loss and two log-ratios at each of CLiD's 3 timesteps
        return (n, 9)
    pairs = G * (G - 1) // 2 + 1
    sizes = {"I-S": 2 * d + pairs, "II-S": 4 * d + G + 1, "III-X": 3 * d + G + 1, "III-T": 3 * d + G + 1,
             "blind": 2 * d + 1}
    sizes["IV"] = sizes["I-S"] + sizes["II-S"] + sizes["III-X"] + sizes["III-T"]
    if attack == "I-P":
        return (n, G, 3, p, p)
    if attack == "II-P":
        return (n, G, 9, p, p)
    if attack in GRAYBOX_ATTACKS:  # the error at each of the 3 timesteps, or the one untrained score
        return (n, 1) if attack.endswith("-score") else (n, 3)
    if attack in VARIATION_ATTACKS:  # per strength 6 summaries (+ the average image's distance for pixels)
        return (n, 1) if attack.endswith("-score") else (n, {"var-pixel": 14, "var-clip": 12, "var-all": 26}[attack])
    return (n, sizes[attack])


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_attack_builds_finite_float32_inputs_of_its_documented_shape(ref_batch, attack):
    x = build_inputs(ref_batch, attack)
    n, d, p = 3, ref_batch["query_img_emb"].shape[1], ref_batch["query_pixels"].shape[1]
    assert x.dtype == np.float32
    assert x.shape == _expected_shape(attack, n, d, p)
    assert np.isfinite(x).all()


def _permute_generated(batch, perm):
    out = dict(batch)
    for k in ("gen_pixels", "gen_img_emb", "gen_caption_emb"):
        for key in (k, "ref_" + k):
            if key in batch:
                out[key] = batch[key][:, perm]
    return out


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_inputs_do_not_depend_on_the_order_of_the_generated_images(ref_batch, attack):
    x = build_inputs(ref_batch, attack)
    y = build_inputs(_permute_generated(ref_batch, [2, 0, 1]), attack)
    if get_attack(attack).kind == "pixel":
        # The CNN pools over the G axis, so the same images in another order is the same input set.
        y = y[:, np.argsort([2, 0, 1])]
    np.testing.assert_allclose(x, y, atol=1e-6)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_a_row_gets_the_same_input_alone_as_in_a_batch(ref_batch, attack):
    # check/scan score one image at a time; training featurised it in a batch: nothing may be pooled over rows.
    whole = build_inputs(ref_batch, attack)
    alone = build_inputs({k: v[1:2] for k, v in ref_batch.items()}, attack)
    np.testing.assert_array_equal(whole[1:2], alone)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_attack_reads_exactly_the_features_it_declares(ref_batch, attack):
    spec = get_attack(attack)
    base = build_inputs(ref_batch, attack)
    rng = np.random.default_rng(1)
    keys = ("query_pixels", "gen_pixels", "query_img_emb", "gen_img_emb", "caption_emb", "gen_caption_emb",
            "graybox_loss", "graybox_pia", "graybox_secmi", "graybox_clid")
    for key in keys + VARIATION_KEYS + tuple("ref_" + k for k in keys if not k.startswith(("query_", "caption_"))):
        v = ref_batch[key]
        other = (rng.integers(0, 256, v.shape).astype(v.dtype) if v.dtype == np.uint8
                 else rng.normal(size=v.shape).astype(v.dtype))
        if "graybox_" in key or key.startswith("var_"):  # errors and distances are positive
            other = np.abs(other)
        changed = build_inputs({**ref_batch, key: other}, attack)
        if key in spec.needs:
            assert not np.allclose(changed, base), f"{attack} ignores {key}"
        else:
            np.testing.assert_array_equal(changed, base, err_msg=f"{attack} reads {key} it does not declare")


def test_blind_baseline_never_sees_a_generated_image():
    assert not any(k.startswith("gen_") for k in get_attack("blind").needs)


def test_ii_p_stacks_query_generated_and_their_difference(tiny_batch):
    x = build_inputs(tiny_batch, "II-P")
    q = tiny_batch["query_pixels"].astype(np.float32).transpose(0, 3, 1, 2) / 255
    g = tiny_batch["gen_pixels"].astype(np.float32).transpose(0, 1, 4, 2, 3) / 255
    np.testing.assert_allclose(x[:, :, 0:3], np.broadcast_to(q[:, None], g.shape), atol=1e-7)
    np.testing.assert_allclose(x[:, :, 3:6], g, atol=1e-7)
    np.testing.assert_allclose(x[:, :, 6:9], q[:, None] - g, atol=1e-6)


def test_reconstruction_and_faithfulness_cosines_are_those_of_the_embeddings(tiny_batch):
    q, g = tiny_batch["query_img_emb"], tiny_batch["gen_img_emb"]
    c, t = tiny_batch["caption_emb"], tiny_batch["gen_caption_emb"]

    def tail(x):  # the sorted cosines and their mean close each semantic input
        return x[:, -(G + 1):]

    def want(a, b):
        cos = np.einsum("nd,ngd->ng", a, b) / np.linalg.norm(a, axis=1)[:, None] / np.linalg.norm(b, axis=2)
        return np.concatenate([-np.sort(-cos, 1), cos.mean(1, keepdims=True)], 1)

    np.testing.assert_allclose(tail(build_inputs(tiny_batch, "II-S")), want(q, g), atol=1e-5)
    np.testing.assert_allclose(tail(build_inputs(tiny_batch, "III-X")), want(c, g), atol=1e-5)
    np.testing.assert_allclose(tail(build_inputs(tiny_batch, "III-T")), want(c, t), atol=1e-5)
    blind = build_inputs(tiny_batch, "blind")
    np.testing.assert_allclose(blind[:, -1], np.sum(q * c, 1) / np.linalg.norm(q, axis=1) / np.linalg.norm(c, axis=1),
                               atol=1e-5)


def test_iv_is_the_concatenation_of_the_semantic_attacks(tiny_batch):
    parts = [build_inputs(tiny_batch, a) for a in ("I-S", "II-S", "III-X", "III-T")]
    np.testing.assert_array_equal(build_inputs(tiny_batch, "IV"), np.concatenate(parts, 1))


def test_graybox_inputs_are_log_errors_and_scores_minus_log_mean_error(tiny_batch):
    for attack, key in (("loss", "graybox_loss"), ("PIA", "graybox_pia"), ("SecMI", "graybox_secmi")):
        e = tiny_batch[key].astype(np.float64)
        np.testing.assert_allclose(build_inputs(tiny_batch, attack), np.log(e), rtol=1e-6)
        # Lower error = more member-like: the untrained score is high for members.
        np.testing.assert_allclose(build_inputs(tiny_batch, f"{attack}-score")[:, 0], -np.log(e.mean(1)), rtol=1e-6)


def test_every_attack_names_its_tier_and_a_store_trains_what_it_holds(tiny_batch):
    assert {tier_of(a) for a in PAPER_ATTACKS + ("blind",)} == {"black-box"}
    assert {tier_of(a) for a in GRAYBOX_ATTACKS} == {"gray-box"}
    assert {tier_of(a) for a in VARIATION_ATTACKS} == {"variation"}
    black = {k: v for k, v in tiny_batch.items() if not k.startswith(("graybox_", "var_"))}
    gray = {k: v for k, v in tiny_batch.items() if not k.startswith(("gen_", "var_"))}
    variation = {k: v for k, v in tiny_batch.items() if not k.startswith(("gen_", "graybox_"))}
    assert available_attacks(black) == PAPER_ATTACKS + ("blind",)
    assert available_attacks(gray) == GRAYBOX_ATTACKS + ("blind",)
    assert available_attacks(variation) == VARIATION_ATTACKS + ("blind",)
    assert available_attacks(tiny_batch) == PAPER_ATTACKS + GRAYBOX_ATTACKS + VARIATION_ATTACKS + ("blind",)
    with pytest.raises(InputError, match=r"PIA \(gray-box\).*--tier gray-box"):
        build_inputs(black, "PIA")
    with pytest.raises(InputError, match=r"var-clip \(variation\).*--tier variation"):
        build_inputs(black, "var-clip")
    with pytest.raises(InputError, match=r"PIA-ref \(gray-box\).*--reference MODEL"):
        build_inputs(tiny_batch, "PIA-ref")


def test_attack_names_are_checked_and_blind_is_always_trained():
    assert parse_attacks(None) == PAPER_ATTACKS + ("blind",)
    assert parse_attacks("II-S, IV") == ("II-S", "IV", "blind")
    with pytest.raises(UnknownNameError, match="valid attacks are: I-P, I-S, II-P"):
        parse_attacks("II-S,V")


def test_a_batch_missing_a_feature_is_refused_naming_it(tiny_batch):
    partial = {k: v for k, v in tiny_batch.items() if k != "gen_caption_emb"}
    with pytest.raises(InputError, match="gen_caption_emb"):
        build_inputs(partial, "III-T")
