/* passkey.c - passkey retrieval (DESIGN.md §5, API in kvc/eval.h): a 5-digit key hidden at a
 * depth of plain filler text, the context compressed once before the question is seen, then
 * a short greedy answer checked for the key; the full cache answers the same prompts. */
#include "kvc/eval.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ================================================================ prompt wording ==== */

static const char INTRO[] = "Below is a long text about a quiet village. Somewhere inside it a pass key is hidden. "
                            "Read everything carefully and remember the pass key, because you will be asked for it.";
static const char *const FILLER[] = {
    " The village lies in a wide valley between two low hills.",
    " Every morning the baker opens his shop and the smell of bread fills the street.",
    " Children walk to school along the river, and the ducks follow them for a while.",
    " In the afternoon the old men sit on the bench by the church and talk about the weather.",
    " The fields are green in spring and golden at the end of summer.",
    " At night the lamps in the windows go out one by one, and the village sleeps.",
};
#define N_FILLER ((int)(sizeof FILLER / sizeof FILLER[0]))
static const char NEEDLE[] = " The pass key is %s. Remember it. %s is the pass key.";
static const char QUESTION[] = "\n\nWhat is the pass key? The pass key is";

/* Tokenizes text into a malloc'd array (*n ids). Returns NULL with err on failure. */
static int32_t *tokens_of(const kvc_tokenizer *t, const char *text, int *n, kvc_err *err) {
    size_t len = strlen(text);
    int64_t cap = (int64_t)len + 8;
    int32_t *ids = kvc_malloc_array((size_t)cap, sizeof *ids);
    if (!ids) {
        kvc_fail(err, "out of memory tokenizing a passkey prompt");
        return NULL;
    }
    int64_t got = kvc_tokenizer_encode(t, text, len, 0, ids, cap, err);
    if (got < 0 || got > cap) {
        if (got > cap) kvc_fail(err, "passkey: unexpected token count %lld for %zu bytes", (long long)got, len);
        free(ids);
        return NULL;
    }
    *n = (int)got;
    return ids;
}

/* Offset of needle (nn ids) inside hay (nh ids), or -1. */
static int find_ids(const int32_t *hay, int nh, const int32_t *needle, int nn) {
    for (int i = 0; i + nn <= nh; i++)
        if (!memcmp(hay + i, needle, (size_t)nn * sizeof *hay)) return i;
    return -1;
}

void kvc_passkey_prompt_free(kvc_passkey_prompt *p) {
    if (!p) return;
    free(p->ids);
    p->ids = NULL;
}

int kvc_passkey_build(const kvc_tokenizer *t, int length, double depth, const char *key, kvc_passkey_prompt *p,
                  kvc_err *err) {
    memset(p, 0, sizeof *p);
    if (!(depth >= 0.0 && depth <= 1.0)) return kvc_fail(err, "passkey: depth %g is outside 0..1", depth);
    char needle[160];
    snprintf(needle, sizeof needle, NEEDLE, key, key);
    int ni, nn, nq, nk, ns[N_FILLER];
    int32_t *intro = tokens_of(t, INTRO, &ni, err), *nd = intro ? tokens_of(t, needle, &nn, err) : NULL;
    int32_t *qu = nd ? tokens_of(t, QUESTION, &nq, err) : NULL, *kid = qu ? tokens_of(t, key, &nk, err) : NULL;
    int32_t *sent[N_FILLER] = {0};
    int rc = kid ? 0 : -1;
    for (int i = 0; i < N_FILLER && rc == 0; i++)
        if (!(sent[i] = tokens_of(t, FILLER[i], &ns[i], err))) rc = -1;
    int key_off = rc ? -1 : find_ids(nd, nn, kid, nk);
    if (rc == 0 && key_off < 0) rc = kvc_fail(err, "passkey: the key '%s' does not tokenize alone inside the needle", key);
    const int budget = rc ? 0 : length - ni - nn - nq; /* filler tokens that fit */
    if (rc == 0 && budget < 0)
        rc = kvc_fail(err, "passkey: a length of %d tokens cannot hold the intro, needle and question (%d tokens)",
                      length, ni + nn + nq);
    if (rc == 0 && !(p->ids = kvc_malloc_array((size_t)length, sizeof(int32_t))))
        rc = kvc_fail(err, "out of memory for a passkey prompt");
    if (rc == 0) {
        /* whole filler sentences, cycled; the needle goes at the sentence boundary nearest
         * to depth * filler length */
        int fill = 0, nsent = 0;
        while (fill + ns[nsent % N_FILLER] <= budget) fill += ns[nsent++ % N_FILLER];
        const double target = depth * fill;
        int at = 0, best = 0, cut = 0;
        for (int s = 0; s <= nsent; s++) {
            if (fabs(at - target) < fabs(best - target)) { best = at; cut = s; }
            if (s < nsent) at += ns[s % N_FILLER];
        }
        int w = 0;
        memcpy(p->ids, intro, (size_t)ni * sizeof(int32_t));
        w = ni;
        p->filler_start = ni;
        for (int s = 0; s <= nsent; s++) {
            if (s == cut) {
                p->needle_at = w;
                p->key_at = w + key_off;
                memcpy(p->ids + w, nd, (size_t)nn * sizeof(int32_t));
                w += nn;
            }
            if (s < nsent) {
                memcpy(p->ids + w, sent[s % N_FILLER], (size_t)ns[s % N_FILLER] * sizeof(int32_t));
                w += ns[s % N_FILLER];
            }
        }
        p->n_context = w;
        memcpy(p->ids + w, qu, (size_t)nq * sizeof(int32_t));
        p->n = w + nq;
        p->key_len = nk;
        p->filler_len = fill;
    }
    free(intro);
    free(nd);
    free(qu);
    free(kid);
    for (int i = 0; i < N_FILLER; i++) free(sent[i]);
    if (rc) kvc_passkey_prompt_free(p);
    return rc;
}

int kvc_passkey_check(const char *generated, const char *key) {
    return generated && key && *key && strstr(generated, key) != NULL;
}

/* ==================================================================== the protocol ==== */

/* Index of the largest of x (n), the first on ties: greedy decoding. */
static int argmax(const float *x, int n) {
    int a = 0;
    for (int j = 1; j < n; j++)
        if (x[j] > x[a]) a = j;
    return a;
}

/* Scratch for one protocol run. */
typedef struct {
    const kvc_model *m;
    kvc_run *run;
    float *logits;  /* (V) */
    int32_t *pos;   /* (max prompt + gen) */
    int32_t gen[64];
} pk_state;

/* Runs one prompt through cache c: prefill with every token held, compress once to the
 * budget (fraction of the context), feed the question frozen, generate greedily. Writes the
 * answer text to ans (size cap) and, when mem is non-NULL, the memory right after the
 * compression (bytes per token, kept, removed). Returns 1 correct, 0 wrong, -1 with err. */
static int pk_one(pk_state *st, kvc_cache *c, const kvc_passkey_prompt *p, const char *key, int chunk, int gen_n,
                  char *ans, size_t cap, double *mem, kvc_err *err) {
    const kvc_model *m = st->m;
    for (int i = 0; i < p->n + gen_n; i++) st->pos[i] = i;
    kvc_cache_reset(c);
    if (kvc_cache_set_budget(c, -1, err)) return -1;
    for (int b0 = 0; b0 < p->n_context; b0 += chunk) {
        int nb = p->n_context - b0 < chunk ? p->n_context - b0 : chunk;
        if (kvc_model_forward(m, st->run, c, p->ids + b0, st->pos + b0, nb, NULL, 0, err)) return -1;
    }
    if (kvc_cache_set_budget(c, p->n_context, err) || kvc_cache_end_step(c, err)) return -1;
    if (mem) kvc_eval_memory(c, &mem[0], &mem[1], &mem[2]);
    if (kvc_cache_set_budget(c, -1, err)) return -1;
    const int nq = p->n - p->n_context;
    if (kvc_model_forward(m, st->run, c, p->ids + p->n_context, st->pos + p->n_context, nq, st->logits, 0, err)) return -1;
    const int32_t eos = kvc_tokenizer_eos(m->tok);
    int ng = 0;
    for (int i = 0; i < gen_n; i++) {
        int32_t tok = argmax(st->logits, m->hp.n_vocab);
        if (tok == eos) break;
        st->gen[ng++] = tok;
        if (i + 1 < gen_n && kvc_model_forward(m, st->run, c, &tok, st->pos + p->n + i, 1, st->logits, 0, err)) return -1;
    }
    size_t len;
    char *text = kvc_tokenizer_decode(m->tok, st->gen, ng, &len);
    if (!text) return kvc_fail(err, "out of memory decoding a passkey answer");
    snprintf(ans, cap, "%s", text);
    int ok = kvc_passkey_check(text, key);
    free(text);
    return ok;
}

void kvc_passkey_result_free(kvc_passkey_result *res) {
    if (!res) return;
    free(res->cells);
    res->cells = NULL;
}

int kvc_eval_passkey(const kvc_model *m, kvc_cache *c, kvc_cache *ref, const kvc_passkey_opts *o, kvc_passkey_result *res,
                 kvc_err *err) {
    static const int dl[] = {1024, 2048};
    static const double dd[] = {0.0, 0.25, 0.5, 0.75, 1.0};
    const int *lengths = o->n_lengths > 0 ? o->lengths : dl, nl = o->n_lengths > 0 ? o->n_lengths : 2;
    const double *depths = o->n_depths > 0 ? o->depths : dd;
    const int nd = o->n_depths > 0 ? o->n_depths : 5, trials = o->trials > 0 ? o->trials : 3;
    const int chunk = o->chunk > 0 ? o->chunk : 32, gen_n = o->gen_tokens > 0 ? o->gen_tokens : 8;
    uint64_t rng = o->seed ? o->seed : 1;
    memset(res, 0, sizeof *res);
    res->bytes_per_token = res->compression = res->kept_frac = res->removed_frac = NAN;
    res->cells = kvc_calloc_array((size_t)nl * nd, sizeof *res->cells);
    if (!res->cells) return kvc_fail(err, "out of memory for passkey cells");
    res->n_cells = nl * nd;
    if (gen_n > 64) return kvc_fail(err, "passkey: at most 64 generated tokens, got %d", gen_n);
    int longest = 0;
    double total = 0;
    for (int i = 0; i < nl; i++) {
        for (int j = 0; j < nd; j++) {
            kvc_passkey_cell *cell = &res->cells[i * nd + j];
            cell->length = lengths[i];
            cell->depth = depths[j];
            cell->skipped = lengths[i] > m->hp.n_ctx_train;
        }
        if (lengths[i] <= m->hp.n_ctx_train) {
            longest = lengths[i] > longest ? lengths[i] : longest;
            total += (double)lengths[i] * nd * trials;
        }
    }
    if (longest + gen_n > c->shape.max_tokens || (ref && longest + gen_n > ref->shape.max_tokens))
        return kvc_fail(err, "passkey needs room for %d tokens; the caches hold %d", longest + gen_n,
                        ref && ref->shape.max_tokens < c->shape.max_tokens ? ref->shape.max_tokens
                                                                           : c->shape.max_tokens);
    pk_state st = {.m = m};
    st.run = kvc_run_new(m, chunk, err);
    if (!st.run) return -1;
    st.logits = kvc_malloc_array((size_t)m->hp.n_vocab, sizeof(float));
    st.pos = kvc_malloc_array((size_t)longest + gen_n + 1, sizeof(int32_t));
    int rc = st.logits && st.pos ? 0 : kvc_fail(err, "out of memory for passkey buffers");
    double mem_sum[3] = {0, 0, 0}, done = 0;
    int mem_n = 0;
    const double t0 = kvc_now();
    for (int ci = 0; ci < res->n_cells && rc == 0; ci++) {
        kvc_passkey_cell *cell = &res->cells[ci];
        if (cell->skipped) continue;
        for (int tr = 0; tr < trials && rc == 0; tr++) {
            char key[8];
            snprintf(key, sizeof key, "%05d", (int)(10000 + kvc_rng_next(&rng) % 90000));
            kvc_passkey_prompt p;
            if (kvc_passkey_build(m->tok, cell->length, cell->depth, key, &p, err)) { rc = -1; break; }
            double mem[3], t1 = kvc_now();
            int ok = pk_one(&st, c, &p, key, chunk, gen_n, cell->last_answer, sizeof cell->last_answer, mem, err);
            res->seconds_cache += kvc_now() - t1;
            res->n_tokens += p.n;
            int okf = ok >= 0 && ref ? pk_one(&st, ref, &p, key, chunk, gen_n, (char[64]){0}, 64, NULL, err) : 0;
            kvc_passkey_prompt_free(&p);
            if (ok < 0 || okf < 0) { rc = -1; break; }
            if (isfinite(mem[0])) {
                for (int k = 0; k < 3; k++) mem_sum[k] += mem[k];
                mem_n++;
            }
            cell->trials++;
            cell->correct += ok;
            cell->correct_full += okf;
            res->trials++;
            res->correct += ok;
            res->correct_full += okf;
            done += cell->length;
            if (o->progress) kvc_progress_draw("passkey", done, total, "tok", t0);
        }
    }
    if (o->progress) kvc_progress_end();
    if (mem_n) {
        res->bytes_per_token = mem_sum[0] / mem_n;
        res->kept_frac = mem_sum[1] / mem_n;
        res->removed_frac = mem_sum[2] / mem_n;
        res->compression = kvc_eval_f16_bytes_per_token(&c->shape) / res->bytes_per_token;
    }
    res->seconds = kvc_now() - t0;
    kvc_run_free(st.run);
    free(st.logits);
    free(st.pos);
    return rc;
}
