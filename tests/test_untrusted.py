"""Untrusted artifacts: no pickle and no remote code by default; artifacts made for one target refuse another.

The hostile files here do something observable (write a marker file) when they are executed, so "refused" means
the marker never appears, not only that an error was raised.
"""

from __future__ import annotations

import json
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
