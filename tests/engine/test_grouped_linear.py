"""The inference copy's grouped linear layers (rlhf.grouped_linear) answer as the
``nn.Linear`` layers they replace: siblings as one product, packed or not, for
any input each member is given."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlhf.grouped_linear import GroupedLinear, Member, group_linears, packs
from rlhf.model_options import ModelOptions
from rlhf.models import load_stack, tiny_model_dir


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 6, bias=True)
        self.k_proj = nn.Linear(8, 4, bias=False)
        self.v_proj = nn.Linear(8, 4, bias=False)
        self.o_proj = nn.Linear(6, 8, bias=False)


@pytest.mark.parametrize("pack", [False, True] if packs(torch.float32, torch.device("cpu")) else [False])
def test_members_answer_as_the_layers_they_replace(pack):
    torch.manual_seed(0)
    reference = Attention()
    model = Attention()
    groups = group_linears(model, pack)
    assert sorted(names for _, names in groups) == [["o_proj"], ["q_proj", "k_proj", "v_proj"]]
    assert all(isinstance(getattr(model, n), Member) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    for group, names in groups:
        layers = [getattr(reference, n) for n in names]
        biases = [layer.bias if layer.bias is not None else torch.zeros(layer.out_features) for layer in layers]
        group.load(torch.cat([layer.weight for layer in layers]).detach(),
                   torch.cat(biases).detach() if any(layer.bias is not None for layer in layers) else None)
    x, other = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            torch.testing.assert_close(getattr(model, name)(x), getattr(reference, name)(x))
        # A sibling given another input answers for that input, not from the last product.
        torch.testing.assert_close(model.k_proj(other), reference.k_proj(other))
        torch.testing.assert_close(model.q_proj(x), reference.q_proj(x))
        torch.testing.assert_close(model.o_proj(x[..., :6]), reference.o_proj(x[..., :6]))


def test_a_group_computes_its_product_once_per_input():
    group = GroupedLinear([2, 3], pack=False)
    group.load(torch.randn(5, 4), None)
    x = torch.randn(1, 4)
    first = group.outputs(x)
    assert group.outputs(x)[1] is first[1]
    assert group.outputs(x.clone())[1] is not first[1]


def test_llamas_sibling_projections_are_grouped(tiny_stack):
    copy = tiny_stack.sampling_model("policy")
    layer = copy.model.layers[0]
    assert layer.self_attn.q_proj.group is layer.self_attn.v_proj.group
    assert layer.mlp.gate_proj.group is layer.mlp.up_proj.group
    assert layer.mlp.down_proj.group is not layer.mlp.up_proj.group


def test_the_copy_keeps_each_projections_bias():
    # Qwen2's q/k/v carry biases; a tiny model's start at zero, so set them.
    torch.manual_seed(0)
    stack = load_stack(ModelOptions(source=tiny_model_dir(arch="qwen2"), quantize=False, device="cpu",
                                    dtype="float32"))
    attention = stack.peft.get_base_model().model.layers[0].self_attn
    with torch.no_grad():
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(attention, name).base_layer.bias.normal_()
    _assert_the_copy_answers_as_the_policy(stack)


def test_lora_layers_that_are_no_linear_are_merged_too(tmp_path, tiny_dir):
    # GPT-2's projections are Conv1D: not grouped, merged into their own weight.
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.save_pretrained(tmp_path)
    config = AutoConfig.for_model("gpt2", vocab_size=len(tok), n_embd=32, n_layer=1, n_head=4,
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    stack = load_stack(ModelOptions(source=str(tmp_path), quantize=False, device="cpu", dtype="float32"))
    with torch.no_grad():
        for p in stack.adapter_parameters("policy"):
            p.add_(0.05 * torch.randn_like(p))
    _assert_the_copy_answers_as_the_policy(stack)


def _assert_the_copy_answers_as_the_policy(stack) -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), stack.role("policy"):
        expected = stack.peft(input_ids=ids).logits
    with torch.no_grad():
        got = stack.sampling_model("policy")(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
