// SPDX-License-Identifier: GPL-2.0
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include "native.h"
#include "flowhash.h"

/* Weighted Maglev build; lb/maglev.py holds the readable reference and the
 * explanation. Turns come in rounds r = 1, 2, ...: in round r a backend of weight w gets
 * a turn when floor(r*w/W) > floor((r-1)*w/W), W the largest weight, in index order,
 * until it reaches its quota. A turn takes the backend's next preferred empty slot.
 * Occupancy is tracked in a bitmap (8 KiB for M = 65537, in L1) rather than in the
 * 256 KiB table, since probing dominates. table[] receives ids[b] (never 0); 0 marks a
 * slot no backend took. */
#define SEED_OFFSET 0x2C6B7A31u
#define SEED_SKIP 0x7F4A7C15u

/* keys: n keys of key_words u32 each; same permutation as lb/maglev.py:permutation */
static void mg_perms(uint32_t M, uint32_t n, const uint32_t *keys, uint32_t key_words,
                     uint32_t *offsets, uint32_t *skips)
{
    for (uint32_t i = 0; i < n; i++) {
        const uint32_t *k = keys + (size_t)i * key_words;
        offsets[i] = murmur3_words(k, key_words, SEED_OFFSET) % M;
        skips[i] = murmur3_words(k, key_words, SEED_SKIP) % (M - 1) + 1;
    }
}

/* Largest-remainder quotas: q[i] = floor(M*w/sum) plus one for the largest remainders
 * (ties to lower index), as lb/maglev.py:quotas. */
struct mg_rem { uint64_t rem; uint32_t i; };

static int mg_rem_cmp(const void *a, const void *b)
{
    const struct mg_rem *x = a, *y = b;
    if (x->rem != y->rem)
        return x->rem > y->rem ? -1 : 1;
    return x->i < y->i ? -1 : (x->i > y->i);
}

static int mg_quotas(uint32_t M, uint32_t n, const uint64_t *w, uint32_t *q)
{
    unsigned __int128 total = 0;
    uint64_t given = 0;
    struct mg_rem *r;
    uint32_t i, nr = 0;

    for (i = 0; i < n; i++)
        total += w[i];
    if (!total) {
        memset(q, 0, n * sizeof(*q));
        return 0;
    }
    r = calloc(n ? n : 1, sizeof(*r));
    if (!r)
        return -ENOMEM;
    for (i = 0; i < n; i++) {
        unsigned __int128 p = (unsigned __int128)M * w[i];
        q[i] = (uint32_t)(p / total);
        given += q[i];
        if (w[i])
            r[nr++] = (struct mg_rem){ (uint64_t)(p % total), i };
    }
    qsort(r, nr, sizeof(*r), mg_rem_cmp);
    for (i = 0; i < nr && given < M; i++, given++)
        q[r[i].i]++;
    free(r);
    return 0;
}

static void mg_down(uint64_t *h, uint32_t n, uint32_t k)
{
    for (;;) {
        uint32_t l = 2 * k + 1, r = l + 1, m = k;
        if (l < n && h[l] < h[m]) m = l;
        if (r < n && h[r] < h[m]) m = r;
        if (m == k) return;
        uint64_t t = h[k]; h[k] = h[m]; h[m] = t;
        k = m;
    }
}

/* The backend's k-th turn (k >= 1) comes in round ceil(k * wmax / w). */
static inline uint64_t mg_round(uint64_t k, uint64_t w, uint64_t wmax)
{
    return (k * wmax + w - 1) / w;
}

int xdplb_maglev_build(uint32_t M, uint32_t n, const uint32_t *keys, uint32_t key_words,
                       const uint64_t *weights, const uint32_t *ids, uint32_t *table)
{
    uint32_t *offsets = calloc(n ? n : 1, sizeof(uint32_t));
    uint32_t *skips = calloc(n ? n : 1, sizeof(uint32_t));
    uint32_t *quotas = calloc(n ? n : 1, sizeof(uint32_t));
    uint32_t *taken = calloc(n ? n : 1, sizeof(uint32_t));
    uint32_t *live = calloc(n ? n : 1, sizeof(uint32_t));
    uint64_t *heap = calloc(n ? n : 1, sizeof(uint64_t));
    uint64_t *used = calloc(M / 64 + 1, sizeof(uint64_t));
    uint32_t nl = 0, filled = 0, i, equal = 1;
    uint64_t wmax = 0;
    int ret = -ENOMEM;

    if (!offsets || !skips || !quotas || !taken || !live || !heap || !used || M < 2)
        goto out;
    mg_perms(M, n, keys, key_words, offsets, skips);
    if (mg_quotas(M, n, weights, quotas))
        goto out;
    memset(table, 0, (size_t)M * sizeof(*table));
    for (i = 0; i < n; i++) {
        if (quotas[i] && weights[i] && ids[i]) {
            if (nl && weights[i] != wmax)
                equal = 0;
            if (weights[i] > wmax)
                wmax = weights[i];
            live[nl++] = i;
        }
    }
#define MG_TURN(b) do {                                              \
        uint32_t pos_ = offsets[b], skip_ = skips[b];                \
        while (used[pos_ >> 6] & (1ull << (pos_ & 63))) {            \
            pos_ += skip_;                                           \
            if (pos_ >= M) pos_ -= M;                                \
        }                                                            \
        used[pos_ >> 6] |= 1ull << (pos_ & 63);                      \
        table[pos_] = ids[b];                                        \
        pos_ += skip_;                                               \
        if (pos_ >= M) pos_ -= M;                                    \
        offsets[b] = pos_;                                           \
        filled++;                                                    \
    } while (0)
    if (equal) {
        /* every backend turns every round: plain round robin */
        while (nl && filled < M) {
            uint32_t k = 0;
            for (uint32_t j = 0; j < nl; j++) {
                uint32_t b = live[j];
                MG_TURN(b);
                if (++taken[b] < quotas[b])
                    live[k++] = b;
            }
            nl = k;
        }
    } else {
        /* order turns by (round, index): heap of round << 32 | index */
        for (i = 0; i < nl; i++)
            heap[i] = mg_round(1, weights[live[i]], wmax) << 32 | live[i];
        for (i = nl; i-- > 0;)
            mg_down(heap, nl, i);
        while (nl && filled < M) {
            uint32_t b = (uint32_t)heap[0];
            MG_TURN(b);
            if (++taken[b] >= quotas[b])
                heap[0] = heap[--nl];
            else
                heap[0] = mg_round(taken[b] + 1, weights[b], wmax) << 32 | b;
            mg_down(heap, nl, 0);
        }
    }
#undef MG_TURN
    ret = (int)filled;
out:
    free(offsets); free(skips); free(quotas); free(taken); free(live); free(heap); free(used);
    return ret;
}
