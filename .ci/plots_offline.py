"""Build .dvc/plots/offline.html: DVC's plots page with vega, vega-lite and vega-embed inlined.

    python .ci/plots_offline.py            # npm pack the versions dvc-render names; write the template
    python .ci/plots_offline.py --check    # exit 1 if the template's versions are not dvc-render's

`dvc plots show|diff` writes a page that loads these libraries from a CDN: without a network its
charts are blank, with no warning. `.dvc/config` sets `plots.html_template` to this template, which
holds the minified builds (with their licences) of exactly the versions dvc-render's page names, and
no `{scripts}` placeholder, so DVC adds no CDN tags. Only rebuilding needs npm and its registry
(after a DVC upgrade changes the versions: `--check`, run by the tests, says so).
Docs: docs/pull_requests.md ("Plots offline").
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[1] / ".dvc" / "plots" / "offline.html"
PACKAGES = ("vega", "vega-lite", "vega-embed")  # load order: vega-lite needs vega, vega-embed both
BUILD = "package/build/{name}.min.js"  # what the CDN serves for the bare package URL (package.json "jsdelivr")
HEADER = "<!-- inlined: {name}@{version} ({licence}) -->"
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
__SCRIPTS__
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def cdn_versions() -> dict[str, str]:
    """Package -> version that the installed dvc-render's page loads from the CDN, in load order."""
    from dvc_render.vega import VegaRenderer

    found = dict(re.findall(r'src="https://cdn\.jsdelivr\.net/npm/([a-z-]+)@([0-9.]+)"', VegaRenderer.SCRIPTS))
    if list(found) != list(PACKAGES):
        raise SystemExit(f"dvc-render's page loads {found}, not {PACKAGES}: update {Path(__file__).name}")
    return found


def template_versions(page: str) -> dict[str, str]:
    """Package -> version that a built template inlines, from its headers."""
    return dict(re.findall(r"<!-- inlined: ([a-z-]+)@([0-9.]+) ", page))


def page(builds: dict[str, tuple[str, str, str]]) -> str:
    """The template: package -> (version, licence text, minified build), inlined in load order."""
    scripts = []
    for name in PACKAGES:
        version, licence, code = builds[name]
        for text in (licence, code):
            if re.search(r"</script|\{(plot_divs|scripts|refresh_tag)\}", text, re.IGNORECASE):
                raise ValueError(f"{name}@{version} holds text that would end the script or fill a placeholder")
        scripts += [HEADER.format(name=name, version=version, licence="BSD-3-Clause"),
                    f"<script>\n/*\n{licence.strip()}\n*/\n{code.strip()}\n</script>"]
    return PAGE.replace("__SCRIPTS__", "\n".join(scripts))


def npm_build(name: str, version: str, folder: Path) -> tuple[str, str, str]:
    """(version, licence, minified build) of one package from the npm registry (`npm pack`)."""
    done = subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=folder, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"npm pack {name}@{version} failed: {done.stderr.strip()}")
    with tarfile.open(folder / done.stdout.strip().splitlines()[-1]) as tar:
        read = lambda member: tar.extractfile(member).read().decode("utf-8")  # noqa: E731
        return version, read("package/LICENSE"), read(BUILD.format(name=name))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare the template's versions with dvc-render's")
    parser.add_argument("--output", type=Path, default=TEMPLATE, help=f"default: {TEMPLATE}")
    args = parser.parse_args(argv)
    wanted = cdn_versions()
    if args.check:
        have = template_versions(args.output.read_text(encoding="utf-8")) if args.output.exists() else {}
        if have != wanted:
            print(f"{args.output}: inlines {have or 'nothing'}, dvc-render loads {wanted}: run "
                  f"python .ci/plots_offline.py", file=sys.stderr)
            return 1
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        builds = {name: npm_build(name, version, Path(tmp)) for name, version in wanted.items()}
    args.output.write_text(page(builds), encoding="utf-8")
    print(f"{args.output}: {args.output.stat().st_size / 1e6:.2f} MB, " +
          ", ".join(f"{n}@{v}" for n, v in wanted.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
