"""Build a pull request's report comment: what the branch changes in metrics, params and plots.

    python .ci/pr_comment.py BASE_REV [--images-dir DIR] [--images-url URL] [--lock FILE] [--output FILE]

Compares the workspace (the branch as committed, or after `dvc repro`) with BASE_REV, the pull
request's base commit. It needs no DVC remote: metrics and plot data are git-tracked
(`cache: false`), so both revisions come from git.

- dvc.lock: whether the committed lock matches the code and params (`.ci/lock_check.py`; `--lock`
  takes the Markdown that an earlier CI step wrote, before `dvc repro` changed the workspace).
- Metrics: `dvc metrics diff --json`, validation first (`metrics/val.json`, training curves), then
  every figure on the test split under its own heading (test, export, calibration).
- Params: `dvc params diff --md`.
- Plots: the vega-lite specs that DVC fills for `dvc plots diff` (`--json`: the same spec as
  `--show-vega` prints, for every plot in one call), rendered to PNG with vl-convert (no browser),
  validation first, test plots marked. Only plots whose data changed are drawn, each with both
  revisions; Grad-CAM sheets that changed are shown as the branch has them.
  Images go to `--images-dir` and are linked as `<images-url>/<file>` (CI pushes them where the
  comment can show them); without `--images-url` the links are relative to the comment file, for
  a local preview: `python .ci/pr_comment.py main --output preview/comment.md --images-dir preview/plots`.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MARKER = "<!-- dvc-pr-report -->"  # lets a reader (or a bot) find this comment among others
MODEL_CARD = Path("metrics/report/model_card.md")  # written by the `report` stage
VEGA_LITE_VERSION = "5.21"  # DVC's templates are vega-lite v5 specs
BRANCH_LABEL = "this branch"
TEST_METRICS = ("metrics/test.json", "metrics/export.json", "metrics/report/")  # figures on the test split


def run(*command: str) -> str:
    """stdout of a command; a failure stops the script with the command's own message."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr.strip()}")
    return done.stdout


def dvc(*args: str) -> str:
    """Run DVC from this interpreter's environment, whatever `dvc` is first on PATH."""
    return run(sys.executable, "-m", "dvc", *args)


def short_revision(revision: str) -> str:
    """A short commit id, so that headers stay narrow and the revision is exact."""
    return run("git", "rev-parse", "--short=8", "--verify", f"{revision}^{{commit}}").strip()


def table_or(markdown: str, nothing: str) -> str:
    """DVC prints a header-only table when nothing changed; say so in words instead."""
    lines = [line for line in markdown.strip().splitlines() if line.strip()]
    return "\n".join(lines) if len(lines) > 2 else nothing


def is_test(path: str) -> bool:
    """Whether a metrics file holds figures on the test split (by name, or one of TEST_METRICS)."""
    return "test" in Path(path).stem or any(path == p or (p.endswith("/") and path.startswith(p))
                                             for p in TEST_METRICS)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def flat_keys(value, prefix: str = "") -> list[str]:
    """Keys of a JSON object in file order, nested ones joined with '.' (as DVC names them)."""
    if not isinstance(value, dict):
        return [prefix]
    keys = []
    for key, inner in value.items():
        keys += flat_keys(inner, f"{prefix}.{key}" if prefix else str(key))
    return keys


def key_order(path: str, keys) -> list[str]:
    """The metrics of one file in the order the file has them (balanced accuracy first)."""
    try:
        order = flat_keys(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        order = []
    rank = {key: k for k, key in enumerate(order)}
    return sorted(keys, key=lambda key: (rank.get(key, len(rank)), key))


def metrics_table(path: str, changes: dict) -> list[str]:
    rows = ["| metric | base | this branch | change |", "|:---|---:|---:|---:|"]
    for key in key_order(path, changes):
        change = changes[key]
        diff = change.get("diff")
        sign = "+" if isinstance(diff, (int, float)) and diff > 0 else ""
        shown = "" if diff is None else sign + fmt(diff)
        rows.append(f"| {key} | {fmt(change.get('old'))} | {fmt(change.get('new'))} | {shown} |")
    return rows


def metrics_section(base: str) -> str:
    """Changed metrics, validation and training first, then the test split's, marked as such."""
    diff = json.loads(dvc("metrics", "diff", base, "--json") or "{}")
    diff = {path: changes for path, changes in diff.items() if changes}
    if not diff:
        return "No metric changed."
    parts = []
    groups = (("Validation and training", [p for p in diff if not is_test(p)]),
              ("Test split (held out: compare, never tune on it)", [p for p in diff if is_test(p)]))
    for title, paths in groups:
        if not paths:
            continue
        parts += [f"#### {title}", ""]
        for path in sorted(paths, key=lambda p: (p != "metrics/val.json", p != "metrics/test.json", p)):
            parts += [f"`{path}`", ""] + metrics_table(path, diff[path]) + [""]
    return "\n".join(parts).rstrip()


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def plot_order(name: str) -> int:
    """Validation and training plots first, then test plots (their titles say "Test"), then images."""
    lowered = name.lower()
    return 2 if "gradcam" in lowered else 1 if lowered.startswith("test") else 0


def plot_title(name: str) -> str:
    """A plot's id as the comment shows it; the Grad-CAM sheets (test images) are marked as test."""
    if "gradcam" in name.lower():
        return f"Test: Grad-CAM sheet {Path(name).stem} (this branch)"
    return name


def file_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")[:80] + ".png"


def data_changed(spec: dict) -> bool:
    """Whether the revisions in a filled spec hold different data (rows compared without `rev`)."""
    by_rev: dict[str, list] = {}
    for row in spec.get("data", {}).get("values", []) or []:
        rest = {k: v for k, v in row.items() if k != "rev"}
        by_rev.setdefault(row.get("rev"), []).append(json.dumps(rest, sort_keys=True))
    values = [sorted(rows) for rows in by_rev.values()]
    return len(values) != 2 or values[0] != values[1]


def relabel(spec: dict, base: str) -> dict:
    """Name the revisions for a reader: `base <sha>` and `this branch` instead of `workspace`."""
    names = {"workspace": BRANCH_LABEL, base: f"base {base}"}
    spec = json.loads(json.dumps(spec))
    for row in spec.get("data", {}).get("values", []) or []:
        if row.get("rev") in names:
            row["rev"] = names[row["rev"]]
    return spec


def render_png(spec: dict) -> bytes:
    import vl_convert

    return vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE_VERSION, scale=1)


def plots_section(base: str, images_dir: Path, images_url: str | None, comment_dir: Path) -> str:
    """Render what changed into `images_dir`; Markdown that shows the images."""
    images_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        shown = json.loads(dvc("plots", "diff", base, "--json", "--out", tmp) or "{}").get("data", {})
        lines, unchanged = [], []
        for name in sorted(shown, key=plot_order):
            entries = shown[name]
            vega = [e for e in entries if e.get("type") == "vega"]
            if vega:
                spec = vega[0]["content"]
                if not data_changed(spec):
                    unchanged.append(name)
                    continue
                target = images_dir / file_name(name)
                target.write_bytes(render_png(relabel(spec, base)))
            else:  # an image plot (Grad-CAM sheet): show the branch's version if it changed
                files = {e["revisions"][0]: Path(e["url"]) for e in entries if e.get("url")}
                new, old = files.get("workspace"), files.get(base)
                if new is None or (old is not None and old.read_bytes() == new.read_bytes()):
                    unchanged.append(name)
                    continue
                target = images_dir / file_name(name)
                shutil.copyfile(new, target)
            link = f"{images_url.rstrip('/')}/{target.name}" if images_url else _relative(target, comment_dir)
            lines += [f"**{plot_title(name)}**", "", f"![{plot_title(name)}]({link})", ""]
    if not lines:
        lines = ["No plot's data changed.", ""]
    if unchanged:
        lines += [f"Unchanged: {', '.join(unchanged)}.", ""]
    return "\n".join(lines).rstrip()


def _relative(target: Path, comment_dir: Path) -> str:
    try:
        return target.resolve().relative_to(comment_dir.resolve()).as_posix()
    except ValueError:
        return target.resolve().as_posix()


# --------------------------------------------------------------------------------------------
# The comment
# --------------------------------------------------------------------------------------------
def lock_section(lock_file: Path | None) -> str:
    if lock_file is not None:
        return lock_file.read_text(encoding="utf-8").strip()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lock_check

    return lock_check.markdown(lock_check.check())


def comment(base_revision: str, images_dir: Path, images_url: str | None, lock_file: Path | None,
            comment_dir: Path) -> str:
    """The whole comment, Markdown."""
    base = short_revision(base_revision)
    params = table_or(dvc("params", "diff", "--md", base), "No parameter changed.")
    return "\n".join([
        MARKER,
        f"## DVC report: `{base}` (base) → {BRANCH_LABEL}",
        "",
        "### dvc.lock",
        "",
        lock_section(lock_file),
        "",
        "### Metrics",
        "",
        metrics_section(base),
        "",
        "### Params",
        "",
        params,
        "",
        "### Plots",
        "",
        plots_section(base, images_dir, images_url, comment_dir),
        "",
    ] + ([f"The branch's model card: `{MODEL_CARD}` (its diff shows what changed).", ""]
         if MODEL_CARD.exists() else []))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="base revision: the pull request's base commit or branch")
    parser.add_argument("--images-dir", type=Path, default=Path("pr_plots"), help="where to write the plot images")
    parser.add_argument("--images-url", help="URL the images will be served from (default: relative links)")
    parser.add_argument("--lock", type=Path, help="Markdown from .ci/lock_check.py (default: check now)")
    parser.add_argument("--output", type=Path, help="write the Markdown here instead of stdout")
    args = parser.parse_args(argv)
    comment_dir = args.output.parent if args.output else Path(".")
    text = comment(args.base, args.images_dir, args.images_url, args.lock, comment_dir)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
