"""`audit toy build --quick` rebuilds a whole toy world from a seed through the CLI, members memorised.

At the quick scale (512 public scenes, 8 members, a few hundred steps on CPU) the target memorises its members
only when fine-tuned on the noisier timesteps (t >= 300), where the caption must say which image it was: AUC 1.00
measured, against 0.26-0.59 for fine-tuning on every timestep. The default suite re-measures the shipped bundle
(tests/test_toy_bundle.py); this test takes minutes on two cores and runs with AUDIT_SLOW=1.
"""

import json

import pytest
from typer.testing import CliRunner

from audit.cli import app


@pytest.mark.slow
def test_quick_build_writes_a_loadable_measured_world(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "world"
    result = CliRunner().invoke(app, ["toy", "build", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    world = json.loads((out / "world.json").read_text())
    gap = world["metrics"]["membership_gap"]
    assert gap["n_members"] == 8 and gap["auc"] >= 0.9
    assert gap["member_mse_mean"] < 0.5 * gap["nonmember_mse_mean"]
    assert world["metrics"]["clip_text_to_image_top1_heldout"] > 5 * world["metrics"]["clip_top1_chance"]
    pipe = StableDiffusionPipeline.from_pretrained(out / "target")
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the trained VAE's latents
