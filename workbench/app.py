"""The workbench app: the model, the store, and the screens on top of them.

The app owns what every screen shares: the open store, the one model stack
(loaded in a worker thread; the screen comes up at once and shows the loading),
the sampler and the policy version it samples from. Screens are modes, one per
stage of the loop; each reads the store and asks the app for samples.

All model work happens in worker threads under ``model_lock``, one call at a
time: a batched ``generate`` already uses every core, and the peft adapter
switches of two concurrent calls would trample each other.
"""

from __future__ import annotations

import getpass
import logging
import os
import random
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive
from textual.worker import NoActiveWorker, Worker, WorkerCancelled, WorkerState, get_current_worker

from rlhf.errors import UserError
from rlhf.prompts import load_sample_prompts
from rlhf.store import Store
from workbench.commands import WorkbenchCommands
from workbench.messages import CompletionsShown, LabelRecorded, ModelFailed, ModelLoaded, ModelStatus
from workbench.reward_scores import RewardScores
from workbench.screens.dialogs import ExportDialog, ExportRequest, VersionPicker
from workbench.screens.drift import DriftScreen
from workbench.screens.help import HelpScreen
from workbench.screens.label import LabelScreen
from workbench.screens.ppo import PPOScreen
from workbench.screens.train import TrainScreen

# (prompts, k) -> k samples per prompt; rlhf.sampling.sample_k bound to a stack,
# or a fake in tests.
Sampler = Callable[[Sequence[str], int], list[list[Any]]]

MODEL_STATES = ("none", "loading", "ready", "failed")


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


def default_labeler() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return "labeler"


class WorkbenchApp(App[None]):
    TITLE = "RLHF Workbench"
    CSS_PATH = "app.tcss"
    COMMANDS = App.COMMANDS | {WorkbenchCommands}

    # One mode per full screen. A later screen registers itself here and adds
    # its key below, e.g. "train": TrainScreen with Binding("f2", "switch_mode('train')", "Train").
    MODES = {
        "label": LabelScreen,
        "train": TrainScreen,
        "ppo": PPOScreen,
        "drift": DriftScreen,
    }
    DEFAULT_MODE = "label"

    BINDINGS = [
        Binding("f1", "switch_mode('label')", "Label", tooltip="Labeling screen"),
        Binding("f2", "switch_mode('train')", "Train", tooltip="Reward model: train, watch, cancel"),
        Binding("f3", "switch_mode('ppo')", "PPO", tooltip="PPO sessions: start, pause, stop; live reward and KL"),
        Binding("f4", "switch_mode('drift')", "Drift", tooltip="Policy vs reference: per-token drift, blind labels"),
        Binding("v", "pick_version", "Version", tooltip="Choose the policy version to sample from"),
        Binding("x", "export", "Export", tooltip="Export recorded pairs (TRL / Parquet / datasets)"),
        Binding("question_mark", "help", "Help", key_display="?", tooltip="Show the keys and what they record"),
    ]

    # 'none' (no model asked for), 'loading', 'ready', 'failed'
    model_state: reactive[str] = reactive("none")
    model_status: reactive[str] = reactive("")
    policy_version: reactive[int] = reactive(0)

    def __init__(self, store: Store, *, k: int = 4, labeler: str | None = None,
                 model: Any | None = None, stack: Any | None = None, sampler: Sampler | None = None,
                 sampling_params: Any | None = None, policy_version: int | None = None,
                 rng: random.Random | None = None, load_samples: bool = True) -> None:
        """``model`` (rlhf.models.ModelOptions) is loaded in a worker; a ready
        ``stack`` or a ``sampler`` (tests: a fake) skips loading.
        ``policy_version`` None means the latest trained policy, else the base."""
        super().__init__()
        if not 2 <= k <= 6:
            raise UserError(f"--k {k} is out of range: show 2 to 6 completions per prompt")
        self.store = store
        self.k = k
        self.labeler = labeler or default_labeler()
        self.model_options = model
        self.stack = stack
        self.sampler = sampler
        self.sampling_params = sampling_params
        self.rng = rng or random.Random()
        self.model_lock = threading.Lock()
        self.reward_scores = RewardScores(self)  # scores and agreement, once a reward model exists
        self.sub_title = str(store.path)
        self._samples_added = load_sample_prompts(self.store) if load_samples else 0
        versions = [c.version for c in store.checkpoints("policy")]
        self._target_version = (versions[-1] if versions else 0) if policy_version is None else policy_version
        if stack is not None and sampler is None:
            self.sampler = self._stack_sampler(stack)
        if self.sampler is not None:
            self.set_reactive(WorkbenchApp.model_state, "ready")
            self.set_reactive(WorkbenchApp.policy_version,
                              stack.policy_version if stack is not None else self._target_version)
        elif model is not None:
            self.set_reactive(WorkbenchApp.model_state, "loading")
            self.set_reactive(WorkbenchApp.model_status, "starting")

    # -- start-up

    def on_mount(self) -> None:
        if self._samples_added:
            self.notify(f"First run: loaded {self._samples_added} sample prompts", timeout=4)
        if self.model_state == "loading":
            self.load_model()

    @property
    def can_sample(self) -> bool:
        return self.sampler is not None

    # -- the model

    def _stack_sampler(self, stack: Any) -> Sampler:
        from rlhf.sampling import sample_k

        # Called in a worker thread: a cancelled worker (the app quitting) stops
        # generate at the next token instead of holding the exit for a minute.
        return lambda prompts, k: sample_k(stack, prompts, k, self.sampling_params, should_stop=_worker_cancelled)

    @work(thread=True, exclusive=True, group="model", exit_on_error=False)
    def load_model(self) -> None:
        """Load the stack (converting the embedded model the first time), then the
        chosen policy version. Every step reports a line of progress."""
        quiet_libraries()
        started = time.monotonic()
        try:
            self.post_message(ModelStatus("importing torch and transformers"))
            from rlhf.models import load_stack

            stack = load_stack(self.model_options, progress=lambda text: self.post_message(ModelStatus(text)))
            if self._target_version:
                self.post_message(ModelStatus(f"loading policy v{self._target_version}"))
                try:
                    self._load_version(stack, self._target_version)
                except Exception as e:  # a missing or broken adapter must not cost the base model
                    stack.reset_policy()
                    self.call_from_thread(self.notify, f"policy v{self._target_version} not loaded ({e}); "
                                          "sampling from the base model (v to choose)", severity="warning")
        except UserError as e:
            self.post_message(ModelFailed(str(e)))
            return
        except Exception as e:  # a bug, or a model transformers cannot read: show it, keep the app up
            logging.getLogger(__name__).exception("model loading failed")
            self.post_message(ModelFailed(f"could not load the model: {type(e).__name__}: {e}"))
            return
        self.post_message(ModelLoaded(stack, time.monotonic() - started))

    def on_model_status(self, message: ModelStatus) -> None:
        self.model_status = message.text

    def on_model_loaded(self, message: ModelLoaded) -> None:
        self.stack = message.stack
        self.sampler = self._stack_sampler(message.stack)
        self.policy_version = message.stack.policy_version
        self.model_status = f"model ready in {message.seconds:.1f} s"
        self.model_state = "ready"
        self.notify(f"{self.model_status} ({'4-bit NF4' if message.stack.quantized else 'full precision'}, "
                    f"{message.stack.device.type})", timeout=3)

    def on_completions_shown(self, message: CompletionsShown) -> None:
        self.reward_scores.score_shown(message.prompt_id, message.completions)

    def on_label_recorded(self, message: LabelRecorded) -> None:
        self.reward_scores.refresh_agreement()

    def on_model_failed(self, message: ModelFailed) -> None:
        self.model_status = message.text
        self.model_state = "failed"

    def _load_version(self, stack: Any, version: int) -> None:
        if version == 0:
            stack.reset_policy()
            return
        checkpoint = self.store.checkpoint("policy", version)
        assert checkpoint is not None
        stack.load_policy(checkpoint.path, version)

    def sample_completions(self, prompt_id: int, text: str,
                           still_wanted: Callable[[], bool] | None = None) -> list[int] | None:
        """Sample K completions of one prompt and store them; returns their ids,
        or None when ``still_wanted()`` says no once the model is free (the
        researcher moved past the prompt while earlier work ran: on a CPU a
        needless sample costs tens of seconds). Blocking: call it from a worker."""
        if self.sampler is None:
            raise RuntimeError("no sampler yet: the model is not loaded")
        with self.model_lock:
            if still_wanted is not None and not still_wanted():
                return None
            if self.sampling_params is None:
                from rlhf.sampling import SamplingParams

                self.sampling_params = SamplingParams()
            version = self.policy_version
            samples = self.sampler([text], self.k)[0]
        if _worker_cancelled():
            raise WorkerCancelled()  # cut short: never store a partial set
        return self.store.add_completions(prompt_id, [s.as_row(self.sampling_params, version) for s in samples])

    @work(thread=True, exclusive=True, group="policy", exit_on_error=False)
    def switch_policy(self, version: int) -> None:
        """Sample from another policy version from now on (0 = the base model)."""
        with self.model_lock:
            try:
                if self.stack is not None:
                    self._load_version(self.stack, version)
            except Exception as e:  # half-loaded adapters must not be sampled: back to the base
                if self.stack is not None:
                    self.stack.reset_policy()
                self.call_from_thread(setattr, self, "policy_version", 0)
                self.call_from_thread(self.notify, f"policy v{version} not loaded ({e}); sampling from the base "
                                      "model", severity="error", timeout=8)
                return
            self.call_from_thread(setattr, self, "policy_version", version)
        self.call_from_thread(self.notify, f"sampling from policy v{version}" + (" (base)" if not version else ""))

    # -- what a background task raised: reported here, once for every worker

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        self.report_worker_failure(event.worker)

    def report_worker_failure(self, worker: Worker) -> None:
        """A worker that raised: a UserError is a notice that says what to do;
        anything else is a bug, logged with its traceback and named on screen.
        Either way the app stays up (every worker runs with exit_on_error=False)."""
        if worker.state is not WorkerState.ERROR or worker.error is None:
            return
        error = worker.error
        if isinstance(error, UserError):
            self.notify(str(error), severity="error", timeout=8)
            return
        logging.getLogger(__name__).error("background task %s failed", worker.group or worker.name,
                                          exc_info=error)
        self.notify(f"{worker.group or worker.name} failed: {type(error).__name__}: {error}", severity="error",
                    timeout=10)

    # -- actions every screen has

    def get_key_display(self, binding: Binding) -> str:
        if binding.action == "pick(1)":
            return f"1-{self.k}"  # one footer entry for the K pick keys
        return super().get_key_display(binding)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.k))

    def action_pick_version(self) -> None:
        versions = [(0, "base model (adapters off)")]
        for c in self.store.checkpoints("policy"):
            about = f"saved {c.created_at[:16].replace('T', ' ')}"
            if c.job_id:
                about += f" by job {c.job_id}"
            versions.append((c.version, about))

        def chosen(version: int | None) -> None:
            if version is not None and version != self.policy_version:
                if self.stack is None and self.sampler is None:
                    self._target_version = version  # applied when the model has loaded
                    self.policy_version = version
                else:
                    self.switch_policy(version)

        self.push_screen(VersionPicker(versions, self.policy_version), chosen)

    def action_export(self) -> None:
        try:
            from rlhf.exchange_export import export_pairs  # noqa: F401  (built by the import/export issue)
        except ImportError:
            self.notify("export is not available in this version", severity="warning")
            return
        self.push_screen(ExportDialog(Path.cwd()), self._export)

    def _export(self, request: ExportRequest | None) -> None:
        if request is not None:
            self.run_export(request)

    @work(thread=True, group="export", exit_on_error=False)
    def run_export(self, request: ExportRequest) -> None:
        from rlhf.exchange_export import export_pairs, reimport_warning

        n = export_pairs(self.store, request.path, request.fmt, conversational=request.conversational)
        self.call_from_thread(self.notify, f"exported {n} pairs to {request.path} ({request.fmt})")
        warning = reimport_warning(request.path)
        if warning:
            self.call_from_thread(self.notify, warning, severity="warning", timeout=10)
