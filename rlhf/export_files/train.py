"""Continue an RLHF workbench experiment with TRL, on as many GPUs as you have.

Written by `rlhf export-recipe`, beside the files it reads:

- ``recipe.json``: the base model, the LoRA shape, and the workbench session's
  settings (beta, length budget, sampling, learning rate, samples per prompt);
- ``preferences.jsonl``: the labels, in TRL's conversational preference format;
- ``prompts.jsonl``: the prompts the policy trains on.

Two stages, as in the workbench:

    accelerate launch --config_file accelerate.yaml train.py reward   # reward model on the labels
    accelerate launch --config_file accelerate.yaml train.py policy   # RLOO against it

``reward`` trains a sequence classifier (LoRA, merged when done) on the labels
with TRL's RewardTrainer and saves it to ``runs/reward``; ``policy`` trains a
LoRA policy with TRL's RLOOTrainer (K answers a prompt, each against the other
K-1) against that reward model (or with ``--reward reward_model`` against the
workbench's own, exported beside this script), KL-regularized towards the base with the
session's beta, and saves the adapter to ``runs/policy``. ``--max-steps`` and
``--cpu`` are for a smoke run; ``--base`` points at another copy of the base.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=("reward", "policy", "all"))
    p.add_argument("--base", help="the base model (default: recipe.json's)")
    p.add_argument("--output", type=Path, default=HERE / "runs", help="where runs/reward and runs/policy go")
    p.add_argument("--reward", type=Path, help="the reward model RLOO runs against (default: what the reward "
                                               "stage wrote; reward_model for the workbench's own)")
    p.add_argument("--max-steps", type=int, default=-1, help="stop each stage after this many steps (a smoke run)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU")
    p.add_argument("--report-to", default="tensorboard", help="TRL's report_to: tensorboard, wandb, none")
    args = p.parse_args(argv)
    recipe = json.loads((HERE / "recipe.json").read_text())
    recipe["base"] = args.base or recipe["base"]
    if args.stage in ("reward", "all"):
        train_reward(recipe, args)
    if args.stage in ("policy", "all"):
        train_policy(recipe, args)


def common(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Trainer settings both stages share."""
    import torch

    bf16 = not args.cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return {"output_dir": str(out), "max_steps": args.max_steps, "use_cpu": args.cpu, "bf16": bf16,
            "report_to": [] if args.report_to == "none" else [args.report_to], "logging_steps": 1,
            "save_strategy": "no", "seed": 0}


def lora(recipe: dict[str, Any], task_type: str) -> Any:
    from peft import LoraConfig

    shape = recipe["lora"]
    return LoraConfig(r=shape["r"], lora_alpha=shape["alpha"], lora_dropout=shape["dropout"],
                      target_modules=shape["target_modules"], task_type=task_type)


def train_reward(recipe: dict[str, Any], args: argparse.Namespace) -> None:
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    settings = recipe["reward"]
    tokenizer = AutoTokenizer.from_pretrained(recipe["base"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(recipe["base"], num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    pairs = load_dataset("json", data_files=str(HERE / "preferences.jsonl"), split="train")
    # Held out by row, not by prompt as the workbench does: a check, not the stopping rule.
    split = pairs.train_test_split(test_size=settings["eval_fraction"], seed=0) if len(pairs) >= 10 else None
    config = RewardConfig(**common(args, args.output / "reward-lora"), num_train_epochs=settings["epochs"],
                          per_device_train_batch_size=settings["batch_size"], learning_rate=settings["lr"],
                          max_length=settings["max_length"], eval_strategy="epoch" if split else "no")
    trainer = RewardTrainer(model=model, args=config, train_dataset=split["train"] if split else pairs,
                            eval_dataset=split["test"] if split else None, processing_class=tokenizer,
                            peft_config=lora(recipe, "SEQ_CLS"))
    trainer.train()
    if trainer.accelerator.is_main_process:
        # Merged, so that RLOOTrainer loads it by path as a plain sequence classifier.
        merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
        merged.save_pretrained(args.output / "reward")
        tokenizer.save_pretrained(args.output / "reward")


def train_policy(recipe: dict[str, Any], args: argparse.Namespace) -> None:
    from datasets import load_dataset
    from trl import RLOOConfig, RLOOTrainer

    session = recipe["session"]
    reward = args.output / "reward" if args.reward is None else (
        args.reward if args.reward.exists() else HERE / args.reward)
    if not (reward / "config.json").exists():
        raise SystemExit(f"no reward model at {reward}: run `train.py reward` first, or pass --reward")
    prompts = load_dataset("json", data_files=str(HERE / "prompts.jsonl"), split="train")
    k = session["rloo_k"]
    config = RLOOConfig(**common(args, args.output / "policy"), num_train_epochs=session["prompt_epochs"],
                        per_device_train_batch_size=k, num_generations=k, beta=session["beta"],
                        max_completion_length=session["max_new_tokens"], temperature=session["temperature"],
                        top_p=session["top_p"], learning_rate=session["learning_rate"],
                        trust_remote_code=True)  # the workbench's exported reward model reads with its own code
    trainer = RLOOTrainer(model=recipe["base"], reward_funcs=str(reward), args=config, train_dataset=prompts,
                          peft_config=lora(recipe, "CAUSAL_LM"))
    trainer.train()
    trainer.save_model(str(args.output / "policy"))


if __name__ == "__main__":
    main()
