"""`dvc plots show` as a user runs it: offline by default, every chart with axis titles and right legends.

- .dvc/config's `plots.html_template` is .dvc/plots/offline.html, which inlines the vega, vega-lite and
  vega-embed versions that dvc-render's page loads from a CDN (.ci/plots_offline.py --check).
- Stock `dvc plots show`, in a copy of this repository's dvc.yaml, .dvc/ and metrics/, writes a page
  that loads nothing; headless Chromium with every host unresolvable draws each chart, where DVC's
  default page draws none (.ci/run installs chromium; elsewhere skipped without it).
- From DVC's filled specs (vl-convert's scenegraph): axis titles are dvc.yaml's labels; a legend
  lists only what the chart draws (the validation-only curve has no "train"; the reliability
  diagram one colour per set of probabilities, old files without the column as uncalibrated).
"""
from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fixtures import scene_marks

ROOT = Path(__file__).resolve().parents[2]
BUILDER = ROOT / ".ci" / "plots_offline.py"
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1"}
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
OFFLINE_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars"]  # no host resolves: offline


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def definitions() -> dict[str, dict]:
    """dvc.yaml's top-level plots: id -> properties, vega plots only (not the image folder)."""
    result = {}
    for entry in DVC_YAML["plots"]:
        if isinstance(entry, dict):
            (name, props), = entry.items()
            result[name] = props or {}
    return result


def reliability_file() -> str:
    return next(iter(next(p for p in definitions().values() if p.get("template") == "reliability")["y"]))


def calibration_table(curves: tuple[str, ...]) -> str:
    """A small reliability table; with `curves`, the `probabilities` column the stage writes."""
    rows = ["bin,confidence,accuracy,count", "0.40-0.50,0.45,0.40,10", "0.80-0.90,0.85,0.70,30"]
    if curves:
        rows = ["probabilities," + rows[0]] + [f"{curve},{row}" for curve in curves for row in rows[1:]]
    return "\n".join(rows) + "\n"


def copy_repo(target: Path, with_config: bool = True) -> Path:
    """A fresh git + DVC repo with this repository's .dvc/ (config, templates), metrics/ and dvc.yaml,
    its plots less the Grad-CAM images (so that a blank chart shows as blank); the reliability
    diagram's file is a small table of both curves."""
    target.mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=target, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=target, check=True, env=ENV)
    shutil.copytree(ROOT / ".dvc" / "plots", target / ".dvc" / "plots")
    if with_config:
        shutil.copy(ROOT / ".dvc" / "config", target / ".dvc" / "config")
    charts = [entry for entry in DVC_YAML["plots"] if isinstance(entry, dict)]
    (target / "dvc.yaml").write_text(yaml.safe_dump({**DVC_YAML, "plots": charts}, sort_keys=False))
    shutil.copytree(ROOT / "metrics", target / "metrics")
    (target / reliability_file()).parent.mkdir(parents=True, exist_ok=True)
    (target / reliability_file()).write_text(calibration_table(("calibrated", "uncalibrated")))
    return target


def plots_show(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", "plots", "show", *args], cwd=repo, env=ENV,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return copy_repo(tmp_path_factory.mktemp("plots") / "repo")


@pytest.fixture(scope="module")
def page(repo) -> Path:
    done = plots_show(repo, "-o", "page")
    assert done.returncode == 0, done.stderr
    return repo / "page" / "index.html"


# --------------------------------------------------------------------------------------------
# The offline template
# --------------------------------------------------------------------------------------------
def test_config_points_dvc_at_the_committed_offline_template():
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    template = ROOT / ".dvc" / config["plots"]["html_template"]  # DVC resolves it against .dvc/
    assert template == load(BUILDER).TEMPLATE and template.is_file()
    subprocess.run(["git", "ls-files", "--error-unmatch", str(template)], cwd=ROOT, check=True, capture_output=True)


def test_template_inlines_the_versions_dvc_render_loads_from_the_cdn():
    builder = load(BUILDER)
    text = builder.TEMPLATE.read_text(encoding="utf-8")
    assert builder.template_versions(text) == builder.cdn_versions()
    assert list(builder.cdn_versions()) == ["vega", "vega-lite", "vega-embed"]
    assert builder.main(["--check"]) == 0
    assert not re.search(r"<script[^>]*\bsrc=", text, re.IGNORECASE), "every script is inline"
    assert not re.search(r"https?://[^\"'\s]*(jsdelivr|unpkg|cdn)", text), "no CDN address at all"
    assert "{plot_divs}" in text and "{scripts}" not in text, "DVC adds no CDN tags without {scripts}"
    assert len(re.findall(r"<script>", text)) == 3 and text.count("Redistribution and use") == 3, "with licences"
    assert 0.5e6 < len(text.encode("utf-8")) < 2e6


def test_check_fails_for_a_template_of_other_versions(tmp_path):
    builder = load(BUILDER)
    stale = tmp_path / "offline.html"
    stale.write_text(builder.TEMPLATE.read_text(encoding="utf-8").replace("vega-lite@", "vega-lite@0."))
    assert builder.main(["--check", "--output", str(stale)]) == 1
    assert builder.main(["--check", "--output", str(tmp_path / "missing.html")]) == 1


def test_a_build_that_would_end_its_script_is_refused():
    builder = load(BUILDER)
    builds = {name: ("1.0.0", "licence", "var x = 1;") for name in builder.PACKAGES}
    assert "var x = 1;" in builder.page(builds)
    for bad in ('var s = "</script>";', "var t = '{plot_divs}';"):
        with pytest.raises(ValueError, match="vega-embed"):
            builder.page({**builds, "vega-embed": ("1.0.0", "licence", bad)})


def test_stock_dvc_plots_show_writes_a_page_that_loads_nothing(page):
    text = page.read_text(encoding="utf-8")
    assert "cdn.jsdelivr" not in text and not re.search(r"<script[^>]*\bsrc=", text)
    assert text.count("vegaEmbed('#") == len(definitions())


# --------------------------------------------------------------------------------------------
# In a browser, offline
# --------------------------------------------------------------------------------------------
def chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile{len(list(tmp.glob('profile*')))}"
    return subprocess.run([CHROMIUM, *OFFLINE_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr",
                           "--window-size=1400,2400", *args, page.as_uri()], capture_output=True, text=True,
                          timeout=120)


def coloured_pixels(png: Path) -> int:
    """Pixels of a clear hue (marks: lines, cells, points), not the greys of axes, grid and text."""
    import numpy as np
    from PIL import Image

    with Image.open(png) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=int)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 80).sum())


def test_headless_chromium_draws_every_chart_with_no_network(page, repo, tmp_path):
    if CHROMIUM is None:  # .ci/run installs it: there, its absence is a failure
        (pytest.fail if os.environ.get("CI") else pytest.skip)("chromium not installed (.ci/run installs it)")
    dom = chromium(page, tmp_path, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('class="marks"') == len(definitions()), "one vega canvas per chart"
    errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and "error" in line.lower()]
    assert not errors, errors
    shot = chromium(page, tmp_path, f"--screenshot={tmp_path / 'page.png'}")
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert coloured_pixels(tmp_path / "page.png") > 20000, "the charts' lines and cells are drawn"
    # DVC's own page, from the same specs, is blank without a network: what the template fixes
    stock = copy_repo(tmp_path / "stock", with_config=False)
    assert plots_show(stock, "-o", "page").returncode == 0
    assert "cdn.jsdelivr.net" in (stock / "page" / "index.html").read_text(encoding="utf-8")
    blank = chromium(stock / "page" / "index.html", tmp_path, "--dump-dom")
    assert 'class="marks"' not in blank.stdout
    chromium(stock / "page" / "index.html", tmp_path, f"--screenshot={tmp_path / 'stock.png'}")
    assert coloured_pixels(tmp_path / "stock.png") == 0


# --------------------------------------------------------------------------------------------
# Axis titles and legends, from DVC's filled specs
# --------------------------------------------------------------------------------------------
def texts(node, role: str) -> list[str]:
    """The texts of every text mark with `role` in a vega scenegraph."""
    return [item.get("text") for mark in scene_marks(node, "text", role) for item in mark.get("items", [])]


def scenegraphs(repo: Path) -> dict[str, dict]:
    import vl_convert

    done = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=repo, env=ENV,
                          capture_output=True, text=True, check=True)
    shown = json.loads(done.stdout)["data"]
    return {name: vl_convert.vegalite_to_scenegraph(entries[0]["content"], vl_version="5.21")["scenegraph"]
            for name, entries in shown.items() if entries[0].get("type") == "vega"}


def test_every_chart_has_its_axis_titles_and_legends_list_what_it_draws(repo):
    graphs = scenegraphs(repo)
    assert sorted(graphs) == sorted(definitions())
    for name, props in definitions().items():
        titles = texts(graphs[name], "axis-title")
        assert props["x_label"] in titles and props["y_label"] in titles, f"{name}: axis titles {titles}"
        labels = set(texts(graphs[name], "legend-label"))
        if props.get("template") == "epochs":
            splits = {"validation" if "/eval/" in path else "train" for path in props["y"]}
            assert labels & {"train", "validation"} == splits, f"{name}: legend {labels}"
        if props.get("template") in ("roc_by_class", "precision_recall_by_class"):
            assert {"akiec", "mel", "nv", "workspace"} <= labels, f"{name}: legend {labels}"


@pytest.mark.parametrize("curves", [("calibrated", "uncalibrated"), ()])
def test_reliability_diagram_draws_one_line_per_set_of_probabilities(repo, tmp_path, curves):
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns("page"))
    (copy / reliability_file()).write_text(calibration_table(curves))
    name = next(n for n, p in definitions().items() if p.get("template") == "reliability")
    graph = scenegraphs(copy)[name]
    labels = set(texts(graph, "legend-label"))
    assert labels & {"calibrated", "uncalibrated"} == (set(curves) or {"uncalibrated"})
    assert "probabilities" in texts(graph, "legend-title")
    strokes = {item.get("stroke") for mark in scene_marks(graph, "line", role="mark") for item in mark.get("items", [])}
    colours = {"calibrated": "#1f77b4", "uncalibrated": "#ff7f0e"}  # each set keeps its colour
    assert strokes - {"grey"} == {colours[curve] for curve in curves or ["uncalibrated"]}
