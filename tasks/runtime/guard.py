"""The trainer's guard: the small process between a flow and its training command, so that a trainer
never outlives its flow and never runs twice on one scratch folder (docs/operating.md, "Trainers and
their flow").

``launch_training`` (tasks/runtime/launch.py) starts ``python -m tasks.runtime.guard --parent PID ... -- CMD...`` in a
session of its own, with a parent-death signal (SIGTERM). The guard, in order:

1. takes the scratch folder's lock: a ``StoreLock`` (tasks/artifacts/locks.py) on a local store rooted at the
   folder, key ``trainer.lock``; it waits while another guard holds it (``--lock-timeout`` seconds,
   then fails naming the holder), and takes over at once a lock whose guard and trainer group are dead
   on this host (a guard killed by SIGKILL leaves one behind);
2. moves the pending job file into place, starts CMD in its own process group (with a parent-death
   signal too: if the guard itself is killed, torchrun gets SIGTERM and stops its workers), and
   writes JOB.pid = CMD's pid, which is the group id (``kill -- -PID`` stops the trainer);
3. watches. The trainer ends: done. The flow is gone (the death signal, or ``os.getppid()`` changed:
   the signal follows the *thread* that forked, and Prefect runs tasks in worker threads), the guard
   gets SIGTERM/SIGINT/SIGHUP, or the lock was lost: the group gets SIGTERM, ``--grace`` seconds,
   then SIGKILL;
4. makes sure nothing of the trainer is left (the group, and descendants that left it: the guard is
   their subreaper), releases the lock, removes JOB.pid and exits as the trainer did (same code, or
   the same signal).

Linux only for the death signal and the subreaper (prctl); elsewhere the ppid poll still works.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tasks.artifacts.locks import Holder, PreconditionFailed, StoreLock, delete_if, read_versioned
from tasks.artifacts.store import Store

LOCK_KEY = "trainer.lock"
_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_POLL_S = 0.2

log = logging.getLogger("tuneline.guard")

try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl  # libc's, through the interpreter's own symbols
except (OSError, AttributeError):  # not Linux: no death signal, the ppid poll remains
    _prctl = None


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when the thread that forked it exits (a
    ``preexec_fn``; bound before the fork so the child only makes one call)."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def _die_with_guard() -> None:
    die_with_parent(signal.SIGTERM)  # SIGTERM, not SIGKILL: torchrun must live long enough to stop its workers


# ----------------------------------------------------------------------------------------------
# Processes, from /proc (zombies count as dead: nobody may reap an orphan in a container)
# ----------------------------------------------------------------------------------------------
def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) of a process, or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[2])


def _processes() -> dict[int, tuple[str, int, int]]:
    """Every live process: pid -> (state, ppid, pgrp); zombies left out."""
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) and st[0] != "Z":
            found[int(name)] = st
    return found


def descendant_groups(root: int) -> set[int]:
    """The process groups of ``root`` and of every process under it. A trainer's helpers may lead
    groups of their own (the vLLM server does), so stopping the trainer's group alone would miss them."""
    procs = _processes()
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    groups, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in procs:
            groups.add(procs[pid][2])
        todo.extend(children.get(pid, []))
    return groups


def _survivors(groups: set[int]) -> list[int]:
    """Live processes of a trainer: every group it made (``groups``) and our own children (orphans we
    adopted as subreaper)."""
    if not Path("/proc/self/stat").exists():  # no /proc: the groups as a whole
        live = []
        for pgid in groups:
            try:
                os.killpg(pgid, 0)
                live.append(pgid)
            except (ProcessLookupError, PermissionError):
                pass
        return live
    me = os.getpid()
    mine = os.getpgrp()
    return [
        pid
        for pid, (_, ppid, pgrp) in _processes().items()
        if pid != me and ((pgrp in groups and pgrp != mine) or ppid == me)
    ]


def _signal_all(groups: set[int], pids: list[int], sig: int) -> None:
    mine = os.getpgrp()
    for pgid in groups - {mine}:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:  # adopted descendants whose group is not among them
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Guard:
    """One guarded run (see the module docstring)."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.stop_reason = ""
        self.signalled = ""
        self.trainer: subprocess.Popen | None = None
        self.status: int | None = None  # the trainer's exit code (negative: killed by that signal)

    # -- messages: to the flow's stream while it lives, else to the log -----------------------
    def say(self, msg: str) -> None:
        line = f"[tuneline.guard] {msg}"
        try:
            print(line, flush=True)
        except OSError:
            pass
        if self.parent_gone() and self.args.log:
            try:
                with open(self.args.log, "a") as f:
                    f.write(line + "\n")
            except OSError:
                pass

    def parent_gone(self) -> bool:
        return os.getppid() != self.args.parent

    def on_signal(self, signum: int, _frame: object) -> None:
        self.signalled = self.signalled or f"signal {signal.Signals(signum).name}"

    def should_stop(self, lock: StoreLock | None) -> str:
        if not self.stop_reason:  # the flow's death comes as SIGTERM too: name the cause, not the signal
            if self.parent_gone():
                self.stop_reason = f"the flow process (pid {self.args.parent}) is gone"
            elif self.signalled:
                self.stop_reason = self.signalled
            elif lock is not None and lock.lost:
                self.stop_reason = "the scratch lock was taken over"
        return self.stop_reason

    def reap(self) -> None:
        """Collect every finished child (the trainer, and orphans adopted as subreaper)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.trainer is not None and pid == self.trainer.pid:
                self.status = os.waitstatus_to_exitcode(status)
                self.trainer.returncode = self.status  # we reap ourselves: Popen must not wait again

    # -- the lock ----------------------------------------------------------------------------
    def take_lock(self) -> StoreLock | None:
        folder = Path(self.args.lock_dir)
        store = Store(str(folder))
        owner = f"trainer guard of {folder} (flow pid {self.args.parent} on {socket.gethostname()})"
        lock = StoreLock(store, LOCK_KEY, owner=owner, log=log, take_dead=False)  # dead guard: _take_dead_lock
        start, said = time.monotonic(), False
        while not lock.try_acquire():
            if self.should_stop(None):
                return None
            if self._take_dead_lock(store):
                continue
            waited = time.monotonic() - start
            if waited >= self.args.lock_timeout:
                raise TimeoutError(
                    f"scratch folder {folder} is still locked after {waited:.0f}s by {lock.holder() or 'nobody now'}: "
                    "another trainer runs there; not starting a second one (TUNELINE_TRAINER_LOCK_TIMEOUT_S)"
                )
            if not said:
                self.say(f"waiting: another trainer holds {store.uri(LOCK_KEY)}: {lock.waited_for or '?'}")
                said = True
            time.sleep(min(1.0, lock.poll_s))
        return lock

    def _take_dead_lock(self, store: Store) -> bool:
        """Remove a lock whose guard died on this host with no trainer process left (no need to wait a ttl)."""
        current = read_versioned(store, LOCK_KEY)
        holder = Holder.parse(current[0]) if current else None
        if current is None or holder is None or not holder.dead():
            return False
        pid_file = Path(self.args.pid_file)
        try:
            pgid = int(pid_file.read_text())
        except (OSError, ValueError):
            pgid = 0
        if pgid and _survivors({pgid}):
            return False
        try:
            delete_if(store, LOCK_KEY, current[1])
        except PreconditionFailed:
            return False
        self.say(f"took over the lock of a dead guard: {holder}")
        return True

    # -- the run -----------------------------------------------------------------------------
    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self.on_signal)
        if _prctl is not None:
            _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of the trainer come to us, not to init
        if self.parent_gone():  # died before the death signal was armed
            self.say(f"flow process {self.args.parent} is already gone: not starting")
            return 1
        try:
            lock = self.take_lock()
        except TimeoutError as e:
            lock = None
            self.say(str(e))
        if lock is None:  # nothing started: the job waiting aside is not needed any more
            if self.args.pending:
                Path(self.args.pending).unlink(missing_ok=True)
            if self.stop_reason:
                self.say(f"stopped while waiting for the scratch lock ({self.stop_reason})")
            return 75 if not self.stop_reason else 1  # 75: EX_TEMPFAIL, a later retry may find the folder free
        try:
            return self._run_locked(lock)
        finally:
            Path(self.args.pid_file).unlink(missing_ok=True)
            lock.release()

    def _run_locked(self, lock: StoreLock) -> int:
        if self.args.pending:
            os.replace(self.args.pending, self.args.job)  # written only now: a waiting launch never touches it
        self.trainer = subprocess.Popen(self.args.cmd, start_new_session=True, preexec_fn=_die_with_guard)
        pgid = self.trainer.pid
        Path(self.args.pid_file).write_text(str(pgid))
        groups, scanned = {pgid}, 0.0
        while self.status is None:
            self.reap()
            if time.monotonic() - scanned > 1.0 and Path("/proc/self/stat").exists():
                groups |= descendant_groups(pgid)  # groups the trainer's helpers lead (a vLLM server)
                scanned = time.monotonic()
            if self.status is None and self.should_stop(lock):
                break
            time.sleep(_POLL_S)
        if self.status is None:
            self.say(f"{self.stop_reason}: stopping the trainer (process group {pgid})")
        self._stop(groups)  # after a clean exit too: a worker whose torchrun died must not keep the GPU
        if self.status is None:
            self.status = -signal.SIGKILL
        return self.status

    def _stop(self, groups: set[int]) -> None:
        """SIGTERM to what is left of the trainer, then SIGKILL after the grace period."""
        self.reap()
        if not (left := _survivors(groups)):
            return
        _signal_all(groups, left, signal.SIGTERM)
        deadline = time.monotonic() + self.args.grace
        while (left := _survivors(groups)) and time.monotonic() < deadline:
            self.reap()
            time.sleep(0.1)
        if left:
            self.say(f"{len(left)} trainer process(es) still alive after {self.args.grace:.0f}s: SIGKILL")
            _signal_all(groups, left, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _survivors(groups) and time.monotonic() < deadline:
                self.reap()
                time.sleep(0.05)
        self.reap()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tasks.runtime.guard", description=__doc__.split("\n\n")[0])
    p.add_argument("--parent", type=int, required=True, help="pid of the flow process to follow")
    p.add_argument("--lock-dir", required=True, help="the scratch folder to lock")
    p.add_argument("--pid-file", required=True, help="JOB.pid: the trainer's process group while it runs")
    p.add_argument("--job", required=True, help="JOB.json")
    p.add_argument("--pending", default="", help="the job, written aside; moved to --job once the lock is held")
    p.add_argument("--log", default="", help="JOB.log: where the guard writes once the flow is gone")
    p.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--lock-timeout", type=float, default=600.0, help="seconds to wait for the scratch lock")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- the training command")
    args = p.parse_args(argv)
    args.cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not args.cmd:
        p.error("no training command after --")
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="[tuneline.guard] %(message)s")
    status = Guard(args).run()
    if status < 0:  # die as the trainer died, so the flow sees the same signal
        sys.stdout.flush()
        if -status not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        time.sleep(1)
    sys.exit(status if 0 <= status < 256 else 1)


if __name__ == "__main__":
    main()
