/* The CPU attention backend's kernels (runtime/attention/cpu_kernel.py), float32, over the
 * paged KV cache laid out as the reference backend's:
 * [2 (k, v)][num_blocks][kv_heads][block_size][head_dim].
 *
 * paged_store_f32 writes a step's new keys and values into their slots.
 *
 * paged_decode_f32 is decode attention read straight from the cache: one query row per
 * sequence (its newest token) against every key of its context, found through its block
 * table. Nothing is gathered, copied or padded, so a short context costs only its own keys
 * however long its neighbours' are. Work items are (sequence, K/V head) pairs shared over
 * OpenMP threads (libgomp is torch's own: the process has one runtime). The query heads of
 * one K/V head (GQA's group) are done together, so each key and value row is loaded once.
 * A sliding window of W keys (window > 0) starts each context at its key context - W: blocks
 * before it are never read. Sinks (one logit per query head, or NULL) join each row's
 * softmax as a key with no value (runtime/attention/interface.py).
 */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

/* One slot per token; a negative slot (a padding row) is skipped. */
void paged_store_f32(const float *restrict k, const float *restrict v, /* [tokens][kv_heads][hd] */
                     const int64_t *restrict slots, int64_t tokens, float *restrict cache,
                     int64_t num_blocks, int64_t kv_heads, int64_t block_size, int64_t head_dim)
{
    const int64_t head_block = block_size * head_dim;
    float *values = cache + num_blocks * kv_heads * head_block;
    const size_t row = sizeof(float) * head_dim;
    for (int64_t t = 0; t < tokens; t++) {
        if (slots[t] < 0) continue;
        const int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t at = (block * kv_heads + h) * head_block + offset * head_dim;
            memcpy(cache + at, k + (t * kv_heads + h) * head_dim, row);
            memcpy(values + at, v + (t * kv_heads + h) * head_dim, row);
        }
    }
}

/* Asks for the cache lines of one block of one head (head_block floats) ahead of their use:
 * a block's 2 KB (16 tokens of 32 floats) lie apart from the previous block's, so the
 * hardware prefetcher starts late on each, and a step's K/V, far larger than the caches when
 * the weights stream through them too, comes from memory: 10-30% faster on a 2-vCPU x86-64
 * VM (AMD EPYC). */
static inline __attribute__((always_inline)) void prefetch_block(const float *block,
                                                                 int64_t head_block)
{
    for (int64_t i = 0; i < head_block; i += 16) __builtin_prefetch(block + i);
}

/* s[t] = e^(s[t] - top) for t < n, eight at a time; returns their sum. */
static inline __attribute__((always_inline)) float exp_shifted(float *restrict s, int64_t n,
                                                               float top)
{
    v8 acc = splat8(0.f);
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        const v8 e = exp8_nonpositive(load8(s + t) - splat8(top));
        store8(s + t, e);
        acc += e;
    }
    float sum = 0.f;
    for (int i = 0; i < 8; i++) sum += acc[i];
    if (t < n) { /* the last n % 8, through a zero-padded copy */
        float tail[8] = {0};
        memcpy(tail, s + t, sizeof(float) * (size_t)(n - t));
        store8(tail, exp8_nonpositive(load8(tail) - splat8(top)));
        for (int64_t i = 0; i < n - t; i++) sum += tail[i];
        memcpy(s + t, tail, sizeof(float) * (size_t)(n - t));
    }
    return sum;
}

/* One (sequence, K/V head) pair: its group of query rows against its context's visible keys
 * [first, context). Inlined into each specialisation below, where head_dim and group are
 * constants, so the dot products and the value sums unroll and a group's output rows stay in
 * registers: 1.4-1.8x faster than the same loops over variables on a 2-vCPU x86-64 VM (AMD
 * EPYC; 32 decoders, contexts 32-512). sinks is the group's own (sinks + h * group), or NULL. */
static inline __attribute__((always_inline)) int attend(
    const float *restrict qh, const float *restrict keys, const float *restrict values,
    const int64_t *restrict table, int64_t context, int64_t window, const float *restrict sinks,
    int64_t kv_heads, int64_t h, int64_t block_size, const int64_t head_dim,
    const int64_t group, float scale, float *restrict oh)
{
    const int64_t head_block = block_size * head_dim; /* one block of one head */
    if (context == 0) { /* a padding row: nothing to attend to, and a sink has no value */
        for (int64_t d = 0; d < group * head_dim; d++) oh[d] = 0.f;
        return 0;
    }
    const int64_t first = window > 0 && context > window ? context - window : 0;
    const int64_t seen = context - first; /* keys in the window, >= 1 */
    /* The walks start at the block holding `first`, at its slot first % block_size there and
     * at slot 0 in every later block; t0 is the position of a block's slot 0. */
    const int64_t start = first - first % block_size;
    float *scores = malloc(sizeof(float) * group * seen); /* [group][seen]: key first + t */
    if (scores == NULL) return -1;
    for (int64_t t0 = start; t0 < context; t0 += block_size) {
        const int64_t s0 = t0 < first ? first - t0 : 0;
        const float *k =
            keys + (table[t0 / block_size] * kv_heads + h) * head_block + s0 * head_dim;
        const int64_t n = context - t0 < block_size ? context - t0 : block_size;
        /* the next block of keys, or after the last the first of values */
        const float *next = t0 + block_size < context ? keys : values;
        const int64_t after =
            t0 + block_size < context ? t0 / block_size + 1 : start / block_size;
        prefetch_block(next + (table[after] * kv_heads + h) * head_block, head_block);
        for (int64_t s = s0; s < n; s++, k += head_dim) {
            for (int64_t g = 0; g < group; g++) {
                const float *qg = qh + g * head_dim;
                float dot = 0.f;
                for (int64_t d = 0; d < head_dim; d++) dot += qg[d] * k[d];
                scores[g * seen + t0 + s - first] = dot * scale;
            }
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float *sg = scores + g * seen, top = sinks != NULL ? sinks[g] : -FLT_MAX;
        for (int64_t t = 0; t < seen; t++) top = sg[t] > top ? sg[t] : top;
        float sum = exp_shifted(sg, seen, top);
        if (sinks != NULL) sum += exp8_nonpositive(splat8(sinks[g] - top))[0];
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < seen; t++) sg[t] *= inv;
        for (int64_t d = 0; d < head_dim; d++) oh[g * head_dim + d] = 0.f;
    }
    for (int64_t t0 = start; t0 < context; t0 += block_size) {
        const int64_t s0 = t0 < first ? first - t0 : 0;
        const float *v =
            values + (table[t0 / block_size] * kv_heads + h) * head_block + s0 * head_dim;
        const int64_t n = context - t0 < block_size ? context - t0 : block_size;
        if (t0 + block_size < context)
            prefetch_block(values + (table[t0 / block_size + 1] * kv_heads + h) * head_block,
                           head_block);
        for (int64_t s = s0; s < n; s++, v += head_dim) {
            for (int64_t g = 0; g < group; g++) {
                float *og = oh + g * head_dim;
                const float w = scores[g * seen + t0 + s - first];
                for (int64_t d = 0; d < head_dim; d++) og[d] += w * v[d];
            }
        }
    }
    free(scores);
    return 0;
}

/* The GQA group as a constant where it is a common one. */
static inline __attribute__((always_inline)) int attend_group(
    const float *restrict qh, const float *restrict keys, const float *restrict values,
    const int64_t *restrict table, int64_t context, int64_t window, const float *restrict sinks,
    int64_t kv_heads, int64_t h, int64_t block_size, const int64_t head_dim, int64_t group,
    float scale, float *restrict oh)
{
#define ATTEND(G) attend(qh, keys, values, table, context, window, sinks, kv_heads, h, \
                         block_size, head_dim, G, scale, oh)
    switch (group) {
    case 1: return ATTEND(1);
    case 2: return ATTEND(2);
    case 4: return ATTEND(4);
    case 8: return ATTEND(8);
    default: return ATTEND(group);
    }
#undef ATTEND
}

int paged_decode_f32(const float *restrict q,        /* [decoders][heads][head_dim] */
                     const float *restrict cache, int64_t num_blocks, int64_t kv_heads,
                     int64_t block_size, int64_t head_dim,
                     const int64_t *restrict tables, /* [decoders][width]: -1 past a context */
                     int64_t width,
                     const int64_t *restrict context_lens, /* [decoders] */
                     int64_t decoders, int64_t heads, float scale,
                     int64_t window,                 /* keys seen per query; 0: all */
                     const float *restrict sinks,    /* [heads], or NULL: none */
                     int num_threads,
                     float *restrict out)            /* [decoders][heads][head_dim] */
{
    const int64_t group = heads / kv_heads;
    const float *values = cache + num_blocks * kv_heads * block_size * head_dim;
    int failed = 0;
#pragma omp parallel for collapse(2) schedule(dynamic) num_threads(num_threads)
    for (int64_t i = 0; i < decoders; i++) {
        for (int64_t h = 0; h < kv_heads; h++) {
            const float *qh = q + (i * heads + h * group) * head_dim;
            float *oh = out + (i * heads + h * group) * head_dim;
            const int64_t *table = tables + i * width;
            const float *sh = sinks != NULL ? sinks + h * group : NULL;
#define ATTEND(D) attend_group(qh, cache, values, table, context_lens[i], window, sh, kv_heads, \
                               h, block_size, D, group, scale, oh)
            int bad;
            switch (head_dim) {
            case 32: bad = ATTEND(32); break;
            case 64: bad = ATTEND(64); break;
            case 128: bad = ATTEND(128); break;
            default: bad = ATTEND(head_dim);
            }
#undef ATTEND
            if (bad) {
#pragma omp atomic write
                failed = 1;
            }
        }
    }
    return failed ? -1 : 0;
}
