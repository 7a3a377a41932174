"""The inference copy's linear layers: projections that read the same input as
one product, and on a CPU a weight laid out once for oneDNN instead of at every call.

A decode step multiplies a few rows by every weight, so each product is short
and its fixed costs show. Measured on two cores of an EPYC with AVX512-BF16
(bf16, 4 rows, the embedded model's shapes, ``F.linear`` against the weight
packed by ``torch.ops.mkldnn._reorder_linear_weight``, bit-identical results):
1536 x 576 took 137 us and 62 us; the 49152 x 576 LM head 5.2 ms and 2.4 ms;
q, k and v as one packed 960 x 576 product 43 us, against 126 us packed apart.
Packing is what ``torch.compile``'s CPU freezing pass does to linear weights;
compiling itself is not used (121 s on two cores, README). The ops are torch's
own oneDNN bindings, present wherever ``torch.backends.mkldnn`` is.

The grouping is by the names transformers gives siblings (``SIBLINGS``), and
each member still answers any input it is given: the group computes its
product once per input tensor and hands each member its columns.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

# Sibling projections that transformers' Llama, Mistral, Qwen2/3, Gemma and
# others apply to the same hidden state.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def packs(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether weights of this dtype on this device are packed for oneDNN."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class GroupedLinear(nn.Module):
    """Linear layers over one input as one product: their weights' rows stacked."""

    def __init__(self, widths: list[int], pack: bool) -> None:
        super().__init__()
        self.widths = widths
        self.pack = pack
        self.weight: torch.Tensor | None = None  # [sum(widths), in], packed where ``pack``
        self.bias: torch.Tensor | None = None
        self._input: torch.Tensor | None = None
        self._outputs: tuple[torch.Tensor, ...] = ()

    def load(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Take a new stacked weight (and bias), as the copy's merge computes it."""
        weight = weight.contiguous()
        # The batch-size hint only picks a layout; products of any row count read it.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 4) if self.pack else weight
        self.bias = bias
        self._input, self._outputs = None, ()

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each member's output for ``x``; the product runs once per input tensor."""
        if x is not self._input:
            if self.pack:
                y = torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
            else:
                y = nn.functional.linear(x, self.weight, self.bias)
            self._outputs = tuple(y.split(self.widths, dim=-1))
            # Held so that the identity test cannot match a new tensor at a freed address.
            self._input = x if len(self.widths) > 1 else None
        return self._outputs


class Member(nn.Module):
    """Stands where one of a group's ``nn.Linear`` stood and answers its columns."""

    def __init__(self, group: GroupedLinear, index: int) -> None:
        super().__init__()
        self.__dict__["group"] = group  # not a submodule: the copy holds each group once
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.outputs(x)[self.index]


def group_linears(model: nn.Module, pack: bool) -> list[tuple[GroupedLinear, list[str]]]:
    """Replace every ``nn.Linear`` of ``model`` by a ``Member`` of a group (siblings
    together, every other layer alone); returns each group with its members' names.
    The groups hold no weights until ``load``."""
    groups = []
    for parent_name, parent in list(model.named_modules()):
        for names in _groups_in(parent):
            widths = [getattr(parent, n).out_features for n in names]
            group = GroupedLinear(widths, pack)
            for index, name in enumerate(names):
                setattr(parent, name, Member(group, index))
            groups.append((group, [f"{parent_name}.{n}" if parent_name else n for n in names]))
    return groups


def _groups_in(parent: nn.Module) -> Iterator[list[str]]:
    linear = {name: child for name, child in parent.named_children() if type(child) is nn.Linear}
    grouped = set()
    for siblings in SIBLINGS:
        if all(n in linear for n in siblings) and len({linear[n].in_features for n in siblings}) == 1:
            grouped.update(siblings)
            yield list(siblings)
    for name in linear:
        if name not in grouped:
            yield [name]
