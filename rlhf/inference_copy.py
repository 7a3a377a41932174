"""A plain copy of a small base with one role's adapter merged in, to sample from.

Sampling through the training path pays at every generated token for the LoRA
branch beside every linear layer (two extra small matmuls each, 210 on the
embedded model) and, on a 4-bit base, for dequantizing every weight again. For
a base small enough to hold twice, the stack keeps one more copy in the compute
dtype whose linear weights are already W + scale * B @ A, with W the 4-bit
weight dequantized exactly as the training path's forward pass does it. It
answers as the training path does, up to float rounding.

peft's own ``merge_adapter`` is not used: it merges into the shared base in
place, and unmerging a 4-bit or 16-bit weight does not give it back exactly,
so the policy, its reference and the reward model would drift apart.

The LoRA layers' weights are merged again whenever the adapter it holds may have changed: it is
keyed by the role and a fingerprint of that adapter's values (a sum and a sum
of squares per tensor, a few milliseconds), so an optimizer step, a loaded
version or a reset all show, whoever made them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

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
        from transformers import AutoModelForCausalLM

        self.stack = stack
        base = stack.peft.get_base_model()
        config = base.config.__class__.from_dict(base.config.to_dict())
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=stack.dtype)
        # Every tensor is filled from the base (``fill``, ``merge``) before first use.
        self.model = model.to_empty(device=stack.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._meta_attributes = [(name, attribute) for name, module in self.model.named_modules()
                                 for attribute, value in vars(module).items()
                                 if isinstance(value, torch.Tensor) and value.is_meta]
        self.model.generation_config = base.generation_config
        self._lora_layers = self._layers()
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

    def _layers(self) -> list[tuple[nn.Module, Any]]:
        """(copy's linear layer, the base's LoRA layer) pairs: what adapters change."""
        from peft.tuners.lora import LoraLayer

        base = self.stack.peft.get_base_model()
        return [(module, source) for name, module in self.model.named_modules()
                if isinstance(source := base.get_submodule(name), LoraLayer)]

    @torch.no_grad()
    def merge(self, adapter: str | None) -> None:
        """Each LoRA layer's weight: the base's merged with ``adapter`` (none: the bare base)."""
        for module, source in self._lora_layers:
            module.weight.copy_(_merged_weight(source, adapter))

    @torch.no_grad()
    def fill(self) -> None:
        """Copy once what no adapter changes: every tensor of the base outside
        the LoRA layers' weights."""
        from peft.tuners.lora import LoraLayer

        base = self.stack.peft.get_base_model()
        for name, module in self.model.named_modules():
            source = base.get_submodule(name)
            if isinstance(source, LoraLayer):
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(source.get_base_layer().bias)
                continue
            for attribute, tensor in list(module.named_parameters(recurse=False)) + list(
                    module.named_buffers(recurse=False)):
                tensor.copy_(_dense(source, attribute))
        # Plain tensor attributes (a rotary embedding's original_inv_freq) are
        # neither parameters nor buffers: the base's own.
        for name, attribute in self._meta_attributes:
            setattr(self.model.get_submodule(name), attribute, getattr(base.get_submodule(name), attribute))
        if self.model.config.tie_word_embeddings:
            self.model.tie_weights()


def _merged_weight(layer: Any, adapter: str | None) -> torch.Tensor:
    weight = _dense(layer.get_base_layer(), "weight")
    if adapter is None or adapter not in layer.lora_A:
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
