"""The drift screen: how far a policy version moved from the reference, and
whether a human still prefers it.

Side by side: for a probe prompt the reference (v0, the base) and the chosen
policy version answer; every token is shaded by its log-ratio
log pi - log pi_ref (green: the policy likes it more than the reference; red:
less), and each panel's title gives the summed log-ratio (for the policy's
answer, its sequence KL).

Blind: the same two answers in random order as A and B, with nothing saying
which is which and no shading (the colours would tell); keys 1 / 2 / t record
the pick (rlhf.drift, purpose 'drift'); the store knows which was which.

Below, the human win-rate of each version over the reference beside the reward
model's score for it; when the reward rises while the win-rate falls, a red
line says so: that is over-optimization.

The answers come from the model host (workbench/model_host.py), which loads
the chosen version into its own adapter and answers with a message; the store is
read in workers.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING, Any

from rich.style import Style
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import Button, Label, Select, Static, Switch
from textual.worker import Worker
from textual_plotext import PlotextPlot

from rlhf.sampling_params import SamplingParams
from workbench.messages import DriftAnswered
from workbench.screens.base import WorkbenchScreen

if TYPE_CHECKING:
    from rlhf.drift import BlindPair, DriftAnswer, DriftPair, VersionDrift

# How the probes are answered: short, and sampled as the policy samples.
DEFAULT_PARAMS = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=48)
# |log-ratio| at which the shading is full.
FULL_SHADE = 2.0
LEGEND = "shading: log π − log π_ref per token; green = the policy likes it more than the reference, red = less"


def shade(log_ratio: float) -> Style:
    """A background for one token: green for log pi > log pi_ref, red for below."""
    strength = min(abs(log_ratio) / FULL_SHADE, 1.0)
    low, high = 25, int(25 + 150 * strength)
    rgb = (low, high, low) if log_ratio > 0 else (high, low, low)
    return Style(bgcolor="#{:02x}{:02x}{:02x}".format(*rgb))


def shaded_text(answer: DriftAnswer) -> Text:
    """The answer with each token's background set by its log-ratio."""
    text = Text()
    for piece, log_ratio in zip(answer.pieces, answer.log_ratios):
        text.append(piece, style=shade(log_ratio))
    if answer.finish_reason == "length":
        text.append(" [cut at the length limit]", style="italic dim")
    return text


class DriftScreen(WorkbenchScreen):
    BINDINGS = [
        Binding("n", "next_probe", "Next probe", tooltip="Answer the next probe prompt with both models"),
        Binding("b", "toggle_blind", "Blind", tooltip="Blind labeling on/off"),
        Binding("1", "blind_pick(0)", "A better", tooltip="Blind: answer A is better"),
        Binding("2", "blind_pick(1)", "B better", tooltip="Blind: answer B is better"),
        Binding("t", "blind_pick(-1)", "Tie", tooltip="Blind: a tie (counts half a win)"),
    ]

    def __init__(self, params: SamplingParams | None = None) -> None:
        """``params``: how the probes are answered (tests make them tiny)."""
        super().__init__()
        self.params = params or DEFAULT_PARAMS
        self.version: int | None = None
        self.versions: list[int] = []
        self.blind = False
        self.probes: list[str] = []
        self.probe_index = -1
        self.pair: DriftPair | None = None
        self.blind_pair: BlindPair | None = None
        self.rows: list[VersionDrift] = []
        self.warnings: list[str] = []
        self.rng = random.Random()
        self.busy = False
        self._answering: Worker[None] | None = None
        self._recording: tuple[Worker[None], BlindPair] | None = None  # a blind label on its way to the store
        self.shown_at = 0.0  # when the blind pair appeared: labels record the seconds taken

    def compose_body(self) -> ComposeResult:
        yield Static("", id="drift-status", markup=False)
        with Horizontal(id="drift-controls"):
            yield Label("policy version", classes="drift-label")
            yield Select([], prompt="no trained version", id="drift-version")
            yield Label("blind", classes="drift-label")
            yield Switch(False, id="drift-blind")
            yield Button("Next probe", id="drift-next", variant="primary")
        yield Static("", id="drift-prompt", markup=False)
        with Horizontal(id="drift-answers"):
            yield Static("", id="drift-left", classes="drift-answer")
            yield Static("", id="drift-right", classes="drift-answer")
        yield Static("", id="drift-warning", markup=False)
        with Horizontal(id="drift-plots"):
            yield PlotextPlot(id="drift-winrate")
            yield PlotextPlot(id="drift-reward")

    def on_mount(self) -> None:
        from rlhf.drift import probe_prompts

        self.probes = probe_prompts()
        self._show()  # the empty panels say which key fills them
        self._status()
        self.refresh_table()

    def on_screen_resume(self) -> None:
        self.refresh_table()

    # -- the versions table (store read in a worker)

    @work(thread=True, exclusive=True, group="drift-table", exit_on_error=False)
    def refresh_table(self) -> None:
        from rlhf.drift import drift_table, over_optimization

        rows = drift_table(self.wb.store)
        self.app.call_from_thread(self._apply_table, rows, over_optimization(rows))

    def _apply_table(self, rows: list[VersionDrift], warnings: list[str]) -> None:
        self.rows, self.warnings = rows, warnings
        versions = [r.version for r in rows if r.version != 0]
        if versions != self.versions:
            self.versions = versions
            current = self.version if self.version in versions else (versions[-1] if versions else None)
            select = self.query_one("#drift-version", Select)
            select.set_options([(f"v{v}", v) for v in versions])
            if current is not None:
                select.value = current
            self.version = current
        self.query_one("#drift-warning", Static).update("\n".join(f"⚠ {w}" for w in warnings))
        self._draw()
        self._status()

    def _draw(self) -> None:
        labeled = [r for r in self.rows if r.version != 0 and r.win_rate is not None]
        widget = self.query_one("#drift-winrate", PlotextPlot)
        plt = widget.plt
        plt.clear_data()
        plt.title("human win-rate vs reference (tie = ½)")
        plt.xlabel("policy version")
        plt.ylim(0.0, 1.0)
        if labeled:
            xs = [r.version for r in labeled]
            plt.plot(xs, [r.win_rate for r in labeled], marker="braille", label="win-rate")
            plt.scatter(xs, [r.win_rate for r in labeled], marker="●")
            plt.horizontal_line(0.5, color="gray")
            plt.xticks(xs)
        widget.refresh()
        scored = [r for r in self.rows if r.reward is not None]
        widget = self.query_one("#drift-reward", PlotextPlot)
        plt = widget.plt
        plt.clear_data()
        plt.title("reward-model score (PPO rollouts)")
        plt.xlabel("policy version")
        if scored:
            xs = [r.version for r in scored]
            plt.plot(xs, [r.reward for r in scored], marker="braille")
            plt.scatter(xs, [r.reward for r in scored], marker="●")
            plt.xticks(xs)
        widget.refresh()

    def _status(self) -> None:
        labeled = sum(r.labels for r in self.rows)
        if not [r for r in self.rows if r.version != 0]:
            text = "No trained policy yet: run a PPO session first. Probe prompts: sample_prompts/probes.txt."
        elif self.blind:
            text = (f"Blind: which answer is better? 1 = A, 2 = B, t = tie. Order is random; {labeled} drift "
                    "labels so far. n skips to the next probe.")
        else:
            text = f"Reference (v0) and policy v{self.version} side by side. n: next probe; b: blind labeling. {LEGEND}"
        if self.busy:
            text = "answering… " + text
        self.query_one("#drift-status", Static).update(text)

    # -- answers (asked of the model host)

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "drift-version" and isinstance(event.value, int):
            self.version = event.value

    def on_switch_changed(self, event: Switch.Changed) -> None:
        if event.switch.id == "drift-blind" and event.value != self.blind:
            self.action_toggle_blind()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "drift-next":
            self.action_next_probe()

    def action_toggle_blind(self) -> None:
        self.blind = not self.blind
        self.query_one("#drift-blind", Switch).value = self.blind
        self.blind_pair = None
        self._show()
        self._status()

    def action_next_probe(self) -> None:
        if self.busy:
            return
        if self.version is None:
            self.notify("no trained policy version to compare: run PPO first", severity="warning")
            return
        if self.wb.model_host.stack is None:
            self.notify("the model is still loading", severity="warning")
            return
        self.probe_index = (self.probe_index + 1) % len(self.probes)
        self.busy = True
        self._status()
        self._answering = self.wb.model_host.drift_pair(self, self.version, self.probes[self.probe_index], self.params,
                                                        blind_rng=self.rng if self.blind else None)

    def on_drift_answered(self, message: DriftAnswered) -> None:
        self.pair, self.blind_pair = message.pair, message.blind
        self._answered()

    def worker_failed(self, worker: Worker[Any]) -> None:
        # The failure is reported; the screen takes keys again.
        if worker is self._answering:
            self._answered()
        elif self._recording is not None and worker is self._recording[0]:
            self.blind_pair = self._recording[1]  # not recorded: the same pair can be labeled again

    def _answered(self) -> None:
        self.busy = False
        self._show()
        self._status()

    def _show(self) -> None:
        left, right = self.query_one("#drift-left", Static), self.query_one("#drift-right", Static)
        pair = self.pair
        if pair is None:
            left.update(Text("n: answer the first probe prompt", style="dim")), right.update("")
            left.border_title = right.border_title = None
            self.query_one("#drift-prompt", Static).update("")
            return
        self.query_one("#drift-prompt", Static).update(
            f"probe {self.probe_index + 1}/{len(self.probes)}: {pair.prompt}")
        if self.blind:
            if self.blind_pair is None:
                left.update(Text("n: answer this probe blind", style="dim")), right.update("")
                left.border_title = right.border_title = None
                return
            a, b = self.blind_pair.answers
            self.shown_at = time.monotonic()
            left.update(Text(a.text or "(empty)")), right.update(Text(b.text or "(empty)"))
            left.border_title, right.border_title = "A", "B"
            return
        left.update(shaded_text(pair.reference))
        right.update(shaded_text(pair.policy))
        left.border_title = f"reference (v0) · Σ log-ratio {pair.reference.log_ratio_sum:+.2f}"
        right.border_title = f"policy v{pair.policy.policy_version} · KL ≈ {pair.kl:.2f} nats"

    # -- blind labels

    def action_blind_pick(self, position: int) -> None:
        if not self.blind or self.blind_pair is None:
            self.notify("blind labeling is off: b turns it on, n answers a probe", severity="warning")
            return
        blind, self.blind_pair = self.blind_pair, None  # one label per pair, however fast the keys
        worker = self._record(blind, None if position < 0 else position, time.monotonic() - self.shown_at)
        self._recording = (worker, blind)

    @work(thread=True, group="drift-label", exit_on_error=False)
    def _record(self, blind: BlindPair, winner: int | None, seconds: float) -> None:
        from rlhf.drift import label_blind_pair

        label_blind_pair(self.wb.store, blind, winner, labeler=self.wb.labeler, seconds=seconds)
        self.app.call_from_thread(self.notify, "recorded" + (" a tie" if winner is None else ""))
        self.app.call_from_thread(self.refresh_table)
        self.app.call_from_thread(self.action_next_probe)
