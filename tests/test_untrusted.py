"""Untrusted artifacts: no pickle and no remote code by default; artifacts made for one target refuse another.

The hostile files here do something observable (write a marker file) when they are executed, so "refused" means
the marker never appears, not only that an error was raised.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from audit.cli import app
from audit.errors import ArtifactError, UnsafeWeightsError

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
