"""The sandbox's inside: what runs in the new namespaces, started by ``tasks/evaluate/sandbox.py``.

Launched as a plain file, ``python -I -S -B tasks/evaluate/sandbox_child.py --supervise CFG_JSON``: no site
packages and no ``tasks`` package on the path, so this module imports the standard library only.
As the supervisor (PID 1 of the sandbox's PID namespace) it makes the mounts private and read-only,
covers the program's folder with a tmpfs, forks the program, and reports on ``status_fd`` as JSON.
The forked program sets its rlimits, drops privileges (uid 65534, or a capability-less ns-root),
then execs Python on ``_RUNNER``. Why each layer exists: the docstring of ``tasks/evaluate/sandbox.py``.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys

# Trusted prelude executed by the program's interpreter. How "it ran to the end" reaches the caller, and
# why a completion cannot forge it:
# - The verdict travels supervisor -> caller on status_fd, which the program never holds (closed before
#   exec); the supervisor is another uid / non-dumpable PID 1, so the program cannot write for it.
# - The supervisor's evidence that the program finished is a per-run 16-byte random token: the runner
#   reads it from secret_fd and closes that fd *before* the program runs, and writes it back on done_fd
#   only after the program returned. The supervisor accepts exactly the token and nothing else, so
#   writing a marker or any bytes to every descriptor, then exiting 0, is a failure.
# - Limit: the check runs in the completion's own process, so a completion that digs the token out of
#   the runner's frame or memory could still forge it; that needs code aimed at this harness, not a
#   blind write to descriptors, and no descriptor of the program carries it.
_RUNNER = (
    "import os, runpy, sys\n"
    "def _run(secret_fd, done_fd, path):\n"
    "    token = os.read(secret_fd, 64)\n"
    "    os.close(secret_fd)\n"
    "    os.set_inheritable(done_fd, False)\n"
    "    sys.argv = [path]\n"
    "    runpy.run_path(path, run_name='__main__')\n"
    "    os.write(done_fd, token)\n"
    "_run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])\n"
)
TOKEN_BYTES = 16

# prctl(2), mount(2) and mount_setattr(2) constants (linux/prctl.h, linux/mount.h).
_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_CAPBSET_DROP = 24
_PR_SET_SECUREBITS = 28
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36
_SECBIT_NOROOT_AND_LOCKED = 0x3
_SYS_MOUNT_SETATTR = 442  # same number on x86_64 and aarch64 (unified since 5.12)
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_PRIVATE = 0x40000
_MS_RDONLY = 0x1

# Places where a host puts sockets and shared scratch files: each gets a fresh tmpfs inside the sandbox.
# The first three are the program's private, size-limited scratch space; the others are covered read-only
# (e.g. /run/docker.sock, /run/user/*/bus, Prefect's or a database's sockets are not even visible).
_PRIVATE_SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")
_HIDDEN = ("/run", "/var/run", "/var/lib/docker", "/var/lib/containerd")

# System calls the program never needs (seccomp filter, see _seccomp_filter): namespaces and mounts
# (a way out of the sandbox's own), tracing and another process's memory, kernel keyrings, modules,
# BPF/perf/io_uring (io_uring's operations bypass seccomp's per-call checks).
_DENIED_SYSCALLS = (
    "unshare", "setns", "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    "mount", "umount2", "pivot_root", "chroot", "mount_setattr", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick",
    "add_key", "request_key", "keyctl",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "reboot", "swapon", "swapoff", "acct", "syslog", "quotactl", "lookup_dcookie",
    "name_to_handle_at", "open_by_handle_at",
)  # fmt: skip
# clone(2) flags that create namespaces (linux/sched.h): clone with any of them is refused.
_CLONE_NEW = (0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)


def read_all_nonblocking(fd: int) -> bytes:
    """What a pipe holds now, without waiting for its writer (which may be a stray grandchild)."""
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def private_ancestor(path: str) -> str | None:
    """Topmost directory on ``path`` that "others" cannot enter (no o+x), if any."""
    current = "/"
    for part in [p for p in path.split("/") if p]:
        current = os.path.join(current, part)
        try:
            st = os.stat(current)
        except OSError:
            return None
        if not st.st_mode & 0o001:
            return current
    return None


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    import ctypes

    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _prctl(option: int, arg: int = 0) -> None:
    _check(_libc().prctl(option, arg, 0, 0, 0), f"prctl({option})")


def _make_root_readonly() -> None:
    """Recursively mark every mount of this (private) mount namespace ro+nosuid."""
    import ctypes

    attr = (ctypes.c_uint64 * 4)(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
    libc = _libc()
    ret = libc.syscall(
        _SYS_MOUNT_SETATTR, _AT_FDCWD, b"/", _AT_RECURSIVE, ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))
    )
    _check(0 if ret == 0 else -1, "mount_setattr(/, RDONLY, AT_RECURSIVE)")


def _mount_private_tmpfs(workdir: str, uid: int | None, size_mb: int, program: bytes) -> None:
    """Cover ``workdir`` with a fresh size-limited tmpfs holding only program.py."""
    os.makedirs(workdir, exist_ok=True)  # under a private /tmp it has to be made again
    opts = f"size={size_mb}m,mode=0700"
    if uid is not None:
        opts += f",uid={uid},gid={uid}"
    _mount("tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV, opts)
    path = os.path.join(workdir, "program.py")
    with open(path, "wb") as f:
        f.write(program)
    os.chmod(path, 0o644)


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda v: None if v is None else v.encode()  # noqa: E731
    _check(_libc().mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _expose_interpreter(prefixes: list[str]) -> None:
    """Hide private dirs (e.g. 0700 /root) behind a tmpfs, bind back only ``prefixes``."""
    plan = [(a, p, os.open(p, os.O_PATH)) for p in prefixes if (a := private_ancestor(p))]
    covered: list[str] = []
    for ancestor, prefix, fd in sorted(plan):
        if not any(ancestor == c or ancestor.startswith(c + "/") for c in covered):
            _mount("tmpfs", ancestor, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=0755")
            covered.append(ancestor)
        os.makedirs(prefix, exist_ok=True)
        part = prefix
        while part != ancestor and part != "/":  # makedirs honours umask; be explicit
            os.chmod(part, 0o755)
            part = os.path.dirname(part)
        _mount(f"/proc/self/fd/{fd}", prefix, None, _MS_BIND | _MS_REC)
        os.close(fd)


def _cover_host_dirs(keep: list[str], size_mb: int, warnings: list[str]) -> None:
    """A private, empty /tmp, /var/tmp and /dev/shm (writable, ``size_mb`` each) and an empty read-only
    /run: the host's scratch files and sockets there are not visible. A folder holding something the
    program needs (its interpreter) stays as it is, said in a warning."""
    for path, writable in [(p, True) for p in _PRIVATE_SCRATCH] + [(p, False) for p in _HIDDEN]:
        if os.path.islink(path) or not os.path.isdir(path):
            continue
        if any(k == path or k.startswith(path + "/") for k in keep):
            warnings.append(f"{path} holds the interpreter; it is not covered by a private tmpfs")
            continue
        opts = f"size={size_mb}m,mode=1777" if writable else "size=1m,mode=0755"
        _mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV | (0 if writable else _MS_RDONLY), opts)


def _setup_filesystem(cfg: dict, warnings: list[str]) -> None:
    """Mount-namespace layer; degrades to the uid layer (logged) on old kernels."""
    with open(os.path.join(cfg["dir"], "program.py"), "rb") as f:
        program = f.read()  # before the host's temp folder is covered
    _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # never propagate to the host
    if cfg.get("expose"):
        _expose_interpreter(cfg["expose"])
    try:
        _make_root_readonly()
    except OSError as exc:
        warnings.append(f"read-only root unavailable ({exc}); relying on uid/permissions")
    size_mb = max(16, min(256, cfg["memory_mb"] // 4))
    _cover_host_dirs(cfg.get("keep") or [], size_mb, warnings)
    _mount_private_tmpfs(cfg["dir"], cfg["uid"], size_mb, program)


def _set_rlimits(cfg: dict) -> None:
    mem = cfg["memory_mb"] * 1024 * 1024
    cpu = int(cfg["timeout_s"]) + 2
    fsize = max(16, min(256, cfg["memory_mb"] // 4)) * 1024 * 1024
    limits = {
        resource.RLIMIT_AS: (mem, mem),
        resource.RLIMIT_CPU: (cpu, cpu + 1),
        resource.RLIMIT_FSIZE: (fsize, fsize),
        resource.RLIMIT_NOFILE: (256, 256),
        resource.RLIMIT_CORE: (0, 0),
        resource.RLIMIT_NPROC: (512, 512),
    }
    for res, lim in limits.items():
        resource.setrlimit(res, lim)


def _drop_privileges(cfg: dict) -> None:
    """Become uid/gid 65534 (root mode) or a capability-less ns-root (userns)."""
    if cfg["uid"] is not None:
        os.setgroups([])
        os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
        os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])
    elif cfg["mode"] == "userns":
        try:
            last = int(open("/proc/sys/kernel/cap_last_cap").read())
        except (OSError, ValueError):
            last = 40
        for cap in range(last + 1):
            _prctl(_PR_CAPBSET_DROP, cap)
        _prctl(_PR_SET_SECUREBITS, _SECBIT_NOROOT_AND_LOCKED)  # exec of uid 0 grants no caps
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)


def _seccomp_filter(module_path: str, libraries: dict[str, str] | None = None):
    """The program's system-call filter, built with libseccomp through ``pyseccomp`` (a ctypes binding
    with the API of libseccomp's own Python bindings; loaded from its file because this process runs
    without site-packages). Everything not listed is allowed; a refused call fails with EPERM."""
    import errno
    import importlib.util

    if libraries:  # paths the caller found once: find_library runs `ldconfig -p` (~20 ms a problem)
        import ctypes.util

        found = ctypes.util.find_library
        ctypes.util.find_library = lambda name: libraries.get(name) or found(name)
    spec = importlib.util.spec_from_file_location("pyseccomp", module_path)
    sc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sc)
    deny = sc.ERRNO(errno.EPERM)
    filt = sc.SyscallFilter(sc.ALLOW)  # calls of a foreign architecture (int 0x80) kill the program
    filt.add_rule(deny, "socket")  # no socket of any family: nothing to connect to, nothing to listen on
    for name in _DENIED_SYSCALLS:
        try:
            filt.add_rule(deny, name)
        except (OSError, ValueError, RuntimeError):  # a call this kernel/libseccomp does not know
            pass
    for flag in _CLONE_NEW:
        filt.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    # clone3 passes its flags in memory, which a filter cannot read: ENOSYS makes libc fall back to clone.
    filt.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    return filt


def _exec_program(cfg: dict, secret_fd: int, done_fd: int) -> None:
    """Child of the supervisor: limits, privileges, folder, then exec python."""
    workdir = cfg["dir"]
    os.close(cfg["status_fd"])
    # built while its file is surely readable; loaded just before exec
    filt = _seccomp_filter(cfg["seccomp"], cfg.get("libraries"))
    _set_rlimits(cfg)
    _drop_privileges(cfg)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
    os.chdir(workdir)
    os.set_inheritable(secret_fd, True)
    os.set_inheritable(done_fd, True)
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    py = cfg["python"]
    filt.load()  # after no_new_privs; kept across execve, inherited by every child
    os.execve(py, [py, "-I", "-B", "-c", _RUNNER, str(secret_fd), str(done_fd), "program.py"], env)


def _kill_descendants() -> None:
    """Kill and reap everything left below us (needed in plain mode; we are a subreaper)."""
    for _ in range(100):
        kids = set()
        try:
            for tid in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{tid}/children") as f:
                    kids.update(int(p) for p in f.read().split())
        except OSError:
            return
        if not kids:
            return
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in kids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _supervise(cfg: dict) -> int:
    """Set up the folder, fork+exec the program, wait, report JSON on status_fd."""
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)
    report = {"rc": None, "signal": None, "finished": False, "timeout": False, "error": None, "warnings": []}
    try:
        _prctl(_PR_SET_DUMPABLE, 0)  # the program must not open /proc/1/fd/*
        _prctl(_PR_SET_CHILD_SUBREAPER, 1)
        if cfg["mode"] in ("root", "userns"):
            _setup_filesystem(cfg, report["warnings"])
        token = os.urandom(TOKEN_BYTES)
        secret_r, secret_w = os.pipe()
        os.write(secret_w, token)  # fits a pipe's buffer; the runner takes it before the program runs
        os.close(secret_w)
        done_r, done_w = os.pipe()
        # Close-on-exec: only this process's own code before exec can say "could not start the program".
        start_err_r, start_err_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(done_r)
                os.close(start_err_r)
                _exec_program(cfg, secret_r, done_w)
            except BaseException as exc:  # noqa: BLE001 - report anything, never return
                try:
                    os.write(start_err_w, b"E")
                    sys.stderr.write(f"sandbox: could not start program: {exc!r}\n")
                    sys.stderr.flush()
                finally:
                    os._exit(125)
        for fd in (secret_r, done_w, start_err_w):
            os.close(fd)

        def on_alarm(_signum, _frame):
            report["timeout"] = True
            os.kill(pid, signal.SIGKILL)

        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, cfg["timeout_s"] + 2.0)
        while True:  # as PID 1 / subreaper we also reap orphans
            done, wstatus = os.waitpid(-1, 0)
            if done == pid:
                break
        signal.setitimer(signal.ITIMER_REAL, 0)
        _kill_descendants()
        if os.WIFSIGNALED(wstatus):
            report["signal"] = os.WTERMSIG(wstatus)
        else:
            report["rc"] = os.waitstatus_to_exitcode(wstatus)
        report["finished"] = read_all_nonblocking(done_r) == token  # exactly the token, nothing more
        if read_all_nonblocking(start_err_r):
            report["error"] = "could not start the program (see stderr)"
    except BaseException as exc:  # noqa: BLE001
        report["error"] = repr(exc)[:300]
    try:
        os.write(status_fd, json.dumps(report).encode())
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--supervise":
        os._exit(_supervise(json.loads(sys.argv[2])))
    sys.exit("usage: sandbox_child.py --supervise CFG_JSON (internal)")
