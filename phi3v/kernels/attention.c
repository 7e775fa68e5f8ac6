/*
 * Fused causal attention for one prefill chunk: the fast prefill's attention (phi3v/layered.py,
 * built and called by phi3v/attention.py; measured in bench/attention_forms.py). The same blocks
 * without the mask (full_attention, at the end) are the vision encoder's attention.
 *
 * The queries of one chunk, positions [start, start + rows), attend to the keys [0, position]
 * of a key/value cache that already holds the chunk's own keys and values, as the fast decoder's
 * GroupQueryAttention does with its shared past/present buffer. Q and K arrive rotated (the
 * layered prefill's graphs apply the rotary embedding). Layouts (fp32, row-major):
 *
 *   q     [rows][heads * head]            the chunk's queries, head h at column h * head
 *   k, v  [kv_heads][capacity][head]      the cache; positions [0, start + rows) are valid
 *   out   [rows][heads * head]
 *
 * Query head h reads key/value head h / (heads / kv_heads), as GroupQueryAttention does.
 *
 * Both variants tile the causal triangle: a block of query rows meets the keys in blocks, only
 * up to the block's last position, and only the blocks on the diagonal are masked. Each block
 * of scores lives in cache and is turned into weights with an online softmax (per query row, a
 * running maximum m and running sum l; when a later key block raises m, what was accumulated so
 * far is multiplied by 2^(m_old - m_new)). The scores are kept in base 2: Q is multiplied once by
 * log2(e) / sqrt(head), so the weights are exp2(score - m).
 *
 *   variant 0, fp32: blocks of query rows x 64 keys. Scores are computed with the queries in
 *     the vector lanes (S^T[key][query]), so the softmax's maxima and sums are plain vertical
 *     operations; P.V with the queries in rows, the output rows in registers. Two paths, chosen
 *     at run time by cpuid, the same arithmetic in each:
 *       AVX-512 (F, DQ, BW and bf16, as has_avx512 checks): blocks of 32 rows, two vectors of 16;
 *       AVX2 and FMA, where AVX-512 is missing: blocks of 16 rows, two vectors of 8. With 16
 *       registers, the products keep 12 accumulators: scores of 6 keys x 16 queries, P.V of
 *       6 rows x 16 dims.
 *     attention_fp32_rows() says which block runs (the caller's count of the work done).
 *   variant 1, AMX bf16: blocks of 16 query rows x 64 keys. S^T = K . Q^T and O^T = V^T . P^T on
 *     the tiles (_tile_dpbf16ps, fp32 accumulation); the softmax in fp32 AVX-512 between them.
 *     It needs AVX-512 and AMX; it has no AVX2 path.
 *   variant 2, bf16 on AVX-512: variant 1's arithmetic, layouts and blocks, each tile product
 *     done in registers by vdpbf16ps (AVX-512 BF16), for CPUs with it and without AMX.
 *
 * Each function carries its instruction set (VEC, TILES, YMM: gcc's target attribute), so the
 * library loads on any x86-64 and the checks below decide what runs.
 *
 * Threads: the heads are shared among `threads` OpenMP threads.
 * Returns 0, or a negative code (see enum status) without touching `out`.
 */
#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

enum status { OK = 0, BAD_SHAPE = -1, NO_AMX = -2, NO_AVX512 = -3, NO_MEMORY = -4, NO_AVX2 = -5 };
enum variant { FP32 = 0, AMX_BF16 = 1, BF16 = 2 };

#define LOG2E 1.4426950408889634
#define LN2 0.6931471805599453
#define FP32_ROWS 32 /* query rows per block (AVX-512): two vectors of 16 queries */
#define AVX2_ROWS 16 /* query rows per block (AVX2): two vectors of 8 queries */
#define AMX_ROWS 16  /* query rows per block: one tile's 16 columns of fp32 */
#define KEYS 64      /* keys per block, both variants */

/* Linux hands out the AMX tile state only on request (see bench/noamx.c). */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

#define VEC __attribute__((target("avx512f,avx512bw,avx512dq,avx512bf16")))
#define TILES __attribute__((target("avx512f,avx512bw,avx512dq,avx512bf16,amx-tile,amx-bf16")))
#define YMM __attribute__((target("avx2,fma")))
#define INLINE static inline __attribute__((always_inline))

/* --- what the CPU and the kernel allow ------------------------------------------------------ */

/* Whether the OS saves (and so allows) the register state in `mask` of XCR0: bits 1-2 are the
 * XMM and YMM registers, 5-7 AVX-512's masks and ZMM registers. */
static int os_saves(unsigned mask) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return 0; /* osxsave: xgetbv works */
    unsigned low, high;
    __asm__("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
    return (low & mask) == mask;
}

static int has_avx512(void) {
    unsigned a, b, c, d;
    if (!os_saves(0xE6) || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return 0;
    int bf16 = (a >> 5) & 1; /* avx512_bf16: the conversions to bf16 */
    return f && dq && bw && bf16;
}

/* AVX2 and FMA (cpuid leaves 7 and 1), and the OS saving the YMM registers. */
static int has_avx2(void) {
    unsigned a, b, c, d;
    if (!os_saves(0x6) || !__get_cpuid(1, &a, &b, &c, &d) || !((c >> 12) & 1)) return 0; /* fma */
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b >> 5) & 1; /* avx2 */
}

/* The fp32 variant's query rows per block on this CPU: FP32_ROWS with AVX-512, AVX2_ROWS with
 * AVX2 and FMA only, 0 when it cannot run. */
int attention_fp32_rows(void) {
    if (has_avx512()) return FP32_ROWS;
    return has_avx2() ? AVX2_ROWS : 0;
}

/* 1 when the bf16 variant on AVX-512 can run (AVX-512 with its bf16 dot products), else 0. */
int attention_bf16_ready(void) { return has_avx512(); }

/* 1 when the CPU has AMX bf16 tiles and Linux granted this process their state, else 0. */
int attention_amx_ready(void) {
    unsigned a, b, c, d;
    if (!has_avx512() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!((d >> 22) & 1) || !((d >> 24) & 1)) return 0; /* amx_bf16, amx_tile */
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

/* --- shared pieces ---------------------------------------------------------------------------- */

/* 2^x for x <= 0: 2^round(x) * e^(f ln 2), the Taylor series of e^y (|y| <= 0.35) to y^7 (error
 * below 1e-8 relative) or, when the weights are rounded to bf16 anyway (2^-9), to y^4 (4e-5).
 * Lanes below -126 (masked scores are -inf) give exactly 0. */
VEC INLINE __m512 exp2_neg(__m512 x, const int bf16) {
    const __m512 lowest = _mm512_set1_ps(-126.0f);
    __mmask16 live = _mm512_cmp_ps_mask(x, lowest, _CMP_GE_OQ);
    x = _mm512_max_ps(x, lowest);
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 y = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps((float)LN2));
    __m512 p = _mm512_set1_ps(1.0f / 24);
    if (!bf16) {
        p = _mm512_set1_ps(1.0f / 5040);
        p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 720));
        p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 120));
        p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 24));
    }
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(live, p, n);
}

/* Asks for the next block's query rows (`rows` of them, if positive) while this block works:
 * rows heads * head floats apart are too far apart for the hardware prefetchers. */
static inline void prefetch_rows(const float *q, int stride, int rows, int head) {
    for (int i = 0; i < rows && i < 32; i++)
        for (int d = 0; d < head; d += 16) __builtin_prefetch(q + (size_t)i * stride + d);
}

VEC INLINE __m512i lanes(void) { /* 0, 1, ..., 15 */
    return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

/* The lanes (queries base + 0..15) that may see `key`: position >= key. */
INLINE __mmask16 visible(int key, int base) {
    int hidden = key - base; /* lanes below this are earlier positions than the key */
    if (hidden <= 0) return 0xFFFF;
    if (hidden >= 16) return 0;
    return (__mmask16)(0xFFFF << hidden);
}

/* Where a block of n query rows (rows r0.. of the call's `rows`, the first at position
 * start + r0) stands: `base`, the position of its first row (the lanes count up from it), and
 * `last`, the last key any of its rows sees. Causal, each row sees the keys up to its own
 * position. Not causal (full_attention), every row sees every key: each block stands as if at
 * the last position, so no key is masked and the loops over keys run to the end. */
INLINE void block_bounds(int causal, int start, int rows, int r0, int n, int *base, int *last) {
    *base = causal ? start + r0 : start + rows - 1;
    *last = causal ? start + r0 + n - 1 : start + rows - 1;
}

/* The first half of a step of the online softmax over a block of scores st[key][16 queries]
 * (nk keys, one vector each): masks keys after each query's position (-inf), raises the running
 * maximum m and returns the factor 2^(m_old - m_new) by which what was accumulated before (the
 * output and the running sum of weights) must be scaled. The weights are 2^(score - m). */
VEC INLINE __m512 block_maximum(float *st, int stride, int nk, int key0, int base, __m512 *m) {
    const __m512 hidden = _mm512_set1_ps(-INFINITY);
    __m512 top = hidden;
    if (key0 + nk - 1 <= base) { /* below the diagonal: every query sees every key */
        for (int j = 0; j < nk; j++) top = _mm512_max_ps(top, _mm512_load_ps(st + j * stride));
    } else {
        for (int j = 0; j < nk; j++) {
            __m512 s = _mm512_load_ps(st + j * stride);
            s = _mm512_mask_blend_ps(visible(key0 + j, base), hidden, s);
            top = _mm512_max_ps(top, s);
            _mm512_store_ps(st + j * stride, s);
        }
    }
    __m512 m_new = _mm512_max_ps(*m, top);
    __m512 scale = exp2_neg(_mm512_sub_ps(*m, m_new), 0); /* 0 on the first block (m = -inf) */
    *m = m_new;
    return scale;
}

/* The weights 2^(score - m) in place of the scores, and their sum (fp32 path). */
VEC INLINE __m512 weights_fp32(float *st, int stride, int nk, __m512 m) {
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < nk; j++) {
        __m512 p = exp2_neg(_mm512_sub_ps(_mm512_load_ps(st + j * stride), m), 0);
        _mm512_store_ps(st + j * stride, p);
        sum = _mm512_add_ps(sum, p);
    }
    return sum;
}

/* --- fp32 AVX-512 --------------------------------------------------------------------------- */

/* st[j][0..32) = sum_d qt[d][0..32) * k[j][d] for nk (<= 8) keys: queries in the lanes, each
 * key's element broadcast. qt is the block's queries transposed, [head][32]. */
VEC INLINE void scores_fp32(const float *qt, const float *k, int head, float *st, const int nk) {
    __m512 acc[8][2];
    for (int j = 0; j < nk; j++) acc[j][0] = acc[j][1] = _mm512_setzero_ps();
    for (int d = 0; d < head; d++) {
        __m512 q0 = _mm512_load_ps(qt + d * FP32_ROWS), q1 = _mm512_load_ps(qt + d * FP32_ROWS + 16);
        for (int j = 0; j < nk; j++) {
            __m512 kj = _mm512_set1_ps(k[j * head + d]);
            acc[j][0] = _mm512_fmadd_ps(kj, q0, acc[j][0]);
            acc[j][1] = _mm512_fmadd_ps(kj, q1, acc[j][1]);
        }
    }
    for (int j = 0; j < nk; j++) {
        _mm512_store_ps(st + j * FP32_ROWS, acc[j][0]);
        _mm512_store_ps(st + j * FP32_ROWS + 16, acc[j][1]);
    }
}

/* o[i][..] = o[i][..] * scale[i] + sum_j p[j][i] * v[j][..] for 4 query rows, head = 16 * nv:
 * the rows' outputs stay in registers over the block's nk keys. p is st's weights [key][32]. */
VEC INLINE void values_fp32(float *o, const float *p, const float *v, const float *scale, int nk,
                            const int nv) {
    const int head = 16 * nv;
    __m512 acc[4][6];
    for (int i = 0; i < 4; i++) {
        __m512 s = _mm512_set1_ps(scale[i]);
        for (int c = 0; c < nv; c++) acc[i][c] = _mm512_mul_ps(_mm512_load_ps(o + i * head + 16 * c), s);
    }
    for (int j = 0; j < nk; j++) {
        __m512 vj[6];
        for (int c = 0; c < nv; c++) vj[c] = _mm512_loadu_ps(v + j * head + 16 * c);
        for (int i = 0; i < 4; i++) {
            __m512 pij = _mm512_set1_ps(p[j * FP32_ROWS + i]);
            for (int c = 0; c < nv; c++) acc[i][c] = _mm512_fmadd_ps(pij, vj[c], acc[i][c]);
        }
    }
    for (int i = 0; i < 4; i++)
        for (int c = 0; c < nv; c++) _mm512_store_ps(o + i * head + 16 * c, acc[i][c]);
}

VEC static void values_rows(float *o, const float *p, const float *v, const float *scale, int nk,
                            int head) {
    if (head == 16) values_fp32(o, p, v, scale, nk, 1);
    else if (head == 32) values_fp32(o, p, v, scale, nk, 2);
    else if (head == 64) values_fp32(o, p, v, scale, nk, 4);
    else values_fp32(o, p, v, scale, nk, 6);
}

typedef struct { /* rows: FP32_ROWS (AVX-512) or AVX2_ROWS */
    float *qt;    /* [head][rows] the block's queries, transposed and scaled */
    float *st;    /* [KEYS][rows] scores, then weights */
    float *o;     /* [rows][head] output accumulators */
    float *scale; /* [rows] this key block's rescaling factors */
} fp32_scratch;

/* One head: q and out point at the head's first column, rows `stride` floats apart; k and v
 * at its key/value head's [capacity][head]. */
VEC static void head_fp32(const float *q, const float *k, const float *v, float *out, int stride,
                          int rows, int start, int head, int causal, fp32_scratch *w) {
    const float factor = (float)(LOG2E / sqrt((double)head));
    for (int r0 = 0; r0 < rows; r0 += FP32_ROWS) {
        int n = rows - r0 < FP32_ROWS ? rows - r0 : FP32_ROWS;
        int base, last;
        block_bounds(causal, start, rows, r0, n, &base, &last);
        /* qt[d][i] = q[row i][d] * factor: each row's 16 dims scattered down a column */
        const __m512i down = _mm512_mullo_epi32(lanes(), _mm512_set1_epi32(FP32_ROWS));
        if (n < FP32_ROWS) memset(w->qt, 0, sizeof(float) * head * FP32_ROWS);
        for (int i = 0; i < n; i++)
            for (int d = 0; d < head; d += 16) {
                __m512 x = _mm512_loadu_ps(q + (size_t)(r0 + i) * stride + d);
                _mm512_i32scatter_ps(w->qt + d * FP32_ROWS + i, down, _mm512_mul_ps(x, _mm512_set1_ps(factor)), 4);
            }
        prefetch_rows(q + (size_t)(r0 + FP32_ROWS) * stride, stride, rows - r0 - FP32_ROWS, head);
        memset(w->o, 0, sizeof(float) * FP32_ROWS * head);
        __m512 m[2] = {_mm512_set1_ps(-INFINITY), _mm512_set1_ps(-INFINITY)};
        __m512 l[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int key0 = 0; key0 <= last; key0 += KEYS) {
            int nk = last + 1 - key0 < KEYS ? last + 1 - key0 : KEYS; /* no key after `last` */
            const float *kb = k + (size_t)key0 * head;
            int j = 0;
            for (; j + 8 <= nk; j += 8) scores_fp32(w->qt, kb + j * head, head, w->st + j * FP32_ROWS, 8);
            for (; j < nk; j++) scores_fp32(w->qt, kb + j * head, head, w->st + j * FP32_ROWS, 1);
            for (int half = 0; half < 2; half++) {
                float *st = w->st + 16 * half;
                __m512 s = block_maximum(st, FP32_ROWS, nk, key0, base + 16 * half, &m[half]);
                l[half] = _mm512_fmadd_ps(l[half], s, weights_fp32(st, FP32_ROWS, nk, m[half]));
                _mm512_store_ps(w->scale + 16 * half, s);
            }
            for (int i = 0; i < n; i += 4)
                values_rows(w->o + i * head, w->st + i, v + (size_t)key0 * head, w->scale + i, nk,
                            head);
        }
        float inverse[FP32_ROWS] __attribute__((aligned(64)));
        _mm512_store_ps(inverse, _mm512_div_ps(_mm512_set1_ps(1.0f), l[0]));
        _mm512_store_ps(inverse + 16, _mm512_div_ps(_mm512_set1_ps(1.0f), l[1]));
        for (int i = 0; i < n; i++)
            for (int d = 0; d < head; d += 16)
                _mm512_storeu_ps(out + (size_t)(r0 + i) * stride + d,
                                 _mm512_mul_ps(_mm512_load_ps(w->o + i * head + d),
                                               _mm512_set1_ps(inverse[i])));
    }
}

/* --- fp32 AVX2 + FMA ------------------------------------------------------------------------ */
/*
 * The AVX-512 path's arithmetic on 8-lane vectors, for CPUs without AVX-512: blocks of 16 query
 * rows (two vectors), st[key][16]. There are 16 registers, not 32: the products keep 12
 * accumulators (enough to cover the FMA's latency on two pipes) and the operands they share.
 */

/* exp2_neg's fp32 series on 8 lanes. AVX2 has no scalef: 2^n is built in a float's exponent
 * field (n + 127, a normal number for n >= -126). Lanes below -126 give exactly 0. */
YMM INLINE __m256 exp2_neg_avx2(__m256 x) {
    const __m256 lowest = _mm256_set1_ps(-126.0f);
    __m256 live = _mm256_cmp_ps(x, lowest, _CMP_GE_OQ);
    x = _mm256_max_ps(x, lowest);
    __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 y = _mm256_mul_ps(_mm256_sub_ps(x, n), _mm256_set1_ps((float)LN2));
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    __m256 power = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 23));
    return _mm256_and_ps(live, _mm256_mul_ps(p, power));
}

/* block_maximum for 8 queries (positions base + 0..7) of st[key][AVX2_ROWS]: masks the keys
 * after each query's position on the diagonal, raises m, returns 2^(m_old - m_new). */
YMM INLINE __m256 block_maximum_avx2(float *st, int nk, int key0, int base, __m256 *m) {
    const __m256 hidden = _mm256_set1_ps(-INFINITY);
    __m256 top = hidden;
    if (key0 + nk - 1 <= base) { /* below the diagonal: every query sees every key */
        for (int j = 0; j < nk; j++) top = _mm256_max_ps(top, _mm256_load_ps(st + j * AVX2_ROWS));
    } else {
        const __m256i position = _mm256_add_epi32(_mm256_set1_epi32(base),
                                                  _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        for (int j = 0; j < nk; j++) {
            __m256 s = _mm256_load_ps(st + j * AVX2_ROWS);
            __m256i seen = _mm256_cmpgt_epi32(position, _mm256_set1_epi32(key0 + j - 1));
            s = _mm256_blendv_ps(hidden, s, _mm256_castsi256_ps(seen));
            top = _mm256_max_ps(top, s);
            _mm256_store_ps(st + j * AVX2_ROWS, s);
        }
    }
    __m256 m_new = _mm256_max_ps(*m, top);
    __m256 scale = exp2_neg_avx2(_mm256_sub_ps(*m, m_new)); /* 0 on the first block (m = -inf) */
    *m = m_new;
    return scale;
}

/* The weights 2^(score - m) of 8 queries in place of their scores, and their sum. */
YMM INLINE __m256 weights_avx2(float *st, int nk, __m256 m) {
    __m256 sum = _mm256_setzero_ps();
    for (int j = 0; j < nk; j++) {
        __m256 p = exp2_neg_avx2(_mm256_sub_ps(_mm256_load_ps(st + j * AVX2_ROWS), m));
        _mm256_store_ps(st + j * AVX2_ROWS, p);
        sum = _mm256_add_ps(sum, p);
    }
    return sum;
}

/* st[j][0..16) = sum_d qt[d][0..16) * k[j][d] for nk (<= 6) keys: 12 accumulators, the two
 * vectors of queries and a key's broadcast element. qt is [head][16]. */
YMM INLINE void scores_avx2(const float *qt, const float *k, int head, float *st, const int nk) {
    __m256 acc[6][2];
    for (int j = 0; j < nk; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    for (int d = 0; d < head; d++) {
        __m256 q0 = _mm256_load_ps(qt + d * AVX2_ROWS), q1 = _mm256_load_ps(qt + d * AVX2_ROWS + 8);
        for (int j = 0; j < nk; j++) {
            __m256 kj = _mm256_broadcast_ss(k + j * head + d);
            acc[j][0] = _mm256_fmadd_ps(kj, q0, acc[j][0]);
            acc[j][1] = _mm256_fmadd_ps(kj, q1, acc[j][1]);
        }
    }
    for (int j = 0; j < nk; j++) {
        _mm256_store_ps(st + j * AVX2_ROWS, acc[j][0]);
        _mm256_store_ps(st + j * AVX2_ROWS + 8, acc[j][1]);
    }
}

/* o[i][0..16) = o[i][0..16) * scale[i] + sum_j p[j][i] * v[j][0..16) for `rows` (<= 6) query
 * rows and 16 of the head's dims (o and v point at the first): 2 * rows accumulators over the
 * block's nk keys. p is st's weights [key][16]; o's and v's rows are `head` floats apart. */
YMM INLINE void values_avx2(float *o, const float *p, const float *v, const float *scale, int nk,
                            int head, const int rows) {
    __m256 acc[6][2];
    for (int i = 0; i < rows; i++) {
        __m256 s = _mm256_broadcast_ss(scale + i);
        acc[i][0] = _mm256_mul_ps(_mm256_load_ps(o + i * head), s);
        acc[i][1] = _mm256_mul_ps(_mm256_load_ps(o + i * head + 8), s);
    }
    for (int j = 0; j < nk; j++) {
        __m256 v0 = _mm256_loadu_ps(v + j * head), v1 = _mm256_loadu_ps(v + j * head + 8);
        for (int i = 0; i < rows; i++) {
            __m256 pij = _mm256_broadcast_ss(p + j * AVX2_ROWS + i);
            acc[i][0] = _mm256_fmadd_ps(pij, v0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(pij, v1, acc[i][1]);
        }
    }
    for (int i = 0; i < rows; i++) {
        _mm256_store_ps(o + i * head, acc[i][0]);
        _mm256_store_ps(o + i * head + 8, acc[i][1]);
    }
}

/* head_fp32 on 8-lane vectors, blocks of AVX2_ROWS query rows; w's buffers sized for them. */
YMM static void head_avx2(const float *q, const float *k, const float *v, float *out, int stride,
                          int rows, int start, int head, int causal, fp32_scratch *w) {
    const float factor = (float)(LOG2E / sqrt((double)head));
    for (int r0 = 0; r0 < rows; r0 += AVX2_ROWS) {
        int n = rows - r0 < AVX2_ROWS ? rows - r0 : AVX2_ROWS;
        int base, last;
        block_bounds(causal, start, rows, r0, n, &base, &last);
        /* qt[d][i] = q[row i][d] * factor, one element at a time: AVX2 has no scatter, and this
         * is a small part of a block's work (each element then meets up to a chunk of keys) */
        if (n < AVX2_ROWS) memset(w->qt, 0, sizeof(float) * head * AVX2_ROWS);
        for (int i = 0; i < n; i++)
            for (int d = 0; d < head; d++)
                w->qt[d * AVX2_ROWS + i] = q[(size_t)(r0 + i) * stride + d] * factor;
        prefetch_rows(q + (size_t)(r0 + AVX2_ROWS) * stride, stride, rows - r0 - AVX2_ROWS, head);
        memset(w->o, 0, sizeof(float) * AVX2_ROWS * head);
        __m256 m[2] = {_mm256_set1_ps(-INFINITY), _mm256_set1_ps(-INFINITY)};
        __m256 l[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int key0 = 0; key0 <= last; key0 += KEYS) {
            int nk = last + 1 - key0 < KEYS ? last + 1 - key0 : KEYS; /* no key after `last` */
            const float *kb = k + (size_t)key0 * head, *vb = v + (size_t)key0 * head;
            int j = 0;
            for (; j + 6 <= nk; j += 6) scores_avx2(w->qt, kb + j * head, head, w->st + j * AVX2_ROWS, 6);
            for (; j + 2 <= nk; j += 2) scores_avx2(w->qt, kb + j * head, head, w->st + j * AVX2_ROWS, 2);
            for (; j < nk; j++) scores_avx2(w->qt, kb + j * head, head, w->st + j * AVX2_ROWS, 1);
            for (int half = 0; half < 2; half++) {
                float *st = w->st + 8 * half;
                __m256 s = block_maximum_avx2(st, nk, key0, base + 8 * half, &m[half]);
                l[half] = _mm256_fmadd_ps(l[half], s, weights_avx2(st, nk, m[half]));
                _mm256_store_ps(w->scale + 8 * half, s);
            }
            /* 16 dims at a time (their 64 keys' values stay in L1 for every row), rows by 6 and
             * then by 4: never past row 15, inside the block's buffers */
            for (int d0 = 0; d0 < head; d0 += 16) {
                float *o = w->o + d0;
                int i = 0;
                for (; i + 6 <= n; i += 6)
                    values_avx2(o + i * head, w->st + i, vb + d0, w->scale + i, nk, head, 6);
                for (; i < n; i += 4)
                    values_avx2(o + i * head, w->st + i, vb + d0, w->scale + i, nk, head, 4);
            }
        }
        float inverse[AVX2_ROWS] __attribute__((aligned(32)));
        _mm256_store_ps(inverse, _mm256_div_ps(_mm256_set1_ps(1.0f), l[0]));
        _mm256_store_ps(inverse + 8, _mm256_div_ps(_mm256_set1_ps(1.0f), l[1]));
        for (int i = 0; i < n; i++)
            for (int d = 0; d < head; d += 8)
                _mm256_storeu_ps(out + (size_t)(r0 + i) * stride + d,
                                 _mm256_mul_ps(_mm256_load_ps(w->o + i * head + d),
                                               _mm256_broadcast_ss(inverse + i)));
    }
}

/* --- AMX bf16 ------------------------------------------------------------------------------- */
/*
 * A tile product C[16][16 fp32] += A[16][32 bf16] . B[32][16], with B stored in pairs ("VNNI"):
 * B's row r holds (B[2r][n], B[2r+1][n]) for n = 0..15. Every tile here is 16 rows of 64 bytes.
 *
 *   scores   S^T[16 keys][16 queries] = K[16 keys][32 dims] . Q^T[32 dims][16 queries]
 *            A: K in bf16, row-major as the cache holds it; B: the queries' pairs of dims.
 *            head = 32 * (1, 2 or 3): one product per 32 dims, tiles 0-2 keep the queries.
 *   values   O^T[16 dims][16 queries] += V^T[16 dims][32 keys] . P^T[32 keys][16 queries]
 *            A: V transposed in bf16; B: the weights' pairs of keys, which the softmax writes
 *            directly (it has one vector of 16 queries per key).
 *
 * Tiles: 0-1 keys, 2-3 queries (each in turn), 4-7 the scores of a block of 64 keys; then
 * 4-5 the weights, 0-2 the output (48 dims at a time), 3, 6 and 7 V^T.
 */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

typedef struct {
    const uint16_t *k;  /* [keys][head] bf16, the key/value head's keys, zero after the last */
    const uint16_t *vt; /* [keys / 32][head][32] bf16, its values transposed by 32 keys */
    uint16_t *qp; /* [3][16][32] bf16: the block's queries in pairs of dims, one tile per 32 */
    float *st;    /* [KEYS][16] scores, then weights */
    uint16_t *pp; /* [2][16][32] bf16: the weights in pairs of keys, one tile per 32 keys */
    float *ot;    /* [head][16] output accumulators, transposed */
    __m512i stage[4][2]; /* transpose16's indices */
} amx_scratch;

/* Indices that interleave the two 16-element halves of 32 16-bit elements: 0, 16, 1, 17, ...
 * (two vectors of 16 weights or values become 16 pairs, the B layout of a tile). */
VEC INLINE __m512i interleave(void) {
    return _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                            22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
}

/* A 16x16 transpose of 32-bit elements in four stages b = 8, 4, 2, 1: rows i and i + b (bit b
 * of i clear) swap the off-diagonal b-wide parts of each 2b-wide group of columns. */
VEC static void transpose_indices(__m512i stage[4][2]) {
    for (int s = 0, b = 8; b >= 1; s++, b /= 2) {
        int32_t low[16], high[16];
        for (int c = 0; c < 16; c++) {
            low[c] = (c & b) ? 16 + c - b : c; /* row i: its own left part, then row i + b's */
            high[c] = (c & b) ? 16 + c : c + b; /* row i + b: row i's right part, then its own */
        }
        stage[s][0] = _mm512_loadu_si512(low);
        stage[s][1] = _mm512_loadu_si512(high);
    }
}

VEC INLINE void transpose16(__m512i r[16], __m512i stage[4][2]) {
    for (int s = 0, b = 8; b >= 1; s++, b /= 2)
        for (int i = 0; i < 16; i++) {
            if (i & b) continue;
            __m512i top = r[i], bottom = r[i + b];
            r[i] = _mm512_permutex2var_epi32(top, stage[s][0], bottom);
            r[i + b] = _mm512_permutex2var_epi32(top, stage[s][1], bottom);
        }
}

/* The chunk's keys and values, positions [start, end), into the bf16 copies of one key/value
 * head: kb[key][head] (row-major, as the cache) and vt[key / 32][head][32] (transposed within
 * each group of 32 keys, so that the 16 dims x 32 keys of a tile are 1 KB in one piece);
 * positions after `end` up to the next block of KEYS are zeros (a later chunk fills them).
 * Each key is converted once, by the chunk that brings it. */
VEC static void pack_chunk(const float *k, const float *v, int start, int end, int head,
                             uint16_t *kb, uint16_t *vt, __m512i stage[4][2]) {
    const int stop = (end + KEYS - 1) / KEYS * KEYS;
    for (int j = start; j < stop; j++) {
        uint16_t *row = kb + (size_t)j * head;
        for (int d = 0; d < head; d += 16) {
            __m512 x = j < end ? _mm512_loadu_ps(k + (size_t)j * head + d) : _mm512_setzero_ps();
            _mm256_storeu_si256((__m256i *)(row + d), (__m256i)_mm512_cvtneps_pbh(x));
        }
    }
    /* V^T: per 32 keys and 16 dims, the 16 pairs of keys' values (one vector of 16 dims each)
     * are transposed into 16 rows of one dim's 32 keys */
    const __m512i order = interleave();
    for (int j0 = start / 32 * 32; j0 < stop; j0 += 32)
        for (int d0 = 0; d0 < head; d0 += 16) {
            __m512i r[16];
            for (int p = 0; p < 16; p++) {
                int j = j0 + 2 * p;
                __m512 x = j < end ? _mm512_loadu_ps(v + (size_t)j * head + d0) : _mm512_setzero_ps();
                __m512 y = j + 1 < end ? _mm512_loadu_ps(v + (size_t)(j + 1) * head + d0)
                                       : _mm512_setzero_ps();
                r[p] = _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(y, x));
            }
            transpose16(r, stage);
            for (int d = 0; d < 16; d++)
                _mm512_storeu_si512(vt + (size_t)j0 * head + (d0 + d) * 32, r[d]);
        }
}

/* The block's n (<= 16) query rows q[i][..] (rows `stride` floats apart), times `factor`, in
 * bf16 pairs of dims: qp[s][r][2i + e] = q[i][32 s + 2 r + e] * factor, the B layout of one tile
 * per 32 dims. As 32-bit pairs, each row's 16 pairs of a slice are scattered down a column; the
 * rows after n are zeros. */
VEC INLINE void pack_queries(const float *q, int stride, int n, int head, float factor,
                             uint16_t *qp) {
    const __m512i down = _mm512_mullo_epi32(lanes(), _mm512_set1_epi32(16));
    const __m512 f = _mm512_set1_ps(factor);
    if (n < 16) memset(qp, 0, 2 * 16 * head);
    for (int i = 0; i < n; i++)
        for (int s = 0; s < head / 32; s++) {
            const float *row = q + (size_t)i * stride + 32 * s;
            __m512bh pairs = _mm512_cvtne2ps_pbh(_mm512_mul_ps(_mm512_loadu_ps(row + 16), f),
                                                 _mm512_mul_ps(_mm512_loadu_ps(row), f));
            _mm512_i32scatter_epi32((uint32_t *)qp + 256 * s + i, down, (__m512i)pairs, 4);
        }
}

/* out[row i][d] = ot[d][i] / l[i] for the block's n rows: 16 dims at a time, transposed back. */
VEC INLINE void write_rows(const float *ot, __m512 l, float *out, int stride, int n, int head,
                           __m512i stage[4][2]) {
    const __m512 inverse = _mm512_div_ps(_mm512_set1_ps(1.0f), l);
    for (int d0 = 0; d0 < head; d0 += 16) {
        __m512i r[16];
        for (int d = 0; d < 16; d++)
            r[d] = _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(ot + 16 * (d0 + d)), inverse));
        transpose16(r, stage);
        for (int i = 0; i < n; i++) _mm512_storeu_si512(out + (size_t)i * stride + d0, r[i]);
    }
}

/* The start of a block of query rows in either bf16 variant: the block's queries packed (its
 * scratch's qp), the next block's asked for, its output accumulators cleared; returns how many
 * rows it has (AMX_ROWS, or fewer at the end). */
VEC INLINE int begin_rows(const float *q, int stride, int rows, int r0, int head, float factor,
                          amx_scratch *w) {
    const int n = rows - r0 < AMX_ROWS ? rows - r0 : AMX_ROWS;
    pack_queries(q + (size_t)r0 * stride, stride, n, head, factor, w->qp);
    prefetch_rows(q + (size_t)(r0 + AMX_ROWS) * stride, stride, rows - r0 - AMX_ROWS, head);
    memset(w->ot, 0, sizeof(float) * 16 * head);
    return n;
}

/* The weights 2^(score - m) of the 64 keys of st[key][16 queries] in bf16, in pairs of keys:
 * pp[c][r] = (p[32c + 2r][n], p[32c + 2r + 1][n]), n = 0..15, the B layout of two tiles; returns
 * the sum of the rounded weights (what the tiles multiply). */
VEC INLINE __m512 weights_bf16(const float *st, __m512 m, uint16_t *pp) {
    const __m512i order = interleave();
    __m512 sum = _mm512_setzero_ps();
    for (int r = 0; r < KEYS / 2; r++) {
        __m512 p0 = exp2_neg(_mm512_sub_ps(_mm512_load_ps(st + (2 * r) * 16), m), 1);
        __m512 p1 = exp2_neg(_mm512_sub_ps(_mm512_load_ps(st + (2 * r + 1) * 16), m), 1);
        __m256i a = (__m256i)_mm512_cvtneps_pbh(p0);
        __m256i b = (__m256i)_mm512_cvtneps_pbh(p1);
        __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
        _mm512_store_si512((__m512i *)(pp + r * 32), _mm512_permutexvar_epi16(order, both));
        /* back to fp32: a bf16 is the top half of a float */
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(a), 16)));
        sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
    }
    return sum;
}

/* Scores of 16 keys (sub-block `sub` of the 64) for the 32 dims of slice `dims` into tile
 * `acc`; the keys go to tile 0 or 1 in turn, so a load need not wait for the last product. */
/* Asks for the earlier chunks' bf16 keys and values (positions [0, start)) in the L2 cache:
 * the tile loads that read them next go down the rows too far apart to be prefetched. */
static void prefetch_packed(const amx_scratch *w, int start, int head) {
    const char *keys = (const char *)w->k, *values = (const char *)w->vt;
    for (size_t at = 0; at < (size_t)start * head * 2; at += 64) {
        __builtin_prefetch(keys + at, 0, 2);
        __builtin_prefetch(values + at, 0, 2);
    }
}

#define SCORES(acc, ktile, qtile, sub, dims)                                                   \
    do {                                                                                        \
        _tile_loadd(ktile, kb + (size_t)(16 * (sub)) * head + 32 * (dims), 2 * head);           \
        _tile_dpbf16ps(acc, ktile, qtile);                                                      \
    } while (0)

TILES static void head_amx(const float *q, float *out, int stride, int rows, int start, int head,
                           int causal, amx_scratch *w) {
    const float factor = (float)(LOG2E / sqrt((double)head));
    const int slices = head / 32;
    for (int r0 = 0; r0 < rows; r0 += AMX_ROWS) {
        const int n = begin_rows(q, stride, rows, r0, head, factor, w);
        int base, last;
        block_bounds(causal, start, rows, r0, n, &base, &last);
        __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
        for (int key0 = 0; key0 <= last; key0 += KEYS) {
            const uint16_t *kb = w->k + (size_t)key0 * head;
            _tile_zero(4);
            _tile_zero(5);
            _tile_zero(6);
            _tile_zero(7);
            /* the queries' slices in tiles 2 and 3 in turn (tile numbers must be constants) */
            _tile_loadd(2, w->qp, 64);
            SCORES(4, 0, 2, 0, 0); SCORES(5, 1, 2, 1, 0); SCORES(6, 0, 2, 2, 0); SCORES(7, 1, 2, 3, 0);
            if (slices > 1) {
                _tile_loadd(3, w->qp + 512, 64);
                SCORES(4, 0, 3, 0, 1); SCORES(5, 1, 3, 1, 1); SCORES(6, 0, 3, 2, 1); SCORES(7, 1, 3, 3, 1);
            }
            if (slices > 2) {
                _tile_loadd(2, w->qp + 1024, 64);
                SCORES(4, 0, 2, 0, 2); SCORES(5, 1, 2, 1, 2); SCORES(6, 0, 2, 2, 2); SCORES(7, 1, 2, 3, 2);
            }
            _tile_stored(4, w->st, 64);
            _tile_stored(5, w->st + 256, 64);
            _tile_stored(6, w->st + 512, 64);
            _tile_stored(7, w->st + 768, 64);
            int nk = last + 1 - key0 < KEYS ? last + 1 - key0 : KEYS;
            /* keys after `last` are masked for every row; the tiles still multiply them */
            for (int j = nk; j < KEYS; j++) _mm512_store_ps(w->st + 16 * j, _mm512_set1_ps(-INFINITY));
            __m512 scale = block_maximum(w->st, 16, KEYS, key0, base, &m);
            l = _mm512_fmadd_ps(l, scale, weights_bf16(w->st, m, w->pp));
            if (_mm512_cmp_ps_mask(scale, _mm512_set1_ps(1.0f), _CMP_NEQ_UQ))
                for (int d = 0; d < head; d++)
                    _mm512_store_ps(w->ot + 16 * d, _mm512_mul_ps(_mm512_load_ps(w->ot + 16 * d), scale));
            _tile_loadd(4, w->pp, 64);
            _tile_loadd(5, w->pp + 512, 64);
            /* 48 dims at a time: three independent chains of products (tiles 0-2) */
            for (int d0 = 0; d0 < head; d0 += 48) {
                const int g = head - d0 >= 48 ? 3 : (head - d0) / 16; /* tiles in this group */
                const uint16_t *vt = w->vt + (size_t)key0 * head + d0 * 32;
                const size_t next = 16 * 32, later = 32 * head; /* next 16 dims, 32 keys */
                const int pitch = 64;
                float *o = w->ot + 16 * d0;
                _tile_loadd(0, o, 64);
                if (g > 1) _tile_loadd(1, o + 256, 64);
                if (g > 2) _tile_loadd(2, o + 512, 64);
                _tile_loadd(3, vt, pitch);
                _tile_dpbf16ps(0, 3, 4);
                if (g > 1) { _tile_loadd(6, vt + next, pitch); _tile_dpbf16ps(1, 6, 4); }
                if (g > 2) { _tile_loadd(7, vt + 2 * next, pitch); _tile_dpbf16ps(2, 7, 4); }
                _tile_loadd(3, vt + later, pitch);
                _tile_dpbf16ps(0, 3, 5);
                if (g > 1) { _tile_loadd(6, vt + next + later, pitch); _tile_dpbf16ps(1, 6, 5); }
                if (g > 2) { _tile_loadd(7, vt + 2 * next + later, pitch); _tile_dpbf16ps(2, 7, 5); }
                _tile_stored(0, o, 64);
                if (g > 1) _tile_stored(1, o + 256, 64);
                if (g > 2) _tile_stored(2, o + 512, 64);
            }
        }
        write_rows(w->ot, l, out + (size_t)r0 * stride, stride, n, head, w->stage);
    }
}

/* --- bf16 on AVX-512 ------------------------------------------------------------------------ */
/*
 * The AMX variant's arithmetic, layouts and blocks (16 query rows x 64 keys), with each tile
 * product done in vector registers by vdpbf16ps (AVX-512 BF16: 16 fp32 lanes, each += the dot
 * product of a pair of bf16), for CPUs that have it without AMX (AMD Zen 4 and later, Intel Cooper
 * Lake). A tile product C[16][16] += A[16][32] . B[32][16] in pairs is, for each row m of C, 16
 * dot products of B's rows (a vector of 16 pairs each) with A's pair (m, 2r..2r+1) broadcast:
 * 16 independent accumulators, B's row loaded once for all 16 of them, A's pairs straight from
 * memory (an embedded broadcast). Twice the multiply-adds per instruction of the fp32 FMA.
 */

/* A's pair of bf16 at p, as a 32-bit element in every lane. */
VEC INLINE __m512bh pair_everywhere(const uint16_t *p) {
    uint32_t both;
    memcpy(&both, p, sizeof both);
    return (__m512bh)_mm512_set1_epi32((int)both);
}

/* S^T[16 keys][16 queries] = K[16 keys][head] . Q^T: kb the keys' bf16 rows, qp the block's
 * queries in pairs of dims (pack_queries); into st[key][16]. */
VEC INLINE void scores_bf16(const uint16_t *qp, const uint16_t *kb, const int head, float *st) {
    __m512 acc[16];
    for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
    for (int r = 0; r < head / 2; r++) { /* dims 2r, 2r + 1: qp's slices are consecutive */
        __m512bh qr = (__m512bh)_mm512_load_si512(qp + 32 * r);
        for (int j = 0; j < 16; j++)
            acc[j] = _mm512_dpbf16_ps(acc[j], qr, pair_everywhere(kb + (size_t)j * head + 2 * r));
    }
    for (int j = 0; j < 16; j++) _mm512_store_ps(st + 16 * j, acc[j]);
}

/* O^T[16 dims][16 queries] = O^T * scale + V^T[16 dims][64 keys] . P[64 keys][16 queries]: ot
 * the 16 dims' accumulators, vt the block's values transposed by 32 keys from its first dim, pp
 * the weights in pairs of keys (weights_bf16). */
VEC INLINE void values_bf16(float *ot, const uint16_t *vt, const uint16_t *pp, const int head,
                            __m512 scale) {
    __m512 acc[16];
    for (int d = 0; d < 16; d++) acc[d] = _mm512_mul_ps(_mm512_load_ps(ot + 16 * d), scale);
    for (int r = 0; r < KEYS / 2; r++) { /* pair r of keys: group r / 16 of 32 keys, its pair r % 16 */
        const uint16_t *column = vt + (size_t)(r / 16) * 32 * head + 2 * (r % 16);
        __m512bh pr = (__m512bh)_mm512_load_si512(pp + 32 * r);
        for (int d = 0; d < 16; d++)
            acc[d] = _mm512_dpbf16_ps(acc[d], pr, pair_everywhere(column + 32 * d));
    }
    for (int d = 0; d < 16; d++) _mm512_store_ps(ot + 16 * d, acc[d]);
}

/* One head, as head_amx (the same arguments, scratch and numerics) on vdpbf16ps; `head` a
 * constant in each copy (head_bf16), so that the broadcasts' addresses are one base register
 * and constant offsets. */
VEC INLINE void head_bf16_of(const float *q, float *out, int stride, int rows, int start,
                             int causal, amx_scratch *w, const int head) {
    const float factor = (float)(LOG2E / sqrt((double)head));
    for (int r0 = 0; r0 < rows; r0 += AMX_ROWS) {
        const int n = begin_rows(q, stride, rows, r0, head, factor, w);
        int base, last;
        block_bounds(causal, start, rows, r0, n, &base, &last);
        __m512 m = _mm512_set1_ps(-INFINITY), l = _mm512_setzero_ps();
        for (int key0 = 0; key0 <= last; key0 += KEYS) {
            int nk = last + 1 - key0 < KEYS ? last + 1 - key0 : KEYS;
            /* only the groups of 16 keys that hold a visible key; the rest are masked below */
            for (int j = 0; j < nk; j += 16)
                scores_bf16(w->qp, w->k + (size_t)(key0 + j) * head, head, w->st + 16 * j);
            for (int j = nk; j < KEYS; j++) _mm512_store_ps(w->st + 16 * j, _mm512_set1_ps(-INFINITY));
            __m512 scale = block_maximum(w->st, 16, KEYS, key0, base, &m);
            l = _mm512_fmadd_ps(l, scale, weights_bf16(w->st, m, w->pp));
            for (int d0 = 0; d0 < head; d0 += 16)
                values_bf16(w->ot + 16 * d0, w->vt + (size_t)key0 * head + 32 * d0, w->pp, head,
                            scale);
        }
        write_rows(w->ot, l, out + (size_t)r0 * stride, stride, n, head, w->stage);
    }
}

VEC static void head_bf16(const float *q, float *out, int stride, int rows, int start, int head,
                          int causal, amx_scratch *w) {
    if (head == 32) head_bf16_of(q, out, stride, rows, start, causal, w, 32);
    else if (head == 64) head_bf16_of(q, out, stride, rows, start, causal, w, 64);
    else head_bf16_of(q, out, stride, rows, start, causal, w, 96);
}

/* --- the entry points ----------------------------------------------------------------------- */

/* Each thread's scratch memory, kept from call to call (OpenMP keeps its threads): fresh
 * allocations of this size would be new pages to fault in and zero on every call. */
static __thread char *arena;
static __thread size_t arena_size, arena_used;

static int arena_reserve(size_t bytes) {
    arena_used = 0;
    if (bytes <= arena_size) return 1;
    free(arena);
    arena = aligned_alloc(64, bytes);
    arena_size = arena ? bytes : 0;
    return arena != NULL;
}

static void *take(size_t bytes) { /* 64-byte aligned for the vector and tile loads */
    void *p = arena + arena_used;
    arena_used += (bytes + 63) / 64 * 64;
    return p;
}

TILES static void configure_tiles(void) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.colsb[t] = 64;
    }
    /* gcc 12 does not see that ldtilecfg reads all 64 bytes and drops part of the memset */
    __asm__ volatile("" : : "m"(config) : "memory");
    _tile_loadconfig(&config);
}

TILES static void release_tiles(void) { _tile_release(); }

/* The bf16 variants also take the caller's bf16 copies of the cache, kept from chunk to chunk
 * (each chunk adds its keys; pack_cache fills in earlier positions where the caller keeps none):
 * packed_k [kv_heads][pitch][head] and packed_vt [kv_heads][pitch / 32][head][32], pitch =
 * capacity rounded up to 64. The fp32 variant ignores them. */
static int attention(const float *q, const float *k, const float *v, float *out, int rows,
                     int start, int capacity, int heads, int kv_heads, int head, int variant,
                     int causal, int threads, uint16_t *packed_k, uint16_t *packed_vt) {
    /* head 16 (the tiny test models') only in fp32: the AMX variant works in slices of 32 dims */
    const int head_ok = head == 32 || head == 64 || head == 96 || (head == 16 && variant == FP32);
    if (!head_ok || rows <= 0 || start < 0 || kv_heads <= 0 || heads % kv_heads != 0 ||
        start + rows > capacity || (variant != FP32 && variant != AMX_BF16 && variant != BF16) ||
        (variant != FP32 && (!packed_k || !packed_vt)))
        return BAD_SHAPE;
    const int fp32_rows = attention_fp32_rows(); /* FP32_ROWS: the AVX-512 path */
    if (variant == FP32 && fp32_rows == 0) return NO_AVX2;
    if (variant != FP32 && !has_avx512()) return NO_AVX512;
    if (variant == AMX_BF16 && !attention_amx_ready()) return NO_AMX;
    const int end = start + rows, group = heads / kv_heads, stride = heads * head;
    const int pitch = (capacity + KEYS - 1) / KEYS * KEYS;
    int status = OK;
#pragma omp parallel num_threads(threads)
    {
        fp32_scratch f = {0};
        amx_scratch a = {0};
        /* every buffer below is written before it is read */
        const size_t fp32_bytes = sizeof(float) * (2 * head + KEYS) * fp32_rows + 1024;
        const size_t amx_bytes = 3 * 1024 + sizeof(float) * 16 * (KEYS + head) + 2048 + 1024;
        int ready = arena_reserve(variant == FP32 ? fp32_bytes : amx_bytes);
        if (ready && variant == FP32) {
            f.qt = take(sizeof(float) * head * fp32_rows);
            f.st = take(sizeof(float) * KEYS * fp32_rows);
            f.o = take(sizeof(float) * fp32_rows * head);
            f.scale = take(sizeof(float) * fp32_rows);
        } else if (ready) {
            a.qp = take(2 * 3 * 16 * 32);
            a.st = take(sizeof(float) * KEYS * 16);
            a.pp = take(2 * 2 * 16 * 32);
            a.ot = take(sizeof(float) * head * 16);
            transpose_indices(a.stage);
            if (variant == AMX_BF16) configure_tiles(); /* the tile configuration is per thread */
        }
        if (!ready) {
#pragma omp atomic write
            status = NO_MEMORY;
        }
        if (variant == FP32) {
#pragma omp for schedule(static)
            for (int h = 0; h < heads; h++) {
                const size_t g = (size_t)(h / group) * capacity * head; /* its key/value head */
                if (ready && fp32_rows == FP32_ROWS)
                    head_fp32(q + h * head, k + g, v + g, out + h * head, stride, rows, start,
                              head, causal, &f);
                else if (ready)
                    head_avx2(q + h * head, k + g, v + g, out + h * head, stride, rows, start,
                              head, causal, &f);
            }
        } else {
            /* per key/value head: the chunk's keys and values in bf16, the earlier chunks'
             * asked into the cache, then the query heads that read them */
#pragma omp for schedule(static)
            for (int g = 0; g < kv_heads; g++) {
                if (!ready) continue;
                const size_t at = (size_t)g * capacity * head, packed = (size_t)g * pitch * head;
                a.k = packed_k + packed;
                a.vt = packed_vt + packed;
                pack_chunk(k + at, v + at, start, end, head, packed_k + packed, packed_vt + packed,
                           a.stage);
                prefetch_packed(&a, start, head);
                for (int h = g * group; h < (g + 1) * group; h++) {
                    if (variant == AMX_BF16)
                        head_amx(q + h * head, out + h * head, stride, rows, start, head, causal, &a);
                    else
                        head_bf16(q + h * head, out + h * head, stride, rows, start, head, causal, &a);
                }
            }
        }
        if (variant == AMX_BF16 && ready) release_tiles();
    }
    return status;
}

int causal_attention(const float *q, const float *k, const float *v, float *out, int rows,
                     int start, int capacity, int heads, int kv_heads, int head, int variant,
                     int threads, uint16_t *packed_k, uint16_t *packed_vt) {
    return attention(q, k, v, out, rows, start, capacity, heads, kv_heads, head, variant, 1,
                     threads, packed_k, packed_vt);
}

/* Attention without a mask, as the vision encoder's MultiHeadAttention computes it: each of the
 * `rows` queries q [rows][heads * head] attends to all `rows` keys and values k, v
 * [heads][rows][head] (one key/value head per query head, laid out as causal_attention's cache
 * with capacity = rows); the same variants, blocks, packing and numerics. */
int full_attention(const float *q, const float *k, const float *v, float *out, int rows,
                   int heads, int head, int variant, int threads, uint16_t *packed_k,
                   uint16_t *packed_vt) {
    return attention(q, k, v, out, rows, 0, rows, heads, heads, head, variant, 0, threads,
                     packed_k, packed_vt);
}

/* The chunk's keys and values into the cache, before causal_attention reads them: rows `start`
 * to `start + count` of k_rows, v_rows [count][kv_heads * head] (the layout the projection makes)
 * go to k, v [kv_heads][capacity][head]. The key/value heads are shared among `threads` threads:
 * the first write to a page of the cache costs a page fault, and on a VM those cost seconds over
 * a photo's prompt, so two cores take them in half the time one would. */
int store_chunk(const float *k_rows, const float *v_rows, float *k, float *v, int count, int start,
                int capacity, int kv_heads, int head, int threads) {
    if (count <= 0 || start < 0 || start + count > capacity || kv_heads <= 0 || head <= 0)
        return BAD_SHAPE;
    const size_t row = (size_t)kv_heads * head;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int slot = 0; slot < 2 * kv_heads; slot++) {
        const int g = slot % kv_heads;
        const float *source = (slot < kv_heads ? k_rows : v_rows) + (size_t)g * head;
        float *target = (slot < kv_heads ? k : v) + ((size_t)g * capacity + start) * head;
        for (int i = 0; i < count; i++)
            memcpy(target + (size_t)i * head, source + (size_t)i * row, sizeof(float) * head);
    }
    return OK;
}

/* Positions [start, end) of the cache k, v [kv_heads][capacity][head] into the bf16 copies the
 * bf16 variants read (laid out as causal_attention says), for a caller that keeps no copies from
 * chunk to chunk: it packs the earlier chunks' positions [0, start) before each call, which then
 * adds its own. Each key/value head on one of `threads` threads; needs AVX-512 (with bf16). */
int pack_cache(const float *k, const float *v, int start, int end, int capacity, int kv_heads,
               int head, int threads, uint16_t *packed_k, uint16_t *packed_vt) {
    if (start < 0 || end < start || end > capacity || kv_heads <= 0 || head % 32 != 0 || head <= 0)
        return BAD_SHAPE;
    if (!has_avx512()) return NO_AVX512;
    if (end == start) return OK;
    const int pitch = (capacity + KEYS - 1) / KEYS * KEYS;
#pragma omp parallel num_threads(threads)
    {
        __m512i stage[4][2];
        transpose_indices(stage);
#pragma omp for schedule(static)
        for (int g = 0; g < kv_heads; g++) {
            const size_t at = (size_t)g * capacity * head, packed = (size_t)g * pitch * head;
            pack_chunk(k + at, v + at, start, end, head, packed_k + packed, packed_vt + packed,
                       stage);
        }
    }
    return OK;
}
