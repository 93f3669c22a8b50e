"""Rule-based rewards for GRPO, as TRL's ``GRPOTrainer`` calls them; answer reading is ``tasks/core/scoring.py``.

TRL calls ``reward_func(prompts=..., completions=..., completion_ids=..., **dataset_columns)`` (plus
``trainer_state``, ``log_extra``, ``log_metric``) and expects one float per completion, ``None`` to
skip one. A completion is a string (standard datasets) or a list of messages
``[{"role": "assistant", "content": ...}]`` (conversational datasets); both are accepted.

Each reward is a small pure function with a doctest and never raises on odd model output; only
configuration mistakes raise (a bad regex, bad lengths, an unknown reward name or import path, a
missing gold column). Factories return callable-class instances (not closures) so rewards stay
picklable, as TRL's own do. Pick them by name with :func:`resolve_reward` (built-ins in
:data:`REWARDS`) or by ``module:function`` path.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from tasks.core.scoring import answers_match, completion_text, extract_answer, gold_answer

__all__ = [
    "DEFAULT_FORMAT_PATTERN",
    "REWARDS",
    "REWARD_FACTORIES",
    "accuracy_reward",
    "format_reward",
    "make_format_reward",
    "make_overlong_reward",
    "make_repetition_penalty_reward",
    "repetition_penalty_reward",
    "resolve_reward",
    "soft_overlong_reward",
]

logger = logging.getLogger(__name__)

#: ``<think>…</think><answer>…</answer>``, nothing else around it; no nested tags, non-blank answer.
DEFAULT_FORMAT_PATTERN = (
    r"^\s*<think>(?:(?!</?think>).)*</think>\s*"
    r"<answer>\s*(?!</?answer>)\S(?:(?!</?answer>).)*</answer>\s*$"
)
DEFAULT_OVERLONG_MAX_LENGTH = 1024
DEFAULT_OVERLONG_CACHE_LENGTH = 256


def _texts(completions: Sequence[Any] | None) -> list[str]:
    return [completion_text(c) for c in (completions or [])]


def accuracy_reward(
    completions: Sequence[Any],
    answer: Sequence[Any] | None = None,
    solution: Sequence[Any] | None = None,
    log_extra: Callable[[str, list], None] | None = None,
    **kwargs: Any,
) -> list[float | None]:
    r"""1.0 when the completion's answer matches the gold one, else 0.0; ``None`` (skip) when the gold
    answer can't be read. Gold comes from the ``answer`` column (GSM8K), else ``solution`` (NuminaMath).

    >>> accuracy_reward(
    ...     completions=[[{"role": "assistant", "content": r"... \boxed{72}"}],
    ...                  [{"role": "assistant", "content": "<answer>71</answer>"}]],
    ...     answer=["... #### 72", "... #### 72"])
    [1.0, 0.0]
    """
    golds_raw = answer if answer is not None else solution
    if golds_raw is None:
        raise ValueError(
            "accuracy_reward needs an 'answer' or 'solution' dataset column; got columns "
            f"{sorted(k for k in kwargs if k not in ('trainer_state', 'log_extra', 'log_metric'))}"
        )
    texts = _texts(completions)
    golds_raw = list(golds_raw)
    if len(golds_raw) != len(texts):
        raise ValueError(f"accuracy_reward got {len(texts)} completions but {len(golds_raw)} gold answers")
    rewards: list[float | None] = []
    preds, golds = [], []
    for text, raw in zip(texts, golds_raw):
        gold = gold_answer(raw)
        pred = extract_answer(text)
        preds.append(pred)
        golds.append(gold)
        rewards.append(None if gold is None else float(answers_match(pred, gold)))
    if log_extra is not None:
        try:
            log_extra("pred_answer", [p if p is not None else "[none]" for p in preds])
            log_extra("gold_answer", [g if g is not None else "[unreadable]" for g in golds])
        except Exception:  # noqa: BLE001 - logging must not break training
            logger.debug("log_extra failed", exc_info=True)
    return rewards


class _FormatReward:
    """1.0 when ``pattern`` is found (``re.search``) in the completion text, else 0.0."""

    __name__ = "format_reward"

    def __init__(self, pattern: str | re.Pattern, flags: int = re.DOTALL, name: str | None = None):
        try:
            self.regex = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern, flags)
        except (re.error, TypeError) as e:
            raise ValueError(f"invalid format reward pattern {pattern!r}: {e}") from e
        if name:
            self.__name__ = name

    def __call__(self, completions: Sequence[Any], **kwargs: Any) -> list[float]:
        out = []
        for text in _texts(completions):
            try:
                out.append(1.0 if self.regex.search(text) else 0.0)
            except Exception:  # noqa: BLE001
                out.append(0.0)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.regex.pattern!r})"


def make_format_reward(
    pattern: str | re.Pattern = DEFAULT_FORMAT_PATTERN, flags: int = re.DOTALL, name: str | None = None
) -> Callable[..., list[float]]:
    r"""A format reward for a configured regex (``re.search``; anchor with ``^…$`` to match the whole
    completion). ``flags`` default to ``re.DOTALL``. An invalid regex raises ``ValueError`` here,
    not during training.

    >>> boxed_only = make_format_reward(r"\\boxed\{.+\}\s*$")
    >>> boxed_only(completions=["so \\boxed{3}", "so 3"])
    [1.0, 0.0]
    """
    return _FormatReward(pattern, flags, name)


_DEFAULT_FORMAT = _FormatReward(DEFAULT_FORMAT_PATTERN)


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 for ``<think>…</think><answer>…</answer>`` (whitespace around allowed, nothing else, answer
    not blank), else 0.0. For chat templates that open ``<think>`` in the prompt, configure
    :func:`make_format_reward` instead.

    >>> format_reward(["<think>2+2=4</think>\\n<answer>4</answer>", "<answer>4</answer>",
    ...                [{"role": "assistant", "content": None}]])
    [1.0, 0.0, 0.0]
    """
    return _DEFAULT_FORMAT(completions)


def _lengths(completions: Sequence[Any] | None, completion_ids: Sequence[Any] | None) -> list[int]:
    """Token counts: from ``completion_ids`` when given (one sequence per completion), else whitespace words."""
    texts = _texts(completions)
    if completion_ids is not None:
        ids = list(completion_ids)
        if not texts or len(ids) == len(texts):
            out = []
            for i, seq in enumerate(ids):
                try:
                    out.append(len(seq))
                except TypeError:
                    out.append(len(texts[i].split()) if i < len(texts) else 0)
            return out
    return [len(t.split()) for t in texts]


class _SoftOverlong:
    """DAPO soft over-length penalty (Eq. 13): 0 up to ``max_length - cache_length`` tokens, then
    linear down to -1 at ``max_length``, -1 beyond."""

    __name__ = "soft_overlong_reward"

    def __init__(self, max_length: int, cache_length: int, name: str | None = None):
        if not isinstance(max_length, int) or max_length <= 0:
            raise ValueError(f"overlong reward: max_length must be a positive int, got {max_length!r}")
        if not isinstance(cache_length, int) or not 0 <= cache_length <= max_length:
            raise ValueError(
                f"overlong reward: cache_length must be an int in [0, max_length={max_length}], got {cache_length!r}"
            )
        self.max_length = max_length
        self.cache_length = cache_length
        if name:
            self.__name__ = name

    def penalty(self, length: int) -> float:
        safe = self.max_length - self.cache_length
        if length <= safe:
            return 0.0
        if length > self.max_length:
            return -1.0
        return (safe - length) / self.cache_length  # cache_length > 0 here

    def __call__(
        self, completions: Sequence[Any] | None = None, completion_ids: Sequence[Any] | None = None, **kwargs: Any
    ) -> list[float]:
        try:
            return [self.penalty(n) for n in _lengths(completions, completion_ids)]
        except Exception:  # noqa: BLE001
            logger.debug("overlong reward failed", exc_info=True)
            return [0.0] * len(completions if completions is not None else completion_ids or [])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_length={self.max_length}, cache_length={self.cache_length})"


def make_overlong_reward(
    max_length: int = DEFAULT_OVERLONG_MAX_LENGTH,
    cache_length: int = DEFAULT_OVERLONG_CACHE_LENGTH,
    name: str | None = None,
) -> Callable[..., list[float]]:
    """DAPO-style soft over-length penalty, in ``[-1, 0]``. Length is ``len(completion_ids[i])`` when the
    trainer passes token ids, else the number of whitespace-separated words. Usually ``max_length`` is
    the GRPO ``max_completion_length`` and ``cache_length`` a quarter of it.

    >>> overlong = make_overlong_reward(max_length=100, cache_length=20)
    >>> overlong(completions=["a", "b", "c"], completion_ids=[[0] * 80, [0] * 90, [0] * 101])
    [0.0, -0.5, -1.0]
    """
    return _SoftOverlong(max_length, cache_length, name)


_DEFAULT_OVERLONG = _SoftOverlong(DEFAULT_OVERLONG_MAX_LENGTH, DEFAULT_OVERLONG_CACHE_LENGTH)


def soft_overlong_reward(
    completions: Sequence[Any] | None = None, completion_ids: Sequence[Any] | None = None, **kwargs: Any
) -> list[float]:
    """:func:`make_overlong_reward` with the defaults (``max_length=1024``, ``cache_length=256``).

    >>> soft_overlong_reward(completions=["short answer"])
    [0.0]
    """
    return _DEFAULT_OVERLONG(completions=completions, completion_ids=completion_ids)


class _RepetitionPenalty:
    """``max_penalty * (1 - unique n-grams / all n-grams)``, 0.0 when fewer than ``ngram_size`` tokens."""

    __name__ = "repetition_penalty_reward"

    def __init__(self, ngram_size: int, max_penalty: float, use_completion_ids: bool = False, name: str | None = None):
        if not isinstance(ngram_size, int) or ngram_size < 1:
            raise ValueError(f"repetition reward: ngram_size must be an int >= 1, got {ngram_size!r}")
        if not -1.0 <= float(max_penalty) <= 0.0:
            raise ValueError(f"repetition reward: max_penalty must be in [-1, 0], got {max_penalty!r}")
        self.ngram_size = ngram_size
        self.max_penalty = float(max_penalty)
        self.use_completion_ids = use_completion_ids
        if name:
            self.__name__ = name

    def penalty(self, tokens: Sequence[Any]) -> float:
        n = self.ngram_size
        if len(tokens) < n:
            return 0.0
        ngrams = list(zip(*(tokens[i:] for i in range(n))))
        scaling = 1.0 - len(set(ngrams)) / len(ngrams)
        return scaling * self.max_penalty if scaling else 0.0

    def __call__(
        self, completions: Sequence[Any] | None = None, completion_ids: Sequence[Any] | None = None, **kwargs: Any
    ) -> list[float]:
        texts = _texts(completions)
        if self.use_completion_ids and completion_ids is not None and (not texts or len(completion_ids) == len(texts)):
            seqs = [list(ids) if ids is not None else [] for ids in completion_ids]
        else:
            seqs = [t.lower().split() for t in texts]
        out = []
        for tokens in seqs:
            try:
                out.append(self.penalty(tokens))
            except Exception:  # noqa: BLE001 - e.g. unhashable ids
                out.append(0.0)
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ngram_size={self.ngram_size}, max_penalty={self.max_penalty}, "
            f"use_completion_ids={self.use_completion_ids})"
        )


def make_repetition_penalty_reward(
    ngram_size: int = 3, max_penalty: float = -1.0, use_completion_ids: bool = False, name: str | None = None
) -> Callable[..., list[float]]:
    """N-gram repetition penalty in ``[max_penalty, 0]`` (``max_penalty`` in ``[-1, 0]``). N-grams are over
    lowercased whitespace words, or over ``completion_ids`` with ``use_completion_ids=True``.

    >>> rep = make_repetition_penalty_reward(ngram_size=2)
    >>> rep(completions=["a b c d", "a a a a a"])
    [0.0, -0.75]
    """
    return _RepetitionPenalty(ngram_size, max_penalty, use_completion_ids, name)


_DEFAULT_REPETITION = _RepetitionPenalty(3, -1.0)


def repetition_penalty_reward(completions: Sequence[Any] | None = None, **kwargs: Any) -> list[float]:
    """Word 3-gram repetition penalty in ``[-1, 0]`` (see :func:`make_repetition_penalty_reward`).

    >>> repetition_penalty_reward(["the cat sat on the mat", "go go go go go go"])
    [0.0, -0.75]
    """
    return _DEFAULT_REPETITION(completions=completions)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

#: Built-in rewards by name, ready to hand to ``GRPOTrainer(reward_funcs=[...])``.
REWARDS: dict[str, Callable[..., list]] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
    "overlong": soft_overlong_reward,
    "repetition": repetition_penalty_reward,
}

#: Factories for the built-ins that take settings (``resolve_reward(name, **settings)``).
REWARD_FACTORIES: dict[str, Callable[..., Callable[..., list]]] = {
    "format": make_format_reward,
    "overlong": make_overlong_reward,
    "repetition": make_repetition_penalty_reward,
}


def resolve_reward(name_or_path: Any, **settings: Any) -> Callable[..., list]:
    """A reward callable from a built-in name (see :data:`REWARDS`) or a ``module:function`` path.

    With ``settings``, a built-in is built by its factory (:data:`REWARD_FACTORIES`) and an imported
    target is called with them (it must be a factory). A callable is returned as it is. Errors are
    ``ValueError`` naming what is wrong.

    >>> resolve_reward("accuracy") is accuracy_reward
    True
    >>> resolve_reward("overlong", max_length=512, cache_length=128)
    _SoftOverlong(max_length=512, cache_length=128)
    >>> resolve_reward("tasks.grpo.rewards:format_reward") is format_reward
    True
    >>> resolve_reward("speed")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown reward 'speed'; built-in rewards: accuracy, format, overlong, repetition (or give ...)
    """
    if callable(name_or_path) and not isinstance(name_or_path, str):
        if settings:
            raise ValueError(f"settings {sorted(settings)} given with an already-built reward {name_or_path!r}")
        return name_or_path
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(f"reward must be a built-in name or 'module:function' path, got {name_or_path!r}")
    spec = name_or_path.strip()
    if spec in REWARDS:
        if not settings:
            return REWARDS[spec]
        if spec not in REWARD_FACTORIES:
            raise ValueError(f"reward {spec!r} takes no settings, got {sorted(settings)}")
        try:
            return REWARD_FACTORIES[spec](**settings)
        except TypeError as e:
            raise ValueError(f"bad settings for reward {spec!r}: {e}") from e
    if ":" not in spec:
        hint = f" (did you mean '{spec.rpartition('.')[0]}:{spec.rpartition('.')[2]}'?)" if "." in spec else ""
        raise ValueError(
            f"unknown reward {spec!r}; built-in rewards: {', '.join(REWARDS)} "
            f"(or give a 'module:function' import path){hint}"
        )
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"bad reward import path {spec!r}: expected 'module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or an error raised while importing it
        raise ValueError(f"reward {spec!r}: cannot import module {module_name!r}: {e}") from e
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(f"reward {spec!r}: module {module_name!r} has no attribute {attr_path!r}") from None
    if settings:
        try:
            target = target(**settings)
        except Exception as e:
            raise ValueError(f"reward {spec!r}: calling it with settings {sorted(settings)} failed: {e}") from e
    if not callable(target):
        raise ValueError(f"reward {spec!r}: {attr_path!r} in module {module_name!r} is not callable")
    return target
