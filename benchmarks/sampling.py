"""Sampling speed and memory on the embedded model: ours against plain `generate`.

    python benchmarks/sampling.py [--k 4] [--new-tokens 64] [--repeats 3]

Prints tokens per second (completion tokens generated, EOS included) and peak
memory for K completions of one prompt, on the CPU and on CUDA when present:

- plain generate: what a user would write, ``transformers``' ``generate`` on the
  same model in full precision (float32 on a CPU), same K, length and sampling;
- ours as the workbench samples (``rlhf.sampling.sample_k`` on a ModelStack:
  LoRA policy adapter, log-probs kept), from the merged inference copy
  (rlhf.inference_copy): 4-bit NF4 and full weights, each in the precision
  chosen for the device (bf16 on a CPU with native bf16) and in float32;
- ours through the training path (the peft model, LoRA branches and 4-bit
  dequantization at every token), as it sampled before the inference copy.

Each configuration runs in its own process so peak memory is its own, and all of
them once a round, ``--rounds`` times: tokens per second is each one's median
over the rounds, since this machine's speed drifts by a fifth from minute to
minute. The last lines are each round's ratio and
``ratio tokens_per_s=<ours, default settings / plain generate>`` on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

PROMPT = "Write a short paragraph about why the sea is salty."


# name -> (4-bit, precision, from the inference copy): None is the device's choice
# (rlhf.model_stack.compute_dtype)
OURS = {"ours 4-bit (default)": (None, None, True), "ours full": (False, None, True),
        "ours 4-bit float32": (True, "float32", True), "ours full float32": (False, "float32", True),
        "ours 4-bit training path": (None, None, False), "ours full training path": (False, None, False)}
PLAIN = "plain generate float32"


def measure(config: str, device: str, k: int, new_tokens: int, repeats: int) -> dict:
    import torch

    from rlhf.models import resolve_model_dir

    resolve_model_dir("embedded")  # one-time conversion, not timed
    generate, load_s, precision = (_plain if config == PLAIN else _ours)(config, device, k, new_tokens)
    generate(4)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    tokens, seconds = 0, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        n = generate(new_tokens)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        tokens += n
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {"config": config, "precision": precision, "device": device, "load_s": load_s,
            "tokens_per_s": tokens / seconds, "s_per_call": seconds / repeats,
            "peak_rss_mb": peak_rss_mb, "peak_gpu_mb": gpu_mb}


def _ours(config: str, device: str, k: int, new_tokens: int):
    from rlhf.model_options import ModelOptions
    from rlhf.models import load_stack
    from rlhf.sampling import SamplingParams, sample_k

    quantize, dtype, fast = OURS[config]
    options = ModelOptions(quantize=quantize, device=device, dtype=dtype)
    load_stack(options)  # warms the 4-bit cache
    start = time.perf_counter()
    stack = load_stack(options)
    load_s = time.perf_counter() - start
    stack.fast_sampling = fast
    def generate(length: int) -> int:
        # Full-length completions, so that every configuration generates the same work.
        [row] = sample_k(stack, [PROMPT], k, SamplingParams(max_new_tokens=length, seed=0), min_new_tokens=length)
        return sum(s.n_tokens for s in row)

    return generate, load_s, stack.precision


def _plain(config: str, device: str, k: int, new_tokens: int):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.models import resolve_model_dir
    from rlhf.sampling_params import SamplingParams

    start = time.perf_counter()
    model_dir = resolve_model_dir("embedded")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    load_s = time.perf_counter() - start
    params = SamplingParams()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids.to(device).repeat(k, 1)

    def generate(length: int) -> int:
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=params.temperature, top_p=params.top_p, top_k=0,
                                 max_new_tokens=length, min_new_tokens=length, pad_token_id=tok.eos_token_id)
        return (out.shape[1] - ids.shape[1]) * k

    return generate, load_s, "float32"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls in each process")
    parser.add_argument("--rounds", type=int, default=3,
                        help="passes over all configurations, one after another; figures are their medians "
                             "(this machine's speed drifts from minute to minute)")
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = measure(args.one[0], args.one[1], args.k, args.new_tokens, args.repeats)
        print(json.dumps(result))
        return

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    runs: dict[tuple[str, str], list[dict]] = {}
    for _round in range(args.rounds):
        for device in devices:
            for config in (PLAIN, *OURS):
                cmd = [sys.executable, __file__, "--k", str(args.k), "--new-tokens", str(args.new_tokens),
                       "--repeats", str(args.repeats), "--one", config, device]
                out = subprocess.run(cmd, capture_output=True, text=True,
                                     env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"benchmark run failed: {' '.join(cmd)}")
                runs.setdefault((device, config), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = [{**results[0], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
             "s_per_call": statistics.median(r["s_per_call"] for r in results)} for results in runs.values()]
    print(f"K={args.k} completions x {args.new_tokens} new tokens, SmolLM2-135M-Instruct, {args.repeats} repeats "
          f"in each of {args.rounds} rounds (medians), torch {torch.__version__}, {os.cpu_count()} CPU cores")
    print(f"{'device':<6} {'configuration':<26} {'precision':<26} {'load s':>7} {'tok/s':>8} {'s/call':>7} "
          f"{'peak RSS MB':>12} {'peak GPU MB':>12}")
    for r in rows:
        gpu = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "-"
        print(f"{r['device']:<6} {r['config']:<26} {r['precision']:<26} {r['load_s']:>7.2f} "
              f"{r['tokens_per_s']:>8.1f} {r['s_per_call']:>7.2f} {r['peak_rss_mb']:>12.0f} {gpu:>12}")
    each = [ours["tokens_per_s"] / plain["tokens_per_s"]
            for ours, plain in zip(runs[("cpu", next(iter(OURS)))], runs[("cpu", PLAIN)])]
    print("ratio in each round: " + " ".join(f"{r:.2f}" for r in each))
    cpu = {r["config"]: r["tokens_per_s"] for r in rows if r["device"] == "cpu"}
    print(f"ratio tokens_per_s={cpu[next(iter(OURS))] / cpu[PLAIN]:.2f}")


if __name__ == "__main__":
    main()
