/* progress.c - the one-line progress display with rate and ETA that long jobs (capture,
 * training, sweeps, passkey) draw on stderr when it is a terminal. */
#include "kvc/common.h"

#include <stdio.h>

void kvc_progress_draw(const char *label, double done, double total, const char *unit, double t0) {
    double el = kvc_now() - t0, rate = el > 0 ? done / el : 0, eta = rate > 0 ? (total - done) / rate : 0;
    int w = 24, fill = total > 0 ? (int)(w * done / total) : 0;
    char bar[32];
    for (int i = 0; i < w; i++) bar[i] = i < fill ? '#' : ' ';
    bar[w] = '\0';
    fprintf(stderr, "\r%s [%s] %.0f/%.0f %s  %.1f %s/s  ETA %02d:%02d ", label, bar, done, total, unit, rate, unit,
            (int)eta / 60, (int)eta % 60);
    fflush(stderr);
}

void kvc_progress_end(void) { fputc('\n', stderr); }
