"""The workbench app: the store, the model host, and the screens on top of them.

The app owns what every screen shares: the open store, the model host (the one
owner of the model: ``workbench/model_host.py``), the state of the model the
screens watch (loading, ready, the policy version, the reward model's agreement),
the modes with their keys, the dialogs every screen opens, and the reporting of
what a background task raised. Screens are modes, one per stage of the loop;
each reads the store and asks the model host for model work.
"""

from __future__ import annotations

import getpass
import logging
import random
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from textual import events, work
from textual.app import App
from textual.binding import Binding
from textual.reactive import reactive
from textual.worker import Worker, WorkerState

from rlhf.best_of import OFFERED, best_of_n_kl_bound
from rlhf.consistency import REPEAT_EVERY
from rlhf.errors import UserError
from rlhf.prompts import load_sample_prompts
from rlhf.sampling_params import SamplingParams
from rlhf.store import Store
from workbench.commands import WorkbenchCommands
from workbench.idle_gc import EVERY_S, IdleCollector, freeze_long_lived
from workbench.messages import AgreementMeasured, ModelFailed, ModelLoaded, ModelStatus, PolicySwitched
from workbench.model_host import ModelHost, Sampler
from workbench.screens.dialogs import ExportDialog, ExportRequest, ImportDialog, ImportRequest, VersionPicker
from workbench.screens.dpo import DPOScreen
from workbench.screens.drift import DriftScreen
from workbench.screens.help import HelpScreen
from workbench.screens.label import LabelScreen
from workbench.screens.ppo import PPOScreen
from workbench.screens.train import TrainScreen

MODEL_STATES = ("none", "loading", "ready", "failed")


def default_labeler() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in some containers
        return "labeler"


class WorkbenchApp(App[None]):
    TITLE = "RLHF Workbench"
    CSS_PATH = "app.tcss"
    COMMANDS = App.COMMANDS | {WorkbenchCommands}

    # One mode per full screen (added by _add_modes), each with its key below.
    DEFAULT_MODE = "label"

    BINDINGS = [
        Binding("f1", "switch_mode('label')", "Label", tooltip="Labeling screen"),
        Binding("f2", "switch_mode('train')", "Train", tooltip="Reward model: train, watch, cancel"),
        Binding("f3", "switch_mode('ppo')", "PPO", tooltip="PPO sessions: start, pause, stop; live reward and KL"),
        Binding("f4", "switch_mode('drift')", "Drift", tooltip="Policy vs reference: per-token drift, blind labels"),
        Binding("f5", "switch_mode('dpo')", "DPO", tooltip="DPO on the labeled pairs: start, cancel; live loss, "
                                                          "accuracy, implicit rewards and KL"),
        Binding("v", "pick_version", "Version", tooltip="Choose the policy version to sample from"),
        Binding("x", "export", "Export", tooltip="Export recorded pairs (TRL / Parquet / datasets)"),
        Binding("i", "import", "Import", tooltip="Import preference pairs (TRL / Parquet / datasets / HH-RLHF)"),
        Binding("question_mark", "help", "Help", key_display="?", tooltip="Show the keys and what they record"),
    ]

    # 'none' (no model asked for), 'loading', 'ready', 'failed'
    model_state: reactive[str] = reactive("none")
    model_status: reactive[str] = reactive("")
    policy_version: reactive[int] = reactive(0)
    # N when each answer to label is the reward model's pick among N samples of the version (best-of-N).
    best_of: reactive[int | None] = reactive(None)
    # How often the reward model agrees with the labeler, once one exists.
    agreement: reactive[str | None] = reactive(None)
    # Counts additions to the labeling queue made outside the label screen (an import).
    prompts_added: reactive[int] = reactive(0)

    def __init__(self, store: Store, *, k: int = 4, labeler: str | None = None,
                 model: Any | None = None, stack: Any | None = None, sampler: Sampler | None = None,
                 sampling_params: SamplingParams | None = None, policy_version: int | None = None,
                 rng: random.Random | None = None, load_samples: bool = True,
                 job_defaults: Mapping[str, Mapping[str, Any]] | None = None,
                 drift_params: SamplingParams | None = None, repeat_every: int = REPEAT_EVERY,
                 idle_gc: bool = False) -> None:
        """``model`` (rlhf.models.ModelOptions) is loaded in a worker; a ready
        ``stack`` or a ``sampler`` (tests: a fake) skips loading.
        ``policy_version`` None means the latest trained policy, else the base.
        ``job_defaults`` (per job kind: 'reward', 'ppo', 'dpo') go over the config of
        the jobs the screens start, ``drift_params`` answer the drift probes
        (tests make both tiny). Every ``repeat_every`` labels an earlier comparison
        comes back unannounced (rlhf.consistency; 0: never). ``idle_gc``: once
        the model is loaded, full garbage collections wait for a pause in the
        input (workbench/idle_gc.py)."""
        super().__init__()
        if not 2 <= k <= 6:
            raise UserError(f"--k {k} is out of range: show 2 to 6 completions per prompt")
        self.store = store
        self.k = k
        self.labeler = labeler or default_labeler()
        self.rng = rng or random.Random()
        self.repeat_every = repeat_every
        self.model_host = ModelHost(store, k, notify=self.notify, options=model, stack=stack, sampler=sampler,
                                    sampling_params=sampling_params, policy_version=policy_version)
        self.sub_title = str(store.path)
        # The process's collector is the app's to tune only when it runs alone (`workbench`), not under tests.
        self._idle_gc = IdleCollector() if idle_gc else None
        self._add_modes(job_defaults or {}, drift_params)
        self._samples_added = load_sample_prompts(self.store) if load_samples else 0
        self.set_reactive(WorkbenchApp.policy_version, self.model_host.policy_version)
        if self.model_host.ready:
            self.set_reactive(WorkbenchApp.model_state, "ready")
        elif model is not None:
            self.set_reactive(WorkbenchApp.model_state, "loading")
            self.set_reactive(WorkbenchApp.model_status, "starting")

    def _add_modes(self, job_defaults: Mapping[str, Mapping[str, Any]],
                   drift_params: SamplingParams | None) -> None:
        """One mode per full screen, made with this app's options for it. A new
        screen goes here, and its key into BINDINGS."""
        self.add_mode("label", LabelScreen)
        self.add_mode("train", partial(TrainScreen, job_defaults=job_defaults.get("reward")))
        self.add_mode("ppo", partial(PPOScreen, job_defaults=job_defaults.get("ppo")))
        self.add_mode("drift", partial(DriftScreen, params=drift_params))
        self.add_mode("dpo", partial(DPOScreen, job_defaults=job_defaults.get("dpo")))

    # -- start-up

    async def on_event(self, event: events.Event) -> None:
        if isinstance(event, (events.Key, events.MouseDown)):
            self.model_host.input_pause.touched()
            if self._idle_gc is not None:
                self._idle_gc.touched()
        await super().on_event(event)

    def on_mount(self) -> None:
        if self._samples_added:
            self.notify(f"First run: loaded {self._samples_added} sample prompts", timeout=4)
        if self.model_state == "loading":
            self.model_host.load(self)

    @property
    def can_sample(self) -> bool:
        return self.model_host.ready

    # -- what the model host says

    def on_model_status(self, message: ModelStatus) -> None:
        self.model_status = message.text

    def on_model_loaded(self, message: ModelLoaded) -> None:
        if self._idle_gc is not None:
            freeze_long_lived()
            self.set_interval(EVERY_S, self._idle_gc.maybe_collect)
        self.policy_version = self.model_host.policy_version
        self.model_status = f"model ready in {message.seconds:.1f} s"
        self.model_state = "ready"
        if message.warning:
            self.notify(message.warning, severity="warning")
        self.notify(f"{self.model_status} ({message.stack.precision}, {message.stack.device.type})", timeout=3)

    def on_model_failed(self, message: ModelFailed) -> None:
        self.model_status = message.text
        self.model_state = "failed"

    def on_policy_switched(self, message: PolicySwitched) -> None:
        if message.version != self.policy_version:
            # Both change, one redraw: the version's watchers read best_of too.
            self.set_reactive(WorkbenchApp.best_of, message.best_of)
            self.policy_version = message.version
        else:
            self.best_of = message.best_of
        if not message.quiet:
            source = f"policy v{message.version}" + (" (base)" if not message.version else "")
            self.notify(f"sampling best-of-{message.best_of} of {source}, picked by the reward model"
                        if message.best_of else f"sampling from {source}")

    def on_agreement_measured(self, message: AgreementMeasured) -> None:
        self.agreement = message.text

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
        versions: list[tuple[tuple[int, int | None], str]] = [((0, None), "v0  base model (adapters off)")]
        for c in self.store.checkpoints("policy"):
            about = f"v{c.version}  saved {c.created_at[:16].replace('T', ' ')}"
            if c.job_id:
                about += f" by job {c.job_id}"
            versions.append(((c.version, None), about))
        reward = self.store.checkpoint("reward")
        if reward is not None:  # the baseline every trained version must beat
            versions += [((0, n), f"best-of-{n} of the base, picked by reward v{reward.version} "
                                  f"(KL ≤ {best_of_n_kl_bound(n):.2f} nats)") for n in OFFERED]

        def chosen(choice: tuple[int, int | None] | None) -> None:
            if choice is not None and choice != (self.policy_version, self.best_of):
                self.model_host.switch_policy(self, *choice)

        self.push_screen(VersionPicker(versions, (self.policy_version, self.best_of)), chosen)

    def action_export(self) -> None:
        self.push_screen(ExportDialog(Path.cwd()), self._export)

    def _export(self, request: ExportRequest | None) -> None:
        if request is not None:
            self.run_export(request)

    def action_import(self) -> None:
        def chosen(request: ImportRequest | None) -> None:
            if request is not None:
                self.run_import(request)

        self.push_screen(ImportDialog(), chosen)

    @work(thread=True, group="import", exit_on_error=False)
    def run_import(self, request: ImportRequest) -> None:
        """Import as `rlhf import` does, with its report; the prompts join the queue when asked."""
        from rlhf.exchange_import import import_file, import_summary, offer_for_labeling
        from rlhf.text_input import error_summary

        report = import_file(self.store, request.path)
        lines = [import_summary(report, request.path), *error_summary(report.errors)]
        if request.label_prompts:
            offered = offer_for_labeling(self.store, report)
            lines.append(f"{offered} of its {len(report.prompts)} prompts joined the labeling queue")
            self.call_from_thread(setattr, self, "prompts_added", self.prompts_added + offered)
        usable = report.added or report.duplicates
        self.call_from_thread(self.notify, "\n".join(lines), severity="information" if usable else "error",
                              timeout=10)

    @work(thread=True, group="export", exit_on_error=False)
    def run_export(self, request: ExportRequest) -> None:
        from rlhf.exchange_export import export_pairs, reimport_warning

        n = export_pairs(self.store, request.path, request.fmt, conversational=request.conversational)
        self.call_from_thread(self.notify, f"exported {n} pairs to {request.path} ({request.fmt})")
        warning = reimport_warning(request.path)
        if warning:
            self.call_from_thread(self.notify, warning, severity="warning", timeout=10)
