"""A reward model exported by the RLHF workbench (`rlhf export-reward`).

It scores as the workbench's reward model does: the base's first
``num_hidden_layers`` decoder layers (then its final norm) under the reward
adapter, merged in; the answer's hidden states averaged (``pool: mean``: the
answer's tokens through its EOS) or its EOS state (``pool: eos``); one linear
head, the reward ensemble's mean with its normalization folded in, plus
``bias``. The answer is what follows the last assistant header
(``answer_header``) of the chat template; it ends at its last EOS.

Load it with ``AutoModelForSequenceClassification.from_pretrained(DIR,
trust_remote_code=True)``; it accepts left or right padding.
"""

from __future__ import annotations

import warnings

import torch
from transformers import LlamaForSequenceClassification as _Base  # the export writes the base's own class here
from transformers.modeling_outputs import SequenceClassifierOutputWithPast


class WorkbenchRewardModel(_Base):
    """The base's sequence classifier, reading the answer as the workbench's reward model does."""

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **_: object) -> SequenceClassifierOutputWithPast:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # the same with left or right padding
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            use_cache=False).last_hidden_state
        settings = self.config.workbench_reward
        start, end = answer_spans(input_ids, attention_mask, settings["answer_header"],
                                  settings.get("eos_token_id", self.config.eos_token_id))
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if settings["pool"] == "eos":
            pooled = hidden[rows, end]
        else:
            index = torch.arange(hidden.shape[1], device=hidden.device)[None]
            mask = ((index >= start[:, None]) & (index <= end[:, None])).to(hidden.dtype)
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        logits = self.score(pooled.to(self.score.weight.dtype)) + settings["bias"]
        return SequenceClassifierOutputWithPast(logits=logits)


def answer_spans(input_ids: torch.Tensor, attention_mask: torch.Tensor, header: list[int],
                 eos: int | list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first and last position of the answer: after the last
    assistant header, through the last EOS (else the last real token)."""
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    starts, ends = [], []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        real = [i for i, m in enumerate(mask) if m]
        ends_at = [i for i in real if ids[i] in eos_ids]
        end = ends_at[-1] if ends_at else real[-1]
        start = real[0]
        for i in range(end - len(header), real[0] - 1, -1):
            if ids[i:i + len(header)] == header:
                start = i + len(header)
                break
        else:
            if header:  # the mean would take in the prompt: say so once
                warnings.warn("no assistant header before the answer: format the conversation with the "
                              "tokenizer's chat template; the whole sequence is read", stacklevel=2)
        starts.append(min(start, end))
        ends.append(end)
    return torch.tensor(starts, device=input_ids.device), torch.tensor(ends, device=input_ids.device)
