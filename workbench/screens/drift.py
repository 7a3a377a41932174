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

Besides the trained versions, best-of-N of the reference (N samples, the one the
latest reward model rates highest) answers and is labeled blind the same way:
the baseline every trained policy must beat, at a KL of at most log N - (N-1)/N.

Below, one chart for every contender of every method (PPO, RLOO, DPO,
best-of-N): its human win-rate over the reference (with its 95% interval)
against its KL to the reference, beside the reward model's score against KL (the
frontier of Gao et al. 2022 with the human in place of the gold model). The
table beside them lists the contenders; the highlighted row is marked on both
charts and named with its method and settings above them, and enter picks it to
answer the probes. When the reward rises while the win-rate falls, a red line
says so: that is over-optimization.

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
from textual.widgets import Button, DataTable, Label, Select, Static, Switch
from textual.worker import Worker
from textual_plotext import PlotextPlot

from rlhf.best_of import OFFERED
from rlhf.drift import Contender
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
# How each method's points look on the charts; the highlighted contender is drawn over them.
MARKERS = {"ppo": "●", "rloo": "▲", "dpo": "■", "best-of-n": "◆"}
HIGHLIGHT = "◉"
TABLE_COLUMNS = ("contender", "method", "KL", "win-rate", "RM")


def chart_groups(rows: list[VersionDrift], value: str) -> dict[str, list[VersionDrift]]:
    """The contenders a chart draws, by method: those with a KL and ``value``
    ('win_rate' or 'reward'); the reference is the origin, not a point."""
    groups: dict[str, list[VersionDrift]] = {}
    for row in rows:
        if not row.is_reference and row.kl is not None and getattr(row, value) is not None:
            groups.setdefault(row.method or "policy", []).append(row)
    return groups


def win_rate_text(row: VersionDrift, *, interval: bool = False) -> str:
    """'0.75 (4)': the win-rate and its label count; with ``interval``, its 95% interval too."""
    bounds = row.interval()
    if bounds is None:
        return "-"
    text = f"{row.win_rate:.2f} ({row.labels})"
    return text[:-1] + f" labels, 95% CI {bounds[0]:.2f}-{bounds[1]:.2f})" if interval else text


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
        self.target: Contender | None = None        # what answers the probes beside the reference
        self.targets: list[Contender] = []
        self.highlighted: Contender | None = None   # the table's row, marked on the charts
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
            yield Label("answering", classes="drift-label")
            yield Select([], prompt="no trained version", id="drift-version")
            yield Label("blind", classes="drift-label")
            yield Switch(False, id="drift-blind")
            yield Button("Next probe", id="drift-next", variant="primary")
        yield Static("", id="drift-prompt", markup=False)
        with Horizontal(id="drift-answers"):
            yield Static("", id="drift-left", classes="drift-answer")
            yield Static("", id="drift-right", classes="drift-answer")
        yield Static("", id="drift-warning", markup=False)
        yield Static("", id="drift-selected", markup=False)
        with Horizontal(id="drift-plots"):
            yield PlotextPlot(id="drift-winrate")
            yield PlotextPlot(id="drift-reward")
            yield DataTable(id="drift-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        from rlhf.drift import probe_prompts

        self.query_one("#drift-table", DataTable).add_columns(*TABLE_COLUMNS)
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

        store = self.wb.store
        rows = drift_table(store)
        reward = store.checkpoint("reward")
        self.app.call_from_thread(self._apply_table, rows, over_optimization(rows),
                                  reward.version if reward else None)

    def _apply_table(self, rows: list[VersionDrift], warnings: list[str], reward_version: int | None) -> None:
        self.rows, self.warnings = rows, warnings
        targets = [Contender(r.version) for r in rows if not r.is_reference and not r.best_of]
        if targets and reward_version is not None:  # best-of-N needs a reward model to pick
            targets += [Contender(0, n, reward_version) for n in OFFERED]
        if targets != self.targets:
            self.targets = targets
            plain = [t for t in targets if not t.best_of]
            current = self.target if self.target in targets else (plain[-1] if plain else None)
            select = self.query_one("#drift-version", Select)
            select.set_options([(t.name, t) for t in targets])
            if current is not None:
                select.value = current
            self.target = current
        self.query_one("#drift-warning", Static).update("\n".join(f"⚠ {w}" for w in warnings))
        self._fill_table()
        self._draw()
        self._status()

    def _fill_table(self) -> None:
        table = self.query_one("#drift-table", DataTable)
        shown = [r for r in self.rows if not r.is_reference]
        keep = self.highlighted
        table.clear()
        for row in shown:
            table.add_row(row.name, row.method or "-", "-" if row.kl is None else f"{row.kl:.2f}",
                          win_rate_text(row), "-" if row.reward is None else f"{row.reward:.2f}",
                          key=row.name)
        names = [r.name for r in shown]
        if keep is not None and keep.name in names:
            table.move_cursor(row=names.index(keep.name))
        self._describe()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        row = self._row_named(event.row_key.value)
        if row is not None and row.contender != self.highlighted:
            self.highlighted = row.contender
            self._describe()
            self._draw()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        row = self._row_named(event.row_key.value)
        if row is not None and row.contender in self.targets:
            self.query_one("#drift-version", Select).value = row.contender

    def _row_named(self, name: str | None) -> VersionDrift | None:
        return next((r for r in self.rows if r.name == name), None)

    def _describe(self) -> None:
        """Name the highlighted contender: method, settings, and what its KL was measured on."""
        row = next((r for r in self.rows if r.contender == self.highlighted), None)
        text = ""
        if row is not None:
            parts = [row.method or "policy"] + ([row.settings] if row.settings else [])
            if row.kl is not None:
                parts.append(f"KL {row.kl:.2f} nats on {row.kl_source}")
            elif row.kl_source:
                parts.append(f"KL {row.kl_source}")
            parts.append("win-rate " + (win_rate_text(row, interval=True) if row.labels
                                        else "not labeled yet: b, then n"))
            text = f"{row.name}: " + " · ".join(parts)
        self.query_one("#drift-selected", Static).update(text)

    def _draw(self) -> None:
        """Win-rate against KL and reward score against KL, a series per method;
        the reference at the origin of drift, the highlighted contender ringed."""
        for plot_id, title, value in (("#drift-winrate", "human win-rate", "win_rate"),
                                      ("#drift-reward", "RM score", "reward")):
            widget = self.query_one(plot_id, PlotextPlot)
            plt = widget.plt
            plt.clear_data()
            groups = chart_groups(self.rows, value)
            key = " ".join(f"{MARKERS.get(m, '●')}{m}" for m in groups)  # a legend would cover points
            plt.title(f"{title}  {key}" if key else title)
            plt.xlabel("KL to the reference (nats/answer)")
            reference = next((r for r in self.rows if r.is_reference), None)
            if value == "win_rate":
                plt.ylim(0.0, 1.0)
                plt.horizontal_line(0.5, color="gray")
                origin = 0.5 if groups else None  # a tie with itself
            else:
                origin = reference.reward if reference is not None else None
            if origin is not None and groups:
                plt.scatter([0.0], [origin], marker="○", color="gray")
            for method, rows in groups.items():
                plt.scatter([r.kl for r in rows], [getattr(r, value) for r in rows], marker=MARKERS.get(method, "●"))
            picked = [r for rows in groups.values() for r in rows if r.contender == self.highlighted]
            if picked:
                plt.scatter([picked[0].kl], [getattr(picked[0], value)], marker=HIGHLIGHT, color="red")
            widget.refresh()

    def _status(self) -> None:
        labeled = sum(r.labels for r in self.rows)
        if not [r for r in self.rows if not r.is_reference and not r.best_of]:
            text = "No trained policy yet: run a PPO session first. Probe prompts: sample_prompts/probes.txt."
        elif self.blind:
            text = (f"Blind: which answer is better? 1 = A, 2 = B, t = tie. Order is random; {labeled} drift "
                    "labels so far. n skips to the next probe.")
        else:
            target = self.target
            name = "?" if target is None else target.name if target.best_of else f"policy {target.name}"
            text = f"Reference (v0) and {name} side by side. n: next probe; b: blind labeling. {LEGEND}"
        if self.busy:
            text = "answering… " + text
        self.query_one("#drift-status", Static).update(text)

    # -- answers (asked of the model host)

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "drift-version" and isinstance(event.value, Contender):
            self.target = event.value
            self._status()

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
        if self.target is None:
            self.notify("no trained policy version to compare: run PPO or DPO first", severity="warning")
            return
        if self.wb.model_host.stack is None:
            self.notify("the model is still loading", severity="warning")
            return
        self.probe_index = (self.probe_index + 1) % len(self.probes)
        self.busy = True
        self._status()
        self._answering = self.wb.model_host.drift_pair(self, self.target, self.probes[self.probe_index], self.params,
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
        if pair.policy.best_of:
            right.border_title = (f"best-of-{pair.policy.best_of} of the reference (reward v"
                                  f"{pair.policy.reward_version}) · KL ≤ {pair.kl:.2f} nats")
        else:
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
