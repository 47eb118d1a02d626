"""The built-in job runs end to end on its generated data and writes one result per test image."""

from __future__ import annotations

import csv
from pathlib import Path

from spade_ad.apps.demo import run_demo


def test_demo_fits_scores_and_writes_overlays(tmp_path: Path) -> None:
    messages: list[str] = []
    result = run_demo(tmp_path, seed=0, device="cpu", log=messages.append)
    assert result["image_auroc"] >= 0.9 and result["pixel_auroc"] >= 0.9
    assert result["n_test"] == 30 and messages
    with open(tmp_path / "predictions" / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30 and rows[0]["path"] == "good/000.png"
    overlays = sorted(p.relative_to(tmp_path / "predictions" / "overlays").as_posix()
                      for p in (tmp_path / "predictions" / "overlays").rglob("*.png"))
    assert len(overlays) == 30 and "scratch/000.png" in overlays and "spot/000.png" in overlays
    assert (tmp_path / "model.safetensors").is_file()
