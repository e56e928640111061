"""The ``offload`` command, and the same commands as ``flask offload``.

::

    offload --app myproject.tasks:off worker -n foo -Q high -c 4
    offload --app "myproject:create_app" cluster     # every CELERY_WORKERS + Flower (+ beat)
    offload --app myproject.tasks:off beat           # the periodic-task scheduler
    offload --app development.ini status             # a Pyramid app
    offload inspect registered --json                # OFFLOAD_APP / FLASK_APP
    flask --app myproject offload status

The app comes from ``--app``, else ``OFFLOAD_APP``, else ``FLASK_APP`` (see
:mod:`offload._boot` for the accepted forms). Monitoring commands ask the
workers through Celery's control API from this process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from . import __version__
from ._boot import AppNotFound, find_offload, load_default, spec_from_env
from .exceptions import OffloadError
from .flask import offload_of
from .supervise import start_process
from .workers import BOOT_APP, INSPECT_TARGETS, WorkerExited, WorkerSpec, check_broker, inspect, status

__all__ = ["flask_group", "group_for", "main"]


class _AppError(click.ClickException):
    """The app could not be found: a usage error, shown without a traceback."""

    exit_code = 2


class _Target:
    """How the commands of one invocation get their Offload (loaded once, lazily)."""

    def __init__(self, spec: str | None = None, loader: Callable[[], Any] | None = None) -> None:
        self.spec = spec
        self._loader = loader
        self._off: Any = None

    def load(self) -> Any:
        if self._off is not None:
            return self._off
        try:
            if self._loader is not None:
                off = self._loader()
            elif self.spec:
                off = find_offload(self.spec)
            else:
                off = load_default()
        except AppNotFound as exc:
            raise _AppError(str(exc)) from None
        spec = self.spec or spec_from_env()
        if spec and not os.environ.get("OFFLOAD_APP"):
            # Worker processes must import the app the way this command did.
            is_ini = spec.partition("#")[0].endswith(".ini")
            path, sep, rest = spec.partition("#" if is_ini else ":")
            if path.endswith((".py", ".ini")):
                spec = os.path.abspath(path) + sep + rest
            off.workers.app_spec = spec
        self._off = off
        return off


class _Command(click.Command):
    """A command of offload's, which says where ``--app`` goes when it comes after the command.

    ``offload worker --app myapp`` reads naturally but names the app too late:
    the group loads it (as ``celery -A myapp worker`` and ``flask --app myapp
    run`` do). Click's own answer would be "No such option".
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        for index, arg in enumerate(args[:end]):
            if arg in ("-A", "--app"):
                spec = args[index + 1] if index + 1 < len(args) else "SPEC"
                others = args[:index] + args[index + 2:]
            elif arg.startswith(("--app=", "-A")):
                spec = arg.partition("=")[2] if arg.startswith("--app=") else arg[2:]
                others = args[:index] + args[index + 1:]
            else:
                continue
            raise click.UsageError(_where_the_app_goes(ctx, spec, others), ctx)
        return super().parse_args(ctx, args)


def _where_the_app_goes(ctx: click.Context, spec: str, others: list[str]) -> str:
    root = ctx.find_root()
    if any(param.name in ("app", "app_spec") for param in root.command.params):
        rest = ctx.command_path[len(root.info_name or ""):].strip()
        command = shlex.join([*(root.info_name or "offload").split(), "--app", spec, *rest.split(), *others])
        return f"--app names the app before the command, as an option of {root.info_name!r}: {command}"
    return (f"{ctx.command_path} takes no --app: it runs this project's app, the one "
            f"{root.info_name!r} loads")


def _offload(ctx: click.Context) -> Any:
    target = ctx.find_object(_Target)
    if target is None:  # a command invoked outside our groups
        target = ctx.ensure_object(_Target)
    return target.load()


def _fail_on_offload_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Show offload's own errors (they say what to do) without a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except OffloadError as exc:
            if isinstance(exc, AppNotFound):
                raise _AppError(str(exc)) from None
            raise click.ClickException(str(exc)) from None

    return wrapper


def _say(message: str) -> None:
    click.echo(message, err=True)


def _emit(as_json: bool, event: str, text: str, **data: Any) -> None:
    """One status line on stderr, or one JSON object per line on stdout (--json)."""
    if as_json:
        click.echo(json.dumps({"event": event, **data}))
    else:
        _say(text)


# worker ------------------------------------------------------------------------------

@click.command(cls=_Command)
@click.option("-n", "--name", help="Node name (foo or foo@%h). A name from CELERY_WORKERS "
              "starts that worker with its configured options.")
@click.option("-Q", "--queues", help="Comma-separated queues to consume (default: the app's).")
@click.option("-c", "--concurrency", type=click.IntRange(min=1), help="Pool processes.")
@click.option("-l", "--loglevel", default=None,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False),
              help="Log level (default INFO).")
@click.option("-P", "--pool", default=None, help="Pool implementation (prefork, threads, solo, ...).")
@click.pass_context
@_fail_on_offload_errors
def worker(ctx: click.Context, name: str | None, queues: str | None, concurrency: int | None,
           loglevel: str | None, pool: str | None) -> None:
    """Run one worker in the foreground (Ctrl-C stops it)."""
    off = _offload(ctx)
    from .workers import worker_specs

    configured: WorkerSpec | None = None
    if name:
        configured = next((s for s in off.workers.specs if s.name == name.partition("@")[0]), None)
        if configured is None:
            configured = worker_specs([name])[0]
    args = list(configured.args) if configured else ["--loglevel", "INFO"]
    overrides = {"--concurrency": concurrency, "--queues": queues,
                 "--loglevel": loglevel.upper() if loglevel else None, "--pool": pool}
    for flag, value in overrides.items():
        if value is None:
            continue
        if flag in args:
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag, str(value)]
    # Celery would retry a dead broker for minutes, saying so only in its log.
    check_broker(off.celery, "start a worker")
    # A task that submits must not start local workers from inside a worker.
    os.environ["OFFLOAD_IN_WORKER"] = "1"
    off.celery.worker_main(["worker", *args])


# beat --------------------------------------------------------------------------------

@click.command(cls=_Command)
@click.option("-l", "--loglevel", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False))
@click.pass_context
@_fail_on_offload_errors
def beat(ctx: click.Context, loglevel: str) -> None:
    """Run the periodic-task scheduler in the foreground (one per host: another one waits)."""
    from .beat import run_beat

    run_beat(_offload(ctx), loglevel=loglevel.upper())


# cluster -----------------------------------------------------------------------------

def _flower_installed() -> bool:
    return importlib.util.find_spec("flower") is not None


def _start_flower(off: Any, address: str, port: int) -> subprocess.Popen[bytes]:
    # Started like a worker (its environment, a group of its own, a log file,
    # a watchdog on this process), but not supervised: it is optional.
    proc, _offset = start_process(
        [sys.executable, "-m", "celery", "-A", BOOT_APP, "flower", f"--address={address}", f"--port={port}"],
        off.workers.process_env(), off.workers.folder / "flower.log", "starting Flower")
    return proc


@click.command(cls=_Command)
@click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for every worker.")
@click.option("--flower/--no-flower", default=True, show_default=True,
              help="Also run Flower (when it is installed).")
@click.option("--flower-address", default="127.0.0.1", show_default=True)
@click.option("--flower-port", default=5555, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="Events as JSON lines on stdout.")
@click.pass_context
@_fail_on_offload_errors
def cluster(ctx: click.Context, timeout: float, flower: bool, flower_address: str,
            flower_port: int, as_json: bool) -> None:
    """Run every worker of CELERY_WORKERS (and Flower) until Ctrl-C, restarting any that dies."""
    off = _offload(ctx)
    workers = off.workers
    specs = workers.specs
    check_broker(off.celery, "start the workers")
    if not workers.acquire():
        raise click.ClickException(
            f"the workers of this app are already run by process {workers.owner_pid()} "
            f"(it holds {workers.folder / 'starter.lock'}); stop it first")
    stop = threading.Event()
    wake = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
        wake.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    # A dying child wakes the supervisor at once instead of at its next check.
    previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda *_: wake.set())
    flower_proc = None
    from .beat import BeatProcess

    scheduler = BeatProcess(off)
    try:
        _emit(as_json, "starting", f"starting {len(specs)} worker(s): "
              + ", ".join(s.nodename for s in specs) + f" (logs in {workers.folder})",
              workers=[s.nodename for s in specs], logs=str(workers.folder))
        unconsumed = workers.unconsumed_message()
        if unconsumed:
            _emit(as_json, "unconsumed", f"warning: {unconsumed}", queues=workers.unconsumed_queues(),
                  message=unconsumed)
        workers.supervise()
        if as_json:
            workers.wait_ready(timeout)
        else:
            with click.progressbar(length=len(specs), label="waiting for workers", file=sys.stderr,
                                   show_pos=True) as bar:
                def advance(answered: set[str], _specs: list[WorkerSpec]) -> None:
                    bar.update(len(answered) - bar.pos)
                workers.wait_ready(timeout, progress=advance)
        _emit(as_json, "ready", "all workers answer: " + json.dumps(workers.running()),
              workers=workers.running())
        if scheduler.start():
            _emit(as_json, "beat", f"periodic-task scheduler started (log: {scheduler.log_path})",
                  log=str(scheduler.log_path), pid=scheduler.pid)
        if flower and _flower_installed():
            flower_proc = _start_flower(off, flower_address, flower_port)
            _emit(as_json, "flower", f"Flower on http://{flower_address}:{flower_port} "
                  f"(log: {workers.folder / 'flower.log'})", url=f"http://{flower_address}:{flower_port}")
        elif flower:
            _emit(as_json, "flower", "Flower is not installed (pip install offload[flower])", url=None)
        while not stop.is_set():
            # The same supervision as local workers started by submit: a
            # worker that dies starts again at once, then backing off.
            waits = list(workers.pending_restarts().values())
            wake.wait(timeout=max(0.05, min([1.0, *waits])))
            wake.clear()
            if stop.is_set():
                break
            for event in workers.supervise():
                if isinstance(event, WorkerExited):
                    _emit(as_json, "died", f"{event.summary} (log: {event.log_path})", worker=event.name,
                          exit_code=event.exit_code, restart_in=event.restart_in)
                elif event.restart:
                    _emit(as_json, "restarted", f"worker {event.name} restarted (pid {event.pid})",
                          worker=event.name, pid=event.pid)
            if flower_proc is not None and flower_proc.poll() is not None:
                _emit(as_json, "flower-died", f"Flower exited with code {flower_proc.returncode}; "
                      f"see {workers.folder / 'flower.log'}", exit_code=flower_proc.returncode)
                flower_proc = None
    finally:
        _emit(as_json, "stopping", "stopping the workers (warm shutdown)")
        if flower_proc is not None:
            flower_proc.terminate()
        scheduler.stop()
        workers.stop()
        if flower_proc is not None:
            try:
                flower_proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(flower_proc.pid, signal.SIGKILL)
                flower_proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _emit(as_json, "stopped", "stopped")


# monitoring --------------------------------------------------------------------------

@click.command("status", cls=_Command)
@click.option("--timeout", default=1.0, show_default=True, help="Seconds to wait for replies.")
@click.option("--json", "as_json", is_flag=True, help="Compact one-line JSON.")
@click.pass_context
@_fail_on_offload_errors
def status_command(ctx: click.Context, timeout: float, as_json: bool) -> None:
    """Ping every worker; print the JSON of off.status(). Exit 1 when none answers."""
    result = status(_offload(ctx).celery, timeout=timeout)
    click.echo(json.dumps(result) if as_json else json.dumps(result, indent=2))
    if not result["ping"]:
        _say("no worker answered (is one running? `offload worker` or `offload cluster`)")
        ctx.exit(1)


def _print_human(result: dict[str, Any]) -> None:
    for node, items in result.items():
        click.echo(f"{node}:")
        if isinstance(items, list):
            for item in items or ["(none)"]:
                click.echo(f"  {item if isinstance(item, str) else json.dumps(item)}")
        else:
            click.echo("  " + json.dumps(items, indent=2).replace("\n", "\n  "))


@click.command("inspect", cls=_Command)
@click.argument("what", type=click.Choice(INSPECT_TARGETS), metavar="WHAT")
@click.option("--timeout", default=1.0, show_default=True, help="Seconds to wait for replies.")
@click.option("--json", "as_json", is_flag=True, help="Print the replies as JSON.")
@click.pass_context
@_fail_on_offload_errors
def inspect_command(ctx: click.Context, what: str, timeout: float, as_json: bool) -> None:
    """Ask every worker about WHAT: active, scheduled, reserved, revoked, registered,
    stats or active_queues. Exit 1 when none answers."""
    result = inspect(_offload(ctx).celery, what, timeout=timeout)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        _print_human(result)
    if not result:
        _say("no worker answered (is one running? `offload worker` or `offload cluster`)")
        ctx.exit(1)


@click.command(cls=_Command, context_settings={"ignore_unknown_options": True})
@click.option("--address", default="127.0.0.1", show_default=True)
@click.option("--port", default=5555, show_default=True, type=int)
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
@_fail_on_offload_errors
def flower(ctx: click.Context, address: str, port: int, flower_args: tuple[str, ...]) -> None:
    """Run the Flower dashboard for this app (extra arguments go to Flower)."""
    if not _flower_installed():
        raise click.ClickException("Flower is not installed: pip install 'offload[flower]'")
    off = _offload(ctx)
    _say(f"Flower on http://{address}:{port}")
    off.celery.start(["flower", f"--address={address}", f"--port={port}", *flower_args])


@click.command(cls=_Command)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on. Only loopback clients may look (there is no login here).")
@click.option("--port", default=5556, show_default=True, type=click.IntRange(1, 65535))
@click.option("--prefix", default="/offload", show_default=True, help="Path the dashboard lives under.")
@click.pass_context
@_fail_on_offload_errors
def dashboard(ctx: click.Context, host: str, port: int, prefix: str) -> None:
    """Serve the dashboard of this app on its own (WSGI, threaded) until Ctrl-C."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from .exceptions import ConfigurationError
    from .web import TaskAPI

    off = _offload(ctx)
    try:
        api = TaskAPI(off, prefix=prefix, dashboard=True)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc), param_hint="--prefix") from None

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True  # an open live stream must not hold up Ctrl-C

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") in ("", "/"):
            start_response("302 Found", [("Location", f"{prefix}/dashboard"), ("Content-Length", "0")])
            return [b""]
        return api.wsgi(environ, start_response)

    try:
        server = make_server(host, port, app, server_class=Server, handler_class=Quiet)
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from exc
    # Receive task events from now on, not from the first page view.
    off.monitor.ensure_started()
    off.monitor.listener.ready.wait(5)
    shown = f"[{host}]" if ":" in host else host
    _say(f"offload dashboard on http://{shown}:{server.server_address[1]}{prefix}/dashboard "
         f"(metrics: {prefix}/metrics); Ctrl-C stops it")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


@click.command(cls=_Command)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Folder for the broker, results and ledger (default: $OFFLOAD_DEMO_DATA_DIR, "
                   "else a per-user temp folder).")
@click.option("--keep-ledger", is_flag=True, help="Keep the ledger of the last run (default: an empty one).")
def demo(host: str, port: int, data_dir: str | None, keep_ledger: bool) -> None:
    """Run offload's demo web app (with its own local worker)."""
    try:
        from .demo import run
    except ImportError as exc:
        raise click.ClickException(f"the demo is not available: {exc}") from None
    try:
        run(host=host, port=port, data_dir=data_dir, keep_ledger=keep_ledger)
    except OSError as exc:
        raise click.ClickException(exc.strerror or str(exc)) from None


_COMMANDS = (worker, beat, cluster, status_command, inspect_command, flower, dashboard, demo)


@click.group()
@click.option("-A", "--app", "app_spec", metavar="SPEC",
              help="module:attr naming an Offload, a Flask app or app factory, or a Pyramid "
                   ".ini file (default: $OFFLOAD_APP, then $FLASK_APP).")
@click.version_option(__version__, prog_name="offload")
@click.pass_context
def main(ctx: click.Context, app_spec: str | None) -> None:
    """Run and watch offload's workers."""
    ctx.obj = _Target(app_spec)


@click.group("offload")
@click.pass_context
def flask_group(ctx: click.Context) -> None:
    """Run and watch offload's workers for this Flask app."""
    from flask.cli import ScriptInfo

    info = ctx.find_object(ScriptInfo)

    def load() -> Any:
        app = info.load_app() if info is not None else None
        found = offload_of(app)
        if found is None:
            raise AppNotFound(f"the Flask app {app!r} has no Offload: call off.init_app(app) "
                              "(or Offload(app)) in it")
        return found

    spec = info.app_import_path if info is not None else None
    ctx.obj = _Target(spec, loader=load)


for _command in _COMMANDS:
    main.add_command(_command)
    flask_group.add_command(_command)


def group_for(loader: Callable[[], Any], *, name: str = "offload", help: str | None = None) -> click.Group:
    """The ``offload`` commands for an app a framework loads (``manage.py offload``).

    ``loader()`` returns the Offload. Every command of ``offload`` is there,
    read when the group is made, so a command added to :data:`main` later
    (``dashboard``) comes along.
    """

    @click.pass_context
    def callback(ctx: click.Context) -> None:
        ctx.obj = _Target(None, loader=loader)

    group = click.Group(name, callback=callback, help=help or "Run and watch offload's workers.")
    for command in main.commands.values():
        group.add_command(command)
    return group
