import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest
import torch

# Two cores: fix thread counts so tests neither oversubscribe nor depend on the machine's default.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """Seeded, untrained tiny target/CLIP/BLIP of the real architectures, saved and loadable with from_pretrained."""
    from audit.toy.models import build_untrained_world

    return build_untrained_world(tmp_path_factory.mktemp("tiny_world"), seed=0)


@pytest.fixture(scope="session")
def tiny_export(tiny_world, tmp_path_factory):
    """`audit export` (through the CLI) of the tiny_world target/CLIP/BLIP, once per session: tracing the seven
    graphs takes minutes on two cores."""
    import json

    from typer.testing import CliRunner

    from audit.cli import app

    out = tmp_path_factory.mktemp("tiny_export") / "export"
    result = CliRunner().invoke(app, ["export", "--target", str(tiny_world["target"]), "--embedder",
                                      str(tiny_world["clip"]), "--captioner", str(tiny_world["blip"]), "--out", str(out)],
                                env={"AUDIT_PROGRESS": "1"})
    assert result.exit_code == 0, result.output
    return {"path": out, "info": json.loads((out / "export.json").read_text()), "output": result.stdout,
            "stderr": result.stderr}
