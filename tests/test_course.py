"""The course builder: offline pages with figures, navigation, contents; the index; the browser check.

One test executes a tiny tutorial in a kernel (a few seconds); the others convert without executing.
"""

import re
from pathlib import Path

import pytest

from bayeszoo.inference.course import (
    Page,
    build_course,
    build_page,
    chapter_summary,
    installed_tutorials,
    page_problems,
    table_of_contents,
    write_index,
)

ROOT = Path(__file__).resolve().parents[1]

FIGURE_CHAPTER = """# %% [markdown]
# # Chapter 1 — A line
#
# It draws $y = 2x$. Then stops.
#
# ## The figure

# %%
import matplotlib.pyplot as plt
import torch
import tqdm.auto  # warns in a kernel without ipywidgets unless the builder silences it

torch.func.jacfwd(torch.sin)(torch.zeros(()))  # torch's first forward-mode use warns about torch.jit

plt.plot([0, 1], [0, 2])
plt.show()
"""
PLAIN_CHAPTER = """# %% [markdown]
# # Chapter {number} — Plain
#
# Chapter {number} says one thing. Then another.
#
# ## First part
#
# ### A detail with $\\alpha$
#
# ## Second part

# %%
x = 1
"""


def network_references(page: str) -> list[str]:
    """Every script, stylesheet, image or frame address in the page that is not local."""
    attributes = re.findall(r'<(?:script|link|img|iframe)\b[^>]*?(?:src|href)="([^"]*)"', page)
    in_css = re.findall(r"url\((?:'|\")?https?:", page)
    return [url for url in attributes if re.match(r"(https?:)?//", url)] + in_css


def write_chapters(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(1, count + 1):
        path = folder / f"0{number}_plain.py"
        path.write_text(PLAIN_CHAPTER.format(number=number))
        paths.append(path)
    return paths


def test_executed_page_embeds_its_figure_and_shows_no_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLBACKEND", "Agg")  # as make test sets it: the builder must not pass it on
    tutorial = tmp_path / "01_line.py"
    tutorial.write_text(FIGURE_CHAPTER)
    page = build_page(tutorial, tmp_path / "out")
    text = (tmp_path / "out" / "01_line.html").read_text()
    assert page.title == "Chapter 1 — A line" and page.seconds > 0
    assert re.search(r'<img[^>]+src="data:image/png;base64,', text)
    assert 'data-mime-type="application/vnd.jupyter.stderr"' not in text, "a warning cell is in the page"
    assert network_references(text) == []


def test_page_is_offline_navigable_and_has_contents(tmp_path):
    chapters = write_chapters(tmp_path / "tutorials", 3)
    out = tmp_path / "course"
    pages = build_course(out, chapters, run=False, log=lambda line: None)
    middle = (out / "02_plain.html").read_text()
    assert network_references(middle) == []
    mathjax = re.search(r'<script src="([^"?]+)\?config=', middle).group(1)
    assert mathjax == "mathjax/MathJax.js" and (out / mathjax).is_file()
    assert '<a rel="prev" href="01_plain.html">← Chapter 1 — Plain</a>' in middle
    assert '<a rel="next" href="03_plain.html">Chapter 3 — Plain →</a>' in middle
    first = (out / "01_plain.html").read_text()
    assert 'rel="prev"' not in first and 'rel="next" href="02_plain.html"' in first
    for anchor in ("First-part", "A-detail-with-$%5Calpha$", "Second-part"):
        assert f'<a href="#{anchor}">' in middle and f'id="{anchor}"' in middle
    assert [page.seconds for page in pages] == [None, None, None]


def test_table_of_contents_lists_h2_and_h3_without_the_pilcrow():
    body = ('<h1 id="T">T<a class="anchor-link" href="#T">¶</a></h1>'
            '<h2 id="A-&amp;-B">A &amp; B<a class="anchor-link" href="#A-&amp;-B">¶</a></h2>'
            '<h3 id="c">c<a class="anchor-link" href="#c">¶</a></h3>')
    assert table_of_contents(body) == (
        '<nav class="course-toc"><strong>Contents</strong>\n<ul>\n'
        '<li class="level-2"><a href="#A-&amp;-B">A &amp; B</a></li>\n'
        '<li class="level-3"><a href="#c">c</a></li>\n</ul></nav>')


def test_course_index_links_every_page_with_summary_and_time(tmp_path):
    index = write_index(tmp_path, [Page("01_a", "PCA & autoencoders", "Keep the *top* directions.", 3.0),
                                   Page("02_b", "VAE", "Learn $q(z \\mid x)$.", 65.4)])
    text = index.read_text()
    assert '<a href="01_a.html">PCA &amp; autoencoders</a> <small>(3 s)</small>' in text
    assert "<p>Keep the <em>top</em> directions.</p>" in text
    assert '<a href="02_b.html">VAE</a> <small>(65 s)</small><p>Learn $q(z \\mid x)$.</p>' in text
    assert text.index("01_a.html") < text.index("02_b.html")
    assert "68 s in all" in text
    assert network_references(text) == []


def test_chapter_summary_is_the_metadata_line_or_the_first_sentence():
    import nbformat

    def notebook(source, **metadata):
        return nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell(source)], metadata=metadata)

    assert chapter_summary(notebook("# T\n\nOne, e.g. $p(x)$. Two.\nThree.")) == "One, e.g. $p(x)$."
    assert chapter_summary(notebook("# T\n\nA model is seen through\nnoise:\n\n$$x$$")) == \
        "A model is seen through noise…"
    assert chapter_summary(notebook("# T\n\nLong text.", summary=" Short. ")) == "Short."


def test_every_chapter_declares_a_one_line_summary_for_the_index():
    # The first sentence is a fallback: in most chapters it links back to the one before
    # ("Chapter 4 made q richer...") and says nothing of the chapter itself.
    import jupytext

    for tutorial in installed_tutorials():
        summary = jupytext.read(tutorial).metadata.get("summary", "")
        assert 40 <= len(summary) <= 250 and "\n" not in summary, tutorial.name


def test_installed_tutorials_are_the_numbered_chapters_in_order():
    assert installed_tutorials() == sorted((ROOT / "tutorials").glob("[0-9]*.py"))


@pytest.mark.parametrize("dom, expected", [
    ('<p>typeset <span id="MathJax-Element-1-Frame">x</span><script type="math/tex">x</script></p>'
     '<a href="#here">ok</a><h2 id="here">h</h2><a href="https://example.org">far</a>', []),
    ('<p>left raw: $x$</p><script type="math/tex">y</script>',
     ["0 of 1 formulas typeset", "2 raw TeX delimiters left, first in 'left raw: $x$'"]),
    ('<pre>costs $5</pre><a href="#nowhere">x</a><a href="02_missing.html">y</a>',
     ["link to a missing anchor: #nowhere", "link to a missing file: 02_missing.html"]),
    ('<script src="https://cdn.example/x.js"></script><span class="merror">bad</span>',
     ["1 MathJax errors", "loads from the network: https://cdn.example/x.js"]),
])
def test_browser_check_verdicts(tmp_path, dom, expected):
    page = tmp_path / "01_a.html"
    assert page_problems(tmp_path, page, dom) == [f"01_a.html: {problem}" for problem in expected]
