/* y = x @ w.T in fp32 for the few rows of x a decoding step has (AVX2 + FMA, x86-64).
 *
 * Why our own: at a few rows the product should be bound by reading w, but MKL's sgemm on this
 * project's CPU reads it well under the memory's speed (figures: experiments/inference.md, the CPU
 * kernel's thresholds and design choices). The kernel keeps w row-major
 * (PyTorch's nn.Linear layout), so nothing is repacked: each tile of outputs is a few rows of w
 * streamed once, with a software prefetch a couple of tiles ahead, against a few rows of x that
 * stay in L1; w is cut into chunks small enough (~128 KiB) to be read from L2 by the second and
 * later blocks of x rows.
 *
 * Tiles (accumulators in registers: 8 of the 16 ymm): 4 rows of x x 2 rows of w, 2 x 4, 1 x 4;
 * a remainder of w rows goes one dot product at a time. Any K: the last K % 8 columns use masked
 * loads. Sums run in a different order than MKL's, so results differ from F.linear's in the last
 * bits (the tests compare with a tolerance).
 */
#include <immintrin.h>
#include <omp.h>

#define PREFETCH_TILES 2 /* how far ahead of the current tile rows of w are prefetched */
#define CHUNK_BYTES (128 * 1024) /* rows of w per chunk: L2-resident across blocks of x rows */

static inline float hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* lanes 0 .. n-1 set: masked loads of the last n < 8 columns */
static inline __m256i tail_mask(long n)
{
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

#define Z _mm256_setzero_ps()
#define FMA(a, b, acc) acc = _mm256_fmadd_ps(a, b, acc)
#define PF(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)

/* The k loop of every tile: STEP(LOAD, k) consumes columns k .. k+7, loaded with LOAD(pointer). */
#define LOADU(p) _mm256_loadu_ps(p)
#define LOADM(p) _mm256_maskload_ps(p, mask)
#define K_LOOP(PREFETCH)                                  \
    long k = 0;                                           \
    for (; k + 16 <= K; k += 16) {                        \
        PREFETCH;                                         \
        STEP(LOADU, k);                                   \
        STEP(LOADU, k + 8);                               \
    }                                                     \
    for (; k + 8 <= K; k += 8) STEP(LOADU, k);            \
    if (k < K) {                                          \
        __m256i mask = tail_mask(K - k);                  \
        STEP(LOADM, k);                                   \
    }

typedef void (*tile_fn)(long K, const float *x, long ldx, const float *w, long ldw, float *y,
                        long ldy, long ahead);

/* 4 rows of x against 2 rows of w */
static void tile4x2(long K, const float *x, long ldx, const float *w, long ldw, float *y, long ldy,
                    long ahead)
{
    __m256 a0 = Z, a1 = Z, b0 = Z, b1 = Z, c0 = Z, c1 = Z, d0 = Z, d1 = Z;
    const float *w0 = w, *w1 = w + ldw, *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
#define STEP(LOAD, k)                                                   \
    do {                                                                \
        __m256 v0 = LOAD(w0 + (k)), v1 = LOAD(w1 + (k)), u;             \
        u = LOAD(x0 + (k)); FMA(u, v0, a0); FMA(u, v1, a1);             \
        u = LOAD(x1 + (k)); FMA(u, v0, b0); FMA(u, v1, b1);             \
        u = LOAD(x2 + (k)); FMA(u, v0, c0); FMA(u, v1, c1);             \
        u = LOAD(x3 + (k)); FMA(u, v0, d0); FMA(u, v1, d1);             \
    } while (0)
    K_LOOP((PF(w0 + ahead + k), PF(w1 + ahead + k)))
#undef STEP
    y[0] = hsum(a0), y[1] = hsum(a1);
    y += ldy, y[0] = hsum(b0), y[1] = hsum(b1);
    y += ldy, y[0] = hsum(c0), y[1] = hsum(c1);
    y += ldy, y[0] = hsum(d0), y[1] = hsum(d1);
}

/* 2 rows of x against 4 rows of w */
static void tile2x4(long K, const float *x, long ldx, const float *w, long ldw, float *y, long ldy,
                    long ahead)
{
    __m256 a0 = Z, a1 = Z, a2 = Z, a3 = Z, b0 = Z, b1 = Z, b2 = Z, b3 = Z;
    const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw, *x0 = x, *x1 = x + ldx;
#define STEP(LOAD, k)                                                                         \
    do {                                                                                      \
        __m256 v0 = LOAD(w0 + (k)), v1 = LOAD(w1 + (k)), v2 = LOAD(w2 + (k)), v3 = LOAD(w3 + (k)), u; \
        u = LOAD(x0 + (k)); FMA(u, v0, a0); FMA(u, v1, a1); FMA(u, v2, a2); FMA(u, v3, a3);   \
        u = LOAD(x1 + (k)); FMA(u, v0, b0); FMA(u, v1, b1); FMA(u, v2, b2); FMA(u, v3, b3);   \
    } while (0)
    K_LOOP((PF(w0 + ahead + k), PF(w1 + ahead + k), PF(w2 + ahead + k), PF(w3 + ahead + k)))
#undef STEP
    y[0] = hsum(a0), y[1] = hsum(a1), y[2] = hsum(a2), y[3] = hsum(a3);
    y += ldy, y[0] = hsum(b0), y[1] = hsum(b1), y[2] = hsum(b2), y[3] = hsum(b3);
}

/* 1 row of x against 4 rows of w */
static void tile1x4(long K, const float *x, long ldx, const float *w, long ldw, float *y, long ldy,
                    long ahead)
{
    __m256 a0 = Z, a1 = Z, a2 = Z, a3 = Z;
    const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw;
    (void)ldx, (void)ldy;
#define STEP(LOAD, k)                                                                         \
    do {                                                                                      \
        __m256 u = LOAD(x + (k));                                                             \
        FMA(u, LOAD(w0 + (k)), a0); FMA(u, LOAD(w1 + (k)), a1);                               \
        FMA(u, LOAD(w2 + (k)), a2); FMA(u, LOAD(w3 + (k)), a3);                               \
    } while (0)
    K_LOOP((PF(w0 + ahead + k), PF(w1 + ahead + k), PF(w2 + ahead + k), PF(w3 + ahead + k)))
#undef STEP
    y[0] = hsum(a0), y[1] = hsum(a1), y[2] = hsum(a2), y[3] = hsum(a3);
}

/* one row of x against one row of w */
static float dot(long K, const float *x, const float *w)
{
    __m256 a0 = Z;
#define STEP(LOAD, k) FMA(LOAD(x + (k)), LOAD(w + (k)), a0)
    K_LOOP((void)0)
#undef STEP
    return hsum(a0);
}

/* rows n0 .. n1-1 of w against `rows` rows of x, `cols` rows of w per tile */
static void tile_rows(tile_fn tile, int rows, int cols, long n0, long n1, long K, const float *x,
                      long ldx, const float *w, long ldw, float *y, long ldy)
{
    long n = n0;
    for (; n + cols <= n1; n += cols)
        tile(K, x, ldx, w + n * ldw, ldw, y + n, ldy, PREFETCH_TILES * cols * ldw);
    for (; n < n1; n++)
        for (int i = 0; i < rows; i++) y[i * ldy + n] = dot(K, x + i * ldx, w + n * ldw);
}

/* y (M x N, row stride ldy) = x (M x K, row stride ldx) @ w.T, w N x K with row stride ldw.
 * The chunks of w rows are shared among `threads` OpenMP threads. */
void llama_zh_sgemm_nt(long M, long N, long K, const float *x, long ldx, const float *w, long ldw,
                       float *y, long ldy, int threads)
{
    long chunk = CHUNK_BYTES / (long)(sizeof(float) * K);
    chunk = chunk < 4 ? 4 : chunk - chunk % 4;
    long chunks = (N + chunk - 1) / chunk;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && chunks > 1)
    for (long c = 0; c < chunks; c++) {
        long n0 = c * chunk, n1 = n0 + chunk < N ? n0 + chunk : N, m = 0;
        for (; m + 4 <= M; m += 4) tile_rows(tile4x2, 4, 2, n0, n1, K, x + m * ldx, ldx, w, ldw, y + m * ldy, ldy);
        for (; m + 2 <= M; m += 2) tile_rows(tile2x4, 2, 4, n0, n1, K, x + m * ldx, ldx, w, ldw, y + m * ldy, ldy);
        if (m < M) tile_rows(tile1x4, 1, 4, n0, n1, K, x + m * ldx, ldx, w, ldw, y + m * ldy, ldy);
    }
}

/* ---- GEMV: 1 to GEMV_MAX_ROWS rows of x, w read as one sequential stream ----
 *
 * Why a second kernel: at one row the tiles above read 4 rows of w at once (4 streams a few KiB
 * apart), barely faster than F.linear. A row-major matrix read one row after the other is a single
 * forward stream through memory, which the hardware prefetcher follows on its own: a software
 * prefetch ahead of it was slower, 2 MiB pages (kernels.huge_page_copy) faster (experiments/inference.md).
 * Each row of w is one dot product per row of x, with independent accumulators so the FMA latency
 * does not bound the loop. AVX-512 where the CPU has it (chosen at run time: the library is compiled
 * for AVX2 + FMA), AVX2 otherwise.
 */
#define GEMV_MAX_ROWS 4

/* rows n0 .. n1-1 of w against M <= GEMV_MAX_ROWS rows of x, 8 floats per load; inlined into one
 * copy per M (GEMV_BY_ROWS) so that the accumulators of a constant M stay in registers */
static inline __attribute__((always_inline)) void gemv_avx2_m(
    long M, long n0, long n1, long K, const float *x, long ldx, const float *w, long ldw, float *y, long ldy)
{
    for (long n = n0; n < n1; n++) {
        const float *wr = w + n * ldw;
        __m256 a[GEMV_MAX_ROWS][2];
        for (int i = 0; i < GEMV_MAX_ROWS; i++) a[i][0] = a[i][1] = Z;
        long k = 0;
        for (; k + 16 <= K; k += 16) {
            __m256 v0 = _mm256_loadu_ps(wr + k), v1 = _mm256_loadu_ps(wr + k + 8);
            for (int i = 0; i < M; i++) {
                FMA(_mm256_loadu_ps(x + i * ldx + k), v0, a[i][0]);
                FMA(_mm256_loadu_ps(x + i * ldx + k + 8), v1, a[i][1]);
            }
        }
        for (; k + 8 <= K; k += 8) {
            __m256 v0 = _mm256_loadu_ps(wr + k);
            for (int i = 0; i < M; i++) FMA(_mm256_loadu_ps(x + i * ldx + k), v0, a[i][0]);
        }
        if (k < K) {
            __m256i mask = tail_mask(K - k);
            __m256 v0 = _mm256_maskload_ps(wr + k, mask);
            for (int i = 0; i < M; i++) FMA(_mm256_maskload_ps(x + i * ldx + k, mask), v0, a[i][1]);
        }
        for (int i = 0; i < M; i++) y[i * ldy + n] = hsum(_mm256_add_ps(a[i][0], a[i][1]));
    }
}

/* the same with 16 floats per load and, for one row of x, four accumulators */
__attribute__((target("avx512f"), always_inline)) static inline void gemv_avx512_m(
    long M, long n0, long n1, long K, const float *x, long ldx, const float *w, long ldw, float *y, long ldy)
{
    const __mmask16 tail = (__mmask16)((1u << (K % 16)) - 1);
    const long body = K - K % 16;
    for (long n = n0; n < n1; n++) {
        const float *wr = w + n * ldw;
        if (M == 1) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            long k = 0;
            for (; k + 64 <= body; k += 64) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(wr + k), a0);
                a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(wr + k + 16), a1);
                a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), _mm512_loadu_ps(wr + k + 32), a2);
                a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), _mm512_loadu_ps(wr + k + 48), a3);
            }
            for (; k < body; k += 16) {
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(wr + k), a0);
            }
            if (tail)
                a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x + k), _mm512_maskz_loadu_ps(tail, wr + k), a1);
            y[n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
            continue;
        }
        __m512 a[GEMV_MAX_ROWS][2];
        for (int i = 0; i < GEMV_MAX_ROWS; i++) a[i][0] = a[i][1] = _mm512_setzero_ps();
        long k = 0;
        for (; k + 32 <= body; k += 32) {
            __m512 v0 = _mm512_loadu_ps(wr + k), v1 = _mm512_loadu_ps(wr + k + 16);
            for (int i = 0; i < M; i++) {
                a[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * ldx + k), v0, a[i][0]);
                a[i][1] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * ldx + k + 16), v1, a[i][1]);
            }
        }
        for (; k < body; k += 16) {
            __m512 v0 = _mm512_loadu_ps(wr + k);
            for (int i = 0; i < M; i++) a[i][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + i * ldx + k), v0, a[i][0]);
        }
        if (tail) {
            __m512 v0 = _mm512_maskz_loadu_ps(tail, wr + k);
            for (int i = 0; i < M; i++)
                a[i][1] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x + i * ldx + k), v0, a[i][1]);
        }
        for (int i = 0; i < M; i++) y[i * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(a[i][0], a[i][1]));
    }
}

/* one copy of the kernel per constant M */
#define GEMV_BY_ROWS(name, body, attr)                                                               \
    attr static void name(long M, long n0, long n1, long K, const float *x, long ldx, const float *w, \
                          long ldw, float *y, long ldy)                                              \
    {                                                                                                \
        switch (M) {                                                                                 \
        case 1: body(1, n0, n1, K, x, ldx, w, ldw, y, ldy); break;                                   \
        case 2: body(2, n0, n1, K, x, ldx, w, ldw, y, ldy); break;                                   \
        case 3: body(3, n0, n1, K, x, ldx, w, ldw, y, ldy); break;                                   \
        default: body(4, n0, n1, K, x, ldx, w, ldw, y, ldy);                                         \
        }                                                                                            \
    }
GEMV_BY_ROWS(gemv_avx2, gemv_avx2_m, )
GEMV_BY_ROWS(gemv_avx512, gemv_avx512_m, __attribute__((target("avx512f"))))

typedef void (*gemv_fn)(long, long, long, long, const float *, long, const float *, long, float *, long);

/* 2 = AVX-512, 1 = AVX2; llama_zh_gemv_isa() reports the choice, llama_zh_gemv_force() overrides it
 * (tests and the benchmark compare both paths on a CPU that has both). */
static int gemv_isa = -1;

int llama_zh_gemv_isa(void)
{
    if (gemv_isa < 0) {
        __builtin_cpu_init();
        gemv_isa = __builtin_cpu_supports("avx512f") ? 2 : 1;
    }
    return gemv_isa;
}

int llama_zh_gemv_force(int isa)
{
    int best = (gemv_isa = -1, llama_zh_gemv_isa());
    gemv_isa = isa < best ? isa : best;
    return gemv_isa;
}

/* y (M x N) = x (M x K) @ w.T for M <= GEMV_MAX_ROWS (more: the tiles); rows of w shared among
 * `threads` threads in contiguous ranges (each thread still reads one stream). */
void llama_zh_gemv(long M, long N, long K, const float *x, long ldx, const float *w, long ldw, float *y,
                   long ldy, int threads)
{
    gemv_fn f = llama_zh_gemv_isa() == 2 ? gemv_avx512 : gemv_avx2;
    /* 3-4 rows of x that do not fit L1 beside the stream of w (K > 1024: 12 KiB and more) ran slower
     * here than in the tiles (768x2048, 4 rows: 4.7-5.5 GB/s against 6.6; 2304x768, 4 rows: 8.1-10.1
     * against 6.1; one thread, load ~7) */
    if (M > GEMV_MAX_ROWS || (M > 2 && K > 1024)) {
        llama_zh_sgemm_nt(M, N, K, x, ldx, w, ldw, y, ldy, threads);
        return;
    }
    if (threads <= 1 || N < 64) {
        f(M, 0, N, K, x, ldx, w, ldw, y, ldy);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        long n0 = N * t / T, n1 = N * (t + 1) / T;
        f(M, n0, n1, K, x, ldx, w, ldw, y, ldy);
    }
}
