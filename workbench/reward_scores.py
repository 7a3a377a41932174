"""The reward model as the screens see it.

Loads the latest reward version into the app's one model stack (in a worker
thread, under the app's ``model_lock``: model calls are serialized), scores the
completions the labeling screen shows, and measures how often the reward model
agrees with the labeler. Scores are cached per completion for the loaded
version, so the agreement figure costs only the completions not seen before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from rlhf.errors import UserError

if TYPE_CHECKING:
    from rlhf.reward_eval import LabeledPairScore
    from rlhf.reward_scoring import RewardScorer
    from workbench.app import WorkbenchApp

log = logging.getLogger(__name__)


class RewardScores:
    """One per app. Public methods are called on the event loop and start workers;
    the underscore methods run in those workers."""

    def __init__(self, app: WorkbenchApp) -> None:
        self.app = app
        self.scorer: RewardScorer | None = None
        self.version: int | None = None
        self.agreement_text: str | None = None
        self._cache: dict[int, float] = {}
        self._lock = threading.Lock()  # the cache and the loaded version, between workers
        self._failed_version: int | None = None
        self._pending: tuple[int, list[Any]] | None = None  # shown before the model loaded
        self._watching = False

    @property
    def available(self) -> bool:
        """A model is loaded and a reward version exists (a cheap store read)."""
        return self.app.stack is not None and bool(self.app.store.checkpoints("reward"))

    # -- on the event loop

    def score_shown(self, prompt_id: int, completions: Sequence[Any]) -> None:
        """Score completions the labeling screen shows; the scores arrive later.
        Shown before the model has loaded, they are scored once it has."""
        if self.app.stack is None:
            self._pending = (prompt_id, list(completions))
            if not self._watching:
                self._watching = True
                self.app.watch(self.app, "model_state", self._model_state, init=False)
            return
        if self.available:
            self.app.run_worker(partial(self._score_shown, prompt_id, list(completions)), thread=True,
                                group="reward-scores", exit_on_error=False)

    def _model_state(self, state: str) -> None:
        if state == "ready" and self._pending is not None:
            pending, self._pending = self._pending, None
            self.score_shown(*pending)

    def refresh_agreement(self) -> None:
        if self.available:
            self.app.run_worker(self._agreement, thread=True, group="reward-agreement", exclusive=True,
                                exit_on_error=False)

    # -- in workers

    def ensure_scorer(self) -> RewardScorer | None:
        """The latest reward version, loaded when it changed. Call with the app's
        model_lock held (loading an adapter changes the shared stack)."""
        from rlhf.reward_scoring import load_scorer

        latest = self.app.store.checkpoint("reward")
        if latest is None or self.app.stack is None:
            return None
        with self._lock:
            if self.scorer is not None and self.version == latest.version:
                return self.scorer
            if self._failed_version == latest.version:
                return None
            try:
                self.scorer = load_scorer(self.app.stack, self.app.store, latest.version)
            except UserError as e:  # e.g. trained on another base model
                self._failed_version = latest.version
                self.app.call_from_thread(self.app.notify, f"reward v{latest.version}: {e}", severity="warning")
                return None
            self.version = latest.version
            self._cache = {}
        return self.scorer

    def labeled_scores(self) -> list[LabeledPairScore] | None:
        """Every labeled pair with both scores (None without a reward model). Blocking."""
        from rlhf.reward_eval import score_labeled_pairs

        with self.app.model_lock:
            scorer = self.ensure_scorer()
            if scorer is None:
                return None
            return score_labeled_pairs(scorer, self.app.store, "label", self._cache)

    def _score_shown(self, prompt_id: int, completions: list[Any]) -> None:
        try:
            prompt = self.app.store.prompt(prompt_id).text
            with self.app.model_lock:
                scorer = self.ensure_scorer()
                if scorer is None:
                    return
                scores = scorer.score_completions(prompt, completions, self._cache)
        except Exception:  # scores are a help to the labeler: never let them take labeling down
            log.exception("scoring the shown completions failed")
            return
        self.app.call_from_thread(self._apply_scores, [c.id for c in completions], scores)
        self._agreement()

    def _agreement(self) -> None:
        from rlhf.reward_eval import agreement

        try:
            scored = self.labeled_scores()
        except Exception:
            log.exception("measuring the reward model's agreement failed")
            return
        if scored is None:
            return
        share = agreement(scored)
        text = f"{share:.0%} of {len(scored)} pairs (v{self.version})" if share is not None else "no labeled pairs"
        self.agreement_text = text
        self.app.call_from_thread(self._apply_agreement)

    # -- back on the event loop

    def _label_screen(self) -> Any:
        from workbench.screens.label import LabelScreen

        screen = self.app.screen
        return screen if isinstance(screen, LabelScreen) else None

    def _apply_scores(self, ids: list[int], scores: list[float]) -> None:
        screen = self._label_screen()
        if screen is not None and [c.id for c in screen.shown] == ids:
            screen.show_scores(scores)

    def _apply_agreement(self) -> None:
        screen = self._label_screen()
        if screen is not None:
            screen.set_agreement(self.agreement_text)
