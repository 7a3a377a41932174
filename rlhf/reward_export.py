"""A reward version out of the workbench, as a sequence classifier other tools load.

`rlhf export-reward VERSION OUT` writes a transformers model directory that
``AutoModelForSequenceClassification.from_pretrained(OUT, trust_remote_code=True)``
loads (``num_labels = 1``) and that scores as the workbench does:

- the base in full precision with the reward adapter merged in, cut to the
  layers the reward reads (a third of the way up by default; the final norm kept);
- the reward ensemble's heads averaged into one linear head, the normalization
  (gain, bias) folded into it;
- the read-out: the answer's mean hidden state (the default) or its EOS state.

No standard sequence classifier reads a middle layer's mean over the answer
(they read the last layer at the last token), so the directory carries a small
subclass of the base's own classifier (``export_files/modeling_workbench_reward.py``,
named in the config's ``auto_map``): hence ``trust_remote_code``. TRL's RLOO and
GRPO trainers take the folder as ``reward_funcs`` with ``trust_remote_code=True``
(the suite runs RLOO on it); TRL's PPO reads a classifier's per-token scores
itself and does not go through its forward, so it would not read it right.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.locations import check_new_folder, new_folder
from rlhf.model_stack import ADAPTER_FILE, HEADS_FILE, read_record
from rlhf.policy_export import base_on_this_machine, peft_config
from rlhf.reward_config import Readout
from rlhf.store import Store

MODELING = "modeling_workbench_reward.py"
CLASS = "WorkbenchRewardModel"
TEMPLATE = Path(__file__).with_name("export_files") / MODELING


def export_reward(store: Store, version: int | None, out: str | Path,
                  progress: Callable[[str], None] | None = None) -> Path:
    """Write reward ``version`` (the latest when None) to the new folder ``out``;
    returns it. Nothing is left at ``out`` when it fails part-way."""
    checkpoint = store.checkpoint("reward", version)
    if checkpoint is None:
        raise UserError(f"no reward model in {store.path}: train one first (`rlhf train-reward`)")
    folder = Path(checkpoint.path)
    if not (folder / HEADS_FILE).exists():
        raise UserError(f"reward version {checkpoint.version}'s files are missing from {folder}: it cannot be "
                        "exported")
    out = check_new_folder(out)
    record = read_record(folder)
    base_dir = record.get("base")
    if not base_on_this_machine(base_dir):
        raise UserError(f"the base reward version {checkpoint.version} was trained on ({base_dir}) is not on this "
                        "machine: export it where the base is")
    say = progress or (lambda _msg: None)
    with new_folder(out) as tmp:
        say(f"merging reward version {checkpoint.version} into {Path(str(base_dir)).name} (full precision)")
        write_classifier(folder, record, checkpoint.meta, tmp)
        (tmp / "README.md").write_text(model_card(checkpoint.version, checkpoint.meta, record, peft_config(
            folder, record).base_model_name_or_path, json.loads((tmp / "config.json").read_text())))
    return out


def write_classifier(folder: Path, record: dict[str, Any], meta: dict[str, Any], out: Path) -> None:
    """The merged, cut base with the folded head, its config, tokenizer and class."""
    import torch
    import transformers
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    from rlhf.models import load_tokenizer, quiet_bitsandbytes

    quiet_bitsandbytes()
    base_dir = str(record["base"])
    tokenizer = load_tokenizer(base_dir)
    header = answer_header(tokenizer)
    base_config = AutoConfig.from_pretrained(base_dir)
    readout = Readout.from_meta(meta, base_config.num_hidden_layers)
    architecture = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(base_config.model_type)
    if architecture is None:  # checked before the full-precision load below
        raise UserError(f"transformers has no sequence classifier for {base_config.model_type} models: this reward "
                        "model cannot be exported as one")
    if readout.pool == "mean" and header is None:
        raise UserError("the base has no chat template, so an exported model cannot tell the answer from the "
                        "prompt: export a reward model trained with --readout eos")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # as rlhf.models.load_stack does
        base.resize_token_embeddings(len(tokenizer))
    if (folder / ADAPTER_FILE).exists():
        lora = peft_config(folder, record)
        lora.base_model_name_or_path = base_dir  # the copy merged here (peft warns of a rename otherwise)
        model = get_peft_model(base, lora)
        set_peft_model_state_dict(model, load_file(folder / ADAPTER_FILE))
        base = model.merge_and_unload()
    weight, bias = folded_head(load_file(folder / HEADS_FILE), meta)
    config = classifier_config(base.config, readout, header, bias, tokenizer.pad_token_id, tokenizer.eos_token_id)
    classifier = getattr(transformers, architecture)(config).to(torch.float32)
    body = getattr(base, base.base_model_prefix).state_dict()
    kept = {k: v for k, v in body.items() if not k.startswith("layers.") or int(k.split(".")[1]) < readout.layer}
    getattr(classifier, classifier.base_model_prefix).load_state_dict(kept, strict=True)
    with torch.no_grad():
        classifier.score.weight.copy_(weight[None])
    classifier.save_pretrained(out)
    tokenizer.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "architectures": [CLASS]}, indent=2) + "\n")
    (out / MODELING).write_text(TEMPLATE.read_text().replace("LlamaForSequenceClassification", architecture))


def folded_head(heads: dict[str, Any], meta: dict[str, Any]) -> tuple[Any, float]:
    """The ensemble's mean as one head, normalized: gain * mean_h(w_h x + b_h) + bias
    = (gain * mean w) x + (gain * mean b + bias)."""
    gain, shift = float(meta.get("gain", 1.0)), float(meta.get("bias", 0.0))
    weight = heads["reward.weight"].float().mean(0) * gain
    return weight, float(heads["reward.bias"].float().mean()) * gain + shift


def classifier_config(config: Any, readout: Readout, header: list[int] | None, bias: float, pad_id: int | None,
                      eos_id: int | None) -> Any:
    """The base's config cut to the read-out layer, a one-label classifier of our
    class, with the tokenizer's EOS (the one the workbench appends; a model's
    config may name another)."""
    config = config.__class__.from_dict(config.to_dict())
    config.num_hidden_layers = readout.layer
    if isinstance(getattr(config, "layer_types", None), list):  # Qwen2 and newer configs list each layer
        config.layer_types = config.layer_types[:readout.layer]
    config.num_labels = 1
    config.pad_token_id = pad_id
    config.auto_map = {"AutoModelForSequenceClassification": f"{MODELING[:-3]}.{CLASS}"}
    config.workbench_reward = {"pool": readout.pool, "bias": bias, "answer_header": header or [],
                               "eos_token_id": eos_id}
    return config


def answer_header(tokenizer: Any) -> list[int] | None:
    """The ids the chat template puts before an answer (SmolLM2: '<|im_start|>assistant\\n'),
    None without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "x"}]

    def ids(generation_prompt: bool) -> list[int]:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "input_ids") else out)

    with_header, without = ids(True), ids(False)
    return with_header[len(without):] if with_header[:len(without)] == without else None


def model_card(version: int, meta: dict[str, Any], record: dict[str, Any], base_name: str,
               config: dict[str, Any]) -> str:
    """README.md: what the classifier reads (from its ``config``) and how to load it."""
    pooled = "mean hidden state" if config["workbench_reward"]["pool"] == "mean" else "EOS state"
    accuracy = meta.get("eval_accuracy")
    held = (f"held-out accuracy {accuracy:.2f} on {meta.get('eval_pairs')} pairs" if isinstance(accuracy, float)
            else "no held-out accuracy recorded")
    lines = ["---", f"base_model: {base_name}", "library_name: transformers",
             "tags: [rlhf, reward-model, rlhf-workbench]", "---", "",
             f"# Reward model version {version} from the RLHF workbench", "",
             f"- **Base**: `{base_name}`, its first {config['num_hidden_layers']} layers with the reward adapter "
             "merged in" + (" (trained on the 4-bit NF4 base: merged here into its full-precision weights, so "
                            "scores are close to the workbench's, not the same)" if record.get("quantized") else ""),
             f"- **Reads**: the answer's {pooled}; {meta.get('heads', 1)} reward heads averaged, normalization "
             "folded in (a sample of the policy scores mean 0, std 1)",
             f"- **Trained on**: {meta.get('sources', 'all')} pairs, {held}", "",
             "## Loading it", "", "```python",
             "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
             'model = AutoModelForSequenceClassification.from_pretrained("PATH", trust_remote_code=True)',
             'tokenizer = AutoTokenizer.from_pretrained("PATH")',
             "```", "",
             "Score a prompt and answer formatted with the tokenizer's chat template (the answer ending in its "
             "EOS). As TRL's `reward_funcs` (RLOO, GRPO): pass the folder's path and `trust_remote_code=True` "
             "in the trainer's config."]
    return "\n".join(lines) + "\n"
