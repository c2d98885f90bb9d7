"""Clean text extraction: content kept, chrome and markup dropped."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from edge_runtime.data import extract
from edge_runtime.data.stdlib_corpus import stdlib_documents

from .data_helpers import DONATION, help_page, make_linux_doc, make_shakespeare, make_stdlib, make_wikipedia


def test_help_page_keeps_the_main_content_and_drops_the_chrome():
    body = """
<p class="paragraph">First   paragraph
   spans lines &amp; has an entity.</p>
<div class="howtoget"><p>Choose <span class="menuitem">Tools - Detective</span>.</p></div>
<p>Choose <span class="switchinline"><span hidden="true" id="IMPRESSx" class="IMPRESS">Slide - New</span><span \
hidden="true" id="defaultx">Page - New</span></span>.</p>
<p>Press <span class="switchinline"><span hidden="true" id="MACx" class="MAC">Command</span><span \
hidden="true" id="defaulty">Ctrl</span></span>+Page Up.</p>
<table><tr><td><p>Cell one</p></td><td><img src="x.svg" alt="Icon"><p>Cell two</p></td></tr></table>
<div class="bascode"><pre><code>Sub Main
    MsgBox "hi"
End Sub</code></pre></div>
<div class="warning"><p>This help page needs further work. Visit our
<a href="https://documentation.libreoffice.org/en/join-community/update-help-contents">web page</a>.</p></div>
<div class="relatedtopics"><p class="related">Related Topics</p><p><a href="y.html">Another page</a></p></div>
<script>var hidden = 1;</script><div id="DonationFrame"><p>Please support us!</p></div>
"""
    text = extract.html_main_text(help_page("Detective", body))
    lines = text.split("\n")
    assert lines[0] == "Detective"
    assert "First paragraph spans lines & has an entity." in lines
    assert "Choose Tools - Detective." in lines
    assert "Press Ctrl+Page Up." in lines  # the macOS variant is dropped, the default kept
    assert "Choose Page - New." in lines and "Slide - New" not in text
    assert "Cell one" in lines and "Cell two" in lines
    assert 'Sub Main\n    MsgBox "hi"\nEnd Sub' in text  # <pre> keeps its lines and indentation
    for gone in ("Help for LibreOffice", "Modules", "bookmark list", "Index", "script text", "color: red", DONATION,
                 "Please support us", "debug info", "This page is", "Related Topics", "Another page",
                 "needs further work", "var hidden", "Icon", "keyword"):
        assert gone not in text, gone
    assert "  " not in text.replace("    MsgBox", "")


def test_help_tree_by_module_drops_ui_string_page_and_short_pages(tmp_path: Path):
    lang = tmp_path / "usr/share/libreoffice/help/de/text"
    for module, name, body in (("scalc", "a.html", "Genug Text hier. " * 20), ("scalc", "short.html", "kurz"),
                               ("shared", "help/browserhelp.html", f"{DONATION} " * 30)):
        (lang / module / name).parent.mkdir(parents=True, exist_ok=True)
        (lang / module / name).write_text(help_page("T", f"<p>{body}</p>"))
    docs = extract.libreoffice_help(tmp_path, "libreoffice-help-de")
    assert [d.key for d in docs["scalc"]] == ["text/scalc/a.html"]
    assert docs["shared"] == []
    assert docs["scalc"][0].id == "libreoffice-help-de:text/scalc/a.html"


def test_rst_markup_is_removed_lightly():
    rst = """.. SPDX-License-Identifier: GPL-2.0

.. _label:

==========
The Title
==========

Some *emphasis*, **strong**, ``literal`` and :c:func:`kmalloc` with :ref:`a link <target>` and
`a site <https://kernel.org>`_.

.. toctree::
   :maxdepth: 2

   hidden-page

.. note:: Keep this note.

.. code-block:: c
   :linenos:

   int x = *ptr;

Example::

    echo 1 > /sys/x
"""
    text = extract.clean_rst(rst)
    assert text.startswith("The Title\n")
    assert "Some emphasis, strong, literal and kmalloc with a link and\na site." in text
    assert "Keep this note." in text and "int x = *ptr;" in text and "echo 1 > /sys/x" in text
    assert "Example:\n" in text
    for gone in ("SPDX", "_label", "====", "toctree", "maxdepth", "hidden-page", "linenos", "code-block", "::"):
        assert gone not in text, gone


def test_linux_docs_read_gzip_and_skip_translations(tmp_path: Path):
    docs = extract.linux_docs(make_linux_doc(tmp_path, n=4))
    assert [d.key for d in docs] == ["sub0/doc0.rst", "sub0/doc3.rst", "sub1/doc1.rst", "sub2/doc2.rst"]
    assert all("toctree" not in d.text and "kmalloc" in d.text for d in docs)


def test_wikitext_cleaning_and_article_selection(tmp_path: Path):
    wiki = ("'''Anarchism''' is a [[political philosophy]] that [[Self-governance|advocates self-rule]].{{Citation "
            "needed|date=2016}}<ref name=a>Source</ref>\n{{Infobox|x={{nested}}}}\n== History ==\n"
            "Text with [https://example.org an external link] and&nbsp;an entity.<!-- hidden -->\n"
            "[[File:Flag.svg|thumb|A flag [[caption link]]]]\n{| class=wikitable\n| cell\n|}\n* bullet item\n"
            "[[Category:Philosophy]]\n[[de:Anarchismus]]\n== See also ==\n* Other\n")
    text = extract.clean_wikitext(wiki)
    assert text.startswith("Anarchism is a political philosophy that advocates self-rule.")
    assert "History\nText with an external link and an entity." in text
    assert "bullet item" in text
    for gone in ("Citation", "Source", "Infobox", "hidden", "Flag", "caption", "wikitable", "cell", "Category",
                 "Anarchismus", "See also", "Other", "[[", "{{", "'''"):
        assert gone not in text, gone
    docs = extract.wikipedia_sample(make_wikipedia(tmp_path))
    assert len(docs) == 10 and all(d.key.startswith("Article") for d in docs)  # no redirect, no talk page
    assert docs[0].text.startswith("Article 0\n\nArticle 0 is a subject of interest.")
    assert "reference list" not in docs[0].text


def test_shakespeare_takes_the_modern_spelling_texts_only(tmp_path: Path):
    docs = extract.shakespeare(make_shakespeare(tmp_path, n=3))
    assert [d.key for d in docs] == ["play00_gut", "play01_gut", "play02_gut"]
    assert all(d.text.startswith("THE PLAY") for d in docs)


def test_python_stdlib_reads_like_stdlib_corpus(tmp_path: Path):
    docs = extract.python_stdlib(make_stdlib(tmp_path / "lib", n=3))
    assert [d.key for d in docs] == ["module00.py", "module01.py", "module02.py"]  # tiny.py is under 500 chars
    import sysconfig

    real = extract.python_stdlib(Path(sysconfig.get_paths()["stdlib"]))
    assert [d.text for d in real] == stdlib_documents(sys.maxsize)


def test_long_texts_are_cut_into_sections_at_paragraph_boundaries():
    paragraphs = [f"Paragraph {i} " + "word " * (i * 37 % 900) for i in range(200)]
    text = "\n\n".join(paragraphs) + "\n\n" + "x" * 45_000
    parts = extract.sections(text, max_chars=10_000)
    assert all(len(p) <= 10_000 for p in parts) and len(parts) > 10
    assert re.sub(r"\s", "", "".join(parts)) == re.sub(r"\s", "", text)  # nothing lost, order kept
    assert all(p.startswith(("Paragraph", "x")) for p in parts)  # cuts fall between paragraphs
    docs = extract.sectioned("src", "play", text)
    assert [d.key for d in docs][:2] == ["play#01", "play#02"]
    assert [d.key for d in extract.sectioned("src", "short", "a" * 300)] == ["short"]
    assert extract.sectioned("src", "tiny", "too short") == []
