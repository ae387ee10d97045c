"""dvc.yaml as a DVC user meets it: few metrics, plots that are right and render, registry entries.

- The declared metrics files hold at most 100 figures in all (what `dvc metrics show`, `dvc exp
  show` and a pull request's metrics diff display; two answer paths: image alone, with metadata).
- Every plot in dvc.yaml renders, from the specs DVC itself fills (`dvc plots show --json`), to an
  image with vl-convert (no browser), on small files in the formats the stages write; the
  normalised confusion matrix's rows (true classes) sum to 1; curves have one colour per class
  and a chance line; no plot is drawn twice.
- `artifacts:` names the Keras and TFLite models (tests/test_remote.py fetches one from a remote).
- Each stage's `params:` lists, key by key, exactly the params.yaml keys its code reads (derived
  from its `load_params` / `from_dict` calls), less RESULT_NEUTRAL: keys that change no output, so
  that changing one re-runs nothing.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import io
import json
import os
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages import evaluate
from stages.lib import gradcam
from stages.lib.dataset import CLASSES
from tests.fixtures import scene_marks

ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
TEMPLATES = ROOT / ".dvc" / "plots"
MAX_FIGURES = 100
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}


def declared_metrics() -> list[str]:
    paths = [next(iter(m)) if isinstance(m, dict) else m for m in DVC_YAML.get("metrics", [])]
    for stage in DVC_YAML["stages"].values():
        paths += [next(iter(m)) if isinstance(m, dict) else m for m in stage.get("metrics", [])]
    return paths


def figures(value) -> int:
    """Numeric leaves of a JSON value (booleans are not figures)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, (int, float)):
        return 1
    if isinstance(value, dict):
        return sum(figures(v) for v in value.values())
    if isinstance(value, list):
        return sum(figures(v) for v in value)
    return 0


def test_declared_metrics_hold_at_most_100_figures():
    counts = {path: figures(json.loads((ROOT / path).read_text(encoding="utf-8"))) for path in declared_metrics()}
    assert "metrics/test.json" in counts and "metrics/val.json" in counts
    assert sum(counts.values()) <= MAX_FIGURES, f"{sum(counts.values())} figures declared as metrics: {counts}"


def test_test_metrics_keep_per_class_recall_for_the_seven_classes():
    test = json.loads((ROOT / "metrics" / "test.json").read_text(encoding="utf-8"))
    assert list(test["per_class"]) == list(CLASSES)
    assert all("recall" in figures_ for figures_ in test["per_class"].values())


def test_subgroups_and_data_counts_are_plain_outputs_not_metrics():
    assert "metrics/data.json" not in declared_metrics()
    assert not any("subgroups" in path for path in declared_metrics())


# --------------------------------------------------------------------------------------------
# Params: key by key, only those that change a result
# --------------------------------------------------------------------------------------------
# Keys a stage reads but that change none of its outputs: changing one must not re-run the stage.
RESULT_NEUTRAL = {
    "download.retries": "how often a transient error is retried: the same files arrive",
    "download.timeout_s": "how long a request may take: the same files arrive",
    "download.local_dir": "where the same release is taken from (like HAM10000_MIRROR)",
    "download.sha256": "pins check the files, never change them",
    "download.max_entry_bytes": "a zip-bomb guard: accepts or refuses an archive, never changes it",
    "download.max_total_bytes": "a zip-bomb guard",
    "download.max_compression_ratio": "a zip-bomb guard",
    "evaluate.batch_size": "images per inference call: the same probabilities",
    "export.batch_size": "images per inference call: the same agreement and accuracy",
    "export.latency_runs": "timed runs of the speed measurement, which no rerun reproduces anyway",
    "isic2018.sha256": "pins check the files, never change them",
}


PARAMLESS = {"non_lesions"}  # stages that read no params.yaml key: their output is fixed by their code


def leaf_keys(cls: type, prefix: str) -> set[str]:
    """`prefix.field` for each field of dataclass `cls`, nested dataclasses flattened."""
    hints = typing.get_type_hints(cls)
    keys = set()
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        keys |= leaf_keys(tp, f"{prefix}.{field.name}") if dataclasses.is_dataclass(tp) else {f"{prefix}.{field.name}"}
    return keys


def keys_read(stage: dict) -> set[str]:
    """Every params key the stage's module reads: its `load_params("section", Cls, ...)` and
    `from_dict(Cls, ..., "section")` calls, with Cls's fields (nested ones flattened)."""
    name = stage["cmd"].split()[2]
    module = importlib.import_module(name)
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    keys = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        if node.func.id == "load_params":
            section, cls = node.args[0], node.args[1]
        elif node.func.id == "from_dict" and len(node.args) == 3:
            cls, section = node.args[0], node.args[2]
        else:
            continue
        assert isinstance(section, ast.Constant) and isinstance(cls, ast.Name), f"{name}: {ast.unparse(node)}"
        keys |= leaf_keys(getattr(module, cls.id), section.value)
    return keys


def expand(declared: list[str], known: set[str]) -> set[str]:
    """The leaf keys that dvc.yaml's entries name: `train.augmentation` stands for each of its keys."""
    leaves = set()
    for entry in declared:
        covered = {k for k in known if k == entry or k.startswith(f"{entry}.")}
        assert covered, f"dvc.yaml declares {entry!r}, which the stage does not read"
        leaves |= covered
    return leaves


@pytest.mark.parametrize("name", sorted(DVC_YAML["stages"]))
def test_params_are_the_keys_the_stage_reads_less_the_result_neutral_ones(name):
    stage = DVC_YAML["stages"][name]
    read = keys_read(stage)
    assert read or name in PARAMLESS, f"{name} reads no params?"
    declared = stage.get("params", [])
    assert all(isinstance(entry, str) for entry in declared), f"{name}: params are plain keys of params.yaml"
    sections = {key.split(".")[0] for key in read}
    whole = [entry for entry in declared if entry in sections]
    assert not whole, f"{name} lists whole section(s) {whole}: list the keys that change its result"
    expected = read - set(RESULT_NEUTRAL)
    listed = expand(declared, read)
    assert listed == expected, (f"dvc.yaml stage {name}: missing {sorted(expected - listed)}; "
                                f"result-neutral (see RESULT_NEUTRAL) {sorted(listed - expected)}")


def test_result_neutral_keys_are_keys_some_stage_reads():
    read = set().union(*(keys_read(stage) for stage in DVC_YAML["stages"].values()))
    assert set(RESULT_NEUTRAL) <= read, f"stale entries: {sorted(set(RESULT_NEUTRAL) - read)}"


def test_declared_params_exist_in_params_yaml():
    """DVC refuses to run a stage whose declared key is missing from params.yaml."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for name, stage in DVC_YAML["stages"].items():
        for key in stage.get("params", []):
            value = params
            for part in key.split("."):
                assert isinstance(value, dict) and part in value, f"{name}: {key} is not in params.yaml"
                value = value[part]


def changed(value):
    """Another value of the same type (what `dvc exp run -S` might set)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return [*value, value[-1]] if value else ["x"]
    if isinstance(value, dict):
        return {**value, "x": "y"}
    return f"{value}-changed" if value is not None else "somewhere"


def test_a_result_neutral_key_reruns_nothing_and_a_declared_one_its_stage(tmp_path):
    """DVC itself, on stand-in stages with this dvc.yaml's params lists and this params.yaml."""
    from tests.fixtures import dvc, init_dvc_repo

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    stages = {name: {"cmd": f"echo {name} > {name}.txt", "params": stage.get("params", []), "outs": [f"{name}.txt"]}
              for name, stage in DVC_YAML["stages"].items()}
    init_dvc_repo(tmp_path)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    dvc(tmp_path, "repro", "-q")

    def status_after(keys) -> set[str]:
        edited = yaml.safe_load(yaml.safe_dump(params))
        for key in keys:
            *parents, last = key.split(".")
            section = edited
            for part in parents:
                section = section[part]
            section[last] = changed(section.get(last))
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(edited))
        return set(json.loads(dvc(tmp_path, "status", "--json")))

    assert status_after(RESULT_NEUTRAL) == set(), "a result-neutral key re-ran a stage"
    assert status_after(["train.seed", "evaluate.tta", "download.files"]) == {
        "train", "evaluate", "report", "download",
        "isic2018"}, "report quotes evaluate.tta; isic2018 reads the download section"
    assert status_after(["train.augmentation.zoom_fraction"]) == {"train"}, "a key inside a declared sub-section"
    assert status_after(["train.weights"]) == {"train", "report"}, "report quotes train.weights"


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def plot_definitions() -> dict[str, dict]:
    """Top-level plots: id -> properties (a bare path has none)."""
    result = {}
    for entry in DVC_YAML["plots"]:
        if isinstance(entry, str):
            result[entry] = {}
        else:
            (name, props), = entry.items()
            result[name] = props or {}
    return result


def sources(props: dict) -> list[tuple[str, str]]:
    y = props.get("y", {})
    return sorted((path, field) for path, fields in y.items()
                  for field in ([fields] if isinstance(fields, str) else fields))


def test_no_plot_is_drawn_twice():
    for name, stage in DVC_YAML["stages"].items():
        assert "plots" not in stage, f"stage {name} declares plots: the top-level plots draw every file once"
    seen = {}
    for name, props in plot_definitions().items():
        key = (props.get("template"), tuple(sources(props)) or name)
        assert key not in seen, f"{name!r} draws what {seen[key]!r} draws"
        seen[key] = name


def test_validation_plots_come_first_and_test_plots_say_so():
    names = list(plot_definitions())
    kinds = ["test" if "test" in n.lower() or "gradcam" in n else "other" for n in names]
    assert kinds == sorted(kinds, key=lambda k: k == "test"), f"validation/training plots first: {names}"
    for name, props in plot_definitions().items():
        paths = " ".join(path for path, _ in sources(props)) or name
        if "/test/" in paths or "report/" in paths:
            assert name.startswith("Test:") or "test images" in _comment_of(name), name


def _comment_of(name: str) -> str:
    for line in (ROOT / "dvc.yaml").read_text(encoding="utf-8").splitlines():
        if line.strip().startswith(f"- {name}"):
            return line
    return ""


def test_templates_named_in_dvc_yaml_exist():
    builtin = {"simple", "linear", "confusion", "confusion_normalized", "scatter", "scatter_jitter", "smooth",
               "bar_horizontal_sorted", "bar_horizontal"}
    for name, props in plot_definitions().items():
        template = props.get("template")
        assert template is None or template in builtin or (TEMPLATES / f"{template}.json").is_file(), name


def test_curve_templates_colour_by_class_and_draw_a_chance_line():
    for name in ("roc_by_class", "precision_recall_by_class"):
        spec = json.loads((TEMPLATES / f"{name}.json").read_text(encoding="utf-8"))
        curves, chance = spec["layer"][1], spec["layer"][0]
        assert curves["encoding"]["color"]["field"] == "class"
        assert curves["encoding"]["color"]["scale"]["domain"] == list(CLASSES), "each class keeps its colour"
        assert curves["encoding"]["strokeDash"]["field"] == "rev", "revisions differ by dashes, not colours"
        assert chance["mark"]["strokeDash"], "the chance line is dashed"


def write_plot_data(repo: Path) -> None:
    """Every file dvc.yaml's plots read, small, in the format its stage writes."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(CLASSES)), 6)
    proba = rng.dirichlet(np.ones(len(CLASSES)), len(labels))
    proba[np.arange(len(labels)) % 3 != 0] += 2 * np.eye(len(CLASSES))[labels[np.arange(len(labels)) % 3 != 0]]
    proba /= proba.sum(axis=1, keepdims=True)
    ids = np.array([f"ISIC_{i:04d}" for i in range(len(labels))])
    for split in ("val", "test"):
        folder = repo / "metrics" / "plots" / split
        folder.mkdir(parents=True)
        (folder / "predictions.csv").write_text(evaluate.predictions_table(ids, labels, proba))
        (folder / "roc.csv").write_text(evaluate.roc_table(labels, proba))
        (folder / "precision_recall.csv").write_text(evaluate.pr_table(labels, proba))
        (folder / "calibration.csv").write_text(evaluate.reliability_csv(labels, proba, np.sqrt(proba)))
    live = repo / "metrics" / "train" / "plots" / "metrics"
    for split, name in (("eval", "balanced_accuracy"), ("eval", "loss"), ("eval", "accuracy"), ("train", "loss"),
                        ("train", "accuracy"), ("train", "learning_rate")):
        (live / split).mkdir(parents=True, exist_ok=True)
        slope = 0.04 if split == "train" else 0.02
        (live / split / f"{name}.tsv").write_text(f"step\t{name}\n" + "".join(
            f"{epoch}\t{0.5 + slope * epoch:.4f}\n" for epoch in range(1, 6)))
    report_dir = repo / "metrics" / "report"
    (report_dir / "gradcam").mkdir(parents=True)
    image = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    for dx in CLASSES[:2]:
        (report_dir / "gradcam" / f"{dx}.png").write_bytes(gradcam.contact_sheet(
            dx, {"correct": [(image, np.zeros((8, 8)), ["x"])], "wrong": []}, 1))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[Path, dict]:
    """A throwaway repo with this dvc.yaml's plots and templates: DVC's filled specs, rendered."""
    import vl_convert

    repo = tmp_path_factory.mktemp("plots")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True, env=ENV)
    (repo / ".dvc" / "plots").mkdir()
    for template in TEMPLATES.glob("*.json"):
        (repo / ".dvc" / "plots" / template.name).write_bytes(template.read_bytes())
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": DVC_YAML["plots"]}, sort_keys=False))
    write_plot_data(repo)
    done = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=repo, check=True, env=ENV,
                          capture_output=True, text=True)
    shown = json.loads(done.stdout)["data"]
    images = {}
    for name, entries in shown.items():
        for entry in entries:
            if entry["type"] == "vega":
                images[name] = (entry["content"], vl_convert.vegalite_to_png(entry["content"], vl_version="5.21"))
    return repo, {"shown": shown, "images": images}


def test_every_plot_renders_to_an_image(rendered):
    from PIL import Image

    _, result = rendered
    vega_plots = [name for name in plot_definitions() if name != "metrics/report/gradcam"]
    assert sorted(result["images"]) == sorted(vega_plots)
    for name, (_, png) in result["images"].items():
        with Image.open(io.BytesIO(png)) as image:
            assert image.width > 300 and image.height > 200, name
    gradcam_entries = [n for n in result["shown"] if n.startswith("metrics/report/gradcam/")]
    assert len(gradcam_entries) == 2, "one image entry per contact sheet"


def test_normalised_confusion_rows_are_true_classes_and_sum_to_one(rendered):
    import vl_convert

    _, result = rendered
    for name in plot_definitions():
        if plot_definitions()[name].get("template") != "confusion_normalized_by_true_class":
            continue
        spec = result["images"][name][0]
        graph = vl_convert.vegalite_to_scenegraph(spec, vl_version="5.21")["scenegraph"]
        marks = scene_marks(graph, "text")
        titles = [item["text"] for m in marks if m.get("role") == "axis-title" for item in m["items"]]
        assert "true class" in titles and "predicted class" in titles
        y_labels = next(m for m in marks if m.get("role") == "axis-label" and m["items"][0]["x"] < 0)
        row_of = {item["y"]: item["text"] for item in y_labels["items"]}
        assert sorted(row_of.values()) == list(CLASSES)
        cells = [item for m in marks if m.get("role") == "mark" for item in m["items"]]
        by_row: dict[str, float] = {}
        for cell in cells:
            row = row_of[min(row_of, key=lambda y: abs(y - cell["y"]))]
            by_row[row] = by_row.get(row, 0.0) + float(cell["text"])
        assert set(by_row) == set(CLASSES)
        for row, total in by_row.items():
            assert total == pytest.approx(1.0, abs=0.04), f"{name}: row {row} sums to {total}"
        # the same shares by hand: the diagonal is each true class's recall
        predictions = next(p for p, _ in sources(plot_definitions()[name]))
        import pandas as pd

        table = pd.read_csv(rendered[0] / predictions)
        recall = (table["actual"] == table["predicted"]).groupby(table["actual"]).mean()
        diagonal = {row_of[min(row_of, key=lambda y: abs(y - c["y"]))]: float(c["text"]) for c in cells
                    if abs(c["x"] - c["y"]) < 1}
        assert diagonal == pytest.approx(recall.round(2).to_dict(), abs=0.011)


# --------------------------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------------------------
def test_artifacts_name_the_keras_and_tflite_models():
    artifacts = DVC_YAML["artifacts"]
    paths = {a["path"] for a in artifacts.values()}
    assert paths == {"models/model.keras", "models/model_float16.tflite", "models/model_int8.tflite"}
    outs = {next(iter(o)) if isinstance(o, dict) else o for s in DVC_YAML["stages"].values() for o in s.get("outs", [])}
    assert paths <= outs, "every artifact is a stage's output, so dvc.lock pins it"
    for name, artifact in artifacts.items():
        assert artifact["type"] == "model" and artifact["desc"] and artifact["labels"], name
        assert "not a medical device" in artifact["desc"].lower(), name
