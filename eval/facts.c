/* facts.c - a retrieval task harder than one passkey (API in kvc/eval.h): several doors, each
 * with its own 5-digit code, are mentioned at spread-out depths of the same village filler, and
 * the question asks for one door's code. The model must bind the right colour to the right
 * number among look-alike sentences, so a policy cannot pass by keeping the one sentence that
 * looks unusual. */
#include "kvc/eval.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char INTRO[] = "Below is a long text about a quiet village. Several doors in the village have secret codes. "
                            "Read everything carefully and remember every code, because you will be asked for one.";
static const char *const FILLER[] = {
    " The village lies in a wide valley between two low hills.",
    " Every morning the baker opens his shop and the smell of bread fills the street.",
    " Children walk to school along the river, and the ducks follow them for a while.",
    " In the afternoon the old men sit on the bench by the church and talk about the weather.",
    " The fields are green in spring and golden at the end of summer.",
    " At night the lamps in the windows go out one by one, and the village sleeps.",
};
#define N_FILLER ((int)(sizeof FILLER / sizeof FILLER[0]))
static const char *const COLOURS[KVC_FACTS_MAX] = {"red", "blue", "green", "yellow", "white", "black", "brown", "grey"};
static const char FACT[] = " The code of the %s door is %s.";
static const char QUESTION[] = "\n\nWhat is the code of the %s door? The code of the %s door is";

/* Tokenizes text into a malloc'd array (*n ids); NULL with err. */
static int32_t *ids_of(const kvc_tokenizer *t, const char *text, int *n, kvc_err *err) {
    size_t len = strlen(text);
    int32_t *ids = kvc_malloc_array(len + 8, sizeof *ids);
    if (!ids) {
        kvc_fail(err, "out of memory tokenizing a facts prompt");
        return NULL;
    }
    int64_t got = kvc_tokenizer_encode(t, text, len, 0, ids, (int64_t)len + 8, err);
    if (got < 0) {
        free(ids);
        return NULL;
    }
    *n = (int)got;
    return ids;
}

int kvc_facts_build(const kvc_tokenizer *t, int length, int n_facts, uint64_t *rng, kvc_passkey_prompt *p, char *answer,
                    kvc_err *err) {
    memset(p, 0, sizeof *p);
    if (n_facts < 1 || n_facts > KVC_FACTS_MAX)
        return kvc_fail(err, "facts: %d facts per prompt (1..%d)", n_facts, KVC_FACTS_MAX);
    /* which colours, their codes, and the one asked for */
    int col[KVC_FACTS_MAX], order[KVC_FACTS_MAX];
    char code[KVC_FACTS_MAX][8];
    for (int i = 0; i < KVC_FACTS_MAX; i++) order[i] = i;
    for (int i = KVC_FACTS_MAX - 1; i > 0; i--) { /* Fisher-Yates */
        int j = (int)kvc_rng_below(rng, (uint64_t)i + 1), x = order[i];
        order[i] = order[j], order[j] = x;
    }
    for (int i = 0; i < n_facts; i++) {
        col[i] = order[i];
        snprintf(code[i], sizeof code[i], "%05d", (int)(10000 + kvc_rng_below(rng, 90000)));
    }
    const int asked = (int)kvc_rng_below(rng, (uint64_t)n_facts);
    snprintf(answer, 8, "%s", code[asked]);
    char q[200];
    snprintf(q, sizeof q, QUESTION, COLOURS[col[asked]], COLOURS[col[asked]]);
    int ni = 0, nq = 0, nf[KVC_FACTS_MAX], ns[N_FILLER];
    int32_t *intro = ids_of(t, INTRO, &ni, err), *qu = intro ? ids_of(t, q, &nq, err) : NULL;
    int32_t *fact[KVC_FACTS_MAX] = {0}, *sent[N_FILLER] = {0};
    int rc = qu ? 0 : -1, fact_tokens = 0;
    for (int i = 0; i < n_facts && !rc; i++) {
        char f[120];
        snprintf(f, sizeof f, FACT, COLOURS[col[i]], code[i]);
        if (!(fact[i] = ids_of(t, f, &nf[i], err))) rc = -1;
        else fact_tokens += nf[i];
    }
    for (int i = 0; i < N_FILLER && !rc; i++)
        if (!(sent[i] = ids_of(t, FILLER[i], &ns[i], err))) rc = -1;
    const int room = rc ? 0 : length - ni - nq - fact_tokens;
    if (!rc && room < 0)
        rc = kvc_fail(err, "facts: a length of %d tokens cannot hold the intro, %d facts and the question (%d tokens)",
                      length, n_facts, ni + nq + fact_tokens);
    if (!rc && !(p->ids = kvc_malloc_array((size_t)length, sizeof(int32_t)))) rc = kvc_fail(err, "out of memory");
    if (!rc) {
        /* whole filler sentences; fact i goes at the sentence boundary nearest a depth drawn in
         * the i-th of n_facts equal strata, so facts spread over the whole text */
        int fill = 0, nsent = 0;
        while (fill + ns[nsent % N_FILLER] <= room) fill += ns[nsent++ % N_FILLER];
        int cut[KVC_FACTS_MAX];
        for (int i = 0; i < n_facts; i++) {
            const double target = ((double)i + kvc_rng_unit(rng)) / n_facts * fill;
            int at = 0, best = 0;
            cut[i] = 0;
            for (int s = 0; s <= nsent; s++) {
                if (fabs(at - target) < fabs(best - target)) best = at, cut[i] = s;
                if (s < nsent) at += ns[s % N_FILLER];
            }
        }
        memcpy(p->ids, intro, (size_t)ni * sizeof(int32_t));
        int w = ni, next = 0;
        p->filler_start = ni;
        for (int s = 0; s <= nsent; s++) {
            for (; next < n_facts && cut[next] == s; next++) { /* strata keep the cuts in order */
                if (next == asked) p->needle_at = w, p->key_at = w + nf[next] - 1;
                memcpy(p->ids + w, fact[next], (size_t)nf[next] * sizeof(int32_t));
                w += nf[next];
            }
            if (s < nsent) {
                memcpy(p->ids + w, sent[s % N_FILLER], (size_t)ns[s % N_FILLER] * sizeof(int32_t));
                w += ns[s % N_FILLER];
            }
        }
        p->n_context = w;
        memcpy(p->ids + w, qu, (size_t)nq * sizeof(int32_t));
        p->n = w + nq;
        p->filler_len = fill;
    }
    free(intro), free(qu);
    for (int i = 0; i < KVC_FACTS_MAX; i++) free(fact[i]);
    for (int i = 0; i < N_FILLER; i++) free(sent[i]);
    if (rc) kvc_passkey_prompt_free(p);
    return rc;
}
