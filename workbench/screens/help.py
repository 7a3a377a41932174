"""The help screen: every key of the labeling screen and what a label records."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# Labeling

Read the prompt, read the {k} completions, and say which is best.
The columns are shuffled for every prompt, so that position tells you nothing.

| Key | What it does |
|-----|--------------|
| `1`..`{k}` | pick the best completion: records it over each of the other {k_1} ({k_1} pairs) |
| click | the same as its number |
| `=` | several share the top: `=`, their numbers, `=` again; each over each of the rest |
| `m` | ranking mode on/off: press numbers best to worst; after {k_1} the last is implied, {pairs} pairs |
| `escape` | clear a half-entered ranking |
| `t` | tie (all equal): kept in the store, no pairs |
| `b` | all bad: kept, no pairs |
| `s` | skip: kept, no pairs; the prompt counts as done |
| `u` | undo the last label (it and its pairs, nothing else) and go back to it |
| `r` | resample this prompt (new completions; the old ones stay in the store) |
| `n` / `p` | next / previous prompt |
| `o` | what comes next: as added, uncertain (the set whose label would tell the reward model most), random |
| `a` / `e` | add a prompt / edit this one (an edited prompt is resampled) |
| `v` | choose the policy version completions are sampled from |
| `x` | export the recorded pairs (TRL JSONL, Parquet, or a datasets folder) |
| `i` | import preference pairs (TRL JSONL or Parquet, a datasets folder, HH-RLHF); its prompts join the queue if you tick the box |
| `l` | show or hide the prompt list |
| `g` | label every comparison waiting for a label by a rule (a scripted labeler with a known taste, recorded as `rule:NAME`): check the whole loop before labeling by hand |
| `f1`, `f2`, ... | switch between the workbench's screens (see the footer) |
| `ctrl+p` | command palette: every action by name |
| `?` | this help |
| `ctrl+q` | quit (every label is already on disk) |

Each label records the completions in the order shown, the answer, the labeler
and the seconds from when the completions appeared to the key press.
A completion marked **CUT** stopped at the length limit without an end-of-turn token.

The next prompt's completions are sampled while you read this one. Now and then
a comparison you labeled comes back, reshuffled: the header shows how often you
agree with your earlier self, beside how often the reward model agrees with you.

*Press escape or ? to close.*
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close", show=False),
        Binding("q", "dismiss", "Close", show=False),
    ]

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help-body"):
            yield Markdown(HELP.format(k=self.k, k_1=self.k - 1, pairs=self.k * (self.k - 1) // 2))

    def action_dismiss(self) -> None:  # type: ignore[override]
        self.dismiss(None)
