"""A recipe for when one machine is not enough: the experiment, handed to TRL.

`rlhf export-recipe OUT` writes a folder that continues what the workbench
found on a cluster, with TRL on accelerate (the field's engine for many GPUs;
the workbench hands over to it and does not grow its own):

- ``preferences.jsonl``: every labeled pair, TRL's conversational preference format;
- ``prompts.jsonl``: the prompts (as chat messages) the policy trains on;
- ``recipe.json``: the base, the LoRA shape, and a PPO/RLOO session's settings
  (beta, length budget, temperature, top-p, learning rate, samples per prompt);
- ``train.py`` (from ``export_files/``): reward-model training on the labels with
  TRL's RewardTrainer, then RLOO against it with TRL's RLOOTrainer;
- ``reward_model/``: the workbench's latest reward model as a sequence
  classifier (rlhf.reward_export), which RLOO can run against as it is;
- ``accelerate.yaml``: a multi-GPU launch, and a README saying how to run it.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rlhf.chat import prompt_messages
from rlhf.errors import UserError
from rlhf.locations import check_new_folder, new_folder
from rlhf.exchange_export import pair_rows
from rlhf.model_options import EMBEDDED, LoraSettings
from rlhf.ppo_config import PPOConfig
from rlhf.rows import Checkpoint
from rlhf.store import Store

RECIPE_FILES = Path(__file__).with_name("export_files")
SCRIPT, ACCELERATE, SETTINGS, REWARD_DIR = "train.py", "accelerate.yaml", "recipe.json", "reward_model"
SESSION_KEYS = ("algorithm", "beta", "rloo_k", "max_new_tokens", "temperature", "top_p", "learning_rate")
# The reward stage's settings: a LoRA fine-tune for a few epochs (TRL's default is one,
# which learns little from the tens to hundreds of labels one person makes).
REWARD_DEFAULTS = {"epochs": 3, "batch_size": 8, "lr": 1e-4, "max_length": 512, "eval_fraction": 0.2}


def export_recipe(store: Store, out: str | Path, *, version: int | None = None, base: str | None = None,
                  progress: Callable[[str], None] | None = None) -> Path:
    """Write the recipe folder ``out`` (new or empty); returns it. ``version``: the
    policy version whose session's settings to carry (default: the latest trained
    by PPO or RLOO; the defaults when there is none); ``base``: the base model's
    name or path on the cluster (default: the hub id of the embedded model, else
    the path the workbench loaded). Nothing is left at ``out`` when it fails."""
    pairs = store.pairs()
    if not pairs:
        raise UserError(f"no labeled pairs in {store.path}: label or import some first, the recipe trains on them")
    prompts = [p.text for p in store.prompts()] or sorted({p["prompt"] for p in pairs})
    checkpoint = session_version(store, version)
    out = check_new_folder(out)
    settings = recipe_settings(store, checkpoint, base, pairs)
    with new_folder(out) as tmp:
        _write_jsonl(tmp / "preferences.jsonl", pair_rows(pairs, conversational=True, metadata=False))
        _write_jsonl(tmp / "prompts.jsonl", [{"prompt": prompt_messages(text)} for text in prompts])
        if progress and store.checkpoint("reward") is not None:
            progress("exporting the latest reward model beside the recipe")
        settings["reward_model"] = _workbench_reward(store, tmp / REWARD_DIR)
        (tmp / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
        for name in (SCRIPT, ACCELERATE):
            shutil.copy2(RECIPE_FILES / name, tmp / name)
        (tmp / "README.md").write_text(readme(settings))
    return out


def _workbench_reward(store: Store, out: Path) -> dict[str, Any] | None:
    """The latest reward version, exported beside the recipe (rlhf.reward_export),
    or why it is not there: RLOO can run against it instead of a retrained one."""
    checkpoint = store.checkpoint("reward")
    if checkpoint is None:
        return {"path": None, "why": "no reward model in the database"}
    from rlhf.reward_export import export_reward

    try:
        export_reward(store, checkpoint.version, out)
    except UserError as e:
        return {"path": None, "why": str(e)}
    return {"path": out.name, "version": checkpoint.version,
            "eval_accuracy": checkpoint.meta.get("eval_accuracy"), "eval_pairs": checkpoint.meta.get("eval_pairs")}


def session_version(store: Store, version: int | None) -> Checkpoint | None:
    """The policy version whose session settings the recipe carries."""
    if version is not None:
        checkpoint = store.checkpoint("policy", version)
        if not (checkpoint.meta.get("config") and not checkpoint.meta.get("method")):
            raise UserError(f"policy version {version} was not trained by a PPO or RLOO session: pick one that was "
                            "(`rlhf stats` lists the versions) or leave --version out")
        return checkpoint
    trained = [c for c in store.checkpoints("policy") if c.meta.get("config") and not c.meta.get("method")]
    return trained[-1] if trained else None


def recipe_settings(store: Store, checkpoint: Checkpoint | None, base: str | None,
                    pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """recipe.json: what train.py reads."""
    defaults = asdict(PPOConfig())
    config = {**defaults, **checkpoint.meta["config"]} if checkpoint else defaults  # older versions lack newer keys
    session = {k: config[k] for k in SESSION_KEYS}
    session["prompt_epochs"] = 1  # passes of RLOO over the prompts
    lora, source = _model_of(store, checkpoint)
    return {
        "written_by": "rlhf export-recipe",
        "database": str(store.path),
        "policy_version": checkpoint.version if checkpoint else None,
        "base": base or _base_name(checkpoint or store.checkpoint("reward"), source),
        "lora": lora,
        "reward": dict(REWARD_DEFAULTS),
        "session": session,
        "labels": {"pairs": len(pairs), "comparisons": len({p["comparison_id"] for p in pairs}),
                   "by": dict(Counter(p["labeler"] or p["source"] for p in pairs).most_common())},
    }


def _model_of(store: Store, checkpoint: Checkpoint | None) -> tuple[dict[str, Any], str]:
    """The session's LoRA shape and model source; without a session, the latest
    reward model's (the labels' base), else the workbench's defaults."""
    model: dict[str, Any] = {}
    source = checkpoint or store.checkpoint("reward")
    if source is not None and source.job_id is not None:
        model = store.job(source.job_id).config.get("model") or {}
    return model.get("lora") or asdict(LoraSettings()), model.get("source") or EMBEDDED


def _base_name(checkpoint: Checkpoint | None, source: str) -> str:
    """How the cluster names the base: what the saved adapter (the session's, else
    the reward model's) names, the hub id for the embedded model; else the source
    the workbench loaded."""
    if checkpoint:
        saved = Path(checkpoint.path) / "adapter_config.json"
        if saved.exists():
            name = json.loads(saved.read_text()).get("base_model_name_or_path")
            if name:
                return str(name)
    if source == EMBEDDED:
        from rlhf.models import EMBEDDED_HUB_ID

        return EMBEDDED_HUB_ID
    return source


def readme(settings: dict[str, Any]) -> str:
    """How to run the recipe, and what it carries."""
    s, labels = settings["session"], settings["labels"]
    origin = (f"policy version {settings['policy_version']}'s session" if settings["policy_version"] is not None
              else "the workbench's defaults (no PPO or RLOO session yet)")
    base = settings["base"]
    local = Path(base).is_absolute()
    lines = [
        "# An RLHF workbench experiment, for TRL at scale", "",
        f"Written by `rlhf export-recipe` from `{settings['database']}`.", "",
        f"- **Base**: `{base}`" + (" (a path on the machine that wrote this: point `--base` or recipe.json at "
                                   "the cluster's copy)" if local else ""),
        f"- **Labels**: {labels['pairs']} preference pairs from {labels['comparisons']} comparisons "
        f"(`preferences.jsonl`, TRL's conversational preference format)",
        f"- **Session settings**, from {origin}: beta {s['beta']}, {s['rloo_k']} answers a prompt, at most "
        f"{s['max_new_tokens']} new tokens, temperature {s['temperature']}, top-p {s['top_p']}, learning rate "
        f"{s['learning_rate']}" + (" (the workbench session ran PPO; TRL's maintained on-policy trainer here is "
                                    "RLOO)" if s["algorithm"] == "ppo" else ""),
        "", "## Run it", "", "```sh",
        "pip install 'trl==1.12.0' peft accelerate",
        "accelerate launch --config_file accelerate.yaml train.py reward   # -> runs/reward",
        "accelerate launch --config_file accelerate.yaml train.py policy   # -> runs/policy (a LoRA adapter)",
        "```", "",
        *_reward_lines(settings["reward_model"]),
        "Set `num_processes` in accelerate.yaml to the GPU count. `python train.py all --cpu --max-steps 1` is a "
        "smoke run. The settings are in `recipe.json`: edit them there.", "",
        "## What differs from the workbench", "",
        "- `train.py reward` trains a reward model again from the labels, as TRL does (a LoRA sequence "
        "classifier reading the last layer at the last token); the workbench's own reads a middle layer's "
        "mean through bagged heads (`reward_model/` carries it, with the few lines of code that read it so).",
        "- Training runs in bf16 on GPUs, not on a 4-bit base; the KL penalty is TRL's (per answer, against "
        "the base).",
    ]
    return "\n".join(lines) + "\n"


def _reward_lines(reward: dict[str, Any]) -> list[str]:
    if not reward.get("path"):
        return [f"The workbench's reward model is not included ({reward['why']}).", ""]
    accuracy = reward.get("eval_accuracy")
    held = f", held-out accuracy {accuracy:.2f} on {reward['eval_pairs']} pairs" if isinstance(accuracy, float) else ""
    return [f"Or skip the reward stage: `train.py policy --reward {reward['path']}` runs RLOO against the "
            f"workbench's own reward model (version {reward['version']}{held}), exported to `{reward['path']}/` "
            "as a sequence classifier (loaded with `trust_remote_code`).", ""]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
