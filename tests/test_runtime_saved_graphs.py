"""onnxruntime's optimised graphs saved under $AUDIT_HOME and loaded, unoptimised, on the next start."""

import json

import numpy as np
import pytest

from audit.errors import UsageError
from audit.runtime import optimized, session
from audit.runtime.session import Graph, RuntimeOptions


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("AUDIT_SAVED_GRAPHS", raising=False)
    return tmp_path / "home"


def _conv_graph(path, one_file: bool = True):
    """Conv -> Relu -> Conv + bias, weights in path.data: onnxruntime rewrites it (NCHWc layout, fused Relu)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from audit.kernels._impls import make_model

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 8, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((8, 16, 3, 3)).astype(np.float32), "w2")
    b = numpy_helper.from_array(rng.standard_normal((1, 8, 1, 1)).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["c", "b"], ["y"])]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 16, 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 16, 16])], [w1, w2, b],
                       name="g")
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=one_file,
              location=path.name + ".data", size_threshold=0)
    return path


def _opened(monkeypatch) -> list:
    paths = []
    real = session._open

    def spy(path, so, providers):
        paths.append((path, so.graph_optimization_level))
        return real(path, so, providers)

    monkeypatch.setattr(session, "_open", spy)
    return paths


def _entries(home):
    root = home / "ort-optimized"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []


def test_second_load_uses_the_saved_graph_with_identical_outputs(home, tmp_path, monkeypatch):
    import onnxruntime as ort

    path = _conv_graph(tmp_path / "conv.onnx")
    x = np.random.default_rng(1).standard_normal((2, 8, 16, 16)).astype(np.float32)
    opened = _opened(monkeypatch)
    options = RuntimeOptions(intra_op_threads=1, save_above_mib=0)
    first = Graph(path, options).run(x=x)["y"]
    [entry] = _entries(home)
    assert opened == [(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)]
    assert {p.name for p in entry.iterdir()} == {"graph.onnx", "graph.onnx.data", "saved.json"}
    second = Graph(path, options).run(x=x)["y"]
    assert opened[1] == (entry / "graph.onnx", ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    np.testing.assert_array_equal(first, second)
    cold = Graph(path, RuntimeOptions(intra_op_threads=1, saved_graphs=False)).run(x=x)["y"]
    assert opened[2] == (path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    np.testing.assert_array_equal(first, cold)
    # Another source graph (other weights) gets its own entry, never the first one's.
    data = tmp_path / "conv.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[0] ^= 0xFF
    data.write_bytes(bytes(raw))
    Graph(path, options)
    assert len(_entries(home)) == 2 and opened[3][0] == path


def test_a_tampered_saved_graph_is_rebuilt_never_loaded(home, tmp_path, monkeypatch):
    path = _conv_graph(tmp_path / "conv.onnx")
    x = np.random.default_rng(1).standard_normal((1, 8, 16, 16)).astype(np.float32)
    options = RuntimeOptions(intra_op_threads=1, save_above_mib=0)
    want = Graph(path, options).run(x=x)["y"]
    [entry] = _entries(home)
    opened = _opened(monkeypatch)

    data = entry / "graph.onnx.data"  # weights edited in place
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    np.testing.assert_array_equal(Graph(path, options).run(x=x)["y"], want)
    assert opened == [(path, opened[0][1])] and optimized.valid(entry)

    # A graph whose weights point outside its entry, even with matching recorded hashes, is refused.
    import onnx

    outside = tmp_path / "elsewhere.data"
    outside.write_bytes(data.read_bytes())
    model = onnx.load(str(entry / "graph.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../../elsewhere.data"
    onnx.save(model, str(entry / "graph.onnx"))
    meta = json.loads((entry / "saved.json").read_text())
    meta["files"]["graph.onnx"] = optimized.file_sha256(entry / "graph.onnx")
    (entry / "saved.json").write_text(json.dumps(meta))
    assert not optimized.valid(entry)
    np.testing.assert_array_equal(Graph(path, options).run(x=x)["y"], want)
    assert opened[1][0] == path and optimized.valid(entry)

    # An extra file, or a missing record, makes the entry invalid too.
    (entry / "extra.onnx").write_bytes(b"x")
    assert not optimized.valid(entry)
    Graph(path, options)
    assert optimized.valid(entry) and not (entry / "extra.onnx").exists()
    (entry / "saved.json").unlink()
    assert not optimized.valid(entry)


def test_small_graphs_are_not_saved_unless_asked(home, tmp_path, monkeypatch):
    path = _conv_graph(tmp_path / "conv.onnx")
    Graph(path, RuntimeOptions(intra_op_threads=1))  # by default only large graphs are saved
    Graph(path, RuntimeOptions(intra_op_threads=1, saved_graphs=False, save_above_mib=0))
    monkeypatch.setenv("AUDIT_SAVED_GRAPHS", "0")
    Graph(path, RuntimeOptions(intra_op_threads=1, save_above_mib=0))
    assert _entries(home) == []
    monkeypatch.setenv("AUDIT_SAVED_GRAPHS", "1")
    Graph(path, RuntimeOptions(intra_op_threads=1))
    assert len(_entries(home)) == 1
    monkeypatch.setenv("AUDIT_SAVED_GRAPHS", "yes")
    with pytest.raises(UsageError, match="AUDIT_SAVED_GRAPHS must be 0 or 1"):
        Graph(path, RuntimeOptions(intra_op_threads=1))


def test_weights_in_many_files_are_part_of_the_key(home, tmp_path):
    """A graph may keep each initializer in its own file (torch's TorchScript exporter does): editing any of them
    must miss the saved entry of the old weights."""
    path = _conv_graph(tmp_path / "conv.onnx", one_file=False)
    assert (tmp_path / "w2").is_file() and not (tmp_path / "conv.onnx.data").exists()
    x = np.random.default_rng(1).standard_normal((1, 8, 16, 16)).astype(np.float32)
    options = RuntimeOptions(intra_op_threads=1, save_above_mib=0)
    before = Graph(path, options).run(x=x)["y"]
    raw = bytearray((tmp_path / "w2").read_bytes())
    raw[0] ^= 0xFF
    (tmp_path / "w2").write_bytes(bytes(raw))
    after = Graph(path, options).run(x=x)["y"]
    assert len(_entries(home)) == 2 and not np.array_equal(before, after)
    np.testing.assert_array_equal(after, Graph(path, RuntimeOptions(intra_op_threads=1, saved_graphs=False)).run(
        x=x)["y"])
