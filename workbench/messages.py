"""Messages that carry results from worker threads back to the event loop.

Workers never touch widgets: they post one of these (``post_message`` is
thread-safe) to the node that asked (see ``workbench.model_host``), and that
node's handler on the event loop updates what it shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual.message import Message

if TYPE_CHECKING:
    from rlhf.drift import BlindPair, DriftPair
    from rlhf.reward_eval import LabeledPairScore


# -- the model (handled by the app, which keeps the state the screens watch)

class ModelStatus(Message):
    """A line of progress while the model loads (or converts, the first time)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class ModelLoaded(Message):
    """The model stack is ready to sample. ``warning``: what did not load with it
    (a policy version), said once; sampling goes on from the base model."""

    def __init__(self, stack: Any, seconds: float, warning: str | None = None) -> None:
        super().__init__()
        self.stack = stack
        self.seconds = seconds
        self.warning = warning


class ModelFailed(Message):
    """Loading failed; ``text`` is one line the user can act on."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class RolloutsQueued(Message):
    """An iteration's rollouts wait for labels as ``sets`` sets of K answers of
    policy ``version`` (``sampled`` of them sampled to make K)."""

    def __init__(self, version: int, sets: int, sampled: int) -> None:
        super().__init__()
        self.version = version
        self.sets = sets
        self.sampled = sampled


class PolicySwitched(Message):
    """Samples come from policy ``version`` from now on. ``quiet``: nothing to
    announce (no model yet, the version loads with it; or the switch failed and
    the failure says so)."""

    def __init__(self, version: int, quiet: bool = False, best_of: int | None = None) -> None:
        super().__init__()
        self.version = version
        self.quiet = quiet
        self.best_of = best_of  # each answer the reward model's pick among this many of the version


# -- sampling (handled by the labeling screen)

class CompletionsSampled(Message):
    """K new completions of a prompt are in the store (``ids`` in sampling order);
    ``text`` is the prompt text they answer (it may have been edited since)."""

    def __init__(self, prompt_id: int, text: str, ids: list[int], seconds: float) -> None:
        super().__init__()
        self.prompt_id = prompt_id
        self.text = text
        self.ids = ids
        self.seconds = seconds


class SamplingSkipped(Message):
    """A queued sample was dropped: its prompt was no longer wanted when the model was free."""

    def __init__(self, prompt_id: int) -> None:
        super().__init__()
        self.prompt_id = prompt_id


class SamplingFailed(Message):
    def __init__(self, prompt_id: int, text: str) -> None:
        super().__init__()
        self.prompt_id = prompt_id
        self.text = text


# -- the reward model

class ScoresReady(Message):
    """Reward-model scores of completions ``ids`` (in that order)."""

    def __init__(self, ids: list[int], scores: list[float]) -> None:
        super().__init__()
        self.ids = ids
        self.scores = scores


class AgreementMeasured(Message):
    """How often the reward model agrees with the labeler, e.g. '71% of 120
    pairs (v2)'. Bubbles up to the app, which keeps the figure
    (``WorkbenchApp.agreement``) for the screen that shows it."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class LabeledPairsScored(Message):
    """Every labeled pair with both scores by reward ``version``; ``scored`` is
    None when no reward model could be loaded."""

    def __init__(self, scored: list[LabeledPairScore] | None, version: int | None) -> None:
        super().__init__()
        self.scored = scored
        self.version = version


# -- drift (handled by the drift screen)

class DriftAnswered(Message):
    """The reference and a policy version answered a probe; ``blind`` is the same
    pair stored for a blind label, when one was asked for."""

    def __init__(self, pair: DriftPair, blind: BlindPair | None) -> None:
        super().__init__()
        self.pair = pair
        self.blind = blind


class PrioritiesMeasured(Message):
    """How soon the uncertain order labels each waiting prompt's set: prompt id ->
    priority, highest first (rlhf.label_order.label_priorities)."""

    def __init__(self, priority: dict[int, float]) -> None:
        super().__init__()
        self.priority = priority
