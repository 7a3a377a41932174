"""Policy versions leave the workbench in the field's formats: a saved version is
a standard peft adapter, and `rlhf export-policy` writes it (or the base with it
merged in) where other tools load it, answering as the workbench's policy does."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROMPTS

from rlhf.chat import chat_prompt_ids
from rlhf.cli import main
from rlhf.model_stack import ADAPTER_CONFIG, RECORD_FILE
from rlhf.preferences import record_label


def _trained_policy(stack, folder, meta=None):
    """The policy adapter moved off the base (as training would), then saved."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in stack.adapter_parameters("policy"):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    return stack.save_adapter("policy", folder, meta or {})


def _policy_logprobs(stack, ids):
    with torch.no_grad(), stack.role("policy"):
        return torch.log_softmax(stack.peft(input_ids=ids).logits.float(), -1)


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits.float(), -1)


@pytest.fixture
def ids(tiny_stack):
    return torch.tensor([chat_prompt_ids(tiny_stack.tokenizer, PROMPTS[0])])


def test_a_saved_version_is_a_peft_adapter_with_the_same_log_probs(tiny_stack, tiny_dir, tmp_path, ids):
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    folder = _trained_policy(tiny_stack, tmp_path / "v1", {"iteration": 3})
    config = PeftConfig.from_pretrained(str(folder))
    assert config.peft_type == "LORA" and config.base_model_name_or_path == tiny_dir
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(folder)).eval()
    assert torch.allclose(_logprobs(model, ids), _policy_logprobs(tiny_stack, ids), atol=1e-5)
    # The workbench's own record sits beside peft's files and still reads back.
    assert json.loads((folder / RECORD_FILE).read_text())["meta"] == {"iteration": 3}
    assert tiny_stack.load_adapter("reference", folder, heads=False) == {"iteration": 3}


def test_a_version_saved_in_the_old_layout_still_loads_and_exports(store, db_path, tiny_stack, tiny_dir, tmp_path,
                                                                   ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder = _trained_policy(tiny_stack, tmp_path / "old", {"iteration": 1})
    record = json.loads((folder / RECORD_FILE).read_text())
    (folder / RECORD_FILE).unlink()
    (folder / ADAPTER_CONFIG).write_text(json.dumps(record))  # as versions were saved before
    assert tiny_stack.load_adapter("reference", folder, heads=False) == {"iteration": 1}
    store.add_checkpoint("policy", folder, parent_version=0, meta={"iteration": 1})
    assert main(["--db", str(db_path), "export-policy", "1", str(tmp_path / "out")]) == 0
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(tmp_path / "out")).eval()
    assert torch.allclose(_logprobs(model, ids), _policy_logprobs(tiny_stack, ids), atol=1e-5)


def test_export_policy_writes_an_adapter_and_a_merged_model_with_a_card(store, db_path, tiny_stack, tmp_path, ids,
                                                                        capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompt_id = store.add_prompt(PROMPTS[0])
    answers = store.add_completions(prompt_id, [{"text": t, "n_tokens": 1, "finish_reason": "eos"} for t in "ab"])
    record_label(store, prompt_id, answers, "best", [0], labeler="rule:more=x")
    settings = {"algorithm": "rloo", "beta": 0.05, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 64}
    folder = _trained_policy(tiny_stack, tmp_path / "v1")
    store.add_checkpoint("policy", folder, parent_version=0,
                         meta={"job_id": 4, "iteration": 2, "reference_version": 0, "reward": "rule:more=x",
                               "rollout_score": 0.5, "kl": 1.25, "config": settings})

    db = ["--db", str(db_path)]
    assert main([*db, "export-policy", "1", str(tmp_path / "adapter")]) == 0
    card = (tmp_path / "adapter" / "README.md").read_text()
    for expected in (f"base_model: {tiny_stack.base_name}", "RLOO session (job 4), iteration 2",
                     "the scripted rule `rule:more=x`", "1 by rule:more=x", "| beta | 0.05 |",
                     "KL 1.250 nats", "PeftModel.from_pretrained"):
        assert expected in card, expected
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                                  "README.md"}

    assert main([*db, "export-policy", "1", str(tmp_path / "merged"), "--merged"]) == 0
    assert "merged model" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(_logprobs(merged, ids), _policy_logprobs(tiny_stack, ids), atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.pad_token_id == tiny_stack.tokenizer.pad_token_id != tokenizer.eos_token_id
    assert "library_name: transformers" in (tmp_path / "merged" / "README.md").read_text()


def test_export_policy_refuses_what_it_cannot_write(store, db_path, tiny_stack, tmp_path, capsys):
    folder = _trained_policy(tiny_stack, tmp_path / "v1")
    store.add_checkpoint("policy", folder, parent_version=0, meta={})
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    db = ["--db", str(db_path)]
    with pytest.raises(SystemExit):  # refused while parsing
        main([*db, "export-policy", "0", str(tmp_path / "x")])
    assert "argument version: must be at least 1" in capsys.readouterr().err
    for argv, message in ((["7", str(tmp_path / "x")], "no policy version 7"),
                          (["1", str(tmp_path / "taken")], "already exists: export into a new or empty folder")):
        assert main([*db, "export-policy", *argv]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "taken" / "file").read_text() == "mine" and not (tmp_path / "x").exists()


def test_a_merged_export_needs_the_base_and_a_dpo_card_says_dpo(store, db_path, tiny_stack, tmp_path, capsys):
    folder = _trained_policy(tiny_stack, tmp_path / "v1")
    record = json.loads((folder / RECORD_FILE).read_text())
    assert record["quantized"] is False
    (folder / RECORD_FILE).write_text(json.dumps({**record, "base": str(tmp_path / "gone"), "quantized": True}))
    store.add_checkpoint("policy", folder, parent_version=0,
                         meta={"job_id": 2, "iteration": 3, "method": "dpo", "reference_version": 0})
    db = ["--db", str(db_path)]
    assert main([*db, "export-policy", "1", str(tmp_path / "merged"), "--merged"]) == 2
    assert "is not on this machine: export the adapter alone" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()
    assert main([*db, "export-policy", "1", str(tmp_path / "adapter")]) == 0
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "DPO on the labeled pairs (job 2), epoch 3" in card and "trained on the labeled pairs directly" in card
    assert "trained on the base quantized to 4-bit NF4" in card
