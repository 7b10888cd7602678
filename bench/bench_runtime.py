#!/usr/bin/env python3
"""Prefill and decode speed of kvcodec against llama.cpp (llama-cpp-python) on the same GGUF.

Both engines get the same prompt (the first --prompt-tokens tokens of the eval corpus),
the same thread count, then greedy-decode --gen-tokens tokens one at a time. The two are
run alternately, --rounds times, in one process tree, so machine noise hits both alike;
the report gives medians and the ratio kvcodec / llama.cpp.

Needs: build/kvcodec, the default model (scripts/setup.sh), and `pip install llama-cpp-python`.
Usage: python3 bench/bench_runtime.py [--threads 2] [--prompt-tokens 128] [--gen-tokens 64]
                                      [--rounds 5] [--json out.json]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llama_cpp_round(llm, prompt_ids, gen):
    """One prefill + greedy decode with llama.cpp; returns (prefill tok/s, decode tok/s)."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    t1 = time.perf_counter()
    for _ in range(gen):
        # logits of the last evaluated token (logits_all=False, as kvcodec computes only that row)
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        llm.eval([int(logits.argmax())])
    t2 = time.perf_counter()
    return len(prompt_ids) / (t1 - t0), gen / (t2 - t1)


def kvcodec_round(args):
    cmd = [os.path.join(ROOT, "build", "kvcodec"), "bench", "--model", args.model, "--text", args.text,
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
           "--threads", str(args.threads), "--reps", "1", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    r = json.loads(out)
    return r["prefill_tok_s"], r["decode_tok_s"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--text", default=os.path.join(ROOT, "data", "corpora", "eval-debian-handbook.txt"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("bench_runtime: llama-cpp-python is not installed (pip install llama-cpp-python)")
    if not os.path.exists(os.path.join(ROOT, "build", "kvcodec")):
        sys.exit("bench_runtime: build/kvcodec not found (run scripts/setup.sh)")
    llm = llama_cpp.Llama(model_path=args.model, n_ctx=args.prompt_tokens + args.gen_tokens + 8,
                          n_batch=max(512, args.prompt_tokens), n_threads=args.threads,
                          n_threads_batch=args.threads, logits_all=False, verbose=False)
    with open(args.text, "rb") as f:
        text = f.read(200000)
    prompt = llm.tokenize(text, add_bos=False, special=False)[: args.prompt_tokens]
    res = {"kvcodec": {"prefill": [], "decode": []}, "llama.cpp": {"prefill": [], "decode": []}}
    llama_cpp_round(llm, prompt, 4)  # warm-up
    kvcodec_round(args)
    for r in range(args.rounds):
        p, d = kvcodec_round(args)
        res["kvcodec"]["prefill"].append(p)
        res["kvcodec"]["decode"].append(d)
        p, d = llama_cpp_round(llm, prompt, args.gen_tokens)
        res["llama.cpp"]["prefill"].append(p)
        res["llama.cpp"]["decode"].append(d)
        print(f"round {r + 1}: kvcodec prefill {res['kvcodec']['prefill'][-1]:.1f} decode "
              f"{res['kvcodec']['decode'][-1]:.1f} | llama.cpp prefill {p:.1f} decode {d:.1f} tok/s",
              file=sys.stderr)
    med = {e: {k: statistics.median(v) for k, v in d.items()} for e, d in res.items()}
    summary = {
        "machine": platform.processor() or platform.machine(), "threads": args.threads,
        "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "rounds": args.rounds,
        "llama_cpp_python": llama_cpp.__version__, "median_tok_s": med,
        "ratio_prefill": med["kvcodec"]["prefill"] / med["llama.cpp"]["prefill"],
        "ratio_decode": med["kvcodec"]["decode"] / med["llama.cpp"]["decode"], "raw": res,
    }
    print(f"{'engine':<10} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for e in ("kvcodec", "llama.cpp"):
        print(f"{e:<10} {med[e]['prefill']:>14.1f} {med[e]['decode']:>13.1f}")
    print(f"{'ratio':<10} {summary['ratio_prefill']:>13.2f}x {summary['ratio_decode']:>12.2f}x"
          f"   (kvcodec / llama.cpp, medians of {args.rounds} alternating rounds, {args.threads} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
