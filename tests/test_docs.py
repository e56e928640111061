"""Every code block of the documentation site runs (docs/**/*.md).

Each page runs on its own, in a temporary folder, with the machinery of
tests/test_readme.py (tests/snippets.py): ``# file:`` blocks become modules,
``pycon`` sessions run as doctests, ``console`` blocks as commands. On the
site a ``python`` block is always a ``# file:`` block, so none goes untested;
only the languages of ``snippets.SHOWN_ONLY`` (shell lines that run until
stopped, systemd units, figures) are shown without being run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from snippets import blocks, run_page, snippet_folder  # noqa: F401 (the fixture)

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md"))


def test_the_site_has_pages():
    assert len(PAGES) > 20, PAGES


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
def test_page_code_runs(page, snippet_folder):  # noqa: F811
    run = run_page(page, snippet_folder, strict=True)
    assert not run.unrunnable, "\n".join(run.unrunnable)
    assert not run.console_failures, "\n\n".join(run.console_failures)
    assert run.failed == 0, f"{run.failed} example(s) of {page.name} failed (see output above)"
    ran = run.sessions + run.commands
    if any(lang == "pycon" for lang, _, _ in blocks(page.read_text())):
        assert ran and run.attempted, page


def test_readme_is_a_door():
    """README.md: short, the two commands first, links that resolve (into docs/ mostly)."""
    readme = DOCS.parent / "README.md"
    text = readme.read_text()
    assert len(text.encode()) <= 15_000
    first = next(body for lang, body, _ in blocks(text))
    assert first.splitlines()[0].startswith("pip install -e '.[all]' && offload demo")
    assert first.splitlines()[1].startswith("bash .ci/run")
    root = DOCS.parent
    targets = __import__("re").findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert any(t.startswith("docs/migrate/") for t in targets), targets
    for target in targets:
        if "://" not in target:
            assert (root / target).exists(), target
    # Each migration page is one click away.
    for page in sorted((DOCS / "migrate").glob("*.md")):
        assert f"docs/migrate/{page.name}" in targets, page.name


def reference_objects():
    """The objects the API reference pages render (``::: dotted.name`` lines)."""
    import importlib

    for page in sorted((DOCS / "reference").glob("*.md")):
        for dotted in __import__("re").findall(r"^::: ([\w.]+)$", page.read_text(), __import__("re").M):
            try:
                yield dotted, importlib.import_module(dotted)
            except ImportError:
                module, _, name = dotted.rpartition(".")
                yield dotted, getattr(importlib.import_module(module), name)


def test_reference_examples_run(snippet_folder):  # noqa: F811
    """The examples in the docstrings the reference shows are code blocks of the site too."""
    import doctest
    import inspect

    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    seen, skipped = set(), []
    for dotted, obj in reference_objects():
        if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        module = obj if inspect.ismodule(obj) else inspect.getmodule(obj)
        for test in finder.find(obj, dotted, module=module):
            if test.name in seen or not test.examples:
                continue
            seen.add(test.name)
            skipped += [f"{test.name}: {ex.source.strip()}" for ex in test.examples
                        if ex.options.get(doctest.SKIP)]
            runner.run(test)
    results = runner.summarize(verbose=False)
    assert not skipped, "examples shown on the site but skipped:\n" + "\n".join(skipped)
    assert results.failed == 0, f"{results.failed} docstring example(s) failed (see output above)"
    assert results.attempted >= 20, results
    assert not (DOCS.parent / "offload" / "instance").exists(), "an example wrote into the package"


#: The modules a user imports from: each name of their ``__all__`` is rendered
#: on the site's reference (the guide pages send readers to these modules).
PUBLIC_MODULES = [
    "offload", "offload.exceptions", "offload.ids", "offload.interface", "offload.task",
    "offload.futures", "offload.web", "offload.web.server", "offload.errors", "offload.errors.flask",
    "offload.errors.pyramid", "offload.flask", "offload.pyramid", "offload.django",
    "offload.django.views",
]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site as ``mkdocs build --strict`` makes it (a warning fails the build)."""
    import os
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join([str(DOCS.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
                          cwd=DOCS.parent, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_reference_shows_every_public_name(site):
    """Each name of a public module's ``__all__`` has its entry in the built
    reference (an anchor ``module.name``), or, for a name made on first use
    (a module ``__getattr__``), a section titled with it."""
    import importlib
    import re

    anchors, sections = set(), ""
    for html in (site / "reference").rglob("*.html"):
        anchors |= set(re.findall(r'\bid="([\w.]+)"', html.read_text()))
    for page in (DOCS / "reference").glob("*.md"):
        sections += "\n".join(re.findall(r"^## `([\w.]+)`", page.read_text(), re.M)) + "\n"
    missing = [name for name in PUBLIC_MODULES if name not in anchors]  # the module's own entry
    for name in PUBLIC_MODULES:
        module = importlib.import_module(name)
        assert getattr(module, "__all__", None), f"{name} says what it exports in __all__"
        missing += [f"{name}.{member}" for member in module.__all__
                    if f"{name}.{member}" not in anchors and f"{name}.{member}" not in sections.split()]
    assert not missing, f"not rendered in docs/reference/: {missing}"


WILD = None  # one element of a message pattern: any text (a value filled in, "..." on the page)


def message_patterns():
    """Every string literal of the package but its docstrings, as a pattern:
    its text, with what an f-string fills in as ``WILD``, whitespace folded."""
    import ast

    def fold(parts):
        out = []
        for part in parts:
            if part is WILD:
                if not out or out[-1] is not WILD:
                    out.append(WILD)
            else:
                for char in " ".join(part.split()) if part.strip() else (" " if part else ""):
                    if not (char == " " and out and out[-1] == " "):
                        out.append(char)
        return out

    for path in sorted((DOCS.parent / "offload").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        for node in ast.walk(tree):
            if id(node) in docstrings:
                continue
            if isinstance(node, ast.JoinedStr):
                yield fold([v.value if isinstance(v, ast.Constant) else WILD for v in node.values])
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                yield fold([node.value])


def matched_characters(quote, pattern):
    """The indexes of ``quote``'s characters that match characters of
    ``pattern`` when both are read as parts of one text (either side's
    ``WILD`` standing for any text), as many as can be."""
    quote, pattern = [WILD, *quote, WILD], [WILD, *pattern, WILD]  # parts of one message
    n, m = len(quote), len(pattern)
    best = [[-1] * (m + 2) for _ in range(n + 2)]  # -1: no way to go on
    best[n][m] = 0

    def steps(i, j):  # (next i, next j, characters matched by the step)
        if i < n and quote[i] is WILD:
            yield i + 1, j, 0
            if j < m:
                yield i, j + 1, 0
        if j < m and pattern[j] is WILD:
            yield i, j + 1, 0
            if i < n:
                yield i + 1, j, 0
        if i < n and j < m and quote[i] is not WILD and quote[i] == pattern[j]:
            yield i + 1, j + 1, 1

    for i in range(n, -1, -1):
        for j in range(m, -1, -1):
            if (i, j) != (n, m):
                best[i][j] = max((best[a][b] + k for a, b, k in steps(i, j) if best[a][b] >= 0), default=-1)
    matched, i, j = set(), 0, 0
    if best[0][0] < 0:
        return matched
    while (i, j) != (n, m):
        a, b, k = next((a, b, k) for a, b, k in steps(i, j) if best[a][b] >= 0 and best[a][b] + k == best[i][j])
        if k:
            matched.add(i - 1)
        i, j = a, b
    return matched


def test_faq_quotes_the_messages_offload_gives():
    """Each error message the FAQ quotes in its prose (a span of four words or
    more; ``...`` for what varies) is the code's: its words are those of the
    package's string literals, but for the values a message fills in (quoted,
    with digits, a path, a host, a setting's name)."""
    import re

    prose = re.sub(r"```.*?```", "", (DOCS / "faq.md").read_text(), flags=re.S)
    quotes = [" ".join(q.split()) for q in re.findall(r"`([^`]+)`", prose)]
    quotes = [q for q in quotes if len(q.split()) >= 4 and not q.startswith("offload ")]
    assert len(quotes) >= 15, quotes
    def pieces(pattern):  # its runs of text, WILD between them
        return [piece for piece in "".join("\0" if c is WILD else c for c in pattern).split("\0")
                if len(piece.strip()) >= 6]

    patterns = [(p, pieces(p)) for p in message_patterns()]
    value = re.compile(r"['\"\d@/]|^[A-Z0-9_]+[?.;:,]*$|^\.*$")
    unmatched = []
    for quote in quotes:
        shown = []
        for piece in re.split(r"(\.\.\.)", quote):
            shown += [WILD] if piece == "..." else list(piece)
        text = "".join("\0" if c is WILD else c for c in shown)
        covered = set()
        shingles = {" ".join(words[k:k + 3]) for part in text.split("\0")
                    for words in [part.split()] for k in range(len(words) - 2)}
        for pattern, runs in patterns:
            # A run of text of one is in the other, or three words of the quote
            # are in the pattern: try the two whole.
            if (any(run in text for run in runs) or any(q in run for q in shingles for run in runs)
                    or any(run.strip() in text for run in runs)):
                match = matched_characters(shown, pattern)
                if len(match) >= 6:
                    covered |= match
        for word in re.finditer(r"[^ \0]+", text):
            letters = [k for k in range(*word.span()) if text[k].isalpha()]
            if sum(k in covered for k in letters) * 2 < len(letters) and not value.search(word.group()):
                unmatched.append(f"{quote!r}: {word.group()!r}")
                break
    assert not unmatched, "the FAQ quotes messages the code does not give:\n" + "\n".join(unmatched)
