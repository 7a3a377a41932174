"""Sampling speed and memory on the embedded model: full precision against 4-bit.

    python benchmarks/sampling.py [--k 4] [--new-tokens 64] [--repeats 3]

Prints tokens per second (completion tokens generated, EOS included) and peak
memory for K completions of one prompt, on the CPU and on CUDA when present.
Each configuration runs in its own process so peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PROMPT = "Write a short paragraph about why the sea is salty."


def measure(quantize: bool, device: str, k: int, new_tokens: int, repeats: int) -> dict:
    import torch

    from rlhf.model_options import ModelOptions
    from rlhf.models import load_stack, resolve_model_dir
    from rlhf.sampling import SamplingParams, sample_k

    resolve_model_dir("embedded")  # one-time conversion, not timed
    options = ModelOptions(quantize=quantize, device=device)
    load_stack(options)  # warms the 4-bit cache
    start = time.perf_counter()
    stack = load_stack(options)
    load_s = time.perf_counter() - start
    # Force full-length completions so every configuration generates the same work.
    params = SamplingParams(max_new_tokens=new_tokens, seed=0)
    stack.peft.generation_config.min_new_tokens = new_tokens
    sample_k(stack, [PROMPT], k, SamplingParams(max_new_tokens=4, seed=0))  # warm-up
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    tokens, seconds = 0, 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        [row] = sample_k(stack, [PROMPT], k, params)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        tokens += sum(s.n_tokens for s in row)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mb = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    precision = "4-bit NF4" if quantize else "full"
    return {"precision": precision, "device": device, "load_s": load_s,
            "tokens_per_s": tokens / seconds, "s_per_call": seconds / repeats,
            "peak_rss_mb": peak_rss_mb, "peak_gpu_mb": gpu_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("QUANTIZE", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        result = measure(args.one[0] == "1", args.one[1], args.k, args.new_tokens, args.repeats)
        print(json.dumps(result))
        return

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for quantize in (False, True):
            cmd = [sys.executable, __file__, "--k", str(args.k), "--new-tokens", str(args.new_tokens),
                   "--repeats", str(args.repeats), "--one", str(int(quantize)), device]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if out.returncode != 0:
                print(out.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"benchmark run failed: {' '.join(cmd)}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"K={args.k} completions x {args.new_tokens} new tokens, SmolLM2-135M-Instruct, {args.repeats} repeats, "
          f"torch {torch.__version__}, {os.cpu_count()} CPU cores")
    print(f"{'device':<6} {'precision':<10} {'load s':>7} {'tok/s':>8} {'s/call':>7} {'peak RSS MB':>12} {'peak GPU MB':>12}")
    for r in rows:
        gpu = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "-"
        print(f"{r['device']:<6} {r['precision']:<10} {r['load_s']:>7.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['s_per_call']:>7.2f} {r['peak_rss_mb']:>12.0f} {gpu:>12}")


if __name__ == "__main__":
    main()
