/*
 * peak.c: how many multiply-adds per second one instruction does on this CPU, on `threads`
 * threads, each thread running independent chains of it from registers (no memory traffic).
 * bench/floor.py builds it with gcc and times each function its CPU has; the fastest of a few
 * calls is the instruction's peak, which no GEMM or attention built on it can beat.
 *
 * Each function runs `iterations` rounds of CHAINS independent products per thread and returns
 * the multiply-adds done in all (a product of a W-lane instruction counts W lanes times the
 * pairs or quads each lane sums). CHAINS covers the latency of every instruction here (at
 * most 5-6 cycles at two per cycle), so the rate is the issue rate. The accumulators are folded
 * into `sink` so the compiler keeps the work.
 *
 *   int8_vnni512   vpdpbusd zmm (AVX-512 VNNI):           64 u8 x s8 products per instruction
 *   int8_vnni256   vpdpbusd ymm (AVX-VNNI):               32
 *   int8_avx2      vpmaddubsw + vpmaddwd + vpaddd ymm:     32 per three instructions, as
 *                  onnxruntime's u8s8 kernel multiplies without VNNI
 *   fp32_fma512    vfmadd231ps zmm:                       16
 *   fp32_fma256    vfmadd231ps ymm:                        8
 *   bf16_dot512    vdpbf16ps zmm (AVX-512 BF16):          32
 *   amx_int8       tdpbusd (AMX), 16 x 64 by 64 x 16:   16384; returns -1 when Linux refuses
 *                  the tile state
 */
#include <immintrin.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>

#define CHAINS 12
volatile int64_t sink;

#define KERNEL(name, isa, vec, zero, op, lanes)                                             \
    __attribute__((target(isa))) int64_t name(int64_t iterations, int threads) {           \
        _Pragma("omp parallel num_threads(threads)") {                                          \
            vec acc[CHAINS], a = zero, b = zero;                                                 \
            _Pragma("GCC unroll 16") for (int c = 0; c < CHAINS; c++) acc[c] = zero;             \
            a = SET_A;                                                                           \
            b = SET_B;                                                                           \
            for (int64_t i = 0; i < iterations; i++) {                                           \
                _Pragma("GCC unroll 16") for (int c = 0; c < CHAINS; c++) {                      \
                    /* a "changes" before each product and each sum is opaque: one           \
                     * instruction (sequence) per chain per round, none merged or hoisted */   \
                    __asm__ volatile("" : "+v"(a));                                             \
                    acc[c] = op;                                                                 \
                    __asm__ volatile("" : "+v"(acc[c]));                                        \
                }                                                                                \
            }                                                                                    \
            vec total = acc[0];                                                                  \
            _Pragma("GCC unroll 16") for (int c = 1; c < CHAINS; c++) total = FOLD(total, acc[c]); \
            int64_t lane[sizeof(vec) / 8];                                                       \
            __builtin_memcpy(lane, &total, sizeof(vec));                                         \
            _Pragma("omp atomic") sink += lane[0];                                               \
        }                                                                                        \
        return iterations * CHAINS * (int64_t)(lanes) * threads;                                 \
    }

#define SET_A _mm512_set1_epi8(3)
#define SET_B _mm512_set1_epi8(-2)
#define FOLD _mm512_add_epi32
KERNEL(int8_vnni512, "avx512f,avx512vnni", __m512i, _mm512_setzero_si512(),
       _mm512_dpbusd_epi32(acc[c], a, b), 64)
#undef SET_A
#undef SET_B
#undef FOLD

#define SET_A _mm256_set1_epi8(3)
#define SET_B _mm256_set1_epi8(-2)
#define FOLD _mm256_add_epi32
KERNEL(int8_vnni256, "avx2,avxvnni", __m256i, _mm256_setzero_si256(),
       _mm256_dpbusd_avx_epi32(acc[c], a, b), 32)
KERNEL(int8_avx2, "avx2", __m256i, _mm256_setzero_si256(),
       _mm256_add_epi32(acc[c], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b),
                                                  _mm256_set1_epi16(1))),
       32)
#undef SET_A
#undef SET_B
#undef FOLD

#define SET_A _mm512_set1_ps(1.0f)
#define SET_B _mm512_set1_ps(0.0f)
#define FOLD _mm512_add_ps
KERNEL(fp32_fma512, "avx512f", __m512, _mm512_setzero_ps(), _mm512_fmadd_ps(a, b, acc[c]), 16)
#undef SET_A
#undef SET_B
#undef FOLD

#define SET_A _mm256_set1_ps(1.0f)
#define SET_B _mm256_set1_ps(0.0f)
#define FOLD _mm256_add_ps
KERNEL(fp32_fma256, "avx2,fma", __m256, _mm256_setzero_ps(), _mm256_fmadd_ps(a, b, acc[c]), 8)
#undef SET_A
#undef SET_B
#undef FOLD

#define SET_A _mm512_castsi512_ps(_mm512_set1_epi16(0x3f80)) /* pairs of 1.0 in bf16 */
#define SET_B _mm512_setzero_ps()
#define FOLD _mm512_add_ps
KERNEL(bf16_dot512, "avx512f,avx512bf16", __m512, _mm512_setzero_ps(),
       _mm512_dpbf16_ps(acc[c], (__m512bh)a, (__m512bh)b), 32)
#undef SET_A
#undef SET_B
#undef FOLD

/* AMX: four accumulator tiles (0-3) fed by two A tiles (4, 5) and two B tiles (6, 7), so each
 * tile product waits on none of the three before it. */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

__attribute__((target("amx-tile,amx-int8"))) int64_t amx_int8(int64_t iterations, int threads) {
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)) return -1;
    static const int8_t zeros[16 * 64] __attribute__((aligned(64)));
#pragma omp parallel num_threads(threads)
    {
        tile_config config = {.palette = 1};
        for (int t = 0; t < 8; t++) config.colsb[t] = 64, config.rows[t] = 16;
        _tile_loadconfig(&config);
        for (int t = 0; t < 8; t++) {
            switch (t) { /* tile numbers must be constants */
            case 0: _tile_loadd(0, zeros, 64); break;
            case 1: _tile_loadd(1, zeros, 64); break;
            case 2: _tile_loadd(2, zeros, 64); break;
            case 3: _tile_loadd(3, zeros, 64); break;
            case 4: _tile_loadd(4, zeros, 64); break;
            case 5: _tile_loadd(5, zeros, 64); break;
            case 6: _tile_loadd(6, zeros, 64); break;
            default: _tile_loadd(7, zeros, 64); break;
            }
        }
        for (int64_t i = 0; i < iterations; i++) {
            _tile_dpbusd(0, 4, 6);
            _tile_dpbusd(1, 4, 7);
            _tile_dpbusd(2, 5, 6);
            _tile_dpbusd(3, 5, 7);
        }
        int32_t out[16 * 16] __attribute__((aligned(64)));
        _tile_stored(0, out, 64);
        _tile_release();
#pragma omp atomic
        sink += out[0];
    }
    return iterations * 4 * 16384LL * threads;
}
