import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
if "AUDIT_HOME" not in os.environ:
    # The machine's own registry, logs and caches (~/.cache/audit) never decide a test: each session gets a home.
    import tempfile

    os.environ["AUDIT_HOME"] = tempfile.mkdtemp(prefix="audit-home-")

import pytest
import torch

# Two cores: fix thread counts so tests neither oversubscribe nor depend on the machine's default.
torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """The one slow-test switch: tests marked ``slow`` (minutes each: the full demo, a toy rebuild, full-size
    exports) run only with AUDIT_SLOW=1."""
    if os.environ.get("AUDIT_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow: set AUDIT_SLOW=1 to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray cluster on this machine for every test that needs one (a start costs seconds): a head that holds
    the drivers and the read step but no CPUs for workers, and two worker nodes of 2 CPUs. This process is
    connected to it; subprocesses connect with ``--ray ADDRESS``. Shut down by its own handle, never `ray stop`."""
    import logging

    import ray
    from ray.cluster_utils import Cluster

    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    store = 96 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": store})
    for _ in range(2):
        cluster.add_node(num_cpus=2, object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
    cluster.node_args = {"num_cpus": 2, "object_store_memory": store}  # for tests that replace a node they removed
    yield cluster
    ray.shutdown()
    cluster.shutdown()
