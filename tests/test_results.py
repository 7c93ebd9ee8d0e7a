"""The API's typed results: to_dict() is the JSON the CLI prints (same keys, same order, optional keys only when
set, unknown keys kept) and from_dict reads it back."""

import json

from audit.results import EvaluateResult, FeaturesSummary, ScanSummary, TrainResult

FEATURES = {"out": "s.h5", "rows": 3, "ok": 2, "status": {"ok": 2, "unreadable": 1}, "seconds": 1.5,
            "target": {"name": "toy", "hash": "ab"}, "embedder": {"name": "toy-clip"}, "captioner": {"name": "b"},
            "tiers": ["black-box"], "unet_evaluations_per_query": {"black-box": 50}, "first_batch_seconds": None}
SCAN = {"out": "r.jsonl", "rows": 4, "counts": {"member": 1, "non-member": 2, "inconclusive": 0, "missing": 1},
        "seconds": 2.0, "target": {"name": "toy"}, "heads": "/h", "attack": "IV", "tier": "black-box",
        "decision": {"rule": "budget", "max_fpr": 0.01}, "features": {"n_gen": 2}}


def test_features_summary_round_trips_in_order_without_absent_optional_keys():
    s = FeaturesSummary.from_dict(FEATURES)
    assert s.ok == 2 and s.ray is None and s.target["name"] == "toy"
    assert json.dumps(s.to_dict()) == json.dumps(FEATURES)  # same keys in the same order: no "ray" key added
    on_ray = {**FEATURES, "ray": {"workers": 2}}
    assert list(FeaturesSummary.from_dict(on_ray).to_dict()) == list(on_ray)


def test_scan_summary_keeps_optional_and_unknown_keys():
    data = {**SCAN, "ray": {"workers": 1}, "report": "r.html", "later_key": [1]}
    s = ScanSummary.from_dict(data)
    assert s.report == "r.html" and s.members == 1 and s.extra == {"later_key": [1]}
    assert json.dumps(s.to_dict()) == json.dumps(data)
    assert ScanSummary.from_dict(s.to_dict()) == s


def test_train_and_evaluate_results_round_trip():
    t = TrainResult(heads="h", registered=None, info={"default_attack": "IV"})
    assert t.to_dict() == {"heads": "h", "registered": None, "info": {"default_attack": "IV"}}
    assert TrainResult.from_dict(t.to_dict()) == t
    ev = {"attacks": {"IV": {"auc": 0.9}}, "default_attack": "IV", "decision": {}, "n_test": 4, "n_test_members": 2,
          "n_test_nonmembers": 2, "store": "s", "heads": "h", "target": {}, "blind_baseline": None,
          "bootstrap": {"resamples": 0}, "warnings": [], "plot": "p.png"}
    r = EvaluateResult.from_dict(ev)
    assert r.plot == "p.png" and r.report is None and json.dumps(r.to_dict()) == json.dumps(ev)
