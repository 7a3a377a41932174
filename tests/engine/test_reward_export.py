"""`rlhf export-reward` writes a reward version as a sequence classifier that
transformers loads and that scores as the workbench does."""

from __future__ import annotations

import pytest
import torch
from conftest import PROMPTS

from rlhf.chat import chat_prompt_ids
from rlhf.cli import main
from rlhf.model_options import ModelOptions
from rlhf.models import load_stack, tiny_model_dir
from rlhf.reward_scoring import load_scorer


def _reward_version(store, stack, folder, *, layer, pool, heads=3):
    """A reward version as training leaves it: a moved adapter, an ensemble of heads, a normalization."""
    g = torch.Generator().manual_seed(1)
    stack.ensure_adapter("reward")
    stack.set_reward_heads(heads)
    with torch.no_grad():
        for p in stack.adapter_parameters("reward"):
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
        stack.reward_head.weight.normal_(generator=g)
        stack.reward_head.bias.normal_(generator=g)
    stack.save_adapter("reward", folder, {})
    store.add_checkpoint("reward", folder, meta={"readout": {"layer": layer, "pool": pool}, "heads": heads,
                                                 "gain": 0.7, "bias": -0.3, "eval_accuracy": 0.75,
                                                 "eval_pairs": 12})


def _answers(tokenizer):
    answers = ["Blue, mostly.", "It is the scattering of light by the air.", "No."]
    prompt = [chat_prompt_ids(tokenizer, PROMPTS[i % 2]) for i in range(len(answers))]
    return prompt, [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]


def _padded(sequences, pad, side):
    width = max(map(len, sequences))
    rows = [([pad] * (width - len(s)) + s) if side == "left" else (s + [pad] * (width - len(s))) for s in sequences]
    mask = [([0] * (width - len(s)) + [1] * len(s)) if side == "left" else ([1] * len(s) + [0] * (width - len(s)))
            for s in sequences]
    return torch.tensor(rows), torch.tensor(mask)


@pytest.mark.parametrize(("arch", "layer", "pool"), [("llama", 1, "mean"), ("llama", 2, "eos"), ("qwen2", 1, "mean"),
                                                     ("mistral", 1, "mean")])
def test_the_exported_reward_model_scores_as_the_workbench(store, db_path, tmp_path, arch, layer, pool):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    tiny_stack = load_stack(ModelOptions(source=tiny_model_dir(arch=arch), quantize=False, device="cpu",
                                         dtype="float32"))

    _reward_version(store, tiny_stack, tmp_path / "r1", layer=layer, pool=pool)
    assert main(["--db", str(db_path), "export-reward", "1", str(tmp_path / "out")]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert model.config.num_labels == 1 and model.config.num_hidden_layers == layer
    assert model.config.model_type == arch

    scorer = load_scorer(tiny_stack, store, 1)
    prompts, answers = _answers(tiny_stack.tokenizer)
    with torch.no_grad():
        ours = scorer.score_ids(prompts, answers, [False] * len(answers))
    sequences, _ = scorer.sequences(prompts, answers)
    # As TRL hands it a formatted conversation: the template's newline after EOS, padding on either side.
    sequences = [s + tiny_stack.tokenizer("\n", add_special_tokens=False)["input_ids"] for s in sequences]
    for side in ("right", "left"):
        ids, mask = _padded(sequences, tiny_stack.tokenizer.pad_token_id, side)
        with torch.no_grad():
            theirs = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        assert torch.allclose(theirs, ours, atol=1e-4), (side, theirs, ours)
    assert len(set(ours.tolist())) == len(answers)  # the answers score apart: the comparison means something


def test_export_reward_refuses_what_it_cannot_write(store, db_path, tiny_stack, tmp_path, capsys):
    db = ["--db", str(db_path)]
    assert main([*db, "export-reward", "1", str(tmp_path / "a")]) == 2
    assert "no reward version 1" in capsys.readouterr().err
    _reward_version(store, tiny_stack, tmp_path / "r1", layer=1, pool="mean")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    assert main([*db, "export-reward", "1", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "taken" / "file").read_text() == "mine"
