"""``tuneline serve``: a release behind vLLM's OpenAI-compatible server (flows/cli.py registers it).

    tuneline serve MODEL [RELEASE_ID|LATEST] --root ROOT [--host 127.0.0.1] [--port 8000]
    tuneline serve MODEL --root s3://bucket/prefix --block store --follow-latest

The release is downloaded into a cache (or an earlier copy reused) and every SHA-256 verified, then
its ``model/`` folder is served with its own chat template, streaming, under the model's name
(tasks/release/serving.py). ``--follow-latest`` puts a proxy in front that switches to each new
LATEST without failing a request (tasks/release/follow.py). Ctrl-C or SIGTERM stops every engine.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Any


def _log(message: str) -> None:
    print(f"[tuneline serve] {message}", flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.errors import one_line
    from flows.release_ops import open_store
    from tasks.artifacts.registry import RegistryError
    from tasks.artifacts.store import StoreError
    from tasks.release.ops import ReleaseError
    from tasks.release.serving import ServeError, default_cache, resolve, start_engine, vllm_python
    from tasks.runtime.vllm_cpu import Cancelled, raise_on_sigterm

    try:  # everything a user can get wrong, in one line, before a download or an engine start
        if args.follow_latest and args.release_id != "LATEST":
            raise ValueError(f"--follow-latest serves LATEST; drop the release id {args.release_id!r}")
        if args.poll_seconds <= 0 or args.drain_seconds < 0:
            raise ValueError("--poll-seconds must be > 0 and --drain-seconds ≥ 0")
        python = vllm_python(args.vllm_python)
        _check_port(args.host, args.port)
        store = open_store(args.root, args.block)
        rid = resolve(store, args.model, args.release_id)
    except (ServeError, ReleaseError, StoreError, RegistryError, OSError, ValueError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    cache = Path(args.cache_dir) if args.cache_dir else default_cache()
    log_dir = Path(args.log_dir) if args.log_dir else cache / "logs"
    engine_options: dict[str, Any] = {"max_model_len": args.max_model_len, "dtype": args.dtype}
    raise_on_sigterm()  # SIGTERM -> Cancelled: the finally blocks below stop every engine
    router = engine = None
    stop = threading.Event()
    poller: threading.Thread | None = None
    try:
        if args.follow_latest:
            engine_options["host"] = "127.0.0.1"  # private port; only the proxy listens on --host
        else:
            engine_options.update(host=args.host, port=args.port)
        engine, answer = start_engine(
            store, args.model, rid, cache=cache, python=python, log_dir=log_dir, log=_log, **engine_options
        )
        # follow-latest: the proxy's socket listens before the line below (connections queue until uvicorn runs)
        sock = _bind(args.host, args.port) if args.follow_latest else None
        where = f"http://{args.host}:{args.port}/v1"
        how = "following LATEST through a proxy" if args.follow_latest else "vLLM's OpenAI-compatible server"
        _log(
            f"serving {args.model}/{rid} at {where} as model {args.model!r} ({how}; vLLM {engine.version()}, "
            f"the release's chat template; {_asked(answer)}); Ctrl-C stops it"
        )
        if not args.follow_latest:
            while engine.proc.poll() is None:
                engine.proc.wait()
            code = engine.proc.returncode
            print(f"error: the vLLM engine exited with {code}; see {engine.log_path}", file=sys.stderr)
            return 1
        from tasks.release.follow import Router, Slot, app, poll

        router = Router(Slot(engine, answer), log=_log)
        poller = threading.Thread(
            target=poll,
            name="tuneline-follow-latest",
            args=(router, stop),
            kwargs=dict(
                store=store,
                model=args.model,
                cache=cache,
                python=python,
                log_dir=log_dir,
                every=args.poll_seconds,
                drain_timeout=args.drain_seconds,
                log=_log,
                **engine_options,
            ),
            daemon=True,
        )
        poller.start()
        _listen(app(router), sock)
        return 0
    except KeyboardInterrupt:
        _log("Ctrl-C: stopping")
        return 130
    except Cancelled:
        _log("SIGTERM: stopping")
        return 143
    except (ServeError, ReleaseError, StoreError, RegistryError, RuntimeError, TimeoutError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        stop.set()
        if router is not None:
            router.stop_all()
        elif engine is not None:
            engine.stop()
        if poller is not None:
            poller.join(timeout=60)


def _asked(answer: str) -> str:
    from tasks.release.serving import QUESTION

    short = " ".join(answer.split())
    return f"asked {QUESTION!r}: {short[:80]!r}"


def _bind(host: str, port: int):
    import socket

    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    s.listen(2048)
    return s


def _check_port(host: str, port: int) -> None:
    """One line now, not a bind error after a download and an engine start."""
    if not 0 < port < 65536:
        raise ValueError(f"--port {port}: not a port (1-65535)")
    _bind(host, port).close()


def _listen(asgi_app: Any, sock: Any) -> None:
    """uvicorn on ``sock`` in this thread until Ctrl-C/SIGTERM. uvicorn re-raises the signal it caught after
    its own shutdown; SIGTERM then reaches :func:`raise_on_sigterm`'s handler, so the engines are stopped."""
    import uvicorn

    # timeout_graceful_shutdown: on Ctrl-C an endless stream must not keep the engines up
    config = uvicorn.Config(asgi_app, log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])


def add_serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve a release through vLLM's OpenAI-compatible server (or follow LATEST)")
    p.add_argument("model", help="released model name (also the served model name)")
    p.add_argument("release_id", nargs="?", default="LATEST", help="a release id, or LATEST (default)")
    p.add_argument(
        "--root",
        default=os.environ.get("TUNELINE_ROOT"),
        help="artifact root: a folder or s3://bucket/prefix (default: TUNELINE_ROOT)",
    )
    p.add_argument("--block", default=None, help="a saved 'Tuneline Artifact Store' block: endpoint, credentials")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument(
        "--follow-latest",
        action="store_true",
        help="switch to each new LATEST (release, promote, rollback) without failing a request",
    )
    p.add_argument(
        "--vllm-python",
        default=None,
        help="python of a venv with vLLM (default: TUNELINE_VLLM_PYTHON, else .venv-vllm)",
    )
    p.add_argument(
        "--cache-dir",
        default=None,
        help="where verified release copies are kept (default: TUNELINE_SERVE_CACHE or ~/.cache/tuneline/releases)",
    )
    p.add_argument("--log-dir", default=None, help="engine logs (default: CACHE_DIR/logs)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--dtype", default="auto", help="weights dtype for vLLM (auto, bfloat16, float16, float32)")
    p.add_argument("--poll-seconds", type=float, default=30.0, help="--follow-latest: how often LATEST is read")
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=600.0,
        help="--follow-latest: how long requests on the old engine may take before it stops anyway",
    )
    p.set_defaults(func=cmd_serve)
