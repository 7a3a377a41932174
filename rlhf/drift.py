"""Policy drift: how far a policy version moved from the reference, and whether a
human still prefers it.

- For probe prompts, the reference (the base, policy version 0) and a policy
  version answer side by side; each token carries its log-ratio
  log pi(x_t) - log pi_ref(x_t) (teacher-forced under both, at the sampling
  temperature), and the policy answer's summed log-ratio is a one-sample estimate
  of the sequence KL(pi || pi_ref).
- Blind labeling: the two answers are stored as completions with their policy
  version and shown in random order; the label goes in with purpose 'drift', so
  the store knows which was which while the labeler does not.
- The human win-rate of each version over the reference, beside the reward
  model's mean score for that version: reward rising while the win-rate falls is
  over-optimization (DESIGN.md), and ``over_optimization`` says so in words.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rlhf.best_of import best_of_n_kl_bound, pick_best
from rlhf.errors import UserError
from rlhf.preferences import record_label
from rlhf.stats import wilson_interval
from rlhf.store import PROBE_SOURCE, Store

PURPOSE = "drift"
DRIFT_ADAPTER = "drift"   # the policy version under view, apart from the app's 'policy'
REFERENCE_VERSION = 0
# Kinds of drift label that count as a tie (half a win each); 'skip' counts nothing.
TIE_KINDS = ("tie", "all_bad")


def probe_prompts() -> list[str]:
    """The fixed probe prompts shipped in sample_prompts/probes.txt."""
    from rlhf.prompts import bundled_prompt_file, read_prompt_file

    return read_prompt_file(bundled_prompt_file("probes.txt")).prompts


# --- answers with per-token log-ratios ----------------------------------------------


@dataclass
class DriftAnswer:
    """One answer and, per token, its text piece and log pi - log pi_ref."""

    policy_version: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    pieces: list[str] = field(default_factory=list)
    log_ratios: list[float] = field(default_factory=list)
    best_of: int | None = None          # picked by reward model ``reward_version`` among this many samples
    reward_version: int | None = None

    @property
    def log_ratio_sum(self) -> float:
        """Summed log-ratio. For the policy's own sample this estimates
        KL(pi || pi_ref) of the sequence; for the reference's, -KL(pi_ref || pi)."""
        return float(sum(self.log_ratios))


@dataclass
class DriftPair:
    prompt: str
    reference: DriftAnswer
    policy: DriftAnswer

    @property
    def kl(self) -> float:
        """The policy answer's sequence KL estimate; for best-of-N, its bound."""
        if self.policy.best_of:
            return best_of_n_kl_bound(self.policy.best_of)
        return self.policy.log_ratio_sum


def load_drift_version(stack: Any, store: Store, version: int) -> None:
    """Load policy ``version`` into its own adapter (``DRIFT_ADAPTER``), so the
    policy the app samples from and its value head stay as they are. Its
    reference is the base ('base' role, version 0): the drift view measures from
    where the whole loop started."""
    if version == REFERENCE_VERSION:
        raise UserError("policy version 0 is the reference itself: pick a trained version (`rlhf stats` lists them)")
    checkpoint = store.checkpoint("policy", version)
    assert checkpoint is not None
    stack.load_adapter(DRIFT_ADAPTER, checkpoint.path, heads=False)
    stack.drift_version = version


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text each token adds (decoding prefixes, so multi-byte characters and
    leading spaces come out as the reader sees them)."""
    pieces, before = [], ""
    for i in range(len(ids)):
        now = tokenizer.decode(list(ids[:i + 1]), skip_special_tokens=True)
        pieces.append(now[len(before):] if now.startswith(before) else now)
        before = now
    return pieces


def answer_pair(stack: Any, prompt: str, params: Any) -> DriftPair:
    """The reference (base) and the version loaded by ``load_drift_version``
    answer ``prompt``; each answer's tokens get their log-ratio. ``params`` is a
    ``rlhf.sampling.SamplingParams``."""
    from rlhf.chat import chat_prompt_ids
    from rlhf.sampling import generate
    from rlhf.tokens import teacher_forced_logprobs

    version = getattr(stack, "drift_version", None)
    if version is None:
        raise UserError("no policy version loaded for the drift view: pick one first")
    prompt_ids = chat_prompt_ids(stack.tokenizer, prompt)
    # The role the sampling copy holds answers first: one merge a pair, not two.
    answer = {role: generate(stack, [prompt_ids], params, role=role)[0]
              for role in stack.sampling_order(["base", DRIFT_ADAPTER])}
    ref, pol = answer["base"], answer[DRIFT_ADAPTER]
    rows = [ref.token_ids or [stack.tokenizer.eos_token_id], pol.token_ids or [stack.tokenizer.eos_token_id]]
    under_policy = teacher_forced_logprobs(stack, DRIFT_ADAPTER, prompt_ids, rows, params.temperature)
    under_ref = teacher_forced_logprobs(stack, "base", prompt_ids, rows, params.temperature)
    answers = []
    for i, (sample, answer_version) in enumerate(((ref, REFERENCE_VERSION), (pol, version))):
        n = len(sample.token_ids)
        answers.append(DriftAnswer(
            policy_version=answer_version, text=sample.text, token_ids=sample.token_ids, logprobs=sample.logprobs,
            finish_reason=sample.finish_reason, pieces=token_pieces(stack.tokenizer, sample.token_ids),
            log_ratios=[p - r for p, r in zip(under_policy[i][:n], under_ref[i][:n])]))
    return DriftPair(prompt, answers[0], answers[1])


def answer_best_of_pair(stack: Any, scorer: Any, prompt: str, params: Any, n: int) -> DriftPair:
    """The reference answers ``prompt`` once, and best-of-``n`` answers it: ``n``
    samples of the reference, the one ``scorer`` (a RewardScorer) rates highest.
    Best-of-N is the reference reweighted, so every token's log-ratio is 0 and
    its drift is the bound log n - (n-1)/n."""
    from rlhf.chat import chat_prompt_ids
    from rlhf.sampling import generate

    if n < 2:
        raise UserError(f"best-of-{n} is the reference itself: pick N of at least 2")
    prompt_ids = chat_prompt_ids(stack.tokenizer, prompt)
    samples = generate(stack, [prompt_ids] * (n + 1), params, role="base")
    reference, [best] = samples[0], pick_best(scorer, prompt_ids, samples[1:], n)
    reward_version = getattr(scorer, "version", None)

    def answer(sample: Any, best_of: int | None) -> DriftAnswer:
        return DriftAnswer(policy_version=REFERENCE_VERSION, text=sample.text, token_ids=sample.token_ids,
                           logprobs=sample.logprobs, finish_reason=sample.finish_reason,
                           pieces=token_pieces(stack.tokenizer, sample.token_ids),
                           log_ratios=[0.0] * len(sample.token_ids), best_of=best_of,
                           reward_version=reward_version if best_of else None)

    return DriftPair(prompt, answer(reference, None), answer(best, n))


# --- blind labels --------------------------------------------------------------------


@dataclass
class BlindPair:
    """Two stored answers in the order shown; which is which is in the store only."""

    prompt_id: int
    prompt: str
    completion_ids: list[int]
    answers: list[DriftAnswer]   # shown order; the screen must not show their versions


def store_blind_pair(store: Store, pair: DriftPair, params: Any, rng: random.Random | None = None) -> BlindPair:
    """Record both answers as completions (with their policy versions) and return
    them in a random order for blind labeling."""
    prompt_id = store.add_prompt(pair.prompt, source=PROBE_SOURCE)
    answers = [pair.reference, pair.policy]
    (rng or random.Random()).shuffle(answers)
    rows = [{"text": a.text, "token_ids": a.token_ids, "n_tokens": len(a.token_ids),
             "finish_reason": a.finish_reason, "policy_version": a.policy_version,
             "temperature": params.temperature, "top_p": params.top_p,
             "max_new_tokens": params.max_new_tokens, "logprobs": a.logprobs,
             "best_of": a.best_of, "reward_version": a.reward_version} for a in answers]
    ids = store.add_completions(prompt_id, rows)
    return BlindPair(prompt_id, pair.prompt, ids, answers)


def label_blind_pair(store: Store, blind: BlindPair, winner: int | None, *, labeler: str | None = None,
                     seconds: float | None = None) -> int:
    """Record the labeler's pick: position 0 or 1 as shown, or None for a tie."""
    if winner is None:
        return record_label(store, blind.prompt_id, blind.completion_ids, "tie", None,
                            labeler=labeler, seconds=seconds, purpose=PURPOSE)
    return record_label(store, blind.prompt_id, blind.completion_ids, "best", [winner],
                        labeler=labeler, seconds=seconds, purpose=PURPOSE)


# --- win-rates and the reward beside them -------------------------------------------


@dataclass(frozen=True)
class Contender:
    """What answers against the reference in the drift view: a policy version, or
    best-of-N of the reference picked by a reward model (the baseline every trained
    policy must beat)."""

    version: int
    best_of: int | None = None
    reward_version: int | None = None

    @property
    def name(self) -> str:
        if self.best_of:
            return f"best-of-{self.best_of} (reward v{self.reward_version})"
        return f"v{self.version}"


@dataclass
class VersionDrift:
    """One contender against the reference: human labels, KL and reward score, and
    what made it."""

    version: int
    wins: int = 0
    losses: int = 0
    ties: int = 0
    reward: float | None = None   # mean reward-model score of rollouts sampled from it
    kl: float | None = None       # KL to the reference, nats per answer (see kl_source)
    best_of: int | None = None
    reward_version: int | None = None
    method: str = ""              # 'ppo', 'rloo', 'dpo', 'best-of-n'; '' for the reference
    settings: str = ""            # what made it, in a few words
    kl_source: str = ""           # what ``kl`` was measured on

    @property
    def contender(self) -> Contender:
        return Contender(self.version, self.best_of, self.reward_version)

    @property
    def name(self) -> str:
        return self.contender.name

    @property
    def is_reference(self) -> bool:
        return self.version == REFERENCE_VERSION and not self.best_of

    @property
    def labels(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def win_rate(self) -> float | None:
        """(wins + ties / 2) / labels: a tie counts half a win."""
        return (self.wins + 0.5 * self.ties) / self.labels if self.labels else None

    def interval(self) -> tuple[float, float] | None:
        """The win-rate's 95% Wilson interval (ties as half a win)."""
        return wilson_interval(self.wins + 0.5 * self.ties, self.labels) if self.labels else None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "best_of": self.best_of,
                "reward_version": self.reward_version, "method": self.method, "settings": self.settings,
                "wins": self.wins, "losses": self.losses, "ties": self.ties, "labels": self.labels,
                "win_rate": self.win_rate, "interval": self.interval(), "reward": self.reward, "kl": self.kl,
                "kl_source": self.kl_source}


def win_counts(store: Store) -> dict[Contender, VersionDrift]:
    """Wins, losses and ties of each contender against the reference, from the
    blind drift labels. Labels of 'skip' kind count nothing."""
    out: dict[Contender, VersionDrift] = {}
    for cmp in store.comparisons(purpose=PURPOSE):
        completions = store.completions(cmp.completion_ids)
        contenders = [Contender(c.policy_version, c.best_of, c.reward_version) if c.policy_version is not None
                      else None for c in completions]
        reference = Contender(REFERENCE_VERSION)
        if len(contenders) != 2 or contenders.count(reference) != 1 or None in contenders:
            continue  # not a contender-vs-reference pair
        policy_pos = 0 if contenders[0] != reference else 1
        c = contenders[policy_pos]
        assert c is not None
        row = out.setdefault(c, VersionDrift(c.version, best_of=c.best_of, reward_version=c.reward_version))
        if cmp.kind == "best" and cmp.choice:
            if cmp.choice[0] == policy_pos:
                row.wins += 1
            else:
                row.losses += 1
        elif cmp.kind in TIE_KINDS:
            row.ties += 1
    return out


def reward_by_version(store: Store) -> dict[int, tuple[float, float, int]]:
    """(mean score, mean KL, the version that KL was measured against) of the PPO
    rollout batch sampled from each version.

    A checkpoint's meta holds the score of the batch that trained it, which was
    sampled from its parent; so the parent's score is read there. The newest
    version has no batch of its own until a session continues from it. Scores of
    versions trained under different reward models are not comparable."""
    out: dict[int, tuple[float, float, int]] = {}
    for cp in store.checkpoints("policy"):
        meta, parent = cp.meta, cp.parent_version
        if parent is not None and "rollout_score" in meta:
            out[parent] = (float(meta["rollout_score"]), float(meta.get("kl", 0.0)),
                           int(meta.get("reference_version") or REFERENCE_VERSION))
    return out


def made_by(meta: dict[str, Any]) -> tuple[str, str]:
    """(method, settings in a few words) of a policy version, from its meta."""
    config = meta.get("config") or {}
    method = meta.get("method") or config.get("algorithm") or ""
    parts = [f"β {config['beta']:g}"] if "beta" in config else []
    if "learning_rate" in config:
        parts.append(f"lr {config['learning_rate']:g}")
    if meta.get("job_id") is not None:
        step = "epoch" if method == "dpo" else "iteration"
        parts.append(f"job {meta['job_id']} {step} {meta.get('iteration', '?')}")
    return method, ", ".join(parts)


def drift_table(store: Store) -> list[VersionDrift]:
    """Every policy version (0 = reference included) with its labels, KL and
    reward, then each best-of-N that has drift labels.

    A version's KL is that of the rollouts sampled from it where a session
    continued from it; else what its job measured on the version itself (DPO,
    after each epoch); else the KL of the batch it was trained on (sampled from
    its parent: one step short). Only a KL to the base counts: a session started
    from a trained version measured its KL to that one, which the chart cannot
    set beside the others. Best-of-N's is its bound."""
    counts = win_counts(store)
    rewards = reward_by_version(store)
    checkpoints = {cp.version: cp for cp in store.checkpoints("policy")}
    versions = sorted({REFERENCE_VERSION, *checkpoints, *(c.version for c in counts if not c.best_of)})
    rows = []
    for v in versions:
        row = counts.get(Contender(v), VersionDrift(v))
        meta = checkpoints[v].meta if v in checkpoints else {}
        row.method, row.settings = made_by(meta)
        if v == REFERENCE_VERSION:
            row.kl, row.kl_source = 0.0, "the reference"
        measured = []  # (KL, against which version, on what), best first
        if v in rewards:
            row.reward, kl, against = rewards[v]
            measured.append((kl, against, "rollouts sampled from it"))
        if meta.get("kl") is not None:
            measured.append((float(meta["kl"]), int(meta.get("reference_version") or REFERENCE_VERSION),
                             "answers sampled after its epoch" if meta.get("method") else
                             "the batch it was trained on (sampled from its parent)"))
        to_base = [m for m in measured if m[1] == REFERENCE_VERSION]
        if to_base:
            row.kl, _, row.kl_source = to_base[0]
        elif measured:
            row.kl_source = f"not to the base: its session measured KL to v{measured[0][1]}"
        rows.append(row)
    for contender, row in sorted(counts.items(), key=lambda item: (item[0].best_of or 0, item[0].reward_version or 0)):
        if contender.best_of:
            row.method, row.settings = "best-of-n", f"reward v{contender.reward_version} picks among the reference's"
            row.kl, row.kl_source = best_of_n_kl_bound(contender.best_of), "the bound log N - (N-1)/N"
            rows.append(row)
    return rows


def over_optimization(rows: Sequence[VersionDrift], margin: float = 0.1, min_labels: int = 3) -> list[str]:
    """Warnings, in words, when the reward model and the human disagree:

    - a later version scores higher with the reward model than the version humans
      liked best, yet wins less often against the reference (by > ``margin``);
    - a version the reward model ranks above the reference loses to it (< 0.5).
    Only versions with at least ``min_labels`` labels are judged."""
    judged = [r for r in rows if not r.best_of and not r.is_reference and r.labels >= min_labels]
    warnings: list[str] = []
    if not judged:
        return warnings
    best = max(judged, key=lambda r: (r.win_rate or 0.0, -r.version))
    for r in judged:
        if (r.version > best.version and r.reward is not None and best.reward is not None
                and r.reward > best.reward and (r.win_rate or 0.0) < (best.win_rate or 0.0) - margin):
            warnings.append(
                f"over-optimization: reward rose from {best.reward:.2f} (v{best.version}) to {r.reward:.2f} "
                f"(v{r.version}) while the human win-rate fell from {best.win_rate:.0%} to {r.win_rate:.0%}: "
                f"go back to v{best.version}, raise beta, or label more and retrain the reward model")
    ref_reward = next((r.reward for r in rows if r.is_reference), None)
    for r in judged:
        if (r.win_rate is not None and r.win_rate < 0.5 and r.reward is not None and ref_reward is not None
                and r.reward > ref_reward):
            warnings.append(
                f"v{r.version} loses to the reference ({r.win_rate:.0%} win-rate over {r.labels} labels) though "
                f"the reward model scores it higher ({r.reward:.2f} vs {ref_reward:.2f}): the reward model is "
                "being exploited")
    return warnings
