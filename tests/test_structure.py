"""The package's structure: imports flow one way, the transports stand alone.

Every module of ``offload/`` is parsed with :mod:`ast` (no import runs), and
every import statement in it counts, at the top, inside a function or under
``if TYPE_CHECKING:``: a function-local import is still a dependency, only a
later one. From them, the graph of offload-internal imports must have no
circle, and the transports (``offload.transport``, plain kombu plugins) must
import nothing of offload outside ``offload.transport``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "offload"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The offload modules ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # `from . import web` imports a module; `from .core import Offload` a name of one.
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {module for module in found if module.split(".")[0] == "offload" and module != name}


def import_graph() -> dict[str, set[str]]:
    """Each offload module -> the offload modules it imports."""
    known = _modules()
    return {name: _imports_of(name, path, known) for name, path in known.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected component of ``graph``, each as a path back to its start."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_circle_in(graph, component) for component in components]


def _circle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest path from the component's first module back to itself."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"no circle in {component}")  # pragma: no cover


def fresh_python(probe: str) -> subprocess.CompletedProcess[str]:
    """Run ``probe`` in a new interpreter (the test process has long imported everything)."""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=str(PACKAGE.parent))
    assert done.returncode == 0, done.stderr
    return done


def test_the_graph_sees_function_local_and_relative_imports() -> None:
    graph = import_graph()
    assert "offload.core" in graph["offload"]  # `from .core import Offload`
    assert "offload.transport._sqlite" in graph["offload.transport.sqlite"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_imports_flow_one_way() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_transports_import_nothing_of_offload_outside_offload_transport() -> None:
    graph = import_graph()
    transports = [name for name in graph if name == "offload.transport" or name.startswith("offload.transport.")]
    assert {"offload.transport.sqlite", "offload.transport._sqlite", "offload.transport.backend"} <= set(transports)
    outside = {name: sorted(target for target in graph[name]
                            if target != "offload.transport" and not target.startswith("offload.transport."))
               for name in transports}
    assert not {name: targets for name, targets in outside.items() if targets}


def test_the_embedded_transport_imports_without_celery_or_the_core() -> None:
    probe = ("import sys, offload.transport.sqlite\n"
             "print(sorted({'celery', 'offload.core'} & set(sys.modules)))\n")
    done = fresh_python(probe)
    assert done.stdout.strip() == "[]"


def test_the_core_imports_no_framework_integration_at_its_top() -> None:
    # The core recognises a Flask app, and finds its integration, through offload.frameworks, which
    # imports no framework (the next test: nor any integration, not even inside a function).
    path = PACKAGE / "core.py"
    top = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.level:
            top.add(node.module or "")
    integrations = {"flask", "pyramid", "django", "web", "errors", "demo"}
    assert not {module.split(".")[0] for module in top} & integrations, sorted(top)
    assert "frameworks" in top


def test_the_core_workers_and_boot_import_no_integration_at_all() -> None:
    # Function-local imports included: integrations import the core, never the other way. A web
    # app's integration is found by the app's kind in offload.frameworks, whose table is checked below.
    graph = import_graph()
    integrations = ("offload.flask", "offload.pyramid", "offload.django")
    for name in ("offload.core", "offload.workers", "offload._boot", "offload.frameworks"):
        reached = sorted(target for target in graph[name]
                         if any(target == i or target.startswith(i + ".") for i in integrations))
        assert not reached, f"{name} imports {reached}"


def test_the_core_loads_an_integration_only_when_given_an_app_of_its_kind() -> None:
    # offload.frameworks names each integration's module; Offload(app) imports it for an app of its kind.
    probe = ("import sys\n"
             "from offload import Offload\n"
             "Offload({'CELERY_ALWAYS_EAGER': True})\n"
             "before = sorted(m for m in sys.modules if m.startswith(('offload.flask', 'offload.pyramid')))\n"
             "import flask\n"
             "off = Offload(flask.Flask('probe'))\n"
             "print(before, 'offload.flask' in sys.modules, type(off.app_hooks).__name__)\n")
    done = fresh_python(probe)
    assert done.stdout.strip() == "[] True FlaskHooks"


def test_the_protocol_of_an_offload_imports_no_framework_celery_or_core() -> None:
    # offload.interface is what every integration and service names an Offload by; it must stay
    # importable without the core, Celery or any framework, or naming the type would drag them in.
    probe = ("import sys, offload.interface\n"
             "print(sorted(m for m in {'celery', 'offload.core', 'flask', 'pyramid', 'django', 'starlette'}"
             " if m in sys.modules))\n")
    done = fresh_python(probe)
    assert done.stdout.strip() == "[]"
