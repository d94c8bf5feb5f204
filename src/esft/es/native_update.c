/* The CPU kernel of the ES update with stochastic rounding into bfloat16 (native.py loads it).

   Per value: w = the stored bf16 weight as float32, x = w + intended (one float32 addition), then the
   16 low bits of x's bit pattern get 16 random bits added and are dropped. The random bits are
   precision.random_bits: Wellons' lowbias32 of (coordinate * 0x9E3779B9 + seed_lo) ^ seed_hi, in 32-bit
   unsigned arithmetic, which gives the same bits as torch's int32 arithmetic with masked shifts. So the
   weights equal the eager path's bit for bit; native.py checks that before the kernel is used.

   Statistics, per row of BLOCK values: sum w*w, i*i, a*a, a*i, #(i != 0), #(a != 0) with a the applied
   step (new - w), in float32 over LANES lane accumulators, the lanes summed in a fixed pairwise order. A row
   is never split between threads, so the sums do not depend on the thread count.

   Built with -ffp-contract=off (no fused multiply-add changes a sum) and without -ffast-math. */

#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 128
#define LANES 16
#define PREFETCH 4 /* rows */

static inline uint32_t bits_of(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float float_of(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

struct job {
    uint16_t *weights; /* bf16 bit patterns, rows * BLOCK, updated in place */
    const float *intended;
    int64_t first, last; /* rows [first, last) */
    int64_t rows;        /* all rows: the stride of sums */
    uint32_t offset, seed_lo, seed_hi;
    double *sums; /* (6, rows) */
};

static void *run_rows(void *arg) {
    const struct job *j = arg;
    for (int64_t r = j->first; r < j->last; r++) {
        float acc[6][LANES];
        memset(acc, 0, sizeof acc);
        uint16_t *w16 = j->weights + r * BLOCK;
        const float *in = j->intended + r * BLOCK;
        const uint32_t base = j->offset + (uint32_t)(r * BLOCK);
        /* the weights PREFETCH rows ahead, for writing: they stream from memory (the step was just
           made by a matmul and is in cache); 1.7x faster on memory-resident weights, 2-core Xeon */
        if (r + PREFETCH < j->last)
            for (int b = 0; b < BLOCK * 2; b += 64)
                __builtin_prefetch((const char *)(w16 + PREFETCH * BLOCK) + b, 1, 0);
        for (int c0 = 0; c0 < BLOCK; c0 += LANES) {
#pragma GCC ivdep
            for (int k = 0; k < LANES; k++) {
                const int c = c0 + k;
                const float w = float_of((uint32_t)w16[c] << 16);
                const float i = in[c];
                const float x = w + i;
                uint32_t h = (base + (uint32_t)c) * 0x9E3779B9u + j->seed_lo;
                h ^= j->seed_hi;
                h ^= h >> 16;
                h *= 0x7FEB352Du;
                h ^= h >> 15;
                h *= 0x846CA68Bu;
                h ^= h >> 16;
                const uint32_t rounded = (bits_of(x) + (h & 0xFFFFu)) & 0xFFFF0000u;
                const float a = float_of(rounded) - w;
                w16[c] = (uint16_t)(rounded >> 16);
                acc[0][k] += w * w;
                acc[1][k] += i * i;
                acc[2][k] += a * a;
                acc[3][k] += a * i;
                acc[4][k] += (i != 0.0f) ? 1.0f : 0.0f;
                acc[5][k] += (a != 0.0f) ? 1.0f : 0.0f;
            }
        }
        /* the lanes summed pairwise (a fixed tree, in vector registers): a sequential sum of 6 x 16
           lanes cost as much as the row's own loop; this made the kernel 12% faster */
        for (int half = LANES / 2; half > 0; half /= 2)
            for (int s = 0; s < 6; s++)
                for (int k = 0; k < half; k++) acc[s][k] += acc[s][k + half];
        for (int s = 0; s < 6; s++) j->sums[s * j->rows + r] = acc[s][0];
    }
    return NULL;
}

/* The low-rank population's correction at a decode step, rank 1 (engines/population.py):
   out[m, r, :] += coef[m, r] * a[m, :] for out (n, rows, cols) and a (n, cols) in bf16 and coef (n, rows)
   in float32. Each value is rounded to the nearest bf16 (ties to even) from the float32 sum
   out + coef * a, which is what torch's addcmul_ computes on the same operands, bit for bit
   (native.py checks that before the kernel is used). The operands are cold (each decode step streams
   the model's weights through the caches), so the output and a are prefetched: the lm_head's correction
   costs +6% of its GEMM against +15-72% with torch's addcmul_ (benchmarks/population_hooks.py [--cold],
   2-core Xeon with AMX). On OpenMP threads where the build has them (native.py uses it only then), else
   on the calling thread. */

static inline float bf16_to_float(uint16_t h) { return float_of((uint32_t)h << 16); }

static inline uint16_t float_to_bf16(float f) {
    if (f != f) return 0x7FC0; /* NaN, as torch rounds it */
    uint32_t u = bits_of(f);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

void esft_outer_add_bf16(uint16_t *out, const float *coef, const uint16_t *a, int64_t n, int64_t rows,
                         int64_t cols, int threads) {
    enum { SPAN = 4096, AHEAD = 512 }; /* values per task; prefetch distance in values (1 KB) */
    const int64_t spans = (cols + SPAN - 1) / SPAN;
    if (threads < 1) threads = 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (int64_t t = 0; t < n * spans; t++) {
        const int64_t m = t / spans, c0 = (t % spans) * SPAN, c1 = c0 + SPAN < cols ? c0 + SPAN : cols;
        const uint16_t *am = a + m * cols;
        for (int64_t r = 0; r < rows; r++) {
            uint16_t *o = out + (m * rows + r) * cols;
            const float k = coef[m * rows + r];
            for (int64_t c = c0; c < c1; c += 32) {
                __builtin_prefetch(o + c + AHEAD, 1, 0);
                if (r == 0) __builtin_prefetch(am + c + AHEAD, 0, 0);
                const int64_t e = c + 32 < c1 ? c + 32 : c1;
                for (int64_t j = c; j < e; j++) o[j] = float_to_bf16(bf16_to_float(o[j]) + k * bf16_to_float(am[j]));
            }
        }
    }
}

/* Whether this build splits rows over OpenMP threads (1) or POSIX threads (0). */
int esft_uses_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Update rows * BLOCK bf16 weights in place, on up to `threads` threads.

   Built with -fopenmp the rows go to OpenMP threads: the process's libgomp.so.1 is torch's, so the
   kernel runs on the threads torch's own kernels just left, which spin for a while before they sleep
   (starting POSIX threads beside them, as the fallback below does, made the whole update 1.7x slower
   on 2 cores: benchmarks/update_breakdown.py). Without OpenMP a thread that cannot be started has its rows run by the caller. */
void esft_stochastic_bf16(uint16_t *weights, const float *intended, int64_t rows, uint32_t offset,
                          uint32_t seed_lo, uint32_t seed_hi, double *sums, int threads) {
    enum { MAX_THREADS = 256, MIN_ROWS = 512 }; /* 64K values a thread: more work than starting it */
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > rows / MIN_ROWS) threads = (int)(rows / MIN_ROWS);
    if (threads < 1) threads = 1;
    struct job jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++)
        jobs[t] = (struct job){weights, intended, rows * t / threads, rows * (t + 1) / threads,
                               rows, offset, seed_lo, seed_hi, sums};
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) run_rows(&jobs[t]);
#else
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS];
    for (int t = 1; t < threads; t++) {
        started[t] = pthread_create(&ids[t], NULL, run_rows, &jobs[t]) == 0;
        if (!started[t]) run_rows(&jobs[t]);
    }
    run_rows(&jobs[0]);
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(ids[t], NULL);
#endif
}
