"""The one place where a user's mistake becomes one line: bounded reading of YAML (presets, ``--set``
values, typed options) and the conversion of YAML, pydantic, OS and our own errors into a single line
naming the parameter or file, with ``--debug`` for the traceback (docs/operating.md, "Limits").

Limits (a user's input never costs more than this before it is refused):

- a preset: a regular file of at most ``MAX_PRESET_BYTES``, UTF-8, lines of at most ``MAX_LINE_CHARS``;
- a ``--set`` value or a typed option: at most ``MAX_VALUE_CHARS`` characters;
- YAML: the safe loader (no ``!!python`` tags), no aliases (``*name``; an alias bomb expands
  exponentially), at most ``MAX_YAML_DEPTH`` levels of nesting;
- an error quotes at most ``EXCERPT_CHARS`` characters of what was typed, escaped, and never a file's content.
"""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import yaml

MAX_PRESET_BYTES = 4 << 20
MAX_VALUE_CHARS = 64 << 10
MAX_LINE_CHARS = 16 << 10
MAX_YAML_DEPTH = 64
EXCERPT_CHARS = 40
MAX_MESSAGE_CHARS = 400


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,63}|\d{1,9}")


class InputError(ValueError):
    """A user's input refused; the message is the one line to print."""


def excerpt(text: Any, limit: int = EXCERPT_CHARS) -> str:
    """A short, printable, quoted excerpt of what a user typed (never a file's content).

    >>> excerpt("a\\nb")
    "'a\\\\nb'"
    >>> excerpt("x" * 50, 4)
    "'xxxx'… (50 characters)"
    """
    text = str(text)
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}… ({len(text)} characters)"


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases and deep nesting (PyYAML has no such limits of its own)."""

    depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001 — PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise InputError(f"YAML aliases (*name) are not allowed (line {mark.line + 1}, column {mark.column + 1})")
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            raise InputError(f"YAML nested deeper than {MAX_YAML_DEPTH} levels")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def load_yaml(text: str, what: str) -> Any:
    """``text`` parsed as YAML with the bounded safe loader; any problem is an ``InputError`` naming
    ``what`` and the line, quoting nothing of the text."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    except InputError as e:
        raise InputError(f"{what}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = (e.problem or e.context or "syntax error").replace("\n", " ")
        raise InputError(f"{what}: invalid YAML{at}: {problem}") from None
    except yaml.YAMLError as e:
        raise InputError(f"{what}: invalid YAML: {type(e).__name__}") from None
    finally:
        loader.dispose()


def bounded_value(raw: str, what: str = "value") -> str:
    """A ``--set`` value or a typed option as typed, refused past ``MAX_VALUE_CHARS``."""
    if len(raw) > MAX_VALUE_CHARS:
        raise InputError(f"{what}: value of {len(raw)} characters, more than the limit of {MAX_VALUE_CHARS}")
    return raw


def yaml_value(raw: str, what: str = "value") -> Any:
    """A ``--set`` value or a typed option, bounded in size, parsed as YAML."""
    return load_yaml(bounded_value(raw, what), what)


def option_value(name: str) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses an option's value as bounded YAML, naming the option."""

    def parse(raw: str) -> Any:
        try:
            return yaml_value(raw, "value")
        except InputError as e:  # argparse prints an ArgumentTypeError's own message (others: the whole value)
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = name  # argparse names the type in its own messages
    return parse


def read_text(path: Path, what: str, limit: int = MAX_PRESET_BYTES) -> str:
    """A small text file (a preset): a regular file, at most ``limit`` bytes, UTF-8, lines bounded.
    Reads at most ``limit + 1`` bytes whatever the file is (``/dev/zero`` included)."""
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise InputError(f"{what} {path}: is a folder, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{what} {path}: not a regular file")
        if info.st_size > limit:
            raise InputError(f"{what} {path}: {info.st_size} bytes, more than the limit of {limit}")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InputError(f"{what} {path}: {e.strerror or type(e).__name__}") from None
    if len(data) > limit:
        raise InputError(f"{what} {path}: more than the limit of {limit} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path}: not UTF-8 text (byte {e.start})") from None
    for number, line in enumerate(text.splitlines(), 1):
        if len(line) > MAX_LINE_CHARS:
            raise InputError(f"{what} {path}: line {number} has {len(line)} characters, more than {MAX_LINE_CHARS}")
    return text


def validation_line(error: Any, prefix: str = "") -> str:
    """A pydantic ``ValidationError`` as one line: where and why of the first error (never the input
    value, which may be a whole file), and how many more."""
    errors = error.errors(include_url=False, include_input=False)
    first = errors[0]
    # A key of a preset is the file's own text (``--preset /etc/shadow``): only a name-like key is quoted.
    loc = ".".join(p if _NAME.fullmatch(p) else "<unknown key>" for p in (prefix, *map(str, first["loc"])) if p)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"bad parameter {loc or '(top level)'}: {first['msg']}{more}"


def one_line(exc: BaseException) -> str:
    """Any error as one line for a person."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        text = validation_line(exc)
    elif isinstance(exc, yaml.YAMLError):
        text = f"invalid YAML: {type(exc).__name__}"
    elif isinstance(exc, MemoryError):
        text = "out of memory while reading the input (is a value or a file far larger than expected?)"
    elif isinstance(exc, RecursionError):
        text = "input nested too deeply"
    elif isinstance(exc, OSError) and exc.strerror:
        name = exc.filename if exc.filename is not None else ""
        text = f"{name}: {exc.strerror}" if name else exc.strerror
    elif isinstance(exc, (InputError, ValueError, LookupError, RuntimeError, OSError)) and str(exc):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}".rstrip(": ") + " (rerun with --debug for the traceback)"
    text = " ".join(text.split())  # one line, whatever the message held
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 1] + "…"


def report(exc: BaseException, debug: bool) -> int:
    """Print ``exc`` as one line on stderr (and the traceback with ``--debug``); the exit code."""
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
    return 2 if isinstance(exc, (InputError, ValueError, OSError, MemoryError, RecursionError)) else 1


def guarded(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; whatever escapes it is one line (``--debug``: the traceback too)."""
    debug = bool(getattr(args, "debug", False)) or os.environ.get("TUNELINE_DEBUG") == "1"
    try:
        return func(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — the CLI's last line: one line, never a traceback
        return report(e, debug)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``tuneline run --help`` still prints the usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        message = " ".join(message.split())
        self.exit(2, f"error: {self.prog}: {message[:MAX_MESSAGE_CHARS]}\n")
