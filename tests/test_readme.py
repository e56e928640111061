"""Every snippet of README.md runs: ``# file:`` blocks become modules in a
temporary folder, ``pycon`` sessions run there as doctests, in order, against
real worker processes on the embedded broker."""

from __future__ import annotations

import doctest
import os
import re
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(text: str):
    for match in BLOCK.finditer(text):
        lineno = text.count("\n", 0, match.start()) + 1
        yield match.group(1), match.group(2), lineno


@pytest.fixture
def readme_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if not name.startswith(("offload", "celery", "kombu", "redis", "amqp", "_pytest")):
            sys.modules.pop(name, None)


def test_readme_snippets(readme_folder):
    text = README.read_text()
    files = 0
    for lang, body, _lineno in blocks(text):
        first = body.splitlines()[0] if body else ""
        if lang == "python" and first.startswith("# file: "):
            (readme_folder / first[len("# file: "):].strip()).write_text(body)
            files += 1
    assert files >= 1
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    globs: dict = {}
    sessions = 0
    try:
        for lang, body, lineno in blocks(text):
            if lang != "pycon":
                continue
            test = parser.get_doctest(body, globs, f"README.md:{lineno}", str(README), lineno)
            runner.run(test, clear_globs=False)
            globs.update(test.globs)  # DocTest works on a copy: carry names on
            sessions += 1
    finally:
        off = globs.get("off")
        if off is not None:
            off.stop()
    results = runner.summarize(verbose=False)
    assert sessions >= 5
    assert results.failed == 0, f"{results.failed} README example(s) failed (see output above)"
    assert results.attempted > 20
