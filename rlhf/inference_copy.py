"""A plain copy of a small base with one role's adapter merged in, to sample from.

Sampling through the training path pays at every generated token for the LoRA
branch beside every linear layer (two extra small matmuls each, 210 on the
embedded model) and, on a 4-bit base, for dequantizing every weight again. For
a base small enough to hold twice, the stack keeps one more copy in the compute
dtype whose linear weights are already W + scale * B @ A, with W the 4-bit
weight dequantized exactly as the training path's forward pass does it. It
answers as the training path does, up to float rounding. Its linear layers are
grouped and packed (rlhf.grouped_linear): q/k/v and gate/up as one product each,
and on a CPU weights laid out once for oneDNN, about half the time per product.

peft's own ``merge_adapter`` is not used: it merges into the shared base in
place, and unmerging a 4-bit or 16-bit weight does not give it back exactly,
so the policy, its reference and the reward model would drift apart.

The groups holding LoRA layers are merged again whenever the adapter the copy
holds may have changed: the copy is keyed by the role and a fingerprint of that
adapter's values (a sum and a sum of squares per tensor, a few milliseconds), so
an optimizer step, a loaded version or a reset all show, whoever made them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rlhf.grouped_linear import GroupedLinear, group_linears, packs

if TYPE_CHECKING:
    from rlhf.model_stack import ModelStack

# Bases up to this many parameters get a copy to sample from: about 2 GB more in
# bf16 at the limit; bigger bases sample through the training path.
MAX_PARAMETERS = 1_000_000_000


def adapter_for(stack: ModelStack, role: str) -> str | None:
    """The adapter a role's answers come from; None for the bare base."""
    if role == "base" or (role == "reference" and not stack.reference_is_copy):
        return None
    return role


class InferenceCopy:
    """The stack's base, in its compute dtype, with one adapter merged."""

    def __init__(self, stack: ModelStack) -> None:
        from peft.tuners.lora import LoraLayer
        from transformers import AutoModelForCausalLM

        self.stack = stack
        base = stack.peft.get_base_model()
        config = base.config.__class__.from_dict(base.config.to_dict())
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=stack.dtype)
        # Linear layers become groups (rlhf.grouped_linear) before any memory is
        # taken: their weights live only there, stacked, and packed for oneDNN on a CPU.
        self._groups = group_linears(model, packs(stack.dtype, torch.device(stack.device)))
        self._lora_groups = [(group, names) for group, names in self._groups
                             if any(isinstance(base.get_submodule(n), LoraLayer) for n in names)]
        # LoRA layers that are no nn.Linear here (GPT-2's Conv1D): merged into their own weight.
        grouped = {n for _, names in self._groups for n in names}
        self._loose = [name for name, module in base.named_modules()
                       if isinstance(module, LoraLayer) and name not in grouped]
        # Every tensor is filled from the base (``fill``, ``merge``) before first use.
        self.model = model.to_empty(device=stack.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._meta_attributes = [(name, attribute) for name, module in self.model.named_modules()
                                 for attribute, value in vars(module).items()
                                 if isinstance(value, torch.Tensor) and value.is_meta]
        self.model.generation_config = base.generation_config
        self.key: tuple[Any, ...] | None = None  # None: nothing copied yet

    def for_role(self, role: str) -> nn.Module:
        """The copy answering as ``role``, merged again if that adapter changed."""
        adapter = adapter_for(self.stack, role)
        key = (adapter, _fingerprint(self.stack, adapter))
        if key != self.key:
            if self.key is None:
                self.fill()
            self.merge(adapter)
            self.key = key
        return self.model

    def holds(self, role: str) -> bool:
        """Whether the copy has that role's adapter merged now (its values may
        still have changed since: ``for_role`` checks those)."""
        return self.key is not None and self.key[0] == adapter_for(self.stack, role)

    @torch.no_grad()
    def merge(self, adapter: str | None) -> None:
        """Each group holding a LoRA layer: the base's weights merged with ``adapter``
        (none: the bare base)."""
        for group, names in self._lora_groups:
            self._load(group, names, adapter)
        base = self.stack.peft.get_base_model()
        for name in self._loose:
            self.model.get_submodule(name).weight.copy_(_merged_weight(base.get_submodule(name), adapter))

    @torch.no_grad()
    def fill(self) -> None:
        """Copy once what no adapter changes: every tensor of the base outside
        the linear layers, and the groups without a LoRA layer."""
        base = self.stack.peft.get_base_model()
        for name, module in self.model.named_modules():
            for attribute, tensor in list(module.named_parameters(recurse=False)) + list(
                    module.named_buffers(recurse=False)):
                tensor.copy_(_dense(base.get_submodule(name), attribute))
        # Plain tensor attributes (a rotary embedding's original_inv_freq) are
        # neither parameters nor buffers: the base's own.
        for name, attribute in self._meta_attributes:
            setattr(self.model.get_submodule(name), attribute, getattr(base.get_submodule(name), attribute))
        for group, names in self._groups:
            self._load(group, names, None)

    def _load(self, group: GroupedLinear, names: list[str], adapter: str | None) -> None:
        base = self.stack.peft.get_base_model()
        layers = [base.get_submodule(n) for n in names]
        weight = torch.cat([_merged_weight(layer, adapter) for layer in layers]).to(self.stack.dtype)
        biases = [_base(layer).bias for layer in layers]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else weight.new_zeros(w)
                              for b, w in zip(biases, group.widths)]).to(self.stack.dtype)
        group.load(weight, bias)


def _base(layer: nn.Module) -> nn.Module:
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def _merged_weight(layer: Any, adapter: str | None) -> torch.Tensor:
    """A linear layer's weight as the forward pass uses it, with ``adapter``'s LoRA update merged."""
    weight = _dense(_base(layer), "weight")
    if adapter is None or adapter not in getattr(layer, "lora_A", {}):
        return weight
    return (weight.float() + layer.get_delta_weight(adapter).float()).to(weight.dtype)


def _dense(module: nn.Module, attribute: str) -> torch.Tensor:
    """A module's tensor as the forward pass uses it: a 4-bit weight dequantized."""
    tensor = getattr(module, attribute)
    quant_state = getattr(tensor, "quant_state", None)
    if quant_state is not None:
        from peft.utils.integrations import dequantize_bnb_weight

        return dequantize_bnb_weight(tensor, state=quant_state)
    return tensor


def _fingerprint(stack: ModelStack, adapter: str | None) -> tuple[float, ...]:
    if adapter is None:
        return ()
    params = stack.adapter_parameters(adapter)
    with torch.no_grad():
        sums = torch.stack([torch.stack([p.float().sum(), p.float().square().sum()]) for p in params])
    return tuple(sums.flatten().tolist())


def wanted(stack: ModelStack) -> bool:
    """Whether this base is small enough to hold a copy of."""
    return sum(p.numel() for p in stack.peft.get_base_model().parameters()) <= MAX_PARAMETERS
