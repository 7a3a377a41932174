"""Preference data for the reward model: store pairs -> batch elements of token ids.

A batch element is one labeled comparison: the completions shown for one prompt,
each tokenized once, and the (chosen, rejected) pairs the label implies. A full
ranking of K gives all C(K,2) pairs as ONE element, so a training step reads each
completion once and the prompt's pairs are not spread over steps as correlated
samples (InstructGPT, section 3.5). An imported pair is an element of two.

The held-out split is by prompt: a deterministic hash of the prompt text decides,
so every pair of one prompt lands on the same side, and the split stays the same
as labels are added.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rlhf.chat import chat_prompt_ids
from rlhf.errors import UserError
from rlhf.reward_config import SOURCES
from rlhf.store import Store


@dataclass
class Element:
    """One batch element: the completions of one comparison and its pairs."""

    prompt: str
    sequences: list[list[int]]          # prompt ids + completion ids, ending in EOS
    pairs: list[tuple[int, int]]        # (chosen, rejected) as indices into sequences
    kind: str = "pair"                  # 'best' | 'ranking' | 'pair' (imported or lone)
    pair_ids: list[int] = field(default_factory=list)  # store pair ids, for reports
    completion_ids: list[int] = field(default_factory=list)  # store ids, one per sequence
    lengths: list[int] = field(default_factory=list)         # completion tokens (EOS included), one per sequence


def prompt_bucket(prompt: str) -> float:
    """A stable number in [0, 1) from the prompt text (same on every run and machine)."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_prompt(elements: Sequence[Element], eval_fraction: float) -> tuple[list[Element], list[Element]]:
    """(train, held-out), never one prompt on both sides. With at least two prompts
    and a positive fraction, at least one prompt is held out, so small label sets
    still get a held-out figure, and at least one is trained on."""
    prompts = sorted({e.prompt for e in elements}, key=prompt_bucket)
    held = {p for p in prompts if prompt_bucket(p) < eval_fraction}
    if not held and eval_fraction > 0 and len(prompts) >= 2:
        held = {prompts[0]}
    if len(held) == len(prompts) > 1:
        held.discard(prompts[-1])
    return [e for e in elements if e.prompt not in held], [e for e in elements if e.prompt in held]


def completion_tokens(tokenizer: Any, text: str, token_ids: Sequence[int] | None, *, max_tokens: int) -> list[int]:
    """A completion's tokens ending in exactly one EOS: the sampled ids when the
    store has them (cut after the first EOS), else the tokenized text. EOS is
    appended where missing, as lm-human-preferences does for the reward model."""
    eos = tokenizer.eos_token_id
    ids = list(token_ids) if token_ids else tokenizer(text, add_special_tokens=False)["input_ids"]
    if eos in ids:
        ids = ids[:ids.index(eos)]
    return ids[:max_tokens] + [eos]


def join_prompt(prompt_ids: Sequence[int], completion: Sequence[int], max_length: int) -> list[int]:
    """Prompt + completion in at most ``max_length`` tokens. A long prompt loses its
    beginning (the end holds the question the completion answers); the completion
    and its EOS are kept whole."""
    room = max(0, max_length - len(completion))
    return list(prompt_ids[len(prompt_ids) - room:] if room < len(prompt_ids) else prompt_ids) + list(completion)


def store_elements(store: Store, tokenizer: Any, *, sources: str = "all", max_length: int = 512,
                   max_completion_tokens: int = 256) -> list[Element]:
    """Every usable preference of the store as batch elements, oldest first.

    Labeled pairs are grouped by their comparison (one element per label);
    imported pairs are one element each."""
    if sources not in SOURCES:
        raise UserError(f"unknown pair source {sources!r}: use one of {', '.join(SOURCES)}")
    rows = store.pairs(source=None if sources == "all" else sources)
    kinds = {c.id: c.kind for c in store.comparisons(purpose="preference")}
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        key = ("cmp", row["comparison_id"]) if row["comparison_id"] is not None else ("pair", row["pair_id"])
        groups.setdefault(key, []).append(row)

    token_cache: dict[int, list[int] | None] = {}
    needed = {i for row in rows for i in (row["chosen_id"], row["rejected_id"])}
    for c in store.completions(sorted(needed)):
        token_cache[c.id] = c.token_ids
    prompt_cache: dict[str, list[int]] = {}

    elements = []
    for key, group in groups.items():
        prompt = group[0]["prompt"]
        if prompt not in prompt_cache:
            prompt_cache[prompt] = chat_prompt_ids(tokenizer, prompt)
        index: dict[int, int] = {}
        sequences: list[list[int]] = []
        lengths: list[int] = []
        pairs = []
        for row in group:
            for cid, text in ((row["chosen_id"], row["chosen"]), (row["rejected_id"], row["rejected"])):
                if cid not in index:
                    index[cid] = len(sequences)
                    body = completion_tokens(tokenizer, text, token_cache.get(cid), max_tokens=max_completion_tokens)
                    sequences.append(join_prompt(prompt_cache[prompt], body, max_length))
                    lengths.append(len(body))
            pairs.append((index[row["chosen_id"]], index[row["rejected_id"]]))
        kind = kinds.get(key[1], "pair") if key[0] == "cmp" else "pair"
        elements.append(Element(prompt=prompt, sequences=sequences, pairs=pairs, kind=kind,
                                pair_ids=[r["pair_id"] for r in group], completion_ids=list(index),
                                lengths=lengths))
    return elements


def batches(elements: Sequence[Element], size: int) -> list[list[Element]]:
    return [list(elements[i:i + size]) for i in range(0, len(elements), size)]
