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
