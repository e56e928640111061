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


def test_readme_draft_is_a_door():
    """docs/_readme_draft.md, the README to be: short, the two commands first, links into docs/."""
    draft = DOCS / "_readme_draft.md"
    text = draft.read_text()
    assert len(text.encode()) <= 15_000
    first = next(body for lang, body, _ in blocks(text))
    assert first.splitlines()[0].startswith("pip install -e '.[all]' && offload demo")
    assert first.splitlines()[1].startswith("bash .ci/run")
    root = DOCS.parent
    for target in __import__("re").findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (root / target).exists(), target


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


def test_reference_shows_every_public_name():
    """Each name of a documented module's ``__all__`` has its entry (or, for a
    name made on first use, a section) on its reference page."""
    import importlib
    import re

    for page in sorted((DOCS / "reference").glob("*.md")):
        text = page.read_text()
        module = importlib.import_module(re.search(r"^# `([\w.]+)`", text, re.M).group(1))
        shown = set(re.findall(r"^::: ([\w.]+)$", text, re.M))
        missing = [name for name in module.__all__
                   if f"{module.__name__}.{name}" not in shown
                   and f"## `{module.__name__}.{name}`" not in text]
        assert not missing, f"{page.name} lacks {missing}"
