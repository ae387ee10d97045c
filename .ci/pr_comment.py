"""Build a pull request's report comment (dvc.lock, metrics, params, plots against the merge base); post it.

    python .ci/pr_comment.py BASE_REV [--images-dir DIR] [--images-url URL] [--lock FILE] [--output FILE]
    python .ci/pr_comment.py --post PR --body-file FILE   # CI: edit the comment that starts with MARKER, or add it

The base is `git merge-base BASE_REV HEAD`: what the branch changed, not what BASE_REV gained since.
Headline figures come first (validation, then test), a change within the committed configuration's
seed spread (SEED_SPREAD) marked so; every changed metric and the changed plots (vl-convert PNGs, both
revisions in one image, to --images-dir) follow, collapsed. No remote needed: metrics and plot data
are git-tracked. dvc.lock's state is .ci/lock_check.py's, or `--lock`'s Markdown from an earlier step.
Posting looks the report up by MARKER through the GitHub API (`gh api`), whatever was said after it.
Docs: docs/pull_requests.md.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MARKER = "<!-- dvc-pr-report -->"  # the report's first line: how the post step finds it again
MODEL_CARD = Path("metrics/report/model_card.md")  # written by the `report` stage
VEGA_LITE_VERSION = "5.21"  # DVC's templates are vega-lite v5 specs
BRANCH_LABEL = "this branch"
TEST_METRICS = ("metrics/test.json", "metrics/export.json", "metrics/report/")  # figures on the test split
# The figures a reviewer reads first, whether they changed or not: (split, what, file, key); a
# tuple of keys shows as a list.
HEADLINE = tuple((split, label, f"metrics/{split}.json", key) for split in ("val", "test") for label, key in (
    ("balanced accuracy", "balanced_accuracy"),
    ("balanced accuracy, 95% CI", ("balanced_accuracy_ci95_low", "balanced_accuracy_ci95_high")),
    ("melanoma sensitivity at the operating point", "operating_point.mel_sensitivity"),
    ("melanoma specificity at the operating point", "operating_point.mel_specificity"),
)) + (("test", "expected calibration error", "metrics/test.json", "calibration.ece"),)
# The committed configuration trained with several seeds (README "Results"): `{split}_{key}` -> sd.
SEED_SPREAD = Path("experiments/results/white_balance_0.1_vs_zoom_0.2.intel.json")
SPREAD_SDS = 2  # a change within 2 seed sds is one two runs of the same configuration often show
FIGURES = Path(__file__).resolve().parents[1] / "stages" / "lib" / "figures.py"  # lookup, fmt


def load_module(path: Path):
    """A Python file as a module, loaded by its path: this script runs as a file, outside the
    project's package (CI's posting job checks out .ci/ only, and loads nothing)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def figures():
    """stages/lib/figures.py: the nested-key lookup and the figure format the model card uses too."""
    return load_module(FIGURES)


def run(*command: str, stdin: str | None = None) -> str:
    """stdout of a command; a failure stops the script with the command's own message."""
    done = subprocess.run(command, capture_output=True, text=True, input=stdin)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr.strip()}")
    return done.stdout


def dvc(*args: str) -> str:
    """Run DVC from this interpreter's environment, whatever `dvc` is first on PATH."""
    return run(sys.executable, "-m", "dvc", *args)


def merge_base(revision: str) -> str:
    """Short id of the commit where HEAD's branch left `revision`: the base a pull request's diff is against."""
    base = run("git", "merge-base", f"{revision}^{{commit}}", "HEAD").strip()
    return run("git", "rev-parse", "--short=8", "--verify", f"{base}^{{commit}}").strip()


def table_or(markdown: str, nothing: str) -> str:
    """DVC prints a header-only table when nothing changed; say so in words instead."""
    lines = [line for line in markdown.strip().splitlines() if line.strip()]
    return "\n".join(lines) if len(lines) > 2 else nothing


def is_test(path: str) -> bool:
    """Whether a metrics file holds figures on the test split (by name, or one of TEST_METRICS)."""
    return "test" in Path(path).stem or any(path == p or (p.endswith("/") and path.startswith(p))
                                             for p in TEST_METRICS)


def details(summary: str, body: str) -> str:
    """A collapsed block (GitHub Markdown renders inside it given the blank lines)."""
    return f"<details>\n<summary>{summary}</summary>\n\n{body.strip()}\n\n</details>"


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------
def shown(value) -> str:
    """A figure as the comment shows it: 4 decimals, whole numbers without thousands separators."""
    return figures().fmt(value, digits=4, thousands=False)


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


def numbers(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def change(old, new) -> str:
    """The signed difference of two numbers; "changed" for other values that differ."""
    if old == new:
        return ""
    if numbers(old, new):
        return ("+" if new - old > 0 else "") + shown(float(new - old))
    return "changed"


def metrics_table(path: str, changes: dict) -> list[str]:
    rows = ["| metric | base | this branch | change |", "|:---|---:|---:|---:|"]
    for key in key_order(path, changes):
        diff = changes[key].get("diff")
        sign = "+" if isinstance(diff, (int, float)) and diff > 0 else ""
        change_text = "" if diff is None else sign + shown(diff)
        rows.append(f"| {key} | {shown(changes[key].get('old'))} | {shown(changes[key].get('new'))} | {change_text} |")
    return rows


def seed_spread(path: Path) -> dict[str, dict]:
    """`{split}_{key}` -> {"sd", "n", ...} from a seeds summary (experiments/results/); {} if absent."""
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {name: entry for name, entry in summary.items() if isinstance(entry, dict) and "sd" in entry}


def spread_note(split: str, key: str, old, new, spread: dict[str, dict]) -> str:
    """"within seed spread (sd S)" where |new - old| <= SPREAD_SDS sd of `{split}_{key}` over the seeds."""
    entry = spread.get(f"{split}_{key.replace('.', '_')}")
    if entry is None or not numbers(old, new) or old == new or abs(new - old) > SPREAD_SDS * entry["sd"]:
        return ""
    return f"within seed spread (sd {entry['sd']:.3f})"


def headline_table(old: dict[str, dict], new: dict[str, dict], spread: dict[str, dict]) -> str:
    """HEADLINE's rows that either revision has; `old`, `new`: path -> the metrics file's JSON."""
    rows = ["| split | metric | base | this branch | change | |", "|:---|:---|---:|---:|---:|:---|"]
    for split, label, path, key in HEADLINE:
        before, after = (figures().lookup(files.get(path, {}), key) for files in (old, new))
        if before is None and after is None:
            continue
        note = spread_note(split, key, before, after, spread) if isinstance(key, str) else ""
        rows.append(f"| {'test' if split == 'test' else 'validation'} | {label} | {shown(before)} | {shown(after)} | "
                    f"{change(before, after)} | {note} |")
    return "\n".join(rows) if len(rows) > 2 else "No headline figure in either revision."


def metrics_at(revision: str | None, path: str) -> dict:
    """A JSON metrics file as committed at `revision` (None: the workspace); {} if absent."""
    if revision is None:
        text = Path(path).read_text(encoding="utf-8") if Path(path).is_file() else "{}"
    else:
        shown = subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True, text=True)
        text = shown.stdout if shown.returncode == 0 else "{}"
    try:
        return json.loads(text)
    except ValueError:
        return {}


def metrics_section(base: str, spread_file: Path) -> str:
    """The headline table, then every changed metric (validation and training first) collapsed."""
    paths = {path for _, _, path, _ in HEADLINE}
    spread = seed_spread(spread_file)
    headline = headline_table({p: metrics_at(base, p) for p in paths}, {p: metrics_at(None, p) for p in paths},
                              spread)
    legend = (f"A change marked *within seed spread* is at most {SPREAD_SDS} standard deviations of the "
              f"committed configuration's seeds (`{spread_file}`): one run cannot tell it from noise."
              if spread else f"No seeds summary at `{spread_file}`: no change is marked as within seed spread.")
    diff = json.loads(dvc("metrics", "diff", base, "--json") or "{}")
    diff = {path: changes for path, changes in diff.items() if changes}
    if not diff:
        return "\n\n".join([headline, legend, "No metric changed."])
    parts = []
    groups = (("Validation and training", [p for p in diff if not is_test(p)]),
              ("Test split (held out: compare, never tune on it)", [p for p in diff if is_test(p)]))
    for title, group in groups:
        if not group:
            continue
        parts += [f"#### {title}", ""]
        for path in sorted(group, key=lambda p: (p != "metrics/val.json", p != "metrics/test.json", p)):
            parts += [f"`{path}`", ""] + metrics_table(path, diff[path]) + [""]
    rows = sum(len(changes) for changes in diff.values())
    return "\n\n".join([headline, legend, details(f"Every changed metric ({rows} in {len(diff)} files)",
                                                  "\n".join(parts))])


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
    """Render what changed into `images_dir`; Markdown that shows the images, collapsed."""
    images_dir.mkdir(parents=True, exist_ok=True)
    charts, sheets, unchanged = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        shown = json.loads(dvc("plots", "diff", base, "--json", "--out", tmp) or "{}").get("data", {})
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
            (charts if vega else sheets).append(f"**{plot_title(name)}**\n\n![{plot_title(name)}]({link})")
    parts = []
    if charts:
        parts.append(details(f"{len(charts)} charts whose data changed (validation first; base and this branch "
                             "in each)", "\n\n".join(charts)))
    if sheets:
        parts.append(details(f"{len(sheets)} Grad-CAM sheets that changed (test images)", "\n\n".join(sheets)))
    if not parts:
        parts.append("No plot's data changed.")
    if unchanged:
        parts.append(f"Unchanged: {', '.join(unchanged)}.")
    return "\n\n".join(parts)


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
    lock_check = load_module(Path(__file__).with_name("lock_check.py"))
    return lock_check.markdown(lock_check.check())


def comment(base_revision: str, images_dir: Path, images_url: str | None, lock_file: Path | None,
            comment_dir: Path, spread_file: Path = SEED_SPREAD) -> str:
    """The whole comment, Markdown."""
    base = merge_base(base_revision)
    params = table_or(dvc("params", "diff", "--md", base), "No parameter changed.")
    return "\n".join([
        MARKER,
        f"## DVC report: `{base}` (merge base) → {BRANCH_LABEL}",
        "",
        f"Against `{base}`, where this branch left `{base_revision}`: what the branch changes, not what "
        f"`{base_revision}` gained since.",
        "",
        "### dvc.lock",
        "",
        lock_section(lock_file),
        "",
        "### Metrics",
        "",
        metrics_section(base, spread_file),
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


# --------------------------------------------------------------------------------------------
# Posting (CI)
# --------------------------------------------------------------------------------------------
def report_comment(comments: list[dict]) -> int | None:
    """Id of the last comment whose body starts with MARKER (the report posted before), if any."""
    ids = [c["id"] for c in comments if (c.get("body") or "").lstrip().startswith(MARKER)]
    return ids[-1] if ids else None


def post(pr: int, body: str) -> str:
    """Edit the pull request's report comment, or add one; its URL. Needs `gh` with GH_TOKEN, GH_REPO."""
    listed = run("gh", "api", "--paginate", f"repos/{{owner}}/{{repo}}/issues/{pr}/comments",
                 "--jq", ".[] | {id, body} | @json")
    found = report_comment([json.loads(line) for line in listed.splitlines() if line.strip()])
    payload = json.dumps({"body": body})
    if found is None:
        done = run("gh", "api", "--method", "POST", f"repos/{{owner}}/{{repo}}/issues/{pr}/comments",
                   "--input", "-", stdin=payload)
    else:
        done = run("gh", "api", "--method", "PATCH", f"repos/{{owner}}/{{repo}}/issues/comments/{found}",
                   "--input", "-", stdin=payload)
    return json.loads(done).get("html_url", "")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", nargs="?", help="base revision: the pull request's base branch or commit")
    parser.add_argument("--images-dir", type=Path, default=Path("pr_plots"), help="where to write the plot images")
    parser.add_argument("--images-url", help="URL the images will be served from (default: relative links)")
    parser.add_argument("--lock", type=Path, help="Markdown from .ci/lock_check.py (default: check now)")
    parser.add_argument("--seed-spread", type=Path, default=SEED_SPREAD,
                        help=f"seeds summary whose sd marks a change as noise (default: {SEED_SPREAD})")
    parser.add_argument("--output", type=Path, help="write the Markdown here instead of stdout")
    parser.add_argument("--post", type=int, metavar="PR", help="post --body-file as pull request PR's report")
    parser.add_argument("--body-file", type=Path, help="with --post: the comment to post")
    args = parser.parse_args(argv)
    if args.post is not None:
        if args.body_file is None:
            parser.error("--post needs --body-file")
        print(post(args.post, args.body_file.read_text(encoding="utf-8")))
        return
    if args.base is None:
        parser.error("give the base revision (or --post)")
    comment_dir = args.output.parent if args.output else Path(".")
    text = comment(args.base, args.images_dir, args.images_url, args.lock, comment_dir, args.seed_spread)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
