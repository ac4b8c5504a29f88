/* CPU kernels of the fp8 block-wise backend: quantize, dequantize, and a fused small-M GEMM.
 *
 * Built on first use by __init__.py beside this file (gcc -O3 -fopenmp -shared), called through ctypes on
 * tensor data pointers. Every function has a portable scalar version and an AVX2 + FMA + F16C
 * version (compiled here with a target attribute, so one .so serves every x86-64 CPU); the
 * version is chosen at run time by CPU feature (fp8_set_isa lets tests force the scalar one).
 *
 * Layouts (all row-major, contiguous):
 *   fp8 tensors are bytes; kind 0 = float8_e4m3fn, 1 = float8_e5m2.
 *   high-precision tensors: dtype 0 = float32, 1 = bfloat16, 2 = float16.
 *   a block scale grid for [B, R, C] tiled by (br, bc) is float32 [B, cdiv(R, br), cdiv(C, bc)].
 *
 * Numerics follow torch_fp8_blockwise.reference bit for bit where the reference is elementwise:
 *   fp8 -> fp32 is exact; q * scale rounds once; fp32 -> fp8 is c10's round-to-nearest-even;
 *   fp32 -> bf16 / fp16 are c10's round-to-nearest-even conversions.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define FP8_HAVE_X86 1
#include <immintrin.h>
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#else
#define FP8_HAVE_X86 0
#endif

/* The AVX512-BF16 kernels (vdpbf16ps) need a compiler that knows the ISA: gcc 10 / clang 9. Older
 * ones build everything else; the CPU check below then never selects ISA 2. */
#if FP8_HAVE_X86 && ((defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && __GNUC__ >= 10))
#define FP8_HAVE_BF16 1
#define BF16_FN __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
/* The M = 1 GEMV of ISA 2 also needs AVX512-VBMI (vpermi2b): gemv_bf16_rows. */
#define BF16V_FN __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi")))
#include <cpuid.h>
#else
#define FP8_HAVE_BF16 0
#endif

/* The AMX-BF16 tiles (tdpbf16ps) of the large-M kernel: gcc 11 / clang 12, and Linux, whose
 * arch_prctl grants a process the tile state (cpu_has_amx_bf16). */
#if FP8_HAVE_BF16 && defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define FP8_HAVE_AMX 1
#define AMX_FN __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi,amx-tile,amx-bf16")))
#include <sys/syscall.h>
#include <unistd.h>
#else
#define FP8_HAVE_AMX 0
#endif

/* Forces inlining into a caller with constant dtype/kind arguments, so each specialization's
 * loops carry no per-element dtype or format branches. */
#define ALWAYS_INLINE __attribute__((always_inline)) inline

#define KIND_E4M3 0
#define KIND_E5M2 1
#define DT_F32 0
#define DT_BF16 1
#define DT_F16 2

/* Elements (multiply-adds for the GEMM: 4x) below which a call stays on one thread: ~50 us of
 * work, against ~5-10 us to wake a thread team, and a barrier that waits for a descheduled
 * thread for milliseconds on a busy machine (e.g. SmolLM2's 576 x 576 projections at M = 1). */
#define PAR_MIN (1 << 18)
/* The same bound for a GEMV (every row of the product one weight row's dot product: M = 1, or one
 * row per group), in weight bytes. Best of 60 interleaved rounds on a loaded 2-core VM, one thread
 * -> two: SmolLM2's 1536 x 576 80 -> 68 us, 576 x 1536 70 -> 53 us, but 576 x 576 only 30.6 -> 29.4
 * us, while the medians with two threads were 3-70x worse (a descheduled thread holds the
 * barrier). So from 512 KB up (SmolLM2's MLP projections) both cores share a GEMV; its attention
 * projections (576 x 576, 192 x 576) stay on one. */
#define GEMV_PAR_MIN (1 << 19)

static int g_isa = -1; /* 0 scalar, 1 avx2, 2 avx2 + the avx512-bf16 GEMM; -1 = not chosen yet */

/* malloc for a scratch array the caller writes whole (free() releases it), 64-byte aligned: from
 * 4 MB on, 2 MB aligned with its pages advised huge (MADV_HUGEPAGE), as _memory.empty does for
 * outputs: a fresh mapping faults once per 4 KB page on first write otherwise (~1.6 us each in a VM). */
static void *big_alloc(size_t n) {
    const size_t huge = (size_t)1 << 21;
    if (n < ((size_t)4 << 20)) return aligned_alloc(64, (n + 63) / 64 * 64);
    void *p = aligned_alloc(huge, (n + huge - 1) / huge * huge);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (p != NULL) (void)madvise(p, (n + huge - 1) / huge * huge, MADV_HUGEPAGE);
#endif
    return p;
}

/* Scratch arrays the calling thread keeps between calls (SCRATCH_X: bf16_prepare's activation,
 * SCRATCH_XP: amx_run's packed activation). A 512-token MoE block's are 16 MB each, and fresh ones
 * cost their page faults (the kernel zeroing every page) on every call: 15% of the CPU time of an
 * AMX gate / up projection. One up to SCRATCH_KEEP bytes stays with its thread (grown as needed)
 * until the thread exits or calls fp8_release_scratch; a larger one is freed after its call. The
 * arrays are written whole before they are read, so nothing of an earlier call is ever used. */
#define SCRATCH_X 0
#define SCRATCH_XP 1
#define SCRATCH_KEEP ((size_t)256 << 20)
typedef struct {
    void *p[2];
    size_t n[2];
} thread_scratch;
static pthread_key_t g_scratch_key;
static pthread_once_t g_scratch_once = PTHREAD_ONCE_INIT;
static int g_scratch_ok = 0;

static void scratch_free(void *v) {
    thread_scratch *t = (thread_scratch *)v;
    free(t->p[0]);
    free(t->p[1]);
    free(t);
}

static void scratch_key_init(void) { g_scratch_ok = pthread_key_create(&g_scratch_key, scratch_free) == 0; }

static thread_scratch *scratch_mine(int create) {
    pthread_once(&g_scratch_once, scratch_key_init);
    if (!g_scratch_ok) return NULL;
    thread_scratch *t = (thread_scratch *)pthread_getspecific(g_scratch_key);
    if (t == NULL && create) {
        t = (thread_scratch *)calloc(1, sizeof(thread_scratch));
        if (t != NULL && pthread_setspecific(g_scratch_key, t) != 0) {
            free(t);
            t = NULL;
        }
    }
    return t;
}

/* n bytes (big_alloc's alignment) for slot `slot` of this thread; NULL when out of memory. Hand
 * it back with scratch_done. */
static void *scratch_take(int slot, size_t n) {
    thread_scratch *t = n <= SCRATCH_KEEP ? scratch_mine(1) : NULL;
    if (t == NULL) return big_alloc(n);
    if (t->n[slot] < n) {
        free(t->p[slot]);
        t->p[slot] = big_alloc(n);
        t->n[slot] = t->p[slot] != NULL ? n : 0;
    }
    return t->p[slot];
}

static void scratch_done(int slot, void *p) {
    thread_scratch *t = scratch_mine(0);
    if (p != NULL && !(t != NULL && t->p[slot] == p)) free(p);
}

/* Frees the scratch arrays the calling thread keeps (they are made again when needed). */
void fp8_release_scratch(void) {
    thread_scratch *t = scratch_mine(0);
    if (t == NULL) return;
    for (int i = 0; i < 2; i++) free(t->p[i]), t->p[i] = NULL, t->n[i] = 0;
}

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline int64_t cdiv64(int64_t a, int64_t b) { return (a + b - 1) / b; }
/* The group i with first[i] <= blk < first[i + 1] (first: L + 1 ascending task starts), by bisection. */
static inline int64_t group_of(const int64_t *first, int64_t L, int64_t blk) {
    int64_t lo = 0, hi = L;
    while (hi - lo > 1) {
        const int64_t mid = (lo + hi) / 2;
        if (first[mid] <= blk) lo = mid;
        else hi = mid;
    }
    return lo;
}

/* ------------------------------------------------------------------ scalar conversions */
static float g_e4m3[256], g_e5m2[256];

static void init_tables(void) {
    for (int u = 0; u < 256; u++) {
        int s = u >> 7, e = (u >> 3) & 15, m = u & 7;
        float v = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf(m / 8.0f, -6);
        if ((u & 0x7F) == 0x7F) v = NAN;
        g_e4m3[u] = s ? -v : v;
        e = (u >> 2) & 31, m = u & 3;
        v = e ? ldexpf(1.0f + m / 4.0f, e - 15) : ldexpf(m / 4.0f, -14);
        if (e == 31) v = m ? NAN : INFINITY;
        g_e5m2[u] = s ? -v : v;
    }
}

/* fp32, already clamped to +-fp8_max (or nan), -> fp8 code with c10's rounding (nearest even):
 * the scalar twin of narrow8_epi32, whose comment explains the arithmetic. */
static inline uint8_t f32_to_fp8(float f, int kind) {
    const uint32_t mbits = kind == KIND_E4M3 ? 3 : 2, emin = kind == KIND_E4M3 ? 121 : 113;
    const uint32_t b = f2u(f), sign = b & 0x80000000u, a = b ^ sign;
    if (a > 0x7F800000u) return (uint8_t)(0x7F | (sign >> 24));
    const uint32_t e = (a & 0x7F800000u) > (emin << 23) ? a & 0x7F800000u : emin << 23;
    const uint32_t c = e + ((23 - mbits) << 23), t = f2u(u2f(a) + u2f(c));
    return (uint8_t)(((e >> (23 - mbits)) + (t - c) - (emin << mbits)) | (sign >> 24));
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t b = f2u(f);
    if (f != f) return 0x7FC0;
    return (uint16_t)((b + ((b >> 16) & 1) + 0x7FFF) >> 16);
}

/* IEEE fp32 -> fp16, round to nearest even (same as F16C and c10::Half). */
static inline uint16_t f32_to_f16(float f) {
    const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
    float base = (fabsf(f) * scale_to_inf) * scale_to_zero;
    uint32_t w = f2u(f), shl1 = w + w, sign = w & 0x80000000u;
    uint32_t bias = shl1 & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = u2f((bias >> 1) + 0x07800000u) + base;
    uint32_t bits = f2u(base);
    uint32_t exp_bits = (bits >> 13) & 0x00007C00u, mant_bits = bits & 0x00000FFFu;
    uint32_t nonsign = exp_bits + mant_bits;
    return (uint16_t)((sign >> 16) | (shl1 > 0xFF000000u ? 0x7E00u : nonsign));
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t w = (uint32_t)h << 16, sign = w & 0x80000000u, two_w = w + w;
    float normal = u2f((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    float denorm = u2f((two_w >> 17) | (126u << 23)) - 0.5f;
    uint32_t r = sign | (two_w < (1u << 27) ? f2u(denorm) : f2u(normal));
    return u2f(r);
}

static inline float load_hp(const void *x, int dt, int64_t i) {
    if (dt == DT_F32) return ((const float *)x)[i];
    if (dt == DT_BF16) return u2f((uint32_t)((const uint16_t *)x)[i] << 16);
    return f16_to_f32(((const uint16_t *)x)[i]);
}

static inline void store_hp(void *y, int dt, int64_t i, float v) {
    if (dt == DT_F32) ((float *)y)[i] = v;
    else if (dt == DT_BF16) ((uint16_t *)y)[i] = f32_to_bf16(v);
    else ((uint16_t *)y)[i] = f32_to_f16(v);
}

static inline float fp8_max_of(int kind) { return kind == KIND_E4M3 ? 448.0f : 57344.0f; }

/* formats.compute_scale: max(amax, 1e-10) / fp8_max, optionally rounded up to a power of two. */
static inline float block_scale(float amax, int kind, int ue8m0) {
    float s = (amax > 1e-10f ? amax : 1e-10f) / fp8_max_of(kind);
    if (ue8m0) s = u2f((f2u(s) + 0x7FFFFFu) & 0x7F800000u);
    return s;
}

static inline uint8_t quant1(float v, float s, float big, int kind) {
    float q = v / s;
    q = q < -big ? -big : (q > big ? big : q); /* nan stays nan */
    return f32_to_fp8(q, kind);
}

/* ------------------------------------------------------------------ AVX2 building blocks */
#if FP8_HAVE_X86
/* 16 fp8 bytes -> 16 fp32 values exactly, via fp16 bits (F16C widens fp16 subnormals exactly):
 * e5m2 is the top byte of an fp16; e4m3 shifted into an fp16's exponent/mantissa is the value
 * times 2**-8 (bias 15 vs 7), and its nan (s.1111.111) is forced to an fp16 nan. */
AVX2_FN static ALWAYS_INLINE void widen16(const uint8_t *p, int kind, __m256 *lo, __m256 *hi) {
    __m256i u = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    __m256i h;
    if (kind == KIND_E4M3) {
        __m256i mag = _mm256_and_si256(u, _mm256_set1_epi16(0x7F));
        h = _mm256_or_si256(_mm256_slli_epi16(mag, 7),
                            _mm256_slli_epi16(_mm256_and_si256(u, _mm256_set1_epi16(0x80)), 8));
        __m256i nan = _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7F));
        h = _mm256_or_si256(h, _mm256_and_si256(nan, _mm256_set1_epi16(0x7E00)));
    } else {
        h = _mm256_slli_epi16(u, 8);
    }
    *lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    *hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
    if (kind == KIND_E4M3) {
        const __m256 two8 = _mm256_set1_ps(256.0f);
        *lo = _mm256_mul_ps(*lo, two8);
        *hi = _mm256_mul_ps(*hi, two8);
    }
}

AVX2_FN static ALWAYS_INLINE __m256 load8_hp(const void *x, int dt, int64_t i) {
    if (dt == DT_F32) return _mm256_loadu_ps((const float *)x + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    if (dt == DT_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* narrow8_magnitude: 8 fp32 magnitudes (sign bit clear, <= fp8_max up to one fp32 rounding, not
 * nan) -> 8 fp8 codes without sign in the low byte of each int32 lane; narrow8_epi32: 8 fp32
 * (already clamped to +-fp8_max, or nan) -> 8 signed fp8 codes. c10's rounding (nearest even).
 * With E = max(fp32 exponent field of |v|, the format's smallest normal exponent) and C = 2**(E - 127 + 23 - mbits), the fp32 sum t = |v| + C lies in C's binade,
 * whose spacing is the format's spacing at |v| (subnormals included), so the addition rounds |v|
 * to the format's grid (nearest even) and bits(t) - bits(C) = k counts grid steps: the code is
 * (E - E_min) << mbits plus k, where a carry into the next binade is k = 2 << mbits. Integer
 * ops only after the one addition (no fp32 subnormal results, which x86 runs ~3x slower).
 * Clamping bounds the result by fp8_max, so only nan needs a blend (to 0x7F). Checked against
 * c10's scalar conversions on all 2**32 fp32 inputs (clamped first, as here). */
static inline int narrow8_bias(int kind) { return kind == KIND_E4M3 ? (121 << 3) + (20 << 3) : (113 << 2) + (21 << 2); }

/* narrow8_magnitude plus narrow8_bias(kind) in every lane (one subtraction less, for callers that
 * subtract the bias after a pack, from 16 lanes at a time): with c = C's bits, (t - c) + (c >> (23
 * - mbits)) = k + ((E + 23 - mbits) << mbits). */
AVX2_FN static ALWAYS_INLINE __m256i narrow8_magnitude_biased(__m256i a, int kind) {
    const int mbits = kind == KIND_E4M3 ? 3 : 2, emin = kind == KIND_E4M3 ? 121 : 113;
    __m256i e = _mm256_max_epi32(_mm256_and_si256(a, _mm256_set1_epi32(0x7F800000)),
                                 _mm256_set1_epi32(emin << 23));
    __m256i c = _mm256_add_epi32(e, _mm256_set1_epi32((23 - mbits) << 23));
    __m256i t = _mm256_castps_si256(_mm256_add_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(c)));
    return _mm256_add_epi32(_mm256_sub_epi32(t, c), _mm256_srli_epi32(c, 23 - mbits));
}

/* 8 fp32 whose magnitudes are at or above the format's smallest normal (2^-6 / 2^-14) and <=
 * fp8_max up to one rounding -> fp8 codes in int32 lanes: the magnitude's code in bits 0-7, the
 * sign (bit 31) at bit 31 - shift (11 for e4m3, 10 for e5m2), nothing between. Rebasing the exponent
 * from fp32's bias to the format's leaves the code in the top bits of the magnitude, and rounding
 * those to nearest even is integer arithmetic alone: (b - rebase + half - 1 + lsb) >> shift, 5
 * instructions instead of narrow8_magnitude's 8 (a carry into the exponent is the next binade's
 * code, as it should be; a normal magnitude never borrows from the sign). Smaller lanes come out
 * wrong: callers keep them out. */
AVX2_FN static ALWAYS_INLINE __m256i narrow8_normal(__m256i b, int kind) {
    const int sh = kind == KIND_E4M3 ? 20 : 21, rebase = kind == KIND_E4M3 ? 120 : 112;
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, sh), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(b, _mm256_set1_epi32((1 << (sh - 1)) - 1 - (rebase << 23)));
    return _mm256_srli_epi32(_mm256_add_epi32(r, lsb), sh);
}

AVX2_FN static ALWAYS_INLINE __m256i narrow8_magnitude(__m256i a, int kind) {
    return _mm256_sub_epi32(narrow8_magnitude_biased(a, kind), _mm256_set1_epi32(narrow8_bias(kind)));
}

AVX2_FN static ALWAYS_INLINE __m256i narrow8_epi32(__m256 v, int kind) {
    __m256i b = _mm256_castps_si256(v);
    __m256i sign = _mm256_and_si256(b, _mm256_set1_epi32((int)0x80000000u));
    __m256i code = narrow8_magnitude(_mm256_xor_si256(b, sign), kind);
    code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7F), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    return _mm256_or_si256(code, _mm256_srli_epi32(sign, 24));
}

/* 8 fp32 (clamped as above) -> 8 fp8 bytes at out. */
AVX2_FN static ALWAYS_INLINE void narrow8(__m256 v, int kind, uint8_t *out) {
    __m256i r = narrow8_epi32(v, kind);
    /* byte 0 of each int32 -> 4 bytes per 128-bit lane */
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4,
                                          8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    r = _mm256_shuffle_epi8(r, pick);
    uint32_t lo = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(r));
    uint32_t hi = (uint32_t)_mm_cvtsi128_si32(_mm256_extracti128_si256(r, 1));
    uint64_t both = (uint64_t)lo | ((uint64_t)hi << 32);
    memcpy(out, &both, 8);
}

/* 4 x 8 fp8 codes (int32 lanes, values 0..255) -> 32 bytes in order at out: two packs interleave
 * the 128-bit lanes, one dword permutation puts them back. */
AVX2_FN static ALWAYS_INLINE void store32_codes(__m256i a, __m256i b, __m256i c, __m256i d, uint8_t *out) {
    __m256i ab = _mm256_packus_epi32(a, b), cd = _mm256_packus_epi32(c, d);
    __m256i bytes = _mm256_packus_epi16(ab, cd);
    bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)out, bytes);
}

AVX2_FN static inline void store8_hp(void *y, int dt, int64_t i, __m256 v) {
    if (dt == DT_F32) {
        _mm256_storeu_ps((float *)y + i, v);
    } else if (dt == DT_F16) {
        _mm_storeu_si128((__m128i *)((uint16_t *)y + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else {
        __m256i b = _mm256_castps_si256(v);
        __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(b, 16),
                                                                             _mm256_set1_epi32(1)),
                                                          _mm256_set1_epi32(0x7FFF)));
        r = _mm256_srli_epi32(r, 16);
        __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
        __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)y + i), packed);
    }
}

AVX2_FN static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

AVX2_FN static inline float hsum8(__m256 v) {
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

/* Largest of 8 int32 / 16 int16 lanes (all non-negative here). */
AVX2_FN static ALWAYS_INLINE uint32_t hmax_epi32(__m256i v) {
    __m128i m = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xB1));
    return (uint32_t)_mm_cvtsi128_si32(m);
}

AVX2_FN static ALWAYS_INLINE uint32_t hmax_epi16(__m256i v) {
    __m128i m = _mm_max_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_max_epi16(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_max_epi16(m, _mm_shuffle_epi32(m, 0xB1));
    m = _mm_max_epi16(m, _mm_shufflelo_epi16(m, 0xB1));
    return (uint16_t)_mm_extract_epi16(m, 0);
}

/* Largest finite |x| of one row segment, on the raw bits: with the sign cleared, IEEE values
 * order like unsigned integers, and everything at or above the exponent-all-ones pattern (inf,
 * nan) is dropped. 16-bit dtypes take 16 elements per instruction, and nothing is converted.
 * One and + one max per vector; only a segment whose largest magnitude is an inf / nan is walked
 * again (scalar, dropping those), and then *nonfinite is set. */
AVX2_FN static ALWAYS_INLINE float amax_avx2(const void *x, int dt, int64_t i0, int64_t n, int *nonfinite) {
    int64_t j = 0;
    uint32_t best = 0, top = 0;
    if (dt == DT_F32) {
        const __m256i mag = _mm256_set1_epi32(0x7FFFFFFF);
        __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
        const float *p = (const float *)x + i0;
        for (; j + 16 <= n; j += 16) {
            acc0 = _mm256_max_epi32(acc0, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(p + j)), mag));
            acc1 = _mm256_max_epi32(acc1, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(p + j + 8)), mag));
        }
        top = hmax_epi32(_mm256_max_epi32(acc0, acc1));
        for (; j < n; j++) {
            uint32_t a = f2u(p[j]) & 0x7FFFFFFFu;
            top = a > top ? a : top;
        }
        best = top;
        if (top >= 0x7F800000u) {
            *nonfinite = 1;
            best = 0;
            for (j = 0; j < n; j++) {
                uint32_t a = f2u(p[j]) & 0x7FFFFFFFu;
                if (a < 0x7F800000u && a > best) best = a;
            }
        }
        return u2f(best);
    }
    /* bf16: inf = 0x7F80; fp16: inf = 0x7C00. Magnitudes fit in 15 bits: signed compares work. */
    const uint16_t inf16 = dt == DT_BF16 ? 0x7F80 : 0x7C00;
    const __m256i mag = _mm256_set1_epi16(0x7FFF);
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    const uint16_t *p = (const uint16_t *)x + i0;
    for (; j + 32 <= n; j += 32) {
        acc0 = _mm256_max_epi16(acc0, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(p + j)), mag));
        acc1 = _mm256_max_epi16(acc1, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(p + j + 16)), mag));
    }
    top = hmax_epi16(_mm256_max_epi16(acc0, acc1));
    for (; j < n; j++) {
        uint16_t a = p[j] & 0x7FFF;
        top = a > top ? a : top;
    }
    best = top;
    if (top >= inf16) {
        *nonfinite = 1;
        best = 0;
        for (j = 0; j < n; j++) {
            uint16_t a = p[j] & 0x7FFF;
            if (a < inf16 && a > best) best = a;
        }
    }
    return dt == DT_BF16 ? u2f(best << 16) : f16_to_f32((uint16_t)best);
}

/* 8 elements of x from index i, divided by the scale and clamped (nan stays nan: the second
 * operand of min/max wins on nan). */
AVX2_FN static ALWAYS_INLINE __m256 scaled8(const void *x, int dt, int64_t i, __m256 vs, __m256 lo, __m256 hi) {
    return _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_div_ps(load8_hp(x, dt, i), vs)));
}

/* x[i0 : i0 + n] / s -> q[0 : n] fp8 bytes; 32 elements per step stored as one 32-byte vector. */
AVX2_FN static ALWAYS_INLINE void quant_row_avx2(const void *x, int dt, int64_t i0, int64_t n, float s,
                                                 int kind, uint8_t *q, int finite) {
    const float big = fp8_max_of(kind);
    const __m256 vs = _mm256_set1_ps(s), hi = _mm256_set1_ps(big), lo = _mm256_set1_ps(-big);
    int64_t j = 0;
    if (dt == DT_BF16 && finite) {
        /* A block without inf / nan (amax_avx2 says so): |x / s| <= fp8_max up to one rounding
         * (s = fl(amax / fp8_max), or larger for ue8m0), so no clamp and no nan blend. A step
         * whose |x| are all above small16 (a bound from s, conservative by 2^-7: every quotient is
         * then at least the format's smallest normal) divides the signed values and rounds them
         * with narrow8_normal, and one pmaddubsw per 16 lanes moves each sign next to its
         * code (7% fewer cycles than taking the signs from the input's high bytes). A step with a
         * smaller |x| (a zero, a subnormal code) divides the magnitudes and rounds them with
         * narrow8_magnitude_biased, exact everywhere, whose bias leaves 16 lanes at a time after
         * the first pack (which restores element order within 16); its signs come straight from
         * the bf16 input's high bytes, packed like the codes. */
        const __m256i zero = _mm256_setzero_si256(), mag16 = _mm256_set1_epi16(0x7FFF);
        const __m256i bias16 = _mm256_set1_epi16((short)narrow8_bias(kind)), sign8 = _mm256_set1_epi8((char)0x80);
        const float vmin = kind == KIND_E4M3 ? 0x1p-6f : 0x1p-14f;
        const __m256i small16 = _mm256_set1_epi16((short)((f2u(vmin * s * (1.0f + 0x1p-7f)) >> 16) + 1));
        const uint16_t *p = (const uint16_t *)x + i0;
        /* signed codes: sign at bit 31 - sh of the 32-bit code, i.e. bit 3 / 2 of a 16-bit lane's
         * high byte; pmaddubsw adds high byte * 16 (e4m3) / 32 (e5m2) to the low byte: code | sign << 7 */
        const __m256i joinsign = _mm256_set1_epi16((short)(kind == KIND_E4M3 ? (16 << 8) | 1 : (32 << 8) | 1));
        for (; j + 32 <= n; j += 32) {
            __m256i u[2] = {_mm256_loadu_si256((const __m256i *)(p + j)),
                            _mm256_loadu_si256((const __m256i *)(p + j + 16))};
            __m256i a[2] = {_mm256_and_si256(u[0], mag16), _mm256_and_si256(u[1], mag16)};
            __m256i low = _mm256_cmpgt_epi16(small16, _mm256_min_epu16(a[0], a[1]));
            __m256i bytes;
            if (_mm256_movemask_epi8(low) == 0) {
                __m256i half[2];
                for (int h = 0; h < 2; h++) {
                    __m256 f0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, u[h]));
                    __m256 f1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, u[h]));
                    __m256i c0 = narrow8_normal(_mm256_castps_si256(_mm256_div_ps(f0, vs)), kind);
                    __m256i c1 = narrow8_normal(_mm256_castps_si256(_mm256_div_ps(f1, vs)), kind);
                    half[h] = _mm256_maddubs_epi16(_mm256_packus_epi32(c0, c1), joinsign);
                }
                bytes = _mm256_packus_epi16(half[0], half[1]);
            } else {
                __m256i half[2];
                for (int h = 0; h < 2; h++) {
                    __m256 f0 = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, a[h]));
                    __m256 f1 = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, a[h]));
                    __m256i c0 = narrow8_magnitude_biased(_mm256_castps_si256(_mm256_div_ps(f0, vs)), kind);
                    __m256i c1 = narrow8_magnitude_biased(_mm256_castps_si256(_mm256_div_ps(f1, vs)), kind);
                    half[h] = _mm256_sub_epi16(_mm256_packus_epi32(c0, c1), bias16);
                }
                __m256i sign = _mm256_packus_epi16(_mm256_srli_epi16(u[0], 8), _mm256_srli_epi16(u[1], 8));
                bytes = _mm256_or_si256(_mm256_packus_epi16(half[0], half[1]), _mm256_and_si256(sign, sign8));
            }
            _mm256_storeu_si256((__m256i *)(q + j), _mm256_permute4x64_epi64(bytes, 0xD8));
        }
    } else if (dt == DT_BF16) {
        /* bf16 bits in the high half of a zeroed int32 are the fp32 value: one unpack per 8
         * elements instead of a widen + shift. The unpacks interleave 128-bit lanes (elements
         * 0-3, 8-11 | 4-7, 12-15), which the lane-wise packs undo, up to one 64-bit permutation. */
        const __m256i zero = _mm256_setzero_si256();
        const uint16_t *p = (const uint16_t *)x + i0;
        for (; j + 32 <= n; j += 32) {
            __m256i u0 = _mm256_loadu_si256((const __m256i *)(p + j));
            __m256i u1 = _mm256_loadu_si256((const __m256i *)(p + j + 16));
            __m256 f[4] = {_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, u0)),
                           _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, u0)),
                           _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, u1)),
                           _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, u1))};
            __m256i c[4];
            for (int u = 0; u < 4; u++)
                c[u] = narrow8_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_div_ps(f[u], vs))), kind);
            __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]), _mm256_packus_epi32(c[2], c[3]));
            _mm256_storeu_si256((__m256i *)(q + j), _mm256_permute4x64_epi64(bytes, 0xD8));
        }
    }
    for (; j + 32 <= n; j += 32) {
        __m256i c0 = narrow8_epi32(scaled8(x, dt, i0 + j, vs, lo, hi), kind);
        __m256i c1 = narrow8_epi32(scaled8(x, dt, i0 + j + 8, vs, lo, hi), kind);
        __m256i c2 = narrow8_epi32(scaled8(x, dt, i0 + j + 16, vs, lo, hi), kind);
        __m256i c3 = narrow8_epi32(scaled8(x, dt, i0 + j + 24, vs, lo, hi), kind);
        store32_codes(c0, c1, c2, c3, q + j);
    }
    for (; j + 8 <= n; j += 8) narrow8(scaled8(x, dt, i0 + j, vs, lo, hi), kind, q + j);
    for (; j < n; j++) q[j] = quant1(load_hp(x, dt, i0 + j), s, big, kind);
}

/* Columns per chunk (see quant_tasks_avx2). A 1 x bc grid (activations): 1024, a row's chunk
 * stays in L1 between its two passes. Taller blocks: 4096 (a whole row of most weights), e.g. 128
 * rows x 4096 bf16 = 1 MB, read from L3 in pass 2, while pass 1 streams the slab as one
 * contiguous run (128 x 1024 chunks made pass 1 a strided walk that waited on DRAM). */
#define QUANT_CHUNK_COLS_ROW 1024
#define QUANT_CHUNK_COLS 4096

/* One chunk of a slab: rows [r0, r1) of batch b (one task's slab), column blocks [cb0, cb1). */
typedef struct {
    int64_t t, b, r0, r1, cb0, cb1;
} quant_chunk;

/* Work sharing of fp8_quantize's tasks. Thread i starts with one contiguous share, tasks [base +
 * front, base + back) of slot i (front << 32 | back, one cache line per slot); it takes its own
 * from the front and, once they are gone, other threads' from the back. Shares are even work, but
 * a thread that the OS or the hypervisor delays would hold up the whole call: its last tasks go to
 * the others instead (one compare-and-swap per task, ~2 us of work for a 1 x 128 row of 4096). */
typedef struct {
    uint64_t *slot; /* nt slots, QUANT_SLOT_STRIDE apart */
    int64_t self, nt, base;
} quant_claim;
#define QUANT_SLOT_STRIDE 8 /* uint64 per slot: 64 bytes */

static inline int64_t claim_task(const quant_claim *c) {
    for (int64_t i = 0; i < c->nt; i++) {
        uint64_t *s = &c->slot[((c->self + i) % c->nt) * QUANT_SLOT_STRIDE];
        uint64_t v = __atomic_load_n(s, __ATOMIC_RELAXED);
        while ((uint32_t)(v >> 32) < (uint32_t)v) { /* front < back: a task is left */
            const uint64_t want = i == 0 ? v + (1ull << 32) : v - 1;
            if (__atomic_compare_exchange_n(s, &v, want, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                return c->base + (i == 0 ? (int64_t)(v >> 32) : (int64_t)(uint32_t)v - 1);
        }
    }
    return -1;
}

/* The chunk after k in a thread's walk: the slab's next columns, else the first ones of the next
 * task it claims. Returns 0 when no task is left. */
static inline int next_chunk(quant_chunk *k, const quant_claim *c, int64_t RB, int64_t R, int64_t br,
                             int64_t CB, int64_t nb) {
    if (k->cb1 < CB) {
        k->cb0 = k->cb1;
    } else {
        if ((k->t = claim_task(c)) < 0) return 0;
        k->b = k->t / RB;
        k->r0 = (k->t % RB) * br;
        k->r1 = k->r0 + br < R ? k->r0 + br : R;
        k->cb0 = 0;
    }
    k->cb1 = k->cb0 + nb < CB ? k->cb0 + nb : CB;
    return 1;
}

/* Block cb of chunk k, row r: its finite amax into amax[cb - cb0] (running max). */
AVX2_FN static ALWAYS_INLINE void chunk_amax(const void *x, int dt, int64_t R, int64_t C, int64_t bc,
                                             const quant_chunk *k, int64_t r, int64_t cb, float *amax,
                                             int *nonfinite) {
    const int64_t c0 = cb * bc, n = c0 + bc < C ? bc : C - c0;
    float a = amax_avx2(x, dt, (k->b * R + r) * C + c0, n, nonfinite);
    amax[cb - k->cb0] = a > amax[cb - k->cb0] ? a : amax[cb - k->cb0];
}

/* Block cb of chunk k, row r: divided by the block's scale and rounded into q. */
AVX2_FN static ALWAYS_INLINE void chunk_quant(const void *x, int dt, int64_t R, int64_t C, int64_t bc,
                                              const quant_chunk *k, int64_t r, int64_t cb, float s, int kind,
                                              int nonfinite, uint8_t *q) {
    const int64_t c0 = cb * bc, n = c0 + bc < C ? bc : C - c0, i0 = (k->b * R + r) * C + c0;
    if (nonfinite) quant_row_avx2(x, dt, i0, n, s, kind, q + i0, 0);
    else quant_row_avx2(x, dt, i0, n, s, kind, q + i0, 1);
}

/* The tasks c hands out (slabs of br rows: every (br x bc) block of each, scales into
 * scale[t * CB :]), walked in chunks of whole column blocks, each in two passes: pass 1 takes every block's
 * finite amax, pass 2 divides and rounds, both row by row, so memory is read in long contiguous
 * runs and the chunk is still in cache for pass 2. The passes are software-pipelined: block j of
 * row i of chunk k + 1's pass 1 runs beside the same block of chunk k's pass 2, so pass 1's
 * loads from DRAM overlap pass 2's arithmetic (on cache-resident data) instead of stalling alone. */
AVX2_FN static ALWAYS_INLINE void quant_tasks_avx2(const void *x, int dt, int64_t R, int64_t C, int64_t br,
                                                   int64_t bc, int kind, int ue8m0, uint8_t *q, float *scale,
                                                   const quant_claim *c) {
    const int64_t RB = cdiv64(R, br), CB = cdiv64(C, bc), cols = br > 1 ? QUANT_CHUNK_COLS : QUANT_CHUNK_COLS_ROW;
    const int64_t nb = bc < cols ? cols / bc : 1;
    float amax[2][QUANT_CHUNK_COLS];
    int nonfinite[2] = {0, 0}, cur = 0;
    quant_chunk k = {-1, 0, 0, 0, CB, CB}, nxt;
    if (!next_chunk(&k, c, RB, R, br, CB, nb)) return;
    for (int64_t cb = k.cb0; cb < k.cb1; cb++) amax[cur][cb - k.cb0] = 0.0f;
    for (int64_t r = k.r0; r < k.r1; r++)
        for (int64_t cb = k.cb0; cb < k.cb1; cb++) chunk_amax(x, dt, R, C, bc, &k, r, cb, amax[cur], &nonfinite[cur]);
    for (;;) {
        float *scale_row = scale + k.t * CB;
        for (int64_t cb = k.cb0; cb < k.cb1; cb++) scale_row[cb] = block_scale(amax[cur][cb - k.cb0], kind, ue8m0);
        nxt = k;
        const int more = next_chunk(&nxt, c, RB, R, br, CB, nb);
        const int64_t rows = k.r1 - k.r0, nrows = more ? nxt.r1 - nxt.r0 : 0;
        const int64_t blocks = k.cb1 - k.cb0, nblocks = more ? nxt.cb1 - nxt.cb0 : 0;
        if (more) {
            nonfinite[!cur] = 0;
            for (int64_t cb = nxt.cb0; cb < nxt.cb1; cb++) amax[!cur][cb - nxt.cb0] = 0.0f;
        }
        for (int64_t i = 0; i < (rows > nrows ? rows : nrows); i++) {
            for (int64_t j = 0; j < (blocks > nblocks ? blocks : nblocks); j++) {
                if (i < nrows && j < nblocks)
                    chunk_amax(x, dt, R, C, bc, &nxt, nxt.r0 + i, nxt.cb0 + j, amax[!cur], &nonfinite[!cur]);
                if (i < rows && j < blocks)
                    chunk_quant(x, dt, R, C, bc, &k, k.r0 + i, k.cb0 + j, scale_row[k.cb0 + j], kind, nonfinite[cur], q);
            }
        }
        if (!more) return;
        k = nxt;
        cur = !cur;
    }
}

/* One 1 x n group of an activation row to e4m3 bytes q[0 : n]; returns its fp32 scale. */
AVX2_FN static float dyn_quant_seg_avx2(const void *x, int dt, int64_t i0, int64_t n, uint8_t *q) {
    int nonfinite = 0;
    const float s = block_scale(amax_avx2(x, dt, i0, n, &nonfinite), KIND_E4M3, 0);
    if (nonfinite) quant_row_avx2(x, dt, i0, n, s, KIND_E4M3, q, 0);
    else quant_row_avx2(x, dt, i0, n, s, KIND_E4M3, q, 1);
    return s;
}

/* quant_tasks_avx2 compiled once per (dtype, fp8 kind): constant arguments remove the per-element
 * branches on them (~2x faster than one generic loop). */
#define QUANT_TASKS_CASE(DT, KIND)                                                                     \
    case DT * 2 + KIND:                                                                                \
        quant_tasks_avx2(x, DT, R, C, br, bc, KIND, ue8m0, q, scale, c);                               \
        break;
AVX2_FN static void quant_tasks_avx2_any(const void *x, int dt, int64_t R, int64_t C, int64_t br, int64_t bc,
                                         int kind, int ue8m0, uint8_t *q, float *scale, const quant_claim *c) {
    switch (dt * 2 + kind) {
        QUANT_TASKS_CASE(DT_F32, KIND_E4M3)
        QUANT_TASKS_CASE(DT_F32, KIND_E5M2)
        QUANT_TASKS_CASE(DT_BF16, KIND_E4M3)
        QUANT_TASKS_CASE(DT_BF16, KIND_E5M2)
        QUANT_TASKS_CASE(DT_F16, KIND_E4M3)
        QUANT_TASKS_CASE(DT_F16, KIND_E5M2)
    }
}
#undef QUANT_TASKS_CASE

/* q[0 : n] * s -> out[o0 : o0 + n] for the multiple-of-16 prefix; returns how many were done. */
AVX2_FN static int64_t dequant_row_avx2(const uint8_t *q, int kind, float s, int64_t n, void *out, int dt,
                                        int64_t o0) {
    const __m256 vs = _mm256_set1_ps(s);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        __m256 lo, hi;
        widen16(q + j, kind, &lo, &hi);
        store8_hp(out, dt, o0 + j, _mm256_mul_ps(lo, vs));
        store8_hp(out, dt, o0 + j + 8, _mm256_mul_ps(hi, vs));
    }
    return j;
}
#endif

/* ------------------------------------------------------------------ ISA choice */
static int cpu_has_avx2(void) {
#if FP8_HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* AVX512-F/BW/VL/DQ with the OS saving zmm state (libgcc's check) and AVX512_BF16 (CPUID leaf 7
 * sub-leaf 1, EAX bit 5: the avx512_bf16 flag of /proc/cpuinfo). */
static int cpu_has_avx512_bf16(void) {
#if FP8_HAVE_BF16
    unsigned a = 0, b = 0, c = 0, d = 0;
    __builtin_cpu_init();
    if (!(cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
        return 0;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return 0;
    return (a >> 5) & 1;
#else
    return 0;
#endif
}

/* AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22), the OS saving tile state (XCR0 bits
 * 17 and 18), and this process granted the tile data (Linux's arch_prctl(ARCH_REQ_XCOMP_PERM,
 * XFEATURE_XTILEDATA): without it the first tile instruction is a SIGILL; asking again is a no-op). */
static int cpu_has_amx_bf16(void) {
#if FP8_HAVE_AMX
    unsigned a = 0, b = 0, c = 0, d = 0, lo = 0, hi = 0;
    if (!cpu_has_avx512_bf16() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!((d >> 24) & 1) || !((d >> 22) & 1)) return 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0)); /* OSXSAVE: libgcc's avx512f check saw it */
    (void)hi;
    if (((lo >> 17) & 3) != 3) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
#else
    return 0;
#endif
}

static void init_bf16_tables(void);
/* 1 when ISA 2's one-row products may take gemv_bf16_rows (the CPU has AVX512-VBMI too). */
static int g_vbmi = 0;
/* 1 when ISA 2's products of AMX_MIN_ROWS rows or more run on AMX tiles (amx_run; fp8_set_amx). */
static int g_amx = 0;

static void ensure_init(void) {
    if (g_isa < 0) {
        init_tables();
        init_bf16_tables();
        g_isa = cpu_has_avx512_bf16() ? 2 : cpu_has_avx2();
#if FP8_HAVE_BF16
        g_vbmi = g_isa == 2 && __builtin_cpu_supports("avx512vbmi");
#endif
        g_amx = g_isa == 2 && cpu_has_amx_bf16();
    }
}

/* Let ISA 2 run its products of AMX_MIN_ROWS rows or more on AMX tiles (1) or on its AVX512-BF16
 * kernels (0), the first only where cpu_has_amx_bf16; returns whether it does. */
int fp8_set_amx(int on) {
    ensure_init();
    g_amx = on && cpu_has_amx_bf16();
    return g_amx;
}

int fp8_get_amx(void) {
    ensure_init();
    return g_amx;
}

/* Force the scalar path (0), the AVX2 path (1) or AVX2 + the AVX512-BF16 GEMM (2), each only if
 * the CPU has it (else the best one below it); returns the ISA in use. */
int fp8_set_isa(int isa) {
    ensure_init();
    g_isa = (isa >= 2 && cpu_has_avx512_bf16()) ? 2 : (isa >= 1 && cpu_has_avx2()) ? 1 : 0;
    return g_isa;
}

int fp8_get_isa(void) {
    ensure_init();
    return g_isa;
}

/* ------------------------------------------------------------------ quantize */
static float amax_scalar(const void *x, int dt, int64_t i0, int64_t n) {
    float m = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        float a = fabsf(load_hp(x, dt, i0 + j));
        if (a < INFINITY && a > m) m = a;
    }
    return m;
}

static void quant_row_scalar(const void *x, int dt, int64_t i0, int64_t n, float s, int kind, uint8_t *q) {
    const float big = fp8_max_of(kind);
    for (int64_t j = 0; j < n; j++) q[j] = quant1(load_hp(x, dt, i0 + j), s, big, kind);
}

/* Scalar twin of quant_slab_avx2. */
static void quant_slab_scalar(const void *x, int dt, int64_t R, int64_t C, int64_t b, int64_t r0, int64_t r1,
                              int64_t bc, int kind, int ue8m0, uint8_t *q, float *scale_row) {
    for (int64_t c0 = 0, cb = 0; c0 < C; c0 += bc, cb++) {
        const int64_t n = c0 + bc < C ? bc : C - c0;
        float amax = 0.0f;
        for (int64_t r = r0; r < r1; r++) {
            float a = amax_scalar(x, dt, (b * R + r) * C + c0, n);
            amax = a > amax ? a : amax;
        }
        const float s = block_scale(amax, kind, ue8m0);
        scale_row[cb] = s;
        for (int64_t r = r0; r < r1; r++) {
            const int64_t i0 = (b * R + r) * C + c0;
            quant_row_scalar(x, dt, i0, n, s, kind, q + i0);
        }
    }
}

/* Tasks one quant_claim slot can describe (front and back are 32-bit). */
#define QUANT_SLOT_TASKS ((int64_t)1 << 31)

/* x [B, R, C] (dtype dt) -> q [B, R, C] fp8 bytes, scale [B, cdiv(R, br), cdiv(C, bc)] float32.
 * One slab of br rows (all its column blocks) per task; each thread starts on one contiguous share
 * of the tasks (every block's work is the same, so even shares are even work) and the AVX2 walk
 * takes a delayed thread's last tasks over (quant_claim): a 1 x 128 grid has one task per row, so
 * per-task cost stays off the 128-element blocks, and the walk pipelines its passes across the
 * slabs it takes (quant_tasks_avx2). */
void fp8_quantize(const void *x, int dt, int64_t B, int64_t R, int64_t C, int64_t br, int64_t bc, int kind,
                  int ue8m0, uint8_t *q, float *scale, int nthreads) {
    ensure_init();
    const int64_t RB = cdiv64(R, br), CB = cdiv64(C, bc), tasks = B * RB;
    const int isa = g_isa;
    const int par = tasks > 1 && B * R * C >= PAR_MIN;
    uint64_t *slots = NULL; /* shared slots; without them (a huge grid, no memory) no task moves */
    if (isa && par && nthreads > 1 && tasks < QUANT_SLOT_TASKS)
        slots = aligned_alloc(64, (size_t)nthreads * QUANT_SLOT_STRIDE * sizeof(uint64_t));
#pragma omp parallel num_threads(nthreads) if (par)
    {
        const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t t0 = tasks * id / nt, t1 = tasks * (id + 1) / nt;
#if FP8_HAVE_X86
        if (isa && slots) {
            __atomic_store_n(&slots[id * QUANT_SLOT_STRIDE], ((uint64_t)t0 << 32) | (uint64_t)t1, __ATOMIC_RELAXED);
#pragma omp barrier /* every share is in its slot before any thread looks for more */
            const quant_claim c = {slots, id, nt, 0};
            quant_tasks_avx2_any(x, dt, R, C, br, bc, kind, ue8m0, q, scale, &c);
        } else if (isa) {
            for (int64_t p0 = t0; p0 < t1; p0 += QUANT_SLOT_TASKS - 1) { /* the own share, no stealing */
                uint64_t own = (uint64_t)((t1 - p0 < QUANT_SLOT_TASKS - 1) ? t1 - p0 : QUANT_SLOT_TASKS - 1);
                const quant_claim c = {&own, 0, 1, p0};
                quant_tasks_avx2_any(x, dt, R, C, br, bc, kind, ue8m0, q, scale, &c);
            }
        } else
#endif
        {
            for (int64_t t = t0; t < t1; t++) {
                const int64_t b = t / RB, r0 = (t % RB) * br, r1 = r0 + br < R ? r0 + br : R;
                quant_slab_scalar(x, dt, R, C, b, r0, r1, bc, kind, ue8m0, q, scale + t * CB);
            }
        }
    }
    free(slots);
}

/* ------------------------------------------------------------------ dequantize */
/* q[0 : n] * s -> out[o0 : o0 + n] (dtype dt), each product rounded once in fp32. */
#if FP8_HAVE_BF16
BF16_FN static int64_t dequant_row_avx512(const uint8_t *q, int kind, float s, int64_t n, void *out, int dt,
                                          int64_t o0);
#endif
static void dequant_seg(const uint8_t *q, int kind, float s, int64_t n, void *out, int dt, int64_t o0,
                        int isa) {
    const float *table = kind == KIND_E4M3 ? g_e4m3 : g_e5m2;
    int64_t j = 0;
#if FP8_HAVE_BF16
    if (isa == 2 && dt != DT_F16) j = dequant_row_avx512(q, kind, s, n, out, dt, o0);
#endif
#if FP8_HAVE_X86
    if (isa) j += dequant_row_avx2(q + j, kind, s, n - j, out, dt, o0 + j);
#else
    (void)isa;
#endif
    for (; j < n; j++) store_hp(out, dt, o0 + j, table[q[j]] * s);
}

/* q [B, R, C] fp8 bytes, scale [B, cdiv(R, br), cdiv(C, bc)] -> out [B, R, C] (dtype dt). */
void fp8_dequantize(const uint8_t *q, int kind, const float *scale, int64_t B, int64_t R, int64_t C,
                    int64_t br, int64_t bc, void *out, int dt, int nthreads) {
    ensure_init();
    const int64_t RB = cdiv64(R, br), CB = cdiv64(C, bc), rows = B * R;
    const int isa = g_isa;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 16) if (rows > 1 && rows * C >= PAR_MIN)
    for (int64_t row = 0; row < rows; row++) {
        const int64_t b = row / R, r = row % R;
        const float *srow = scale + (b * RB + r / br) * CB;
        for (int64_t cb = 0; cb < CB; cb++) {
            const int64_t c0 = cb * bc, n = (c0 + bc < C ? c0 + bc : C) - c0;
            dequant_seg(q + row * C + c0, kind, srow[cb], n, out, dt, row * C + c0, isa);
        }
    }
}

/* ------------------------------------------------------------------ fused small-M GEMM */
#define NR 4    /* weight rows per tile: 4 x 2 accumulators + 4 weight + 2 x registers of 16 */
#define KC 512  /* K per widened chunk: NR x KC fp32 = 8 KB, stays in L1; a multiple of every bk */

/* Widen rows [n0, n0 + NR) x [k0, k0 + klen) of w times their block scales into buf [NR, KC] fp32,
 * zero beyond the weight and up to kpad (rows past N are zero: their outputs are discarded). */
static void widen_tile(const uint8_t *w, int kind, const float *ws, int64_t N, int64_t K, int64_t bn,
                       int64_t bk, int64_t n0, int64_t k0, int64_t klen, int64_t kpad, float *buf, int isa) {
    const int64_t KB = cdiv64(K, bk);
    for (int r = 0; r < NR; r++) {
        float *dst = buf + r * KC;
        const int64_t n = n0 + r;
        if (n >= N) {
            memset(dst, 0, sizeof(float) * kpad);
            continue;
        }
        for (int64_t k = k0; k < k0 + klen;) {
            const int64_t end = (k / bk + 1) * bk < k0 + klen ? (k / bk + 1) * bk : k0 + klen;
            dequant_seg(w + n * K + k, kind, ws[(n / bn) * KB + k / bk], end - k, dst, DT_F32, k - k0, isa);
            k = end;
        }
        for (int64_t k = klen; k < kpad; k++) dst[k] = 0.0f;
    }
}

/* acc [M, NR] (+)= x rows [0, M) x [k0, k0 + klen) . the NR widened rows in buf */
static void tile_scalar(const float *x, int64_t M, int64_t K, int64_t k0, int64_t klen, const float *buf,
                        float *acc, int first) {
    for (int64_t m = 0; m < M; m++) {
        for (int r = 0; r < NR; r++) {
            float a = 0.0f;
            for (int64_t k = 0; k < klen; k++) a += x[m * K + k0 + k] * buf[r * KC + k];
            acc[m * NR + r] = first ? a : acc[m * NR + r] + a;
        }
    }
}

#if FP8_HAVE_X86
/* widen_tile in one AVX2 function (no call per block): 16 elements per step, the block scale
 * folded into the fp16 -> fp32 factor (2**8 for e4m3) unless that product overflows. */
AVX2_FN static void widen_tile_avx2(const uint8_t *w, int kind, const float *ws, int64_t N, int64_t K,
                                    int64_t bn, int64_t bk, int64_t n0, int64_t k0, int64_t klen,
                                    int64_t kpad, float *buf) {
    const int64_t KB = cdiv64(K, bk);
    const float *table = kind == KIND_E4M3 ? g_e4m3 : g_e5m2;
    for (int r = 0; r < NR; r++) {
        float *dst = buf + r * KC;
        const int64_t n = n0 + r;
        if (n >= N) {
            memset(dst, 0, sizeof(float) * kpad);
            continue;
        }
        const uint8_t *row = w + n * K;
        const float *srow = ws + (n / bn) * KB;
        for (int64_t k = k0; k < k0 + klen;) {
            const int64_t end = (k / bk + 1) * bk < k0 + klen ? (k / bk + 1) * bk : k0 + klen;
            const float s = srow[k / bk];
            const float f = kind == KIND_E4M3 ? s * 256.0f : s;
            int64_t j = k;
            if (!isinf(f) || isinf(s)) {
                const __m256 vf = _mm256_set1_ps(f);
                for (; j + 16 <= end; j += 16) {
                    __m256i u = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(row + j)));
                    __m256i h;
                    if (kind == KIND_E4M3) {
                        __m256i mag = _mm256_and_si256(u, _mm256_set1_epi16(0x7F));
                        h = _mm256_or_si256(
                            _mm256_slli_epi16(mag, 7),
                            _mm256_slli_epi16(_mm256_and_si256(u, _mm256_set1_epi16(0x80)), 8));
                        __m256i nan = _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7F));
                        h = _mm256_or_si256(h, _mm256_and_si256(nan, _mm256_set1_epi16(0x7E00)));
                    } else {
                        h = _mm256_slli_epi16(u, 8);
                    }
                    __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
                    __m256 hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
                    _mm256_store_ps(dst + (j - k0), _mm256_mul_ps(lo, vf));
                    _mm256_store_ps(dst + (j - k0) + 8, _mm256_mul_ps(hi, vf));
                }
            }
            for (; j < end; j++) dst[j - k0] = table[row[j]] * s;
            k = end;
        }
        for (int64_t k = klen; k < kpad; k++) dst[k] = 0.0f;
    }
}

AVX2_FN static inline __m256 load_tail8(const float *p, int64_t n) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), idx));
}

/* x rows [m, m + MR) x [k0, k0 + klen) against the 4 widened rows in buf; kpad - klen < 8 and
 * buf is zero there, so the last step loads x with a mask instead of reading past the row. */
#define TILE_STEP(MR, LOADX)                                                                        \
    {                                                                                               \
        __m256 w0 = _mm256_load_ps(buf + k), w1 = _mm256_load_ps(buf + KC + k);                    \
        __m256 w2 = _mm256_load_ps(buf + 2 * KC + k), w3 = _mm256_load_ps(buf + 3 * KC + k);       \
        for (int i = 0; i < MR; i++) {                                                              \
            __m256 v = LOADX;                                                                       \
            a[0][i] = _mm256_fmadd_ps(w0, v, a[0][i]), a[1][i] = _mm256_fmadd_ps(w1, v, a[1][i]);   \
            a[2][i] = _mm256_fmadd_ps(w2, v, a[2][i]), a[3][i] = _mm256_fmadd_ps(w3, v, a[3][i]);   \
        }                                                                                           \
    }

#define TILE_MR(MR)                                                                                 \
    AVX2_FN static void tile_mr##MR(const float *x, int64_t K, int64_t k0, int64_t klen, const float *buf, \
                                    float *acc, int64_t m, int first) {                              \
        __m256 a[NR][MR];                                                                           \
        for (int r = 0; r < NR; r++)                                                                \
            for (int i = 0; i < MR; i++) a[r][i] = _mm256_setzero_ps();                             \
        const float *xr = x + m * K + k0;                                                           \
        int64_t k = 0;                                                                              \
        for (; k + 8 <= klen; k += 8) TILE_STEP(MR, _mm256_loadu_ps(xr + i * K + k))               \
        if (k < klen) TILE_STEP(MR, load_tail8(xr + i * K + k, klen - k))                           \
        for (int i = 0; i < MR; i++)                                                                \
            for (int r = 0; r < NR; r++) {                                                          \
                float *out = acc + (m + i) * NR + r, v = hsum8(a[r][i]);                            \
                *out = first ? v : *out + v;                                                        \
            }                                                                                       \
    }
TILE_MR(1)
TILE_MR(2)

/* M = 1 (decode): no widened buffer. Each 16-element step widens ROWS weight rows in registers
 * and multiplies them with x; the block scale (times 2**8 for e4m3) is applied once per block
 * and row to the block's partial sum, so the scale costs nothing per element.
 *
 * e4m3 takes 3 integer ops per 16 codes instead of 8 (callgrind, N = 512, K = 4096, one thread:
 * see docs/cpu.md): sign-extending the byte to 16 bits puts copies of the sign in bits 8-15, a
 * shift by 7 moves the magnitude into the fp16 exponent/mantissa (value * 2**-8, subnormals
 * included) and the sign to bit 15, and clearing bit 14 (the other copy of the sign) gives the
 * same fp16 bits as widen16. Only a nan code (s.1111.111) comes out wrong (a finite 1.875), so
 * each row's block is checked for one (one and + one unsigned max per 32 codes); a block that
 * holds a nan is summed again with widen16's exact widening, so every result is bit for bit the
 * same as with widen16, in the same summation order. */
AVX2_FN static ALWAYS_INLINE __m256i e4m3_h_nonan(const uint8_t *p) {
    const __m256i u = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    return _mm256_and_si256(_mm256_slli_epi16(u, 7), _mm256_set1_epi16((short)0xBFFF));
}

AVX2_FN static ALWAYS_INLINE __m256i fp8_h_exact(const uint8_t *p, const int kind) {
    const __m256i u = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    if (kind != KIND_E4M3) return _mm256_slli_epi16(u, 8);
    const __m256i mag = _mm256_and_si256(u, _mm256_set1_epi16(0x7F));
    const __m256i h = _mm256_or_si256(_mm256_slli_epi16(mag, 7),
                                      _mm256_slli_epi16(_mm256_and_si256(u, _mm256_set1_epi16(0x80)), 8));
    const __m256i nan = _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7F));
    return _mm256_or_si256(h, _mm256_and_si256(nan, _mm256_set1_epi16(0x7E00)));
}

AVX2_FN static ALWAYS_INLINE __m256 fma_h(__m256i h, __m256 x0, __m256 x1, __m256 acc) {
    acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(h)), x0, acc);
    return _mm256_fmadd_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)), x1, acc);
}

static int has_nan_e4m3(const uint8_t *p, int64_t n) {
    for (int64_t j = 0; j < n; j++)
        if ((p[j] & 0x7F) == 0x7F) return 1;
    return 0;
}

/* The partial sum of one row over [c0, end16) (a multiple of 16 long) with the exact widening. */
AVX2_FN static __m256 gemv_part_exact(const float *x, const uint8_t *row, const int kind, int64_t c0,
                                      int64_t end16) {
    __m256 part = _mm256_setzero_ps();
    for (int64_t k = c0; k < end16; k += 16)
        part = fma_h(fp8_h_exact(row + k, kind), _mm256_loadu_ps(x + k), _mm256_loadu_ps(x + k + 8), part);
    return part;
}

/* Block kb ([c0, end) of K) of ROWS rows: total[r] += (partial sum * unit) * scale, and the codes
 * past the block's last multiple of 16 go to tail[r] in scalar code. FULL: the block is bk long
 * and bk a multiple of 32 (every block but a ragged last one): no remainder code in the loop. */
AVX2_FN static ALWAYS_INLINE void gemv_block(const float *x, const uint8_t *const *row, const float *const *srow,
                                             const int kind, int64_t kb, int64_t c0, int64_t end, const int FULL,
                                             const int ROWS, __m256 *total, float *tail) {
    const float *table = kind == KIND_E4M3 ? g_e4m3 : g_e5m2;
    const __m256 unit = _mm256_set1_ps(kind == KIND_E4M3 ? 256.0f : 1.0f);
    const __m256i low7 = _mm256_set1_epi8(0x7F);
    const int64_t end16 = FULL ? end : c0 + ((end - c0) & ~(int64_t)15);
    __m256 part[4];
    __m256i big = _mm256_setzero_si256(); /* e4m3: lane-wise max of the magnitudes of all ROWS rows */
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++) part[r] = _mm256_setzero_ps();
    int64_t k = c0;
    if (kind == KIND_E4M3) {
        for (; k + 32 <= end16; k += 32) {
            const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
            const __m256 x2 = _mm256_loadu_ps(x + k + 16), x3 = _mm256_loadu_ps(x + k + 24);
#pragma GCC unroll 4
            for (int r = 0; r < ROWS; r++) {
                const __m256i b = _mm256_loadu_si256((const __m256i *)(row[r] + k));
                big = _mm256_max_epu8(big, _mm256_and_si256(b, low7));
                part[r] = fma_h(e4m3_h_nonan(row[r] + k), x0, x1, part[r]);
                part[r] = fma_h(e4m3_h_nonan(row[r] + k + 16), x2, x3, part[r]);
            }
        }
        if (!FULL && k < end16) { /* 16 more (a ragged last block) */
            const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
            for (int r = 0; r < ROWS; r++) {
                const __m128i b = _mm_and_si128(_mm_loadu_si128((const __m128i *)(row[r] + k)), _mm256_castsi256_si128(low7));
                big = _mm256_max_epu8(big, _mm256_zextsi128_si256(b));
                part[r] = fma_h(e4m3_h_nonan(row[r] + k), x0, x1, part[r]);
            }
            k += 16;
        }
        if (_mm256_movemask_epi8(_mm256_cmpeq_epi8(big, low7))) /* a nan code in one of the rows */
            for (int r = 0; r < ROWS; r++)
                if (has_nan_e4m3(row[r] + c0, end16 - c0)) part[r] = gemv_part_exact(x, row[r], KIND_E4M3, c0, end16);
    } else {
        for (; k < end16; k += 16) {
            const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
#pragma GCC unroll 4
            for (int r = 0; r < ROWS; r++) part[r] = fma_h(fp8_h_exact(row[r] + k, kind), x0, x1, part[r]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; r++) {
        const float s = srow[r][kb];
        total[r] = _mm256_fmadd_ps(_mm256_mul_ps(part[r], unit), _mm256_set1_ps(s), total[r]);
        float t = 0.0f; /* added even when empty: 0 * an inf or nan scale is nan, as before */
        if (!FULL)
            for (int64_t j = k; j < end; j++) t += table[row[r][j]] * x[j];
        tail[r] += t * s;
    }
}

AVX2_FN static ALWAYS_INLINE void gemv_rows(const float *x, const uint8_t *w, const int kind, const float *ws,
                                            int64_t K, int64_t bn, int64_t bk, int64_t n0, const int ROWS,
                                            float *out) {
    const int64_t KB = cdiv64(K, bk), full = bk % 32 == 0 ? K / bk : 0;
    const uint8_t *row[4];
    const float *srow[4];
    __m256 total[4];
    float tail[4];
    for (int r = 0; r < ROWS; r++) {
        row[r] = w + (n0 + r) * K, srow[r] = ws + ((n0 + r) / bn) * KB;
        total[r] = _mm256_setzero_ps(), tail[r] = 0.0f;
    }
    for (int64_t kb = 0; kb < full; kb++) gemv_block(x, row, srow, kind, kb, kb * bk, kb * bk + bk, 1, ROWS, total, tail);
    for (int64_t kb = full; kb < KB; kb++)
        gemv_block(x, row, srow, kind, kb, kb * bk, kb * bk + bk < K ? kb * bk + bk : K, 0, ROWS, total, tail);
    for (int r = 0; r < ROWS; r++) out[r] = hsum8(total[r]) + tail[r];
}

/* One instance per fp8 format: the format is a constant inside the loops. */
#define GEMV_TILE(NAME, KIND)                                                                          \
    AVX2_FN static void NAME(const float *x, const uint8_t *w, const float *ws, int64_t N, int64_t K,  \
                             int64_t bn, int64_t bk, int64_t n0, float *acc) {                         \
        if (n0 + NR <= N) {                                                                            \
            gemv_rows(x, w, KIND, ws, K, bn, bk, n0, NR, acc);                                         \
            return;                                                                                    \
        }                                                                                              \
        for (int64_t n = n0; n < N; n++) gemv_rows(x, w, KIND, ws, K, bn, bk, n, 1, acc + (n - n0));   \
    }
GEMV_TILE(gemv_tile_e4m3, KIND_E4M3)
GEMV_TILE(gemv_tile_e5m2, KIND_E5M2)
#undef GEMV_TILE

AVX2_FN static void gemv_tile_avx2(const float *x, const uint8_t *w, int kind, const float *ws, int64_t N,
                                   int64_t K, int64_t bn, int64_t bk, int64_t n0, float *acc) {
    if (kind == KIND_E4M3) gemv_tile_e4m3(x, w, ws, N, K, bn, bk, n0, acc);
    else gemv_tile_e5m2(x, w, ws, N, K, bn, bk, n0, acc);
}

/* fp8_overflow_edge's scan, 8 lanes at a time: max of the bits of |f[i]| (nan -> 0) into *m over
 * the first multiple of 8 of n; returns how many elements it covered. */
AVX2_FN static int64_t absbits_max_avx2(const uint32_t *f, int64_t n, uint32_t *m) {
    const __m256i mag = _mm256_set1_epi32(0x7FFFFFFF), inf = _mm256_set1_epi32(0x7F800000);
    __m256i acc = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i b = _mm256_and_si256(_mm256_loadu_si256((const __m256i *)(f + i)), mag);
        acc = _mm256_max_epi32(acc, _mm256_andnot_si256(_mm256_cmpgt_epi32(b, inf), b));
    }
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, acc);
    for (int j = 0; j < 8; j++) *m = lanes[j] > *m ? lanes[j] : *m;
    return i;
}

AVX2_FN static void tile_avx2(const float *x, int64_t M, int64_t K, int64_t k0, int64_t klen,
                              const float *buf, float *acc, int first) {
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) tile_mr2(x, K, k0, klen, buf, acc, m, first);
    if (m < M) tile_mr1(x, K, k0, klen, buf, acc, m, first);
}
#endif

/* The activation as the float32 [M, K] operand of the product, row m (into out[0, K)):
 *   xdt 0/1/2 (fp32/bf16/fp16), dynamic = 0: converted (W8A16);
 *   xdt 0/1/2, dynamic = 1: quantized to e4m3 in 1 x bk groups (fp32 scales) and dequantized,
 *                           bit for bit reference.quantize then q * scale (W8A8 dynamic);
 *   xdt 3/4 (e4m3/e5m2 bytes) with xs [M, cdiv(K, bk)]: q * scale (W8A8 with fp8 x). */
static void prepare_row(const void *x, int xdt, const float *xs, int dynamic, int64_t m, int64_t K,
                        int64_t bk, float *out, int isa) {
    const int64_t KB = cdiv64(K, bk);
    for (int64_t kb = 0; kb < KB; kb++) {
        const int64_t c0 = kb * bk, n = (c0 + bk < K ? c0 + bk : K) - c0, i0 = m * K + c0;
        if (xdt >= 3) {
            dequant_seg((const uint8_t *)x + i0, xdt - 3, xs[m * KB + kb], n, out, DT_F32, c0, isa);
        } else if (dynamic) {
            uint8_t q[512];
#if FP8_HAVE_X86
            float s;
            if (isa) {
                s = dyn_quant_seg_avx2(x, xdt, i0, n, q);
            } else {
                s = block_scale(amax_scalar(x, xdt, i0, n), 0, 0);
                quant_row_scalar(x, xdt, i0, n, s, KIND_E4M3, q);
            }
#else
            const float s = block_scale(amax_scalar(x, xdt, i0, n), 0, 0);
            quant_row_scalar(x, xdt, i0, n, s, KIND_E4M3, q);
#endif
            dequant_seg(q, KIND_E4M3, s, n, out, DT_F32, c0, isa);
        } else {
            for (int64_t j = 0; j < n; j++) out[c0 + j] = load_hp(x, xdt, i0 + j);
        }
    }
}

/* ------------------------------------------------------------- errors and the fp32 edge */
/* Return codes of fp8_gemm / fp8_gemm_grouped (0 = done); cpu.py turns them into exceptions or
 * the reference's order of scaling. */
#define FP8_ERR_NOMEM 1 /* a scratch buffer could not be allocated: nothing was written */
#define FP8_EDGE 2      /* fp8_overflow_edge said 1: nothing was written */

/* 1 when this product is at fp32's overflow edge, where the order of applying the scales decides
 * between a finite result, inf and nan, so that only the reference's order (each K block's partial
 * sum of quantized products times x_scale, then times w_scale: reference.blockwise_matmul) gives
 * the contract's result; 0 when every order gives it up to rounding. a [na] (dtype adt): the
 * activation as the kernels multiply it (dequantized; an inf in it counts as the edge, a nan does
 * not: it propagates in every order), xs [nxs] (or NULL) and ws [nws] float32 scales (a
 * non-finite one counts), K the reduction length, kind the weight's fp8 format. Every
 * intermediate of either order is at most K * fp8_max(kind) * max|a| * max(max|ws|, 1): below
 * 2^124 nothing overflows (2^4 of headroom for rounding). One O(na + nxs + nws) pass, over a
 * in parallel when it is large. */
/* max over i < n of the bits of |f[i]| with nan counted as 0 (bits above inf's). */
static uint32_t absbits_max(const uint32_t *f, int64_t n, int isa) {
    uint32_t m = 0;
    int64_t i = 0;
#if FP8_HAVE_X86
    if (isa) i = absbits_max_avx2(f, n, &m);
#else
    (void)isa;
#endif
    for (; i < n; i++) {
        uint32_t b = f[i] & 0x7FFFFFFFu;
        b = b > 0x7F800000u ? 0 : b;
        m = b > m ? b : m;
    }
    return m;
}

int fp8_overflow_edge(const void *a, int adt, int64_t na, const float *xs, int64_t nxs, const float *ws,
                      int64_t nws, int64_t K, int kind, int nthreads) {
    ensure_init();
    const int isa = g_isa;
    /* On the bits of |v|: a nan activation counts as 0, a nan scale (bits above inf's) as inf. */
    uint32_t am = 0, wm = 0, sm = 0;
    if (adt == DT_F32 && nthreads > 1 && na >= PAR_MIN) {
        const int64_t chunk = 1 << 16;
#pragma omp parallel for num_threads(nthreads) reduction(max : am) schedule(static)
        for (int64_t c = 0; c < na; c += chunk) {
            const uint32_t b = absbits_max((const uint32_t *)a + c, na - c < chunk ? na - c : chunk, isa);
            am = b > am ? b : am;
        }
    } else if (adt == DT_F32) {
        am = absbits_max((const uint32_t *)a, na, isa);
    } else {
        for (int64_t i = 0; i < na; i++) {
            uint32_t b = f2u(load_hp(a, adt, i)) & 0x7FFFFFFFu;
            b = b > 0x7F800000u ? 0 : b;
            am = b > am ? b : am;
        }
    }
    const uint32_t *xb = (const uint32_t *)xs, *wb = (const uint32_t *)ws;
    for (int64_t i = 0; xs && i < nxs; i++) {
        const uint32_t b = xb[i] & 0x7FFFFFFFu;
        sm = b > sm ? b : sm;
    }
    for (int64_t i = 0; i < nws; i++) {
        const uint32_t b = wb[i] & 0x7FFFFFFFu;
        wm = b > wm ? b : wm;
    }
    if (sm >= 0x7F800000u || wm >= 0x7F800000u) return 1; /* a non-finite scale */
    const float w1 = u2f(wm) > 1.0f ? u2f(wm) : 1.0f;
    return !((double)K * fp8_max_of(kind) * u2f(am) * w1 < 0x1p124);
}

/* xf [M, K] float32 from x (see prepare_row), rows in parallel: the activation of the panel path. */
void fp8_prepare_x(const void *x, int xdt, const float *xs, int dynamic, int64_t M, int64_t K, int64_t bk,
                   float *xf, int nthreads) {
    ensure_init();
    const int isa = g_isa;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 4) if (M > 1 && M * K >= PAR_MIN)
    for (int64_t m = 0; m < M; m++) prepare_row(x, xdt, xs, dynamic, m, K, bk, xf + m * K, isa);
}

/* acc[M, NR] = the product of xf rows [0, M) with weight rows [n0, n0 + NR) (fewer at the edge):
 * the work of one tile of fp8_gemm / fp8_gemm_grouped. buf: NR x KC floats of scratch. */
static void gemm_tile(const float *xf, int64_t M, int64_t K, const uint8_t *w, int kind, const float *ws,
                      int64_t N, int64_t bn, int64_t bk, int64_t n0, float *acc, float *buf, int isa) {
#if FP8_HAVE_X86
    if (isa && M == 1) {
        gemv_tile_avx2(xf, w, kind, ws, N, K, bn, bk, n0, acc);
        return;
    }
#endif
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t klen = K - k0 < KC ? K - k0 : KC, kpad = (klen + 7) / 8 * 8;
#if FP8_HAVE_X86
        if (isa) {
            widen_tile_avx2(w, kind, ws, N, K, bn, bk, n0, k0, klen, kpad, buf);
            tile_avx2(xf, M, K, k0, klen, buf, acc, k0 == 0);
            continue;
        }
#endif
        widen_tile(w, kind, ws, N, K, bn, bk, n0, k0, klen, kpad, buf, 0);
        tile_scalar(xf, M, K, k0, klen, buf, acc, k0 == 0);
    }
}

/* y[m, n0 + r] = acc[m, r] (+ bias[n0 + r]) for the tile's rows, in y's dtype (y has N columns). */
static void store_tile(const float *acc, int64_t M, int64_t N, int64_t n0, const void *bias, int bias_dt,
                       void *y, int ydt) {
    for (int r = 0; r < NR && n0 + r < N; r++) {
        const float b = bias ? load_hp(bias, bias_dt, n0 + r) : 0.0f;
        for (int64_t m = 0; m < M; m++)
            store_hp(y, ydt, m * N + n0 + r, bias ? acc[m * NR + r] + b : acc[m * NR + r]);
    }
}

/* ------------------------------------------------------- the AVX512-BF16 fused GEMM (ISA 2) */
/* torch's bf16 GEMM runs vdpbf16ps (32 bf16 products per instruction into 16 fp32 lanes), ~2x its
 * fp32 GEMM on AVX512-BF16 CPUs; the fused GEMM above multiplies in AVX2 fp32. This one multiplies
 * bf16 operands that are EXACT, so its only rounding is fp32 accumulation, as the reference's:
 *   weight: fp8 codes widened to bf16 (e4m3 / e5m2 fit bf16's 8-bit significand and exponent
 *     range, subnormals included: they become normal bf16 values, which vdpbf16ps's DAZ keeps;
 *     nan / inf codes stay nan / inf), the block scale applied per K block to the partial sum;
 *   activation (bf16_prepare): W8A16 bf16 x as it is; W8A8 the e4m3 codes of the dynamic
 *     quantization (or fp8 x's codes) widened the same way, with their 1 x bk scale applied per K
 *     block, so y = sum_kb ((sum_k xq * wq) * xs) * ws, the reference's order of scaling.
 * Anything else (fp32 / fp16 x under W8A16: not exact in bf16) stays on the fp32 kernels.
 * vdpbf16ps flushes denormal inputs and results: fp8 codes never make one (the smallest product of
 * two codes is 2^-32), and a W8A16 bf16 x with a nonzero |x| below 2^-100 is sent to the fp32
 * kernels (BF16_NOT_EXACT): above it every product, and every partial sum (a multiple of
 * 2^-123), is 0 or a normal fp32 value. */
#define BF16_NOT_EXACT 3 /* internal: the caller takes the fp32 kernels */

/* bf16 bits of |code| for the 128 magnitudes of each fp8 format (the sign is bit 7 -> bit 15). */
static uint16_t g_bf16_tab[2][128] __attribute__((aligned(64)));

/* The same e4m3 values as byte tables for gemv_bf16_rows' vpermi2b: [0, 128) the high bytes of the
 * magnitudes' bf16 bits, [128, 256) the low bytes. */
static uint8_t g_e4m3_bf16_bytes[256] __attribute__((aligned(64)));

static void init_bf16_tables(void) {
    for (int u = 0; u < 128; u++) {
        g_bf16_tab[KIND_E4M3][u] = f32_to_bf16(g_e4m3[u]);
        g_bf16_tab[KIND_E5M2][u] = f32_to_bf16(g_e5m2[u]);
        g_e4m3_bf16_bytes[u] = (uint8_t)(g_bf16_tab[KIND_E4M3][u] >> 8);
        g_e4m3_bf16_bytes[128 + u] = (uint8_t)g_bf16_tab[KIND_E4M3][u];
    }
}

/* Whether a one-row product (M = 1, or a one-row group) of ISA 2 runs gemv_bf16_rows. */
static int bf16_gemv_applies(int kind, int64_t bk) { return g_vbmi && kind == KIND_E4M3 && bk % 64 == 0; }

/* xp [cdiv(K, 64) * 64] = x [K] (bf16 bits) in e4m3_bf16x64's order, zero past K: in each chunk of
 * 64, first the elements 16L + j, then 16L + 8 + j (L = 0..3, j = 0..7). */
static void bf16_x_permute(const uint16_t *x, int64_t K, uint16_t *xp) {
    for (int64_t c = 0; c < K; c += 64)
        for (int half = 0; half < 2; half++)
            for (int L = 0; L < 4; L++)
                for (int j = 0; j < 8; j++) {
                    const int64_t k = c + 16 * L + 8 * half + j;
                    xp[c + 32 * half + 8 * L + j] = k < K ? x[k] : 0;
                }
}

#if FP8_HAVE_BF16
typedef struct {
    __m512i t0, t1, t2, t3; /* magnitudes 0-31, 32-63, 64-95, 96-127 */
} bf16_table;

BF16_FN static ALWAYS_INLINE bf16_table bf16_table_of(int kind) {
    const uint16_t *t = g_bf16_tab[kind];
    bf16_table r = {_mm512_load_si512(t), _mm512_load_si512(t + 32), _mm512_load_si512(t + 64),
                    _mm512_load_si512(t + 96)};
    return r;
}

/* 32 fp8 codes (the bytes in b's 16-bit lanes, sign-extended) -> 32 bf16 values exactly: two
 * 64-entry word permutes look the magnitude up (index bits 0-5; bit 6 picks the result), one
 * ternary logic ORs the sign (bit 15 of the sign-extended byte). 6 instructions per 32 codes
 * where widening to fp32 through fp16 takes ~14 per 16. */
BF16_FN static ALWAYS_INLINE __m512i bf16_from_codes(__m512i s, const bf16_table *t) {
    const __m512i lo = _mm512_permutex2var_epi16(t->t0, s, t->t1);
    const __m512i hi = _mm512_permutex2var_epi16(t->t2, s, t->t3);
    const __m512i r = _mm512_mask_blend_epi16(_mm512_test_epi16_mask(s, _mm512_set1_epi16(0x40)), lo, hi);
    return _mm512_ternarylogic_epi32(r, s, _mm512_set1_epi32((int)0x80008000u), 0xF8); /* r | (s & sign) */
}

/* dequant_seg's AVX-512 part on ISA 2 (fp32 / bf16 out): q[0 : n] * s -> out[o0 : o0 + n], 32 per
 * step, returns how many were done. The exact bf16 code becomes its fp32 value with a shift, one
 * fp32 multiply rounds, then c10's round to nearest even in integer ops (and a nan becomes c10's
 * 0x7FC0): the AVX2 and scalar results bit for bit (up to a fp32 nan's payload), with ~1/3 of
 * their instructions. */
BF16_FN static int64_t dequant_row_avx512(const uint8_t *q, int kind, float s, int64_t n, void *out, int dt,
                                          int64_t o0) {
    const bf16_table t = bf16_table_of(kind);
    const __m512 vs = _mm512_set1_ps(s);
    const __m512i odd_words = _mm512_set_epi16(63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33, 31, 29,
                                               27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
        const __m512i b = bf16_from_codes(_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(q + j))), &t);
        const __m512 lo = _mm512_mul_ps(
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(b)), 16)), vs);
        const __m512 hi = _mm512_mul_ps(
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(b, 1)), 16)), vs);
        if (dt == DT_F32) {
            _mm512_storeu_ps((float *)out + o0 + j, lo);
            _mm512_storeu_ps((float *)out + o0 + j + 16, hi);
        } else { /* integer rounding (vcvtne2ps2bf16 would flush denormal products to 0) */
            const __mmask32 nan = (__mmask32)_mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q) |
                                  ((__mmask32)_mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q) << 16);
            const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
            const __m512i bl = _mm512_castps_si512(lo), bh = _mm512_castps_si512(hi);
            const __m512i rl = _mm512_add_epi32(bl, _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bl, 16), one), half));
            const __m512i rh = _mm512_add_epi32(bh, _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bh, 16), one), half));
            __m512i r = _mm512_permutex2var_epi16(rl, odd_words, rh); /* the high half of each lane, in order */
            r = _mm512_mask_mov_epi16(r, nan, _mm512_set1_epi16(0x7FC0));
            _mm512_storeu_si512((uint16_t *)out + o0 + j, r);
        }
    }
    return j;
}

/* codes p[0 : n] -> bf16 out[0 : n] (n <= 32 per masked step). */
BF16_FN static ALWAYS_INLINE void bf16_widen(const uint8_t *p, int64_t n, const bf16_table *t, uint16_t *out) {
    int64_t j = 0;
    for (; j + 32 <= n; j += 32)
        _mm512_storeu_si512(out + j, bf16_from_codes(_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + j))), t));
    if (j < n) {
        const __mmask32 m = (__mmask32)((1ull << (n - j)) - 1);
        const __m512i s = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, p + j));
        _mm512_mask_storeu_epi16(out + j, m, bf16_from_codes(s, t));
    }
}

/* NR weight rows [n0, n0 + NR) x [k0, k0 + klen) widened into buf [NR, KC] bf16, zero up to kpad
 * (a multiple of 32) and in rows past N. */
BF16_FN static void bf16_widen_tile(const uint8_t *w, const bf16_table *t, int64_t N, int64_t K, int64_t n0,
                                    int64_t k0, int64_t klen, int64_t kpad, uint16_t *buf) {
    for (int r = 0; r < NR; r++) {
        uint16_t *dst = buf + r * KC;
        if (n0 + r >= N) {
            memset(dst, 0, 2 * kpad);
            continue;
        }
        bf16_widen(w + (n0 + r) * K + k0, klen, t, dst);
        if (kpad > klen) memset(dst + klen, 0, 2 * (kpad - klen));
    }
}

/* tot[i][r] (16 fp32 lanes each) += the K blocks of chunk [k0, k0 + klen) of x rows [m, m + MR)
 * (bf16, K columns; masked past K) against the NR widened rows in buf, each block's partial sum
 * times its scales: ((part * xs[m, kb]) fused-multiply-added with ws[n, kb]) with xs (W8A8), or
 * part fused with ws (W8A16, xs NULL). bk is a multiple of 32 and divides KC (128/256/512, MX 32). */
#define BF16_TILE_MR(MR)                                                                                      \
    BF16_FN static void bf16_tile_mr##MR(const uint16_t *x, const float *xs, int64_t K, int64_t KB, int64_t bk,  \
                                         int64_t k0, int64_t klen, const uint16_t *buf, const float *const *srow, \
                                         int64_t m, __m512 *tot) {                                               \
        __m512 t[MR][NR];                                                                                     \
        for (int i = 0; i < MR; i++)                                                                          \
            for (int r = 0; r < NR; r++) t[i][r] = tot[(m + i) * NR + r];                                     \
        for (int64_t c0 = 0; c0 < klen; c0 += bk) {                                                           \
            const int64_t c1 = c0 + bk < klen ? c0 + bk : klen, kb = (k0 + c0) / bk;                          \
            __m512 p[MR][NR];                                                                                 \
            for (int i = 0; i < MR; i++)                                                                      \
                for (int r = 0; r < NR; r++) p[i][r] = _mm512_setzero_ps();                                   \
            for (int64_t k = c0; k < c1; k += 32) {                                                           \
                const __mmask32 mk = c1 - k >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (c1 - k)) - 1); \
                __m512i wv[NR];                                                                               \
                for (int r = 0; r < NR; r++) wv[r] = _mm512_load_si512(buf + r * KC + k);                     \
                for (int i = 0; i < MR; i++) {                                                                \
                    const __m512i xv = _mm512_maskz_loadu_epi16(mk, x + (m + i) * K + k0 + k);                \
                    for (int r = 0; r < NR; r++)                                                              \
                        p[i][r] = _mm512_dpbf16_ps(p[i][r], (__m512bh)xv, (__m512bh)wv[r]);                   \
                }                                                                                             \
            }                                                                                                 \
            for (int r = 0; r < NR; r++) {                                                                    \
                const __m512 s = _mm512_set1_ps(srow[r][kb]);                                                 \
                for (int i = 0; i < MR; i++) {                                                                \
                    const __m512 q = xs ? _mm512_mul_ps(p[i][r], _mm512_set1_ps(xs[(m + i) * KB + kb])) : p[i][r]; \
                    t[i][r] = _mm512_fmadd_ps(q, s, t[i][r]);                                                 \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
        for (int i = 0; i < MR; i++)                                                                          \
            for (int r = 0; r < NR; r++) tot[(m + i) * NR + r] = t[i][r];                                     \
    }
BF16_TILE_MR(1)
BF16_TILE_MR(2)
#undef BF16_TILE_MR

/* acc[M, NR] = the product of x rows [0, M) (bf16, with xs [M, KB] or NULL) with weight rows
 * [n0, n0 + NR): bf16_widen_tile + bf16_tile_mr per KC chunk. buf: NR x KC bf16, tot: M x NR
 * vectors of scratch. */
BF16_FN static void bf16_gemm_tile(const uint16_t *x, const float *xs, int64_t M, int64_t K, const uint8_t *w,
                                   int kind, const float *ws, int64_t N, int64_t bn, int64_t bk, int64_t n0,
                                   float *acc, uint16_t *buf, __m512 *tot) {
    const int64_t KB = cdiv64(K, bk);
    const bf16_table t = bf16_table_of(kind);
    const float *srow[NR];
    for (int r = 0; r < NR; r++) srow[r] = ws + ((n0 + r < N ? n0 + r : N - 1) / bn) * KB; /* rows past N: 0 */
    for (int64_t i = 0; i < M * NR; i++) tot[i] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
        const int64_t klen = K - k0 < KC ? K - k0 : KC, kpad = (klen + 31) / 32 * 32;
        bf16_widen_tile(w, &t, N, K, n0, k0, klen, kpad, buf);
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) bf16_tile_mr2(x, xs, K, KB, bk, k0, klen, buf, srow, m, tot);
        if (m < M) bf16_tile_mr1(x, xs, K, KB, bk, k0, klen, buf, srow, m, tot);
    }
    for (int64_t i = 0; i < M * NR; i++) acc[i] = _mm512_reduce_add_ps(tot[i]);
}

/* ------------------------------------------- the packed AVX512-BF16 GEMM (ISA 2, multi-row groups) */
/* bf16_gemm_tile keeps 16 K lanes per (row, weight row) and reduces them at the end: 6 vector loads
 * per 8 vdpbf16ps and a horizontal sum per output, 77-85 GFLOP/s on one Zen 4 thread for 128-row
 * groups of 2048 x 768 where torch's bf16 GEMM runs 170-200. From PACK_MIN_ROWS rows a group takes the outer-product
 * form of torch's GEMMs instead: a panel of PN weight rows x one K block is widened to bf16 and
 * packed as k-pairs ([pair][PN][2], bf16_pack_panel: 16 x 16 transposes of 32-bit pairs), and each
 * register block of PMR x rows x PN columns takes 4 panel vectors and PMR broadcast x pairs per
 * 4 * PMR vdpbf16ps (24 accumulators). The operands are bf16_gemm_tile's (exact bf16 values of
 * the codes and of the activation), the scaling too: each K block's partial sum q of (row, column)
 * becomes tot = fma(q * xs[m, kb], ws[n / bn, kb], tot) (W8A16: fma(q, ws, tot)), tot kept in a
 * per-task [rows, PN] float32 buffer. Only the order of the fp32 sums inside a K block differs. */
#define PN 64        /* weight rows (output columns) per panel: 4 vectors of 16 */
#define PMR 6        /* x rows per register block */
#ifndef PMC
#define PMC 192      /* x rows per task (its tot: PMC x PN float32 = 48 KB) */
#endif
#ifndef PKC
#define PKC 1024     /* K per packed panel part: PKC x PN bf16 = 128 KB (L2) */
#endif
#ifndef PACK_MIN_ROWS
#define PACK_MIN_ROWS 16
#endif
#ifndef AMX_MIN_ROWS
#define AMX_MIN_ROWS 2
#endif

/* Rows r0..r15 (16 x 32-bit lanes each) -> columns: out[c] lane r = in[r] lane c. */
BF16_FN static ALWAYS_INLINE void transpose16_epi32(__m512i *r) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int a = 0; a < 4; a++) { /* u[4a + j], lane L: rows 4a..4a+3 of column 4L + j */
        u[4 * a + 0] = _mm512_unpacklo_epi64(t[4 * a], t[4 * a + 2]);
        u[4 * a + 1] = _mm512_unpackhi_epi64(t[4 * a], t[4 * a + 2]);
        u[4 * a + 2] = _mm512_unpacklo_epi64(t[4 * a + 1], t[4 * a + 3]);
        u[4 * a + 3] = _mm512_unpackhi_epi64(t[4 * a + 1], t[4 * a + 3]);
    }
    for (int j = 0; j < 4; j++) {
        const __m512i a01 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44), a23 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
        const __m512i b01 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
        const __m512i b23 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
        r[j] = _mm512_shuffle_i32x4(a01, b01, 0x88);
        r[4 + j] = _mm512_shuffle_i32x4(a01, b01, 0xDD);
        r[8 + j] = _mm512_shuffle_i32x4(a23, b23, 0x88);
        r[12 + j] = _mm512_shuffle_i32x4(a23, b23, 0xDD);
    }
}

/* panel [cdiv(blen, 32) * 16 pairs][PN] (32-bit: the bf16 values of w[n, k0 + 2p] low, w[n, k0 + 2p + 1]
 * high, n = n0 + column) from weight rows [n0, n0 + PN) x [k0, k0 + blen); zeros past N and past
 * blen. rowbuf: 16 x bk bf16 of scratch. */
BF16_FN static void bf16_pack_panel(const uint8_t *w, const bf16_table *t, int64_t N, int64_t K, int64_t n0,
                                    int64_t k0, int64_t blen, uint16_t *rowbuf, uint32_t *panel) {
    const int64_t bpad = (blen + 31) / 32 * 32; /* <= bk */
    for (int64_t g = 0; g < PN; g += 16) {
        for (int r = 0; r < 16; r++) {
            uint16_t *dst = rowbuf + r * bpad;
            if (n0 + g + r >= N) {
                memset(dst, 0, 2 * bpad);
                continue;
            }
            bf16_widen(w + (n0 + g + r) * K + k0, blen, t, dst);
            if (bpad > blen) memset(dst + blen, 0, 2 * (bpad - blen));
        }
        for (int64_t q = 0; q < bpad; q += 32) { /* pairs q / 2 .. q / 2 + 15 */
            __m512i v[16];
            for (int r = 0; r < 16; r++) v[r] = _mm512_loadu_si512(rowbuf + r * bpad + q);
            transpose16_epi32(v);
            for (int c = 0; c < 16; c++) _mm512_store_si512(panel + (q / 2 + c) * PN + g, v[c]);
        }
    }
}

/* tot[i, 0 : PN] (+)= the K block [k0, k0 + blen) of x rows i < MR (bf16, row stride K) against the
 * packed panel: ((sum) * xs[i * KB]) fused-multiply-added with sv (W8A16: xs NULL, sum with sv). */
#define BF16_PACKED_MR(MR)                                                                                  \
    BF16_FN static void bf16_packed_mr##MR(const uint16_t *x, int64_t K, int64_t k0, int64_t blen,           \
                                           const uint32_t *panel, const float *xs, int64_t KB, const __m512 *sv, \
                                           float *tot) {                                                    \
        __m512 a[MR][4];                                                                                    \
        for (int i = 0; i < MR; i++)                                                                        \
            for (int c = 0; c < 4; c++) a[i][c] = _mm512_setzero_ps();                                      \
        const int64_t np = blen / 2;                                                                        \
        const uint16_t *xr = x + k0;                                                                        \
        for (int64_t p = 0; p < np; p++) {                                                                  \
            const uint32_t *pp = panel + p * PN;                                                            \
            const __m512bh w0 = (__m512bh)_mm512_load_si512(pp), w1 = (__m512bh)_mm512_load_si512(pp + 16);  \
            const __m512bh w2 = (__m512bh)_mm512_load_si512(pp + 32), w3 = (__m512bh)_mm512_load_si512(pp + 48); \
            for (int i = 0; i < MR; i++) {                                                                  \
                int32_t v;                                                                                  \
                memcpy(&v, xr + i * K + 2 * p, 4);                                                          \
                const __m512bh b = (__m512bh)_mm512_set1_epi32(v);                                          \
                a[i][0] = _mm512_dpbf16_ps(a[i][0], b, w0);                                                 \
                a[i][1] = _mm512_dpbf16_ps(a[i][1], b, w1);                                                 \
                a[i][2] = _mm512_dpbf16_ps(a[i][2], b, w2);                                                 \
                a[i][3] = _mm512_dpbf16_ps(a[i][3], b, w3);                                                 \
            }                                                                                               \
        }                                                                                                   \
        if (blen & 1) { /* the last k alone: its pair's high half is 0 in the panel, and x's is not read */ \
            const uint32_t *pp = panel + np * PN;                                                           \
            for (int i = 0; i < MR; i++) {                                                                  \
                const __m512bh b = (__m512bh)_mm512_set1_epi32((int32_t)xr[i * K + 2 * np]);                \
                for (int c = 0; c < 4; c++)                                                                 \
                    a[i][c] = _mm512_dpbf16_ps(a[i][c], b, (__m512bh)_mm512_load_si512(pp + 16 * c));       \
            }                                                                                               \
        }                                                                                                   \
        for (int i = 0; i < MR; i++) {                                                                      \
            const __m512 s = _mm512_set1_ps(xs ? xs[i * KB] : 1.0f);                                        \
            for (int c = 0; c < 4; c++) {                                                                   \
                const __m512 q = xs ? _mm512_mul_ps(a[i][c], s) : a[i][c];                                  \
                _mm512_store_ps(tot + i * PN + 16 * c, _mm512_fmadd_ps(q, sv[c], _mm512_load_ps(tot + i * PN + 16 * c))); \
            }                                                                                               \
        }                                                                                                   \
    }
BF16_PACKED_MR(1)
BF16_PACKED_MR(2)
BF16_PACKED_MR(3)
BF16_PACKED_MR(4)
BF16_PACKED_MR(5)
BF16_PACKED_MR(6)
#undef BF16_PACKED_MR

typedef void (*bf16_packed_fn)(const uint16_t *, int64_t, int64_t, int64_t, const uint32_t *, const float *, int64_t,
                               const __m512 *, float *);
static const bf16_packed_fn bf16_packed_mr[PMR + 1] = {NULL, bf16_packed_mr1, bf16_packed_mr2, bf16_packed_mr3,
                                                       bf16_packed_mr4, bf16_packed_mr5, bf16_packed_mr6};

/* y[m, n0 : n0 + PN) (columns below N) = tot[m] (+ bias) in y's dtype for rows m < M (y: N columns);
 * bf16 rounds as f32_to_bf16 (nan -> 0x7FC0), fp16 as F16C (= f32_to_f16). */
BF16_FN static void bf16_packed_store(const float *tot, int64_t M, int64_t N, int64_t n0, const float *bias64,
                                      void *y, int ydt) {
    const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
    for (int c = 0; c < 4; c++) {
        const int64_t left = N - n0 - 16 * c;
        if (left <= 0) break;
        const __mmask16 mk = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        const __m512 b = bias64 ? _mm512_load_ps(bias64 + 16 * c) : _mm512_setzero_ps();
        for (int64_t m = 0; m < M; m++) {
            __m512 v = _mm512_load_ps(tot + m * PN + 16 * c);
            if (bias64) v = _mm512_add_ps(v, b);
            const int64_t o = m * N + n0 + 16 * c;
            if (ydt == DT_F32) {
                _mm512_mask_storeu_ps((float *)y + o, mk, v);
            } else if (ydt == DT_BF16) {
                const __m512i bits = _mm512_castps_si512(v);
                const __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(bits, 16), one), half));
                __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
                h = _mm256_mask_mov_epi16(h, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm256_set1_epi16(0x7FC0));
                _mm256_mask_storeu_epi16((uint16_t *)y + o, mk, h);
            } else {
                _mm256_mask_storeu_epi16((uint16_t *)y + o, mk, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            }
        }
    }
}

/* bf16_pack_panel for e4m3 codes on a CPU with AVX512-VBMI (bf16_gemv_applies): defined with the
 * GEMV, whose byte look-ups it shares. */
BF16V_FN static void bf16_pack_panel_vbmi(const uint8_t *w, int64_t N, int64_t K, int64_t n0, int64_t k0, int64_t blen,
                                          uint32_t *panel);

/* The codes a task packs or widens next, prefetched into L2 a few lines at a time while the current
 * part computes (the weight's first reads are DRAM latencies, PN row segments at stride K; one
 * burst of all of them overruns the miss queue): row `row` from byte `at`, rows at stride K, bytes
 * [k0, k1) of each, `left` lines to go, `step` lines per prefetch_some. */
typedef struct {
    const uint8_t *w;
    int64_t K, row, at, k0, k1, left, step;
} part_prefetch;

/* The plan after widening / packing K blocks [kb0, kb0 + nkb) of the panel at row n0: the next part
 * of the same panel, or after the last part the first part of the panel at row next_n0 (none past
 * N), spread over `calls` calls of prefetch_some. */
static part_prefetch next_part_prefetch(const uint8_t *w, int64_t N, int64_t K, int64_t bk, int64_t KB, int64_t PKB,
                                        int64_t kb0, int64_t nkb, int64_t n0, int64_t next_n0, int64_t calls) {
    const int64_t pk0 = kb0 + nkb < KB ? (kb0 + nkb) * bk : 0, pn0 = kb0 + nkb < KB ? n0 : next_n0;
    const int64_t pk1 = pk0 + PKB * bk < K ? pk0 + PKB * bk : K, plines = cdiv64(pk1 - pk0, 64);
    const int64_t plast = (N - pn0 < PN ? (N - pn0 > 0 ? N - pn0 : 0) : PN) * plines;
    const part_prefetch p = {w, K, pn0, pk0, pk0, pk1, plast, cdiv64(plast, calls)};
    return p;
}

static ALWAYS_INLINE void prefetch_some(part_prefetch *p) {
    for (int64_t e = 0; e < p->step && p->left > 0; e++, p->left--) {
        _mm_prefetch((const char *)(p->w + p->row * p->K + p->at), _MM_HINT_T1);
        if ((p->at += 64) >= p->k1) p->at = p->k0, p->row++;
    }
}

/* bf16_run's groups of PACK_MIN_ROWS rows or more: (group, PMC-row chunk, PN-column panel) tasks in
 * one parallel region; each y element has one owner, computed the same whichever thread runs it.
 * A task packs its panel PKB K blocks at a time (<= 128 KB: L2) and runs every register block of
 * its rows over those blocks, so a register block's tot rows (1.5 KB) stay in L1 from one K block to
 * the next. While a part computes, the codes of the next one are prefetched into L2, spread over
 * its register blocks (the weight's first reads are DRAM latencies: PN rows at stride K); the
 * packing of each block prefetches the block after it. 183 GFLOP/s for 128-row groups of a 1536 x 2048
 * weight on one Zen 4 thread, prefetches in one burst (the inner loop alone: 222; packing was ~10%
 * of the time, the rest tot updates and stores); spread, 5% less time in the MoE block. */
BF16_FN static int bf16_run_packed(const uint16_t *xb, const float *xsc, int64_t L, const int64_t *gid,
                                   const int64_t *x_row, const int64_t *y_row, const int64_t *rows, const uint8_t *w,
                                   int kind, const float *ws, int64_t N, int64_t K, int64_t bn, int64_t bk,
                                   const void *bias, int bias_dt, void *y, int ydt, int nthreads) {
    const int64_t panels = cdiv64(N, PN), KB = cdiv64(K, bk), PKB = PKC / bk > 1 ? PKC / bk : 1;
    const int64_t w_step = N * K, ws_step = cdiv64(N, bn) * KB, ysize = ydt == DT_F32 ? 4 : 2;
    int64_t *first = (int64_t *)malloc(sizeof(int64_t) * (L + 1)); /* first row chunk of each group */
    if (first == NULL) return FP8_ERR_NOMEM;
    first[0] = 0;
    for (int64_t i = 0; i < L; i++) first[i + 1] = first[i] + cdiv64(rows[i], PMC);
    const int64_t tasks = first[L] * panels;
    const int nt = nthreads > 0 ? nthreads : 1;
    /* per thread: tot [PMC][PN] float32, panel [PKB][bk / 2][PN] uint32, rowbuf [16][bk] bf16,
     * bias [PN] float32, scales [PKB][4] vectors (bk is a multiple of 32: every part 64-byte aligned) */
    const size_t per = (size_t)PMC * PN * 4 + (size_t)PKB * bk / 2 * PN * 4 + (size_t)16 * bk * 2 + PN * 4 +
                       (size_t)PKB * 4 * sizeof(__m512);
    char *scratch = (char *)aligned_alloc(64, per * nt);
    if (scratch == NULL) {
        free(first);
        return FP8_ERR_NOMEM;
    }
    const bf16_table tab = bf16_table_of(kind);
    const int vbmi = bf16_gemv_applies(kind, bk); /* bk % 64 == 0: a padded block fits its panel part */
#pragma omp parallel num_threads(nthreads) if (tasks > 1)
    {
#ifdef _OPENMP
        char *mine = scratch + per * omp_get_thread_num();
#else
        char *mine = scratch;
#endif
        float *tot = (float *)mine;
        uint32_t *panel = (uint32_t *)(mine + (size_t)PMC * PN * 4);
        uint16_t *rowbuf = (uint16_t *)((char *)panel + (size_t)PKB * bk / 2 * PN * 4);
        float *bias64 = (float *)((char *)rowbuf + (size_t)16 * bk * 2);
        __m512 *sv = (__m512 *)((char *)bias64 + PN * 4);
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t blk = t / panels, n0 = (t % panels) * PN;
            const int64_t i = group_of(first, L, blk), g = gid[i], r0 = (blk - first[i]) * PMC;
            const int64_t nr = rows[i] - r0 < PMC ? rows[i] - r0 : PMC, xr = x_row[i] + r0;
            const uint8_t *wg = w + g * w_step;
            const float *wsg = ws + g * ws_step;
            memset(tot, 0, sizeof(float) * nr * PN);
            for (int64_t kb0 = 0; kb0 < KB; kb0 += PKB) {
                const int64_t nkb = KB - kb0 < PKB ? KB - kb0 : PKB;
                for (int64_t j = 0; j < nkb; j++) {
                    const int64_t k0 = (kb0 + j) * bk, blen = K - k0 < bk ? K - k0 : bk;
                    for (int64_t r = n0; r < n0 + PN && r < N; r++) /* the block after this one, while it packs */
                        for (int64_t c = k0 + blen; c < k0 + 2 * blen && c < K; c += 64)
                            _mm_prefetch((const char *)(wg + r * K + c), _MM_HINT_T0);
                    if (vbmi) bf16_pack_panel_vbmi(wg, N, K, n0, k0, blen, panel + j * (bk / 2) * PN);
                    else bf16_pack_panel(wg, &tab, N, K, n0, k0, blen, rowbuf, panel + j * (bk / 2) * PN);
                    for (int c = 0; c < 4; c++) {
                        float s[16];
                        for (int l = 0; l < 16; l++) {
                            const int64_t n = n0 + 16 * c + l < N ? n0 + 16 * c + l : N - 1;
                            s[l] = wsg[(n / bn) * KB + kb0 + j];
                        }
                        sv[4 * j + c] = _mm512_loadu_ps(s);
                    }
                }
                /* The codes the next part (or the next panel's first) will pack, a few lines before
                 * each register block. */
                part_prefetch pf = next_part_prefetch(wg, N, K, bk, KB, PKB, kb0, nkb, n0, n0 + PN, cdiv64(nr, PMR) * nkb);
                for (int64_t m = 0; m < nr; m += PMR) {
                    const int64_t mr = nr - m < PMR ? nr - m : PMR;
                    for (int64_t j = 0; j < nkb; j++) {
                        prefetch_some(&pf);
                        const int64_t k0 = (kb0 + j) * bk, blen = K - k0 < bk ? K - k0 : bk;
                        bf16_packed_mr[mr](xb + (xr + m) * K, K, k0, blen, panel + j * (bk / 2) * PN,
                                           xsc ? xsc + (xr + m) * KB + kb0 + j : NULL, KB, sv + 4 * j, tot + m * PN);
                    }
                }
            }
            if (bias)
                for (int c = 0; c < PN; c++) bias64[c] = n0 + c < N ? load_hp(bias, bias_dt, n0 + c) : 0.0f;
            bf16_packed_store(tot, nr, N, n0, bias ? bias64 : NULL, (char *)y + (y_row[i] + r0) * N * ysize, ydt);
        }
    }
    free(first);
    free(scratch);
    return 0;
}

/* One pass over a bf16 x [n]: 1 when it has a nonzero |x| below 2^-100 (see the section comment),
 * and *top = the largest |x| as float32 bits, a nan counted as 0 (fp8_overflow_edge's rule). */
BF16_FN static int bf16_scan(const uint16_t *x, int64_t n, uint32_t *top) {
    const __m512i mag = _mm512_set1_epi16(0x7FFF), lim = _mm512_set1_epi16(27 << 7), inf = _mm512_set1_epi16(0x7F80);
    __m512i big = _mm512_setzero_si512();
    __mmask32 any = 0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m512i a = _mm512_and_si512(_mm512_loadu_si512(x + i), mag);
        any |= _mm512_mask_cmplt_epu16_mask(_mm512_test_epi16_mask(a, a), a, lim);
        big = _mm512_mask_max_epu16(big, _mm512_cmple_epu16_mask(a, inf), big, a);
    }
    uint16_t lanes[32], m = 0;
    _mm512_storeu_si512(lanes, big);
    for (int j = 0; j < 32; j++) m = lanes[j] > m ? lanes[j] : m;
    for (; i < n; i++) {
        const uint16_t a = x[i] & 0x7FFF;
        any |= a && a < (27 << 7);
        m = a <= 0x7F80 && a > m ? a : m;
    }
    *top = (uint32_t)m << 16;
    return any != 0;
}

/* The activation of the bf16 kernels from x (as fp8_gemm takes it, M x K): *xb bf16 [M, K] (x
 * itself for W8A16 bf16 x, else the thread's SCRATCH_X array in *own) and *xsc [M, KB] float32
 * (NULL for W8A16; fp8 x's own xs, or the dynamic quantization's scales, also in *own). Then the fp32
 * overflow edge on the activation as the fp32 kernels would see it: max over K blocks of
 * |xq|max * |xs| equals max |xq * xs| (rounding is monotonic), so the decision is theirs.
 * Returns 0, FP8_ERR_NOMEM, FP8_EDGE or BF16_NOT_EXACT (nothing allocated is left behind
 * except on 0, where the caller hands *own back: scratch_done). From PAR_MIN elements on nthreads threads (rows, or
 * 64K-element chunks of the scan; only max / or reductions, so the same result): the W8A8
 * quantization of a 512-token MoE block's 4096 x 2048 rows is 4.5 ms of one thread. */
BF16_FN static int bf16_prepare(const void *x, int xdt, const float *xs, int dynamic, int64_t M, int64_t K,
                                int64_t bk, int kind, const float *ws, int64_t nws, const uint16_t **xb,
                                const float **xsc, void **own, int nthreads) {
    const int64_t KB = cdiv64(K, bk);
    const int par = nthreads > 1 && M * K >= PAR_MIN; /* rows in parallel: the O(M K) pass before the GEMM */
    *own = NULL;
    if (xdt == DT_BF16 && !dynamic) {
        uint32_t top = 0;
        int tiny = 0;
        const int64_t chunk = 1 << 16, n = M * K;
#pragma omp parallel for num_threads(nthreads) reduction(max : top) reduction(| : tiny) schedule(static) if (par)
        for (int64_t c = 0; c < n; c += chunk) {
            uint32_t t;
            tiny |= bf16_scan((const uint16_t *)x + c, n - c < chunk ? n - c : chunk, &t);
            top = t > top ? t : top;
        }
        if (tiny) return BF16_NOT_EXACT;
        const float amax = u2f(top);
        if (fp8_overflow_edge(&amax, DT_F32, 1, NULL, 0, ws, nws, K, kind, 1)) return FP8_EDGE;
        *xb = (const uint16_t *)x, *xsc = NULL;
        return 0;
    }
    if (!dynamic && xdt < 3) return BF16_NOT_EXACT; /* W8A16 with fp32 / fp16 x */
    uint16_t *b = (uint16_t *)scratch_take(SCRATCH_X, 2 * M * K + sizeof(float) * M * KB + 64);
    if (b == NULL) return FP8_ERR_NOMEM;
    float *s = (float *)(((uintptr_t)(b + M * K) + 63) & ~(uintptr_t)63);
    uint32_t am = 0;
#pragma omp parallel for num_threads(nthreads) reduction(max : am) schedule(static) if (par)
    for (int64_t m = 0; m < M; m++) {
        for (int64_t kb = 0; kb < KB; kb++) {
            const int64_t c0 = kb * bk, n = (c0 + bk < K ? c0 + bk : K) - c0;
            uint8_t q[512];
            const uint8_t *codes = q;
            float sc;
            if (dynamic) {
                sc = dyn_quant_seg_avx2(x, xdt, m * K + c0, n, q);
            } else {
                codes = (const uint8_t *)x + m * K + c0, sc = xs[m * KB + kb];
            }
            s[m * KB + kb] = sc;
            const bf16_table t = bf16_table_of(dynamic ? KIND_E4M3 : xdt - 3);
            bf16_widen(codes, n, &t, b + m * K + c0);
            uint32_t top; /* the largest |code| of the block as float32 bits, nan as 0 */
            (void)bf16_scan(b + m * K + c0, n, &top);
            float v = u2f(top) * fabsf(sc);
            v = v != v ? 0.0f : v;
            am = f2u(v) > am ? f2u(v) : am;
        }
    }
    const float amax = u2f(am);
    if (fp8_overflow_edge(&amax, DT_F32, 1, dynamic ? NULL : xs, M * KB, ws, nws, K, kind, 1)) {
        scratch_done(SCRATCH_X, b);
        return FP8_EDGE;
    }
    *xb = b, *xsc = s, *own = b;
    return 0;
}

/* The tasks of fp8_gemm / fp8_gemm_grouped on the bf16 kernels: for each listed group i, y rows
 * [y_row[i], + rows[i]) = xb rows [x_row[i], + rows[i]) (xsc likewise) @ (w[gid[i]] * ws[gid[i]])^T
 * (+ bias). Returns 0 or FP8_ERR_NOMEM. */
/* ISA 2's one-row GEMV (M = 1, or one-row groups: decode), e4m3 weights, bk % 64 == 0, with
 * AVX512-VBMI: no widened buffer. 64 codes become 64 bf16 values (exactly, nan included) in
 * registers by two 128-entry byte lookups (vpermi2b: the high and the low byte of each value), the
 * sign OR-ed into the high byte and two byte interleaves, and two vdpbf16ps multiply them with the
 * activation: 57 instructions per 4 rows x 64 codes (0.22 per weight, objdump of the inner loop)
 * against 0.82 for the AVX2 GEMV (gemv_block) and a store + reload per code for bf16_gemm_tile.
 * The interleave leaves the values of 128-bit lane L in the order codes 16L..16L+7 (first
 * register), 16L+8..16L+15 (second), so the activation row is permuted the same way once
 * (bf16_x_permute): each product still pairs x[k] with w[n, k]. The operands and the per-block
 * scaling are bf16_gemm_tile's (exact bf16 products, fp32 sums, ((part * xs) * ws)), in another
 * summation order. */
BF16V_FN static ALWAYS_INLINE void e4m3_bf16x64(const uint8_t *p, __mmask64 lm, const __m512i *tab, __m512i *a,
                                                __m512i *b) {
    const __m512i c = _mm512_maskz_loadu_epi8(lm, p); /* lanes past K: code 0 = +0.0 */
    const __m512i hi = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(tab[0], c, tab[1]), c,
                                                 _mm512_set1_epi8((char)0x80), 0xF8); /* | the sign */
    const __m512i lo = _mm512_permutex2var_epi8(tab[2], c, tab[3]);
    *a = _mm512_unpacklo_epi8(lo, hi);
    *b = _mm512_unpackhi_epi8(lo, hi);
}

/* bf16_pack_panel's result (panel [pair][PN] of 32-bit pairs in K order, zeros past N and past blen)
 * with e4m3_bf16x64's widening: 64 codes of a row in 6 instructions, straight from the fp8 bytes,
 * into registers (no row buffer). Its order (codes 16L..16L+7 of 128-bit lane L in the first
 * register's pairs 4L..4L+3, 16L+8..16L+15 in the second's) is undone by where each transposed
 * column is stored: pair slot s of the first register is natural pair 8 (s / 4) + s % 4, of the
 * second 8 (s / 4) + 4 + s % 4. Packing 1536 x 2048 e4m3 codes: 0.6x bf16_pack_panel's shuffles. */
BF16V_FN static void bf16_pack_panel_vbmi(const uint8_t *w, int64_t N, int64_t K, int64_t n0, int64_t k0, int64_t blen,
                                          uint32_t *panel) {
    __m512i tab[4];
    for (int i = 0; i < 4; i++) tab[i] = _mm512_load_si512((const void *)(g_e4m3_bf16_bytes + 64 * i));
    for (int64_t g = 0; g < PN; g += 16) {
        for (int64_t c = 0; c < blen; c += 64) {
            const int64_t left = blen - c;
            const __mmask64 lm = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
            __m512i a[16], b[16];
            for (int r = 0; r < 16; r++) {
                if (n0 + g + r < N) e4m3_bf16x64(w + (n0 + g + r) * K + k0 + c, lm, tab, &a[r], &b[r]);
                else a[r] = b[r] = _mm512_setzero_si512();
            }
            transpose16_epi32(a);
            transpose16_epi32(b);
            uint32_t *dst = panel + (c / 2) * PN + g;
            for (int s = 0; s < 16; s++) {
                _mm512_store_si512(dst + (8 * (s / 4) + s % 4) * PN, a[s]);
                _mm512_store_si512(dst + (8 * (s / 4) + 4 + s % 4) * PN, b[s]);
            }
        }
    }
}

/* out[r] = sum over K blocks kb of ((sum_{k in kb} x[k] * w[n0 + r, k]) * xs[kb]) * ws[(n0 + r) / bn, kb]
 * for ROWS (<= 4) rows; xp the bf16 row permuted by bf16_x_permute, xs [cdiv(K, bk)] or NULL. */
BF16V_FN static ALWAYS_INLINE void gemv_bf16_rows(const uint16_t *xp, const float *xs, const uint8_t *w,
                                                  const float *ws, int64_t K, int64_t bn, int64_t bk, int64_t n0,
                                                  const int ROWS, float *out) {
    const int64_t KB = cdiv64(K, bk);
    __m512i tab[4];
    for (int i = 0; i < 4; i++) tab[i] = _mm512_load_si512((const void *)(g_e4m3_bf16_bytes + 64 * i));
    const uint8_t *row[4];
    const float *srow[4];
    __m512 total[4];
    for (int r = 0; r < ROWS; r++) {
        row[r] = w + (n0 + r) * K, srow[r] = ws + ((n0 + r) / bn) * KB;
        total[r] = _mm512_setzero_ps();
    }
    for (int64_t kb = 0; kb < KB; kb++) {
        const int64_t c0 = kb * bk, end = c0 + bk < K ? c0 + bk : K;
        __m512 part[4], part2[4];
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) part[r] = _mm512_setzero_ps(), part2[r] = _mm512_setzero_ps();
        for (int64_t k = c0; k < end; k += 64) {
            const __mmask64 lm = end - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (end - k)) - 1);
            const __m512bh xa = (__m512bh)_mm512_loadu_si512((const void *)(xp + k));
            const __m512bh xb = (__m512bh)_mm512_loadu_si512((const void *)(xp + k + 32));
#pragma GCC unroll 4
            for (int r = 0; r < ROWS; r++) {
                __m512i wa, wb;
                e4m3_bf16x64(row[r] + k, lm, tab, &wa, &wb);
                part[r] = _mm512_dpbf16_ps(part[r], (__m512bh)wa, xa);
                part2[r] = _mm512_dpbf16_ps(part2[r], (__m512bh)wb, xb);
            }
        }
#pragma GCC unroll 4
        for (int r = 0; r < ROWS; r++) {
            const __m512 sum = _mm512_add_ps(part[r], part2[r]);
            const __m512 q = xs ? _mm512_mul_ps(sum, _mm512_set1_ps(xs[kb])) : sum;
            total[r] = _mm512_fmadd_ps(q, _mm512_set1_ps(srow[r][kb]), total[r]);
        }
    }
    for (int r = 0; r < ROWS; r++) out[r] = _mm512_reduce_add_ps(total[r]);
}

BF16V_FN static void gemv_tile_bf16(const uint16_t *xp, const float *xs, const uint8_t *w, const float *ws,
                                    int64_t N, int64_t K, int64_t bn, int64_t bk, int64_t n0, float *acc) {
    if (n0 + NR <= N) {
        gemv_bf16_rows(xp, xs, w, ws, K, bn, bk, n0, NR, acc);
        return;
    }
    for (int64_t n = n0; n < N; n++) gemv_bf16_rows(xp, xs, w, ws, K, bn, bk, n, 1, acc + (n - n0));
}

/* bf16_run when every group has one row and bf16_gemv_applies: each group's activation row
 * permuted once (O(L K)), then (group, 4-row weight tile) tasks on gemv_tile_bf16. */
static int bf16_run_gemv(const uint16_t *xb, const float *xsc, int64_t L, const int64_t *gid,
                         const int64_t *x_row, const int64_t *y_row, const uint8_t *w, const float *ws, int64_t N,
                         int64_t K, int64_t bn, int64_t bk, const void *bias, int bias_dt, void *y, int ydt,
                         int nthreads) {
    const int64_t tiles = cdiv64(N, NR), tasks = L * tiles, KB = cdiv64(K, bk), K64 = cdiv64(K, 64) * 64;
    const int64_t w_step = N * K, ws_step = cdiv64(N, bn) * KB, ysize = ydt == DT_F32 ? 4 : 2;
    const int nt = nthreads > 0 ? nthreads : 1;
    uint16_t *xp = (uint16_t *)aligned_alloc(64, 2 * L * K64 + 64);
    float *accs = (float *)malloc(sizeof(float) * NR * nt);
    if (xp == NULL || accs == NULL) {
        free(xp);
        free(accs);
        return FP8_ERR_NOMEM;
    }
    for (int64_t i = 0; i < L; i++) bf16_x_permute(xb + x_row[i] * K, K, xp + i * K64);
#pragma omp parallel num_threads(nthreads) if (tasks > 1 && L * N * K >= GEMV_PAR_MIN)
    {
#ifdef _OPENMP
        float *acc = accs + NR * omp_get_thread_num();
#else
        float *acc = accs;
#endif
#pragma omp for schedule(dynamic, 8) nowait
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t i = t / tiles, n0 = (t % tiles) * NR, g = gid[i];
            gemv_tile_bf16(xp + i * K64, xsc ? xsc + x_row[i] * KB : NULL, w + g * w_step, ws + g * ws_step, N, K,
                           bn, bk, n0, acc);
            store_tile(acc, 1, N, n0, bias, bias_dt, (char *)y + y_row[i] * N * ysize, ydt);
        }
    }
    free(xp);
    free(accs);
    return 0;
}

/* bf16_run's groups of 2 .. PACK_MIN_ROWS - 1 rows (and one-row groups where the GEMV does not
 * apply): (row block, 4-row weight tile) tasks on bf16_gemm_tile. */
BF16_FN static int bf16_run_tiles(const uint16_t *xb, const float *xsc, int64_t L, const int64_t *gid,
                                  const int64_t *x_row, const int64_t *y_row, const int64_t *rows, const uint8_t *w,
                                  int kind, const float *ws, int64_t N, int64_t K, int64_t bn, int64_t bk,
                                  const void *bias, int bias_dt, void *y, int ydt, int nthreads) {
    const int64_t tiles = cdiv64(N, NR), KB = cdiv64(K, bk);
    const int64_t w_step = N * K, ws_step = cdiv64(N, bn) * KB, ysize = ydt == DT_F32 ? 4 : 2;
    /* Rows per task: every weight tile re-reads its task's x rows, so they are kept to <= 256 KB
     * of bf16 (L2); a row's result does not depend on which rows share its task. */
    const int64_t RB = (256 * 1024) / (2 * K) > 2 ? (256 * 1024) / (2 * K) : 2;
    int64_t total = 0, max_rows = 0;
    int64_t *first = (int64_t *)malloc(sizeof(int64_t) * (L + 1)); /* first row block of each group */
    if (first == NULL) return FP8_ERR_NOMEM;
    first[0] = 0;
    for (int64_t i = 0; i < L; i++) {
        total += rows[i];
        max_rows = rows[i] > max_rows ? rows[i] : max_rows;
        first[i + 1] = first[i] + cdiv64(rows[i], RB);
    }
    max_rows = max_rows < RB ? max_rows : RB;
    const int64_t tasks = first[L] * tiles;
    const int nt = nthreads > 0 ? nthreads : 1;
    float *accs = (float *)malloc(sizeof(float) * max_rows * NR * nt);
    __m512 *tots = (__m512 *)aligned_alloc(64, sizeof(__m512) * max_rows * NR * nt);
    if (accs == NULL || tots == NULL) {
        free(first);
        free(accs);
        free(tots);
        return FP8_ERR_NOMEM;
    }
#pragma omp parallel num_threads(nthreads) \
    if (tasks > 1 && (max_rows == 1 ? total * N * K >= GEMV_PAR_MIN : total * N * K >= 4 * PAR_MIN))
    {
        uint16_t buf[NR * KC] __attribute__((aligned(64)));
#ifdef _OPENMP
        const int id = omp_get_thread_num();
#else
        const int id = 0;
#endif
        float *acc = accs + max_rows * NR * id;
        __m512 *tot = tots + max_rows * NR * id;
#pragma omp for schedule(dynamic, 4) nowait
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t blk = t / tiles, n0 = (t % tiles) * NR;
            const int64_t i = group_of(first, L, blk), g = gid[i], r0 = (blk - first[i]) * RB;
            const int64_t nr = rows[i] - r0 < RB ? rows[i] - r0 : RB, xr = x_row[i] + r0;
            bf16_gemm_tile(xb + xr * K, xsc ? xsc + xr * KB : NULL, nr, K, w + g * w_step, kind, ws + g * ws_step, N,
                           bn, bk, n0, acc, buf, tot);
            store_tile(acc, nr, N, n0, bias, bias_dt, (char *)y + (y_row[i] + r0) * N * ysize, ydt);
        }
    }
    free(first);
    free(accs);
    free(tots);
    return 0;
}

/* ------------------------------------------------------ the AMX-BF16 GEMM (ISA 2 + AMX, multi-row groups)
 * On a CPU with AMX tiles (g_amx: Sapphire Rapids and later Xeons) bf16_run gives the groups of
 * AMX_MIN_ROWS (2) rows or more to amx_run instead of bf16_gemm_tile / bf16_run_packed. One tdpbf16ps multiplies a
 * 16 x 32 bf16 tile by a 16-pair x 16 x 2 bf16 tile into a 16 x 16 float32 tile: 16x the work of a
 * vdpbf16ps at a sixteenth of its issue rate. Here the WEIGHT is the first operand: a tile is 16
 * widened weight rows x 32 k, row-major as bf16_widen / e4m3_bf16x64 write them (no transpose),
 * and the activation is the second, packed once per call as k-pairs of 16 rows (amx_pack_x: [pair]
 * [16 rows] 32-bit; a group's rows are fewer than the weight's in a MoE block, 128 against 1536 at
 * 512 tokens). With VBMI and e4m3 (bf16_gemv_applies) the weight rows are widened by
 * e4m3_bf16x64 and keep its order inside each 64 k; the activation's pairs are stored in that
 * order, so each product still pairs x[k] with w[n, k]. The C tiles hold y^T: per K block they are
 * stored to a buffer and scaled into a per-task totT [PN][PMC] float32 as tot is elsewhere
 * (fma(q * xs[m, kb], ws[n / bn, kb], tot)), then transposed into y by bf16_packed_store. The
 * operands are the exact bf16 values of the other bf16 kernels, and tdpbf16ps, like vdpbf16ps,
 * reads bf16 denormals as 0 and flushes fp32 denormals (bf16_prepare's tiny check covers both), so
 * only the fp32 summation order inside a K block differs. Tiles: 0-3 C (weight rows 0-15 | 16-31 x
 * rows 0-15 | 16-31 of a 32 x 32 block), 4-5 the weight, 6-7 the activation; all 16 x 64 bytes
 * (rows past N and past a group's rows are zeros in the operands, and their results not stored). */
#if FP8_HAVE_AMX
#define AMX_MB 32 /* x rows per block (two activation tiles) */
#ifndef AMX_MS
#define AMX_MS 64 /* x rows per pass over a part's K blocks */
#endif

/* The one tile configuration: eight 16 x 64-byte tiles. Not _tile_loadconfig: gcc 12's names an
 * 8-byte operand, so the stores filling the rest of the struct may be dropped as dead. */
AMX_FN static void amx_configure(void) {
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } c;
    memset(&c, 0, sizeof(c));
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = 16;
    __asm__ volatile("ldtilecfg %0" : : "m"(c));
}

AMX_FN static void amx_release(void) { _tile_release(); }

/* Where natural pair p (0..31) of a 64-k chunk sits in the e4m3_bf16x64 order: its first register
 * holds pairs 8 (s / 4) + s % 4 in slots s = 0..15, its second 8 (s / 4) + 4 + s % 4 in 16..31. */
static inline int amx_slot(int p) { return (p % 8 < 4 ? 0 : 16) + 4 * (p / 8) + p % 4; }

/* One 16-row block of the activation: xp [KP / 2][16] 32-bit pairs (k-pair j of row r at
 * xp[j * 16 + r]; slot order amx_slot inside each 64 k where perm) from rows r < nr of xb (bf16, row
 * stride K), zeros past nr and past K (up to KP, a multiple of 64); xst [KB][16] float32 the rows'
 * scales (xsc [rows][KB], or NULL), 0 past nr. */
AMX_FN static void amx_pack_x(const uint16_t *xb, const float *xsc, int64_t nr, int64_t K, int64_t KP, int64_t KB,
                              int perm, uint32_t *xp, float *xst) {
    for (int64_t c = 0; c < KP; c += 32) {
        __m512i v[16];
        const int64_t left = K - c;
        const __mmask32 lm = left >= 32 ? ~(__mmask32)0 : left > 0 ? (((__mmask32)1 << left) - 1) : 0;
        for (int r = 0; r < 16; r++)
            v[r] = r < nr ? _mm512_maskz_loadu_epi16(lm, xb + r * K + c) : _mm512_setzero_si512();
        transpose16_epi32(v); /* v[j]: pair c / 2 + j of the 16 rows */
        for (int j = 0; j < 16; j++) {
            const int64_t p = c / 2 + j; /* natural pair */
            const int64_t at = perm ? (p / 32) * 32 + amx_slot((int)(p % 32)) : p;
            _mm512_store_si512(xp + at * 16, v[j]);
        }
    }
    if (xsc)
        for (int64_t kb = 0; kb < KB; kb++)
            for (int r = 0; r < 16; r++) xst[kb * 16 + r] = r < nr ? xsc[r * KB + kb] : 0.0f;
}

/* Weight rows [n0, n0 + PN) x K blocks [kb0, kb0 + nkb) widened to bf16 into a [nkb][PN][bkp]
 * (bkp: bk rounded up to 64 with perm, else 32), zeros past N and past each block's length; perm:
 * e4m3_bf16x64's order. Row by row, so the codes are read in memory order (PN rows of a panel are
 * one contiguous range of w); measured alone, the same time as block by block. */
AMX_FN static void amx_widen(const uint8_t *w, const bf16_table *t, int perm, int64_t N, int64_t K, int64_t bk,
                             int64_t n0, int64_t kb0, int64_t nkb, int64_t bkp, uint16_t *a) {
    __m512i tab[4];
    if (perm)
        for (int i = 0; i < 4; i++) tab[i] = _mm512_load_si512((const void *)(g_e4m3_bf16_bytes + 64 * i));
    for (int64_t r = 0; r < PN; r++)
        for (int64_t j = 0; j < nkb; j++) {
            const int64_t k0 = (kb0 + j) * bk, blen = K - k0 < bk ? K - k0 : bk;
            uint16_t *dst = a + (j * PN + r) * bkp;
            if (n0 + r >= N) {
                memset(dst, 0, 2 * bkp);
            } else if (perm) {
                for (int64_t c = 0; c < bkp; c += 64) {
                    const int64_t left = blen - c;
                    const __mmask64 lm = left >= 64 ? ~(__mmask64)0 : left > 0 ? (((__mmask64)1 << left) - 1) : 0;
                    __m512i lo, hi;
                    e4m3_bf16x64(w + (n0 + r) * K + k0 + c, lm, tab, &lo, &hi);
                    _mm512_store_si512(dst + c, lo);
                    _mm512_store_si512(dst + c + 32, hi);
                }
            } else {
                bf16_widen(w + (n0 + r) * K + k0, blen, t, dst);
                if (bkp > blen) memset(dst + blen, 0, 2 * (bkp - blen));
            }
        }
}

/* c [32][32] float32 (weight row, x row) = 32 widened weight rows a (row stride bkp) x the
 * activation blocks xp0 / xp1 (1 | 2 of them: xt) over kn k (a multiple of 32, <= bkp), issuing
 * pf's next lines at each k step. */
AMX_FN static void amx_block(const uint16_t *a, int64_t bkp, int64_t kn, const uint32_t *xp0, const uint32_t *xp1,
                             int xt, float *c, part_prefetch *pf) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < kn; k += 32) {
        prefetch_some(pf); /* a few lines per k step: a burst would hold every fill buffer */
        _tile_loadd(4, a + k, bkp * 2);
        _tile_loadd(5, a + 16 * bkp + k, bkp * 2);
        _tile_loadd(6, xp0 + (k / 2) * 16, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(2, 5, 6);
        if (xt > 1) {
            _tile_loadd(7, xp1 + (k / 2) * 16, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c, 128);
    _tile_stored(2, c + 16 * 32, 128);
    if (xt > 1) {
        _tile_stored(1, c + 16, 128);
        _tile_stored(3, c + 16 * 32 + 16, 128);
    }
}

/* totT[n][m] += (c[n][m] * xs[m]) * ws[n] (W8A16: xst NULL, c * ws) for 32 weight rows and xt x 16
 * x rows; totT's row stride PMC. */
AMX_FN static void amx_scale_add(const float *c, int xt, const float *xst, const float *wsn, float *totT) {
    const __m512 s0 = xst ? _mm512_load_ps(xst) : _mm512_setzero_ps();
    const __m512 s1 = xst && xt > 1 ? _mm512_load_ps(xst + 16) : _mm512_setzero_ps();
    for (int n = 0; n < 32; n++) {
        const __m512 wv = _mm512_set1_ps(wsn[n]);
        float *t = totT + n * PMC;
        __m512 q = _mm512_load_ps(c + n * 32);
        if (xst) q = _mm512_mul_ps(q, s0);
        _mm512_store_ps(t, _mm512_fmadd_ps(q, wv, _mm512_load_ps(t)));
        if (xt > 1) {
            q = _mm512_load_ps(c + n * 32 + 16);
            if (xst) q = _mm512_mul_ps(q, s1);
            _mm512_store_ps(t + 16, _mm512_fmadd_ps(q, wv, _mm512_load_ps(t + 16)));
        }
    }
}

/* bf16_run_packed's tasks (group, PMC-row chunk, PN-column panel) on AMX tiles, same arguments and
 * result contract; the activation of the listed groups is first packed (amx_pack_x, every
 * thread). A task widens its panel PKB K blocks at a time ([PKB][PN][bkp] bf16, L2), prefetching
 * the next part's codes as bf16_run_packed does, and runs each 32 x 32 block over those blocks. */
AMX_FN static int amx_run(const uint16_t *xb, const float *xsc, int64_t L, const int64_t *gid, const int64_t *x_row,
                          const int64_t *y_row, const int64_t *rows, const uint8_t *w, int kind, const float *ws,
                          int64_t N, int64_t K, int64_t bn, int64_t bk, const void *bias, int bias_dt, void *y,
                          int ydt, int nthreads) {
    const int perm = bf16_gemv_applies(kind, bk);
    const int64_t panels = cdiv64(N, PN), KB = cdiv64(K, bk), PKB = PKC / bk > 1 ? PKC / bk : 1;
    const int64_t bkp = perm ? cdiv64(bk, 64) * 64 : cdiv64(bk, 32) * 32, KP = cdiv64(K, 64) * 64;
    const int64_t w_step = N * K, ws_step = cdiv64(N, bn) * KB, ysize = ydt == DT_F32 ? 4 : 2;
    int64_t *first = (int64_t *)malloc(sizeof(int64_t) * 2 * (L + 1)); /* first row chunk / 16-row block */
    if (first == NULL) return FP8_ERR_NOMEM;
    int64_t *fb = first + L + 1;
    first[0] = fb[0] = 0;
    for (int64_t i = 0; i < L; i++) {
        first[i + 1] = first[i] + cdiv64(rows[i], PMC);
        fb[i + 1] = fb[i] + cdiv64(rows[i], 16);
    }
    const int64_t tasks = first[L] * panels, blocks = fb[L];
    const size_t xp_size = (size_t)blocks * (KP / 2) * 16 * 4, xs_size = xsc ? (size_t)blocks * KB * 16 * 4 : 0;
    char *xpack = (char *)scratch_take(SCRATCH_XP, xp_size + xs_size + 64);
    const int nt = nthreads > 0 ? nthreads : 1;
    /* per thread: totT [PN][PMC] float32, tot [PMC][PN] float32, a [PKB][PN][bkp] bf16, c [32][32]
     * float32, wsn [PKB][PN] float32, bias [PN] float32 (every part a multiple of 64 bytes) */
    const size_t per = (size_t)2 * PMC * PN * 4 + (size_t)PKB * PN * bkp * 2 + 32 * 32 * 4 + (size_t)PKB * PN * 4 +
                       PN * 4;
    char *scratch = (char *)aligned_alloc(64, per * nt);
    if (scratch == NULL || xpack == NULL) {
        free(first);
        free(scratch);
        scratch_done(SCRATCH_XP, xpack);
        return FP8_ERR_NOMEM;
    }
    uint32_t *xp = (uint32_t *)xpack;
    float *xst = xsc ? (float *)(xpack + xp_size) : NULL;
    const bf16_table tab = bf16_table_of(kind);
#pragma omp parallel num_threads(nthreads) if (tasks > 1)
    {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t i = group_of(fb, L, b), r0 = (b - fb[i]) * 16, nr = rows[i] - r0 < 16 ? rows[i] - r0 : 16;
            amx_pack_x(xb + (x_row[i] + r0) * K, xsc ? xsc + (x_row[i] + r0) * KB : NULL, nr, K, KP, KB, perm,
                       xp + b * (KP / 2) * 16, xst ? xst + b * KB * 16 : NULL);
        }
#ifdef _OPENMP
        char *mine = scratch + per * omp_get_thread_num();
#else
        char *mine = scratch;
#endif
        float *totT = (float *)mine, *tot = totT + PMC * PN;
        uint16_t *abuf = (uint16_t *)(tot + PMC * PN);
        float *c = (float *)(abuf + PKB * PN * bkp), *wsn = c + 32 * 32, *bias64 = wsn + PKB * PN;
#ifdef _OPENMP
        const int64_t team = omp_get_num_threads(); /* a thread's next task is about t + team */
#else
        const int64_t team = 1;
#endif
        amx_configure();
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t blk = t / panels, n0 = (t % panels) * PN;
            const int64_t i = group_of(first, L, blk), g = gid[i], r0 = (blk - first[i]) * PMC;
            const int64_t nr = rows[i] - r0 < PMC ? rows[i] - r0 : PMC, b0 = fb[i] + r0 / 16;
            const uint8_t *wg = w + g * w_step;
            const float *wsg = ws + g * ws_step;
            for (int64_t n = 0; n < PN; n++) memset(totT + n * PMC, 0, sizeof(float) * cdiv64(nr, 16) * 16);
            for (int64_t kb0 = 0; kb0 < KB; kb0 += PKB) {
                const int64_t nkb = KB - kb0 < PKB ? KB - kb0 : PKB;
                amx_widen(wg, &tab, perm, N, K, bk, n0, kb0, nkb, bkp, abuf);
                for (int64_t n = 0, sr = n0 / bn, left = bn - n0 % bn; n < PN; n++) { /* sr = (n0 + n) / bn */
                    for (int64_t j = 0; j < nkb; j++) wsn[j * PN + n] = wsg[sr * KB + kb0 + j];
                    if (--left == 0 && n0 + n + 1 < N) sr++, left = bn; /* past N: the last row's scales */
                }
                /* the next part's codes into L2, spread over the blocks (as bf16_run_packed); after
                 * the last part, the panel this thread likely takes next (dynamic schedule: tasks
                 * go out in order, so about `team` panels on; 2 threads at 512 tokens, interleaved
                 * runs: 49.7 against 51.5 ms, W8A16, and 49.3 against 51.5, W8A8) */
                const int64_t steps = cdiv64(nr, AMX_MB) * (PN / 32) * nkb * (bkp / 32); /* k steps of the part */
                part_prefetch pf = next_part_prefetch(wg, N, K, bk, KB, PKB, kb0, nkb, n0, n0 + team * PN, steps);
                for (int64_t ms = 0; ms < nr; ms += AMX_MS) /* rows ms.. in L1: their totT, a K block's */
                    for (int64_t j = 0; j < nkb; j++) {       /* weights, one 32-row x block at a time */
                        const int64_t k0 = (kb0 + j) * bk, kb = kb0 + j, blen = K - k0 < bk ? K - k0 : bk;
                        const int64_t kn = perm ? cdiv64(blen, 64) * 64 : cdiv64(blen, 32) * 32; /* <= KP - k0 */
                        for (int64_t m = ms; m < nr && m < ms + AMX_MS; m += AMX_MB) {
                            const int xt = nr - m > 16 ? 2 : 1;
                            const uint32_t *x0 = xp + (b0 + m / 16) * (KP / 2) * 16 + (k0 / 2) * 16;
                            float xs32[32] __attribute__((aligned(64)));
                            if (xst) {
                                const float *xs0 = xst + (b0 + m / 16) * KB * 16 + kb * 16;
                                memcpy(xs32, xs0, 64);
                                if (xt > 1) memcpy(xs32 + 16, xs0 + KB * 16, 64);
                            }
                            for (int64_t h = 0; h < PN; h += 32) {
                                amx_block(abuf + (j * PN + h) * bkp, bkp, kn, x0, x0 + (KP / 2) * 16, xt, c, &pf);
                                amx_scale_add(c, xt, xst ? xs32 : NULL, wsn + j * PN + h, totT + h * PMC + m);
                            }
                        }
                    }
            }
            for (int64_t m = 0; m < nr; m += 16) /* totT -> tot [rows][PN] */
                for (int64_t q = 0; q < PN; q += 16) {
                    __m512i v[16];
                    for (int r = 0; r < 16; r++) v[r] = _mm512_load_si512(totT + (q + r) * PMC + m);
                    transpose16_epi32(v);
                    for (int r = 0; r < 16 && m + r < nr; r++) _mm512_store_si512(tot + (m + r) * PN + q, v[r]);
                }
            if (bias)
                for (int64_t cc = 0; cc < PN; cc++) bias64[cc] = n0 + cc < N ? load_hp(bias, bias_dt, n0 + cc) : 0.0f;
            bf16_packed_store(tot, nr, N, n0, bias ? bias64 : NULL, (char *)y + (y_row[i] + r0) * N * ysize, ydt);
        }
        amx_release();
    }
    free(first);
    free(scratch);
    scratch_done(SCRATCH_XP, xpack);
    return 0;
}
#endif

/* Which bf16 kernel takes a group of `rows` rows (ISA 2, the kernels exact and paying: see
 * bf16_pays): BF16_GEMV (one row where bf16_gemv_applies), BF16_AMX (AMX_MIN_ROWS rows or more
 * where g_amx and bk % 32 == 0: 0.94-0.32x the tiles kernel's time at 2-16 rows, never above 1.02x
 * for dense products; see the AMX section), BF16_PACKED (PACK_MIN_ROWS rows or more), else
 * BF16_TILES (bf16_gemm_tile). Packed / tiles CPU time, groups of W8A16 bf16 x on one Zen 4
 * thread, weights from DRAM (32 groups of 2048 x 768, 16 of 1536 x 2048): 12 rows 0.95 / 1.10,
 * 16 rows 0.87 / 1.02, 24 rows 0.82 / 0.95, 32 rows 0.68 / 0.88, 64 rows 0.63 / 0.80. The one
 * rule of bf16_run, and of fp8_bf16_kernel for Python. */
#define BF16_GEMV 1
#define BF16_TILES 2
#define BF16_PACKED 3
#define BF16_AMX 4
static int bf16_kernel_of(int64_t rows, int kind, int64_t bk) {
    if (rows == 1 && bf16_gemv_applies(kind, bk)) return BF16_GEMV;
    if (FP8_HAVE_AMX && g_amx && bk % 32 == 0 && rows >= AMX_MIN_ROWS) return BF16_AMX;
    return rows < PACK_MIN_ROWS ? BF16_TILES : BF16_PACKED;
}

/* The bf16 kernels' tasks for the listed groups (y rows [y_row[i], + rows[i]) = xb rows [x_row[i],
 * + rows[i]) (xsc likewise) @ (w[gid[i]] * ws[gid[i]])^T (+ bias)), each group on its kernel
 * (bf16_kernel_of). Returns 0 or FP8_ERR_NOMEM. */
BF16_FN static int bf16_run(const uint16_t *xb, const float *xsc, int64_t L, const int64_t *gid,
                            const int64_t *x_row, const int64_t *y_row, const int64_t *rows, const uint8_t *w,
                            int kind, const float *ws, int64_t N, int64_t K, int64_t bn, int64_t bk,
                            const void *bias, int bias_dt, void *y, int ydt, int nthreads) {
    int64_t count[4] = {0, 0, 0, 0}; /* GEMV, tiles, packed, AMX */
    for (int64_t i = 0; i < L; i++) count[bf16_kernel_of(rows[i], kind, bk) - 1]++;
    if (count[0] == L)
        return bf16_run_gemv(xb, xsc, L, gid, x_row, y_row, w, ws, N, K, bn, bk, bias, bias_dt, y, ydt, nthreads);
    if (count[1] == L)
        return bf16_run_tiles(xb, xsc, L, gid, x_row, y_row, rows, w, kind, ws, N, K, bn, bk, bias, bias_dt, y, ydt,
                              nthreads);
    if (count[2] == L)
        return bf16_run_packed(xb, xsc, L, gid, x_row, y_row, rows, w, kind, ws, N, K, bn, bk, bias, bias_dt, y, ydt,
                               nthreads);
#if FP8_HAVE_AMX
    if (count[3] == L)
        return amx_run(xb, xsc, L, gid, x_row, y_row, rows, w, kind, ws, N, K, bn, bk, bias, bias_dt, y, ydt, nthreads);
#endif
    int64_t *a = (int64_t *)malloc(sizeof(int64_t) * 4 * L), at[4];
    if (a == NULL) return FP8_ERR_NOMEM;
    at[0] = 0, at[1] = count[0], at[2] = count[0] + count[1], at[3] = at[2] + count[2];
    int64_t *g2 = a, *x2 = a + L, *y2 = a + 2 * L, *r2 = a + 3 * L; /* the groups, class by class */
    for (int64_t i = 0; i < L; i++) {
        const int64_t j = at[bf16_kernel_of(rows[i], kind, bk) - 1]++;
        g2[j] = gid[i], x2[j] = x_row[i], y2[j] = y_row[i], r2[j] = rows[i];
    }
    int rc = 0;
    int64_t o = 0;
    for (int c = 0; c < 4 && rc == 0; o += count[c], c++)
        if (count[c])
            rc = bf16_run(xb, xsc, count[c], g2 + o, x2 + o, y2 + o, r2 + o, w, kind, ws, N, K, bn, bk, bias, bias_dt,
                          y, ydt, nthreads);
    free(a);
    return rc;
}
#endif

/* Whether the bf16 kernels beat the AVX2 ones for M rows of an N x K weight: always from M = 2
 * (half the CPU time at N = K = 4096, M = 4-48); at M = 1 where the one-row GEMV applies
 * (bf16_gemv_applies: 0.58-0.69x bf16 F.linear's time at SmolLM2's shapes against 0.91-1.20x for
 * the AVX2 GEMV, docs/cpu.md), else only from GEMV_PAR_MIN weights up (bf16_gemm_tile's widened
 * buffer against the AVX2 GEMV, which widens in registers: median us on one Zen 4 thread through
 * the op, W8A16 bf16 x, AVX2 / bf16: 4096 x 4096 2522 / 2065, 1536 x 576 126 / 114, but 576 x 576
 * 54 / 57 and 192 x 576 27 / 34, W8A8 46 / 62 and 22 / 34). Never for a bk the bf16 kernels do
 * not tile: a multiple of 32 (vector-aligned blocks) that divides KC or that KC divides (a K block
 * inside one widened chunk, or whole chunks). The op's blocks (128 / 256 / 512, MX 32) all are;
 * the C functions take any bk, and the fp32 kernels the rest. */
static int bf16_pays(int64_t M, int64_t N, int64_t K, int kind, int64_t bk) {
    if (bk % 32 != 0 || (KC % bk != 0 && bk % KC != 0)) return 0; /* bf16_gemm_tile's K blocks (see above) */
    return M > 1 || N * K >= GEMV_PAR_MIN || bf16_gemv_applies(kind, bk);
}

/* The rule above for Python (cpu_grouped): 1 when ISA 2 is on and its kernels pay for M rows. */
int fp8_bf16_pays(int64_t M, int64_t N, int64_t K, int kind, int64_t bk) {
    ensure_init();
    return g_isa == 2 && bf16_pays(M, N, K, kind, bk);
}

/* For tests and benchmarks: the bf16 kernel (BF16_GEMV / BF16_TILES / BF16_PACKED) that M rows of
 * an N x K weight get where the bf16 kernels are exact (else the fp32 ones run), 0 where ISA 2 is
 * off or they do not pay. */
int fp8_bf16_kernel(int64_t M, int64_t N, int64_t K, int kind, int64_t bk) {
#if FP8_HAVE_BF16
    return fp8_bf16_pays(M, N, K, kind, bk) ? bf16_kernel_of(M, kind, bk) : 0;
#else
    (void)M, (void)N, (void)K, (void)kind, (void)bk;
    return 0;
#endif
}

/* fp8_gemm / fp8_gemm_grouped on the bf16 kernels from x as fp8_gemm takes it; BF16_NOT_EXACT
 * where they do not apply (the caller then runs the fp32 kernels). */
static int bf16_gemm(const void *x, int xdt, const float *xs, int dynamic, int64_t M, int64_t L, const int64_t *gid,
                     const int64_t *x_row, const int64_t *y_row, const int64_t *rows, const uint8_t *w, int kind,
                     const float *ws, int64_t nws, int64_t N, int64_t K, int64_t bn, int64_t bk, const void *bias,
                     int bias_dt, void *y, int ydt, int nthreads) {
#if FP8_HAVE_BF16
    const uint16_t *xb = NULL;
    const float *xsc = NULL;
    void *own = NULL;
    if (g_isa != 2) return BF16_NOT_EXACT;
    int rc = bf16_prepare(x, xdt, xs, dynamic, M, K, bk, kind, ws, nws, &xb, &xsc, &own, nthreads);
    if (rc) return rc;
    rc = bf16_run(xb, xsc, L, gid, x_row, y_row, rows, w, kind, ws, N, K, bn, bk, bias, bias_dt, y, ydt, nthreads);
    scratch_done(SCRATCH_X, own);
    return rc;
#else
    (void)x, (void)xdt, (void)xs, (void)dynamic, (void)M, (void)L, (void)gid, (void)x_row, (void)y_row, (void)rows;
    (void)w, (void)kind, (void)ws, (void)nws, (void)N, (void)K, (void)bn, (void)bk, (void)bias, (void)bias_dt;
    (void)y, (void)ydt, (void)nthreads;
    return BF16_NOT_EXACT;
#endif
}

/* y [M, N] (dtype ydt) = x [M, K] @ (w [N, K] fp8 * w_scale [cdiv(N, bn), cdiv(K, bk)])^T + bias [N]
 * (dtype bias_dt, or NULL), x as in prepare_row, accumulated in fp32. Each weight tile (4 rows x
 * 512 K) is widened once into L1 and used by all M rows: the fp8 weight is streamed once and the
 * dequantized weight never exists in memory. Threads split N; each y element has one owner, so the
 * result does not depend on the thread count. */
int fp8_gemm(const void *x, int xdt, const float *xs, int dynamic, int64_t M, const uint8_t *w, int kind,
             const float *ws, int64_t N, int64_t K, int64_t bn, int64_t bk, const void *bias, int bias_dt,
             void *y, int ydt, int nthreads) {
    ensure_init();
    if (g_isa == 2 && bf16_pays(M, N, K, kind, bk)) { /* the bf16 kernels where exact (bf16_gemm), else fp32 ones */
        const int64_t zero = 0;
        const int rc = bf16_gemm(x, xdt, xs, dynamic, M, 1, &zero, &zero, &zero, &M, w, kind, ws,
                                 cdiv64(N, bn) * cdiv64(K, bk), N, K, bn, bk, bias, bias_dt, y, ydt, nthreads);
        if (rc != BF16_NOT_EXACT) return rc;
    }
    const int64_t tiles = cdiv64(N, NR);
    const int isa = g_isa;
    const int convert = !(xdt == DT_F32 && !dynamic);
    float *xf = convert ? (float *)malloc(sizeof(float) * M * K) : (float *)x;
    float *accs = (float *)malloc(sizeof(float) * M * NR * (nthreads > 0 ? nthreads : 1));
    if ((convert && xf == NULL) || accs == NULL) {
        if (convert) free(xf);
        free(accs);
        return FP8_ERR_NOMEM;
    }
    /* O(M K) with M small: done before the parallel region, which then has a single barrier (a
     * barrier waits for the slowest thread, and on a busy machine that is a descheduled one). */
    if (convert)
        for (int64_t m = 0; m < M; m++) prepare_row(x, xdt, xs, dynamic, m, K, bk, xf + m * K, isa);
    if (fp8_overflow_edge(xf, DT_F32, M * K, xdt >= 3 ? xs : NULL, M * cdiv64(K, bk), ws,
                          cdiv64(N, bn) * cdiv64(K, bk), K, kind, 1)) {
        if (convert) free(xf);
        free(accs);
        return FP8_EDGE;
    }
#pragma omp parallel num_threads(nthreads) if (tiles > 1 && (M == 1 ? N * K >= GEMV_PAR_MIN : M * N * K >= 4 * PAR_MIN))
    {
        float buf[NR * KC] __attribute__((aligned(64)));
#ifdef _OPENMP
        float *acc = accs + M * NR * omp_get_thread_num();
#else
        float *acc = accs;
#endif
#pragma omp for schedule(dynamic, 8) nowait
        for (int64_t t = 0; t < tiles; t++) {
            gemm_tile(xf, M, K, w, kind, ws, N, bn, bk, t * NR, acc, buf, isa);
            store_tile(acc, M, N, t * NR, bias, bias_dt, y, ydt);
        }
    }
    if (convert) free(xf);
    free(accs);
    return 0;
}

/* The fused GEMM of G' groups in ONE parallel region (a barrier per call, not per group): for
 * each listed group i, y rows [y_row[i], y_row[i] + rows[i]) (dtype ydt, N columns) = xf rows
 * [x_row[i], x_row[i] + rows[i]) (float32, K columns, already prepared) @ (w[gid[i]] [N, K] fp8 *
 * ws[gid[i]] [cdiv(N, bn), cdiv(K, bk)])^T. Tasks are (group, 4-row weight tile) pairs; each y
 * element has one owner and is computed exactly as fp8_gemm computes it. */
int fp8_gemm_grouped(const float *xf, int64_t L, const int64_t *gid, const int64_t *x_row, const int64_t *y_row,
                     const int64_t *rows, const uint8_t *w, int kind, const float *ws, int64_t N,
                     int64_t K, int64_t bn, int64_t bk, void *y, int ydt, int nthreads) {
    ensure_init();
    const int64_t tiles = cdiv64(N, NR), tasks = L * tiles;
    const int64_t w_step = N * K, ws_step = cdiv64(N, bn) * cdiv64(K, bk);
    const int64_t ysize = ydt == DT_F32 ? 4 : 2;
    const int isa = g_isa;
    int64_t total = 0, max_rows = 0;
    for (int64_t i = 0; i < L; i++) {
        total += rows[i];
        max_rows = rows[i] > max_rows ? rows[i] : max_rows;
    }
    float *accs = (float *)malloc(sizeof(float) * max_rows * NR * (nthreads > 0 ? nthreads : 1));
    if (accs == NULL) return FP8_ERR_NOMEM;
#pragma omp parallel num_threads(nthreads) \
    if (tasks > 1 && (max_rows == 1 ? total * N * K >= GEMV_PAR_MIN : total * N * K >= 4 * PAR_MIN))
    {
        float buf[NR * KC] __attribute__((aligned(64)));
#ifdef _OPENMP
        float *acc = accs + max_rows * NR * omp_get_thread_num();
#else
        float *acc = accs;
#endif
#pragma omp for schedule(dynamic, 4) nowait
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t i = t / tiles, n0 = (t % tiles) * NR, g = gid[i];
            gemm_tile(xf + x_row[i] * K, rows[i], K, w + g * w_step, kind, ws + g * ws_step, N, bn, bk, n0, acc,
                      buf, isa);
            store_tile(acc, rows[i], N, n0, NULL, 0, (char *)y + y_row[i] * N * ysize, ydt);
        }
    }
    free(accs);
    return 0;
}

/* fp8_gemm_grouped from the activation as fp8_gemm takes it (x [M, K] of dtype xdt, xs, dynamic:
 * see prepare_row), on the AVX512-BF16 kernels: the groups' rows are offsets into x's M rows, w
 * holds G weights. Returns 0, FP8_ERR_NOMEM, FP8_EDGE (the fp32 overflow edge over all M rows:
 * nothing written) or 3 where the bf16 kernels are not exact for this activation, do not pay
 * (bf16_pays, on the largest group) or are not in use (ISA below 2): then nothing is written and
 * the caller runs fp8_prepare_x + fp8_gemm_grouped. */
int fp8_gemm_grouped_x(const void *x, int xdt, const float *xs, int dynamic, int64_t M, int64_t L, const int64_t *gid,
                       const int64_t *x_row, const int64_t *y_row, const int64_t *rows, const uint8_t *w, int kind,
                       const float *ws, int64_t G, int64_t N, int64_t K, int64_t bn, int64_t bk, void *y, int ydt,
                       int nthreads) {
    ensure_init();
    int64_t max_rows = 0;
    for (int64_t i = 0; i < L; i++) max_rows = rows[i] > max_rows ? rows[i] : max_rows;
    if (!bf16_pays(max_rows, N, K, kind, bk)) return BF16_NOT_EXACT;
    return bf16_gemm(x, xdt, xs, dynamic, M, L, gid, x_row, y_row, rows, w, kind, ws,
                     G * cdiv64(N, bn) * cdiv64(K, bk), N, K, bn, bk, NULL, 0, y, ydt, nthreads);
}

/* ------------------------------------------------------------------ MoE combine */
/* out[t, :] (dtype odt: float32, bf16 or fp16, rounded once from float32) = the weighted sum of
 * token t's k expert rows of y [*, H] float32, in slot order and as torch computes
 * ``o = y[slots[0, t]] * w[t, 0]; o += y[slots[1, t]] * w[t, 1]; ...``: each product rounded to
 * float32, then each sum (no fused multiply-add), so the result is that expression's bit for bit.
 * slots [k, T] int64 (rows of y, in range: the caller's check), w [T, k] float32. One owner per
 * output row (tokens split over nthreads), so the result does not depend on the thread count. The
 * [T, H] float32 intermediate and the k gathered [T, H] copies of the torch form are never made. */
#define COMBINE_BODY                                                                                   \
    for (int64_t t = t0; t < t1; t++) {                                                                \
        const float *r0 = y + slots[t] * H;                                                            \
        const float w0 = w[t * k];                                                                     \
        for (int64_t c = 0; c < H; c++) acc[c] = r0[c] * w0;                                           \
        for (int64_t j = 1; j < k; j++) {                                                              \
            const float *r = y + slots[j * T + t] * H;                                                 \
            const float wj = w[t * k + j];                                                             \
            for (int64_t c = 0; c < H; c++) {                                                          \
                const float p = r[c] * wj; /* its own statement: clang contracts only within one */    \
                acc[c] = acc[c] + p;                                                                   \
            }                                                                                          \
        }                                                                                              \
        if (odt == DT_F32) memcpy((float *)out + t * H, acc, sizeof(float) * H);                       \
        else for (int64_t c = 0; c < H; c++) store_hp(out, odt, t * H + c, acc[c]);                    \
    }
/* gcc contracts a * b + c into an fma across statements by default (-ffp-contract=fast in GNU C
 * modes): not here, whose result is torch's separately rounded products and sums. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
#if FP8_HAVE_X86
AVX2_FN static void combine_rows_avx2(const float *y, const int64_t *slots, const float *w, int64_t T, int64_t k,
                                      int64_t H, void *out, int odt, int64_t t0, int64_t t1, float *acc) {
    COMBINE_BODY
}
#endif
static void combine_rows_scalar(const float *y, const int64_t *slots, const float *w, int64_t T, int64_t k,
                                int64_t H, void *out, int odt, int64_t t0, int64_t t1, float *acc) {
    COMBINE_BODY
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
#undef COMBINE_BODY

/* Returns 0 or FP8_ERR_NOMEM (nothing written). */
int fp8_combine(const float *y, const int64_t *slots, const float *w, int64_t T, int64_t k, int64_t H, void *out,
                int odt, int nthreads) {
    ensure_init();
    const int nt = nthreads > 0 ? nthreads : 1;
    float *accs = (float *)aligned_alloc(64, (size_t)nt * cdiv64(H, 16) * 64);
    if (accs == NULL) return FP8_ERR_NOMEM;
    const int64_t chunk = 8; /* tokens per task */
#pragma omp parallel num_threads(nthreads) if (T * k * H >= PAR_MIN)
    {
#ifdef _OPENMP
        float *acc = accs + (size_t)omp_get_thread_num() * cdiv64(H, 16) * 16;
#else
        float *acc = accs;
#endif
#pragma omp for schedule(static)
        for (int64_t t0 = 0; t0 < T; t0 += chunk) {
            const int64_t t1 = t0 + chunk < T ? t0 + chunk : T;
#if FP8_HAVE_X86
            if (g_isa >= 1) {
                combine_rows_avx2(y, slots, w, T, k, H, out, odt, t0, t1, acc);
                continue;
            }
#endif
            combine_rows_scalar(y, slots, w, T, k, H, out, odt, t0, t1, acc);
        }
    }
    free(accs);
    return 0;
}
