"""Output defences: spec parsing, what each perturbation does to an image, and the Generator wrapper over a real
(tiny, untrained) diffusion target."""

import numpy as np
import pytest

from audit.defences import (
    DefenceConfig,
    DefendedGenerator,
    apply_defence,
    downscale,
    gaussian_noise,
    jpeg,
    parse_defence,
    psnr,
)
from audit.errors import UnknownNameError, UsageError


def _image(seed=0, size=32):
    rng = np.random.default_rng(seed)
    # Smooth gradients plus a few edges: JPEG and downscaling change it, but not beyond recognition.
    y, x = np.mgrid[0:size, 0:size]
    img = np.stack([x * 255 // size, y * 255 // size, (x + y) * 127 // size], axis=-1)
    img[8:16, 8:16] = rng.integers(0, 255, 3)
    return img.astype(np.uint8)


def test_parse_defence_specs_and_tags():
    assert parse_defence("jpeg:30") == DefenceConfig("jpeg", 30.0, 0)
    assert parse_defence("noise:8", seed=3).seed == 3
    assert parse_defence(" Downscale:2 ").kind == "downscale"
    assert parse_defence("none").kind == "none"
    assert [parse_defence(s).tag for s in ("jpeg:30", "noise:2.5", "downscale:4", "none")] == \
        ["jpeg-q30", "noise-s2.5", "downscale-x4", "none"]


@pytest.mark.parametrize("spec, kind, words", [
    ("blur:3", UnknownNameError, ["blur", "jpeg", "noise", "downscale"]),
    ("jpeg", UsageError, ["quality"]),
    ("jpeg:0", UsageError, ["out of range"]),
    ("jpeg:abc", UsageError, ["not a number"]),
    ("noise:-1", UsageError, ["out of range"]),
    ("downscale:1.5", UsageError, ["out of range"]),
])
def test_bad_specs_fail_with_a_message_naming_the_problem(spec, kind, words):
    with pytest.raises(kind) as err:
        parse_defence(spec)
    assert all(w in str(err.value) for w in words)


def test_jpeg_is_lossy_and_lower_quality_loses_more():
    img = _image()
    hi, lo = jpeg(img, 90), jpeg(img, 10)
    assert hi.shape == lo.shape == img.shape and hi.dtype == np.uint8
    assert not np.array_equal(lo, img)
    assert psnr(img[None], hi[None]) > psnr(img[None], lo[None]) > 15


def test_noise_has_the_asked_spread_and_is_seeded():
    img = np.full((64, 64, 3), 128, np.uint8)
    a = gaussian_noise(img, 8, np.random.default_rng(1))
    b = gaussian_noise(img, 8, np.random.default_rng(1))
    c = gaussian_noise(img, 8, np.random.default_rng(2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert abs(float((a.astype(float) - 128).std()) - 8) < 0.5
    with pytest.raises(UsageError):
        apply_defence(img, DefenceConfig("noise", 8))  # noise without a generator is refused


def test_downscale_returns_the_smaller_image_by_area_averaging():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, ::2] = 200  # one-pixel stripes average to 100 when halved
    small = downscale(img, 2)
    assert small.shape == (16, 16, 3)
    assert np.all(np.abs(small.astype(int) - 100) <= 1)


def test_psnr_upscales_smaller_images_and_rates_identity_high():
    img = _image()[None]
    assert psnr(img, img) == 100.0
    small = downscale(img[0], 2)[None]
    assert 10 < psnr(img, small) < 100


class Remembering:
    """The real tiny target, each distinct call generated once (the defences are what is under test here)."""

    def __init__(self, inner):
        self.inner, self.name, self.resolution, self.calls = inner, inner.name, inner.resolution, {}

    def identity(self):
        return self.inner.identity()

    def generate(self, captions, n_gen, seed, steps, guidance=1.0):
        key = (tuple(captions), n_gen, seed, steps, guidance)
        if key not in self.calls:
            self.calls[key] = self.inner.generate(captions, n_gen, seed, steps, guidance)
        return self.calls[key].copy()


@pytest.fixture(scope="module")
def target(tiny_world):
    import torch

    from audit.targets.builtin import load_target

    # One thread: two torch threads crawl when the other core is busy, and these calls are tiny.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Remembering(load_target(str(tiny_world["target"])))
    torch.set_num_threads(threads)


def test_defended_generator_perturbs_what_the_target_returns(target):
    captions = ["a red circle at the top", "a blue square"]
    clean = target.generate(captions, 2, seed=4, steps=2)
    for spec in ("jpeg:20", "noise:16", "downscale:2"):
        d = DefendedGenerator(target, parse_defence(spec))
        out = d.generate(captions, 2, seed=4, steps=2)
        assert out.dtype == np.uint8 and out.shape[:2] == (2, 2)
        assert out.shape[2] == d.resolution
        if spec.startswith("downscale"):
            assert d.resolution == target.resolution // 2
            # Each defended image is exactly the defence applied to the clean one.
            assert np.array_equal(out[1, 0], downscale(clean[1, 0], 2))
        else:
            assert out.shape == clean.shape and not np.array_equal(out, clean)
        if spec.startswith("jpeg"):
            assert np.array_equal(out[0, 1], jpeg(clean[0, 1], 20))


def test_defended_noise_depends_on_content_not_batch(target):
    d = DefendedGenerator(target, parse_defence("noise:16", seed=7))
    both = d.generate(["a red circle", "a blue square"], 1, seed=1, steps=2)
    alone = d.generate(["a blue square"], 1, seed=1, steps=2)
    assert np.array_equal(both[1], alone[0])
    other_seed = DefendedGenerator(target, parse_defence("noise:16", seed=8)).generate(["a blue square"], 1, 1, 2)
    assert not np.array_equal(other_seed, alone)


def test_defended_identity_names_the_defence_and_differs_from_the_target(target):
    base = target.identity()
    d = DefendedGenerator(target, parse_defence("jpeg:50"))
    ident = d.identity()
    assert ident["hash"] != base["hash"] and ident["base"] == base
    assert "jpeg-q50" in ident["name"] and ident["defence"]["strength"] == 50
    assert DefendedGenerator(target, parse_defence("jpeg:40")).identity()["hash"] != ident["hash"]
    assert DefendedGenerator(target, parse_defence("none")).identity() == base
