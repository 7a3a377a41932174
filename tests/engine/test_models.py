"""Model stack: adapters by name and version, the reference policy, sources."""

from __future__ import annotations

import pytest
import torch

from rlhf.errors import UserError
from rlhf.model_options import ModelOptions
from rlhf.models import load_stack, resolve_model_dir


def _logits(stack, role: str) -> torch.Tensor:
    ids = torch.tensor([[1, 520, 9531, 198, 47, 2]])
    with torch.no_grad(), stack.role(role):
        return stack.logits(stack.hidden(ids, torch.ones_like(ids)))


def _perturb(stack, name: str, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stack.adapter_parameters(name):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def test_reference_equals_policy_at_a_fresh_adapter(tiny_stack):
    assert torch.equal(_logits(tiny_stack, "policy"), _logits(tiny_stack, "reference"))
    _perturb(tiny_stack, "policy")
    assert not torch.allclose(_logits(tiny_stack, "policy"), _logits(tiny_stack, "reference"))


def test_adapters_save_and_load_by_name_and_version(tiny_stack, tiny_dir, store, tmp_path):
    _perturb(tiny_stack, "policy")
    with torch.no_grad():
        tiny_stack.value_head.weight.fill_(0.5)
    trained = _logits(tiny_stack, "policy")
    version = store.add_checkpoint("policy", tiny_stack.save_adapter("policy", tmp_path / "policy-v1"))

    fresh = load_stack(ModelOptions(source=tiny_dir, quantize=False, device="cpu", dtype="float32"))
    fresh.load_policy(store.checkpoint("policy", version).path, version)
    assert fresh.policy_version == version
    assert torch.allclose(_logits(fresh, "policy"), trained, atol=1e-6)
    assert torch.all(fresh.value_head.weight == 0.5)
    # A loaded policy's reference is a frozen copy of it, not the bare base:
    # disabling a trained adapter would give the wrong reference.
    assert torch.allclose(_logits(fresh, "reference"), trained, atol=1e-6)
    _perturb(fresh, "policy", seed=1)
    assert torch.allclose(_logits(fresh, "reference"), trained, atol=1e-6)
    assert not torch.allclose(_logits(fresh, "policy"), trained, atol=1e-4)


def test_roles_do_not_disturb_each_other(tiny_stack):
    tiny_stack.ensure_adapter("reward")
    _perturb(tiny_stack, "reward")
    assert torch.equal(_logits(tiny_stack, "policy"), _logits(tiny_stack, "reference"))
    assert not torch.allclose(_logits(tiny_stack, "reward"), _logits(tiny_stack, "policy"))
    assert tiny_stack.peft.active_adapter == "policy"
    assert not any(p.requires_grad for p in tiny_stack.peft.parameters())


def test_value_head_starts_at_zero(tiny_stack):
    assert torch.count_nonzero(tiny_stack.value_head.weight) == 0
    assert torch.count_nonzero(tiny_stack.value_head.bias) == 0


def test_four_bit_base_loads_and_trains_on_cpu(tiny_dir):
    stack = load_stack(ModelOptions(source=tiny_dir, quantize=True, device="cpu"))
    assert stack.quantized
    ids = torch.tensor([[1, 520, 9531, 198]])
    params = stack.adapter_parameters("policy")
    for p in params:
        p.requires_grad_(True)
    with stack.role("policy"):
        loss = stack.logits(stack.hidden(ids, torch.ones_like(ids))).logsumexp(-1).mean()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "no-such-model"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a model directory"):
        resolve_model_dir(str(tmp_path / "empty"))


def test_loading_an_adapter_folder_without_weights_is_a_clear_error(tiny_stack, tmp_path):
    with pytest.raises(UserError, match="no saved adapter"):
        tiny_stack.load_adapter("policy", tmp_path)

