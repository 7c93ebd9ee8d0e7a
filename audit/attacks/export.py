"""Head export to ONNX (dynamo exporter, dynamic batch axis), parity check against torch, onnxruntime sessions."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import ArtifactError
from .nets import ScoringHead

log = logging.getLogger(__name__)

# Probabilities are compared absolutely; scores relative to their scale (a logit of 30 may differ by 1e-5).
PROB_ATOL = 1e-5
SCORE_RTOL = 1e-4


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs every graph pass at INFO and prints progress; users asked for audit's log, not that."""
    names = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export", "torch.fx", "torch.__trace")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def ort_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable/corrupt models
        raise ArtifactError(f"{path}: cannot load ONNX head ({str(exc).splitlines()[0]})") from None


def run_session(session, x: np.ndarray, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """-> (score, probability) float32 [N]. Chunked so a large scan does not build one huge tensor."""
    scores, probs = [], []
    for i in range(0, len(x), batch_size):
        s, p = session.run(["score", "probability"], {"x": np.ascontiguousarray(x[i : i + batch_size], np.float32)})
        scores.append(s)
        probs.append(p)
    if not scores:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(scores), np.concatenate(probs)


def export_head(head: ScoringHead, example: np.ndarray, path: str | Path, check: np.ndarray | None = None,
                threads: int | None = None) -> dict:
    """Export ``head`` (standardise -> net -> calibrated probability) with a dynamic batch axis, then check that
    onnxruntime reproduces torch on ``check`` (or ``example``) rows. Returns the parity numbers."""
    path = Path(path)
    head = head.eval()
    # The dynamo exporter specialises a batch of 1 ("Invalid ranges" with a dynamic batch); give it at least 2 rows.
    ex = np.asarray(example, np.float32)
    if len(ex) < 2:
        ex = np.concatenate([ex, ex])
    ex_t = torch.from_numpy(ex[: max(2, min(len(ex), 8))])
    batch = torch.export.Dim("batch")
    with _quiet_exporter():
        program = torch.onnx.export(head, (ex_t,), dynamo=True, input_names=["x"],
                                    output_names=["score", "probability"], dynamic_shapes={"x": {0: batch}},
                                    verbose=False)
        program.save(str(path))
    rows = np.asarray(check if check is not None and len(check) else ex, np.float32)
    with torch.no_grad():
        t_score, t_prob = (t.numpy() for t in head(torch.from_numpy(rows)))
    o_score, o_prob = run_session(ort_session(path, threads), rows)
    score_diff = float(np.max(np.abs(o_score - t_score))) if len(rows) else 0.0
    prob_diff = float(np.max(np.abs(o_prob - t_prob))) if len(rows) else 0.0
    score_tol = SCORE_RTOL * max(1.0, float(np.max(np.abs(t_score))) if len(rows) else 1.0)
    # P = sigmoid(a s + b) moves by at most |a| / 4 per unit of score: a steep Platt slope (scores in a narrow
    # range) turns float rounding of the score into a larger, equally harmless, probability difference.
    slope = abs(float(head.platt[0]))
    prob_tol = PROB_ATOL + 0.25 * slope * score_diff
    if prob_diff > prob_tol or score_diff > score_tol:
        raise ArtifactError(
            f"{path}: ONNX head disagrees with torch (max |d score| {score_diff:.2e} > {score_tol:.1e} or "
            f"max |d probability| {prob_diff:.2e} > {prob_tol:.1e})"
        )
    return {"rows_checked": int(len(rows)), "max_abs_diff_score": score_diff, "max_abs_diff_probability": prob_diff}
