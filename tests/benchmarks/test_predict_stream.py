"""benchmarks/predict_stream.py on a tiny count: the images it writes, one child run per count,
lines checked, and the figures it records (rate, peak memory and its ratio)."""
from __future__ import annotations

import json

import pytest

from benchmarks import predict_stream


def test_images_are_small_jpegs_a_hundred_per_folder(tmp_path):
    from PIL import Image

    predict_stream.write_images(tmp_path, 102, side=16)
    files = sorted(tmp_path.rglob("*.jpg"))
    assert len(files) == 102 and {f.parent.name for f in files} == {"0000", "0001"}
    with Image.open(files[0]) as img:
        assert (img.format, img.size) == ("JPEG", (16, 16))


def test_each_count_is_one_predict_run_with_its_rate_and_peak_memory(tmp_path):
    model = predict_stream.tiny_model_file(tmp_path)  # what a run without --model makes
    assert (tmp_path / "decision.json").is_file()
    out = tmp_path / "result.json"
    predict_stream.main(["--counts", "5", "3", "--side", "16", "--model", str(model), "--out", str(out)])
    result = json.loads(out.read_text())
    assert [run["images"] for run in result["runs"]] == [3, 5]
    for run in result["runs"]:
        assert run["images_per_s"] == pytest.approx(run["images"] / run["wall_s"], rel=0.02, abs=0.06)
        assert run["peak_rss_mib"] > 50, "a Python process with TensorFlow, measured by wait4"
    small, large = (run["peak_rss_mib"] for run in result["runs"])
    assert result["peak_rss_ratio"] == pytest.approx(large / small, abs=1e-3)
    assert result["model"] == str(model) and result["image_side"] == 16
