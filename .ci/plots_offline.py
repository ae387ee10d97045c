"""`dvc plots show` / `dvc plots diff` as a page that works offline.

    python .ci/plots_offline.py                 # dvc plots show  -> dvc_plots/index.html
    python .ci/plots_offline.py diff main       # dvc plots diff main -> dvc_plots/index.html
    python .ci/plots_offline.py show --open     # any other `dvc plots` option passes through

DVC's page loads vega, vega-lite and vega-embed from a CDN, so without internet its charts are
blank. This writes an HTML template with those libraries inlined (from vl-convert-python, which
bundles them; no network) and runs `dvc plots show|diff --html-template` with it: the page,
about 1 MB, then opens in any browser without a network.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

TEMPLATE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots</title>
    <script>
__BUNDLE__
    </script>
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
        img { max-width: 100%; }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def offline_template() -> str:
    """DVC's page template with vega-embed, vega-lite and vega inlined (`vegaEmbed` defined globally)."""
    import vl_convert

    return TEMPLATE.replace("__BUNDLE__", vl_convert.javascript_bundle())


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and args[0] in ("show", "diff") else "show"
    with tempfile.TemporaryDirectory() as tmp:
        template = Path(tmp) / "offline.html"
        template.write_text(offline_template(), encoding="utf-8")
        return subprocess.run([sys.executable, "-m", "dvc", "plots", command, "--html-template", str(template),
                               *args]).returncode


if __name__ == "__main__":
    sys.exit(main())
