"""A stored prompt as a chat: its messages, and its token ids under the model's chat template.

The store keeps a prompt as text. Most are one user message; a prompt of several
turns (an imported HH-RLHF dialogue, or a conversational row of a preference
file) is kept as an HH transcript, ``\\n\\nHuman: ...\\n\\nAssistant: ...\\n\\nAssistant:``,
which ends ready for the reply. Sampling, the reward model and PPO all turn a
prompt into ids here, so a transcript reaches the model as its real turns, not
as one long user message, wherever the prompt is read; import and export use
the same parsing, so a prompt read in and written out is the same text.
"""

from __future__ import annotations

import re
from typing import Any

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")


def render_transcript(messages: list[dict[str, str]]) -> str:
    """User/assistant messages as an HH transcript that ends ready for the reply."""
    turns = [f"{HUMAN if m['role'] == 'user' else ASSISTANT} {m['content']}" for m in messages]
    return "".join(turns) + ASSISTANT


def transcript_messages(text: str) -> list[dict[str, str]] | None:
    """The messages of an HH transcript prompt, or None when ``text`` is not one.

    Only a transcript that ``render_transcript`` writes back character for
    character counts, so turning it into messages and back never changes it."""
    if not (text.startswith(HUMAN) and text.endswith(ASSISTANT)):
        return None
    parts = _TURN.split(text)  # ['', 'Human', ' q', 'Assistant', ' a', ..., 'Assistant', '']
    messages = [{"role": "user" if who == "Human" else "assistant", "content": said.strip()}
                for who, said in zip(parts[1::2], parts[2::2])]
    messages.pop()  # the open assistant turn the reply goes into
    if not messages or render_transcript(messages) != text:
        return None
    return messages


def prompt_messages(text: str) -> list[dict[str, str]]:
    """A stored prompt as chat messages: an HH transcript's turns, else one user message."""
    return transcript_messages(text) or [{"role": "user", "content": text}]


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt in the model's chat format, ready for the reply. An
    imported HH-style transcript becomes its real turns, not one long user message."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(prompt_messages(prompt),
                                            add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(prompt)["input_ids"]
