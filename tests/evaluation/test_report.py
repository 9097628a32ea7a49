"""metrics.json and metrics.md (moved from tests/test_evaluation.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from celldiff.evaluation.report import markdown_table, write_report


def test_markdown_table():
    table = markdown_table([{"a": 1, "b": 0.123456}, {"a": "x|y"}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "| --- | --- |", "| 1 | 0.1235 |", "| x\\|y | – |"]


def test_write_report_writes_json_and_markdown(tmp_path):
    classifier = {
        "accuracy": 0.75, "per_class_accuracy": {"a": 1.0, "b": 0.5}, "per_class_count": {"a": 2, "b": 2},
        "mean_confidence": 0.7, "class_names": ["a", "b"], "confusion_matrix": [[2, 0], [1, 1]], "num_samples": 4,
    }  # fmt: skip
    metrics = {
        "frechet_distance": 12.5, "num_samples": 64, "num_real": 640, "frechet_distance_floor": 3.25,
        "frechet_distance_floor_n": 64, "precision": 0.8, "recall": 0.6, "classifier": classifier,
        "inception_skipped": "Inception FID/KID skipped: no weights", "sampler": "ddim", "nan_metric": math.nan,
        "array": np.arange(3), "tensor": torch.tensor(1.5),
    }  # fmt: skip
    json_path, md_path = write_report(metrics, tmp_path / "report")
    saved = json.loads(json_path.read_text())
    assert saved["frechet_distance"] == 12.5 and saved["frechet_distance_floor"] == 3.25 and saved["num_samples"] == 64
    assert saved["nan_metric"] is None and saved["array"] == [0, 1, 2] and saved["tensor"] == 1.5
    md = md_path.read_text()
    assert "| frechet_distance | 12.5 | 64 |" in md and "| frechet_distance_floor | 3.25 | 64 |" in md
    assert "biased" in md and "64 generated vs 640 real" in md
    assert "Inception FID/KID skipped: no weights" in md
    assert "| b | 1 | 1 |" in md  # confusion row: requested b, predicted a once and b once
    assert "| sampler | ddim |" in md
    with pytest.raises(ValueError, match="frechet_distance_floor"):
        write_report({"frechet_distance": 1.0, "num_samples": 3}, tmp_path / "bad")
