"""N web clients waiting on N tasks that finish together (offload.web).

For each scenario a server process serves ``TaskAPI(off)`` on loopback, with
``off`` on Redis (``redis://127.0.0.1:6379/9`` unless
``OFFLOAD_BENCH_WAITERS_REDIS`` says otherwise):

* ``asgi``: uvicorn (one process, one event loop), N clients
  ``GET /tasks/{id}?wait=100`` (long-poll) or ``GET /tasks/{id}/events``
  (SSE); with uvicorn's pure-Python HTTP stack (``asgi/h11``, asyncio's
  loop), with the one ``uvicorn[standard]`` installs (``asgi/httptools``,
  uvloop), and with offload's subclass of the latter that sends each answer
  in one system call (``asgi/httptools+onesend``, offload.web.server);
* ``wsgi-longpoll``: the standard library's threaded WSGI server, a thread
  per request, N clients long-polling.

The clients run in a process of their own, one bare asyncio protocol per
connection on uvloop when it is installed (no HTTP library: thousands of them
must cost the measuring side little, or the figure would be the clients').
Once the server holds every request (and, for event streams, has sent each
its first PENDING event), the N results are written to Redis in one pipeline (SET and PUBLISH, as Celery's
Redis backend does when a task ends): the tasks "finish together" with no
worker in the way. Measured: the server's peak RSS and thread count, the
CPU time its threads spent from the pipeline's start to the last answer (the
event loop's, "main", and the others', in practice the result hub's), how
long the pipeline took ("store"), and for each client the delay from the
pipeline's last reply (every task has ended by then) to the moment its
answer reached it (p50, p99, max); both times are read from the same
monotonic clock. On a shared machine the CPU times say more than the delays,
which also count what other processes take from the two cores.

Run from the repository root:
``python bench/waiters.py [--sizes 1000,5000] [--modes longpoll,sse] [--wsgi-size 1000]``;
``--profile PREFIX`` samples the server with py-spy through each fan-out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import uuid

REDIS_URL = os.environ.get("OFFLOAD_BENCH_WAITERS_REDIS", "redis://127.0.0.1:6379/9")
FINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED", "LOST")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def make_offload():
    from offload import Offload

    # Results and marks kept 10 minutes: a run leaves nothing that slows the next.
    return Offload({"CELERY_BROKER_URL": REDIS_URL, "CELERY_RESULT_EXPIRES": 600, "OFFLOAD_DATA_DIR": os.path.join(
        os.environ.get("TMPDIR", "/tmp"), "offload-bench-waiters")})


# The server ------------------------------------------------------------------------


#: uvicorn as ``pip install uvicorn`` runs it, as ``uvicorn[standard]`` does,
#: and each with offload's protocol that sends an answer in one system call
#: (offload.web.server).
UVICORN = {
    "h11": {"loop": "asyncio", "http": "h11"},
    "httptools": {"loop": "uvloop", "http": "httptools"},
    "h11+onesend": {"loop": "asyncio", "http": "offload.web.server:H11Protocol"},
    "httptools+onesend": {"loop": "uvloop", "http": "offload.web.server:HttpToolsProtocol"},
}


def serve(kind: str, port: int) -> None:
    raise_fd_limit()
    from offload.web import TaskAPI

    api = TaskAPI(make_offload(), prefix="/offload", max_wait=120, max_stream=300)
    if kind.startswith("asgi/"):
        import uvicorn

        # No access log: at log level "error" uvicorn prints none, but would
        # still format each line's parts.
        uvicorn.run(api.asgi, host="127.0.0.1", port=port, log_level="error", access_log=False,
                    backlog=4096, lifespan="off", timeout_keep_alive=120, **UVICORN[kind.split("/")[1]])
    else:
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        class Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True
            request_queue_size = 4096

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args):
                pass

        make_server("127.0.0.1", port, api.wsgi, server_class=Server, handler_class=Quiet).serve_forever()


# The clients (a process of their own) -------------------------------------------------


class Client(asyncio.Protocol):
    """One HTTP/1.1 connection holding one request; notes when its answer arrives.

    The time of the ``data_received`` call that completes the answer is the
    client's. The connection stays open after the answer, as a browser's
    keep-alive connection would.
    """

    def __init__(self, mode: str, task_id: str, port: int, stats: ClientStats) -> None:
        self.mode, self.task_id, self.stats = mode, task_id, stats
        path = f"/offload/tasks/{task_id}?wait=100" if mode == "longpoll" else f"/offload/tasks/{task_id}/events"
        self.request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        self.buffer = b""
        self.subscribed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.request)  # type: ignore[attr-defined]
        if self.mode == "longpoll":
            self.stats.opened()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.buffer += data
        if self.mode == "longpoll":
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end].lower()
            length = int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
            body = self.buffer[head_end + 4:]
            if len(body) >= length:
                self.stats.answered(self.task_id, now, json.loads(body[:length])["state"])
            return
        # Server-sent events, chunked: only whole "data:" lines matter.
        lines = self.buffer.split(b"\n")
        self.buffer = lines.pop()
        for line in lines:
            if line.startswith(b"data: "):
                state = json.loads(line[6:])["state"]
                if state == "PENDING" and not self.subscribed:
                    self.subscribed = True  # the server's first event: it follows the task
                    self.stats.opened()
                elif state in FINAL_STATES:
                    self.stats.answered(self.task_id, now, state)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.answered(self.task_id, time.perf_counter(), "CLOSED")


class ClientStats:
    def __init__(self, n: int) -> None:
        self.n = n
        self.open_count = 0
        self.times: dict[str, tuple[float, str]] = {}
        self.all_open = asyncio.Event()
        self.all_answered = asyncio.Event()

    def opened(self) -> None:
        self.open_count += 1
        if self.open_count == self.n:
            self.all_open.set()

    def answered(self, task_id: str, when: float, state: str) -> None:
        if task_id not in self.times:  # the first answer counts (not the hang-up after it)
            self.times[task_id] = (when, state)
            if len(self.times) == self.n:
                self.all_answered.set()


def clients_main(mode: str, port: int, ids: list[str]) -> None:
    """The client process: open every request, print "ready", then the answers' times (JSON)."""
    raise_fd_limit()
    stats = ClientStats(len(ids))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transports = []
        for start in range(0, len(ids), 250):  # in waves: the listen queue is finite
            for task_id in ids[start:start + 250]:
                for attempt in range(50):
                    try:
                        transport, _ = await loop.create_connection(
                            lambda task_id=task_id: Client(mode, task_id, port, stats), "127.0.0.1", port)
                        break
                    except OSError:
                        await asyncio.sleep(0.05 * (attempt + 1))
                else:
                    raise RuntimeError("could not connect")
                transports.append(transport)
        await asyncio.wait_for(stats.all_open.wait(), 120)
        print("ready", flush=True)
        try:
            await asyncio.wait_for(stats.all_answered.wait(), 300)
        except asyncio.TimeoutError:
            pass
        print(json.dumps(stats.times), flush=True)  # before hanging up: that is not measured
        for transport in transports:
            transport.close()

    if _installed("uvloop"):  # the cheaper loop: the clients share the two cores with the server
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


# The measuring side -----------------------------------------------------------------


class Sampler:
    """Peak RSS and threads of a process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.process = psutil.Process(pid)
        self.peak_rss = 0
        self.peak_threads = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            try:
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
                self.peak_threads = max(self.peak_threads, self.process.num_threads())
            except Exception:
                return

    def cpu_ms(self) -> tuple[float, float]:
        """CPU time (user + system, ms) of the main thread (the event loop) and of all the others."""
        main = others = 0.0
        for thread in self.process.threads():
            spent = (thread.user_time + thread.system_time) * 1000
            if thread.id == self.process.pid:
                main += spent
            else:
                others += spent
        return main, others

    def connections(self) -> int:
        return len([c for c in self.process.net_connections(kind="tcp") if c.status == "ESTABLISHED"])


def finish_together(ids: list[str]) -> tuple[float, float]:
    """Store every result at once (SET + PUBLISH, as Celery's Redis backend does).

    Returns the times the pipeline was sent and its last reply read: every
    task has ended (its result stored and published) by the second.
    """
    off = make_offload()
    backend = off.celery.backend
    pipe = backend.client.pipeline(transaction=False)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat()
    for number, task_id in enumerate(ids):
        meta = backend.encode({"status": "SUCCESS", "result": number, "traceback": None, "children": [],
                               "date_done": now, "task_id": task_id})
        key = backend.get_key_for_task(task_id)
        pipe.set(key, meta, ex=600)
        pipe.publish(key, meta)
    sent = time.perf_counter()
    pipe.execute()
    return sent, time.perf_counter()


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def settle(sampler: Sampler, seconds: float = 1.0) -> None:
    """Wait until the server's CPU stays low (it has taken every request in)."""
    sampler.process.cpu_percent(None)
    for _ in range(60):
        time.sleep(seconds)
        if sampler.process.cpu_percent(None) < 10:
            return


def percentile(ordered: list[float], fraction: float) -> float:
    return round(ordered[max(int(len(ordered) * fraction + 0.5) - 1, 0)], 1)


def run(kind: str, mode: str, n: int, profile: str | None = None) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)])
    clients = None
    try:
        if not wait_for(lambda: _answers(port), 60):
            raise RuntimeError("the server did not start")
        sampler = Sampler(server.pid)
        base_rss, base_threads = sampler.process.memory_info().rss, sampler.process.num_threads()
        ids = [str(uuid.uuid4()) for _ in range(n)]
        # The API answers only for tasks marked for the web, as a real
        # submit marks them: before the clients ask, outside the measure.
        make_offload().exposures.mark(ids, "bench.waiters")
        clients = subprocess.Popen([sys.executable, __file__, "--clients", mode, "--port", str(port)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        clients.stdin.write("\n".join(ids) + "\n")
        clients.stdin.close()
        if clients.stdout.readline().strip() != "ready":
            raise RuntimeError("the clients could not open their requests")
        wait_for(lambda: sampler.connections() >= n, 60)
        settle(sampler)
        profiler = None
        if profile:
            # All the server's threads, sampled without pausing it, through the fan-out.
            profiler = subprocess.Popen(
                [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--pid", str(server.pid),
                 "--nonblocking", "--threads", "--rate", "250", "--duration", "4", "--format", "raw",
                 "--output", f"{profile}-{kind.replace('/', '-')}-{mode}-{n}.txt"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        cpu_before = sampler.cpu_ms()
        sent_at, done_at = finish_together(ids)
        answered = json.loads(clients.stdout.readline())
        cpu_after = sampler.cpu_ms()
        clients.wait(30)
        if profiler is not None:
            profiler.wait(30)
        sampler.stop.set()
        delays = sorted((answered[i][0] - done_at) * 1000 for i in ids if i in answered)
        ok = sum(1 for i in ids if answered.get(i, (0, ""))[1] == "SUCCESS")
        return {
            "server": kind, "clients": mode, "n": n, "answered_success": ok,
            "peak_rss_mb": round(sampler.peak_rss / 2**20, 1), "base_rss_mb": round(base_rss / 2**20, 1),
            "peak_threads": sampler.peak_threads, "base_threads": base_threads,
            "cpu_main_ms": round(cpu_after[0] - cpu_before[0]),
            "cpu_other_ms": round(cpu_after[1] - cpu_before[1]),
            "store_ms": round((done_at - sent_at) * 1000, 1),
            "p50_ms": percentile(delays, 0.5) if delays else None,
            "p99_ms": percentile(delays, 0.99) if delays else None,
            "max_ms": round(delays[-1], 1) if delays else None,
        }
    finally:
        if clients is not None and clients.poll() is None:
            clients.kill()
            clients.wait(30)
        server.terminate()
        server.wait(30)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _installed(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(module) is not None for module in modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000")
    parser.add_argument("--modes", default="longpoll,sse")
    parser.add_argument("--wsgi-size", type=int, default=1000)
    parser.add_argument("--profile", metavar="PREFIX",
                        help="sample the server with py-spy through each fan-out; raw stacks in PREFIX-*.txt")
    parser.add_argument("--uvicorn", default="h11,httptools,httptools+onesend",
                        help="uvicorn's HTTP stacks to run: h11 (asyncio), httptools (uvloop; uvicorn[standard]), "
                             "each also +onesend (offload.web.server's protocol)")
    parser.add_argument("--serve", choices=["wsgi", *(f"asgi/{name}" for name in UVICORN)], help=argparse.SUPPRESS)
    parser.add_argument("--clients", choices=["longpoll", "sse"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        serve(options.serve, options.port)
        return
    if options.clients:
        clients_main(options.clients, options.port, sys.stdin.read().split())
        return
    raise_fd_limit()
    modes = options.modes.split(",")
    stacks = [name for name in options.uvicorn.split(",") if name]
    unknown = [name for name in stacks if name not in UVICORN]
    if unknown:
        parser.error(f"unknown --uvicorn stack(s) {', '.join(unknown)}; choose from {', '.join(UVICORN)}")
    if not _installed("uvloop", "httptools") and any(name.startswith("httptools") for name in stacks):
        print("uvloop or httptools is not installed (pip install 'uvicorn[standard]'): h11 only")
        stacks = [name for name in stacks if not name.startswith("httptools")]
    scenarios = [(f"asgi/{stack}", mode, int(n))
                 for n in options.sizes.split(",") if n for stack in stacks for mode in modes]
    if options.wsgi_size:
        scenarios.append(("wsgi", "longpoll", options.wsgi_size))
    print(f"{'server':22} {'clients':9} {'N':>5} {'ok':>5} {'RSS MB':>13} {'threads':>9} "
          f"{'CPU ms main+others':>18} {'store ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for kind, mode, n in scenarios:
        r = run(kind, mode, n, options.profile)
        print(f"{r['server']:22} {r['clients']:9} {r['n']:>5} {r['answered_success']:>5} "
              f"{r['base_rss_mb']:>6}->{r['peak_rss_mb']:<6} {r['base_threads']:>3}->{r['peak_threads']:<5} "
              f"{r['cpu_main_ms']:>9}+{r['cpu_other_ms']:<8} {r['store_ms']:>8} "
              f"{r['p50_ms']:>8} {r['p99_ms']:>8} {r['max_ms']:>8}", flush=True)


if __name__ == "__main__":
    main()
