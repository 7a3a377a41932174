"""The one owner of the model in the app.

``ModelHost`` holds the model stack (or, in tests, a fake sampler), the lock
every model call takes, the sampling parameters, the policy version samples come
from, the reward scorer with its score cache, and the drift adapter. A screen
asks for work and passes itself as the requester: the work runs in a thread
worker of that node, and the answer is a message posted back to it
(``workbench/messages.py``) for its own ``on_...`` handler. A worker that
raises is reported like any other worker (``WorkbenchApp.report_worker_failure``).

All model work runs under ``lock``, one call at a time: a batched ``generate``
already uses every core, and the peft adapter switches of two concurrent calls
would trample each other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from textual.dom import DOMNode
from textual.worker import NoActiveWorker, Worker, WorkerCancelled, get_current_worker

from rlhf.best_of import pick_best
from rlhf.errors import UserError
from rlhf.model_options import ModelOptions
from rlhf.rows import Completion
from rlhf.sampling_params import SamplingParams
from rlhf.store import Store
from workbench.messages import (
    AgreementMeasured,
    CompletionsSampled,
    DriftAnswered,
    LabeledPairsScored,
    ModelFailed,
    ModelLoaded,
    ModelStatus,
    PolicySwitched,
    PrioritiesMeasured,
    RolloutsQueued,
    SamplingFailed,
    SamplingSkipped,
    ScoresReady,
)

if TYPE_CHECKING:
    from rlhf.drift import Contender
    from rlhf.label_order import Sets
    from rlhf.reward_eval import LabeledPairScore
    from rlhf.reward_scoring import RewardScorer

log = logging.getLogger(__name__)

# (prompts, k) -> k samples per prompt; rlhf.sampling.sample_k bound to a stack,
# or a fake in tests.
Sampler = Callable[[Sequence[str], int], list[list[Any]]]
# App.notify, which is thread-safe.
Notify = Callable[..., None]


def quiet_libraries() -> None:
    """Keep transformers / peft / bitsandbytes from writing over the screen:
    their progress bars and advisory warnings go to the terminal directly."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", module=r"(transformers|peft|bitsandbytes|accelerate|torch|gguf)(\.|$)")
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "gguf"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _worker_cancelled() -> bool:
    try:
        return get_current_worker().is_cancelled
    except NoActiveWorker:
        return False


# After a key or click, model work pauses at its next token for this long, so
# that the event loop answers without sharing the GIL: a token's Python between
# the matrix products holds it, and the faster the products, the larger that
# share (p95 key to screen 49 ms before the grouped layers, 59-65 after, with
# sampling 1.8x faster; benchmarks/app.py).
INPUT_PAUSE_S = 0.15


class InputPause:
    """When the labeler last touched the app; model threads wait on it between tokens."""

    def __init__(self) -> None:
        self._until = 0.0

    def touched(self) -> None:
        """Called on the event loop with each key or click."""
        self._until = time.monotonic() + INPUT_PAUSE_S

    def should_stop(self) -> bool:
        """Between two tokens in a model thread: give way to recent input, then
        stop if the worker was cancelled."""
        wait = self._until - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        return _worker_cancelled()


# Model work runs below the event loop's priority (per thread, on Linux): it
# otherwise takes the loop's turn on the cores, and a key press waits for the
# next token (benchmarks/app.py). This is the worker's own thread, which does its
# share of each matrix product; torch's pool threads keep their priority (checked
# in /proc: they do not inherit it).
MODEL_THREAD_NICENESS = 5
# Sets whose features the uncertain order reads under one hold of the model lock
# (about two seconds of the embedded model on two cores).
PRIORITY_CHUNK = 8
PRIORITIES_GROUP = "label-priorities"   # the worker group of those measurements


def _below_the_event_loop(work: Callable[[], None]) -> None:
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not allowed: the same work, unniced
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), MODEL_THREAD_NICENESS)
    work()


def _in_thread(requester: DOMNode, work: Callable[[], None], group: str, exclusive: bool = False) -> Worker[None]:
    return requester.run_worker(partial(_below_the_event_loop, work), thread=True, group=group, exclusive=exclusive,
                                exit_on_error=False)


class ModelHost:
    """Public methods are called on the event loop and return at once; the work
    runs in a thread worker of the requester, and the answer comes as a message."""

    def __init__(self, store: Store, k: int, *, notify: Notify, options: ModelOptions | None = None,
                 stack: Any | None = None, sampler: Sampler | None = None,
                 sampling_params: SamplingParams | None = None, policy_version: int | None = None) -> None:
        """``options`` are loaded by ``load``; a ready ``stack`` or a ``sampler``
        skips loading. ``policy_version`` None means the latest trained policy."""
        self.store = store
        self.k = k
        self.options = options
        self.stack = stack
        self.sampling_params = sampling_params
        self.lock = threading.Lock()
        self.input_pause = InputPause()
        self._notify = notify
        if policy_version is None:
            versions = [c.version for c in store.checkpoints("policy")]
            policy_version = versions[-1] if versions else 0
        # Before the model has loaded: the version it loads with.
        self.policy_version = stack.policy_version if stack is not None else policy_version
        self.best_of: int | None = None  # N: each answer the reward model's pick among N samples
        self.sampler = sampler if sampler is not None or stack is None else self._stack_sampler(stack)
        # The reward model: the loaded version, and scores per completion id for it.
        self.scorer: RewardScorer | None = None
        self.reward_version: int | None = None
        self._scores: dict[int, float] = {}
        self._failed_reward_version: int | None = None

    @property
    def ready(self) -> bool:
        """Samples can be asked for."""
        return self.sampler is not None

    @property
    def reward_available(self) -> bool:
        """A model is loaded and a reward version exists (a cheap store read)."""
        return self.stack is not None and bool(self.store.checkpoints("reward"))

    def base_model(self) -> ModelOptions:
        """The base model, for a job to load its own copy of."""
        if self.options is not None:
            return self.options
        if self.stack is not None:
            return ModelOptions(source=self.stack.model_dir, quantize=self.stack.quantized,
                                device=self.stack.device.type, dtype=str(self.stack.dtype).replace("torch.", ""))
        return ModelOptions()

    # -- loading and the policy version

    def load(self, requester: DOMNode) -> Worker[None]:
        """Load the stack and the chosen policy version; ModelStatus lines, then
        ModelLoaded or ModelFailed, go to ``requester``."""
        return _in_thread(requester, partial(self._load, requester), "model", exclusive=True)

    def switch_policy(self, requester: DOMNode, version: int, best_of: int | None = None) -> None:
        """Sample from another policy version from now on (0 = the base model);
        with ``best_of`` N, each answer is the latest reward model's pick among N
        of its samples (rlhf.best_of). PolicySwitched goes to ``requester``."""
        if not self.ready:
            self.policy_version, self.best_of = version, best_of  # loaded with the model
            requester.post_message(PolicySwitched(version, quiet=True, best_of=best_of))
            return
        _in_thread(requester, partial(self._switch_policy, requester, version, best_of), "policy", exclusive=True)

    def _stack_sampler(self, stack: Any) -> Sampler:
        from rlhf.sampling import sample_k

        # Called in a worker thread: a cancelled worker (the app quitting) stops
        # generate at the next token instead of holding the exit for a minute.
        return lambda prompts, k: sample_k(stack, prompts, k, self.sampling_params,
                                          should_stop=self.input_pause.should_stop)

    def _load(self, requester: DOMNode) -> None:
        quiet_libraries()
        started = time.monotonic()
        # A failed load is the app's state ('failed': shown where the completions
        # would be, with what to fix), not a passing notice; the app stays up without a model.
        try:
            requester.post_message(ModelStatus("importing torch and transformers"))
            from rlhf.models import load_stack

            stack = load_stack(self.options, progress=lambda text: requester.post_message(ModelStatus(text)))
        except UserError as e:
            requester.post_message(ModelFailed(str(e)))
            return
        except Exception as e:  # a bug, or a model transformers cannot read
            log.exception("model loading failed")
            requester.post_message(ModelFailed(f"could not load the model: {type(e).__name__}: {e}"))
            return
        warning = None
        if self.policy_version:
            requester.post_message(ModelStatus(f"loading policy v{self.policy_version}"))
            try:
                self._load_version(stack, self.policy_version)
            except Exception as e:  # a missing or broken adapter must not cost the base model
                stack.reset_policy()
                warning = f"policy v{self.policy_version} not loaded ({e}); sampling from the base model (v to choose)"
        with self.lock:
            self.stack, self.sampler = stack, self._stack_sampler(stack)
            self.policy_version = stack.policy_version
        requester.post_message(ModelLoaded(stack, time.monotonic() - started, warning))

    def _load_version(self, stack: Any, version: int) -> None:
        if version == 0:
            stack.reset_policy()
            return
        checkpoint = self.store.checkpoint("policy", version)
        assert checkpoint is not None
        stack.load_policy(checkpoint.path, version)

    def _switch_policy(self, requester: DOMNode, version: int, best_of: int | None) -> None:
        with self.lock:
            try:
                if self.stack is not None:
                    self._load_version(self.stack, version)
            except Exception as e:
                # Half-loaded adapters must not be sampled: back to the base, then report.
                if self.stack is not None:
                    self.stack.reset_policy()
                self.policy_version, self.best_of = 0, None
                requester.post_message(PolicySwitched(0, quiet=True))
                raise UserError(f"policy v{version} not loaded ({e}); sampling from the base model") from e
            self.policy_version, self.best_of = version, best_of
        requester.post_message(PolicySwitched(version, best_of=best_of))

    # -- sampling

    def sample(self, requester: DOMNode, prompt_id: int, text: str,
               still_wanted: Callable[[], bool] | None = None) -> None:
        """Sample K completions of one prompt and store them; CompletionsSampled,
        SamplingSkipped (``still_wanted()`` said no once the model was free: on
        a CPU a needless sample costs tens of seconds) or SamplingFailed goes to
        ``requester``."""
        _in_thread(requester, partial(self._sample, requester, prompt_id, text, still_wanted), "sample")

    def _sample(self, requester: DOMNode, prompt_id: int, text: str, still_wanted: Callable[[], bool] | None) -> None:
        started = time.monotonic()
        try:
            ids = self._sample_stored(prompt_id, text, still_wanted)
        except WorkerCancelled:  # the app is closing
            return
        except Exception as e:  # said where the prompt is, with a retry key; the requester stops waiting for it
            if not isinstance(e, UserError):
                log.exception("sampling prompt %s failed", prompt_id)
            requester.post_message(SamplingFailed(prompt_id, f"{type(e).__name__}: {e}"))
            return
        if ids is None:
            requester.post_message(SamplingSkipped(prompt_id))
        else:
            requester.post_message(CompletionsSampled(prompt_id, text, ids, time.monotonic() - started))

    def _sample_stored(self, prompt_id: int, text: str, still_wanted: Callable[[], bool] | None) -> list[int] | None:
        if self.sampler is None:
            raise RuntimeError("no sampler yet: the model is not loaded")
        with self.lock:
            if still_wanted is not None and not still_wanted():
                return None
            if self.sampling_params is None:
                self.sampling_params = SamplingParams()
            version, best_of, reward_version = self.policy_version, self.best_of, None
            if best_of:
                scorer = self._scorer()
                if scorer is None:
                    raise UserError(f"best-of-{best_of} needs a reward model to pick the answers and none is loaded "
                                    "(see the notices): train one (F2) or choose a policy version (v)")
                pool = self.sampler([text], self.k * best_of)[0]
                if _worker_cancelled():
                    raise WorkerCancelled()  # the app is closing: no scoring for nothing
                samples, reward_version = pick_best(scorer, pool[0].prompt_ids, pool, best_of), self.reward_version
            else:
                samples = self.sampler([text], self.k)[0]
        if _worker_cancelled():
            raise WorkerCancelled()  # cut short: never store a partial set
        return self.store.add_completions(prompt_id, [s.as_row(self.sampling_params, version, best_of=best_of,
                                                                reward_version=reward_version) for s in samples])

    # -- the reward model

    def score(self, requester: DOMNode, prompt_id: int, completions: Sequence[Completion]) -> None:
        """Score completions of a prompt (ScoresReady), then measure the agreement
        (AgreementMeasured); both go to ``requester``. Nothing without a model
        and a reward version."""
        if self.reward_available:
            _in_thread(requester, partial(self._score, requester, prompt_id, list(completions)), "reward-scores")

    def measure_agreement(self, requester: DOMNode) -> None:
        """How often the latest reward version agrees with the labels: AgreementMeasured to ``requester``."""
        if self.reward_available:
            _in_thread(requester, partial(self._agreement, requester), "reward-agreement", exclusive=True)

    def score_labeled(self, requester: DOMNode) -> Worker[None]:
        """Every labeled pair with both scores: LabeledPairsScored to ``requester``."""
        return _in_thread(requester, partial(self._score_labeled, requester), "reward-pairs", exclusive=True)

    def measure_priorities(self, requester: DOMNode, sets: Sequence[tuple[int, Sequence[Completion]]]) -> None:
        """How soon the uncertain order labels each (prompt id, completions) set,
        given the labels so far: PrioritiesMeasured to ``requester``. Nothing
        before the model is loaded."""
        if self.stack is not None and sets:
            _in_thread(requester, partial(self._priorities, requester, list(sets)), PRIORITIES_GROUP, exclusive=True)

    def _priorities(self, requester: DOMNode, sets: list[tuple[int, Sequence[Completion]]]) -> None:
        from rlhf.label_order import label_priorities, labeled_sets

        try:
            texts = [(self.store.prompt(pid).text, shown) for pid, shown in sets]
            values = label_priorities(self._read_features, texts, labeled_sets(self.store))
        except WorkerCancelled:  # a newer measurement was asked for, or the reward read-out changed midway
            return
        except Exception:  # the order is a help: the queue keeps its order
            log.exception("measuring the labeling priorities failed")
            return
        if not _worker_cancelled():
            requester.post_message(PrioritiesMeasured(dict(zip((pid for pid, _ in sets), values))))

    def _score(self, requester: DOMNode, prompt_id: int, completions: list[Completion]) -> None:
        try:
            prompt = self.store.prompt(prompt_id).text
            with self.lock:
                scorer = self._scorer()
                if scorer is None:
                    return
                scores = scorer.score_completions(prompt, completions, self._scores)
        except Exception:  # scores are a help to the labeler: never let them take labeling down
            log.exception("scoring the shown completions failed")
            return
        requester.post_message(ScoresReady([c.id for c in completions], scores))
        self._agreement(requester)

    def _agreement(self, requester: DOMNode) -> None:
        from rlhf.reward_eval import agreement

        try:
            scored = self._labeled_scores()
        except Exception:  # a help too: the figure shown stays as it was
            log.exception("measuring the reward model's agreement failed")
            return
        if scored is None:
            return
        share = agreement(scored)
        requester.post_message(AgreementMeasured(
            f"{share:.0%} of {len(scored)} pairs (v{self.reward_version})" if share is not None
            else "no labeled pairs"))

    def _score_labeled(self, requester: DOMNode) -> None:
        scored = self._labeled_scores()
        requester.post_message(LabeledPairsScored(scored, self.reward_version))

    def _labeled_scores(self) -> list[LabeledPairScore] | None:
        from rlhf.reward_eval import score_labeled_pairs

        with self.lock:
            scorer = self._scorer()
            if scorer is None:
                return None
            return score_labeled_pairs(scorer, self.store, "label", self._scores)

    def _read_features(self, sets: Sets) -> list[Any]:
        """``label_order.set_features`` a few sets at a time, the lock let go
        between: reading hundreds of answers takes a minute, and sampling the next
        prompt should not wait. WorkerCancelled when cancelled, or when a reward
        version lands midway (its read-out would mix with the one before)."""
        from rlhf.label_order import base_scorer, set_features

        features: list[Any] = []
        version = self._latest_reward_version()
        for start in range(0, len(sets), PRIORITY_CHUNK):
            if _worker_cancelled() or self._latest_reward_version() != version:
                raise WorkerCancelled()
            with self.lock:
                scorer = self._scorer() or base_scorer(self.stack)  # no reward version yet: the base's features
                features += set_features(scorer, sets[start:start + PRIORITY_CHUNK])
        return features

    def _latest_reward_version(self) -> int | None:
        latest = self.store.checkpoint("reward")
        return latest.version if latest is not None else None

    def _scorer(self) -> RewardScorer | None:
        """The latest reward version, loaded when it changed. Call with ``lock``
        held: loading an adapter changes the shared stack, and the score cache
        belongs to the loaded version."""
        from rlhf.reward_scoring import load_scorer

        latest = self.store.checkpoint("reward")
        if latest is None or self.stack is None:
            return None
        if self.scorer is not None and self.reward_version == latest.version:
            return self.scorer
        if self._failed_reward_version == latest.version:
            return None
        try:
            self.scorer = load_scorer(self.stack, self.store, latest.version)
        except UserError as e:  # e.g. trained on another base model: said once, and labeling goes on
            self._failed_reward_version = latest.version
            self._notify(f"reward v{latest.version}: {e}", severity="warning")
            return None
        self.reward_version = latest.version
        self._scores = {}
        return self.scorer

    # -- a PPO iteration's rollouts, queued for labeling

    def queue_rollouts(self, requester: DOMNode, job_id: int, iteration: int) -> Worker[None]:
        """Put iteration ``iteration`` of PPO job ``job_id`` in the labeling queue
        (rlhf.rollout_archive.queue_rollouts: K answers a prompt, sampled from the
        same version where the batch had fewer), then sample from that version, so
        the labeling screen shows them. RolloutsQueued goes to ``requester``."""
        return _in_thread(requester, partial(self._queue_rollouts, requester, job_id, iteration), "queue",
                          exclusive=True)

    def _queue_rollouts(self, requester: DOMNode, job_id: int, iteration: int) -> None:
        from rlhf.drift import DRIFT_ADAPTER, load_drift_version
        from rlhf.rollout_archive import queue_rollouts, session_sampling
        from rlhf.sampling import sample_k

        params = session_sampling(self.store, job_id)

        def sample_more(prompt: str, version: int, n: int) -> list[Any]:
            if self.stack is None:
                raise UserError("the model is still loading: queue the rollouts once it is ready")
            if version and getattr(self.stack, "drift_version", None) != version:
                load_drift_version(self.stack, self.store, version)  # beside the sampled policy, not over it
            return sample_k(self.stack, [prompt], n, params, role=DRIFT_ADAPTER if version else "base",
                            should_stop=self.input_pause.should_stop)[0]

        with self.lock:
            sets, sampled = queue_rollouts(self.store, job_id, iteration, self.k, sample_more)
        version = self.store.rollouts(job_id, iteration, limit=1)[0].policy_version
        assert version is not None  # queue_rollouts refuses an unsaved one
        requester.post_message(RolloutsQueued(version, sets, sampled))
        if (version, None) != (self.policy_version, self.best_of):
            self._switch_policy(requester, version, None)

    # -- drift: a policy version in its own adapter beside the sampled one

    def drift_pair(self, requester: DOMNode, target: Contender, prompt: str, params: SamplingParams,
                   blind_rng: random.Random | None = None) -> Worker[None]:
        """The reference and ``target`` (a policy version, or best-of-N of the
        reference by the latest reward model) answer ``prompt``; with
        ``blind_rng`` the pair is also stored for a blind label, in an order
        drawn from it. DriftAnswered goes to ``requester``."""
        return _in_thread(requester, partial(self._drift_pair, requester, target, prompt, params, blind_rng),
                          "drift-answer", exclusive=True)

    def _drift_pair(self, requester: DOMNode, target: Contender, prompt: str, params: SamplingParams,
                    blind_rng: random.Random | None) -> None:
        from rlhf.drift import answer_best_of_pair, answer_pair, load_drift_version, store_blind_pair

        with self.lock:
            if target.best_of:
                scorer = self._scorer()
                if scorer is None:
                    raise UserError("best-of-N needs a reward model to pick the answer and none is loaded (see the "
                                    "notices): train one (F2)")
                pair = answer_best_of_pair(self.stack, scorer, prompt, params, target.best_of)
            else:
                if getattr(self.stack, "drift_version", None) != target.version:
                    load_drift_version(self.stack, self.store, target.version)
                pair = answer_pair(self.stack, prompt, params)
        blind = store_blind_pair(self.store, pair, params, blind_rng) if blind_rng is not None else None
        requester.post_message(DriftAnswered(pair, blind))
