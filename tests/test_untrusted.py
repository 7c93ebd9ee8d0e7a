"""Untrusted artifacts: no pickle and no remote code by default; artifacts made for one target refuse another;
hostile feature stores, heads.json, ONNX external data and export folders are refused in one line before anything
is allocated or trusted, and an export's identity follows its content.

The hostile files here do something observable (write a marker file) when they are executed, so "refused" means
the marker never appears, not only that an error was raised.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from audit.cli import app
from audit.errors import ArtifactError, UnsafeWeightsError
from audit.manifest import make_manifest

AUDIT_SRC = Path(__file__).resolve().parents[1] / "audit"


class _Payload:
    """Unpickling this writes a file: what a hostile .bin could do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pickle code ran"))


# The .safetensors file of each tiny model and the pickle name its library would look for instead.
PICKLE_NAMES = {"target": ("unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin"),
                "clip": ("model.safetensors", "pytorch_model.bin"), "blip": ("model.safetensors", "pytorch_model.bin")}


def _hostile_pickle_folder(src: Path, dst: Path, component: str, marker: Path) -> Path:
    """Copy a model folder, replacing its .safetensors weights by a .bin pickle that carries a payload."""
    weights, pickled = PICKLE_NAMES[component]
    shutil.copytree(src, dst)
    state = load_file(dst / weights)
    (dst / weights).unlink()
    torch.save({"state": state, "payload": _Payload(marker)}, dst / pickled)
    return dst


def _one_line_error(result, *needles):
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert result.exit_code == 1, result.output
    err = [ln for ln in lines if ln.startswith("error: ")]
    assert len(err) == 1 and "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


@pytest.mark.parametrize("component", ["target", "clip", "blip"])
def test_pickle_only_weights_are_refused_without_allow_pickle(tiny_world, tmp_path, component):
    marker = tmp_path / "pwned"
    bad = _hostile_pickle_folder(tiny_world[component], tmp_path / component, component, marker)
    models = {"target": str(tiny_world["target"]), "clip": str(tiny_world["clip"]), "blip": str(tiny_world["blip"])}
    models[component] = str(bad)
    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(data / "a.png")
    (data / "a.txt").write_text("a red square")
    result = CliRunner().invoke(app, ["features", "--target", models["target"], "--embedder", models["clip"],
                                      "--captioner", models["blip"], "--data", str(data), "--out",
                                      str(tmp_path / "s.h5"), "--steps", "2", "--n-gen", "1", "--quiet"])
    err = _one_line_error(result, "--allow-pickle", ".bin")
    assert str(bad) in err
    assert not marker.exists(), "a pickle was unpickled without --allow-pickle"


def test_load_functions_refuse_pickles_too(tiny_world, tmp_path):
    from audit.targets.builtin import load_embedder

    marker = tmp_path / "pwned"
    bad = _hostile_pickle_folder(tiny_world["clip"], tmp_path / "clip", "clip", marker)
    with pytest.raises(UnsafeWeightsError, match=r"pytorch_model\.bin: only pickle weights.*--allow-pickle"):
        load_embedder(str(bad))
    assert not marker.exists()


def test_custom_code_in_a_model_folder_is_never_imported(tiny_world, tmp_path):
    """A pipeline naming a component class from a .py file in its folder: diffusers would import it with
    trust_remote_code; audit never passes that, so the load fails and the module's code does not run."""
    from audit.errors import AuditError
    from audit.targets.builtin import load_target

    marker = tmp_path / "pwned"
    bad = shutil.copytree(tiny_world["target"], tmp_path / "target")
    index = json.loads((bad / "model_index.json").read_text())
    index["unet"] = ["my_unet", "MyUNet"]
    (bad / "model_index.json").write_text(json.dumps(index))
    (bad / "unet" / "my_unet.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('remote code ran')\n"
        "from diffusers import UNet2DConditionModel as MyUNet\n")
    shutil.copy(bad / "unet" / "my_unet.py", bad / "my_unet.py")
    with pytest.raises(AuditError):
        load_target(str(bad))
    assert not marker.exists(), "code from the model folder was executed"


def test_transformers_auto_map_is_ignored(tiny_world, tmp_path):
    from audit.targets.builtin import load_embedder

    marker = tmp_path / "pwned"
    bad = shutil.copytree(tiny_world["clip"], tmp_path / "clip")
    config = json.loads((bad / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.Evil", "AutoConfig": "modeling_evil.EvilConfig"}
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "modeling_evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")
    emb = load_embedder(str(bad))
    assert emb.embed_texts(["a red square"]).shape == (1, emb.dim)
    assert not marker.exists()


def test_no_code_path_enables_remote_code_or_plain_torch_load():
    offenders = []
    for path in AUDIT_SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"trust_remote_code\s*=\s*(?!False)\w+", text):
            offenders.append(f"{path}: {m.group(0)}")
        for m in re.finditer(r"torch\.load\((?![^)]*weights_only\s*=\s*True)[^)]*\)", text):
            context = text[max(0, m.start() - 400):m.start()]
            if "allow_pickle" not in context:  # a full unpickle only behind the user's explicit consent
                offenders.append(f"{path}: {m.group(0)}")
    assert not offenders, offenders


def _other_target(tiny_world, tmp_path) -> Path:
    """The tiny target with one UNet weight changed: same name and architecture, different identity."""
    other = shutil.copytree(tiny_world["target"], tmp_path / "target")
    f = other / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    key = sorted(state)[0]
    state[key] = state[key] + 1e-3
    save_file(state, f)
    return other


@pytest.fixture(scope="module")
def heads(tiny_world, tmp_path_factory):
    from tinyheads import tiny_heads

    return tiny_heads(tiny_world, tmp_path_factory.mktemp("heads"))


def test_heads_and_store_made_for_one_target_refuse_another(tiny_world, heads, tmp_path):
    from audit.features import FeatureStore
    from audit.targets.builtin import load_target

    other = _other_target(tiny_world, tmp_path)
    img = tmp_path / "q.png"
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(img)
    opts = [o if o != heads["kw"]["target"] else str(other) for o in heads["opts"]]
    result = CliRunner().invoke(app, ["check", str(img), "--caption", "a red square", *opts])
    ours = load_target(heads["kw"]["target"]).identity()
    theirs = load_target(str(other)).identity()
    assert ours["hash"] != theirs["hash"]
    err = _one_line_error(result, ours["hash"], theirs["hash"])
    assert "made for target" in err
    with pytest.raises(ArtifactError, match=f"made for target .*{ours['hash']}.*not for .*{theirs['hash']}"):
        FeatureStore.open(heads["store"], target=theirs)


# ------------------------------------------------------------------------------------------------ reports

EVIL = "<script>alert('x')</script>"


def _leaves(doc, path=()):
    """Every (path, value) of a JSON document's leaves and dict keys."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield path + ((k, "key"),), k
            yield from _leaves(v, path + ((k, "value"),))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _leaves(v, path + ((i, "value"),))
    else:
        yield path, doc


def _replaced(doc, path, new):
    """A copy of ``doc`` with the key or value at ``path`` replaced by ``new``."""
    doc = json.loads(json.dumps(doc))
    *parents, (last, kind) = path
    node = doc
    for k, _ in parents:
        node = node[k]
    if kind == "key":
        node[new] = node.pop(last)
    else:
        node[last] = new
    return doc


def _hostile_evaluation() -> dict:
    m = {"accuracy": {"value": 0.8, "ci95": [0.7, 0.9]}, "auc": 0.875, "tpr_at_1pct_fpr": 0.25,
         "tpr_at_0_1pct_fpr": 0.1, "n_test": 40, "tier": "black-box",
         "verdicts": {"decided_fraction": 0.5, "fpr": 0.01, "precision": 0.9, "tpr": 0.3, "miss_rate": 0.1,
                      "counts": {"member": 8, "non-member": 6, "inconclusive": 26}, "member_threshold": 0.7,
                      "nonmember_threshold": 0.2, "n_validation_members": 20, "n_validation_nonmembers": 20}}
    return {"attacks": {"II-S": m, "blind": m}, "default_attack": "II-S", "n_test": 40, "n_test_members": 20,
            "n_test_nonmembers": 20, "target": {"name": "toy", "hash": "abc"}, "warnings": ["w"],
            "decision": {"rule": "budget", "max_fpr": 0.01, "max_miss": None}, "store": "s.h5", "heads": "h"}


def test_markup_in_any_field_of_an_evaluation_json_comes_out_escaped(tmp_path):
    """Each key and each value of an evaluation JSON, one at a time (a count, a threshold, a name, a path)
    replaced by a script, then all values at once: the report is written and holds no live markup."""
    ev = _hostile_evaluation()
    docs = [_replaced(ev, path, EVIL) for path, _ in _leaves(ev)]
    docs.append(json.loads(json.dumps(ev), parse_float=lambda _: EVIL, parse_int=lambda _: EVIL))
    pages = {}
    for i, doc in enumerate(docs):
        (tmp_path / "e.json").write_text(json.dumps(doc))
        out = tmp_path / f"e{i}.html"
        result = CliRunner().invoke(app, ["report", str(tmp_path / "e.json"), "--out", str(out)])
        assert result.exit_code == 0, (doc, result.output)
        page = out.read_text()
        assert "<script" not in page, doc
        pages[json.dumps(doc)] = page
    for path in ((("attacks", "value"), ("II-S", "value"), ("verdicts", "value"), ("counts", "value"),
                  ("member", "value")), (("n_test", "value"),), (("attacks", "value"), ("II-S", "value"),
                  ("tier", "value")), (("attacks", "value"), ("II-S", "key")), (("store", "value"),),
                 (("warnings", "value"), (0, "value")), (("target", "value"), ("hash", "value"))):
        assert "&lt;script&gt;" in pages[json.dumps(_replaced(ev, path, EVIL))], path  # shown, as text


def _scan_rows(tmp_path, n=4):
    rows = []
    for i in range(n):
        p = i / (n - 1)
        rows.append({"id": f"q{i}.png", "image": str(tmp_path / f"q{i}.png"), "caption": f"caption {i}",
                     "target": "toy", "status": "ok", "verdict": "member" if p >= 0.5 else "non-member",
                     "probability": p, "threshold": 0.5, "attack": "IV", "tier": "black-box", "heads": "/h",
                     "scores": {"IV": {"probability": p, "threshold": 0.5}}, "warnings": ["w"], "error": None,
                     "decision": {"rule": "budget", "max_fpr": 0.01, "max_miss": None,
                                  "nonmember_threshold": 0.2}})
    rows.append({"id": "bad.png", "image": "bad.png", "status": "unreadable", "verdict": None,
                 "probability": None, "error": "bad.png: empty file"})
    return rows


def test_markup_in_any_field_of_scan_results_comes_out_escaped(tmp_path):
    rows = _scan_rows(tmp_path)
    keep = {"status", "probability"}  # so that the charts and gallery are drawn from the hostile rows too
    variants = [
        [json.loads(json.dumps(r), parse_float=lambda _: EVIL, parse_int=lambda _: EVIL) for r in rows],
        [{k: (v if k in keep else _evil_everywhere(v)) for k, v in r.items()} for r in rows],
        [{(k if k in keep else k + EVIL): v for k, v in r.items()} | {"id": EVIL + r["id"]} for r in rows],
    ]
    for i, variant in enumerate(variants):
        results = tmp_path / f"r{i}.jsonl"
        results.write_text("".join(json.dumps(r) + "\n" for r in variant))
        out = tmp_path / f"r{i}.html"
        result = CliRunner().invoke(app, ["report", str(results), "--out", str(out)])
        assert result.exit_code == 0, result.output
        page = out.read_text()
        assert "<script" not in page and ("&lt;script&gt;" in page or i == 0), i
        from markupsafe import escape

        assert all(str(escape(r["id"])) in page for r in variant if "id" in r)  # every row, scored or not


def _evil_everywhere(value):
    if isinstance(value, dict):
        return {EVIL + str(k): _evil_everywhere(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_evil_everywhere(v) for v in value]
    return EVIL


def test_a_scan_report_embeds_only_images_under_the_scanned_folder(tmp_path):
    import base64
    import io
    import re

    from PIL import Image

    folder, outside = tmp_path / "scanned", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "inside.png")
    Image.new("RGB", (41, 29), (10, 200, 10)).save(outside / "secret.png")
    os.symlink(outside / "secret.png", folder / "link.png")
    os.symlink(outside, folder / "linked_dir")
    os.mkfifo(folder / "fifo.png")
    ids = ["inside.png", "../outside/secret.png", str(outside / "secret.png"), "link.png",
           "linked_dir/secret.png", "fifo.png", "sub/../../outside/secret.png", "absent.png"]  # 8: all in the gallery
    rows = [{"id": rid, "image": str(outside / "secret.png"), "status": "ok", "verdict": "non-member",
             "probability": i / 10, "attack": "IV", "caption": "c"} for i, rid in enumerate(ids)]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for images in ([], ["--images", str(folder)]):
        out = tmp_path / f"r{len(images)}.html"
        result = CliRunner().invoke(app, ["report", str(tmp_path / "r.jsonl"), "--out", str(out), *images],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        page = out.read_text()
        sizes = [Image.open(io.BytesIO(base64.b64decode(b))).size
                 for b in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)]
        thumbs = [s for s in sizes if max(s) <= 128]
        assert (41, 29) not in thumbs, "an image outside the scanned folder was embedded"
        assert thumbs == ([(40, 30)] if images else []), thumbs
        assert page.count("not embedded") == len(ids) - len(thumbs)


# ------------------------------------------------------------------------------------------ hostile artifacts
# A feature store, a heads folder and an export folder are files passed between people: each is checked against
# its schema with bounds before anything is allocated, opened or trusted, and refused in one line naming it.


BUNDLED_HEADS = AUDIT_SRC / "toy" / "bundle" / "heads"
G, P, D = 1, 8, 4


def _store(path: Path, rows: int = 4) -> Path:
    """A small valid feature store (black-box, ``rows`` rows, half members), made through the writer."""
    from audit.features.store import FeatureWriter, empty_batch

    manifest = make_manifest("features", {"n_gen": G}, {"name": "t", "hash": "abc"}, n_rows=rows, rows_hash="r")
    w = FeatureWriter.create(path, manifest, G, P, D)
    b = empty_batch(rows, G, P, D)
    b["ids"][:] = [f"i{i}" for i in range(rows)]
    b["status"][:] = "ok"
    b["member"][:] = [i % 2 for i in range(rows)]
    w.append(b)
    return path


def _replace(path: Path, key: str, shape, dtype=np.uint8, **kw) -> None:
    with h5py.File(path, "a") as f:
        del f[key]
        f.create_dataset(key, shape=shape, dtype=dtype, chunks=tuple(min(s, 64) or 1 for s in shape),
                         compression="gzip", **kw)


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_a_store_declaring_a_447_gib_dataset_is_refused_in_one_line_before_allocating(tmp_path):
    store = _store(tmp_path / "bomb.h5")
    _replace(store, "query_pixels", (4, 200000, 200000, 3))
    assert store.stat().st_size < 64 * 1024  # the whole "447 GiB" in a few KiB
    before, started = _peak_kib(), time.monotonic()
    for args in (["train", str(store), "--out", str(tmp_path / "heads")],
                 ["evaluate", str(store), "--heads", str(BUNDLED_HEADS)]):
        err = _one_line_error(CliRunner().invoke(app, args), str(store), "query_pixels", "(4, 200000, 200000, 3)")
        assert "pixel_size must be in [1, 1024]" in err
    assert _peak_kib() - before < 100 * 1024 and time.monotonic() - started < 20
    assert not (tmp_path / "heads").exists()


@pytest.mark.parametrize("damage, needle", [
    (lambda p: _replace(p, "gen_pixels", (4, 1, 8, 8, 3), np.float64), "expected uint8"),
    (lambda p: _replace(p, "query_img_emb", (4, 5), np.float32), "expected float32 (rows, 5)"),
    (lambda p: _replace(p, "gen_img_emb", (4, 100000, 4), np.float32), "n_gen must be in [1, 1024]"),
    (lambda p: _replace(p, "member", (4, 2), np.int8), "expected int8 (rows,)"),
    (lambda p: _replace(p, "ids", (4,), np.int64), "expected text"),
    (lambda p: _replace(p, "status", (2,), h5py.string_dtype()), "fewer rows than the 4 committed"),
    (lambda p: _replace(p, "caption", (10**9,), h5py.string_dtype()), "declares 1000000000 rows"),
    (lambda p: _set_attr(p, "n_committed", 10**12), "n_committed 1000000000000"),
    (lambda p: _set_attr(p, "n_committed", -1), "n_committed -1"),
    (lambda p: _set_attr(p, "n_committed", "four"), "n_committed"),
    (lambda p: _set_manifest(p, n_rows=2), "not an integer in [0, 2]"),
    (lambda p: _set_manifest(p, n_rows=-3), "n_rows"),
    (lambda p: _set_manifest(p, tiers="black-box"), "tiers"),
    (lambda p: _set_manifest(p, target="someone"), "target is not an object"),
    (lambda p: _set_attr(p, "manifest", "[" * 100000), "nested too deeply"),
    (lambda p: _set_attr(p, "manifest", "[1, 2]"), "not an object"),
    (lambda p: _group(p, "member"), "not a dataset"),
])
def test_a_damaged_store_is_refused_in_one_line(tmp_path, damage, needle):
    from audit.features import FeatureStore

    store = _store(tmp_path / "s.h5")
    damage(store)
    with pytest.raises(ArtifactError) as err:
        FeatureStore.open(store).read()
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def _set_attr(path, name, value):
    with h5py.File(path, "a") as f:
        f.attrs[name] = value


def _set_manifest(path, **fields):
    with h5py.File(path, "a") as f:
        f.attrs["manifest"] = json.dumps({**json.loads(f.attrs["manifest"]), **fields})


def _group(path, key):
    with h5py.File(path, "a") as f:
        del f[key]
        f.create_group(key)


def test_a_read_larger_than_memory_is_refused_before_allocating(tmp_path, monkeypatch):
    """Within the per-row bounds a store can still be too big to read: counted against the memory available."""
    from audit.features import FeatureStore
    import audit.runtime.memory as memory

    store = _store(tmp_path / "s.h5", rows=64)
    monkeypatch.setattr(memory, "available_bytes", lambda: 4096)
    with pytest.raises(ArtifactError, match="reading its 64 rows needs .* GiB, more than the 0.0 GiB"):
        FeatureStore.open(store).read()


def test_the_valid_store_reads(tmp_path):
    """The control for the refusals above: the same store undamaged opens and reads."""
    from audit.features import FeatureStore

    got = FeatureStore.open(_store(tmp_path / "s.h5")).read()
    assert got["query_pixels"].shape == (4, P, P, 3) and list(got["member"]) == [0, 1, 0, 1]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(["query_pixels", "gen_pixels", "query_img_emb", "gen_img_emb", "member", "ids"]),
       st.lists(st.integers(0, 10**6), min_size=0, max_size=5),
       st.sampled_from([np.uint8, np.int8, np.float32, np.float64]))
def test_any_declared_shape_opens_consistently_or_is_refused(tmp_path_factory, key, shape, dtype):
    """Whatever shape and dtype a dataset declares, open() either refuses it (ArtifactError) or returns a store
    whose every dataset has the layout's shape; nothing else is raised and nothing large is allocated."""
    from audit.features import FeatureStore
    from audit.features.store import row_shapes

    store = _store(tmp_path_factory.mktemp("prop") / "s.h5")
    with h5py.File(store, "a") as f:
        del f[key]
        try:
            f.create_dataset(key, shape=tuple(shape), dtype=dtype)  # contiguous, unwritten: nothing on disk
        except ValueError:  # beyond what HDF5 itself can declare (its storage size overflows)
            return
    try:
        fs = FeatureStore.open(store)
    except ArtifactError as exc:
        assert "\n" not in str(exc)
        return
    layout = row_shapes(fs.n_gen, fs.pixel_size, fs.dim)
    assert all(tuple(fs._shapes[k][1:]) == layout[k][0] for k in layout)


# ---------------------------------------------------------------------------------------------- heads.json

def _heads_copy(tmp_path: Path, edit=None) -> Path:
    folder = shutil.copytree(BUNDLED_HEADS, tmp_path / "heads")
    if edit is not None:
        info = json.loads((folder / "heads.json").read_text())
        edit(info)
        (folder / "heads.json").write_text(json.dumps(info))
    return folder


def _entry(info):
    return info["attacks"]["IV"]


@pytest.mark.parametrize("edit, needle", [
    (lambda i: _entry(i).update(file="/etc/passwd"), "not a plain file name"),
    (lambda i: _entry(i).update(file="../heads/IV.onnx"), "not a plain file name"),
    (lambda i: _entry(i).update(file="sub/IV.onnx"), "not a plain file name"),
    (lambda i: _entry(i).update(file=".."), "not a plain file name"),
    (lambda i: _entry(i).update(file=""), "not a plain file name"),
    (lambda i: _entry(i).update(file=7), "attacks.IV.file is 7"),
    (lambda i: _entry(i).update(threshold="high"), "attacks.IV.threshold is 'high'"),
    (lambda i: _entry(i).update(threshold=float("nan")), "threshold"),
    (lambda i: _entry(i).update(threshold=3.0), "a probability in [0, 1]"),
    (lambda i: _entry(i).update(sha256=["x"]), "64 hex digits"),
    (lambda i: _entry(i).update(tier="white-box"), "attacks.IV.tier"),
    (lambda i: _entry(i).update(input={"shape": "big"}), "input.shape"),
    (lambda i: _entry(i).update(input={"shape": [None, 10**12]}), "input.shape"),
    (lambda i: _entry(i)["validation_probabilities"].update(members="all"), "validation_probabilities.members"),
    (lambda i: _entry(i)["validation_probabilities"].update(members=[0.5, None]), "a list of probabilities"),
    (lambda i: i["attacks"].update({"V": _entry(i)}), "attack name is 'V'"),
    (lambda i: i.update(attacks=[]), "no manifest/attacks"),
    (lambda i: i.update(attacks={}), "1 to 64 attacks"),
    (lambda i: i.update(default_attack="nope"), "default_attack"),
    (lambda i: i.update(default_attack=["IV"]), "default_attack"),
    (lambda i: i.update(input_signature={"n_gen": "two"}), "input_signature"),
    (lambda i: i.update(blind_baseline=[1]), "blind_baseline"),
    (lambda i: i.update(split="all"), "split"),
    (lambda i: i["manifest"].update(embedder="clip"), "manifest.embedder"),
    (lambda i: i.update(manifest=[]), "no manifest/attacks"),
])
def test_malformed_heads_json_is_refused_in_one_line(tmp_path, edit, needle):
    from audit.attacks import load_heads

    folder = _heads_copy(tmp_path, edit)
    with pytest.raises(ArtifactError) as err:
        load_heads(folder)
    assert needle in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_head_files_must_be_regular_files_inside_the_folder(tmp_path):
    from audit.attacks import load_heads

    outside = tmp_path / "outside.onnx"
    shutil.copy(BUNDLED_HEADS / "IV.onnx", outside)
    folder = _heads_copy(tmp_path)
    (folder / "IV.onnx").unlink()
    (folder / "IV.onnx").symlink_to(outside)  # same bytes, same sha256: only the link gives it away
    with pytest.raises(ArtifactError, match="IV.onnx: head of attack IV is a symlink"):
        load_heads(folder)
    (folder / "IV.onnx").unlink()
    (folder / "IV.onnx").mkdir()
    with pytest.raises(ArtifactError, match="not a regular file"):
        load_heads(folder)


def test_heads_json_nested_or_huge_is_refused_without_reading_it_all(tmp_path, monkeypatch):
    from audit.attacks import load_heads
    import audit.attacks.heads as heads_module

    folder = _heads_copy(tmp_path)
    (folder / "heads.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ArtifactError, match="not a heads file"):
        load_heads(folder)
    monkeypatch.setattr(heads_module, "MAX_HEADS_JSON_BYTES", 1000)
    (folder / "heads.json").write_text(" " * 2000)
    with pytest.raises(ArtifactError, match="2000 bytes, over the 1000"):
        load_heads(folder)


def test_the_bundled_heads_pass_the_schema(tmp_path):
    from audit.attacks import load_heads

    heads = load_heads(_heads_copy(tmp_path))
    assert heads.default_attack in heads.attacks and len(heads.attacks) >= 7


_values = st.none() | st.booleans() | st.integers(-10**15, 10**15) | st.floats() | st.text(max_size=12) \
    | st.lists(st.integers(0, 3), max_size=3)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["file", "threshold", "sha256", "tier", "input", "validation_probabilities", "thresholds"]),
       _values)
def test_any_value_of_a_heads_field_loads_or_is_refused_in_one_line(tmp_path_factory, field, value):
    from audit.attacks import load_heads

    folder = _heads_copy(tmp_path_factory.mktemp("h"), lambda i: _entry(i).update({field: value}))
    try:
        heads = load_heads(folder)
    except ArtifactError as exc:
        assert "\n" not in str(exc)
        return
    # Whatever was accepted is usable as the code uses it.
    assert 0 <= heads.threshold("IV") <= 1 and heads.decision("IV").attack == "IV"
    assert (folder / _entry(heads.info)["file"]).resolve().parent == folder.resolve()


# ------------------------------------------------------------------------------------------ ONNX external data

def _graph_with_external_data(path: Path, location: str) -> Path:
    """y = x + w, with w's 4 floats stored as external data at ``location`` (relative to the graph's folder)."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones(4, np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["{outside}", "../outside/secret.bin", "link.bin", "sub/../../outside/secret.bin"])
def test_onnx_external_data_outside_the_graphs_folder_is_refused(tmp_path, location):
    """A head or an exported graph naming external data outside its folder is refused by onnxruntime (>= 1.24.1,
    the minimum in pyproject.toml: 1.23.2 reads the file) as a one-line ArtifactError; the data is never read."""
    import onnxruntime

    from audit.attacks.export import ort_session
    from audit.runtime.session import Graph

    assert tuple(map(int, onnxruntime.__version__.split(".")[:3])) >= (1, 24, 1)
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret.bin"
    secret.write_bytes(np.full(4, 7, np.float32).tobytes())
    folder = tmp_path / "graphs"
    folder.mkdir()
    (folder / "ok.bin").write_bytes(np.full(4, 2, np.float32).tobytes())
    (folder / "link.bin").symlink_to(secret)
    good = _graph_with_external_data(folder / "good.onnx", "ok.bin")
    assert list(Graph(good).run(x=np.zeros(4, np.float32)).values())[0].tolist() == [2.0] * 4  # the control
    bad = _graph_with_external_data(folder / "bad.onnx", location.format(outside=secret))
    for load in (ort_session, Graph):
        with pytest.raises(ArtifactError) as err:
            load(bad)
        assert str(bad) in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------ export folder identity

TOY = {"name": "toy", "hash": json.loads((BUNDLED_HEADS / "heads.json").read_text())["manifest"]["target"]["hash"]}


def _export_folder(folder: Path, identity: dict = TOY) -> Path:
    """An export component folder written by export's own metadata writer: a graph with its external data, a
    tokenizer file, and the export.json / manifest.json that `audit export` writes (content hash included)."""
    from audit.export.components import ExportConfig, _write_component

    folder.mkdir(parents=True)
    (folder / "g.bin").write_bytes(np.full(4, 2, np.float32).tobytes())
    _graph_with_external_data(folder / "g.onnx", "g.bin")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.txt").write_text("a b c")
    _write_component(folder, "target", ExportConfig(), identity, identity,
                     {"family": "diffusion", "graphs": {"unet": {"file": "g.onnx"}}, "settings": {}})
    return folder


def test_an_export_keeps_its_sources_identity_only_while_its_content_is_unchanged(tmp_path, monkeypatch):
    import os

    import audit.manifest as manifest_module
    from audit.attacks.heads import find_heads
    from audit.runtime.folder import ExportFolder

    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))
    folder = _export_folder(tmp_path / "export")
    assert ExportFolder(folder).identity == TOY and find_heads(TOY) is not None  # the bundled toy heads
    # The content hash is cached: loading again reads no file in full.
    reads = []
    real = manifest_module._hash_files
    monkeypatch.setattr(manifest_module, "_hash_files", lambda *a: reads.append(a) or real(*a))
    assert ExportFolder(folder).identity == TOY and reads == []
    # One byte of a graph's weights changed in place, mtime put back: no longer the toy, no inherited heads.
    stat = (folder / "g.bin").stat()
    data = bytearray((folder / "g.bin").read_bytes())
    data[0] ^= 1
    (folder / "g.bin").write_bytes(bytes(data))
    os.utime(folder / "g.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited = ExportFolder(folder).identity
    assert edited["hash"] != TOY["hash"] and edited["name"] == "toy (edited export)" and len(reads) == 1
    assert find_heads(edited) is None
    with pytest.raises(ArtifactError, match="made for target 'toy'"):
        from audit.attacks import load_heads

        load_heads(BUNDLED_HEADS, target=edited)
    # Metadata alone is not content: export.json may be rewritten (say, to drop a graph) without losing it, but
    # dropping the recorded hash (an older export, or a forged one) gives an identity from the content again.
    fresh = _export_folder(tmp_path / "fresh")
    info = json.loads((fresh / "export.json").read_text())
    info["settings"] = {"note": "rewritten"}
    (fresh / "export.json").write_text(json.dumps(info))
    assert ExportFolder(fresh).identity == TOY
    del info["content_sha256"]
    (fresh / "export.json").write_text(json.dumps(info))
    assert ExportFolder(fresh).identity["hash"] != TOY["hash"]


@pytest.mark.parametrize("field, value", [("graphs", {"unet": {"file": "/etc/passwd"}}),
                                          ("graphs", {"unet": {"file": "../outside/g.onnx"}}),
                                          ("graphs", {"unet": "g.onnx"}), ("graphs", ["g.onnx"]),
                                          ("components", {"target": {"path": "../.."}}), ("identity", "toy"),
                                          ("identity", {"name": "toy", "hash": 7}), ("component", "weights")])
def test_export_json_paths_and_fields_are_checked_before_use(tmp_path, field, value):
    from audit.runtime.folder import ExportFolder

    folder = _export_folder(tmp_path / "export")
    info = json.loads((folder / "export.json").read_text())
    info[field] = value
    (folder / "export.json").write_text(json.dumps(info))
    with pytest.raises(ArtifactError) as err:
        ExportFolder(folder).identity  # noqa: B018
    assert "export.json" in str(err.value) and "\n" not in str(err.value)


def test_a_folder_laid_out_like_a_hub_snapshot_is_identified_by_its_bytes(tmp_path, monkeypatch):
    """Only a snapshot in the local hub cache is identified by its commit; the same layout anywhere else (an
    unpacked archive, a folder someone sent) by hashing its weights."""
    import huggingface_hub.constants

    from audit.manifest import weights_hash
    from audit.hub import model_hash

    def snapshot(root: Path) -> Path:
        folder = root / "models--CompVis--ldm-text2im-large-256" / "snapshots" / "abc123"
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"not the real weights")
        return folder

    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    planted = snapshot(tmp_path / "elsewhere")
    cached = snapshot(tmp_path / "hub")
    assert model_hash(planted) == weights_hash(planted)
    assert model_hash(cached) != weights_hash(cached)  # the commit: what hf download fetched and checked


def test_special_files_in_place_of_artifacts_are_refused_without_blocking(tmp_path):
    """A FIFO named like a store, a heads.json or an export.json would block a reader forever."""
    import os

    from audit.attacks import load_heads
    from audit.features import FeatureStore
    from audit.runtime.folder import ExportFolder

    os.mkfifo(tmp_path / "store.h5")
    with pytest.raises(ArtifactError, match="store.h5: not a regular file"):
        FeatureStore.open(tmp_path / "store.h5")
    (tmp_path / "heads").mkdir()
    os.mkfifo(tmp_path / "heads" / "heads.json")
    with pytest.raises(ArtifactError, match="heads.json: not a regular file"):
        load_heads(tmp_path / "heads")
    folder = _export_folder(tmp_path / "export")
    (folder / "export.json").unlink()
    os.mkfifo(folder / "export.json")
    with pytest.raises(ArtifactError, match="export.json: not a regular file"):
        ExportFolder(folder)


def test_a_bundle_is_identified_as_its_checked_target(tmp_path, monkeypatch):
    from audit.export.components import ExportConfig, _write_component
    from audit.runtime.folder import ExportFolder

    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))
    root = tmp_path / "bundle"
    _export_folder(root / "target")
    _write_component(root, "bundle", ExportConfig(), TOY, TOY, {"components": {"target": {"path": "target",
                                                                                          "identity": TOY}}})
    assert ExportFolder(root).identity == TOY
    (root / "target" / "tokenizer" / "vocab.txt").write_text("a b c d")
    assert ExportFolder(root).identity["hash"] != TOY["hash"]
