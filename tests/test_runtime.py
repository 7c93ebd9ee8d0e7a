"""The onnxruntime runtime reproduces the torch path: same seeds -> same images, same features, same captions."""

import json
import shutil

import numpy as np
import pytest
import torch

from audit.errors import ArtifactError, UsageError
from audit.runtime import DdimSchedule, OnnxCaptioner, OnnxEmbedder, OnnxGenerator, RuntimeOptions, initial_latents
from audit.runtime.session import Graph, providers_for
from audit.targets.base import Captioner, Embedder, Generator

CAPTIONS = ["a red circle above a blue square", "three green triangles"]
# Stated tolerance of the ONNX path against the torch path for generated images (uint8 levels, max over pixels):
# the graphs match PyTorch to ~1e-6, and that error grows a little over the denoising steps.
IMAGE_TOLERANCE = 2


# --- pieces that need no export -----------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
         steps_offset=1),
    dict(),  # diffusers' defaults: linear betas, clip_sample, set_alpha_to_one
    dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", prediction_type="v_prediction",
         rescale_betas_zero_snr=True),
    dict(timestep_spacing="linspace", prediction_type="sample"),
])
def test_ddim_schedule_reproduces_diffusers_bit_for_bit(config):
    from diffusers import DDIMScheduler

    from audit.kernels import cfg_ddim_step

    ref = DDIMScheduler(**config)
    ours = DdimSchedule(dict(ref.config, _class_name="DDIMScheduler"))
    g = torch.Generator().manual_seed(0)
    for steps in (3, 25):
        ref.set_timesteps(steps)
        np.testing.assert_array_equal(ref.timesteps.numpy(), ours.timesteps(steps))
        x = torch.randn(2, 4, 8, 8, generator=g)
        xn = x.numpy().copy()
        for t, coeffs in ours.plan(steps):
            eps = torch.randn(2, 4, 8, 8, generator=g)
            x = ref.step(eps, t, x).prev_sample
            xn = cfg_ddim_step(eps.numpy(), xn, coeffs, None, ours.prediction_type, ours.clip_range)
        np.testing.assert_array_equal(xn, x.numpy())


def test_schedule_refuses_what_it_cannot_reproduce():
    with pytest.raises(ArtifactError, match="DDIM only.*'PNDMScheduler'"):
        DdimSchedule({"_class_name": "PNDMScheduler"})
    with pytest.raises(ArtifactError, match="thresholding=True"):
        DdimSchedule({"_class_name": "DDIMScheduler", "thresholding": True})


def test_initial_latents_are_diffusers_randn_tensor_with_a_generator_per_image():
    from diffusers.utils.torch_utils import randn_tensor

    seeds = [5, 17, 2**40 + 3]
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    expected = randn_tensor((3, 4, 8, 8), generator=gens, dtype=torch.float32).numpy()
    np.testing.assert_array_equal(initial_latents(seeds, 4, 8), expected)
    np.testing.assert_array_equal(initial_latents(seeds[1:2], 4, 8), expected[1:2])  # independent of the batch


def test_cpu_sessions_get_explicit_threads_and_cuda_fails_clearly(tmp_path):
    assert providers_for(RuntimeOptions()) == ["CPUExecutionProvider"]
    assert RuntimeOptions(intra_op_threads=3).threads() == 3 and RuntimeOptions().threads() >= 1
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UsageError, match="needs onnxruntime-gpu"):
            providers_for(RuntimeOptions(device="cuda"))
    with pytest.raises(UsageError, match="valid devices are cpu, cuda"):
        providers_for(RuntimeOptions(device="tpu"))
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    with pytest.raises(ArtifactError, match="bad.onnx: onnxruntime cannot load this graph"):
        Graph(tmp_path / "bad.onnx")


def _onnx_graph(path, lead: list, width: int = 3):
    """y = x @ w + 1 over inputs/outputs whose first dims are ``lead`` (named axes are dynamic)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from audit.kernels._impls import make_model

    w = numpy_helper.from_array(np.arange(width * width, dtype=np.float32).reshape(width, width) / 7, "w")
    one = numpy_helper.from_array(np.ones(width, np.float32), "one")
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "one"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, width])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*lead, width])], [w, one], name="g")
    onnx.save(model, str(path))
    return path


def test_cpu_graphs_split_their_batch_over_single_thread_replicas(tmp_path):
    path = _onnx_graph(tmp_path / "batch.onnx", ["batch"])
    two = Graph(path, RuntimeOptions(intra_op_threads=2))
    one = Graph(path, RuntimeOptions(intra_op_threads=2, replicas=1))
    assert len(two.replicas) == 2 and len(one.replicas) == 1
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    for rows in (5, 2, 1, 0):  # an uneven split, one row each, too small to split, empty
        np.testing.assert_array_equal(two.run(x=x[:rows])["y"], one.run(x=x[:rows])["y"])
    np.testing.assert_allclose(two.run(x=x)["y"], x @ (np.arange(9, dtype=np.float32).reshape(3, 3) / 7) + 1,
                               rtol=1e-6)
    # Not split: a graph whose first axis is not a shared batch (like DALL-E's cache, led by its layers), a graph
    # over the size limit, one thread, or an explicit replicas=1.
    layers = _onnx_graph(tmp_path / "layers.onnx", [2, "batch"])
    assert len(Graph(layers, RuntimeOptions(intra_op_threads=2)).replicas) == 1
    assert len(Graph(path, RuntimeOptions(intra_op_threads=2, replicate_below_mib=0)).replicas) == 1
    assert len(Graph(path, RuntimeOptions(intra_op_threads=1)).replicas) == 1
    # Light weights but heavy activations per row (SD's VAE decoder: 1.1 GiB per 512 px image): one session with
    # every thread, no arena, the freed heap handed back after each call.
    heavy = Graph(path, RuntimeOptions(intra_op_threads=2), per_item_mib=1120)
    assert len(heavy.replicas) == 1 and not heavy.small and two.small
    np.testing.assert_array_equal(heavy.run(x=x)["y"], one.run(x=x)["y"])
    assert RuntimeOptions(device="cuda", intra_op_threads=4).replicas_for(1) == 1
    assert RuntimeOptions(intra_op_threads=4, replicas=3).replicas_for(2**40) == 3


def test_replicas_keep_working_in_a_forked_child(tmp_path):
    import multiprocessing

    graph = Graph(_onnx_graph(tmp_path / "batch.onnx", ["batch"]), RuntimeOptions(intra_op_threads=2))
    x = np.ones((4, 3), np.float32)
    expected = graph.run(x=x)["y"]  # the parent's thread pool now exists; a fork copies none of its threads
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=lambda: send.send(graph.run(x=x)["y"]))  # fork: the target is not pickled
    child.start()
    assert receive.poll(60), "the forked child's run did not finish (its thread pool is the parent's, threadless)"
    np.testing.assert_array_equal(receive.recv(), expected)
    child.join(10)


def test_replicas_from_the_environment(monkeypatch):
    monkeypatch.setenv("AUDIT_REPLICAS", "1")
    assert RuntimeOptions(intra_op_threads=2).replicas_for(1) == 1
    assert RuntimeOptions(intra_op_threads=2, replicas=2).replicas_for(1) == 2  # an explicit option wins
    monkeypatch.setenv("AUDIT_REPLICAS", "two")
    with pytest.raises(UsageError, match="AUDIT_REPLICAS must be a positive integer, got 'two'"):
        RuntimeOptions(intra_op_threads=2).replicas_for(1)


# --- against the session's export of tiny_world (see conftest.tiny_export) ------------------------------------------


@pytest.fixture(scope="module")
def torch_models(tiny_world):
    from audit.targets import load_captioner, load_embedder, load_target

    return (load_target(str(tiny_world["target"])), load_embedder(str(tiny_world["clip"])),
            load_captioner(str(tiny_world["blip"])))


@pytest.fixture(scope="module")
def onnx_models(tiny_export):
    from audit.targets import default_models, load_captioner, load_embedder, load_target

    root = str(tiny_export["path"])
    emb, cap = default_models(root)
    return load_target(root), load_embedder(emb), load_captioner(cap)


def test_runtime_objects_implement_the_protocols(onnx_models, torch_models):
    g, e, c = onnx_models
    assert isinstance(g, OnnxGenerator) and isinstance(e, OnnxEmbedder) and isinstance(c, OnnxCaptioner)
    assert isinstance(g, Generator) and isinstance(e, Embedder) and isinstance(c, Captioner)
    # The compiled models keep their source identity, so stores and heads made on either path are interchangeable.
    assert [m.identity() for m in onnx_models] == [m.identity() for m in torch_models]
    assert g.resolution == torch_models[0].resolution and e.dim == torch_models[1].dim


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_same_seed_gives_the_same_images_on_torch_and_onnx(onnx_models, torch_models, guidance):
    a = torch_models[0].generate(CAPTIONS, 2, 7, 4, guidance)
    b = onnx_models[0].generate(CAPTIONS, 2, 7, 4, guidance)
    assert a.shape == b.shape == (2, 2, 32, 32, 3) and b.dtype == np.uint8
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff.max() <= IMAGE_TOLERANCE and diff.mean() < 0.05
    assert not np.array_equal(b[0, 0], b[0, 1])  # the n_gen images differ (their own seeds)


def test_generation_is_independent_of_batching_and_duplicates(onnx_models):
    g = onnx_models[0]
    together = g.generate([CAPTIONS[0], CAPTIONS[1], CAPTIONS[0]], 2, 1, 3)
    alone = g.generate([CAPTIONS[1]], 2, 1, 3)
    np.testing.assert_array_equal(together[1], alone[0])
    np.testing.assert_array_equal(together[0], together[2])
    small_batches = OnnxGenerator(g.folder.path, batch_size=3).generate(CAPTIONS, 2, 1, 3)
    np.testing.assert_array_equal(small_batches, together[:2])
    # The CPU replicas (two one-thread sessions on halves of each batch) change no bit of the images.
    one_session = OnnxGenerator(g.folder.path, RuntimeOptions(intra_op_threads=2, replicas=1))
    assert len(one_session.unet.replicas) == 1 and len(OnnxGenerator(
        g.folder.path, RuntimeOptions(intra_op_threads=2)).unet.replicas) == 2
    np.testing.assert_array_equal(one_session.generate(CAPTIONS, 2, 1, 3), together[:2])
    assert g.generate([], 2, 1, 3).shape == (0, 2, 32, 32, 3)
    with pytest.raises(UsageError, match="n_gen and steps must be >= 1"):
        g.generate(CAPTIONS, 0, 1, 3)


def test_a_whole_unet_graph_generates_the_same_images_as_the_split_one(onnx_models, torch_models, tmp_path):
    """A UNet exported whole (folders from before the cross-attention split, and UNets whose attention the split
    does not cover) takes encoder_hidden_states at every step, and gives the same images."""
    from audit.export import specs
    from audit.export.convert import export_spec

    g, pipe = onnx_models[0], torch_models[0].pipe
    assert specs.cross_attentions(pipe.unet) and g.unet_context is not None
    whole = tmp_path / "target"
    shutil.copytree(g.folder.path, whole)
    spec = specs.UNetSpec(pipe.unet, g.latent_size, g.text_max_length, pipe.text_encoder.config.hidden_size)
    info = json.loads((whole / "export.json").read_text())
    (whole / "unet_context.onnx").unlink()
    del info["graphs"]["unet_context"]
    info["graphs"]["unet"] = export_spec(spec, whole)
    (whole / "export.json").write_text(json.dumps(info))
    legacy = OnnxGenerator(whole)
    assert legacy.unet_context is None and "encoder_hidden_states" in legacy.unet.input_types
    for guidance in (1.0, 4.0):
        a, b = g.generate(CAPTIONS, 2, 3, 3, guidance), legacy.generate(CAPTIONS, 2, 3, 3, guidance)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # An attention the step's processor would not reproduce keeps the UNet whole.
    attn = specs.cross_attentions(pipe.unet)[0]
    attn.residual_connection = True
    try:
        assert specs.cross_attentions(pipe.unet) is None
    finally:
        attn.residual_connection = False


def test_greedy_captions_equal_generate_tokens(onnx_models, torch_models, tiny_world):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from audit.toy import scenes

    images, _ = scenes.scene_images(4, "heldout", 5)
    images = np.asarray(images)
    model = BlipForConditionalGeneration.from_pretrained(tiny_world["blip"]).eval()
    processor = BlipProcessor.from_pretrained(tiny_world["blip"])
    px = processor(images=list(images), return_tensors="pt").pixel_values
    for max_new in (1, 7, 20):
        with torch.no_grad():
            expected = model.generate(pixel_values=px, max_new_tokens=max_new, do_sample=False, num_beams=1)
        assert onnx_models[2].generate_ids(images, max_new) == expected.tolist()
    assert onnx_models[2].caption(images, 20) == torch_models[2].caption(images, 20)
    with pytest.raises(UsageError, match="max_new_tokens must be between 1 and"):
        onnx_models[2].caption(images, 500)


def test_embeddings_match_the_torch_embedder(onnx_models, torch_models):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 48, 40, 3)).astype(np.uint8)  # resized and cropped by both paths
    texts = ["a red circle", "", "three green triangles above a very long and winding caption of many words"]
    for ours, theirs in ((onnx_models[1].embed_images(images), torch_models[1].embed_images(images)),
                         (onnx_models[1].embed_texts(texts), torch_models[1].embed_texts(texts))):
        assert ours.shape == theirs.shape and ours.dtype == np.float32
        assert np.abs(ours - theirs).max() < 2e-3  # one uint8 level of resize rounding at most moves them this much
    np.testing.assert_allclose(np.linalg.norm(onnx_models[1].embed_texts(texts), axis=1), 1, atol=1e-5)
    assert onnx_models[1].embed_images(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, onnx_models[1].dim)


def test_features_from_both_paths_agree(onnx_models, torch_models):
    """The feature computation runs unchanged on the runtime and gives the torch path's features."""
    from audit.features.compute import FeaturesConfig, Models, featurize_rows
    from audit.imagefolder import Row
    from audit.toy import scenes

    images, captions = scenes.scene_images(2, "members", 3)
    rows = lambda: [Row(id=f"r{i}.png", path=f"r{i}.png", caption=c)  # noqa: E731
                    for i, c in enumerate(captions)]
    cfg = FeaturesConfig(n_gen=2, steps=3, seed=5, batch_size=3, caption_tokens=8).validate()
    pre = {i: np.asarray(im) for i, im in enumerate(images)}
    ft = featurize_rows(rows(), Models(*torch_models), cfg, images=dict(pre))
    fo = featurize_rows(rows(), Models(*onnx_models), cfg, images=dict(pre))
    assert list(ft) == list(fo)
    for key, value in ft.items():
        if value.dtype.kind == "f":
            assert np.abs(value - fo[key]).max() < 2e-2, key
        elif value.dtype == np.uint8:
            assert np.abs(value.astype(int) - fo[key].astype(int)).max() <= IMAGE_TOLERANCE, key


def test_corrupt_or_foreign_export_folders_fail_with_one_line(tiny_export, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_export["path"] / "embedder", bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["schema_version"] = 999
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="schema version 999 is not supported"):
        OnnxEmbedder(bad)
    manifest["schema_version"] = json.loads((tiny_export["path"] / "manifest.json").read_text())["schema_version"]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="exported embedder, not a captioner"):
        OnnxCaptioner(bad)
    (bad / "image_encoder.onnx").write_bytes(b"\0" * 16)
    with pytest.raises(ArtifactError, match="image_encoder.onnx: onnxruntime cannot load"):
        OnnxEmbedder(bad)
