"""The sandbox's system-call filter and private folders (tasks/evaluate/sandbox_child.py): each escape
tried in issue 28 is refused; each attack returns the right answer only if its call succeeded."""

from __future__ import annotations

import os
import socket
import sys
import textwrap

import pytest

from tasks.evaluate import sandbox
from tasks.evaluate.sandbox import check_humaneval

ADD = {
    "task_id": "test/add",
    "prompt": "def add(a, b):\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n",
    "entry_point": "add",
}
CALLS = {
    "unshare_newuser": "libc.unshare(0x10000000)",
    "ptrace_traceme": "libc.ptrace(0, 0, 0, 0)",
    "mount_tmpfs": "libc.mount(b'none', b'/mnt', b'tmpfs', 0, None)",
    "add_key": "libc.syscall(248, b'user', b'k', b'v', 1, -2)",
    "init_module": "libc.syscall(175, 0, 0, b'')",
    "socket_inet": "libc.socket(2, 1, 0) if libc.socket(2, 1, 0) < 0 else 0",
    "socket_inet6": "libc.socket(10, 1, 0) if libc.socket(10, 1, 0) < 0 else 0",
    "socket_unix": "libc.socket(1, 1, 0) if libc.socket(1, 1, 0) < 0 else 0",
}


def body(code: str) -> str:
    return textwrap.indent(textwrap.dedent(code).strip("\n"), "    ") + "\n"


@pytest.mark.parametrize("call", CALLS.values(), ids=list(CALLS))
def test_denied_calls_fail_with_eperm(call):
    attack = f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nr = {call}\nif r == 0:\n    return a + b\n"
    attack += "raise OSError(ctypes.get_errno(), 'refused')"
    result = check_humaneval(ADD, body(attack), timeout_s=5)
    assert not result.passed, result
    assert "Errno 1]" in result.detail, result


def test_host_unix_socket_is_not_reachable(tmp_path):
    path = str(tmp_path / "host.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    srv.setblocking(False)
    os.chmod(path, 0o777)
    attack = f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({path!r})\nreturn a + b"
    try:
        result = check_humaneval(ADD, body(attack), timeout_s=5)
        assert not result.passed, result
        with pytest.raises(BlockingIOError):
            srv.accept()
    finally:
        srv.close()


def test_honest_programs_with_threads_and_subprocesses_pass():
    honest = "import subprocess, threading\nt = threading.Thread(target=print)\nt.start()\nt.join()\n"
    # A checkout under /tmp keeps the host's /tmp (it holds the interpreter): write to /var/tmp there.
    scratch = "/var/tmp/x" if sys.prefix.startswith("/tmp/") else "/tmp/x"
    honest += f"subprocess.run(['true'], check=True)\nopen('{scratch}', 'w').write('ok')\nreturn a + b"
    result = check_humaneval(ADD, body(honest), timeout_s=10)
    assert result.passed or sandbox.sandbox_mode() == "plain", result


FORGED_VERDICTS = {
    "old_marker": "[b'F']",
    "report_json": """[b'{"rc": 0, "signal": null, "finished": true, "timeout": false, "error": null}']""",
    "plausible_bytes": "[b'1', b'P', b'passed', b'OK', b'\\\\x00' * 16]",
    "replay_what_fds_hold": "echoed",
}


@pytest.mark.parametrize("payloads", FORGED_VERDICTS.values(), ids=list(FORGED_VERDICTS))
def test_verdict_bytes_on_every_descriptor_do_not_make_a_pass(payloads):
    """Issue 28: a completion that wrote the "finished" marker to its inherited descriptors and exited 0
    was counted as passed. Here it writes verdict-looking bytes (or whatever it can read from its
    descriptors) to fds 0..255 and /proc/self/fd/*, then leaves with status 0 before check() runs."""
    attack = f"""
        import os
        echoed = []
        for fd in range(256):
            try:
                os.set_blocking(fd, False)
                echoed.append(os.read(fd, 4096))
            except OSError:
                pass
        echoed = [e for e in echoed if e]
        for data in {payloads}:
            for fd in range(256):
                try:
                    os.write(fd, data)
                except OSError:
                    pass
            for name in os.listdir('/proc/self/fd'):
                try:
                    with open('/proc/self/fd/' + name, 'wb', buffering=0) as f:
                        f.write(data)
                except OSError:
                    pass
        os._exit(0)
    """
    result = check_humaneval(ADD, body(attack), timeout_s=5)
    assert (result.passed, result.status) == (False, "failed"), result
    honest = check_humaneval(ADD, body("print('F'); return a + b"), timeout_s=5)
    assert honest.passed, honest
