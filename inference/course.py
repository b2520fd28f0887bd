"""Build the course: execute every tutorial as a notebook and write HTML pages with an index.

    python -m bayeszoo.inference.course --out build/course tutorials/01_*.py tutorials/02_*.py ...

Each jupytext "percent" file becomes an executed notebook and one HTML page (figures
inline); ``index.html`` links them in order. Set SMOKE_TEST=1 for a quick dry run.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
import time
from pathlib import Path


def _title(notebook, fallback: str) -> str:
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return fallback


def build_page(tutorial: Path, out: Path, kernel: str = "python3") -> tuple[str, float]:
    """Execute one tutorial and write ``out/<name>.html``; returns (title, seconds)."""
    import jupytext
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import ExecutePreprocessor

    notebook = jupytext.read(tutorial)
    # The kernel must use matplotlib's inline backend so that figures land in the page;
    # a MPLBACKEND=Agg inherited from the shell would swallow them.
    os.environ.pop("MPLBACKEND", None)
    started = time.perf_counter()
    ExecutePreprocessor(timeout=None, kernel_name=kernel).preprocess(
        notebook, {"metadata": {"path": str(Path.cwd())}})
    seconds = time.perf_counter() - started
    body, _ = HTMLExporter().from_notebook_node(notebook)
    (out / f"{tutorial.stem}.html").write_text(body)
    return _title(notebook, tutorial.stem), seconds


def write_index(out: Path, pages: list[tuple[str, str, float]]) -> Path:
    mode = "smoke test" if os.environ.get("SMOKE_TEST") == "1" else "full"
    items = "\n".join(f'  <li><a href="{html.escape(name)}.html">{html.escape(title)}</a> '
                      f"<small>({seconds:.0f} s)</small></li>" for name, title, seconds in pages)
    index = out / "index.html"
    index.write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>bayeszoo course</title></head>
<body style="font-family: sans-serif; max-width: 48em; margin: 2em auto">
<h1>bayeszoo: the course</h1>
<p>Every page was executed on this machine ({mode} mode); figures are recomputed, not stored.</p>
<ol>
{items}
</ol>
</body></html>
""")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tutorials", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("build/course"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pages = []
    for number, tutorial in enumerate(args.tutorials, 1):
        print(f"[{number}/{len(args.tutorials)}] executing {tutorial} ...", flush=True)
        title, seconds = build_page(tutorial, args.out)
        print(f"    done in {seconds:.0f} s -> {args.out / (tutorial.stem + '.html')}", flush=True)
        pages.append((tutorial.stem, title, seconds))
    print(f"course index: {write_index(args.out, pages)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
