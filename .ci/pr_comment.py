"""Build a pull request's report comment: what the branch changes in metrics, params and plots.

    python .ci/pr_comment.py BASE_REV [--plots-dir DIR] [--plots-url URL] [--output FILE]

Compares the workspace (after `dvc repro`) with BASE_REV, the pull request's base commit, using
DVC's own diffs: `dvc metrics diff --md`, `dvc params diff --md` and `dvc plots diff --out DIR`
(an HTML page with every plot of both revisions, uploaded by CI as an artifact that
`--plots-url` links to). It only reads the repository, so the same comment can be previewed
locally before pushing: `python .ci/pr_comment.py main`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

MARKER = "<!-- dvc-pr-report -->"  # lets a reader (or a bot) find this comment among others
MODEL_CARD = Path("metrics/report/model_card.md")  # written by the `report` stage


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
    """A short commit id, so that DVC's table headers stay narrow and the revision is exact."""
    return run("git", "rev-parse", "--short=8", "--verify", f"{revision}^{{commit}}").strip()


def table_or(markdown: str, nothing: str) -> str:
    """DVC prints a header-only table when nothing changed; say so in words instead."""
    lines = [line for line in markdown.strip().splitlines() if line.strip()]
    return "\n".join(lines) if len(lines) > 2 else nothing


def plots_section(base: str, plots_dir: Path, plots_url: str | None) -> str:
    """Render every plot of both revisions into `plots_dir`; list them and link to the rendering."""
    names = sorted(json.loads(dvc("plots", "diff", base, "--json")).get("data", {}))
    dvc("plots", "diff", base, "--out", str(plots_dir))
    where = (f"[open the rendered plots]({plots_url}) (artifact `{plots_dir.name}`: `index.html`)" if plots_url
             else f"open `{plots_dir / 'index.html'}`")
    listed = "\n".join(f"- {name}" for name in names) or "- (no plots defined)"
    return f"{len(names)} plot(s), each drawn for `{base}` and this branch: {where}.\n\n{listed}"


def comment(base_revision: str, plots_dir: Path, plots_url: str | None) -> str:
    """The whole comment, Markdown."""
    base = short_revision(base_revision)
    metrics = table_or(dvc("metrics", "diff", "--md", base), "No metric changed.")
    params = table_or(dvc("params", "diff", "--md", base), "No parameter changed.")
    return "\n".join([
        MARKER,
        f"## DVC report: `{base}` (base) → this branch",
        "",
        "### Metrics",
        "",
        metrics,
        "",
        "### Params",
        "",
        params,
        "",
        "### Plots",
        "",
        plots_section(base, plots_dir, plots_url),
        "",
    ] + ([f"The branch's model card: `{MODEL_CARD}` (its diff shows what changed).", ""]
         if MODEL_CARD.exists() else []))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="base revision: the pull request's base commit or branch")
    parser.add_argument("--plots-dir", type=Path, default=Path("dvc_plots"), help="where to render the plots")
    parser.add_argument("--plots-url", help="link to the rendered plots (e.g. the CI run's artifacts)")
    parser.add_argument("--output", type=Path, help="write the Markdown here instead of stdout")
    args = parser.parse_args(argv)
    text = comment(args.base, args.plots_dir, args.plots_url)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
