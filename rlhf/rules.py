"""Rules: a known taste written as code, text in, number out (higher = preferred).

A rule serves two ends:

- a **scripted labeler** (``rlhf label --rule NAME``, the app's command palette):
  it labels pending comparisons as a researcher with exactly that taste would, and
  the labels go in as ordinary comparisons with the labeler ``rule:NAME``. This is
  how the whole loop is checked against a known preference before hours of labeling
  by hand: the "gold reward" set-up of Gao et al. 2022 (arXiv 2210.10760), with the
  rule as the gold model;
- a **gold judge**: ``rlhf eval-policy --rule NAME`` compares a policy with its
  reference by the rule on prompts it never trained on (rlhf.evaluation), and PPO
  can optimize a rule directly (``rlhf ppo --reward rule:NAME``) for tests and demos.

Built-in rules (``NAME`` or ``NAME=ARG``):

- ``shorter`` / ``longer``: fewer / more words;
- ``shorter-words``: fewer letters per word on average, plain language (a
  taste that is not about length: it almost never ties, and its picks are the
  longer completion as often as the shorter);
- ``contains=WORD``: 1 when the text holds WORD (whole word, any case), else 0;
- ``more=REGEX`` / ``fewer=REGEX``: more / fewer matches of a regular expression;
- ``distinct``: the fraction of distinct tokens (against repetition);
- ``token=ID``: occurrences of one token id; ``ids-below=N``: the fraction of
  tokens with id < N (dense signals for a random test model);
- ``short``: 1 - tokens/budget for a completion that ended with EOS, -1 for one
  that did not (OpenAI's penalty), for PPO demos.

A user's own rule is ``module:function`` or ``path/to/file.py:function``: a
function that takes the completion text and returns a number.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlhf.errors import UserError

PREFIX = "rule:"
# What a rule sees: the completion text, its token ids (empty when unknown) and
# whether it ended with EOS.
RuleFn = Callable[[str, Sequence[int], bool], float]
BUILT_IN = ("shorter", "longer", "shorter-words", "contains=WORD", "more=REGEX", "fewer=REGEX", "distinct",
            "token=ID", "ids-below=N", "short")


@dataclass(frozen=True)
class Rule:
    """A named preference: ``rule(text, ids, finished)`` is its score."""

    name: str
    fn: RuleFn

    @property
    def labeler(self) -> str:
        """The labeler name its labels are recorded under."""
        return PREFIX + self.name

    def __call__(self, text: str, ids: Sequence[int] = (), finished: bool = True) -> float:
        return float(self.fn(text, ids, finished))


def _words(text: str) -> int:
    return len(text.split())


# Letters per word of a text with no words: an empty answer is no plain answer.
NO_WORDS = 100.0


def _letters_per_word(text: str) -> float:
    words = re.findall(r"[^\W\d_]+", text)
    return sum(map(len, words)) / len(words) if words else NO_WORDS


def _regex(pattern: str, spec: str) -> re.Pattern[str]:
    if not pattern:
        raise UserError(f"rule {spec!r} needs a pattern: e.g. more=!  or  fewer=\\bI\\b")
    try:
        return re.compile(pattern, re.MULTILINE)
    except re.error as e:
        raise UserError(f"rule {spec!r}: {pattern!r} is not a regular expression ({e})") from e


def parse_rule(spec: str, *, eos_id: int | None = None, budget: int = 64, what: str = "rule") -> Rule:
    """The rule a spec names (``rule:`` prefix optional). ``eos_id`` and ``budget``
    serve the token-level rules. A bad spec is a one-line UserError naming it as ``what``."""
    name = spec.removeprefix(PREFIX).strip()
    key, sep, arg = name.partition("=")
    if ":" in name and not sep:
        return Rule(name, _user_function(name))
    try:
        if key == "shorter" and not sep:
            return Rule(name, lambda text, ids, done: -_words(text))
        if key == "longer" and not sep:
            return Rule(name, lambda text, ids, done: _words(text))
        if key == "shorter-words" and not sep:
            return Rule(name, lambda text, ids, done: -_letters_per_word(text))
        if key == "contains" and arg.strip():
            word = re.compile(rf"(?<!\w){re.escape(arg.strip())}(?!\w)", re.IGNORECASE)
            return Rule(name, lambda text, ids, done: 1.0 if word.search(text) else 0.0)
        if key in ("more", "fewer") and sep:
            pattern = _regex(arg, spec)
            sign = 1.0 if key == "more" else -1.0
            return Rule(name, lambda text, ids, done: sign * len(pattern.findall(text)))
        if key == "distinct" and not sep:
            return Rule(name, lambda text, ids, done: (len(set(ids)) / len(ids)) if ids
                        else len(set(text.split())) / max(_words(text), 1))
        if key == "token":
            token = int(arg)
            return Rule(name, lambda text, ids, done: float(sum(1 for t in ids if t == token)))
        if key == "ids-below":
            limit = int(arg)
            return Rule(name, lambda text, ids, done: sum(1 for t in ids if t < limit and t != eos_id)
                        / max(len(ids), 1))
        if key == "short" and not sep:
            return Rule(name, lambda text, ids, done: 1.0 - len(ids) / budget if done else -1.0)
    except ValueError:
        pass
    raise UserError(f"unknown {what} {spec!r}: use one of {', '.join(BUILT_IN)}, "
                    "or module:function (your own: text in, number out)")


def _user_function(target: str) -> RuleFn:
    """``module:function`` or ``file.py:function`` -> a rule. The current directory
    is searched first, as ``python -m`` would."""
    where, _, func = target.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise UserError(f"rule {target!r}: {path} does not exist")
            spec = importlib.util.spec_from_file_location(path.stem, path)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(where)
    except UserError:
        raise
    except Exception as e:  # the user's module failed to import: say which and why, in one line
        raise UserError(f"rule {target!r}: could not import {where} ({type(e).__name__}: {e})") from e
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UserError(f"rule {target!r}: {where} has no function {func!r}")

    def call(text: str, ids: Sequence[int], done: bool) -> float:
        try:
            value = fn(text)
        except Exception as e:  # the user's code failed on a completion: one line, and nothing recorded
            raise UserError(f"rule {target!r} failed on a completion ({type(e).__name__}: {e}): "
                            f"fix {func} in {where} and run again") from e
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"rule {target!r} returned {value!r} for a completion: it must return a number") \
                from None

    return call


# --- judging K completions -------------------------------------------------------------


@dataclass(frozen=True)
class Judgement:
    """What a labeler with this taste answers for K completions shown in an order:
    a label kind and its choice (positions, best first), as rlhf.preferences takes them."""

    kind: str                 # 'best' | 'ranking' | 'tie'
    choice: list[int] | None


def judge(scores: Sequence[float], *, rank: bool = False) -> Judgement:
    """Best of K by score: the top is picked, every completion that shares it where
    several do ("these two beat the rest"); all K equal is a tie. With ``rank``, K
    distinct scores give a full ranking (all C(K,2) pairs) instead.

    On the loop benchmark's labels (60 prompts, K = 4) a shared top over the rest
    was 5 of 34 ties for ``more=\\d`` and 6 of 39 for ``more=\\b(you|your)\\b``:
    as ties they gave no pairs; now they give the pairs they imply."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    distinct = len(set(scores)) == len(scores)
    if rank and distinct:
        return Judgement("ranking", order)
    top = [i for i in order if scores[i] == scores[order[0]]]
    if len(scores) >= 2 and len(top) < len(scores):
        return Judgement("best", top)
    return Judgement("tie", None)


def pairwise_winrate(ours: Sequence[float], theirs: Sequence[float]) -> float:
    """P(ours beats theirs) over all pairs, a tie counting half."""
    if not ours or not theirs:
        raise ValueError("pairwise_winrate needs scores on both sides")
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in ours for b in theirs)
    return wins / (len(ours) * len(theirs))
