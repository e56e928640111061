"""Every docstring example of every offload module runs (``>>>`` lines).

tests/test_docs.py runs the examples the API reference shows; this runs
those of every module, public or not, so that no example anywhere drifts
from the code. One test per module, in a temporary current folder.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil

import pytest

import offload

#: Modules that cannot be imported on their own, and why. They hold no example.
NOT_IMPORTABLE = {
    "offload.django.boot": "configures Django on import: needs DJANGO_SETTINGS_MODULE",
}

MODULES = sorted(info.name for info in pkgutil.walk_packages(offload.__path__, "offload."))


def test_every_module_is_seen():
    assert {"offload.core", "offload.futures", "offload.transport.sqlite", "offload.web.app"} <= set(MODULES)


def test_unimportable_modules_hold_no_example():
    for name in NOT_IMPORTABLE:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, name
        with open(spec.origin) as source:
            assert ">>>" not in source.read(), f"{name} has examples this suite cannot run"


@pytest.mark.parametrize("name", [name for name in MODULES if name not in NOT_IMPORTABLE])
def test_module_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    module = importlib.import_module(name)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(module, name):
        if test.examples:
            runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} example(s) of {name} failed (see output above)"
