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
