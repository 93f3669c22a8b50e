"""Behavioural tests for tasks/evaluate/sandbox.py (the pass@1 code-execution sandbox).

Every hostile completion is written so that it would *pass* if its attack
worked (it returns the right answer after the attack), so ``passed is False``
really means the attack failed. The test process plays the flow's process:
after each test it, and a sentinel child it owns, must still be alive.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from types import SimpleNamespace

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tasks.evaluate import sandbox  # noqa: E402
from tasks.evaluate.humaneval import check_code_isolation, load_humaneval, score_humaneval  # noqa: E402
from tasks.evaluate.params import EvalError, EvalParams  # noqa: E402
from tasks.evaluate.sandbox import ExecResult, check_humaneval, pass_at_1, run_program  # noqa: E402

SLACK_S = 1.5  # process start-up + namespace setup + teardown
ADD = {
    "task_id": "test/add",
    "prompt": "def add(a, b):\n",
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}
NAMESPACED = sandbox.sandbox_mode() in ("root", "userns")
needs_namespaces = pytest.mark.skipif(not NAMESPACED, reason="sandbox fell back to plain mode here")


def body(code: str) -> str:
    """Indent ``code`` as the body of ``add(a, b)``."""
    return textwrap.indent(textwrap.dedent(code).strip("\n"), "    ") + "\n"


def timed(problem: dict, completion: str, **kw) -> tuple[ExecResult, float]:
    start = time.monotonic()
    result = check_humaneval(problem, completion, **kw)
    return result, time.monotonic() - start


@pytest.fixture(scope="module")
def sentinel():
    """A process owned by the 'flow' that no sandboxed program may kill."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture(autouse=True)
def flow_unharmed(sentinel):
    pid = os.getpid()
    yield
    assert os.getpid() == pid
    os.kill(pid, 0)  # still running
    assert sentinel.poll() is None, "a sandboxed program killed a process of the flow"


# --------------------------------------------------------------------------- #
# scoring
# --------------------------------------------------------------------------- #


def test_right_and_wrong_completion_score_1_and_0():
    problem = load_humaneval(limit=1)[0]
    right, wrong = problem["canonical_solution"], body("return False")
    assert pass_at_1([problem], [right])[0] == 1.0
    assert pass_at_1([problem], [wrong])[0] == 0.0
    score, results = pass_at_1([problem, problem], [right, wrong], workers=2)
    assert score == 0.5
    assert [r.passed for r in results] == [True, False]
    assert results[0].status == "passed"
    assert results[1].status == "failed" and "AssertionError" in results[1].detail


def test_syntax_error_and_exception_are_failures():
    for completion in (body("return a +"), body("raise RuntimeError('nope')")):
        result = check_humaneval(ADD, completion)
        assert (result.passed, result.status) == (False, "failed")
        assert result.detail


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)", "exit()"])
def test_exiting_early_with_status_0_is_a_failure(exit_call):
    """A completion must not 'pass' by leaving before check() ran."""
    result = check_humaneval(ADD, body(exit_call))
    assert (result.passed, result.status) == (False, "failed")


def test_pass_at_1_validates_lengths_and_handles_empty():
    with pytest.raises(ValueError):
        pass_at_1([ADD], [])
    assert pass_at_1([], []) == (0.0, [])


def test_load_humaneval():
    problems = load_humaneval()
    assert len(problems) == 164
    assert problems[0]["task_id"] == "HumanEval/0"
    assert {"task_id", "prompt", "test", "entry_point", "canonical_solution"} <= problems[0].keys()
    assert len(load_humaneval(limit=3)) == 3


def test_all_canonical_solutions_pass():
    problems = load_humaneval()
    start = time.monotonic()
    score, results = pass_at_1(problems, [p["canonical_solution"] for p in problems], workers=2)
    elapsed = time.monotonic() - start
    failures = [(p["task_id"], r.status, r.detail) for p, r in zip(problems, results) if not r.passed]
    assert failures == []
    assert score == 1.0
    assert elapsed < 120


# --------------------------------------------------------------------------- #
# hostile completions
# --------------------------------------------------------------------------- #


def test_infinite_loop_times_out():
    result, elapsed = timed(ADD, body("while True:\n    pass"), timeout_s=2)
    assert (result.passed, result.status) == (False, "timeout")
    assert 2 <= elapsed < 2 + SLACK_S


def test_sleeping_forever_times_out():
    result, elapsed = timed(ADD, body("import time\ntime.sleep(3600)\nreturn a + b"), timeout_s=1)
    assert (result.passed, result.status) == (False, "timeout")
    assert elapsed < 1 + SLACK_S


@pytest.fixture
def server():
    """A TCP server in the flow's process; sandboxed code must never reach it."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv
    srv.close()


@pytest.mark.parametrize(
    "attack",
    [
        """
        import socket
        s = socket.create_connection(("127.0.0.1", PORT), timeout=2)
        s.sendall(b"pwned")
        return a + b
        """,
        """
        import _socket
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(("127.0.0.1", PORT))
        s.send(b"pwned")
        return a + b
        """,
        """
        import socket
        socket.getaddrinfo("pypi.org", 443)
        return a + b
        """,
    ],
    ids=["socket", "_socket", "dns"],
)
def test_network_is_unreachable(server, attack):
    if not NAMESPACED:
        pytest.skip("no network namespace in plain mode")
    port = server.getsockname()[1]
    result, elapsed = timed(ADD, body(attack.replace("PORT", str(port))), timeout_s=5)
    assert not result.passed and result.status == "failed", result
    assert elapsed < 5 + SLACK_S
    readable, _, _ = select.select([server], [], [], 0.2)
    assert readable == [], "the sandboxed program connected to the flow's server"


ATTACK_WRITE = """
with open(TARGET, "w") as f:
    f.write("pwned")
return a + b
"""


def test_write_into_a_private_dir_of_the_flow_fails(tmp_path):
    """Protected by the uid layer (tmp_path is 0700 root) and the read-only root."""
    target = tmp_path / "pwned.txt"
    result, elapsed = timed(ADD, body(ATTACK_WRITE.replace("TARGET", repr(str(target)))), timeout_s=5)
    assert not result.passed and result.status == "failed", result
    assert elapsed < 5 + SLACK_S
    assert not target.exists()


@needs_namespaces
@pytest.mark.parametrize("where", ["fresh_1777_dir", "tmp", "dev_shm"])
def test_write_into_world_writable_dirs_fails(where):
    """uid 65534 could write there; only the read-only mount namespace stops it."""
    base = tempfile.mkdtemp(prefix="sbx-test-") if where == "fresh_1777_dir" else None
    try:
        if base:
            os.chmod(base, 0o1777)
            target = os.path.join(base, "pwned.txt")
        else:
            target = os.path.join("/tmp" if where == "tmp" else "/dev/shm", f"sbx-pwned-{os.getpid()}.txt")
        result, elapsed = timed(ADD, body(ATTACK_WRITE.replace("TARGET", repr(target))), timeout_s=5)
        if base:  # /tmp and /dev/shm are the program's own private tmpfs: the write lands there, not on the host
            assert not result.passed and result.status == "failed", result
            assert any(m in result.detail for m in ("Read-only file system", "Permission denied", "No such file"))
        assert elapsed < 5 + SLACK_S
        assert not os.path.exists(target)
    finally:
        if base:
            shutil.rmtree(base, ignore_errors=True)


def test_own_folder_is_cwd_home_tmpdir_writable_and_removed():
    program = textwrap.dedent(
        """
        import os, sys, tempfile
        cwd = os.getcwd()
        assert os.environ["HOME"] == cwd and os.environ["TMPDIR"] == cwd
        assert tempfile.gettempdir() == cwd
        with open("scratch.txt", "w") as f:
            f.write("ok")
        assert open(os.path.join(cwd, "scratch.txt")).read() == "ok"
        print("CWD=" + cwd, file=sys.stderr)
        """
    )
    result = run_program(program, timeout_s=5)
    assert result.passed, result
    cwd = result.detail.split("CWD=")[1].split()[0]
    assert cwd.startswith(tempfile.gettempdir())
    assert not os.path.exists(cwd)


@pytest.mark.parametrize(
    "attack",
    ["x = bytearray(8 * 1024 ** 3)\nreturn a + b", "x = [bytearray(64 * 1024 ** 2) for _ in range(128)]\nreturn a + b"],
    ids=["one_block", "growing"],
)
def test_allocating_gigabytes_fails(attack):
    result, elapsed = timed(ADD, body(attack), timeout_s=5, memory_mb=512)
    assert not result.passed and result.status == "failed", result
    assert "MemoryError" in result.detail
    assert elapsed < 5 + SLACK_S


def test_ctypes_segfault_is_a_failure():
    result, elapsed = timed(ADD, body("import ctypes\nctypes.string_at(0)\nreturn a + b"), timeout_s=5)
    assert not result.passed and result.status == "failed", result
    assert "SIGSEGV" in result.detail
    assert elapsed < 5 + SLACK_S


def test_ctypes_libc_calls_cannot_escape(sentinel):
    attack = f"""
    import ctypes, os
    libc = ctypes.CDLL(None)
    libc.kill(-1, 9)  # reports success even when every target is EPERM: don't count it
    wins = 0
    for pid in (os.getppid(), {os.getpid()}, {sentinel.pid}):
        wins += libc.kill(pid, 9) == 0
    wins += libc.setuid(0) == 0
    return a + b if wins else None
    """
    result, elapsed = timed(ADD, body(attack), timeout_s=5)
    if sandbox.sandbox_mode() == "root":
        assert not result.passed and result.status == "failed", result
    assert elapsed < 5 + SLACK_S


def test_killing_its_parent_and_the_flow_fails(sentinel):
    attack = f"""
    import os, signal
    try:  # kill(-1) reports success even when every target is EPERM: don't count it
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    wins = 0
    for pid in (os.getppid(), {os.getpid()}, {sentinel.pid}):
        try:
            os.kill(pid, signal.SIGKILL)
            wins += 1
        except OSError:
            pass
    try:
        os.killpg(os.getpgid({os.getpid()}), signal.SIGKILL)
        wins += 1
    except OSError:
        pass
    return a + b if wins else None
    """
    result, elapsed = timed(ADD, body(attack), timeout_s=5)
    if sandbox.sandbox_mode() in ("root", "plain") and os.geteuid() == 0:
        assert not result.passed and result.status == "failed", result
    assert elapsed < 5 + SLACK_S


def test_plain_kill_parent_is_a_failure():
    result, elapsed = timed(
        ADD, body("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nreturn a + b"), timeout_s=5
    )
    if os.geteuid() == 0 and sandbox.sandbox_mode() != "userns":
        assert not result.passed and result.status == "failed", result
    assert elapsed < 5 + SLACK_S


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_background_processes_do_not_outlive_the_program():
    marker = f"{4000 + os.getpid() % 1000}.25"
    attack = f"""
    import subprocess
    subprocess.Popen(["sleep", "{marker}"], start_new_session=True)
    return a + b
    """
    result = check_humaneval(ADD, body(attack), timeout_s=5)
    assert result.passed, result
    time.sleep(0.2)
    assert _processes_with(f"sleep\0{marker}") == []


@needs_namespaces
def test_program_is_not_a_child_of_the_flow_and_has_own_namespaces():
    program = textwrap.dedent(
        """
        import os, sys
        ns = {k: os.readlink(f"/proc/self/ns/{k}") for k in ("pid", "net", "mnt")}
        print("INFO", os.getppid(), os.getuid(), ns["pid"], ns["net"], ns["mnt"], file=sys.stderr)
        """
    )
    result = run_program(program, timeout_s=5)
    assert result.passed, result
    ppid, uid, pid_ns, net_ns, mnt_ns = result.detail.split("INFO ")[1].split()[:5]
    assert int(ppid) != os.getpid()
    assert pid_ns != os.readlink("/proc/self/ns/pid")
    assert net_ns != os.readlink("/proc/self/ns/net")
    assert mnt_ns != os.readlink("/proc/self/ns/mnt")
    if sandbox.sandbox_mode() == "root":
        assert int(uid) == sandbox.NOBODY


# --------------------------------------------------------------------------- #
# fallback mode still isolates process, time and memory
# --------------------------------------------------------------------------- #


def test_plain_mode_fallback_scores_and_limits():
    run = lambda completion, **kw: sandbox._run(  # noqa: E731
        ADD["prompt"] + completion + "\n" + ADD["test"] + "\ncheck(add)\n", kw.get("t", 5.0), 512, "plain"
    )
    assert run(body("return a + b")).passed
    assert not run(body("return a - b")).passed
    start = time.monotonic()
    result = run(body("while True:\n    pass"), t=1.5)
    assert result.status == "timeout" and time.monotonic() - start < 1.5 + SLACK_S
    assert not run(body("x = bytearray(8 * 1024 ** 3)\nreturn a + b")).passed
    result = run(body("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nreturn a + b"))
    assert not result.passed


# --------------------------------------------------------------------------- #
# no namespaces: refused unless allowed, and said in the run log
# --------------------------------------------------------------------------- #

RIGHT = {**ADD, "task_id": "test/add-right"}


def _allowing():
    """Evaluation parameters with ``eval.allow_unisolated_code`` on (a stand-in with the same fields
    where ``EvalParams`` does not have it yet)."""
    if "allow_unisolated_code" in EvalParams.model_fields:
        return EvalParams(allow_unisolated_code=True)
    return SimpleNamespace(**dict(EvalParams()), allow_unisolated_code=True)


@pytest.fixture
def plain(monkeypatch):
    """The sandbox as it is where namespaces cannot be created; records every program run."""
    ran = []
    real = sandbox.check_humaneval
    monkeypatch.setattr(sandbox, "sandbox_mode", lambda: "plain")
    monkeypatch.setattr(sandbox, "check_humaneval", lambda p, c, **kw: ran.append(c) or real(p, c, **kw))
    return ran


def test_plain_mode_is_refused_before_any_code_runs(plain):
    with pytest.raises(EvalError) as err:
        check_code_isolation(EvalParams())
    message = str(err.value)
    assert "\n" not in message and "unshare" in message and "eval.allow_unisolated_code" in message
    with pytest.raises(EvalError, match="allow_unisolated_code"):
        score_humaneval([RIGHT], [body("return a + b")], EvalParams())
    assert plain == []


def test_plain_mode_with_the_flag_runs_and_warns(plain, caplog):
    caplog.set_level(logging.WARNING)
    score, details = score_humaneval([RIGHT], [body("return a + b")], _allowing())
    assert score == 1.0 and len(plain) == 1
    assert details[0]["sandbox_mode"] == "plain"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("plain" in w and "WITHOUT namespace isolation" in w for w in warnings), warnings


def test_namespaces_need_no_flag(caplog):
    caplog.set_level(logging.WARNING)
    mode = check_code_isolation(EvalParams())
    assert mode == sandbox.sandbox_mode()
    if mode != "plain":
        assert caplog.records == []


def test_sandbox_warnings_go_to_the_module_logger_outside_a_run(caplog):
    caplog.set_level(logging.WARNING)
    text = f"outside a run {uuid.uuid4()}"
    sandbox._log_warnings([text])
    assert [(r.name, r.getMessage()) for r in caplog.records] == [("tasks.evaluate.sandbox", f"sandbox: {text}")]


def test_fallback_warnings_reach_the_prefect_run_log(plain, monkeypatch, caplog):
    """Inside a flow run, the refusal override and the sandbox's own warnings (even those raised in
    ``pass_at_1``'s worker threads) land in the run's log, not only in a stdlib logger."""
    from prefect import flow

    text = f"from a worker thread {uuid.uuid4()}"
    run_one = sandbox.check_humaneval

    def warn_then_run(p, c, **kw):
        sandbox._log_warnings([text])
        return run_one(p, c, **kw)

    monkeypatch.setattr(sandbox, "check_humaneval", warn_then_run)

    @flow
    def evaluate_code():
        return score_humaneval([RIGHT], [body("return a + b")], _allowing())[0]

    caplog.set_level(logging.INFO)
    assert evaluate_code() == 1.0
    in_run = [r.getMessage() for r in caplog.records if r.name.startswith("prefect.flow_runs")]
    assert any("sandbox mode plain" in m for m in in_run), in_run
    assert f"sandbox: {text}" in in_run
