"""Build the course: execute every tutorial as a notebook and write linked HTML pages that work offline.

    python -m bayeszoo.inference.course --out build/course [tutorials/01_*.py ...]

Each jupytext "percent" file becomes an executed notebook and one HTML page: figures inline,
a table of contents from its headings, links to the previous and next chapters. ``index.html``
lists every chapter with a one-line summary and its run time. Math is typeset by a local copy
of MathJax (from the ``jupyter-server-mathjax`` package) copied into the output folder, so no
page loads anything from the network. Set SMOKE_TEST=1 for a quick dry run. When Chromium is
installed, every page is then opened headless to check that the math rendered and the links resolve.
"""

from __future__ import annotations

import argparse
import html
import importlib.resources
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

MATHJAX_DIR = "mathjax"
# The package ships MathJax 2.7 with the combined HTML-CSS config and STIX web fonts only.
MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full,Safe"
MATHJAX_SETTINGS = """<script type="text/x-mathjax-config">
MathJax.Hub.Config({
  tex2jax: {inlineMath: [["$", "$"], ["\\\\(", "\\\\)"]], displayMath: [["$$", "$$"], ["\\\\[", "\\\\]"]],
            processEscapes: true, processEnvironments: true},
  TeX: {equationNumbers: {autoNumber: "AMS", useLabelIds: true}},
  "HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null},
  displayAlign: "center", messageStyle: "none"
});
</script>
<script src="%s"></script>"""
STYLE = """<style>
.course-nav { display: flex; justify-content: space-between; gap: 1em; margin: 1em 0; }
.course-nav, .course-toc { font-family: sans-serif; padding: 0 20px 0 84px; }
.course-toc { margin: 0 0 2em 0; }
.course-toc li.level-3 { margin-left: 1.5em; }
</style>"""
# The lab template, minus everything it would fetch from a CDN: require.js and the widget
# manager (no page has widgets), mermaid (no page has diagrams) and MathJax (a local copy instead).
# The placeholders take the navigation, which needs the headings of the rendered page.
TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block html_head_js_mathjax -%}{{ resources.course_head }}{%- endblock html_head_js_mathjax -%}
{%- block body_header -%}{{ super() }}<!-- course:top -->{%- endblock body_header -%}
{% block body_footer %}<!-- course:bottom -->{{ super() }}{% endblock body_footer %}
"""
# Run in the kernel before the first cell, to keep two warnings nobody reading the page can act
# on out of it: tqdm.auto (imported by Pyro) warns when the kernel has no ipywidgets and falls
# back to text bars, which is what a static page wants; and torch's own forward-mode autograd
# (torch.func.jacfwd, chapter 5's VLAE) calls the deprecated torch.jit.script on first use.
KERNEL_SETUP = ("import warnings; "
                "warnings.filterwarnings('ignore', message='IProgress not found'); "
                "warnings.filterwarnings('ignore', message='`torch.jit.script` is deprecated', "
                "category=FutureWarning, module='torch')")


@dataclass
class Page:
    name: str
    title: str
    summary: str  # markdown
    seconds: float | None  # None: not executed

    @property
    def file(self) -> str:
        return f"{self.name}.html"


def installed_tutorials() -> list[Path]:
    """The numbered tutorials: packaged under bayeszoo/tutorials/, else the checkout's tutorials/."""
    candidates = [importlib.resources.files("bayeszoo") / "tutorials",
                  Path(__file__).resolve().parents[1] / "tutorials"]
    for folder in candidates:
        if folder.is_dir():
            found = sorted(Path(str(f)) for f in folder.iterdir() if re.fullmatch(r"\d+.*\.py", f.name))
            if found:
                return found
    raise FileNotFoundError("no tutorials found in the installed package nor in a checkout")


def copy_mathjax(out: Path) -> str:
    """Copy MathJax into ``out/mathjax`` (once) and return the script URL relative to ``out``."""
    spec = importlib.util.find_spec("jupyter_server_mathjax")  # located, not imported: no server
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the course needs a local MathJax: pip install jupyter-server-mathjax")
    source = Path(spec.submodule_search_locations[0]) / "static"
    target = out / MATHJAX_DIR
    if not (target / "MathJax.js").is_file():
        # The SVG output's fonts ship without the SVG output itself: useless, and 3 MB.
        shutil.copytree(source, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("SVG"))
    return f"{MATHJAX_DIR}/MathJax.js?config={MATHJAX_CONFIG}"


def head(mathjax_url: str, title: str | None = None) -> str:
    title_tag = f"<title>{html.escape(title)}</title>\n" if title else ""
    return title_tag + MATHJAX_SETTINGS % html.escape(mathjax_url) + "\n" + STYLE


def chapter_title(notebook, fallback: str) -> str:
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return fallback


def chapter_summary(notebook) -> str:
    """``summary`` from the notebook metadata, else the first sentence after the title (markdown)."""
    if notebook.metadata.get("summary"):
        return str(notebook.metadata["summary"]).strip()
    for cell in notebook.cells:
        if cell.cell_type != "markdown":
            continue
        for paragraph in re.split(r"\n\s*\n", cell.source):
            paragraph = " ".join(paragraph.split())
            if paragraph and not paragraph.startswith(("#", "$$")):
                # A sentence ends at . ! or ? before a capital; one running into an equation, at ":".
                sentence = re.match(r"(.+?[.!?])(?=\s+[A-Z(*]|$)", paragraph)
                text = sentence.group(1) if sentence else paragraph
                return text[:-1] + "…" if text.endswith(":") else text
    return ""


def execute(notebook, workdir: Path, kernel: str = "python3") -> float:
    """Run every cell in a fresh kernel; returns the wall-clock seconds."""
    from nbclient import NotebookClient
    from traitlets.config import Config

    # The inline backend puts figures in the page; a MPLBACKEND=Agg inherited from the shell
    # (make test sets it) would swallow them. IPC sockets: a local kernel needs no TCP ports.
    # The socket paths must be absolute: the kernel runs in workdir, this process elsewhere.
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}
    with tempfile.TemporaryDirectory() as sockets:
        ipc = Config({"KernelManager": {"transport": "ipc", "ip": str(Path(sockets) / "kernel")}})
        client = NotebookClient(notebook, timeout=None, kernel_name=kernel, config=ipc,
                                resources={"metadata": {"path": str(workdir)}},
                                extra_arguments=[f"--IPKernelApp.exec_lines={KERNEL_SETUP}"])
        started = time.perf_counter()
        client.execute(env=env)
        return time.perf_counter() - started


class _Headings(HTMLParser):
    """Collects (level, id, text) of the h2/h3 elements nbconvert wrote (it gives each an id)."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[int, str, str]] = []
        self._open: tuple[int, str] | None = None
        self._text: list[str] = []
        self._in_anchor = False

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag in ("h2", "h3") and attributes.get("id"):
            self._open, self._text = (int(tag[1]), attributes["id"]), []
        elif tag == "a" and "anchor-link" in (attributes.get("class") or ""):
            self._in_anchor = True  # the pilcrow nbconvert appends to each heading

    def handle_endtag(self, tag):
        if tag == "a":
            self._in_anchor = False
        elif self._open and tag == f"h{self._open[0]}":
            self.found.append((*self._open, "".join(self._text).strip()))
            self._open = None

    def handle_data(self, data):
        if self._open and not self._in_anchor:
            self._text.append(data)


def table_of_contents(body: str) -> str:
    parser = _Headings()
    parser.feed(body)
    items = "\n".join(
        f'<li class="level-{level}"><a href="#{html.escape(anchor)}">{html.escape(text)}</a></li>'
        for level, anchor, text in parser.found)
    return f'<nav class="course-toc"><strong>Contents</strong>\n<ul>\n{items}\n</ul></nav>'


def navigation(previous: Page | None, following: Page | None) -> str:
    def link(page: Page | None, rel: str, arrow: str) -> str:
        if page is None:
            return "<span></span>"
        title = html.escape(page.title)
        label = f"{arrow} {title}" if rel == "prev" else f"{title} {arrow}"
        return f'<a rel="{rel}" href="{html.escape(page.file)}">{label}</a>'
    return (f'<nav class="course-nav">{link(previous, "prev", "←")}'
            f'<a href="index.html">Course index</a>{link(following, "next", "→")}</nav>')


def render(notebook, mathjax_url: str, previous: Page | None, following: Page | None) -> str:
    import jinja2
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", template_file="course.html.j2",
                            extra_loaders=[jinja2.DictLoader({"course.html.j2": TEMPLATE})])
    body, _ = exporter.from_notebook_node(notebook, resources={"course_head": head(mathjax_url)})
    nav = navigation(previous, following)
    body = body.replace("<!-- course:top -->", nav + "\n" + table_of_contents(body), 1)
    return body.replace("<!-- course:bottom -->", nav, 1)


def read_page(tutorial: Path) -> tuple[object, Page]:
    import jupytext

    notebook = jupytext.read(tutorial)
    title = chapter_title(notebook, tutorial.stem)
    return notebook, Page(tutorial.stem, title, chapter_summary(notebook), None)


def build_page(tutorial: Path, out: Path, *, run: bool = True, previous: Page | None = None,
               following: Page | None = None, kernel: str = "python3") -> Page:
    """Write ``out/<name>.html`` from one tutorial, executed unless ``run=False`` (then without outputs)."""
    out.mkdir(parents=True, exist_ok=True)
    notebook, page = read_page(tutorial)
    if run:
        page.seconds = execute(notebook, out, kernel)
    (out / page.file).write_text(render(notebook, copy_mathjax(out), previous, following))
    return page


def write_index(out: Path, pages: list[Page]) -> Path:
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    mode = "smoke test" if os.environ.get("SMOKE_TEST") == "1" else "full"
    items = "\n".join(
        f'  <li><a href="{html.escape(page.file)}">{html.escape(page.title)}</a> '
        f"<small>({'not run' if page.seconds is None else f'{page.seconds:.0f} s'})</small>"
        f"{markdown2html_mistune(page.summary)}</li>" for page in pages)
    total = sum(page.seconds or 0.0 for page in pages)
    index = out / "index.html"
    index.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
{head(copy_mathjax(out), "bayeszoo course")}
</head>
<body style="font-family: sans-serif; max-width: 48em; margin: 2em auto">
<h1>bayeszoo: the course</h1>
<p>Every page was executed on this machine ({mode} mode, {total:.0f} s in all); figures are recomputed,
not stored.</p>
<ol>
{items}
</ol>
</body></html>
""")
    return index


def build_course(out_dir: Path, tutorials: list[Path], *, run: bool = True, kernel: str = "python3",
                 log=print) -> list[Page]:
    """Build every page (neighbours linked in the given order) and the index; logs each chapter's time."""
    out_dir = Path(out_dir)
    pages = [read_page(Path(tutorial))[1] for tutorial in tutorials]
    for number, tutorial in enumerate(tutorials):
        log(f"[{number + 1}/{len(tutorials)}] {'executing' if run else 'converting'} {tutorial} ...")
        previous = pages[number - 1] if number > 0 else None
        following = pages[number + 1] if number + 1 < len(pages) else None
        pages[number] = build_page(Path(tutorial), out_dir, run=run, previous=previous,
                                   following=following, kernel=kernel)
        if run:
            log(f"    {pages[number].seconds:.0f} s -> {out_dir / pages[number].file}")
    index = write_index(out_dir, pages)
    if run:
        log("chapter times: " + ", ".join(f"{page.name} {page.seconds:.0f} s" for page in pages))
        log(f"total: {sum(page.seconds for page in pages):.0f} s")
    log(f"course index: {index}")
    return pages


class _RenderedPage(HTMLParser):
    """From a DOM that MathJax has typeset: its ids, its links, the text outside code, and math counts."""

    SKIP = {"script", "style", "pre", "code", "textarea"}

    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.loads: list[str] = []  # what the page fetches: scripts, styles, images, frames
        self.text: list[str] = []
        self.math_sources = self.math_rendered = self.math_errors = 0
        self._skipping = 0

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.ids.add(attributes.get("id") or "")
        classes = (attributes.get("class") or "").split()
        if tag == "a" and attributes.get("href"):
            self.links.append(attributes["href"])
        elif tag in ("script", "img", "iframe", "link") and (attributes.get("src") or attributes.get("href")):
            self.loads.append(attributes.get("src") or attributes.get("href"))
        if tag == "script" and (attributes.get("type") or "").startswith("math/tex"):
            self.math_sources += 1  # MathJax keeps each formula's TeX in such a script
        if re.fullmatch(r"MathJax-Element-\d+-Frame", attributes.get("id") or ""):
            self.math_rendered += 1
        if "merror" in classes or "MathJax_Error" in classes:
            self.math_errors += 1
        if tag in self.SKIP:
            self._skipping += 1

    def handle_endtag(self, tag):
        if tag in self.SKIP and self._skipping:
            self._skipping -= 1

    def handle_data(self, data):
        if not self._skipping:
            self.text.append(data)


def find_chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def rendered_dom(chromium: str, page: Path, budget_ms: int = 60000) -> str:
    """The page's DOM after its scripts ran; virtual time lets MathJax finish without real waiting."""
    with tempfile.TemporaryDirectory() as profile:
        command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                   f"--virtual-time-budget={budget_ms}", "--dump-dom", page.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed on {page}: {done.stderr[-2000:]}")
    return done.stdout


def page_problems(out_dir: Path, page: Path, dom: str) -> list[str]:
    seen = _RenderedPage()
    seen.feed(dom)
    problems = []
    if seen.math_rendered != seen.math_sources:
        problems.append(f"{seen.math_rendered} of {seen.math_sources} formulas typeset")
    if seen.math_errors or "Math Processing Error" in dom:
        problems.append(f"{seen.math_errors} MathJax errors")
    problems += [f"loads from the network: {url}" for url in seen.loads if re.match(r"(https?:)?//", url)]
    text = " ".join("".join(seen.text).split())
    raw = [found.start() for found in re.finditer(r"\$|\\\(|\\\[", text)]
    if raw:
        first = text[max(0, raw[0] - 30):raw[0] + 30]
        problems.append(f"{len(raw)} raw TeX delimiters left, first in {first!r}")
    for link in seen.links:
        target, _, anchor = link.partition("#")
        if re.match(r"[a-z]+:", target):
            continue  # an address outside the course: nothing to check offline
        ids = seen.ids if not target else _ids_in(out_dir / target)
        if ids is None:
            problems.append(f"link to a missing file: {link}")
        elif anchor and anchor not in ids and html.unescape(anchor) not in ids:
            problems.append(f"link to a missing anchor: {link}")
    return [f"{page.name}: {problem}" for problem in problems]


def _ids_in(page: Path) -> set[str] | None:
    if not page.is_file():
        return None
    ids = _RenderedPage()
    ids.feed(page.read_text())
    return ids.ids


def check_in_browser(out_dir: Path, chromium: str | None = None, log=print) -> list[str]:
    """Open every page of a built course in headless Chromium; returns the problems found."""
    chromium = chromium or find_chromium()
    problems = []
    for page in sorted(Path(out_dir).glob("*.html")):
        found = page_problems(Path(out_dir), page, rendered_dom(chromium, page))
        log(f"browser check {page.name}: {'ok' if not found else f'{len(found)} problems'}")
        problems += found
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tutorials", nargs="*", type=Path, help="default: the installed tutorials")
    parser.add_argument("--out", type=Path, default=Path("build/course"))
    parser.add_argument("--no-browser-check", action="store_true")
    args = parser.parse_args(argv)
    log = lambda line: print(line, flush=True)
    build_course(args.out, args.tutorials or installed_tutorials(), log=log)
    chromium = find_chromium()
    if args.no_browser_check or chromium is None:
        log("browser check skipped: " + ("--no-browser-check" if chromium else "no chromium found"))
        return 0
    problems = check_in_browser(args.out, chromium, log=log)
    for problem in problems:
        log(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
