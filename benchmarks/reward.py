"""Reward-model training, ours against TRL's RewardTrainer, on the same work.

    python benchmarks/reward.py [--pairs 128] [--steps 12] [--batch-size 4] [--accum 1]
                                [--max-length 320] [--device cpu|cuda] [--quick]

Same pairs (the start of ../shared/data/hh-harmless-sample.jsonl, read with
rlhf.exchange_import.read_preference_file), same base model (the embedded SmolLM2-135M,
from rlhf.models.resolve_model_dir('embedded')), same LoRA shape (r 16, alpha 32,
dropout 0, all linear layers, plus a trained scalar head), same token sequences
(our chat-template prompt + completion + EOS, handed to TRL pre-tokenized), same
batch, accumulation, steps, learning rate and linear decay, and the same held-out
prompts (split by prompt-text hash). Both in the device's compute dtype
(rlhf.model_stack.compute_dtype: bf16 on a CPU that multiplies it natively, else
fp32; the GPU's bf16/fp16 on CUDA), neither with gradient checkpointing (TRL turns
it on by default; off here so both do the same arithmetic).

Where ours saves: a pair's prompt is read once, its two answers after it
(rlhf.shared_prompt), and short pairs share a row with a long one instead of
being padded to it; TRL pads chosen and rejected, prompt and all, to the
longest sequence of the batch.

Pairs longer than --max-length tokens are left out before choosing --pairs of
them, so neither trainer truncates anything.

Ours fine-tunes (``finetune=True``) reading the last layer at EOS, as TRL's
sequence classifier does; it first fits its head on the frozen features (seconds,
not timed), so at equal steps it starts from a better head. Its default, the
head alone on a third of the depth, is not what this compares.

Each trainer runs in its own process, so its peak memory is its own: peak RSS
on the CPU, torch.cuda.max_memory_allocated on CUDA. Seconds per step is the
mean over the steps between the first (warm-up) and the last (ours evaluates
there). Prints a table, and as its last line
``ratio time=<ours/TRL per step> memory=<ours/TRL peak>``.

Sized so the default run takes under 20 minutes on two CPU cores (trl is the
``bench`` extra: pip install -e '.[bench]').
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
DATA = ROOT.parent / "shared" / "data" / "hh-harmless-sample.jsonl"
LR = 1e-4          # TRL's RewardConfig default for LoRA, also ours
EVAL_FRACTION = 0.3  # of prompts; forward passes only, so a bigger held-out set is cheap
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}  # rlhf.models.LoraSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=128, help="pairs used, train and held out together")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per forward pass")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--max-length", type=int, default=320, help="longest sequence kept, in tokens")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smoke run: 24 pairs, 3 steps, 192 tokens")
    p.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.steps, args.max_length = 24, 3, 192
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


# --- the shared work ----------------------------------------------------------------


def elements(args: argparse.Namespace, tokenizer: Any) -> list[Any]:
    """The benchmark's pairs as our batch elements (the real import path: a
    temporary store, then rlhf.reward_data.store_elements)."""
    from rlhf.exchange_import import read_preference_file
    from rlhf.reward_data import store_elements
    from rlhf.store import Store

    pairs, _errors = read_preference_file(args.data)
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "bench.db") as store:
        for i, pair in enumerate(pairs):
            store.add_imported_pair(pair.prompt, pair.chosen, pair.rejected, "bench", f"bench-{i}")
        found = store_elements(store, tokenizer, sources="import", max_length=10**6,
                               max_completion_tokens=10**6)
    fitting = [e for e in found if max(len(s) for s in e.sequences) <= args.max_length]
    if len(fitting) < args.pairs:
        raise SystemExit(f"only {len(fitting)} pairs fit in {args.max_length} tokens: lower --pairs or "
                         "raise --max-length")
    return fitting[:args.pairs]


def peak_memory(device: str) -> int:
    """Bytes: CUDA's peak allocation, or this process's peak RSS."""
    import torch

    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def per_step(stamps: list[float]) -> float:
    """Mean seconds of the steps between the first (warm-up) and the last (ours
    evaluates there); all steps when there are fewer than three."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    middle = gaps[1:-1] if len(gaps) > 2 else gaps
    return sum(middle) / len(middle)


# --- ours ---------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from rlhf.model_options import LoraSettings, ModelOptions
    from rlhf.models import load_stack, resolve_model_dir
    from rlhf.reward_config import RewardConfig
    from rlhf.reward_train import train

    torch.manual_seed(args.seed)
    stack = load_stack(ModelOptions(source=resolve_model_dir("embedded"), quantize=False, device=args.device,
                                    lora=LoraSettings(**LORA)))
    loaded = peak_memory(args.device)
    items = elements(args, stack.tokenizer)
    config = RewardConfig(finetune=True, readout="eos", layer=stack.depth, steps=args.steps, lr=LR,
                          batch_size=args.batch_size, accum=args.accum, eval_fraction=EVAL_FRACTION,
                          eval_every=10**9, max_length=args.max_length, seed=args.seed)
    stamps = [time.perf_counter()]
    result = train(stack, items, config, log=lambda step, metrics: stamps.append(time.perf_counter()))
    # The fine-tuning steps are the last ones logged; the stamp before them ends the head's fit.
    return {"seconds_per_step": per_step(stamps[-(args.steps + 1):]), "peak_bytes": peak_memory(args.device),
            "loaded_bytes": loaded,
            "eval_accuracy": result.eval.accuracy, "eval_pairs": result.eval.n_pairs,
            "train_pairs": result.n_train}


# --- TRL ------------------------------------------------------------------------------------


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from rlhf.model_stack import compute_dtype
    from rlhf.models import load_tokenizer, resolve_model_dir
    from rlhf.reward_data import split_by_prompt

    torch.manual_seed(args.seed)
    model_dir = resolve_model_dir("embedded")
    device = torch.device(args.device)
    dtype = compute_dtype(device)
    tokenizer = load_tokenizer(model_dir)
    items = elements(args, tokenizer)
    train_items, held_out = split_by_prompt(items, EVAL_FRACTION)  # the split ours makes inside train()

    def dataset(part: list[Any]) -> Dataset:
        return Dataset.from_dict({"chosen_ids": [e.sequences[0] for e in part],
                                  "rejected_ids": [e.sequences[1] for e in part]})

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    loaded = peak_memory(args.device)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *_a: Any, **_k: Any) -> None:
            stamps.append(time.perf_counter())

        def on_step_end(self, *_a: Any, **_k: Any) -> None:
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        config = RewardConfig(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.accum,
            learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
            gradient_checkpointing=False, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
            use_cpu=device.type == "cpu", max_length=None, logging_steps=args.steps, save_strategy="no",
            report_to=[], seed=args.seed, dataloader_num_workers=0, disable_dropout=True)
        lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                          target_modules=LORA["target_modules"], task_type="SEQ_CLS")
        trainer = RewardTrainer(model=model, args=config, train_dataset=dataset(train_items),
                                eval_dataset=dataset(held_out), processing_class=tokenizer, peft_config=lora,
                                callbacks=[Clock()])
        trainer.train()
        # TRL evaluates after training; its last step is not an evaluation step,
        # but per_step() drops it all the same, so both means cover the same steps.
        metrics = trainer.evaluate()
    return {"seconds_per_step": per_step(stamps), "peak_bytes": peak_memory(args.device), "loaded_bytes": loaded,
            "eval_accuracy": metrics["eval_accuracy"], "eval_pairs": len(held_out), "train_pairs": len(train_items)}


# --- the driver -------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run_ours(args) if args.worker == "ours" else run_trl(args)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(name: str, argv: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, __file__, *argv, "--worker", name], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"the {name} run failed (exit {proc.returncode})")
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = time.monotonic() - started
    return result


def main(argv: list[str] | None = None) -> None:
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(raw)
    if args.worker:
        worker(args)
        return
    from rlhf.models import resolve_model_dir

    resolve_model_dir("embedded", progress=lambda m: print(m, file=sys.stderr))  # convert once, untimed
    passed = raw + (["--device", args.device] if "--device" not in raw else [])
    results = {name: spawn(name, passed) for name in ("ours", "trl")}
    ours, trl = results["ours"], results["trl"]
    print(f"reward-model training: {args.pairs} HH-harmless pairs ({ours['train_pairs']} train, "
          f"{ours['eval_pairs']} held out by prompt), {args.steps} steps x {args.batch_size} pairs x {args.accum} "
          f"accum, <= {args.max_length} tokens, {args.device}")
    print(f"{'trainer':<8} {'s/step':>8} {'loaded MiB':>11} {'peak MiB':>9} {'held-out acc':>13} {'wall s':>7}")
    for name, r in results.items():
        print(f"{name:<8} {r['seconds_per_step']:>8.2f} {r['loaded_bytes'] / 2**20:>11.0f} "
              f"{r['peak_bytes'] / 2**20:>9.0f} {r['eval_accuracy']:>13.3f} {r['wall_s']:>7.0f}")
    print(f"ratio time={ours['seconds_per_step'] / trl['seconds_per_step']:.2f} "
          f"memory={ours['peak_bytes'] / trl['peak_bytes']:.2f}")


if __name__ == "__main__":
    main()
