"""PPO iterations, ours against TRL's PPOTrainer, on the same work.

    python benchmarks/ppo.py [--iterations 3] [--batch-size 8] [--mini-batch-size 4]
                             [--epochs 2] [--response-length 16] [--device cpu|cuda]
                             [--dtype float32|bfloat16] [--quick]

One fixed configuration for both: the embedded SmolLM2-135M-Instruct (converted
once by rlhf.models.resolve_model_dir), the same chat-template prompts
(sample_prompts/default.jsonl), rollout batch, minibatch, PPO epochs, response
length (sampling at temperature 0.7 over the full distribution, stopping at
EOS), learning rate, beta 0.05, clip 0.2, value clip 0.2, vf_coef 0.1, gamma 1,
lambda 0.95. Both in one precision (--dtype, float32 by default; TRL's models
are loaded in it as ours is), no gradient checkpointing.

- ours: rlhf.ppo_session.PPOSession on one ModelStack: the policy is a LoRA adapter
  (r 16, all linear layers), the reference the same base with adapters off, the
  reward model another adapter with a scalar head, the value head a linear layer
  on the policy's hidden state. One base model in memory.
- TRL: trl.experimental.ppo.PPOTrainer (trl 1.12.0; TRL removed PPO in 1.13),
  in two set-ups: as its documentation sets it up, four full models (policy,
  reference copy, reward model, value model), policy and value trained in full;
  and at its best memory setting, the policy a LoRA adapter through
  ``peft_config`` (the same LoRA shape as ours), the reference the policy with
  the adapter disabled, so three models (value and reward stay full).

Ours also prints where an iteration's time goes (sampling, the teacher-forced
passes of policy and reference, scoring, the update).

The reward heads are untrained on both sides (the timing does not depend on
what the reward says). Each trainer runs in its own process, so its peak memory
is its own: peak RSS on the CPU, torch.cuda.max_memory_allocated on CUDA.
Seconds per iteration is the mean over the iterations after the first (warm-up).
Prints a table, and as its last line
``ratio time=<ours/TRL LoRA per iteration> memory=<ours/TRL LoRA peak>``.

Environment: trl==1.12.0 installs into the project's .venv without changing
torch, transformers or peft (checked with ``pip install --dry-run trl==1.12.0``),
so no separate venv is needed: ``pip install -e '.[bench]'``.
Sized for two CPU cores: the default run takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LR = 1e-5            # same for both; the timing does not depend on it
TEMPERATURE = 0.7
BETA = 0.05
WORKERS = ("ours", "trl", "trl-lora")
# ours' per-stage seconds (rlhf.ppo_session metrics time/<stage>_s), in the order they run
STAGES = ("sample", "forward", "score", "update")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=3, help="PPO iterations (the first is warm-up)")
    p.add_argument("--batch-size", type=int, default=8, help="episodes per iteration")
    p.add_argument("--mini-batch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=2, help="PPO epochs per batch")
    p.add_argument("--response-length", type=int, default=16, help="max new tokens")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the precision both sides compute in (default float32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run: 2 iterations of 4 episodes, 8 tokens")
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.iterations, args.batch_size, args.mini_batch_size, args.response_length = 2, 4, 2, 8
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def prompts(n: int) -> list[str]:
    from rlhf.prompts import bundled_prompt_file, read_prompt_file

    texts = read_prompt_file(bundled_prompt_file()).prompts
    return [texts[i % len(texts)] for i in range(n)]


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# --- ours -------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from rlhf.model_options import ModelOptions
    from rlhf.models import load_stack
    from rlhf.ppo_config import PPOConfig
    from rlhf.ppo_session import PPOSession
    from rlhf.reward_config import Readout
    from rlhf.reward_scoring import RewardScorer

    torch.manual_seed(args.seed)
    stack = load_stack(ModelOptions(source="embedded", quantize=False, device=args.device, dtype=args.dtype))
    stack.ensure_adapter("reward")
    config = PPOConfig(batch_size=args.batch_size, mini_batch_size=args.mini_batch_size, epochs=args.epochs,
                       max_new_tokens=args.response_length, temperature=TEMPERATURE, learning_rate=LR,
                       beta=BETA, seed=args.seed, forward_batch_size=args.batch_size,
                       missing_eos="subtract", missing_eos_penalty=1.0)  # TRL's missing_eos_penalty subtracts
    # The last layer at EOS, as TRL's reward model reads (ours reads a third of the way up by default).
    scorer = RewardScorer(stack, readout=Readout(layer=stack.depth, pool="eos"))
    session = PPOSession(stack, scorer, prompts(4 * args.batch_size), config)
    times, tokens, stages = [], [], []
    for i in range(1, args.iterations + 1):
        started = time.perf_counter()
        metrics, _ = session.iteration(i)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        tokens.append(metrics["val/completion_tokens"])
        stages.append({stage: metrics[f"time/{stage}_s"] for stage in STAGES})
        print(f"ours iteration {i}: {times[-1]:.2f} s", file=sys.stderr, flush=True)
    return {"times": times, "tokens": tokens, "stages": stages, "peak_mb": peak_memory_mb(args.device)}


# --- TRL --------------------------------------------------------------------------------


def run_trl(args: argparse.Namespace, lora: bool) -> dict[str, Any]:
    """TRL's PPOTrainer: four full models, or (``lora``) a LoRA policy whose
    reference is the policy with its adapter disabled."""
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from rlhf.chat import chat_prompt_ids
    from rlhf.model_options import LoraSettings
    from rlhf.models import load_tokenizer, resolve_model_dir

    torch.manual_seed(args.seed)
    model_dir = resolve_model_dir("embedded")
    tok = load_tokenizer(model_dir)
    rows = [chat_prompt_ids(tok, p) for p in prompts(4 * args.batch_size)]
    data = Dataset.from_dict({"input_ids": rows})
    dtype = getattr(torch, args.dtype)

    def causal() -> Any:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)

    def scalar() -> Any:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype)
        model.config.pad_token_id = tok.pad_token_id
        return model

    times: list[float] = []

    class Clock(TrainerCallback):
        started = 0.0

        def on_train_begin(self, *a: Any, **k: Any) -> None:
            Clock.started = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - Clock.started)
            print(f"trl iteration {len(times)}: {times[-1]:.2f} s", file=sys.stderr, flush=True)
            Clock.started = now

    with tempfile.TemporaryDirectory() as out:
        config = PPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            num_mini_batches=args.batch_size // args.mini_batch_size, num_ppo_epochs=args.epochs,
            response_length=args.response_length, total_episodes=args.batch_size * args.iterations,
            local_rollout_forward_batch_size=args.batch_size, num_sample_generations=0,
            temperature=TEMPERATURE, learning_rate=LR, kl_coef=BETA, cliprange=0.2, cliprange_value=0.2,
            vf_coef=0.1, gamma=1.0, lam=0.95, stop_token="eos", missing_eos_penalty=1.0, seed=args.seed,
            report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, bf16=False, fp16=False,
            gradient_checkpointing=False, use_cpu=not args.device.startswith("cuda"),
            lr_scheduler_type="constant",
        )
        peft_config = None
        if lora:
            from peft import LoraConfig

            shape = LoraSettings()  # ours
            peft_config = LoraConfig(r=shape.r, lora_alpha=shape.alpha, lora_dropout=shape.dropout,
                                     target_modules=shape.target_modules, task_type="CAUSAL_LM")
        trainer = PPOTrainer(args=config, processing_class=tok, model=causal(),
                             ref_model=None if lora else causal(), reward_model=scalar(), value_model=scalar(),
                             train_dataset=data, eval_dataset=data, callbacks=[Clock()], peft_config=peft_config)
        trainer.train()
    return {"times": times, "peak_mb": peak_memory_mb(args.device)}


# --- the comparison -----------------------------------------------------------------------


def worker(args: argparse.Namespace, which: str) -> dict[str, Any]:
    """Run one side in its own process; returns what it printed as JSON."""
    cmd = [sys.executable, __file__, "--worker", which, "--iterations", str(args.iterations),
           "--batch-size", str(args.batch_size), "--mini-batch-size", str(args.mini_batch_size),
           "--epochs", str(args.epochs), "--response-length", str(args.response_length),
           "--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    sys.stderr.write("".join(line + "\n" for line in proc.stderr.splitlines() if "iteration" in line))
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def per_iteration(times: list[float]) -> float:
    steady = times[1:] or times
    return sum(steady) / len(steady)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = run_ours(args) if args.worker == "ours" else run_trl(args, lora=args.worker == "trl-lora")
        print(json.dumps(result))
        return 0
    if args.batch_size % args.mini_batch_size:
        raise SystemExit("--batch-size must be a multiple of --mini-batch-size (TRL needs it)")
    print(f"PPO, {args.batch_size} episodes x {args.response_length} tokens, minibatch {args.mini_batch_size}, "
          f"{args.epochs} epochs, {args.iterations} iterations, SmolLM2-135M {args.dtype} on {args.device} "
          f"({os.cpu_count()} cores)")
    results = {which: worker(args, which) for which in WORKERS}
    names = {"ours": "ours (1 base + LoRA adapters)", "trl": "TRL PPOTrainer (4 full models)",
             "trl-lora": "TRL PPOTrainer (LoRA policy, peft_config)"}
    print(f"{'':<44}{'s/iteration':>12}{'peak MB':>10}")
    for which, result in results.items():
        if "error" in result:
            print(f"{names[which]:<44}failed: {result['error']}")
        else:
            print(f"{names[which]:<44}{per_iteration(result['times']):>12.2f}{result['peak_mb']:>10.0f}")
    ours, trl, lora = results["ours"], results["trl"], results["trl-lora"]
    if "error" not in ours:
        steady = ours["stages"][1:] or ours["stages"]
        print("ours, where an iteration goes: " + ", ".join(
            f"{stage} {sum(s[stage] for s in steady) / len(steady):.2f} s" for stage in STAGES))
    for label, other in (("4 full models", trl), ("LoRA", lora)):
        if "error" not in ours and "error" not in other:
            print(f"against TRL ({label}): time {per_iteration(ours['times']) / per_iteration(other['times']):.2f} "
                  f"memory {ours['peak_mb'] / other['peak_mb']:.2f}")
    if "error" in ours or "error" in lora:
        print("ratio time=nan memory=nan")
        return 1
    print(f"ratio time={per_iteration(ours['times']) / per_iteration(lora['times']):.2f} "
          f"memory={ours['peak_mb'] / lora['peak_mb']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
