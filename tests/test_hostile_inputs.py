"""A battery of hostile inputs to ``tuneline`` as real processes (issue 28): for each, under a memory
limit and a timeout, the CLI exits non-zero with exactly one line on stderr, no traceback, no file's
content, nothing written (an empty working folder stays empty, no artifact root appears, an existing
root is unchanged), and bounded peak memory and time.

The cases come from what broke when the CLI was tried as an attacker would (YAML syntax errors, Python
tags, alias bombs, /dev/zero and huge presets, a secret file as preset, roots and destinations that are
files or cannot exist, huge ``#N``, ``--keep-last -1``) and from families of bad ``--set`` keys and values.
They run in a pool of three: each process costs about 1.5 s of CPU (imports), about 2 minutes for the
battery on 2 idle cores (256 s measured with the machine's load at 8).
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MEMORY_LIMIT = 3 << 29  # address space of each process (RLIMIT_AS); every case passes under 1 GiB too
PEAK_RSS_LIMIT = 400 << 20  # what a rejected input may cost, at most (100-200 MiB measured)
TIME_LIMIT_S = 90  # per process, on a loaded 2-core machine (1.5-2 s idle, 12 s the slowest under load)
SECRET_LINES = ["root:$6$Zq9secretsalt$hashedhashedhashed:19000:0:99999:7:::", "tuneline-secret-token-8f3a1c"]
# Runs the CLI in the same process after limiting its address space and entering the working folder
# (exec keeps the limit and the pid, so the parent's wait4 sees the CLI's own peak memory).
# The CLI runs as a child of this small launcher, which reports the child's own peak memory: a process
# started from pytest by posix_spawn (vfork) would inherit pytest's high-water mark through exec, so
# after the suite's training tests every case would "peak" at pytest's size.
LAUNCH = (
    "import os, resource, sys; "
    "resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]), int(sys.argv[1]))); os.chdir(sys.argv[2]); "
    "pid = os.fork()\n"
    "if pid == 0: os.execv(sys.executable, [sys.executable, '-m', 'flows.cli', *sys.argv[4:]])\n"
    "_, status, usage = os.wait4(pid, 0); open(sys.argv[3], 'w').write(str(usage.ru_maxrss)); "
    "code = os.waitstatus_to_exitcode(status); os._exit(code if code >= 0 else 128 - code)"
)


@dataclass
class Case:
    name: str
    argv: list[str]
    secrets: list[str] = field(default_factory=list)  # lines that must not appear in the output
    absent: list[Path] = field(default_factory=list)  # paths that must still not exist afterwards
    expect: str = ""  # a part of the one line, where what it must say matters


@dataclass
class Outcome:
    case: Case
    code: int
    stderr: str
    stdout: str
    seconds: float
    peak_rss: int
    problems: list[str]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            info = path.lstat()
            out[str(path.relative_to(root))] = (info.st_size, info.st_mtime_ns)
    return out


def _world(tmp: Path) -> dict[str, Path]:
    """The files the cases point at, and an artifact root holding two releases."""
    w = tmp / "inputs"
    w.mkdir()
    paths = {"dir": w / "a-folder", "file": w / "regular.txt", "fifo": w / "a-fifo"}
    paths["dir"].mkdir()
    paths["file"].write_text("just a file\n")
    os.mkfifo(paths["fifo"])

    def write(name: str, content: str | bytes) -> None:
        paths[name] = w / f"{name}.yaml"
        (paths[name].write_bytes if isinstance(content, bytes) else paths[name].write_text)(content)

    write("syntax", "sft:\n  max_steps: [1, 2\n")
    write("python_tag", "sft: !!python/object/apply:os.system ['touch pwned']\n")
    write("python_name", "sft: !!python/name:os.system\n")
    laughs = '&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
    bomb = (
        "a: "
        + laughs
        + "\n"
        + "".join(f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
    )
    write("alias_bomb", bomb)
    write("alias_small", "x: &a 1\ny: *a\n")
    write("deep", "a: " + "[" * 500 + "]" * 500 + "\n")
    write("long_line", "sft: {max_steps: " + "1" * 30_000 + "}\n")
    write("secret", "\n".join(SECRET_LINES) + "\n")
    write("secret_mapping", "".join(f"{line}: 1\n" for line in SECRET_LINES))
    write("list", "- 1\n- 2\n")
    write("unknown_key", "nope: 1\n")
    write("wrong_type", "sft:\n  max_steps: many\n")
    write("duplicate_bad", "sft:\n  max_steps: 1\nsft:\n  max_steps: -3\n")
    write("nul", b"sft:\n  max_steps: 1\x00\n")
    write("latin1", "model:\n  base: caf\xe9\n".encode("latin-1"))
    write("bom_garbage", b"\xef\xbb\xbf\xff\xfe: [\n")
    write("bad_budget", "data:\n  max_bad_rows: 2\n")
    huge = w / "huge.yaml"  # one line of 20 MB (the limit is 4 MiB; the was 1 GB)
    with open(huge, "w") as f:
        f.write("a: ")
        f.write("x" * (20 << 20))
    paths["huge"] = huge
    just_over = w / "just_over.yaml"
    just_over.write_text("# " + "y" * 100 + "\n" + ("a: 1\n" * ((4 << 20) // 5 + 10)))
    paths["just_over"] = just_over
    (w / "loop").symlink_to(w / "loop")
    paths["loop"] = w / "loop"
    (w / "to_zero.yaml").symlink_to("/dev/zero")
    paths["to_zero"] = w / "to_zero.yaml"
    bad_rows = w / "bad_rows.jsonl"
    bad_rows.write_text('{"query": "q", "response": ""}\n' * 3 + '{"query": "q2", "response": "fine"}\n')
    paths["bad_rows"] = bad_rows
    empty = w / "empty.jsonl"
    empty.write_text("")
    paths["empty_jsonl"] = empty

    root = tmp / "root"  # two releases, as nights leave them
    from tasks.artifacts.store import Store
    from tasks.release.stage import publish_release

    store = Store(str(root))
    for n in (1, 2):
        weights = tmp / "src" / f"r{n}" / "model.safetensors"
        weights.parent.mkdir(parents=True)
        weights.write_bytes(os.urandom(5000))
        publish_release(store, "m", f"2026010{n}T010000Z-0000000{n}", {"model/model.safetensors": weights}, {})
    shutil.rmtree(tmp / "src")
    paths["root"] = root
    paths["empty_root"] = tmp / "empty-root"
    paths["empty_root"].mkdir()
    return paths


def _cases(p: dict[str, Path], tmp: Path) -> list[Case]:
    root, empty = str(p["root"]), str(p["empty_root"])
    missing = tmp / "no-such-root" / "deeper"
    cases: list[Case] = []

    def add(name: str, *argv: str, secrets=None, absent=None, expect: str = "") -> None:
        cases.append(Case(name, list(argv), secrets or [], absent or [], expect))

    # --set: YAML that does not parse, Python tags, aliases, nesting, sizes.
    bad_yaml = {
        "open_list": "[1, 2",
        "open_map": "{a: 1",
        "quote": '"unterminated',
        "colon": "a: b: c",
        "tab_indent": "\t- x",
        "doc_marker": "--- [\n",
        "directive": "%YAML 9.9\n--- 1",
    }
    for name, value in bad_yaml.items():
        add(f"run-set-{name}", "run", "--set", f"sft.max_steps={value}")
    add(
        "run-set-python-object",
        "run",
        "--set",
        "sft=!!python/object/apply:os.system ['touch pwned']",
        expect="--set sft",
    )
    add("run-set-python-name", "run", "--set", "sft=!!python/name:os.system")
    add("run-set-python-module", "run", "--set", "data.columns=!!python/module:os")
    bomb = "[&a [x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]]"
    add("run-set-alias-bomb", "run", "--set", f"data.datasets={bomb}", expect="aliases (*name) are not allowed")
    add("run-set-deep", "run", "--set", "data.columns=" + "[" * 1000 + "]" * 1000)
    add("run-set-huge-value", "run", "--set", "data.system_prompt=" + "v" * 100_000, expect="more than the limit")
    add("run-set-huge-key", "run", "--set", "k" * 100_000 + "=1")
    add("run-set-many-dots", "run", "--set", "." * 150 + "=1")
    # --set: keys that are not parameters, or not KEY=VALUE.
    for name, item in {
        "unknown": "nope=1",
        "unknown-nested": "sft.nope=1",
        "below-leaf": "sft.max_steps.deeper=1",
        "empty-key": "=1",
        "no-equals": "sft.max_steps",
        "empty-part": "sft..max_steps=1",
        "unicode-key": "模型.名字=1",
        "rtl-key": "sft.max\u202esteps=1",
        "section-as-value": "sft=1",
    }.items():
        add(f"run-set-key-{name}", "run", "--set", item)
    # --set: values of the wrong type or out of bounds (each field's own validation).
    for name, item in {
        "steps-word": "sft.max_steps=abc",
        "steps-negative": "sft.max_steps=-5",
        "steps-huge": "sft.max_steps=99999999999999999999999",
        "steps-list": "sft.max_steps=[1, 2]",
        "steps-unicode": "sft.max_steps=五",
        "datasets-empty": "data.datasets=[]",
        "budget-over-one": "data.max_bad_rows=2",
        "budget-negative": "data.max_bad_rows=-0.1",
        "max-length-small": "data.max_length=1",
        "truncation": "data.truncation=sideways",
        "keep-last-zero": "release.keep_last=0",
        "keep-last-negative": "release.keep_last=-1",
        "name-too-long": "data.model_name=" + "n" * 500,
        "formats-unknown": "data.formats={'*': klingon}",
    }.items():
        add(f"run-set-value-{name}", "run", "--set", item)
    # Presets: files that are not presets.
    for name in ("syntax", "python_tag", "python_name", "alias_bomb", "alias_small", "deep", "long_line"):
        add(f"run-preset-{name}", "run", "--preset", str(p[name]))
    for name in ("list", "unknown_key", "wrong_type", "duplicate_bad", "nul", "latin1", "bom_garbage"):
        add(f"run-preset-{name}", "run", "--preset", str(p[name]))
    for name in ("bad_budget", "huge", "just_over", "loop", "to_zero", "dir", "fifo"):
        add(f"run-preset-{name}", "run", "--preset", str(p[name]))
    add("run-preset-secret", "run", "--preset", str(p["secret"]), secrets=SECRET_LINES)
    add("run-preset-secret-keys", "run", "--preset", str(p["secret_mapping"]), secrets=SECRET_LINES)
    shadow = Path("/etc/shadow")
    if os.access(shadow, os.R_OK):
        lines = [line for line in shadow.read_text(errors="replace").splitlines() if len(line) > 8]
        add("run-preset-etc-shadow", "run", "--preset", str(shadow), secrets=lines)
    for name, preset in {
        "dev-zero": "/dev/zero",
        "dev-null": "/dev/null",
        "dev-stdin": "/dev/stdin",
        "proc-mem": "/proc/self/mem",
        "missing": str(tmp / "missing.yaml"),
        "name-traversal": "../../../../etc/passwd",
        "unknown-name": "no-such-preset",
        "empty-name": " ",
        "binary": sys.executable,
    }.items():
        add(f"run-preset-{name}", "run", "--preset", preset)
    add("params-preset-syntax", "params", "--preset", str(p["syntax"]))
    add("params-preset-dev-zero", "params", "--preset", "/dev/zero")
    add("params-preset-secret", "params", "--preset", str(p["secret"]), secrets=SECRET_LINES)
    add("params-set-bomb", "params", "--set", f"data.datasets={bomb}")
    add("params-set-unknown", "params", "--set", "nope=1")
    # data check: typed options, specs, and the data section.
    for name, value in {
        "syntax": "[",
        "python": "!!python/object/apply:os.system ['touch pwned']",
        "negative": "-1",
        "huge": "99999999999999999999",
        "bomb": bomb,
    }.items():
        add(f"data-max-length-{name}", "data", "check", "swift/self-cognition#5", "--max-length", value)
    add("data-formats-syntax", "data", "check", "swift/self-cognition#5", "--formats", "{'*': [")
    add("data-seed-negative", "data", "check", "swift/self-cognition#5", "--seed", "-1")
    add("data-budget-over-one", "data", "check", "swift/self-cognition#5", "--max-bad-rows", "2")
    add("data-truncation", "data", "check", "swift/self-cognition#5", "--truncation", "sideways")
    for name, spec in {
        "n-20-digits": "swift/self-cognition#99999999999999999999",
        "n-300m": "swift/self-cognition#300000000",
        "n-arith-300m": "tuneline/arithmetic#300000000",
        "n-zero": "swift/self-cognition#0",
        "n-negative": "swift/self-cognition#-1",
        "n-word": "swift/self-cognition#abc",
        "subset-unknown": "swift/self-cognition:klingon#5",
        "missing-file": str(tmp / "missing.jsonl"),
        "folder-without-data": str(p["dir"]),
        "empty-file": str(p["empty_jsonl"]),
        "bad-rows-over-budget": str(p["bad_rows"]),
        "s3-no-bucket": "s3://",
        "fifo": str(p["fifo"]),
        "colon-only": ":",
    }.items():
        add(f"data-spec-{name}", "data", "check", spec)
    add("data-preset-dev-zero", "data", "check", "--preset", "/dev/zero")
    add("data-preset-bomb", "data", "check", "--preset", str(p["alias_bomb"]))
    add("data-set-syntax", "data", "check", "swift/self-cognition#5", "--set", "data.seed=[")
    # Release commands: roots that are not roots, must not be created, must not change.
    for name, where in {
        "missing": str(missing),
        "file": str(p["file"]),
        "proc-1-root": "/proc/1/root",
        "s3-no-bucket": "s3://",
        "s3-empty-bucket": "s3:///prefix",
        "fifo": str(p["fifo"]),
    }.items():
        add(f"release-list-root-{name}", "release", "list", "m", "--root", where, absent=[missing.parent])
    add("release-list-no-root", "release", "list", "m")
    add("release-log-missing-root", "release", "log", "m", "--root", str(missing), absent=[missing.parent])
    add("release-show-missing-root", "release", "show", "m", "x", "--root", str(missing), absent=[missing.parent])
    for value in ("-1", "0", "abc", "-99999999999999999999", "null", "[", "!!python/name:os.system"):
        argv = ("release", "prune", "m", "--keep-last", value, "--root", root)
        add(f"release-prune-keep-last-{value[:12]}", *argv, expect="--keep-last")
    add("release-show-unknown-id", "release", "show", "m", "20990101T000000Z-deadbeef", "--root", root)
    add("release-show-traversal", "release", "show", "m", "../../../etc", "--root", root)
    add("release-show-empty-root", "release", "show", "m", "LATEST", "--root", empty)
    add(
        "release-promote-unknown",
        "release",
        "promote",
        "m",
        "20990101T000000Z-deadbeef",
        "--reason",
        "x",
        "--root",
        root,
    )
    add("release-promote-traversal", "release", "promote", "m", "../m", "--reason", "x", "--root", root)
    add("release-pin-unknown", "release", "pin", "m", "nope", "--reason", "x", "--root", root)
    add("release-rollback-empty-root", "release", "rollback", "m", "--reason", "x", "--root", empty)
    add("release-list-model-traversal", "release", "list", "../..", "--root", root)
    add("release-list-model-newline", "release", "list", "m\nerror: forged", "--root", root)
    add("release-unknown-action", "release", "explode", "m", "--root", root)
    # fetch: destinations that are files or cannot be created; roots and releases that are not there.
    add("fetch-dest-file", "fetch", root, "m", "LATEST", str(p["file"]), expect="is not a folder")
    add("fetch-dest-under-file", "fetch", root, "m", "LATEST", str(p["file"] / "sub"), expect="is not a folder")
    add("fetch-dest-proc", "fetch", root, "m", "LATEST", "/proc/1/x", expect="cannot create the destination")
    add("fetch-dest-not-empty", "fetch", root, "m", "LATEST", str(p["dir"].parent))
    add("fetch-dest-fifo", "fetch", root, "m", "LATEST", str(p["fifo"]))
    add("fetch-root-missing", "fetch", str(missing), "m", "LATEST", str(tmp / "dest"), absent=[missing.parent])
    add("fetch-root-file", "fetch", str(p["file"]), "m", "LATEST", str(tmp / "dest"), absent=[tmp / "dest"])
    add("fetch-root-s3-no-bucket", "fetch", "s3://", "m", "LATEST", str(tmp / "dest"), absent=[tmp / "dest"])
    add(
        "fetch-unknown-release",
        "fetch",
        root,
        "m",
        "20990101T000000Z-deadbeef",
        str(tmp / "dest"),
        absent=[tmp / "dest"],
    )
    add("fetch-traversal-release", "fetch", root, "m", "../../x", str(tmp / "dest"), absent=[tmp / "dest"])
    add("fetch-unknown-model", "fetch", root, "nobody", "LATEST", str(tmp / "dest"), absent=[tmp / "dest"])
    # The command line itself.
    add("cli-no-command")
    add("cli-unknown-command", "explode")
    add("cli-unknown-option", "run", "--explode")
    add("cli-release-no-action", "release")
    add("cli-deploy-kind", "deploy", "--kind", "submarine")
    add("cli-serve-local-port", "serve-local", "--port", "abc")
    expectations = {  # what the issue found said wrong, or nothing
        "run-preset-dev-zero": "not a regular file",
        "run-preset-dir": "is a folder",
        "run-preset-huge": "more than the limit",
        "run-preset-alias_bomb": "aliases (*name) are not allowed",
        "run-preset-python_tag": "python/object",
        "data-spec-n-20-digits": "#N must be a positive integer",
        "data-spec-n-300m": "more than the limit of 10000000 rows",
        "data-max-length-syntax": "--max-length",
        "release-list-root-s3-no-bucket": "needs a bucket",
        "release-list-root-missing": "no such folder",
        "release-list-root-file": "not a folder",
    }
    for case in cases:
        case.expect = case.expect or expectations.get(case.name, "")
    assert all(any(c.name == name for c in cases) for name in expectations)
    return cases


def _run(case: Case, env: dict[str, str], cwd: Path) -> tuple[int, str, str, float, int]:
    """The case as a process: its exit code, stdout, stderr, seconds and peak resident memory (bytes)."""
    out, err = cwd.parent / "stdout", cwd.parent / "stderr"
    rss = cwd.parent / "peak-rss-kib"
    argv = [sys.executable, "-c", LAUNCH, str(MEMORY_LIMIT), str(cwd), str(rss), *case.argv]
    start = time.monotonic()
    with open(out, "wb") as o, open(err, "wb") as e, open(os.devnull, "rb") as i:
        pid = os.posix_spawn(sys.executable, argv, env, file_actions=_redirect(i, o, e), setsid=True)
    killer = threading.Timer(TIME_LIMIT_S, lambda: _kill_group(pid))
    killer.start()
    try:
        _, status, usage = os.wait4(pid, 0)
    finally:
        killer.cancel()
    _kill_group(pid)  # anything it left running (it should have left nothing)
    seconds = time.monotonic() - start
    code = os.waitstatus_to_exitcode(status)
    peak = int(rss.read_text()) * 1024 if rss.exists() else usage.ru_maxrss * 1024  # the CLI's, not the launcher's
    rss.unlink(missing_ok=True)
    return code, out.read_text(errors="replace"), err.read_text(errors="replace"), seconds, peak


def _redirect(stdin, stdout, stderr) -> list:
    return [
        (os.POSIX_SPAWN_DUP2, stdin.fileno(), 0),
        (os.POSIX_SPAWN_DUP2, stdout.fileno(), 1),
        (os.POSIX_SPAWN_DUP2, stderr.fileno(), 2),
    ]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, 9)
    except ProcessLookupError:
        pass


def _check(case: Case, base: Path, watched: dict[Path, dict]) -> Outcome:
    """Run one case in its own empty working folder and home; what went wrong, if anything."""
    home = base / "home"
    cwd = base / "cwd"
    tmpdir = base / "tmp"
    for d in (home, cwd, tmpdir):
        d.mkdir(parents=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "HOME": str(home),
        "PREFECT_HOME": str(home / ".prefect"),
        "TMPDIR": str(tmpdir),
        "HF_HUB_OFFLINE": "1",
        "LANG": "C.UTF-8",
    }
    code, stdout, stderr, seconds, rss = _run(case, env, cwd)
    problems = []
    lines = stderr.splitlines()
    if code == 0:
        problems.append("exit 0")
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr")
    elif not lines[0].startswith("error: "):
        problems.append("stderr does not start with 'error: '")
    if "Traceback" in stderr or "Traceback" in stdout:
        problems.append("a traceback")
    if case.expect and case.expect not in stderr:
        problems.append(f"stderr does not say {case.expect!r}")
    for secret in case.secrets:
        if secret in stderr or secret in stdout:
            problems.append(f"printed a line of the file ({secret[:12]}…)")
    if created := sorted(os.listdir(cwd)):
        problems.append(f"created in the working folder: {created[:5]}")
    if leftovers := sorted(os.listdir(tmpdir)):
        problems.append(f"left in TMPDIR: {leftovers[:5]}")
    for path, before in watched.items():  # the artifact roots (one with two releases, one empty), the inputs
        if _tree(path) != before:
            problems.append(f"{path.name} changed")
    for path in case.absent:
        if path.exists():
            problems.append(f"created {path}")
    if rss > PEAK_RSS_LIMIT:
        problems.append(f"peak memory {rss >> 20} MiB")
    if seconds > TIME_LIMIT_S:
        problems.append(f"took {seconds:.0f} s")
    shutil.rmtree(base)
    return Outcome(case, code, stderr, stdout, seconds, rss, problems)


def test_hostile_inputs_fail_in_one_line_and_write_nothing(tmp_path):
    paths = _world(tmp_path)
    cases = _cases(paths, tmp_path)
    assert len(cases) >= 100 and len({c.name for c in cases}) == len(cases)
    watched = {path: _tree(path) for path in (paths["root"], paths["empty_root"], tmp_path / "inputs")}
    before_top = set(os.listdir(tmp_path))
    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = list(pool.map(lambda ic: _check(ic[1], tmp_path / "runs" / str(ic[0]), watched), enumerate(cases)))
    shutil.rmtree(tmp_path / "runs")
    assert set(os.listdir(tmp_path)) == before_top, "a case created something next to the inputs"
    assert not Path(REPO, "pwned").exists()
    failures = [
        f"{o.case.name}: {'; '.join(o.problems)} (exit {o.code}, {o.seconds:.1f} s, {o.peak_rss >> 20} MiB)\n"
        f"    stderr: {o.stderr[-600:]!r}"
        for o in outcomes
        if o.problems
    ]
    slowest = max(outcomes, key=lambda o: o.seconds)
    largest = max(outcomes, key=lambda o: o.peak_rss)
    print(
        f"{len(outcomes)} hostile inputs; slowest {slowest.case.name} {slowest.seconds:.1f} s; "
        f"largest {largest.case.name} {largest.peak_rss >> 20} MiB"
    )
    assert not failures, f"{len(failures)} of {len(outcomes)} inputs mishandled:\n" + "\n".join(failures)
