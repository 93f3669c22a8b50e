"""Stopping ``tuneline run`` cleanly: Ctrl-C (SIGINT) or SIGTERM stops the trainer, records the flow
run as **Cancelled** with the reason, stops the temporary Prefect server and exits 130 / 143; a
second signal ends at once (docs/operating.md, "Stopping a run").

Why this is ours and not Prefect's (3.9):

- Prefect starts its temporary server (``uvicorn ... prefect.server.api.server:create_app``) in the
  terminal's process group and stops it only ``atexit``. So Ctrl-C in a terminal also stops the
  server while the flow still needs it to record its state, and SIGTERM (default action: die,
  no ``atexit``) leaves it running as an orphan. ``TemporaryServer`` starts the same server in its
  own session, tied to this process (``PR_SET_PDEATHSIG``), and stops it in a ``finally``.
- Python ignores SIGINT for good when it was started with SIGINT ignored (``cmd &`` in a script),
  and SIGTERM's default action skips every ``finally``. ``Stopper`` handles both signals: the first
  raises ``Stop`` (a ``KeyboardInterrupt``) in the main thread, so ``launch_training``'s ``finally``
  stops the trainer's process group and the flow engine records the run. Prefect's own SIGTERM
  handler is installed while the flow runs; it records the run as Crashed and then re-sends
  SIGTERM to itself, which reaches ``Stopper`` once Prefect has restored it.
- Prefect records any interrupt as **Crashed** (``exception_to_crashed_state``); a stop someone asked
  for is not a crash, so ``mark_cancelled`` then sets the run Cancelled with the reason.
- SIGKILL (or the OOM killer) leaves nothing to run: what the command started dies by its death
  signal or by the watcher of ``reap_when_gone``, and the run stays "Running" in Prefect. Each run
  carries its owner (host, pid, process identity) in a tag; the next ``tuneline run`` marks such
  runs Crashed when the owner is gone from this host (``mark_orphans_crashed``; the same
  ``owner_dead`` test as the locks).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from uuid import UUID

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number, as a shell reports it
REASONS = {signal.SIGINT: "interrupted by the user (SIGINT)", signal.SIGTERM: "terminated (SIGTERM)"}


class Stop(KeyboardInterrupt):
    """The first SIGINT or SIGTERM, raised in the main thread wherever it is."""

    def __init__(self, signum: int):
        super().__init__(REASONS[signum])
        self.signum = signum


class Stopper:
    """SIGINT/SIGTERM handler for ``tuneline run`` (see the module docstring).

    ``signum`` is the first signal received, ``flow_run_id`` the run it interrupted (set by the
    ``on_running`` hook). After ``hold()`` a first signal is only recorded: the
    cleanup it would interrupt is what stops the server."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.flow_run_id: UUID | None = None
        self._raise = True
        self._previous: dict[int, Any] = {}

    def install(self) -> Stopper:
        for signum in EXIT_CODES:  # explicitly: an inherited "ignore SIGINT" must not make Ctrl-C a no-op
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def hold(self) -> None:
        self._raise = False

    @property
    def reason(self) -> str:
        return REASONS.get(self.signum, "stopped")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 1)

    def on_running(self, flow: Any, flow_run: Any, state: Any) -> None:
        """Flow ``on_running`` hook: remember the run, to record it Cancelled however the signal lands."""
        self.flow_run_id = flow_run.id

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # the second signal: no more waiting, nothing left behind
            print(f"\nretrain stopped at once ({signal.Signals(signum).name} again)", file=sys.stderr, flush=True)
            kill_children(signal.SIGKILL)
            os._exit(self.exit_code)
        self.signum = signum
        if self._raise:
            raise Stop(signum)


def mark_cancelled(flow_run_id: UUID, reason: str) -> str:
    """Set an interrupted run Cancelled with ``reason``; a run that already ended otherwise
    (completed, failed) keeps its state. Returns the final state's name."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(flow_run_id).state
        if state is not None and state.is_final() and not state.is_crashed():
            return state.name
        client.set_flow_run_state(flow_run_id, Cancelled(message=reason), force=True)
    return "Cancelled"


OWNER_TAG = "tuneline-process:"  # + host:pid:process identity of the `tuneline run` that started the flow run


def owner_tag() -> str:
    """The tag naming this process as a flow run's owner."""
    from tasks.artifacts.locks import process_identity

    return f"{OWNER_TAG}{socket.gethostname()}:{os.getpid()}:{process_identity()}"


def mark_orphans_crashed() -> list[str]:
    """Set Crashed every Running or Pending flow run whose owning ``tuneline run`` is gone from this
    host (killed: no state was written); returns their names. Runs of other hosts, of workers (no
    owner tag) and of live processes are left alone."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    from tasks.artifacts.locks import owner_dead

    active = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING, StateType.PENDING]))
    marked = []
    with get_client(sync_client=True) as client:
        for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(state=active)):
            for tag in run.tags or []:
                host, _, rest = tag.removeprefix(OWNER_TAG).partition(":")
                pid, _, identity = rest.partition(":")
                if tag.startswith(OWNER_TAG) and pid.isdigit() and owner_dead(host, int(pid), identity):
                    why = f"its process (pid {pid} on {host}) ended without recording a state (killed)"
                    client.set_flow_run_state(run.id, Crashed(message=why), force=True)
                    marked.append(run.name)
    return marked


def flush_prefect() -> None:
    """Send the run's queued logs and events now, while the server is still up."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except Exception:  # noqa: BLE001 — a lost log line must not keep the run from stopping
            pass


def kill_children(sig: int) -> None:
    """Send ``sig`` to every descendant of this process, to its whole group where it leads one (the
    trainer, its guard and the temporary server each lead their own)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append((int(stat.parent.name), int(fields[2])))
        except (OSError, IndexError, ValueError):
            continue
    todo = [os.getpid()]
    while todo:
        for pid, pgid in children.get(todo.pop(), []):
            todo.append(pid)
            try:
                os.killpg(pid, sig) if pgid == pid else os.kill(pid, sig)
            except ProcessLookupError:
                pass


OWNER_ENV = "TUNELINE_OWNER"  # in the environment of everything a command starts: whose it is


def reap_when_gone() -> None:
    """Whatever this command starts dies with it, however it ends (SIGKILL and the OOM killer too),
    including processes started by code not ours (Prefect's own temporary server, in the terminal's
    group, stopped only at exit) and by grandchildren in other sessions.

    How: a mark (this process's identity) goes into the environment every child inherits, and a
    small watcher is forked in its own session. The watcher blocks on a pipe whose only writer is
    this process; the kernel closes it when this process ends, and the watcher then SIGKILLs every
    process still carrying the mark (read from /proc/PID/environ; a reused pid carries no mark). Our
    own children also get a parent-death signal (``_die_with_parent``); this is the net under it."""
    from tasks.artifacts.locks import process_identity

    mark = f"{os.getpid()}/{process_identity()}"
    if os.environ.get(OWNER_ENV) == mark:
        return  # this process has its watcher already
    os.environ[OWNER_ENV] = mark
    read_end, write_end = os.pipe()  # not inheritable: no exec'd child keeps the watcher waiting
    if os.fork() != 0:
        os.close(read_end)
        return  # write_end stays open, unused, for this process's whole life
    try:
        os.close(write_end)
        os.setsid()  # a Ctrl-C or killpg of the command's group does not stop the watcher
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # never hold the caller's pipes open (`tuneline run | tee`, a test's capture)
            os.dup2(devnull, fd)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the command's handler (it raises Stop)
        while os.read(read_end, 1):
            pass
        needle = f"{OWNER_ENV}={mark}".encode()
        for _ in range(20):  # a process may start another while we kill: look again until none is left
            marked = [pid for pid in _pids() if pid != os.getpid() and needle in _environ(pid)]
            if not marked:
                break
            for pid in marked:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
    finally:
        os._exit(0)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _environ(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM it when this process dies, even by SIGKILL."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryServer:
    """Prefect's temporary server (what Prefect starts when ``PREFECT_API_URL`` is unset, SQLite in
    ``PREFECT_HOME``), started in its own session so Ctrl-C reaches only the flow, and stopped by
    ``stop()`` rather than at exit."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.api_url = ""

    def start(self, timeout: float) -> TemporaryServer:
        import prefect

        port = _free_port()
        self.api_url = f"http://127.0.0.1:{port}/api"
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent)]
        cmd += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--log-level", "error", "--lifespan", "on"]
        # The settings Prefect gives its own temporary server: no UI, the ephemeral server's services; and, as
        # serve-local's `--analytics-off`, no telemetry (offline its heartbeat logs an ERROR and a traceback,
        # and it writes to the SQLite file beside the run: "database is locked").
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        env.pop("PREFECT_API_URL", None)
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the temporary Prefect server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the temporary Prefect server did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
