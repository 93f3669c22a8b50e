r"""Answer extraction and matching: what a model answered, what the dataset says, whether they agree.

Shared by the GRPO rewards (``tasks/grpo/rewards.py``) and the evaluation stage (GSM8K exact-answer
accuracy). Every function is pure and never raises on odd model output (``None`` content, empty or
huge strings, unbalanced braces, unicode)::

    pred = extract_answer(completion_text(completion))   # "72"
    gold = gold_answer(row["answer"])                      # "... #### 72" -> "72"
    answers_match(pred, gold)                              # True
    # or in one step: is_correct(completion, row["answer"])

A completion is a string or a list of chat messages ``[{"role": "assistant", "content": ...}]``.
Matching tries normalized text, then exact numbers, then math-verify (symbolic), guarded against
inputs that would make sympy run for minutes.
"""

from __future__ import annotations

import logging
import re
import threading
from fractions import Fraction
from typing import Any

__all__ = [
    "answers_match",
    "completion_text",
    "extract_answer",
    "gold_answer",
    "is_correct",
]

logger = logging.getLogger(__name__)

#: Answers longer than this skip math-verify (numeric/string comparison only): sympy on huge input
#: can take very long, and outside the main thread math-verify has no timeout.
MAX_VERIFY_CHARS = 1000
MATH_VERIFY_TIMEOUT_S = 5
_REL_TOL = Fraction(1, 10**6)

# --------------------------------------------------------------------------------------------
# Text helpers
# --------------------------------------------------------------------------------------------


def _content_to_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):  # multimodal parts: [{"type": "text", "text": ...}]
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
        return "".join(parts)
    return ""


def completion_text(completion: Any) -> str:
    """Text of one completion: a string, or the last assistant message of a conversational one.

    Never raises; anything unusable gives ``""``.

    >>> completion_text("The answer is 4.")
    'The answer is 4.'
    >>> completion_text([{"role": "assistant", "content": "<answer>4</answer>"}])
    '<answer>4</answer>'
    >>> completion_text([{"role": "assistant", "content": None}])
    ''
    """
    try:
        if completion is None:
            return ""
        if isinstance(completion, str):
            return completion
        if isinstance(completion, dict):
            return _content_to_text(completion.get("content"))
        if isinstance(completion, (list, tuple)):
            messages = [m for m in completion if isinstance(m, dict)]
            if not messages:
                return "".join(m for m in completion if isinstance(m, str))
            assistant = [m for m in messages if m.get("role", "assistant") == "assistant"]
            return _content_to_text((assistant or messages)[-1].get("content"))
    except Exception:  # noqa: BLE001 - a reward must never raise on model output
        logger.debug("unusable completion %r", type(completion), exc_info=True)
    return ""


_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+", re.ASCII)
# Candidates for "the last number in the text": simple fractions first, then numbers with
# thousands separators, then plain numbers; not glued to a preceding letter or digit ("x2", "CO2").
_LAST_NUMBER_RE = re.compile(
    r"(?<![\w.])[-\u2212]?(?:\d+/\d+(?![\d/])|(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)", re.ASCII
)
_FRACTION_RE = re.compile(r"([+-]?)\s*(\d+)\s*/\s*(\d+)", re.ASCII)
_LATEX_FRACTION_RE = re.compile(r"([+-]?)\s*\\[dt]?frac\s*\{\s*([+-]?\d+)\s*\}\s*\{\s*(\d+)\s*\}", re.ASCII)


def _strip_decorations(s: str) -> str:
    """Drop what surrounds a number or expression: spaces, ``$…$``, ``\\$``, trailing ``.``/``%``."""
    s = s.strip().replace("\u2212", "-")  # unicode minus
    for _ in range(3):
        before = s
        s = s.strip()
        if s.startswith("\\$"):
            s = s[2:]
        if s.startswith("$"):
            s = s[1:]
        if s.endswith("$"):
            s = s[:-1]
        s = s.rstrip(".").strip()
        if s.endswith("\\%"):
            s = s[:-2]
        elif s.endswith("%"):
            s = s[:-1]
        if s == before:
            break
    return s.strip()


def _canonical_number(s: str) -> str | None:
    """``"$1,234.50."`` -> ``"1234.5"``; ``None`` unless ``s`` is one plain number (no conversion to int,
    so arbitrarily long digit strings are fine)."""
    s = _strip_decorations(s)
    if not _NUMBER_RE.fullmatch(s):
        return None
    sign = ""
    if s[0] in "+-":
        sign, s = ("-" if s[0] == "-" else ""), s[1:]
    whole, _, frac = s.replace(",", "").partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    out = whole + ("." + frac if frac else "")
    return "0" if out == "0" else sign + out


def _to_fraction(s: str) -> Fraction | None:
    """Exact value of a plain number, ``a/b`` or ``\\frac{a}{b}``; ``None`` otherwise."""
    try:
        canon = _canonical_number(s)
        if canon is not None:
            return Fraction(canon)
        s = _strip_decorations(s)
        for regex in (_FRACTION_RE, _LATEX_FRACTION_RE):
            m = regex.fullmatch(s)
            if m:
                sign, num, den = m.groups()
                if int(den) == 0:
                    return None
                value = Fraction(int(num), int(den))
                return -value if sign == "-" else value
    except (ValueError, ZeroDivisionError, OverflowError):  # e.g. more digits than int() accepts
        pass
    return None


def _numbers_equal(a: Fraction, b: Fraction) -> bool:
    return a == b or abs(a - b) <= _REL_TOL * max(Fraction(1), abs(b))


_BOX_OPEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_RE = re.compile(r"(?<!\\)[{}]")


def _last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{…}`` / ``\\fbox{…}`` (nested braces; escaped ``\\{`` ignored).

    One linear pass, so unbalanced or repeated ``\\boxed{`` in huge strings stay cheap.
    """
    opens = {m.end() - 1 for m in _BOX_OPEN_RE.finditer(text)}
    if not opens:
        return None
    best: tuple[int, int] | None = None
    stack: list[int] = []
    for m in _BRACE_RE.finditer(text, min(opens)):
        i = m.start()
        if text[i] == "{":
            stack.append(i)
        elif stack:
            start = stack.pop()
            if start in opens and (best is None or i > best[1]):
                best = (start, i)
    if best is None:
        return None
    return text[best[0] + 1 : best[1]]


def _last_tag(text: str, tag: str) -> str | None:
    """Content of the last complete ``<tag>…</tag>`` (case-insensitive), found with ``rfind`` (linear)."""
    lower = text.lower()
    close = lower.rfind(f"</{tag}>")
    if close < 0:
        return None
    start = lower.rfind(f"<{tag}>", 0, close)
    if start < 0:
        return None
    return text[start + len(tag) + 2 : close]


def _after_hashes(text: str) -> str | None:
    """The rest of the line after the last ``####`` (GSM8K's answer marker)."""
    idx = text.rfind("####")
    if idx < 0:
        return None
    return text[idx + 4 :].lstrip().partition("\n")[0]


def _last_number(text: str) -> str | None:
    last = None
    for last in _LAST_NUMBER_RE.finditer(text):
        pass
    return last.group(0) if last else None


def _clean_answer(s: str | None) -> str | None:
    """Canonical number when ``s`` is one, else ``s`` without decorations; ``None`` when blank."""
    if s is None:
        return None
    canon = _canonical_number(s)
    if canon is not None:
        return canon
    s = _strip_decorations(s)
    return s or None


def extract_answer(text: Any) -> str | None:
    r"""The final answer of a model output, or ``None`` when there is none.

    Priority, first one found wins (within a kind, the last occurrence):

    1. ``<answer>…</answer>``: its content, itself reduced by 2–3 when it holds ``\boxed{}``/``####``;
    2. ``\boxed{…}`` (or ``\fbox{…}``), nested braces allowed; unbalanced ones are skipped;
    3. ``#### …`` (GSM8K): the rest of that line;
    4. the last number in the text (``1,234``, ``-3.5``, ``3/4``).

    Plain numbers come back canonical (``"$1,234.00."`` -> ``"1234"``); anything else (LaTeX, words)
    comes back stripped, for :func:`answers_match` to compare. Also accepts a conversational
    completion (a list of messages).

    >>> extract_answer(r"so the total is \boxed{\frac{1}{2}}.")
    '\\frac{1}{2}'
    >>> extract_answer("She pays 24 + 48 = 72.\n#### 72")
    '72'
    >>> extract_answer("<think>2+2</think><answer> 4 </answer>")
    '4'
    >>> extract_answer("It costs $1,234.")
    '1234'
    >>> extract_answer("no digits here") is None
    True
    """
    try:
        if not isinstance(text, str):
            text = completion_text(text)
        if not text:
            return None
        tagged = _last_tag(text, "answer")
        if tagged is not None and tagged.strip():
            inner = _last_boxed(tagged)
            if inner is None:
                inner = _after_hashes(tagged)
            found = _clean_answer(inner) or _clean_answer(tagged)
            if found:
                return found
        for finder in (_last_boxed, _after_hashes, _last_number):
            found = _clean_answer(finder(text))
            if found:
                return found
    except Exception:  # noqa: BLE001
        logger.debug("extract_answer failed", exc_info=True)
    return None


def gold_answer(row_answer: Any) -> str | None:
    r"""The reference answer from a dataset field.

    A GSM8K ``answer`` (``"… #### 72"``) gives the text after ``####``; a NuminaMath ``solution``
    gives its last ``\boxed{}``; ``<answer>`` tags are read too. A field that is already a short bare
    answer (``"72"``, ``"\frac{1}{3}"``, one line) is kept as it is; a longer text without markers
    falls back to its last number.

    >>> gold_answer("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72")
    '72'
    >>> gold_answer(r"Thus the probability is $\boxed{\dfrac{1}{3}}$.")
    '\\dfrac{1}{3}'
    >>> gold_answer(r"\frac{1}{3}")
    '\\frac{1}{3}'
    """
    try:
        if row_answer is None:
            return None
        text = row_answer if isinstance(row_answer, str) else str(row_answer)
        if not text.strip():
            return None
        for finder in (_after_hashes, _last_boxed, lambda t: _last_tag(t, "answer")):
            found = _clean_answer(finder(text))
            if found:
                return found
        found = _clean_answer(text)
        if found and "\n" not in found and len(found) <= 200:
            return found
        return _clean_answer(_last_number(text))
    except Exception:  # noqa: BLE001
        logger.debug("gold_answer failed", exc_info=True)
        return None


# --------------------------------------------------------------------------------------------
# Matching (math-verify with a numeric fallback)
# --------------------------------------------------------------------------------------------

_math_verify: Any = None  # module once imported, False when unavailable


def _get_math_verify() -> Any:
    global _math_verify
    if _math_verify is None:
        try:
            import math_verify

            _math_verify = math_verify
        except Exception:  # noqa: BLE001 - scoring still works without it (numbers, strings)
            logger.warning("math-verify is not importable; answers are compared as numbers/strings only")
            _math_verify = False
    return _math_verify


#: math-verify keeps ``9^{9^{9}}`` or ``(10^{100})!`` unevaluated when parsing, but ``verify`` then tries to
#: compute them; values beyond about 10**(this) are refused before verifying.
MAX_LOG10_MAGNITUDE = 10**5


class _TooBig(Exception):
    pass


def _log10_mag(node: Any, depth: int = 0) -> float:
    """Rough upper bound of log10|value| of a parsed sympy tree; raises ``_TooBig`` past the limit."""
    import math

    import sympy

    if depth > 200:
        raise _TooBig
    if isinstance(node, sympy.Integer):
        mag = abs(int(node)).bit_length() * 0.30103
    elif isinstance(node, sympy.Rational):
        mag = max(abs(node.p).bit_length(), abs(node.q).bit_length()) * 0.30103
    elif isinstance(node, sympy.Float):
        mag = abs(float(sympy.log(abs(node), 10))) if node != 0 else 0.0
    elif isinstance(node, sympy.Pow):
        base, exp = (_log10_mag(a, depth + 1) for a in node.args)
        mag = 10**exp * max(base, 1.0) if exp < 9 else math.inf
    elif isinstance(node, (sympy.factorial, sympy.factorial2, sympy.gamma, sympy.subfactorial)):
        arg = _log10_mag(node.args[0], depth + 1)
        mag = 10**arg * max(arg, 1.0) if arg < 9 else math.inf
    elif isinstance(node, sympy.binomial):
        n, k = (_log10_mag(a, depth + 1) for a in node.args)
        mag = 10 ** min(n, k) * max(n, 1.0) if min(n, k) < 9 else math.inf
    elif isinstance(node, sympy.MatrixBase):
        mag = max((_log10_mag(a, depth + 1) for a in node), default=0.0)
    elif isinstance(node, sympy.Basic) and node.args:
        mags = [_log10_mag(a, depth + 1) for a in node.args]
        mag = sum(mags) if isinstance(node, sympy.Mul) else max(mags) + 1.0
    else:  # symbols, constants, strings
        mag = 1.0
    if mag > MAX_LOG10_MAGNITUDE:
        raise _TooBig
    return mag


def _too_big(parsed: list) -> bool:
    try:
        for item in parsed:
            _log10_mag(item)
    except Exception:  # _TooBig, RecursionError, anything odd: don't hand it to sympy
        return True
    return False


def _math_verify_equal(predicted: str, gold: str) -> bool:
    """math-verify on both answers (wrapped as inline LaTeX); ``False`` on any failure or timeout.

    math-verify's timeouts use ``signal.alarm``, which only works in the main thread; elsewhere
    (Prefect task threads, async reward workers) timeouts are turned off, and :data:`MAX_VERIFY_CHARS`
    and :data:`MAX_LOG10_MAGNITUDE` bound the input instead.
    """
    mv = _get_math_verify()
    if not mv or len(predicted) > MAX_VERIFY_CHARS or len(gold) > MAX_VERIFY_CHARS:
        return False
    from math_verify.errors import TimeoutException  # BaseException subclass, caught explicitly

    in_main = threading.current_thread() is threading.main_thread()
    timeout = MATH_VERIFY_TIMEOUT_S if in_main else None
    if not in_main:  # silence the once-only "timeout is disabled" warning we chose deliberately
        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:

        def parse(s: str) -> list:
            return mv.parse(f"${s}$", parsing_timeout=timeout) or mv.parse(s, parsing_timeout=timeout)

        gold_parsed = parse(gold)
        pred_parsed = parse(predicted)
        if not gold_parsed or not pred_parsed:
            return False
        if _too_big(gold_parsed) or _too_big(pred_parsed):
            logger.debug("math-verify skipped: huge value in %.80r vs %.80r", predicted, gold)
            return False
        return bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # noqa: BLE001
        logger.debug("math-verify failed on %.80r vs %.80r", predicted, gold, exc_info=True)
        return False


def _normalize_text(s: str) -> str:
    return " ".join(_strip_decorations(s).split()).lower()


def answers_match(predicted: str | None, gold: str | None) -> bool:
    r"""Whether a predicted answer equals the gold one. Never raises.

    In order: same normalized text; both plain numbers or fractions (exact, relative tolerance 1e-6);
    math-verify (symbolic, LaTeX); a prediction holding exactly one number against a numeric gold
    (``"72 dollars"``).

    >>> answers_match("72", "72.00")
    True
    >>> answers_match("0.5", r"\frac{1}{2}")
    True
    >>> answers_match(r"\frac{\sqrt{3}}{2}", r"\sqrt{3}/2")
    True
    >>> answers_match("71", "72"), answers_match(None, "72")
    (False, False)
    """
    try:
        if predicted is None or gold is None:
            return False
        predicted, gold = str(predicted), str(gold)
        if not predicted.strip() or not gold.strip():
            return False
        p_norm, g_norm = _normalize_text(predicted), _normalize_text(gold)
        if p_norm and p_norm == g_norm:
            return True
        p_num, g_num = _to_fraction(predicted), _to_fraction(gold)
        if p_num is not None and g_num is not None:
            return _numbers_equal(p_num, g_num)
        if _math_verify_equal(predicted, gold):
            return True
        if (
            g_num is not None
            and p_num is None
            and len(predicted) <= MAX_VERIFY_CHARS
            and not any(c in predicted for c in "\\{}^_")  # plain words around a number, no LaTeX
        ):
            numbers = _LAST_NUMBER_RE.findall(predicted)
            if len(numbers) == 1:
                only = _to_fraction(numbers[0])
                return only is not None and _numbers_equal(only, g_num)
    except Exception:  # noqa: BLE001
        logger.debug("answers_match failed", exc_info=True)
    return False


def is_correct(completion: Any, reference: Any) -> bool:
    """Exact-answer check for evaluation: the completion's answer against a raw dataset answer field.

    >>> is_correct("... so she has 8 left.\\n#### 8", "4 + 4 = 8\\n#### 8")
    True
    """
    return answers_match(extract_answer(completion_text(completion)), gold_answer(reference))
