"""`audit export`: every graph validated against PyTorch, the folder records what made it, bad requests fail early."""

import json

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from audit.cli import app
from audit.errors import ArtifactError, UsageError
from audit.export import ExportConfig, export_all
from audit.manifest import read_manifest
from audit.registry import TARGETS, parse_model_ref

GRAPHS = {"target": {"text_encoder", "unet_context", "unet", "vae_decoder", "vae_encoder"},
          "embedder": {"image_encoder", "text_encoder"}, "captioner": {"vision_encoder", "decoder_step"}}


def test_cli_export_reports_components_and_end_to_end_checks(tiny_export):
    out = tiny_export["output"]
    for name in ("target:", "embedder:", "captioner:"):
        assert name in out
    assert "captions equal" in out
    assert f"--target {tiny_export['path']}" in out
    assert "export: 100%" in tiny_export["stderr"] and "10/10" in tiny_export["stderr"]  # 9 graphs + end-to-end


def test_every_graph_met_its_tolerance_and_records_its_interface(tiny_export):
    root = tiny_export["path"]
    for component, names in GRAPHS.items():
        info = json.loads((root / component / "export.json").read_text())
        assert set(info["graphs"]) == names
        for name, g in info["graphs"].items():
            assert g["opset"] == 20 and g["precision"] == "fp32"
            v = g["validation"]
            assert v["passed"] and 0 <= v["max_abs_err"] <= g["tolerance"]["atol"] + 10 * g["tolerance"]["rtol"]
            assert len(v["inputs"]) == 2  # validated on other batch sizes than the traced one
            model = onnx.load(root / component / g["file"], load_external_data=False)
            assert [i.name for i in model.graph.input] == g["input_names"]
            assert [o.name for o in model.graph.output] == g["output_names"]
            assert set(g["inputs"]) == set(g["input_names"]) and set(g["outputs"]) == set(g["output_names"])
            # The batch axis is symbolic in the graph, as recorded.
            first = model.graph.input[0].type.tensor_type.shape.dim[0]
            assert first.dim_param and not first.dim_value
            assert g["inputs"][model.graph.input[0].name]["dynamic_axes"]["0"] == "batch"
            for fname, digest in g["files"].items():
                assert len(digest) == 64 and (root / component / fname).is_file()


def test_decoder_step_has_a_kv_cache_and_unet_a_per_sample_timestep(tiny_export):
    root = tiny_export["path"]
    cap = json.loads((root / "captioner" / "export.json").read_text())["graphs"]["decoder_step"]
    assert cap["inputs"]["past_key.0"]["dynamic_axes"] == {"0": "batch", "2": "past"}
    assert "present_value.1" in cap["outputs"]
    graphs = json.loads((root / "target" / "export.json").read_text())["graphs"]
    assert graphs["unet"]["inputs"]["timestep"]["shape"] == ["batch"]
    # The UNet step takes each cross-attention's keys (transposed) and values, which unet_context computes once
    # per generation from the text encoder's states: the tiny UNet has 4 cross-attentions, heads of 8 and 16.
    cross = [f"cross_{kind}.{i}" for i in range(4) for kind in ("key", "value")]
    assert graphs["unet"]["input_names"] == ["sample", "timestep", *cross]
    assert graphs["unet_context"]["input_names"] == ["encoder_hidden_states"]
    assert graphs["unet_context"]["output_names"] == cross
    assert graphs["unet"]["inputs"]["cross_key.3"]["shape"] == ["batch", 8, 16, 77]
    assert graphs["unet"]["inputs"]["cross_value.3"]["shape"] == ["batch", 8, 77, 16]


def test_manifests_name_the_source_weights(tiny_export, tiny_world):
    from audit.targets import load_embedder, load_target

    root = tiny_export["path"]
    target_id = load_target(str(tiny_world["target"])).identity()
    emb_id = load_embedder(str(tiny_world["clip"])).identity()
    bundle = read_manifest(root / "manifest.json")
    assert bundle["kind"] == "export" and bundle["target"] == target_id
    assert bundle["config"]["embedder"] == str(tiny_world["clip"])
    emb = read_manifest(root / "embedder" / "manifest.json")
    assert emb["component"] == "embedder" and emb["model"] == emb_id and emb["target"] == target_id
    assert tiny_export["info"]["components"]["target"]["identity"] == target_id


def test_runtime_files_are_copied(tiny_export):
    root = tiny_export["path"]
    assert json.loads((root / "target" / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "DDIMScheduler"
    assert (root / "target" / "tokenizer" / "tokenizer_config.json").is_file()
    for part in ("embedder", "captioner"):
        assert (root / part / "processor" / "tokenizer_config.json").is_file()
        assert (root / part / "processor" / "processor_config.json").is_file()


def test_end_to_end_checks_passed(tiny_export):
    checks = tiny_export["info"]["end_to_end"]
    assert checks["target"]["max_abs_uint8"] <= 2
    assert max(checks["embedder"].values()) < 1e-4
    assert checks["captioner"]["captions_equal"] is True


def test_export_folder_and_components_parse_as_export_refs(tiny_export):
    from audit.targets import default_models

    root = tiny_export["path"]
    assert parse_model_ref(str(root), TARGETS).kind == "export"
    assert parse_model_ref(str(root / "captioner"), TARGETS).kind == "export"
    assert default_models(str(root)) == (str(root / "embedder"), str(root / "captioner"))
    assert default_models(str(root / "target")) == (str(root / "embedder"), str(root / "captioner"))


def test_existing_output_folder_is_refused(tmp_path, tiny_world):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not an empty folder"):
        export_all(ExportConfig(target=str(tiny_world["target"])), tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_fp16_on_cpu_and_cuda_without_gpu_fail_with_clear_errors(tmp_path, tiny_world):
    runner = CliRunner()
    r = runner.invoke(app, ["export", "--target", str(tiny_world["target"]), "--out", str(tmp_path / "a"),
                            "--precision", "fp16"])
    assert r.exit_code == 2 and "fp16 is for GPU inference" in r.output
    r = runner.invoke(app, ["export", "--target", str(tiny_world["target"]), "--out", str(tmp_path / "b"),
                            "--precision", "int8"])
    assert r.exit_code == 2 and "valid precisions are fp32, fp16" in r.output
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        r = runner.invoke(app, ["export", "--target", str(tiny_world["target"]), "--out", str(tmp_path / "c"),
                                "--device", "cuda"])
        assert r.exit_code == 2 and "needs onnxruntime-gpu" in r.output
    assert not any(tmp_path.iterdir())  # nothing written by a refused export


def test_non_ddim_target_is_refused_before_exporting(tmp_path, tiny_world):
    import shutil

    src = tmp_path / "pndm"
    shutil.copytree(tiny_world["target"], src)
    cfg_path = src / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["_class_name"] = "PNDMScheduler"
    cfg_path.write_text(json.dumps(cfg))
    index = json.loads((src / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (src / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="reproduces DDIM only"):
        export_all(ExportConfig(target=str(src), embedder=str(tiny_world["clip"]),
                                captioner=str(tiny_world["blip"])), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


@pytest.fixture(scope="module")
def ldm_export(tmp_path_factory):
    """The paper's LDM family (LDMBert text encoder, `1 / scale * latents`, guidance when != 1), exported."""
    from audit.export.components import export_target
    from audit.targets.diffusion import DiffusersGenerator
    from audit.testing.tiny import build_tiny_ldm

    root = tmp_path_factory.mktemp("ldm")
    folder = build_tiny_ldm(root / "ldm")
    torch_gen = DiffusersGenerator.from_folder(folder, name="tiny-ldm")
    export_target(torch_gen, root / "export", ExportConfig(target=str(folder)))
    return {"torch": torch_gen, "export": root / "export", "folder": folder}


def test_ldm_target_exports_and_generates_like_the_torch_path(ldm_export):
    from audit.runtime import OnnxGenerator

    torch_gen = ldm_export["torch"]
    onnx_gen = OnnxGenerator(ldm_export["export"])
    assert onnx_gen.identity() == torch_gen.identity() and onnx_gen.resolution == torch_gen.resolution
    for guidance in (1.0, 0.5):  # LDM guides at any scale != 1, also below 1
        a = torch_gen.generate(["a red circle", "two blue squares"], 1, 3, 3, guidance)
        b = onnx_gen.generate(["a red circle", "two blue squares"], 1, 3, 3, guidance)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2


@pytest.mark.parametrize("family", ["sd", "ldm"])
def test_features_train_check_run_through_an_exported_target(family, tiny_export, ldm_export, tiny_world, tmp_path,
                                                            monkeypatch):
    """The user's path on a compiled target: `features --target EXPORT` (images as the torch path makes them),
    `train`, then `check --target EXPORT` with the heads. SD: the bundle with its compiled CLIP and BLIP; LDM: an
    exported target alone, with the torch CLIP and BLIP beside it."""
    from audit import api
    from audit.features import FeatureStore
    from audit.targets import load_target
    from audit.toy import scenes

    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))
    if family == "sd":
        target, torch_target, models = str(tiny_export["path"]), str(tiny_world["target"]), {}
    else:
        target, torch_target = str(ldm_export["export"]), str(ldm_export["folder"])
        models = {"embedder": str(tiny_world["clip"]), "captioner": str(tiny_world["blip"])}
    images, captions = scenes.scene_images(7, "members", 6)
    data = scenes.write_imagefolder(tmp_path / "data", images, captions, [True, False] * 3)
    summary = api.featurize(target, data, tmp_path / "store.h5", n_gen=1, steps=2, batch_size=3, quiet=True,
                            **models)
    assert summary.ok == 6 and summary.target["hash"] == load_target(torch_target).identity()["hash"]
    stored = FeatureStore.open(tmp_path / "store.h5").read()
    want = load_target(torch_target).generate(captions, 1, 0, 2)
    assert np.abs(stored["gen_pixels"].astype(int) - want.astype(int)).max() <= 2
    api.train(tmp_path / "store.h5", tmp_path / "heads", attacks="II-S", epochs=2, register=False, quiet=True, folds=0)
    first = sorted(data.glob("*.png"))[0]
    opts = [x for k, v in models.items() for x in (f"--{k}", v)]
    result = CliRunner().invoke(app, ["check", str(first), "--caption", captions[0], "--target", target, "--heads",
                                      str(tmp_path / "heads"), "--json", *opts])
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    assert verdict["status"] == "ok" and 0.0 <= verdict["probability"] <= 1.0


def test_fp16_graph_exports_from_a_copy_and_runs_with_cast_inputs(tmp_path, tiny_world):
    """The fp16 machinery (exported for the GPU; onnxruntime's CPU provider happens to run this graph too)."""
    import torch
    from transformers import CLIPModel

    from audit.export.convert import export_spec, prepare_module, validate_spec
    from audit.export.specs import ClipImageSpec
    from audit.runtime import Graph

    clip = CLIPModel.from_pretrained(tiny_world["clip"]).eval()
    spec = ClipImageSpec(clip)
    module = prepare_module(spec, "cpu", "fp16")
    assert next(module.parameters()).dtype == torch.float16
    assert next(clip.parameters()).dtype == torch.float32  # the source model still serves as the fp32 reference
    record = export_spec(spec, tmp_path, "cpu", "fp16", module=module)
    assert record["inputs"]["pixel_values"]["dtype"] == "float16" and record["tolerance"]["atol"] >= 1e-2
    record = validate_spec(spec, tmp_path, record, lambda p: Graph(p).session, "cpu", "fp16", module)
    assert record["validation"]["passed"]
    px = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    out = Graph(tmp_path / record["file"]).run(pixel_values=px)["image_embeds"]  # fp32 in, fp32 out
    assert out.dtype == np.float32
    with torch.no_grad():
        feats = clip.get_image_features(pixel_values=torch.from_numpy(px))
        ref = torch.nn.functional.normalize(getattr(feats, "pooler_output", feats), dim=-1).numpy()
    assert np.abs(out - ref).max() < 2e-2


def test_unexportable_embedder_is_refused_before_any_tracing(tmp_path, tiny_world):
    from audit.testing.tiny import build_tiny_open_clip

    folder = build_tiny_open_clip(tmp_path / "oc")
    r = CliRunner().invoke(app, ["export", "--target", str(tiny_world["target"]), "--embedder", str(folder),
                                 "--captioner", str(tiny_world["blip"]), "--out", str(tmp_path / "out")])
    assert r.exit_code == 2 and "is not a transformers CLIPModel" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oc"]  # no output, no partial folder


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graphs_with_external_data_validate_load_and_are_hashed(tmp_path, tiny_world, monkeypatch, precision):
    """Graphs over EXTERNAL_DATA_BYTES (1 GiB: the SD UNet, fp32 or fp16) keep their weights in NAME.onnx.data; here
    the threshold is lowered so a tiny graph takes the same path."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    from transformers import CLIPModel

    from audit.export import convert
    from audit.export.specs import ClipImageSpec
    from audit.manifest import weights_hash
    from audit.runtime import Graph

    monkeypatch.setattr(convert, "EXTERNAL_DATA_BYTES", 0)
    spec = ClipImageSpec(CLIPModel.from_pretrained(tiny_world["clip"]).eval())
    module = convert.prepare_module(spec, "cpu", precision)
    record = convert.export_spec(spec, tmp_path, "cpu", precision, module=module)
    data = tmp_path / "image_encoder.onnx.data"
    assert set(record["files"]) == {"image_encoder.onnx", "image_encoder.onnx.data"} and data.stat().st_size > 0
    assert all(convert.file_sha256(tmp_path / f) == h for f, h in record["files"].items())
    graph = onnx.load(str(tmp_path / "image_encoder.onnx"), load_external_data=False).graph
    external = [ExternalDataInfo(t) for t in graph.initializer if uses_external_data(t)]
    inline = [t for t in graph.initializer if not uses_external_data(t)]
    # the weights are beside it: every tensor but scalars and shapes lives in the .data file, which holds just them
    assert external and max((len(t.raw_data) for t in inline), default=0) <= 1024
    assert max(x.offset + x.length for x in external) == data.stat().st_size
    record = convert.validate_spec(spec, tmp_path, record, lambda p: Graph(p).session, "cpu", precision, module)
    assert record["validation"]["passed"] and record["memory"]["rows"] == [1, 3]
    px = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert Graph(tmp_path / record["file"]).run(pixel_values=px)["image_embeds"].shape == (2, spec.model.config
                                                                                          .projection_dim)
    before = weights_hash(tmp_path)
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.write_bytes(bytes(raw))
    assert weights_hash(tmp_path) != before  # the external data is part of the identity, as any weights file


def test_plain_attentions_are_exported_as_one_fused_node(tiny_export, tiny_world):
    """Self-attention of the UNet and the VAE's mid-block attention: onnxruntime's MultiHeadAttention (a flash
    attention on the CPU), not MatMul -> Softmax -> MatMul holding the score matrix. (The UNet step's cross
    attentions take their keys/values from unet_context and keep their own form.)"""
    from collections import Counter

    from diffusers.models.attention_processor import Attention

    from audit.targets.diffusion import load_pipeline

    pipe = load_pipeline(tiny_world["target"])
    self_attn = sum(isinstance(m, Attention) and not m.is_cross_attention for m in pipe.unet.modules())
    root = tiny_export["path"] / "target"
    graphs = {name: onnx.load(root / f"{name}.onnx", load_external_data=False).graph for name in ("unet", "vae_decoder")}
    ops = {name: Counter((n.domain, n.op_type) for n in g.node) for name, g in graphs.items()}
    mha = ("com.microsoft", "MultiHeadAttention")
    assert self_attn > 0 and ops["unet"][mha] == self_attn
    assert ops["vae_decoder"][mha] == 1 and ops["vae_decoder"][("", "Softmax")] == 0


def test_an_exported_module_is_freed_once_its_caller_lets_go(tmp_path, tiny_world):
    """Export holds one component at a time only if nothing keeps an exported graph alive: onnxscript's optimiser
    rules kept their last match, and with it every weight of the last export (SD's UNet: 3.4 GB)."""
    import gc
    import weakref

    from transformers import CLIPModel

    from audit.export import convert
    from audit.export.specs import ClipImageSpec

    spec = ClipImageSpec(CLIPModel.from_pretrained(tiny_world["clip"]).eval())
    module = convert.prepare_module(spec, "cpu", "fp32")
    weights = [weakref.ref(p) for p in module.parameters()]
    convert.export_spec(spec, tmp_path, "cpu", "fp32", module=module)
    del module
    spec.model = None
    gc.collect()
    alive = sum(w() is not None for w in weights)
    assert alive == 0, f"{alive} of {len(weights)} weight tensors outlived the export"
