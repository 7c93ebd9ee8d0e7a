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


def _tiny_build_config():
    from audit.toy.build import ToyBuildConfig
    from audit.toy.models import ToyModelSizes

    return ToyBuildConfig(
        seed=3, n_public=24, n_members=4, n_nonmembers=4, n_heldout=8, vae_steps=2, vae_batch=8, pretrain_steps=3,
        pretrain_batch=8, finetune_steps=3, finetune_batch=4, clip_steps=1, clip_batch=8, blip_steps=1,
        blip_batch=8, eval_steps=2,
        sizes=ToyModelSizes(unet_channels=(16, 32), vae_channels=(16, 16, 16), clip_layers=1).to_dict())


def test_the_base_model_is_the_pretraining_stage_and_regenerates_bit_for_bit(tmp_path):
    """A build writes base/ (the target after public pre-training, before fine-tuning); re-running the pre-training
    stage on the same kind of device gives the same weights, and the fine-tune recipe started from base/ gives the
    target's weights: what `toy-base` is."""
    import torch

    from audit.targets.diffusion import load_pipeline
    from audit.toy.build import build_world, rebuild_base, split_data
    from audit.toy.train import encode_latents, train_denoiser

    cfg = _tiny_build_config()
    build_world(tmp_path / "world", cfg)
    base, target = load_pipeline(tmp_path / "world" / "base"), load_pipeline(tmp_path / "world" / "target")
    assert json.loads((tmp_path / "world" / "base" / "base.json").read_text())["made_by"] == "build_world"
    rebuild_base(tmp_path / "world", tmp_path / "again")
    again = load_pipeline(tmp_path / "again")
    for part in ("unet", "text_encoder", "vae"):
        sa, sb = getattr(base, part).state_dict(), getattr(again, part).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
    assert not torch.equal(base.unet.conv_in.weight, target.unet.conv_in.weight)
    images, captions = split_data(cfg, "members")
    train_denoiser(base, encode_latents(base.vae, images, "cpu"), captions, cfg.finetune_steps, cfg.finetune_batch,
                   cfg.finetune_lr, cfg.seed + 2, "cpu", phase="finetune", t_min=cfg.finetune_t_min)
    for part in ("unet", "text_encoder"):
        sa, sb = getattr(base, part).state_dict(), getattr(target, part).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part
