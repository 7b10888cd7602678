/* eval.h - quality measurements over text: perplexity with a stated protocol, and the
 * measuring protocols of DESIGN.md §5 (streaming perplexity, context compression, passkey
 * retrieval) that compare a compressed cache with the full-precision one in lockstep. */
#ifndef KVC_EVAL_H
#define KVC_EVAL_H

#include "kvc/model.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int ctx;        /* window length in tokens */
    int batch;      /* tokens per forward call */
    int progress;   /* 1: progress bar with ETA on stderr */
} kvc_ppl_opts;

typedef struct {
    int64_t n_tokens;  /* tokens evaluated (windows included) */
    int64_t n_scored;  /* predictions scored */
    int n_windows;
    double nll;        /* summed negative log-likelihood (nats) */
    double ppl;        /* exp(nll / n_scored) */
    double seconds;
} kvc_ppl_result;

/* Perplexity protocol: tokens are split into consecutive, non-overlapping windows of
 * opts->ctx tokens (a final window shorter than 2 tokens is dropped); each window starts
 * from an empty cache (kvc_cache_reset, no BOS added) and every token but its first is scored
 * from the window's tokens before it. The cache must hold at least ctx tokens.
 * Returns 0 or -1 with err. */
int kvc_eval_perplexity(const kvc_model *m, kvc_cache *c, const int32_t *tokens, int64_t n,
                    const kvc_ppl_opts *opts, kvc_ppl_result *res, kvc_err *err);


/* ============================================================ measuring protocols ==== */

/* The reference cache's logits of one protocol run, kept so that later runs on the same
 * tokens and settings (a sweep's points) skip the reference forward passes: the first run
 * records them, the next ones read them back (identical figures, about half the time). */
typedef struct kvc_ref_store kvc_ref_store;
/* An empty store that holds at most max_bytes of logits (a run that needs more runs the
 * reference in lockstep, as without a store). */
kvc_ref_store *kvc_ref_store_new(size_t max_bytes);
void kvc_ref_store_free(kvc_ref_store *s);
/* 1 when the store holds a complete recording. */
int kvc_ref_store_ready(const kvc_ref_store *s);

/* Settings of the protocols below (0 or NULL fields take the defaults in brackets). */
typedef struct {
    int ctx;           /* stream: window length in tokens [512] */
    int chunk;         /* tokens per forward call [32]; 1 = exact decoding */
    int context_len;   /* context: N context tokens per sample [512] */
    int continuation;  /* context: M continuation tokens per sample [64] */
    int samples;       /* context: at most this many samples [8] */
    int progress;      /* 1: progress line with ETA on stderr */
    kvc_ref_store *ref_store; /* NULL: run the reference in lockstep every time */
} kvc_measure_opts;

/* What a protocol measured. Quality is always against the full-precision reference run in
 * lockstep on the same chunks. Memory is KV bytes as kvc_cache_bytes() counts them. */
typedef struct {
    int64_t n_tokens;          /* tokens fed through the measured cache */
    int64_t n_scored;          /* predictions scored */
    int n_units;               /* windows (stream) or samples (context) */
    double nll, nll_full;      /* mean NLL per scored token (nats), measured / reference */
    double ppl, ppl_full;      /* exp of the mean NLLs */
    double rise_pct;           /* 100 * (ppl / ppl_full - 1) */
    double kl_mean, kl_p99;    /* KL(P_full || P_measured) in nats: mean and exact 99th
                                  percentile (linear interpolation between order statistics) */
    double top1;               /* fraction of scored tokens whose arg-max tokens agree */
    double rise_lo, rise_hi;   /* 95% bootstrap interval of rise_pct over the units (windows or
                                  samples resampled with replacement; NAN below 2 units) */
    double kl_lo, kl_hi;       /* the same for kl_mean */
    double bytes_per_token;    /* bytes / tokens appended, averaged over windows or samples */
    double f16_bytes_per_token;/* 2 * L * K * D * 2: an f16 full cache */
    double compression;        /* f16_bytes_per_token / bytes_per_token (> 1: smaller) */
    double kept_frac;          /* held / (appended * L * K), averaged */
    double removed_frac;       /* evicted / (appended * L * K), averaged */
    double kept_scored;        /* stream: mean kept fraction after each chunk, weighted by
                                  the predictions the chunk scored (NAN for context) */
    double seconds;            /* wall time of the whole protocol */
    double seconds_cache;      /* time in the measured cache's forward passes alone */
} kvc_quality;

/* Streaming perplexity: tokens are cut into non-overlapping windows of ctx tokens (a final
 * window shorter than 2 tokens is dropped); each window starts from an empty cache with
 * kvc_cache_set_budget(c, ctx) and is fed in chunks of `chunk` tokens; every token but the
 * window's first is scored. ref must be a cache that never evicts (kvc_cache_full_new); both
 * caches need room for ctx tokens. Returns 0 or -1 with err (a budget that does not fit
 * included). */
int kvc_eval_stream(const kvc_model *m, kvc_cache *c, kvc_cache *ref, const int32_t *tokens, int64_t n,
                const kvc_measure_opts *o, kvc_quality *q, kvc_err *err);

/* Context compression (kvpress-style): samples are consecutive segments of N + M tokens; per
 * sample the N context tokens are prefilled in chunks with every token held, compressed once
 * to the budget (taken of N), then the M continuation tokens are fed frozen in one forward
 * call and the M - 1 predictions of continuation tokens 1..M-1 are scored. Memory is read
 * right after the compression. Needs room for N + M tokens. Returns 0 or -1 with err. */
int kvc_eval_context(const kvc_model *m, kvc_cache *c, kvc_cache *ref, const int32_t *tokens, int64_t n,
                 const kvc_measure_opts *o, kvc_quality *q, kvc_err *err);

/* ---- passkey retrieval (eval/passkey.c) ---- */

/* One passkey prompt: ids (n) = context (n_context tokens: intro, filler with the needle at
 * a depth) followed by the question, ending with "The pass key is". */
typedef struct {
    int32_t *ids;     /* (n) malloc'd */
    int n;            /* total tokens, at most the requested length */
    int n_context;    /* tokens before the question */
    int needle_at;    /* token offset where the needle sentence starts */
    int key_at;       /* token offset of the key's first digit token */
    int key_len;      /* tokens the key takes */
    int filler_start; /* first filler token (after the intro) */
    int filler_len;   /* filler tokens, needle excluded */
} kvc_passkey_prompt;

/* Builds a prompt of at most `length` tokens with the 5-digit key (NUL-terminated digits)
 * hidden after a fraction `depth` (0..1) of the filler, at the nearest sentence boundary.
 * -1 with err when length is too short to hold intro, needle and question. */
int kvc_passkey_build(const kvc_tokenizer *t, int length, double depth, const char *key, kvc_passkey_prompt *p,
                  kvc_err *err);
void kvc_passkey_prompt_free(kvc_passkey_prompt *p);
/* 1 when the generated text contains the key's digits in a row, else 0. */
int kvc_passkey_check(const char *generated, const char *key);

typedef struct {
    const int *lengths;    /* (n_lengths) prompt lengths in tokens [1024, 2048] */
    int n_lengths;
    const double *depths;  /* (n_depths) needle depths [0, 0.25, 0.5, 0.75, 1] */
    int n_depths;
    int trials;            /* prompts per (length, depth) cell [3] */
    uint64_t seed;         /* keys are drawn from it [1] */
    int chunk;             /* prefill tokens per forward call [32] */
    int gen_tokens;        /* greedy tokens generated after the question [8] */
    int progress;
} kvc_passkey_opts;

typedef struct {
    int length;        /* requested length */
    double depth;
    int skipped;       /* 1: longer than the model's training context, not run */
    int trials, correct, correct_full;
    char last_answer[64]; /* what the measured cache generated on the cell's last trial */
} kvc_passkey_cell;

typedef struct {
    kvc_passkey_cell *cells;  /* (n_lengths * n_depths), length-major; malloc'd */
    int n_cells;
    int trials, correct, correct_full; /* over the cells that ran */
    double bytes_per_token, compression, kept_frac, removed_frac; /* after compression, averaged */
    int64_t n_tokens;         /* prompt tokens fed through the measured cache */
    double seconds, seconds_cache;
} kvc_passkey_result;

/* Passkey retrieval: per trial the context is prefilled with every token held, compressed
 * once to the budget (taken of the context length), then the question is fed frozen and up
 * to gen_tokens tokens are generated greedily; correct when they contain the key. ref (may be
 * NULL) runs the same prompts for the reference accuracy. Lengths beyond the model's training
 * context are skipped (cell.skipped). Caches need room for the longest length plus
 * gen_tokens. Returns 0 or -1 with err; res->cells is allocated even on failure. */
int kvc_eval_passkey(const kvc_model *m, kvc_cache *c, kvc_cache *ref, const kvc_passkey_opts *o, kvc_passkey_result *res,
                 kvc_err *err);
void kvc_passkey_result_free(kvc_passkey_result *res);

/* ---- several facts, one asked (eval/facts.c) ---- */

#define KVC_FACTS_MAX 8
/* Builds a prompt of at most `length` tokens in which n_facts doors (1..8 distinct colours)
 * get 5-digit codes at depths spread over the filler (one per equal stratum), then asks for
 * one door's code; colours, codes, depths and the door asked are drawn from *rng. answer (8
 * bytes) receives the code asked for; p->needle_at is where its fact starts. -1 with err when
 * length cannot hold the intro, the facts and the question. */
int kvc_facts_build(const kvc_tokenizer *t, int length, int n_facts, uint64_t *rng, kvc_passkey_prompt *p, char *answer,
                    kvc_err *err);

/* ---- several caches on one shared prefill (eval/multi.c) ---- */

/* Settings of kvc_eval_multi (0 fields take the defaults in brackets). */
typedef struct {
    int chunk;          /* prefill tokens per forward call [32] */
    int context_len, continuation, samples; /* context protocol [512, 64, 8] */
    const int *lengths; /* (n_lengths) passkey / facts prompt lengths [1024, 2048] */
    int n_lengths;
    const double *depths; /* (n_depths) passkey depths [0 .. 1 by 0.25] */
    int n_depths;
    int trials;         /* prompts per passkey cell, and per facts length [3] */
    uint64_t seed;      /* passkey keys; facts draw from seed + 1 [1] */
    int n_facts;        /* facts per facts prompt [4] */
    int gen_tokens;     /* greedy tokens answered [8] */
    int progress;
} kvc_multi_opts;

/* What one cache of a shared run measured. */
typedef struct {
    kvc_quality context;          /* as kvc_eval_context reports it */
    int n_samples;                /* context samples; the per-sample sums below have this many */
    double *s_nll, *s_nll_full, *s_kl; /* (n_samples) summed over each sample's scored tokens */
    int *s_scored, *s_agree;      /* (n_samples) */
    double rise_ci[2], kl_ci[2];  /* 95% bootstrap intervals over samples (NAN with < 2) */
    double side_ram_bpt, side_disk_bpt; /* side store bytes per appended token right after the
                                     compression (RAM / spill file), averaged */
    double retrieved_per_query;   /* tokens retrieved per (query, layer, kv head) */
    kvc_passkey_result passkey;   /* cells by length x depth */
    kvc_passkey_result facts;     /* cells by length (depth = -1) */
    double side_ram_bpt_pk, side_disk_bpt_pk; /* the same after passkey / facts compressions */
} kvc_multi_point;

enum { KVC_MULTI_CONTEXT = 1, KVC_MULTI_PASSKEY = 2, KVC_MULTI_FACTS = 4 };

/* Measures n_c caches on the same text and prompts with one shared prefill: the reference
 * (full-precision) cache runs the prefill, and every measured cache receives the same keys,
 * values and queries (kvc_kvcache_observe) and holds every token; then each cache is
 * compressed once to its budget and runs the continuation (context: scored against the
 * reference's logits) or the question and a greedy answer (passkey, facts) on its own. The
 * prefill is therefore exact for every cache (kvpress's protocol); a cache with f32 rows and no
 * eviction matches kvc_eval_context bit for bit. pts (n_c) is filled (free with
 * kvc_multi_point_free). what: KVC_MULTI_* bits. 0 or -1 with err. */
int kvc_eval_multi(const kvc_model *m, kvc_cache *const *c, int n_c, kvc_cache *ref, const int32_t *tokens, int64_t n,
                   int what, const kvc_multi_opts *o, kvc_multi_point *pts, kvc_err *err);
void kvc_multi_point_free(kvc_multi_point *p);
/* 95% bootstrap intervals (2000 resamples of the samples, seeded) of the perplexity rise (%)
 * and the mean KL from per-sample sums; NAN when n < 2. */
void kvc_multi_bootstrap(const double *nll, const double *nll_full, const double *kl, const int *scored, int n,
                         double rise_ci[2], double kl_ci[2]);

/* One shared run from specs: builds a compressed cache per (repr[i], keep[i]) point and the
 * reference, checks every budget against the protocols first (a budget that leaves no room
 * after sinks and window fails here), runs kvc_eval_multi, and copies each cache's canonical
 * description into desc[i] (desc_size bytes each). backend: NULL for the CPU. 0 or -1 with err. */
int kvc_eval_multi_run(const kvc_model *m, const int32_t *ids, int64_t n, const char *const *repr,
                       const char *const *keep, int n_points, int what, const kvc_multi_opts *o,
                       const kvc_backend *backend, kvc_multi_point *pts, char *desc, size_t desc_size, kvc_err *err);
/* Writes one CSV row per point (the figures, bootstrap intervals, side-store bytes, passkey and
 * facts accuracy with per-length counts) to path; with samples_path, also one row per (point,
 * context sample) of per-sample sums. Each file: temporary file, fsync, rename. 0 or -1 with
 * err. */
int kvc_multi_write_csv(const char *path, const char *samples_path, const char *model, const char *text,
                        const kvc_multi_opts *o, int what, const char *const *repr, const char *const *keep,
                        const char *desc, size_t desc_size, const kvc_multi_point *pts, int n_points, kvc_err *err);

/* Memory of a cache as the protocols read it: bytes per appended token and the kept and
 * removed fractions (kvc_kvcache_get_stats for a compressed cache; for the full cache bytes and
 * n_tokens, nothing removed). Returns the tokens appended (0: nothing to measure). */
int64_t kvc_eval_memory(const kvc_cache *c, double *bytes_per_token, double *kept, double *removed);
/* Bytes per token of an f16 full cache for this shape: 2 * L * K * D * 2. */
double kvc_eval_f16_bytes_per_token(const kvc_cache_shape *s);

/* ---- one `kvcodec eval` run (eval/eval_run.c) ---------------------------------------- */

enum { KVC_M_STREAM = 1, KVC_M_CONTEXT = 2, KVC_M_PASSKEY = 4 };

typedef struct {
    const char *text, *repr, *keep; /* text: recorded in the report */
    int set;                        /* KVC_M_* bits */
    int ctx, chunk, context_len, continuation, samples;
    const int *lengths;             /* passkey prompt lengths */
    int n_lengths;
    const double *depths;
    int n_depths;
    int trials;
    uint64_t seed;
    int explicit_lengths;           /* lengths beyond the model's context: an error (1) or skipped (0) */
    int threads;                    /* recorded in the report */
    int progress;
    const kvc_backend *backend;     /* where both caches run their hot paths; NULL: the CPU */
} kvc_eval_run_opts;

/* Everything one run measured. */
typedef struct {
    const char *model, *fingerprint, *text, *repr, *keep;
    char cache[1500];               /* kvc_kvcache_describe of the measured cache */
    int ctx, chunk, context_len, continuation, threads, set;
    int64_t tokens;
    kvc_quality stream, context;
    kvc_passkey_result pk;
} kvc_eval_report;

/* Checks every setting against the model first (contexts, budgets that cannot fit, passkey
 * lengths), then measures the cache o->repr x o->keep against the full cache on ids[0, n)
 * (n may be 0 for passkey alone). 0, or -1 with err; rep is always initialised (free it). */
int kvc_eval_run(const kvc_model *m, const int32_t *ids, int64_t n, const kvc_eval_run_opts *o, kvc_eval_report *rep,
                 kvc_err *err);
/* Writes rep as JSON to path (temporary file, fsync, rename). 0 or -1 with err. */
int kvc_eval_report_json(const char *path, const kvc_eval_report *rep, kvc_err *err);
void kvc_eval_report_free(kvc_eval_report *rep);

#ifdef __cplusplus
}
#endif
#endif
