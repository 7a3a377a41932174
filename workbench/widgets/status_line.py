"""The progress line under the header: how far labeling has come, which policy
version is sampled, and how often the reward model agrees with the labeler."""

from __future__ import annotations

from rich.text import Text
from textual.reactive import reactive
from textual.widgets import Static


class StatusLine(Static):
    labeled: reactive[int] = reactive(0)
    total: reactive[int] = reactive(0)
    pairs: reactive[int] = reactive(0)
    policy_version: reactive[int] = reactive(0)
    best_of: reactive[int | None] = reactive(None)
    # Filled by the reward model once one exists: "71% of 120 labels", say.
    agreement: reactive[str | None] = reactive(None)
    # The labeler against their earlier self on repeated comparisons (rlhf.consistency), once there are some.
    self_agreement: reactive[str] = reactive("—")
    mode: reactive[str] = reactive("pick best")
    next_state: reactive[str] = reactive("")
    order: reactive[str] = reactive("")   # which prompt comes next, where not as added

    def render(self) -> Text:
        sep = ("  │  ", "dim")
        parts: list[tuple[str, str] | str] = [
            ("labeled ", "dim"), (f"{self.labeled}/{self.total}", "bold"), sep,
            ("remaining ", "dim"), (f"{self.total - self.labeled}", "bold"), sep,
            ("pairs ", "dim"), (f"{self.pairs}", "bold"), sep,
            ("policy ", "dim"), ((f"best-of-{self.best_of} of " if self.best_of else "") + f"v{self.policy_version}"
                                 + (" (base)" if self.policy_version == 0 else ""), "bold"), sep,
            ("RM agrees ", "dim"), (self.agreement or "—", "bold" if self.agreement else "dim"), sep,
            *([("you agree with you ", "dim"), (self.self_agreement, "bold"), sep] if self.self_agreement != "—"
              else []),
            ("mode ", "dim"), (self.mode, "bold"),
        ]
        if self.order:
            parts += [sep, ("order ", "dim"), (self.order, "bold")]
        if self.next_state:
            parts += [sep, ("next ", "dim"), (self.next_state, "")]
        return Text.assemble(*parts)
