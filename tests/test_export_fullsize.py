"""Full-size SD-1.5 (random weights, the published architecture: audit.testing.fullsize) through `audit export` and
`audit features` on both paths. Slow: builds ~4.7 GB of models once (cached in $AUDIT_HOME), exports for 10-20
minutes, needs ~12 GB of free memory:

    AUDIT_SLOW=1 python -m pytest -q tests/test_export_fullsize.py
"""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from audit.cli import app

pytestmark = pytest.mark.slow  # exports full-size SD-1.5: 10-20 minutes, ~12 GB


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from audit.testing import fullsize

    world = fullsize.world("sd-1.5")
    out = tmp_path_factory.mktemp("sd15") / "export"
    r = CliRunner().invoke(app, ["export", "--target", str(world["target"]), "--embedder", str(world["embedder"]),
                                 "--captioner", str(world["captioner"]), "--out", str(out), "-q"])
    assert r.exit_code == 0, r.output
    return world, out


def test_graphs_over_2gb_validate_load_and_are_hashed(sd):
    from audit.manifest import file_sha256
    from audit.manifest import weights_hash
    from audit.runtime import OnnxGenerator

    _, out = sd
    unet = json.loads((out / "target" / "export.json").read_text())["graphs"]["unet"]
    assert set(unet["files"]) == {"unet.onnx", "unet.onnx.data"}
    assert (out / "target" / "unet.onnx.data").stat().st_size > 2**31
    for name, digest in unet["files"].items():
        assert file_sha256(out / "target" / name) == digest
    assert unet["validation"]["passed"] and unet["memory"]["per_item_mib"] > 0
    # The external data is part of the folder's identity hash, as any weights file.
    before = weights_hash(out / "target")
    with open(out / "target" / "unet.onnx.data", "r+b") as fh:
        fh.seek(2**31)
        byte = fh.read(1)
        fh.seek(2**31)
        fh.write(bytes([byte[0] ^ 1]))
    try:
        assert weights_hash(out / "target") != before
    finally:
        with open(out / "target" / "unet.onnx.data", "r+b") as fh:
            fh.seek(2**31)
            fh.write(byte)
    g = OnnxGenerator(out)
    assert g.resolution == 512 and g.decode_rows() == 1


def test_one_query_featurises_equally_on_both_paths(sd, tmp_path):
    from audit import api
    from audit.export.components import _END_TO_END, _probe_images
    from audit.features import FeatureStore
    from audit.toy import scenes

    world, out = sd
    data = scenes.write_imagefolder(tmp_path / "data", _probe_images(512, 1), ["a red bus on a city street"],
                                    [True])
    settings = dict(n_gen=1, steps=2, batch_size=1, caption_tokens=8, quiet=True)
    api.featurize(str(world["target"]), data, tmp_path / "torch.h5", embedder=str(world["embedder"]),
                  captioner=str(world["captioner"]), **settings)
    api.featurize(str(out), data, tmp_path / "onnx.h5", **settings)
    a, b = FeatureStore.open(tmp_path / "torch.h5").read(), FeatureStore.open(tmp_path / "onnx.h5").read()
    assert list(a["status"]) == list(b["status"]) == ["ok"]
    limits = _END_TO_END["fp32"]  # what `audit export` itself demands of an fp32 export end to end
    diff = np.abs(a["gen_pixels"].astype(int) - b["gen_pixels"].astype(int))
    assert diff.max() <= limits["image_max"] and diff.mean() <= limits["image_mean"]
    for key in ("query_img_emb", "gen_img_emb", "caption_emb"):
        assert np.abs(a[key] - b[key]).max() <= limits["embedding"], key
    assert list(a["gen_captions"].ravel()) == list(b["gen_captions"].ravel())
