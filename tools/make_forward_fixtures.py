#!/usr/bin/env python3
"""Reference fixtures for the kvcodec Llama forward pass.

Runs two reference implementations on the same GGUF file that our runtime
loads and writes line-oriented text fixtures (plus one raw float32 file) that
the C tests parse.  Lines starting with '#' are comments; the first comment
lines record this script, the reference library versions, the GGUF sha256 and
the date.

References
----------
* transformers (+ gguf-py), ``AutoModelForCausalLM.from_pretrained(dir,
  gguf_file=name, torch_dtype=torch.float32)``: the weights are dequantized to
  float32 and the whole forward pass runs in float32, like our runtime.  This is
  the primary reference for logits, greedy continuations and perplexity.
* llama.cpp through llama-cpp-python, ``Llama(model_path, n_ctx,
  logits_all=True, n_threads=2)``: the reference for token ids (its tokenizer is
  the only tokenizer used here; the transformers tokenizer is never used) and a
  second reference for perplexity.  llama.cpp quantizes activations (Q8_1) for
  its quantized matmuls, so its logits differ slightly from the f32 reference;
  the difference is measured and printed (and recorded as a comment in
  logits_ref.txt).

Tokenization: ``llm.tokenize(text.encode('utf-8'), add_bos=False,
special=False)`` (the model has add_bos_token=false); the chat prompt is
tokenized with special=True so that <|im_start|>/<|im_end|> become single
control tokens.  Threads: torch.set_num_threads(2), llama.cpp n_threads=2.

Outputs (in --out, default tests/fixtures)
------------------------------------------
logits_ref.txt
    ``tokens N id0 ... idN-1`` for a 64..100-token prompt (a paragraph of the
    eval corpus, not from its start, plus a line of shell code), then for every
    position p ``row p ARGMAX LSE id:logit ...`` with the top 20 logits of that
    row (descending logit, ties by ascending id, %.6f), LSE = logsumexp of the
    full row (computed in float64), then ``full_rows p1 p2 p3`` (first, middle,
    last position).
logits_ref_rows.f32
    raw little-endian float32 logits, vocab (49152) values per row, for the
    positions listed in ``full_rows`` in that order.
greedy_ref.txt
    for each of 3 prompts (plain English; chat template
    ``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`` tokenized
    with special=True; code/technical): ``prompt N ids...`` then ``gen 32
    ids...`` = greedy (argmax at every step, no stop at EOS, exactly 32 new
    tokens, incremental decoding with a KV cache) continuation from
    transformers f32.  Comment lines give the decoded text (llama.cpp
    detokenizer) and whether llama.cpp's greedy continuation (argmax of its
    logits) agrees.
ppl_ref.txt
    ``ppl ref=R ctx=C tokens=T count=K nll=SUM ppl=X`` for R in
    {transformers, llamacpp} and (T, C) in {(1024, 256), (16384, 512)}.
eval_tokens_head.txt
    ``tokens N ids...``: the first 1024 token ids of the eval corpus.

Perplexity protocol
-------------------
1. Tokenize the whole eval corpus (file bytes, UTF-8) with llama.cpp, no BOS,
   special=False.
2. Take the first T tokens.
3. Split them into consecutive non-overlapping windows of C tokens; the last
   partial window is dropped if it is shorter than 2 tokens, otherwise it is
   evaluated as is.
4. Each window is evaluated from an empty KV cache (no BOS added), positions
   0..len-1.
5. NLL is summed over positions t = 1..len-1 of each window: token t is
   predicted from tokens 0..t-1 of the same window, nll_t = logsumexp(logits
   row t-1) - logits[t-1][token t] (accumulated in float64).  count K = sum over
   windows of (len - 1).
6. ppl = exp(total NLL / K).

Regenerate (from the repo root, ~10 minutes on 2 cores):
    python3 tools/make_forward_fixtures.py
Only some parts (e.g. while iterating):
    python3 tools/make_forward_fixtures.py --parts logits,greedy
Only print how far llama.cpp's logits are from transformers' (writes nothing):
    python3 tools/make_forward_fixtures.py --parts compare
"""

import argparse
import datetime
import hashlib
import math
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODEL = os.path.join("models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_CORPUS = os.path.join("data", "corpora", "eval-debian-handbook.txt")
DEFAULT_OUT = os.path.join("tests", "fixtures")

N_THREADS = 2
TOPK = 20
GEN_TOKENS = 32
PPL_SETTINGS = [(1024, 256), (16384, 512)]  # (T tokens, C window)
HEAD_TOKENS = 1024

# Logits prompt: a paragraph from the eval corpus (located by its opening
# words, well past the start of the file) followed by one line of shell code.
LOGITS_PARAGRAPH_START = "In this case, if you think that replacing this file"
LOGITS_CODE_LINE = "$ sudo dpkg -i --force-overwrite zsh_5.8-6_amd64.deb\n"

GREEDY_PROMPTS = [
    ("plain", False,
     "The history of the Debian project began in 1993, when Ian Murdock"),
    ("chat", True,
     "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ("code", False,
     "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
]

ALL_PARTS = ("tokens", "logits", "greedy", "ppl")
EXTRA_PARTS = ("compare",)  # not run by default


def rel(path):
    """Path relative to the repo root (for headers; never machine-absolute)."""
    try:
        return os.path.relpath(os.path.abspath(path), REPO)
    except ValueError:
        return os.path.basename(path)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lib_versions():
    import llama_cpp
    import torch
    import transformers
    try:
        import gguf
        gguf_v = getattr(gguf, "__version__", None)
        if gguf_v is None:
            from importlib.metadata import version
            gguf_v = version("gguf")
    except Exception:  # pragma: no cover
        gguf_v = "?"
    return ("torch %s, transformers %s, gguf %s, llama-cpp-python %s, numpy %s"
            % (torch.__version__, transformers.__version__, gguf_v,
               llama_cpp.__version__, np.__version__))


class Ctx:
    """Shared state: paths, header, both references (loaded lazily)."""

    def __init__(self, args):
        self.args = args
        self.model_path = args.model
        self.corpus_path = args.corpus
        self.out = args.out
        self.sha = sha256_file(self.model_path)
        self.date = datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d")
        self.versions = lib_versions()
        self._llm = None
        self._hf = None
        self._corpus_ids = None

    # -- header ---------------------------------------------------------
    def header(self, what):
        return [
            "# %s -- generated by tools/make_forward_fixtures.py" % what,
            "# references: %s" % self.versions,
            "# model: %s sha256 %s" % (rel(self.model_path), self.sha),
            "# date: %s (UTC)" % self.date,
        ]

    # -- llama.cpp --------------------------------------------------------
    def llm(self):
        if self._llm is None:
            from llama_cpp import Llama
            self._llm = Llama(model_path=self.model_path, n_ctx=1024,
                              n_batch=512, logits_all=True,
                              n_threads=N_THREADS, n_threads_batch=N_THREADS,
                              seed=0, verbose=False)
            assert self._llm.n_vocab() == 49152, self._llm.n_vocab()
        return self._llm

    def tok(self, text, special=False):
        return list(self.llm().tokenize(text.encode("utf-8"), add_bos=False,
                                        special=special))

    def detok(self, ids):
        return self.llm().detokenize(ids, special=True).decode(
            "utf-8", errors="replace")

    def llama_logits(self, ids):
        """float32 [len, vocab] logits of llama.cpp from an empty cache."""
        llm = self.llm()
        assert len(ids) <= llm.n_ctx()
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float32, copy=True)

    # -- transformers ----------------------------------------------------
    def hf(self):
        if self._hf is None:
            import torch
            from transformers import AutoModelForCausalLM
            torch.set_num_threads(N_THREADS)
            torch.manual_seed(0)
            d, name = os.path.split(os.path.abspath(self.model_path))
            import transformers
            # transformers >= 5 renamed torch_dtype to dtype
            kw = ({"dtype": torch.float32}
                  if int(transformers.__version__.split(".")[0]) >= 5
                  else {"torch_dtype": torch.float32})
            m = AutoModelForCausalLM.from_pretrained(
                d, gguf_file=name, attn_implementation="eager", **kw)
            m.eval()
            # Tied embeddings: the GGUF has no output.weight, lm_head must
            # be token_embd (dequantized Q8_0), not a random init.
            emb = m.get_input_embeddings().weight
            head = m.get_output_embeddings().weight
            assert emb.dtype == torch.float32 and head.dtype == torch.float32
            assert torch.equal(emb, head), "lm_head is not tied to token_embd"
            c = m.config
            assert (c.num_hidden_layers, c.num_attention_heads,
                    c.num_key_value_heads, c.vocab_size) == (30, 9, 3, 49152), c
            rp = getattr(c, "rope_parameters", None) or {}
            theta = rp.get("rope_theta", getattr(c, "rope_theta", None))
            assert theta == 100000.0, theta
            print("transformers config: layers %d heads %d kv %d hidden %d "
                  "rope_theta %s eps %s" % (
                      c.num_hidden_layers, c.num_attention_heads,
                      c.num_key_value_heads, c.hidden_size, theta,
                      c.rms_norm_eps), flush=True)
            self._hf = m
        return self._hf

    def hf_logits(self, ids):
        """float32 [len, vocab] logits of transformers from an empty cache."""
        import torch
        with torch.no_grad():
            x = torch.tensor([ids], dtype=torch.long)
            out = self.hf()(input_ids=x, use_cache=False)
            return out.logits[0].to(torch.float32).numpy().copy()

    def hf_greedy(self, ids, n):
        """Greedy ids and, per step, the top1 - top2 logit margin."""
        import torch
        m = self.hf()
        gen, margins = [], []
        with torch.no_grad():
            out = m(input_ids=torch.tensor([ids], dtype=torch.long),
                    use_cache=True)
            for _ in range(n):
                row = out.logits[0, -1]
                top2 = torch.topk(row, 2).values
                margins.append(float(top2[0] - top2[1]))
                nxt = int(torch.argmax(row).item())
                gen.append(nxt)
                out = m(input_ids=torch.tensor([[nxt]], dtype=torch.long),
                        past_key_values=out.past_key_values, use_cache=True)
        return gen, margins

    def llama_greedy(self, ids, n):
        llm = self.llm()
        llm.reset()
        llm.eval(ids)
        gen = []
        for _ in range(n):
            row = np.asarray(llm.scores[llm.n_tokens - 1])
            nxt = int(np.argmax(row))
            gen.append(nxt)
            llm.eval([nxt])
        return gen

    # -- corpus ----------------------------------------------------------
    def corpus_ids(self):
        if self._corpus_ids is None:
            with open(self.corpus_path, "rb") as f:
                text = f.read().decode("utf-8")
            t0 = time.time()
            self._corpus_ids = self.tok(text)
            print("corpus: %d tokens (%.1fs)" % (len(self._corpus_ids),
                                                 time.time() - t0), flush=True)
        return self._corpus_ids

    def write(self, name, lines):
        path = os.path.join(self.out, name)
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
        print("wrote %s (%d bytes)" % (rel(path), os.path.getsize(path)),
              flush=True)


def row_lse(row):
    r = row.astype(np.float64)
    mx = r.max()
    return float(mx + math.log(np.exp(r - mx).sum()))


def topk(row, k):
    # descending logit, ties by ascending id (stable sort on -logit)
    order = np.argsort(-row.astype(np.float64), kind="stable")[:k]
    return [int(i) for i in order]


def one_line(s):
    return s.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


# ---------------------------------------------------------------------------
def part_tokens(ctx):
    ids = ctx.corpus_ids()[:HEAD_TOKENS]
    lines = ctx.header("first %d llama.cpp token ids of the eval corpus"
                       % HEAD_TOKENS)
    lines.append("# corpus: %s sha256 %s" % (rel(ctx.corpus_path),
                                             sha256_file(ctx.corpus_path)))
    lines.append("# tokenize(file bytes, add_bos=False, special=False)")
    lines.append("tokens %d %s" % (len(ids), " ".join(map(str, ids))))
    ctx.write("eval_tokens_head.txt", lines)


def logits_prompt_text(ctx):
    with open(ctx.corpus_path, "rb") as f:
        text = f.read().decode("utf-8")
    i = text.index(LOGITS_PARAGRAPH_START)
    j = text.index("\n", i)
    assert i > 10000, "paragraph must not be at the start of the corpus"
    return text[i:j + 1] + LOGITS_CODE_LINE


def compare_logits(ref, other):
    """Max |diff| over all logits, argmax agreement, max |diff| of LSE."""
    d = np.abs(ref.astype(np.float64) - other.astype(np.float64))
    agree = int((ref.argmax(axis=1) == other.argmax(axis=1)).sum())
    lse_d = max(abs(row_lse(a) - row_lse(b)) for a, b in zip(ref, other))
    # max |diff| of log-probabilities of the reference top-1 token
    lp = max(abs((a[a.argmax()] - row_lse(a)) - (b[a.argmax()] - row_lse(b)))
             for a, b in zip(ref, other))
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "argmax_agree": agree, "rows": ref.shape[0],
            "max_lse_diff": lse_d, "max_top1_logprob_diff": lp,
            "worst_row": int(d.max(axis=1).argmax())}


def logits_and_compare(ctx):
    """Token ids, transformers logits and the llama.cpp comparison message."""
    text = logits_prompt_text(ctx)
    ids = ctx.tok(text)
    n = len(ids)
    assert 64 <= n <= 100, "logits prompt has %d tokens, want 64..100" % n
    t0 = time.time()
    L = ctx.hf_logits(ids)
    print("transformers logits: %d x %d (%.1fs)" % (L.shape + (time.time() - t0,)),
          flush=True)
    assert L.shape == (n, 49152) and np.isfinite(L).all()

    Q = ctx.llama_logits(ids)
    cmp = compare_logits(L, Q)
    msg = ("llama.cpp vs transformers on the logits prompt (%d positions): "
           "max|dlogit| %.4f (row %d), mean|dlogit| %.4f, argmax agree %d/%d, "
           "max|dLSE| %.4f, max|dlogprob(top1)| %.4f" % (
               n, cmp["max_abs"], cmp["worst_row"], cmp["mean_abs"],
               cmp["argmax_agree"], cmp["rows"], cmp["max_lse_diff"],
               cmp["max_top1_logprob_diff"]))
    print(msg, flush=True)
    return text, ids, L, msg


def part_compare(ctx):
    """Only print llama.cpp vs transformers logit differences; no files."""
    logits_and_compare(ctx)


def part_logits(ctx):
    text, ids, L, msg = logits_and_compare(ctx)
    n = len(ids)
    full = [0, n // 2, n - 1]
    lines = ctx.header("reference logits, transformers float32 forward "
                       "pass from an empty cache")
    lines.append("# prompt: eval corpus paragraph starting %r + one code line;"
                 " llama.cpp tokenize(add_bos=False, special=False)"
                 % LOGITS_PARAGRAPH_START)
    lines.append("# text: %s" % one_line(text))
    lines.append("# %s" % msg)
    lines.append("# row p ARGMAX LSE then top %d id:logit (descending), "
                 "LSE = logsumexp of the full row" % TOPK)
    lines.append("tokens %d %s" % (n, " ".join(map(str, ids))))
    for p in range(n):
        row = L[p]
        top = topk(row, TOPK)
        lines.append("row %d %d %.6f %s" % (
            p, top[0], row_lse(row),
            " ".join("%d:%.6f" % (i, float(row[i])) for i in top)))
    lines.append("full_rows %s" % " ".join(map(str, full)))
    ctx.write("logits_ref.txt", lines)

    path = os.path.join(ctx.out, "logits_ref_rows.f32")
    L[full].astype("<f4").tofile(path)
    print("wrote %s (%d bytes)" % (rel(path), os.path.getsize(path)),
          flush=True)


def part_greedy(ctx):
    lines = ctx.header("greedy continuations, transformers float32, argmax "
                       "at every step, exactly %d tokens, no EOS stop"
                       % GEN_TOKENS)
    lines.append("# prompts tokenized by llama.cpp, add_bos=False "
                 "(chat prompt with special=True); decoded text by llama.cpp")
    results = []
    for name, special, text in GREEDY_PROMPTS:
        ids = ctx.tok(text, special=special)
        t0 = time.time()
        gen, margins = ctx.hf_greedy(ids, GEN_TOKENS)
        dt = time.time() - t0
        lgen = ctx.llama_greedy(ids, GEN_TOKENS)
        first_diff = next((i for i in range(GEN_TOKENS) if gen[i] != lgen[i]),
                          None)
        agree = first_diff is None
        results.append((name, agree, first_diff))
        print("greedy %-5s prompt %d tokens, transformers %.1fs, llama.cpp %s"
              % (name, len(ids), dt,
                 "agrees" if agree else "differs from step %d" % first_diff),
              flush=True)
        lines.append("# [%s] prompt text: %s" % (name, one_line(text)))
        lines.append("# [%s] continuation: %s"
                     % (name, one_line(ctx.detok(gen))))
        k = int(np.argmin(margins))
        lines.append("# [%s] smallest top1-top2 logit margin over the %d "
                     "steps: %.4f at step %d" % (name, GEN_TOKENS, margins[k], k))
        if agree:
            lines.append("# [%s] llama.cpp greedy: agrees on all %d tokens"
                         % (name, GEN_TOKENS))
        else:
            lines.append("# [%s] llama.cpp greedy: differs from step %d: %s"
                         % (name, first_diff, " ".join(map(str, lgen))))
            lines.append("# [%s] llama.cpp continuation: %s"
                         % (name, one_line(ctx.detok(lgen))))
        lines.append("prompt %d %s" % (len(ids), " ".join(map(str, ids))))
        lines.append("gen %d %s" % (len(gen), " ".join(map(str, gen))))
    ctx.write("greedy_ref.txt", lines)
    return results


def windows(ids, C):
    out = []
    for s in range(0, len(ids), C):
        w = ids[s:s + C]
        if len(w) >= 2:
            out.append(w)
    return out


def window_nll(logits, w):
    nll = 0.0
    for t in range(1, len(w)):
        row = logits[t - 1]
        nll += row_lse(row) - float(row[w[t]])
    return nll, len(w) - 1


def ppl_run(ctx, ref, T, C):
    ids = ctx.corpus_ids()
    assert len(ids) >= T, "corpus has only %d tokens" % len(ids)
    ids = ids[:T]
    fn = ctx.hf_logits if ref == "transformers" else ctx.llama_logits
    total, count = 0.0, 0
    t0 = time.time()
    ws = windows(ids, C)
    for k, w in enumerate(ws):
        nll, c = window_nll(fn(w), w)
        total += nll
        count += c
        if (k + 1) % 8 == 0 or k + 1 == len(ws):
            print("  %s T=%d C=%d window %d/%d running ppl %.4f (%.0fs)" % (
                ref, T, C, k + 1, len(ws), math.exp(total / count),
                time.time() - t0), flush=True)
    ppl = math.exp(total / count)
    line = "ppl ref=%s ctx=%d tokens=%d count=%d nll=%.6f ppl=%.6f" % (
        ref, C, T, count, total, ppl)
    print(line, flush=True)
    return line


def part_ppl(ctx):
    lines = ctx.header("perplexity of the eval corpus")
    lines.append("# corpus: %s sha256 %s" % (rel(ctx.corpus_path),
                                             sha256_file(ctx.corpus_path)))
    lines += [
        "# protocol: tokenize the whole corpus with llama.cpp (no BOS), take "
        "the first T tokens, split into consecutive non-overlapping windows "
        "of C tokens (last partial window dropped if shorter than 2 tokens, "
        "otherwise evaluated);",
        "# each window evaluated from an empty cache (no BOS added); NLL "
        "summed over positions 1..len-1 of each window (token t predicted "
        "from tokens 0..t-1 of the same window); ppl = exp(nll / count)",
        "# ref=transformers: float32 dequantized weights, float32 compute "
        "(primary); ref=llamacpp: llama.cpp CPU (quantized activations)",
    ]
    for T, C in PPL_SETTINGS:
        for ref in ("transformers", "llamacpp"):
            lines.append(ppl_run(ctx, ref, T, C))
    ctx.write("ppl_ref.txt", lines)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for formats and the ppl protocol.")
    ap.add_argument("--model", default=os.path.join(REPO, DEFAULT_MODEL),
                    help="GGUF file (default: %s)" % DEFAULT_MODEL)
    ap.add_argument("--corpus", default=os.path.join(REPO, DEFAULT_CORPUS),
                    help="eval corpus (default: %s)" % DEFAULT_CORPUS)
    ap.add_argument("--out", default=os.path.join(REPO, DEFAULT_OUT),
                    help="output directory (default: %s)" % DEFAULT_OUT)
    ap.add_argument("--parts", default=",".join(ALL_PARTS),
                    help="comma-separated subset of %s (default: all of "
                    "those); 'compare' only prints the llama.cpp vs "
                    "transformers logit differences and writes nothing"
                    % ",".join(ALL_PARTS + EXTRA_PARTS))
    args = ap.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    for p in parts:
        if p not in ALL_PARTS + EXTRA_PARTS:
            ap.error("unknown part %r" % p)
    os.makedirs(args.out, exist_ok=True)

    ctx = Ctx(args)
    print("references: %s" % ctx.versions, flush=True)
    print("model: %s sha256 %s" % (rel(ctx.model_path), ctx.sha), flush=True)
    if "compare" in parts:
        part_compare(ctx)
    if "tokens" in parts:
        part_tokens(ctx)
    if "logits" in parts:
        part_logits(ctx)
    if "greedy" in parts:
        part_greedy(ctx)
    if "ppl" in parts:
        part_ppl(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
