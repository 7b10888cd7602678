#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python) KV-cache quantisation on the same GGUF and token ids as kvcodec,
measured with the context-compression protocol of DESIGN.md §5 at budget 100% (no eviction):
the reference is the f16 cache in the same tool, so differences come from the cache type alone.

Per sample of N context + M continuation tokens (consecutive segments from token 0, no BOS): a
fresh cache, the N context tokens in one batch, the M continuation tokens in one batch, and the
M-1 predictions of continuation tokens 1..M-1 scored against the f16 run's. Flash attention is on
for every type (llama.cpp needs it to quantise V), the f16 reference included.

Install: pip install llama-cpp-python==0.3.36
Usage:   python3 bench/peers/llamacpp_peer.py [--types f16,q8_0,q4_0] [--samples 8] [--threads 2]
                                              [--out out/peers]
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

LLAMA_CPP_PYTHON_VERSION = "0.3.36"

# cache type -> (ggml type attribute, bytes per stored value: block bytes / block size)
TYPES = {
    "f16": ("GGML_TYPE_F16", 2.0),
    "q8_0": ("GGML_TYPE_Q8_0", 34 / 32),
    "q5_1": ("GGML_TYPE_Q5_1", 24 / 32),
    "q5_0": ("GGML_TYPE_Q5_0", 22 / 32),
    "q4_1": ("GGML_TYPE_Q4_1", 20 / 32),
    "q4_0": ("GGML_TYPE_Q4_0", 18 / 32),
}


def open_llama(llama_cpp, args, kv_type):
    """A llama.cpp context over --model with K and V stored as kv_type, room for N + M tokens,
    both halves of a sample in one batch each, and logits kept for every token."""
    n = args.context_len + args.continuation
    ggml = getattr(llama_cpp, TYPES[kv_type][0])
    return llama_cpp.Llama(model_path=args.model, n_ctx=n, n_batch=n, n_ubatch=n, n_threads=args.threads,
                           n_threads_batch=args.threads, type_k=ggml, type_v=ggml, flash_attn=True,
                           logits_all=True, seed=0, verbose=False)


def run_sample(llm, ctx, cont):
    """Feeds ctx then cont into an emptied cache. Returns ((M-1, V) float64 log-probs predicting
    cont[1:], seconds in the two eval calls). Changes llm's cache and scores."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ctx)
    llm.eval(cont)
    secs = time.perf_counter() - t0
    n, m = len(ctx), len(cont)
    return pc.log_softmax64(llm.scores[n:n + m - 1]), secs


def main():
    """Runs f16 and every other cache type on each sample; writes OUT/llamacpp.{csv,json}."""
    p = pc.parser(__doc__, "1.0")
    p.add_argument("--types", default="f16,q8_0,q4_0",
                   help=f"KV cache types, comma-separated, from: {','.join(TYPES)} [f16,q8_0,q4_0]")
    args = p.parse_args()
    budgets = pc.parse_budgets(args.budgets)
    if budgets != [1.0]:
        print("llama.cpp evicts nothing: --budgets other than 1.0 ignored")
    types = [x.strip() for x in args.types.split(",") if x.strip()]
    for t in types:
        if t not in TYPES:
            sys.exit(f"--types: unknown cache type '{t}' (known: {', '.join(TYPES)})")
    if "f16" in types:
        types.remove("f16")
    types = ["f16"] + types  # the reference runs first, in the same tool
    try:
        import llama_cpp
    except ImportError:
        print(f"llama-cpp-python not installed: pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}; skipped")
        return 0

    ids = pc.token_ids(args)
    samples = pc.make_samples(ids, args.context_len, args.continuation, args.samples)
    llms = {t: open_llama(llama_cpp, args, t) for t in types}
    print(f"llama-cpp-python {llama_cpp.__version__}, {args.threads} threads, flash attention on; "
          f"{len(samples)} samples of {args.context_len}+{args.continuation} tokens", flush=True)
    acc = {t: dict(scores=pc.Scores(), secs=0.0) for t in types}
    for si, (ctx, cont) in enumerate(samples):
        lp_full, secs = run_sample(llms["f16"], ctx, cont)
        acc["f16"]["scores"].add(lp_full, lp_full, cont[1:])
        acc["f16"]["secs"] += secs
        for t in types[1:]:
            lp, secs = run_sample(llms[t], ctx, cont)
            acc[t]["scores"].add(lp, lp_full, cont[1:])
            acc[t]["secs"] += secs
        print(f"sample {si + 1}/{len(samples)} done", flush=True)

    rows = []
    for t in types:
        row = pc.base_row(args, "llama.cpp", len(samples))
        bpt = 2 * pc.N_LAYERS * pc.N_KV_HEADS * pc.HEAD_DIM * TYPES[t][1]
        row.update(method=f"llama.cpp-{t}", repr=t, keep="full", budget=1.0, kept_frac=1.0, removed_frac=0.0,
                   bytes_per_token=bpt, ratio_vs_f16=pc.F16_BYTES_PER_TOKEN / bpt,
                   tokens_per_s=len(samples) * (args.context_len + args.continuation) / acc[t]["secs"],
                   seconds=acc[t]["secs"])
        row.update(acc[t]["scores"].summary())
        rows.append(row)
    path = pc.write_rows(rows, args.out, "llamacpp")
    pc.print_table(rows)
    print(f"wrote {path} and {path[:-4]}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
