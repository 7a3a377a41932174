"""A policy version out of the workbench, in the formats other tools load.

- the LoRA adapter as peft saves it (``PeftModel.from_pretrained(base, OUT)``);
- with ``merged``, the base with the adapter merged in, a plain transformers
  model directory (``AutoModelForCausalLM.from_pretrained(OUT)``, and so vLLM
  and the other servers that read that format), with its tokenizer.

Each comes with a model card (README.md) that names the base, the labels, the
reward model and the session's settings. The merged model is written in full
precision from the base the workbench loaded (for the embedded model, its
de-quantized GGUF weights). Where the policy was trained on the 4-bit base, the
merged weights differ from what it ran on by the quantization error: close to
the workbench's answers, not the same; the card says so.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.locations import check_new_folder, new_folder
from rlhf.model_stack import ADAPTER_CONFIG, ADAPTER_FILE, read_record
from rlhf.rows import Checkpoint
from rlhf.store import Store

CARD_FILE = "README.md"


def export_policy(store: Store, version: int, out: str | Path, *, merged: bool = False,
                  progress: Callable[[str], None] | None = None) -> Path:
    """Write policy ``version`` to the new folder ``out``; returns it. Nothing is
    left at ``out`` when it fails part-way."""
    if version == 0:
        raise UserError("policy version 0 is the base model itself: export a trained version (`rlhf stats` lists them)")
    checkpoint = store.checkpoint("policy", version)
    folder = Path(checkpoint.path)
    if not (folder / ADAPTER_FILE).exists():
        raise UserError(f"policy version {version}'s adapter is missing from {folder}: it cannot be exported")
    out = check_new_folder(out)
    say = progress or (lambda _msg: None)
    from rlhf.models import quiet_bitsandbytes

    quiet_bitsandbytes()  # peft imports bitsandbytes, which warns of a kernel package it does without
    record = read_record(folder)
    config = peft_config(folder, record)
    with new_folder(out) as tmp:
        if merged:
            write_merged(folder, record, config, tmp, say)
        else:
            shutil.copy2(folder / ADAPTER_FILE, tmp / ADAPTER_FILE)
            config.save_pretrained(str(tmp))
        (tmp / CARD_FILE).write_text(model_card(store, checkpoint, config.base_model_name_or_path, merged,
                                                quantized=bool(record.get("quantized"))))
    return out


def peft_config(folder: Path, record: dict[str, Any]) -> Any:
    """The adapter's LoraConfig: peft's file where the version has one; versions
    saved before the workbench wrote peft's format are rebuilt from their record."""
    from peft import LoraConfig, PeftConfig

    saved = folder / ADAPTER_CONFIG
    if "peft_type" in json.loads(saved.read_text()):
        return PeftConfig.from_pretrained(str(folder))
    lora = record.get("lora", {})
    return LoraConfig(r=lora.get("r", 16), lora_alpha=lora.get("alpha", 32), lora_dropout=lora.get("dropout", 0.0),
                      target_modules=lora.get("target_modules", "all-linear"), task_type="CAUSAL_LM",
                      base_model_name_or_path=record.get("base"), inference_mode=True)


def write_merged(folder: Path, record: dict[str, Any], config: Any, out: Path, say: Callable[[str], None]) -> None:
    """The base in full precision with the adapter merged into its weights, and the tokenizer."""
    import torch
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from rlhf.models import load_tokenizer

    base_dir = record.get("base")
    if not base_on_this_machine(base_dir):
        raise UserError(f"the base this version was trained on ({base_dir}) is not on this machine: export the "
                        "adapter alone (without --merged) and merge it where the base is")
    say(f"merging the adapter into {Path(str(base_dir)).name} (full precision)")
    tokenizer = load_tokenizer(base_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:  # as rlhf.models.load_stack does
        base.resize_token_embeddings(len(tokenizer))
    model = get_peft_model(base, config)
    set_peft_model_state_dict(model, load_file(folder / ADAPTER_FILE))
    merged = model.merge_and_unload()
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)


def base_on_this_machine(base: str | None) -> bool:
    """A model folder, or a hub id whose files are in the local hub cache (no hub is asked)."""
    if not base:
        return False
    if Path(base).is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(base, "config.json"), str)
    except ValueError:  # not a valid hub id either
        return False


def model_card(store: Store, checkpoint: Checkpoint, base_name: str, merged: bool, *, quantized: bool = False) -> str:
    """README.md: what the version is, what made it, and how to load it."""
    meta = checkpoint.meta
    labels = Counter(c.labeler for c in store.comparisons(purpose="preference"))
    library = "transformers" if merged else "peft"
    lines = ["---", f"base_model: {base_name}", f"library_name: {library}",
             "tags: [rlhf, lora, rlhf-workbench]", "---", "",
             f"# Policy version {checkpoint.version} from the RLHF workbench", "",
             f"- **Base model**: `{base_name}`" + (", with the LoRA adapter merged in" if merged else
                                                   " (this folder is the LoRA adapter)"),
             f"- **Trained by**: {trained_by(meta)}, from policy version {checkpoint.parent_version}; KL reference "
             f"version {meta.get('reference_version', 0)}",
             f"- **Reward**: {reward_text(store, meta)}",
             "- **Labels in the database**: " + (", ".join(f"{n} by {who}" for who, n in labels.most_common())
                                                 or "none") + " (comparisons)"]
    if quantized:
        lines.append("- **Precision**: trained on the base quantized to 4-bit NF4" + (
            "; merged here into its full-precision weights, which differ by the quantization error, so its "
            "answers are close to the workbench's, not the same" if merged else
            "; load the base in 4-bit (bitsandbytes NF4) to answer exactly as the workbench did"))
    if "rollout_score" in meta:
        lines.append(f"- **At this version**: rollout score {meta['rollout_score']:.3f} (reward normalized on the "
                     f"session's reference), KL {meta.get('kl', float('nan')):.3f} nats per answer")
    settings = meta.get("config") or {}
    if settings:
        lines += ["", "## Session settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in settings.items()]
    lines += ["", "## Loading it", "", "```python"]
    if merged:
        lines += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                  'model = AutoModelForCausalLM.from_pretrained("PATH")',
                  'tokenizer = AutoTokenizer.from_pretrained("PATH")']
    else:
        lines += ["from peft import PeftModel", "from transformers import AutoModelForCausalLM",
                  f'base = AutoModelForCausalLM.from_pretrained("{base_name}")',
                  'model = PeftModel.from_pretrained(base, "PATH")']
    lines += ["```", "", "Answers were sampled with the chat template of the base's tokenizer"
              + _sampling_text(settings) + "."]
    return "\n".join(lines) + "\n"


def trained_by(meta: dict[str, Any]) -> str:
    if "iteration" not in meta:
        return "the workbench"
    if meta.get("method"):  # another method than a PPO session: DPO, by epochs
        return f"{meta['method'].upper()} on the labeled pairs (job {meta.get('job_id')}), epoch {meta['iteration']}"
    algorithm = (meta.get("config") or {}).get("algorithm", "ppo").upper()
    return f"a KL-regularized {algorithm} session (job {meta.get('job_id')}), iteration {meta['iteration']}"


def reward_text(store: Store, meta: dict[str, Any]) -> str:
    reward = meta.get("reward")
    if meta.get("method"):
        return "none: trained on the labeled pairs directly"
    if isinstance(reward, str):
        return f"the scripted rule `{reward}`"
    if reward is None:
        return "not recorded"
    try:
        rm = store.checkpoint("reward", int(reward)).meta
    except UserError:
        return f"reward model version {reward} (no longer in the database)"
    accuracy = rm.get("eval_accuracy")
    held = (f", held-out accuracy {accuracy:.2f} on {rm.get('eval_pairs')} pairs"
            if isinstance(accuracy, (int, float)) else "")
    return f"reward model version {reward} (trained on {rm.get('sources', 'all')} pairs{held})"


def _sampling_text(settings: dict[str, Any]) -> str:
    keys = ("temperature", "top_p", "max_new_tokens")
    if not all(k in settings for k in keys):
        return ""
    return (f", temperature {settings['temperature']}, top-p {settings['top_p']}, at most "
            f"{settings['max_new_tokens']} new tokens")
