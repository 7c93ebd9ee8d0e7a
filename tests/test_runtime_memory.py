"""Memory on the compiled runtime (audit.runtime.memory): what export measures, how a batch's need is estimated
from it, and features refusing (or sizing) a batch before it can meet the OOM killer."""

import json

import numpy as np
import pytest

from audit.errors import UsageError
from audit.runtime import memory
from audit.runtime.memory import MIB


def test_measure_peak_sees_what_a_call_allocates():
    def allocate():
        block = np.ones(256 * MIB // 8)  # 256 MiB, written (so resident), freed on return
        return float(block[-1])

    result, peak, seconds = memory.measure_peak(allocate)
    assert result == 1.0 and seconds > 0
    assert peak is not None and 240 * MIB <= peak <= 600 * MIB


def test_linear_fit_through_two_batches_and_needs_from_it():
    fit = memory.linear_fit([1, 3], [150 * MIB, 350 * MIB])
    assert fit == {"base_mib": 50.0, "per_item_mib": 100.0}
    record = {"memory": fit}
    assert memory.graph_need(record, 4) == 450 * MIB and memory.graph_need({}, 4) is None
    graphs = {"a": record, "b": {"memory": {"base_mib": 900.0, "per_item_mib": 1.0}}, "c": {}}
    assert memory.largest_need(graphs, {"a": 4, "b": 4}) == (904 * MIB, "b")
    assert memory.largest_need(graphs, {"a": 20, "b": 4}) == (2050 * MIB, "a")
    assert memory.largest_need(graphs, {"a": 4, "c": 4}) is None  # c was never measured: no estimate at all


def test_available_memory_is_a_share_of_the_machine():
    total = int(next(line for line in open("/proc/meminfo") if line.startswith("MemTotal")).split()[1]) * 1024
    free = memory.available_bytes()
    assert free is not None and 0 < free <= total


# --- on the session's tiny export --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tiny_export):
    from audit.features.compute import Models

    return Models.load(str(tiny_export["path"]))


def test_export_records_each_graphs_peak_at_the_validation_batches(tiny_export):
    for component in ("target", "embedder", "captioner"):
        info = json.loads((tiny_export["path"] / component / "export.json").read_text())
        for name, g in info["graphs"].items():
            m = g["memory"]
            assert m["rows"] == [1, 3] and len(m["peak_mib"]) == 2, (component, name)
            assert m["per_item_mib"] >= 0 and m["base_mib"] >= 0


def test_batch_need_grows_with_the_batch_and_guidance(compiled):
    small, large = memory.batch_need(compiled, 1, 2, 1.0), memory.batch_need(compiled, 16, 2, 1.0)
    assert small is not None and large[0] >= small[0] > 0
    g = compiled.generator
    assert g.peak_bytes(8, 4.0)[0] >= g.peak_bytes(8, 1.0)[0]  # guidance doubles the UNet's rows


def test_a_batch_that_will_not_fit_is_refused_with_the_batch_that_does(compiled, monkeypatch):
    need = {b: memory.batch_need(compiled, b, 2, 1.0)[0] for b in (1, 2, 3, 4, 8)}
    # Leave exactly room for 3 captions a batch.
    room = int(need[3] / memory.HEADROOM) + 1
    monkeypatch.setattr(memory, "available_bytes", lambda: room)
    memory.check_batch_fits(compiled, 3, 2, 1.0)  # fits: no error
    with pytest.raises(UsageError) as err:
        memory.check_batch_fits(compiled, 8, 2, 1.0)
    msg = str(err.value)
    assert "a batch of 8 captions (16 generated images) needs about" in msg and "is available" in msg
    assert "--batch-size 3 fits (or pass --batch-size auto)" in msg and "\n" not in msg
    assert memory.auto_batch_size(compiled, 2, 1.0) == 3
    monkeypatch.setattr(memory, "available_bytes", lambda: need[1] // 4)
    with pytest.raises(UsageError, match="not even one caption at --n-gen 2 fits"):
        memory.check_batch_fits(compiled, 1, 2, 1.0)


def test_features_batch_size_auto_is_recorded_and_kept_on_resume(tiny_export, tmp_path, monkeypatch):
    from audit import api
    from audit.features import FeatureStore
    from audit.toy import scenes

    images, captions = scenes.scene_images(3, "members", 5)
    data = scenes.write_imagefolder(tmp_path / "data", images, captions, [True, False, True, False, True])
    from audit.features.compute import Models

    models = Models.load(str(tiny_export["path"]))
    room = int(memory.batch_need(models, 2, 1, 1.0)[0] / memory.HEADROOM) + 1
    monkeypatch.setattr(memory, "available_bytes", lambda: room)
    out = tmp_path / "s.h5"
    api.featurize(str(tiny_export["path"]), data, out, n_gen=1, steps=1, batch_size="auto", quiet=True)
    assert FeatureStore.open(out).manifest["config"]["batch_size"] == 2
    # Resuming with auto takes the store's batch size, whatever the memory says now.
    monkeypatch.setattr(memory, "available_bytes", lambda: room * 100)
    api.featurize(str(tiny_export["path"]), data, out, n_gen=1, steps=1, batch_size="auto", quiet=True, resume=True)
    with pytest.raises(UsageError, match="--batch-size must be a positive integer or auto"):
        api.featurize(str(tiny_export["path"]), data, tmp_path / "t.h5", batch_size="many")


def test_decoding_in_sub_batches_changes_no_pixel(compiled, monkeypatch):
    from audit.targets import base

    g = compiled.generator
    whole = g.generate(["a red circle", "a blue square"], 3, 0, 2)
    monkeypatch.setattr(base, "VAE_PIXELS", g.resolution * g.resolution * 2)  # two images a call
    assert g.decode_rows() == 2
    np.testing.assert_array_equal(g.generate(["a red circle", "a blue square"], 3, 0, 2), whole)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_denoising_in_sub_batches_keeps_the_images_and_the_memory_estimate_follows(compiled, monkeypatch, guidance):
    """At most UNET_LATENT_PIXELS a UNet call (SD-1.5: 2 images, 1 when guided): rows are independent, so the
    images are the whole batch's, and the estimate that --batch-size auto reads counts the smaller calls."""
    from audit.runtime import generator as gen_mod

    g = compiled.generator
    captions = ["a red circle", "a blue square"]
    whole = g.generate(captions, 3, 0, 2, guidance)
    calls = []
    inner = g.unet.run

    def spy(**feeds):
        calls.append(len(feeds["sample"]))
        return inner(**feeds)

    monkeypatch.setattr(g.unet, "run", spy)
    monkeypatch.setattr(gen_mod, "UNET_LATENT_PIXELS", g.latent_size * g.latent_size * 2)
    per_call = 1 if guidance > 1 else 2
    assert g.images_per_call(guidance > 1) == per_call
    split = g.generate(captions, 3, 0, 2, guidance)
    assert calls == [2] * (2 * 6 // per_call)  # 2 steps a chunk; 2 rows a call (1 image twice when guided)
    assert np.abs(split.astype(int) - whole.astype(int)).max() <= 1
    estimated = []
    largest = g.largest_call
    monkeypatch.setattr(g, "largest_call", lambda rows: estimated.append(rows) or largest(rows))
    g.peak_bytes(6, guidance)
    assert estimated[0]["unet"] == 2 and estimated[0]["vae_decoder"] <= per_call


def test_encoding_in_sub_batches_changes_no_latent_on_either_path(compiled, tiny_world, monkeypatch):
    """The gray-box tier's VAE encoder goes VAE_PIXELS at a time too (at 512 px, 8 images in one call needed
    ~7 GiB beside the loaded models)."""
    from audit.targets import base, load_target

    images = np.random.default_rng(0).integers(0, 256, (5, compiled.generator.resolution,
                                                        compiled.generator.resolution, 3), dtype=np.uint8)
    for denoiser in (compiled.generator.denoiser(), load_target(str(tiny_world["target"])).denoiser()):
        whole = denoiser.encode_images(images)
        calls = []
        owner, name = ((denoiser.vae_encoder, "run") if hasattr(denoiser, "vae_encoder")  # compiled
                       else (denoiser._encoder, "forward"))  # torch
        inner = getattr(owner, name)

        def spy(*args, **kw):
            calls.append(len(kw["images"] if kw else args[0]))
            return inner(*args, **kw)

        monkeypatch.setattr(owner, name, spy)
        monkeypatch.setattr(base, "VAE_PIXELS", images.shape[1] * images.shape[2] * 2)  # two images a call
        np.testing.assert_allclose(denoiser.encode_images(images), whole, rtol=1e-5, atol=1e-6)
        assert calls == [2, 2, 1]
        monkeypatch.undo()


def test_graybox_unet_rows_are_capped_to_the_memory_and_change_no_error(compiled, monkeypatch):
    from audit.features.graybox import DEFAULT_TIMESTEPS, graybox_errors

    d = compiled.generator.denoiser()
    assert d.batch_size == 64 and d.peak_bytes(8)[0] > d.peak_bytes(1)[0] > 0
    images = np.random.default_rng(1).integers(0, 256, (6, d.resolution, d.resolution, 3), dtype=np.uint8)
    captions = ["a red circle", "a blue square"] * 3
    whole, _ = graybox_errors(d, images, captions, DEFAULT_TIMESTEPS, 0)
    memory.fit_graybox_rows(d, available=int(d.peak_bytes(64)[0] / memory.HEADROOM) + 1)
    assert d.batch_size == 64  # room for all: unchanged
    memory.fit_graybox_rows(d, available=int(d.peak_bytes(5)[0] / memory.HEADROOM) + 1)
    assert d.batch_size == 5
    calls = []
    run = d.generator.unet.run
    monkeypatch.setattr(d.generator.unet, "run", lambda **kw: calls.append(len(kw["sample"])) or run(**kw))
    capped, _ = graybox_errors(d, images, captions, DEFAULT_TIMESTEPS, 0)
    assert calls and max(calls) == 5
    for key in whole:
        np.testing.assert_allclose(capped[key], whole[key], rtol=1e-4, atol=1e-7)
    with pytest.raises(UsageError) as err:
        memory.fit_graybox_rows(d, available=d.peak_bytes(1)[0] // 4)
    assert "gray-box: one UNet evaluation of" in str(err.value) and "\n" not in str(err.value)
