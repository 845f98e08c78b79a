#pragma once
// Element loops that need instructions Swift's SIMD types cannot express (AVX-512's compress),
// or an order of instructions LLVM's vectoriser does not keep from Swift. Each is compiled for
// AVX-512 only inside its own function (`target` attribute) and called only when
// `mergekit_has_avx512()` says the CPU and the OS support it; the Swift callers keep a portable
// loop for every other machine. Products and sums are never fused (FP_CONTRACT OFF), so that
// the sums are those of the Swift loops to the bit.
#include <stddef.h>
#include <stdint.h>

#pragma STDC FP_CONTRACT OFF

/// One model of `mergekit_sparse_consensus_*`: its stored elements, which of its deltas are kept
/// (by packed flags `words`, element i: bit i % 64 of word i / 64; or, when `words` is NULL, by
/// the band `lowest ... highest` of magnitude keys, `bits & 0x7FFFFFFF`, bounds up to 2^31), the
/// rescaling of the kept deltas (1: none) and the model's weight.
typedef struct {
  const void *elements;
  const uint64_t *words;
  uint32_t lowest;
  uint32_t highest;
  double scale;
  double weight;
} mergekit_consensus_model;

/// The most models `mergekit_sparse_consensus_*` takes.
#define MERGEKIT_CONSENSUS_MODELS 8

/// The step loops of `mergekit_sparse_consensus_*` (each unit's form: `STEP` takes `WIDTH`
/// elements a step): the model count fixed at one to four for the compiler, where the unrolled
/// loops keep every product in registers, and with plain bands (no packed bits, no rescaling)
/// no step tests a rule's kind. Expects `base`, `models`, `count`, `i`, `end`, `lambdas`,
/// `normalize`, `elect`, `out` and `bf16_out` in scope; leaves `i` at the first element of the
/// tail.
#define MERGEKIT_CONSENSUS_STEPS(STEP, WIDTH)                                                    \
  do {                                                                                           \
    int words = 0, scaled = 0;                                                                   \
    for (size_t t = 0; t < count; t++) {                                                         \
      words |= models[t].words != 0;                                                             \
      scaled |= models[t].scale != 1;                                                            \
    }                                                                                            \
    switch (count <= 4 ? (int)count + (words || scaled ? 4 : 0) : 0) {                           \
    case 1: for (; i + WIDTH <= end; i += WIDTH) STEP(base, models, 1, i, lambdas, normalize, elect, out, bf16_out, 0, 0); break; \
    case 2: for (; i + WIDTH <= end; i += WIDTH) STEP(base, models, 2, i, lambdas, normalize, elect, out, bf16_out, 0, 0); break; \
    case 3: for (; i + WIDTH <= end; i += WIDTH) STEP(base, models, 3, i, lambdas, normalize, elect, out, bf16_out, 0, 0); break; \
    case 4: for (; i + WIDTH <= end; i += WIDTH) STEP(base, models, 4, i, lambdas, normalize, elect, out, bf16_out, 0, 0); break; \
    case 5: for (; i + WIDTH <= end; i += WIDTH) STEP(base, models, 1, i, lambdas, normalize, elect, out, bf16_out, 1, 1); break; \
    case 6: for (; i + WIDTH <= end; i += WIDTH) STEP(base, models, 2, i, lambdas, normalize, elect, out, bf16_out, 1, 1); break; \
    case 7: for (; i + WIDTH <= end; i += WIDTH) STEP(base, models, 3, i, lambdas, normalize, elect, out, bf16_out, 1, 1); break; \
    case 8: for (; i + WIDTH <= end; i += WIDTH) STEP(base, models, 4, i, lambdas, normalize, elect, out, bf16_out, 1, 1); break; \
    default: for (; i + WIDTH <= end; i += WIDTH) STEP(base, models, count, i, lambdas, normalize, elect, out, bf16_out, 1, 1); break; \
    }                                                                                            \
  } while (0)

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>

/// 1 when the CPU has AVX-512 F and the OS saves the 512-bit registers (XCR0 bits 1, 2, 5, 6, 7).
static inline int mergekit_has_avx512(void) {
  unsigned int eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return 0;  // OSXSAVE
  unsigned int xcr0_low, xcr0_high;
  __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
  if ((xcr0_low & 0xE6u) != 0xE6u) return 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return 0;
  return (ebx & (1u << 16)) != 0;  // AVX512F
}

/// The magnitude keys (`bits & 0x7FFFFFFF`) of 16 elements from `i`: of floats' bit patterns
/// (`mergekit_keys_of_bits`), or of the float differences `model - base` of two bf16 arrays
/// (`mergekit_keys_of_bf16_differences`, the differences rounded to float as a `Float`
/// subtraction in Swift rounds them); `..._one`: one element's key, for the tails.
typedef struct {
  const void *first;
  const void *second;
} mergekit_key_source;

__attribute__((target("avx512f"))) static inline __m512i mergekit_keys_of_bits(mergekit_key_source s, size_t i) {
  return _mm512_and_si512(_mm512_loadu_si512((const void *)((const uint32_t *)s.first + i)),
                          _mm512_set1_epi32(0x7FFFFFFF));
}
static inline uint32_t mergekit_keys_of_bits_one(mergekit_key_source s, size_t i) {
  return ((const uint32_t *)s.first)[i] & 0x7FFFFFFFu;
}
__attribute__((target("avx512f"))) static inline __m512 mergekit_bf16_floats(const void *p, size_t i) {
  __m256i halves = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
}
__attribute__((target("avx512f"))) static inline __m512i mergekit_keys_of_bf16_differences(mergekit_key_source s,
                                                                                            size_t i) {
  __m512 difference = _mm512_sub_ps(mergekit_bf16_floats(s.first, i), mergekit_bf16_floats(s.second, i));
  return _mm512_and_si512(_mm512_castps_si512(difference), _mm512_set1_epi32(0x7FFFFFFF));
}
static inline uint32_t mergekit_keys_of_bf16_differences_one(mergekit_key_source s, size_t i) {
  uint32_t x = (uint32_t)((const uint16_t *)s.first)[i] << 16, y = (uint32_t)((const uint16_t *)s.second)[i] << 16;
  float a, b;
  __builtin_memcpy(&a, &x, 4);
  __builtin_memcpy(&b, &y, 4);
  float d = a - b;
  uint32_t bits;
  __builtin_memcpy(&bits, &d, 4);
  return bits & 0x7FFFFFFFu;
}

/// The keys of n elements against a bracket, in one sweep: into `counts`, counts[0] above `high`,
/// counts[1] equal to `high`, counts[2] equal to `low`, counts[3] strictly between `low` and
/// `high` (also returned); and those inside keys, in order, into `out`, which must have room for
/// n + 16 keys (whole vectors are stored; the lanes past the count are overwritten by the next
/// store or left as slack). Keys are below 2^31, so unsigned comparisons order them. The end
/// counts are kept per lane (a masked add of 1: one instruction, where a popcount takes
/// three), added up at the end. The compress goes into a register, then a full store, even of
/// no lanes (no branch to mispredict): the memory form of the compress is microcoded on some
/// cores.
#define MERGEKIT_BRACKET_SUMMARY(NAME, KEYS)                                                     \
  __attribute__((target("avx512f,popcnt"))) static inline size_t NAME(                          \
      mergekit_key_source source, size_t n, uint32_t low, uint32_t high, uint64_t counts[4], uint32_t *out) { \
    const __m512i lo = _mm512_set1_epi32((int)low), hi = _mm512_set1_epi32((int)high);           \
    const __m512i one = _mm512_set1_epi32(1);                                                    \
    __m512i above = _mm512_setzero_si512(), at_high = above, at_low = above;                     \
    uint64_t above_total = 0, at_high_total = 0, at_low_total = 0;                               \
    size_t k = 0, i = 0;                                                                         \
    while (i + 16 <= n) {                                                                        \
      /* Lanes count to at most 2^20 before they are added up: no overflow. */                  \
      size_t end = i + ((n - i) / 16 < (1u << 20) ? (n - i) / 16 : (1u << 20)) * 16;             \
      for (; i < end; i += 16) {                                                                 \
        __m512i b = KEYS(source, i);                                                             \
        above = _mm512_mask_add_epi32(above, _mm512_cmpgt_epu32_mask(b, hi), above, one);        \
        at_high = _mm512_mask_add_epi32(at_high, _mm512_cmpeq_epu32_mask(b, hi), at_high, one);  \
        at_low = _mm512_mask_add_epi32(at_low, _mm512_cmpeq_epu32_mask(b, lo), at_low, one);     \
        __mmask16 m = _mm512_cmpgt_epu32_mask(b, lo) & _mm512_cmplt_epu32_mask(b, hi);           \
        _mm512_storeu_si512((void *)(out + k), _mm512_maskz_compress_epi32(m, b));               \
        k += (size_t)_mm_popcnt_u32(m);                                                          \
      }                                                                                          \
      above_total += (uint64_t)_mm512_reduce_add_epi32(above);                                   \
      at_high_total += (uint64_t)_mm512_reduce_add_epi32(at_high);                               \
      at_low_total += (uint64_t)_mm512_reduce_add_epi32(at_low);                                 \
      above = at_high = at_low = _mm512_setzero_si512();                                         \
    }                                                                                            \
    for (; i < n; i++) {                                                                         \
      uint32_t b = KEYS##_one(source, i);                                                        \
      above_total += b > high;                                                                   \
      at_high_total += b == high;                                                                \
      at_low_total += b == low;                                                                  \
      if (b > low && b < high) out[k++] = b;                                                     \
    }                                                                                            \
    counts[0] = above_total;                                                                     \
    counts[1] = at_high_total;                                                                   \
    counts[2] = at_low_total;                                                                    \
    counts[3] = k;                                                                               \
    return k;                                                                                    \
  }

MERGEKIT_BRACKET_SUMMARY(mergekit_bracket_summary_avx512, mergekit_keys_of_bits)
MERGEKIT_BRACKET_SUMMARY(mergekit_bracket_summary_bf16_differences_avx512, mergekit_keys_of_bf16_differences)
#undef MERGEKIT_BRACKET_SUMMARY

/// Four elements at `p + i` (bf16 bit patterns, or floats) as doubles; `..._pair`: four at
/// `p + i` in the low half and four at `p + k` in the high half of one vector of eight.
__attribute__((target("avx512f"))) static inline __m256d mergekit_load4_bf16(const void *p, size_t i) {
  __m128i halves = _mm_loadl_epi64((const __m128i *)((const uint16_t *)p + i));
  return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(halves), 16)));
}
__attribute__((target("avx512f"))) static inline __m512d mergekit_load4_bf16_pair(const void *p, size_t i, size_t k) {
  __m128i halves = _mm_unpacklo_epi64(
      _mm_loadl_epi64((const __m128i *)((const uint16_t *)p + i)),
      _mm_loadl_epi64((const __m128i *)((const uint16_t *)p + k)));
  return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16)));
}
__attribute__((target("avx512f"))) static inline __m256d mergekit_load4_f32(const void *p, size_t i) {
  return _mm256_cvtps_pd(_mm_loadu_ps((const float *)p + i));
}
__attribute__((target("avx512f"))) static inline __m512d mergekit_load4_f32_pair(const void *p, size_t i, size_t k) {
  __m256 both = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps((const float *)p + i)),
                                     _mm_loadu_ps((const float *)p + k), 1);
  return _mm512_cvtps_pd(both);
}

/// A block's four chains added as `(c0 + c1) + (c2 + c3)`.
__attribute__((target("avx512f"))) static inline double mergekit_chain_total(__m256d v) {
  double lanes[4];
  _mm256_storeu_pd(lanes, v);
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

/// For each whole block j in `first ..< first + blocks` of `block` elements (a multiple of 4) of
/// `a` and `b` (elements j * block ..< (j + 1) * block): the sums of a*a, a*b and b*b (as
/// doubles) into out[3j], out[3j + 1], out[3j + 2], each summed in four chains (chain k:
/// elements k, k + 4, ... of the block), the chains then added as `(c0 + c1) + (c2 + c3)`:
/// `Kernels.dotsOfPair`'s block sums. Two blocks share a vector of eight lanes (the first's
/// chains low, the second's high), and two such pairs are swept side by side: the conversion
/// to double then takes one instruction for eight elements, and a block's chains do not wait
/// on their own adds.
#define MERGEKIT_PAIR_DOTS_STEP(LOAD, at, aa, ab, bb)                                            \
  do {                                                                                           \
    __m256d x = LOAD(a, at), y = LOAD(b, at);                                                    \
    aa = _mm256_add_pd(aa, _mm256_mul_pd(x, x));                                                 \
    ab = _mm256_add_pd(ab, _mm256_mul_pd(x, y));                                                 \
    bb = _mm256_add_pd(bb, _mm256_mul_pd(y, y));                                                 \
  } while (0)
#define MERGEKIT_PAIR_DOTS_STEP2(LOAD2, at, aa, ab, bb)                                          \
  do {                                                                                           \
    __m512d x = LOAD2(a, at, (at) + block), y = LOAD2(b, at, (at) + block);                      \
    aa = _mm512_add_pd(aa, _mm512_mul_pd(x, x));                                                 \
    ab = _mm512_add_pd(ab, _mm512_mul_pd(x, y));                                                 \
    bb = _mm512_add_pd(bb, _mm512_mul_pd(y, y));                                                 \
  } while (0)
#define MERGEKIT_PAIR_DOTS_STORE(j, aa, ab, bb)                                                  \
  do {                                                                                           \
    out[3 * (j)] = mergekit_chain_total(aa);                                                     \
    out[3 * (j) + 1] = mergekit_chain_total(ab);                                                 \
    out[3 * (j) + 2] = mergekit_chain_total(bb);                                                 \
  } while (0)
#define MERGEKIT_PAIR_DOTS_STORE2(j, aa, ab, bb)                                                 \
  do {                                                                                           \
    MERGEKIT_PAIR_DOTS_STORE(j, _mm512_castpd512_pd256(aa), _mm512_castpd512_pd256(ab),          \
                             _mm512_castpd512_pd256(bb));                                        \
    MERGEKIT_PAIR_DOTS_STORE((j) + 1, _mm512_extractf64x4_pd(aa, 1), _mm512_extractf64x4_pd(ab, 1), \
                             _mm512_extractf64x4_pd(bb, 1));                                     \
  } while (0)
#define MERGEKIT_PAIR_DOTS(NAME, LOAD, LOAD2)                                                    \
  __attribute__((target("avx512f"))) static inline void NAME(                                    \
      const void *a, const void *b, size_t first, size_t blocks, size_t block, double *out) {    \
    size_t j = first, end = first + blocks;                                                      \
    for (; j + 4 <= end; j += 4) {                                                               \
      __m512d aa0 = _mm512_setzero_pd(), ab0 = aa0, bb0 = aa0, aa1 = aa0, ab1 = aa0, bb1 = aa0;  \
      for (size_t i = j * block; i < (j + 1) * block; i += 4) {                                  \
        MERGEKIT_PAIR_DOTS_STEP2(LOAD2, i, aa0, ab0, bb0);                                       \
        MERGEKIT_PAIR_DOTS_STEP2(LOAD2, i + 2 * block, aa1, ab1, bb1);                           \
      }                                                                                          \
      MERGEKIT_PAIR_DOTS_STORE2(j, aa0, ab0, bb0);                                               \
      MERGEKIT_PAIR_DOTS_STORE2(j + 2, aa1, ab1, bb1);                                           \
    }                                                                                            \
    for (; j + 2 <= end; j += 2) {                                                               \
      __m512d aa = _mm512_setzero_pd(), ab = aa, bb = aa;                                        \
      for (size_t i = j * block; i < (j + 1) * block; i += 4) MERGEKIT_PAIR_DOTS_STEP2(LOAD2, i, aa, ab, bb); \
      MERGEKIT_PAIR_DOTS_STORE2(j, aa, ab, bb);                                                  \
    }                                                                                            \
    for (; j < end; j++) {                                                                       \
      __m256d aa = _mm256_setzero_pd(), ab = aa, bb = aa;                                        \
      for (size_t i = j * block; i < (j + 1) * block; i += 4) MERGEKIT_PAIR_DOTS_STEP(LOAD, i, aa, ab, bb); \
      MERGEKIT_PAIR_DOTS_STORE(j, aa, ab, bb);                                                   \
    }                                                                                            \
  }

MERGEKIT_PAIR_DOTS(mergekit_pair_dots_bf16_avx512, mergekit_load4_bf16, mergekit_load4_bf16_pair)
MERGEKIT_PAIR_DOTS(mergekit_pair_dots_f32_avx512, mergekit_load4_f32, mergekit_load4_f32_pair)
/// For each whole block j in `first ..< first + blocks` of `block` elements (a multiple of 4)
/// of `v`: the sum of |v| into out[2j] and the sum of |v| over the elements whose bit is set in
/// `keep` (element i: bit i % 64 of word i / 64) into out[2j + 1], as doubles in four chains
/// added as `(c0 + c1) + (c2 + c3)`: `Kernels.absoluteSums`' block sums. Blocks are paired in
/// vectors of eight lanes as in `mergekit_pair_dots_*` (a lone last block is paired with itself).
__attribute__((target("avx512f"))) static inline __m512d mergekit_magnitudes_pair(const float *v, size_t i, size_t k) {
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
  __m256 both = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(v + i)), _mm_loadu_ps(v + k), 1);
  return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(both), magnitude)));
}
__attribute__((target("avx512f"))) static inline __mmask8 mergekit_keep_pair(const uint64_t *keep, size_t i, size_t k) {
  return (__mmask8)(((keep[i / 64] >> (i % 64)) & 0xFu) | (((keep[k / 64] >> (k % 64)) & 0xFu) << 4));
}
/// `..._bf16_differences`: the magnitudes of the float differences `model - base` of two bf16
/// arrays (`mergekit_key_source`: first the model, second the base), rounded as `Kernels.differences`
/// rounds them, formed in registers.
__attribute__((target("avx512f"))) static inline __m512d mergekit_bf16_difference_magnitudes_pair(
    mergekit_key_source s, size_t i, size_t k) {
  const __m256i magnitude = _mm256_set1_epi32(0x7FFFFFFF);
  __m128i model = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)((const uint16_t *)s.first + i)),
                                     _mm_loadl_epi64((const __m128i *)((const uint16_t *)s.first + k)));
  __m128i base = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i *)((const uint16_t *)s.second + i)),
                                    _mm_loadl_epi64((const __m128i *)((const uint16_t *)s.second + k)));
  __m256 difference = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(model), 16)),
                                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(base), 16)));
  return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(difference), magnitude)));
}
#define MERGEKIT_ABSOLUTE_SUMS_STEP(MAGNITUDES, i, k, all, kept)                                         \
  do {                                                                                           \
    __m512d d = MAGNITUDES(v, i, k);                                                             \
    all = _mm512_add_pd(all, d);                                                                 \
    kept = _mm512_add_pd(kept, _mm512_maskz_mov_pd(mergekit_keep_pair(keep, i, k), d));          \
  } while (0)
#define MERGEKIT_ABSOLUTE_SUMS_STORE(j, half, all, kept)                                         \
  do {                                                                                           \
    out[2 * (j)] = mergekit_chain_total(_mm512_extractf64x4_pd(all, half));                      \
    out[2 * (j) + 1] = mergekit_chain_total(_mm512_extractf64x4_pd(kept, half));                 \
  } while (0)
#define MERGEKIT_ABSOLUTE_SUMS(NAME, SOURCE, MAGNITUDES)                                          \
  __attribute__((target("avx512f"))) static inline void NAME(                                     \
      SOURCE v, const uint64_t *keep, size_t first, size_t blocks, size_t block, double *out) {   \
    size_t j = first, end = first + blocks;                                                       \
    for (; j + 4 <= end; j += 4) {                                                                \
      __m512d all0 = _mm512_setzero_pd(), kept0 = all0, all1 = all0, kept1 = all0;                \
      for (size_t i = j * block; i < (j + 1) * block; i += 4) {                                   \
        MERGEKIT_ABSOLUTE_SUMS_STEP(MAGNITUDES, i, i + block, all0, kept0);                               \
        MERGEKIT_ABSOLUTE_SUMS_STEP(MAGNITUDES, i + 2 * block, i + 3 * block, all1, kept1);               \
      }                                                                                           \
      MERGEKIT_ABSOLUTE_SUMS_STORE(j, 0, all0, kept0);                                            \
      MERGEKIT_ABSOLUTE_SUMS_STORE(j + 1, 1, all0, kept0);                                        \
      MERGEKIT_ABSOLUTE_SUMS_STORE(j + 2, 0, all1, kept1);                                        \
      MERGEKIT_ABSOLUTE_SUMS_STORE(j + 3, 1, all1, kept1);                                        \
    }                                                                                             \
    for (; j < end; j += 2) {                                                                     \
      size_t second = j + 1 < end ? block : 0; /* a lone block paired with itself */              \
      __m512d all = _mm512_setzero_pd(), kept = all;                                              \
      for (size_t i = j * block; i < (j + 1) * block; i += 4) MERGEKIT_ABSOLUTE_SUMS_STEP(MAGNITUDES, i, i + second, all, kept); \
      MERGEKIT_ABSOLUTE_SUMS_STORE(j, 0, all, kept);                                              \
      if (second) MERGEKIT_ABSOLUTE_SUMS_STORE(j + 1, 1, all, kept);                              \
    }                                                                                             \
  }
MERGEKIT_ABSOLUTE_SUMS(mergekit_absolute_sums_avx512, const float *, mergekit_magnitudes_pair)
MERGEKIT_ABSOLUTE_SUMS(mergekit_absolute_sums_bf16_differences_avx512, mergekit_key_source,
                       mergekit_bf16_difference_magnitudes_pair)
#undef MERGEKIT_ABSOLUTE_SUMS

/// 16 keep flags of elements `i ..< i + 16` from packed words (any `i`).
static inline uint32_t mergekit_flags16(const uint64_t *words, size_t i) {
  size_t shift = i & 63;
  uint64_t v = words[i >> 6] >> shift;
  if (shift > 48) v |= words[(i >> 6) + 1] << (64 - shift);
  return (uint32_t)(v & 0xFFFFu);
}
static inline float mergekit_bf16_one(const void *p, size_t i) {
  uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
  float v;
  __builtin_memcpy(&v, &bits, 4);
  return v;
}
static inline float mergekit_f32_one(const void *p, size_t i) { return ((const float *)p)[i]; }
__attribute__((target("avx512f"))) static inline __m512 mergekit_f32_floats(const void *p, size_t i) {
  return _mm512_loadu_ps((const float *)p + i);
}
static inline uint64_t mergekit_double_bits(double v) {
  uint64_t bits;
  __builtin_memcpy(&bits, &v, 8);
  return bits;
}
static inline double mergekit_bits_double(uint64_t bits) {
  double v;
  __builtin_memcpy(&v, &bits, 8);
  return v;
}

/// Float bits to BF16 bits, rounded to nearest even, a NaN keeping its high payload (quietened
/// when that would be 0): `DTypeConversion.f32ToBF16Bits`. `..._of_floats`: 16 at a time.
static inline uint16_t mergekit_bf16_of_float_bits(uint32_t b) {
  uint32_t high = b >> 16;
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)(high | ((high & 0x7Fu) == 0 ? 0x40u : 0));
  return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
__attribute__((target("avx512f"))) static inline __m256i mergekit_bf16_of_floats(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i high = _mm512_srli_epi32(b, 16);
  __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), _mm512_and_si512(high, _mm512_set1_epi32(1))), 16);
  __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7FFFFFFF)), _mm512_set1_epi32(0x7F800000));
  __m512i quiet = _mm512_mask_or_epi32(high, _mm512_testn_epi32_mask(high, _mm512_set1_epi32(0x7F)), high,
                                       _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

/// Sixteen results at `out + i` from two vectors of eight, as floats or (`bf16_out`) BF16;
/// `mergekit_store1`: one.
__attribute__((target("avx512f"))) static inline void mergekit_store16(void *out, size_t i, __m256 low, __m256 high,
                                                                       int bf16_out) {
  if (bf16_out) {
    __m512 both = _mm512_castpd_ps(
        _mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(low)), _mm256_castps_pd(high), 1));
    _mm256_storeu_si256((__m256i *)((uint16_t *)out + i), mergekit_bf16_of_floats(both));
  } else {
    _mm256_storeu_ps((float *)out + i, low);
    _mm256_storeu_ps((float *)out + i + 8, high);
  }
}
static inline void mergekit_store1(void *out, size_t i, float value, int bf16_out) {
  if (bf16_out) {
    uint32_t bits;
    __builtin_memcpy(&bits, &value, 4);
    ((uint16_t *)out)[i] = mergekit_bf16_of_float_bits(bits);
  } else {
    ((float *)out)[i] = value;
  }
}

/// Floats `8h ..< 8h + 8` of `v` as doubles.
__attribute__((target("avx512f"))) static inline __m512d mergekit_doubles_of_half(__m512 v, int h) {
  return _mm512_cvtps_pd(h == 0 ? _mm512_castps512_ps256(v)
                                : _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

/// TIES's disjoint merge of elements `first ..< first + n`, from the stored elements of the base
/// and of `count` models (at most `MERGEKIT_CONSENSUS_MODELS`, all of one dtype), into `out`:
/// `Kernels.sparseConsensusMerge`'s arithmetic to the bit. Per element and model, the delta
/// `model - base` is rounded to float, kept by the model's rule (else +0) and rescaled
/// (`(float)((double)delta * scale)`); then in double, model by model, `total = sum w_t d_t`
/// from +0; the elected sign is negative when `total`'s sign bit is set and it is not +-0; the
/// products `w_t d_t` that are nonzero and share that sign are summed into `mixed` and their
/// weights into `divisor`; `mixed / divisor` (0 -> 1) when `normalize`; the result is
/// `(float)(base + lambda * mixed)`, stored as floats, or as BF16 when `bf16_out` (`out` then
/// holds uint16_t bit patterns). Without the election (`elect` 0: breadcrumbs, DARE and the
/// other sparsified task arithmetic), `mixed` is `total` and `normalize` is not used: the
/// weighted sum of the kept deltas, as `Kernels.weightedSum` adds up the masked deltas. Sixteen
/// elements a step, every model's products in registers, no scratch memory.
#define MERGEKIT_CONSENSUS_KEEP(m, d, i)                                                          \
  (any_words && (m).words ? (__mmask16)mergekit_flags16((m).words, i)                            \
             : (__mmask16)(_mm512_testn_epi32_mask(_mm512_sub_epi32(_mm512_and_si512(_mm512_castps_si512(d), magnitude), \
                                                                    _mm512_set1_epi32((int)(m).lowest)), sign32) & \
                           _mm512_testn_epi32_mask(_mm512_sub_epi32(_mm512_set1_epi32((int)(m).highest),              \
                                                                    _mm512_and_si512(_mm512_castps_si512(d), magnitude)), \
                                                   sign32)))
#define MERGEKIT_SPARSE_CONSENSUS(NAME, LOAD16, LOAD1)                                            \
  __attribute__((target("avx512f"), always_inline)) static inline void NAME##_step(               \
      const void *base, const mergekit_consensus_model *models, size_t count, size_t i, __m512d lambda, int normalize, \
      int elect, void *out, int bf16_out, int any_words, int any_scale) {                         \
    __m256 merged[2];                                                                             \
    const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF), sign32 = _mm512_set1_epi32((int)0x80000000u); \
    const __m512i magnitude64 = _mm512_set1_epi64(0x7FFFFFFFFFFFFFFFll), zero = _mm512_setzero_si512(); \
    const __m512i sign64 = _mm512_set1_epi64((long long)0x8000000000000000ull);                   \
    __m512 b = LOAD16(base, i);                                                                   \
    __m512d products[2][MERGEKIT_CONSENSUS_MODELS];                                               \
    __m512d total[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};                                \
    _Pragma("unroll") for (size_t t = 0; t < count; t++) {                                        \
      __m512 d = _mm512_sub_ps(LOAD16(models[t].elements, i), b);                                 \
      __mmask16 keep = MERGEKIT_CONSENSUS_KEEP(models[t], d, i);                                  \
      __m512d halves[2] = {mergekit_doubles_of_half(d, 0), mergekit_doubles_of_half(d, 1)};        \
      const __m512d weight = _mm512_set1_pd(models[t].weight);                                    \
      _Pragma("unroll") for (int h = 0; h < 2; h++) {                                             \
        __m512d v = halves[h];                                                                    \
        if (any_scale && models[t].scale != 1) v = _mm512_cvtps_pd(_mm512_cvtpd_ps(_mm512_mul_pd(v, _mm512_set1_pd(models[t].scale)))); \
        v = _mm512_maskz_mov_pd((__mmask8)(keep >> (8 * h)), v);                                  \
        products[h][t] = _mm512_mul_pd(weight, v);                                                \
        total[h] = _mm512_add_pd(total[h], products[h][t]);                                       \
      }                                                                                           \
    }                                                                                             \
    _Pragma("unroll") for (int h = 0; h < 2; h++) {                                               \
      /* The elected sign in the sign bit: the sign bit of `total` where it is not +-0. A     \
         product agrees when, its sign flipped by that, it is above 0 as an integer: the same  \
         sign, and not +-0. */                                                                \
      __m512d mixed = total[h];                                                                   \
      if (elect) {                                                                                \
        __m512i sum = _mm512_castpd_si512(total[h]);                                              \
        __m512i elected = _mm512_maskz_mov_epi64(_mm512_test_epi64_mask(sum, magnitude64), _mm512_and_si512(sum, sign64)); \
        __m512d divisor = _mm512_setzero_pd();                                                    \
        mixed = _mm512_setzero_pd();                                                              \
        _Pragma("unroll") for (size_t t = 0; t < count; t++) {                                    \
          __m512i bits = _mm512_castpd_si512(products[h][t]);                                     \
          __mmask8 agrees = _mm512_cmpgt_epi64_mask(_mm512_xor_si512(bits, elected), zero);       \
          mixed = _mm512_add_pd(mixed, _mm512_maskz_mov_pd(agrees, products[h][t]));              \
          divisor = _mm512_add_pd(divisor, _mm512_maskz_mov_pd(agrees, _mm512_set1_pd(models[t].weight))); \
        }                                                                                         \
        if (normalize)                                                                            \
          mixed = _mm512_div_pd(                                                                  \
              mixed, _mm512_mask_mov_pd(divisor, _mm512_cmp_pd_mask(divisor, _mm512_setzero_pd(), _CMP_EQ_OQ), _mm512_set1_pd(1))); \
      }                                                                                           \
      merged[h] = _mm512_cvtpd_ps(_mm512_add_pd(mergekit_doubles_of_half(b, h), _mm512_mul_pd(lambda, mixed))); \
    }                                                                                             \
    mergekit_store16(out, i, merged[0], merged[1], bf16_out);                                     \
  }                                                                                               \
  static inline void NAME##_one(const void *base, const mergekit_consensus_model *models, size_t count, size_t i, \
                                double lambda, int normalize, int elect, void *out, int bf16_out) { \
    double products[MERGEKIT_CONSENSUS_MODELS];                                                   \
    double total = 0;                                                                             \
    float b = LOAD1(base, i);                                                                     \
    for (size_t t = 0; t < count; t++) {                                                          \
      float d = LOAD1(models[t].elements, i) - b;                                                 \
      uint32_t bits;                                                                              \
      __builtin_memcpy(&bits, &d, 4);                                                             \
      uint32_t key = bits & 0x7FFFFFFFu;                                                          \
      int kept = models[t].words ? (int)((models[t].words[i >> 6] >> (i & 63)) & 1)               \
                                 : (int)((1 ^ ((key - models[t].lowest) >> 31)) & (1 ^ ((models[t].highest - key) >> 31))); \
      if (models[t].scale != 1) d = (float)((double)d * models[t].scale);                         \
      if (!kept) d = 0;                                                                           \
      products[t] = models[t].weight * (double)d;                                                 \
      total += products[t];                                                                       \
    }                                                                                             \
    double mixed = total;                                                                         \
    if (elect) {                                                                                  \
      uint64_t sum = mergekit_double_bits(total);                                                 \
      uint64_t negative = (sum >> 63) & (uint64_t)((sum << 1) != 0);                              \
      double divisor = 0;                                                                         \
      mixed = 0;                                                                                  \
      for (size_t t = 0; t < count; t++) {                                                        \
        uint64_t bits = mergekit_double_bits(products[t]);                                        \
        uint64_t agrees = 0 - ((uint64_t)((bits << 1) != 0) & ~((bits >> 63) ^ negative) & 1);    \
        mixed += mergekit_bits_double(bits & agrees);                                             \
        divisor += mergekit_bits_double(mergekit_double_bits(models[t].weight) & agrees);         \
      }                                                                                           \
      if (normalize) mixed /= divisor == 0 ? 1 : divisor;                                         \
    }                                                                                             \
    mergekit_store1(out, i, (float)((double)b + lambda * mixed), bf16_out);                       \
  }                                                                                               \
  __attribute__((target("avx512f"))) static inline void NAME(                                     \
      const void *base, const mergekit_consensus_model *models, size_t count, size_t first, size_t n, double lambda, \
      int normalize, int elect, void *out, int bf16_out) {                                        \
    const __m512d lambdas = _mm512_set1_pd(lambda);                                               \
    size_t i = first, end = first + n;                                                            \
    MERGEKIT_CONSENSUS_STEPS(NAME##_step, 16);                                                    \
    for (; i < end; i++) NAME##_one(base, models, count, i, lambda, normalize, elect, out, bf16_out);              \
  }
/// The weighted sum `Kernels.weightedSum` computes from stored elements, to the bit, over
/// elements `first ..< first + n`: per element, `sum = 0 + w_0 x_0`, then `sum += w_t x_t` in
/// double, where `x_t` is term t's value (minus the base's, rounded to float, when `subtract`);
/// the result `(float)(base + scale * sum)`, or `(float)(0 + scale * sum)` without a base, stored
/// as floats or, when `bf16_out`, as BF16. Every input has the loader's dtype. Sixteen elements
/// a step.
#define MERGEKIT_WEIGHTED_SUM(NAME, LOAD16, LOAD1)                                                \
  __attribute__((target("avx512f"), always_inline)) static inline void NAME##_step(               \
      const void *const *terms, const double *weights, size_t count, const void *base, int subtract, \
      __m512d scale, size_t i, void *out, int bf16_out) {                                         \
    const __m512d zero = _mm512_setzero_pd();                                                     \
    __m512 b = base ? LOAD16(base, i) : _mm512_setzero_ps();                                      \
    __m512d sum[2] = {zero, zero};                                                                \
    _Pragma("unroll") for (size_t t = 0; t < count; t++) {                                        \
      __m512 x = LOAD16(terms[t], i);                                                             \
      if (subtract) x = _mm512_sub_ps(x, b);                                                      \
      const __m512d w = _mm512_set1_pd(weights[t]);                                              \
      sum[0] = _mm512_add_pd(sum[0], _mm512_mul_pd(w, mergekit_doubles_of_half(x, 0)));           \
      sum[1] = _mm512_add_pd(sum[1], _mm512_mul_pd(w, mergekit_doubles_of_half(x, 1)));           \
    }                                                                                             \
    __m256 merged[2];                                                                             \
    _Pragma("unroll") for (int h = 0; h < 2; h++) {                                               \
      __m512d first = base ? mergekit_doubles_of_half(b, h) : zero;                               \
      merged[h] = _mm512_cvtpd_ps(_mm512_add_pd(first, _mm512_mul_pd(scale, sum[h])));            \
    }                                                                                             \
    mergekit_store16(out, i, merged[0], merged[1], bf16_out);                                     \
  }                                                                                               \
  static inline void NAME##_one(const void *const *terms, const double *weights, size_t count, const void *base, \
                                int subtract, double scale, size_t i, void *out, int bf16_out) {  \
    float b = base ? LOAD1(base, i) : 0;                                                          \
    double sum = 0;                                                                               \
    for (size_t t = 0; t < count; t++) {                                                          \
      float x = LOAD1(terms[t], i);                                                               \
      if (subtract) x = x - b;                                                                    \
      sum = sum + weights[t] * (double)x;                                                         \
    }                                                                                             \
    mergekit_store1(out, i, (float)((base ? (double)b : 0.0) + scale * sum), bf16_out);           \
  }                                                                                               \
  __attribute__((target("avx512f"))) static inline void NAME(                                     \
      const void *const *terms, const double *weights, size_t count, const void *base, int subtract, double scale, \
      size_t first, size_t n, void *out, int bf16_out) {                                          \
    const __m512d scales = _mm512_set1_pd(scale);                                                 \
    size_t i = first, end = first + n;                                                            \
    /* The model count and whether the base is added or subtracted known to the compiler for  \
       the common cases. */                                                                     \
    int form = subtract ? 2 : (base ? 1 : 0);                                                     \
    switch (count <= 4 ? 3 * (int)count + form : -1) {                                            \
    case 3: for (; i + 16 <= end; i += 16) NAME##_step(terms, weights, 1, 0, 0, scales, i, out, bf16_out); break; \
    case 4: for (; i + 16 <= end; i += 16) NAME##_step(terms, weights, 1, base, 0, scales, i, out, bf16_out); break; \
    case 5: for (; i + 16 <= end; i += 16) NAME##_step(terms, weights, 1, base, 1, scales, i, out, bf16_out); break; \
    case 6: for (; i + 16 <= end; i += 16) NAME##_step(terms, weights, 2, 0, 0, scales, i, out, bf16_out); break; \
    case 7: for (; i + 16 <= end; i += 16) NAME##_step(terms, weights, 2, base, 0, scales, i, out, bf16_out); break; \
    case 8: for (; i + 16 <= end; i += 16) NAME##_step(terms, weights, 2, base, 1, scales, i, out, bf16_out); break; \
    case 9: for (; i + 16 <= end; i += 16) NAME##_step(terms, weights, 3, 0, 0, scales, i, out, bf16_out); break; \
    case 10: for (; i + 16 <= end; i += 16) NAME##_step(terms, weights, 3, base, 0, scales, i, out, bf16_out); break; \
    case 11: for (; i + 16 <= end; i += 16) NAME##_step(terms, weights, 3, base, 1, scales, i, out, bf16_out); break; \
    case 12: for (; i + 16 <= end; i += 16) NAME##_step(terms, weights, 4, 0, 0, scales, i, out, bf16_out); break; \
    case 13: for (; i + 16 <= end; i += 16) NAME##_step(terms, weights, 4, base, 0, scales, i, out, bf16_out); break; \
    case 14: for (; i + 16 <= end; i += 16) NAME##_step(terms, weights, 4, base, 1, scales, i, out, bf16_out); break; \
    default: for (; i + 16 <= end; i += 16) NAME##_step(terms, weights, count, base, subtract, scales, i, out, bf16_out); break; \
    }                                                                                             \
    for (; i < end; i++) NAME##_one(terms, weights, count, base, subtract, scale, i, out, bf16_out); \
  }
MERGEKIT_WEIGHTED_SUM(mergekit_weighted_sum_bf16_avx512, mergekit_bf16_floats, mergekit_bf16_one)
MERGEKIT_WEIGHTED_SUM(mergekit_weighted_sum_f32_avx512, mergekit_f32_floats, mergekit_f32_one)
#undef MERGEKIT_WEIGHTED_SUM
MERGEKIT_SPARSE_CONSENSUS(mergekit_sparse_consensus_bf16_avx512, mergekit_bf16_floats, mergekit_bf16_one)
MERGEKIT_SPARSE_CONSENSUS(mergekit_sparse_consensus_f32_avx512, mergekit_f32_floats, mergekit_f32_one)
#undef MERGEKIT_SPARSE_CONSENSUS
/// Arcee fusion's importances `|m - b| * factor` in double (each float widened exactly, the
/// difference's sign bit cleared) of 8 elements; `..._keys8`: as their order-preserving keys
/// (`Kernels.orderKey`: the sign bit set for positive values, every bit flipped for negative).
__attribute__((target("avx512f"), always_inline)) static inline __m512d mergekit_importances8(
    __m512d m, __m512d b, __m512d factor) {
  __m512i magnitude = _mm512_and_si512(_mm512_castpd_si512(_mm512_sub_pd(m, b)), _mm512_set1_epi64(INT64_MAX));
  return _mm512_mul_pd(_mm512_castsi512_pd(magnitude), factor);
}
__attribute__((target("avx512f"), always_inline)) static inline __m512i mergekit_importance_keys8(
    __m512d m, __m512d b, __m512d factor) {
  __m512i bits = _mm512_castpd_si512(mergekit_importances8(m, b, factor));
  return _mm512_xor_si512(bits, _mm512_or_si512(_mm512_srai_epi64(bits, 63), _mm512_set1_epi64(INT64_MIN)));
}
/// One element's importance, and its key.
static inline double mergekit_importance1(float m, float b, double factor) {
  return mergekit_bits_double(mergekit_double_bits((double)m - (double)b) & (uint64_t)INT64_MAX) * factor;
}
static inline uint64_t mergekit_importance_key1(float m, float b, double factor) {
  uint64_t bits = mergekit_double_bits(mergekit_importance1(m, b, factor));
  return bits ^ ((0 - (bits >> 63)) | ((uint64_t)1 << 63));
}
/// The key loops' last elements `i ..< end`, one at a time: each key in one of the ranges is
/// written at `out[found]`, `found` counting on; returns the new count.
static inline size_t mergekit_importance_keys_rest(const void *model, const void *base, size_t i, size_t end,
                                                   double factor, const uint64_t *lows, const uint64_t *highs,
                                                   uint64_t *out, size_t found, float (*load)(const void *, size_t)) {
  for (; i < end; i++) {
    uint64_t k = mergekit_importance_key1(load(model, i), load(base, i), factor);
    if ((k >= lows[0] && k <= highs[0]) || (k >= lows[1] && k <= highs[1]) || (k >= lows[2] && k <= highs[2]))
      out[found++] = k;
  }
  return found;
}
/// The importance keys (`mergekit_importance_keys8`) of elements `first ..< first + n` of one
/// row segment (one `factor`) of a model and a base of the loader's dtype that lie in one of
/// the three key ranges `lows[q] ... highs[q]`, written to `out` in element order; returns how
/// many. `out` has room for `n + 8` keys: each step stores a whole vector of its matching keys
/// packed to the front.
#define MERGEKIT_IMPORTANCE_KEYS(NAME, LOAD16, LOAD1)                                             \
  __attribute__((target("avx512f"))) static inline size_t NAME(                                   \
      const void *model, const void *base, size_t first, size_t n, double factor, const uint64_t *lows, \
      const uint64_t *highs, uint64_t *out) {                                                     \
    const __m512d f = _mm512_set1_pd(factor);                                                     \
    const __m512i l0 = _mm512_set1_epi64((long long)lows[0]), h0 = _mm512_set1_epi64((long long)highs[0]); \
    const __m512i l1 = _mm512_set1_epi64((long long)lows[1]), h1 = _mm512_set1_epi64((long long)highs[1]); \
    const __m512i l2 = _mm512_set1_epi64((long long)lows[2]), h2 = _mm512_set1_epi64((long long)highs[2]); \
    size_t i = first, end = first + n, found = 0;                                                 \
    for (; i + 16 <= end; i += 16) {                                                              \
      __m512 m = LOAD16(model, i), b = LOAD16(base, i);                                           \
      _Pragma("unroll") for (int h = 0; h < 2; h++) {                                             \
        __m512i k = mergekit_importance_keys8(mergekit_doubles_of_half(m, h), mergekit_doubles_of_half(b, h), f); \
        __mmask8 hit = (_mm512_cmpge_epu64_mask(k, l0) & _mm512_cmple_epu64_mask(k, h0)) |        \
                       (_mm512_cmpge_epu64_mask(k, l1) & _mm512_cmple_epu64_mask(k, h1)) |        \
                       (_mm512_cmpge_epu64_mask(k, l2) & _mm512_cmple_epu64_mask(k, h2));         \
        _mm512_storeu_si512((void *)(out + found), _mm512_maskz_compress_epi64(hit, k));          \
        found += (size_t)__builtin_popcount((unsigned)hit);                                       \
      }                                                                                           \
    }                                                                                             \
    return mergekit_importance_keys_rest(model, base, i, end, factor, lows, highs, out, found, LOAD1); \
  }
MERGEKIT_IMPORTANCE_KEYS(mergekit_importance_keys_bf16_avx512, mergekit_bf16_floats, mergekit_bf16_one)
MERGEKIT_IMPORTANCE_KEYS(mergekit_importance_keys_f32_avx512, mergekit_f32_floats, mergekit_f32_one)
#undef MERGEKIT_IMPORTANCE_KEYS
/// Arcee fusion's fused elements `first ..< first + n` of one row segment: the model's value
/// where its importance `|m - b| * factor` (in double) is at least `threshold`, else the base's,
/// stored as floats or, when `bf16_out`, as BF16 (`mergekit_store16`'s rounding).
#define MERGEKIT_FUSE_BY_IMPORTANCE(NAME, LOAD16, LOAD1)                                          \
  __attribute__((target("avx512f"))) static inline void NAME(                                     \
      const void *model, const void *base, size_t first, size_t n, double factor, double threshold, void *out, \
      int bf16_out) {                                                                             \
    const __m512d f = _mm512_set1_pd(factor), t = _mm512_set1_pd(threshold);                      \
    size_t i = first, end = first + n;                                                            \
    for (; i + 16 <= end; i += 16) {                                                              \
      __m512 m = LOAD16(model, i), b = LOAD16(base, i);                                           \
      __m256 chosen[2];                                                                           \
      _Pragma("unroll") for (int h = 0; h < 2; h++) {                                             \
        __m512d md = mergekit_doubles_of_half(m, h), bd = mergekit_doubles_of_half(b, h);         \
        __mmask8 keep = _mm512_cmp_pd_mask(mergekit_importances8(md, bd, f), t, _CMP_GE_OQ);       \
        chosen[h] = _mm512_cvtpd_ps(_mm512_mask_mov_pd(bd, keep, md));                            \
      }                                                                                           \
      mergekit_store16(out, i, chosen[0], chosen[1], bf16_out);                                   \
    }                                                                                             \
    for (; i < end; i++) {                                                                        \
      float m = LOAD1(model, i), b = LOAD1(base, i);                                              \
      mergekit_store1(out, i, mergekit_importance1(m, b, factor) >= threshold ? m : b, bf16_out);  \
    }                                                                                             \
  }
MERGEKIT_FUSE_BY_IMPORTANCE(mergekit_fuse_by_importance_bf16_avx512, mergekit_bf16_floats, mergekit_bf16_one)
MERGEKIT_FUSE_BY_IMPORTANCE(mergekit_fuse_by_importance_f32_avx512, mergekit_f32_floats, mergekit_f32_one)
#undef MERGEKIT_FUSE_BY_IMPORTANCE
#undef MERGEKIT_CONSENSUS_KEEP
#undef MERGEKIT_ABSOLUTE_SUMS_STEP
#undef MERGEKIT_ABSOLUTE_SUMS_STORE
#undef MERGEKIT_PAIR_DOTS
#undef MERGEKIT_PAIR_DOTS_STEP
#undef MERGEKIT_PAIR_DOTS_STEP2
#undef MERGEKIT_PAIR_DOTS_STORE
#undef MERGEKIT_PAIR_DOTS_STORE2
/// `CounterRNG.bits32` of 16 consecutive counters `low + j` (j = 0 ..< 16, the low words
/// wrapping into `high + 1`): two rounds of the 32-bit multiply-xorshift mix.
__attribute__((target("avx512f"))) static inline __m512i mergekit_bits32_16(uint32_t low, uint32_t high,
                                                                           uint64_t key) {
  const __m512i lows = _mm512_add_epi32(_mm512_set1_epi32((int)low),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 wrapped = _mm512_cmplt_epu32_mask(lows, _mm512_set1_epi32((int)low));
  const __m512i highs = _mm512_mask_add_epi32(_mm512_set1_epi32((int)high), wrapped, _mm512_set1_epi32((int)high),
                                              _mm512_set1_epi32(1));
  __m512i x = _mm512_xor_si512(
      _mm512_xor_si512(_mm512_mullo_epi32(lows, _mm512_set1_epi32((int)0x9E3779B9u)), _mm512_set1_epi32((int)(uint32_t)key)),
      _mm512_mullo_epi32(highs, _mm512_set1_epi32((int)0x85EBCA6Bu)));
  for (int round = 0; round < 2; round++) {
    if (round == 1) x = _mm512_xor_si512(x, _mm512_set1_epi32((int)(uint32_t)(key >> 32)));
    x = _mm512_mullo_epi32(_mm512_xor_si512(x, _mm512_srli_epi32(x, 16)), _mm512_set1_epi32((int)0x7FEB352Du));
    x = _mm512_mullo_epi32(_mm512_xor_si512(x, _mm512_srli_epi32(x, 15)), _mm512_set1_epi32((int)0x846CA68Bu));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  }
  return x;
}

/// DARE's draws packed into words (`Kernels.randomKeepBits`): words `first ..< first + n` of a
/// slice of `count` elements whose element i has counter `offset + i`; bit k of word w is set
/// when `64 w + k < count` and `CounterRNG.bits32(offset + 64 w + k) < bound`. Sixteen draws a
/// step, their comparison's mask the bits themselves.
__attribute__((target("avx512f"))) static inline void mergekit_random_keep_bits_avx512(
    uint64_t key, uint64_t offset, size_t count, uint32_t bound, size_t first, size_t n, uint64_t *out) {
  const __m512i bounds = _mm512_set1_epi32((int)bound);
  for (size_t w = first; w < first + n; w++) {
    uint64_t word = 0;
    for (int part = 0; part < 4; part++) {
      uint64_t counter = offset + 64 * (uint64_t)w + 16 * (uint64_t)part;
      __m512i draws = mergekit_bits32_16((uint32_t)counter, (uint32_t)(counter >> 32), key);
      word |= (uint64_t)_mm512_cmplt_epu32_mask(draws, bounds) << (16 * part);
    }
    size_t valid = count - 64 * w;
    if (valid < 64) word &= ((uint64_t)1 << valid) - 1;
    out[w] = word;
  }
}

#else
static inline int mergekit_has_avx512(void) { return 0; }
static inline void mergekit_pair_dots_bf16_avx512(
    const void *a, const void *b, size_t first, size_t blocks, size_t block, double *out) {
  (void)a; (void)b; (void)first; (void)blocks; (void)block; (void)out;
}
static inline void mergekit_pair_dots_f32_avx512(
    const void *a, const void *b, size_t first, size_t blocks, size_t block, double *out) {
  (void)a; (void)b; (void)first; (void)blocks; (void)block; (void)out;
}
static inline void mergekit_absolute_sums_avx512(
    const float *v, const uint64_t *keep, size_t first, size_t blocks, size_t block, double *out) {
  (void)v; (void)keep; (void)first; (void)blocks; (void)block; (void)out;
}
static inline void mergekit_sparse_consensus_bf16_avx512(
    const void *base, const mergekit_consensus_model *models, size_t count, size_t first, size_t n, double lambda,
    int normalize, int elect, void *out, int bf16_out) {
  (void)base; (void)models; (void)count; (void)first; (void)n; (void)lambda; (void)normalize; (void)elect; (void)out;
  (void)bf16_out;
}
static inline void mergekit_weighted_sum_bf16_avx512(
    const void *const *terms, const double *weights, size_t count, const void *base, int subtract, double scale,
    size_t first, size_t n, void *out, int bf16_out) {
  (void)terms; (void)weights; (void)count; (void)base; (void)subtract; (void)scale; (void)first; (void)n;
  (void)out; (void)bf16_out;
}
static inline void mergekit_weighted_sum_f32_avx512(
    const void *const *terms, const double *weights, size_t count, const void *base, int subtract, double scale,
    size_t first, size_t n, void *out, int bf16_out) {
  (void)terms; (void)weights; (void)count; (void)base; (void)subtract; (void)scale; (void)first; (void)n;
  (void)out; (void)bf16_out;
}
static inline void mergekit_sparse_consensus_f32_avx512(
    const void *base, const mergekit_consensus_model *models, size_t count, size_t first, size_t n, double lambda,
    int normalize, int elect, void *out, int bf16_out) {
  (void)base; (void)models; (void)count; (void)first; (void)n; (void)lambda; (void)normalize; (void)elect; (void)out;
  (void)bf16_out;
}
typedef struct {
  const void *first;
  const void *second;
} mergekit_key_source;
static inline void mergekit_absolute_sums_bf16_differences_avx512(
    mergekit_key_source v, const uint64_t *keep, size_t first, size_t blocks, size_t block, double *out) {
  (void)v; (void)keep; (void)first; (void)blocks; (void)block; (void)out;
}
static inline size_t mergekit_bracket_summary_avx512(
    mergekit_key_source source, size_t n, uint32_t low, uint32_t high, uint64_t counts[4], uint32_t *out) {
  (void)source; (void)n; (void)low; (void)high; (void)out;
  counts[0] = counts[1] = counts[2] = counts[3] = 0;
  return 0;
}
static inline size_t mergekit_bracket_summary_bf16_differences_avx512(
    mergekit_key_source source, size_t n, uint32_t low, uint32_t high, uint64_t counts[4], uint32_t *out) {
  return mergekit_bracket_summary_avx512(source, n, low, high, counts, out);
}
static inline size_t mergekit_importance_keys_bf16_avx512(
    const void *model, const void *base, size_t first, size_t n, double factor, const uint64_t *lows,
    const uint64_t *highs, uint64_t *out) {
  (void)model; (void)base; (void)first; (void)n; (void)factor; (void)lows; (void)highs; (void)out;
  return 0;
}
static inline size_t mergekit_importance_keys_f32_avx512(
    const void *model, const void *base, size_t first, size_t n, double factor, const uint64_t *lows,
    const uint64_t *highs, uint64_t *out) {
  (void)model; (void)base; (void)first; (void)n; (void)factor; (void)lows; (void)highs; (void)out;
  return 0;
}
static inline void mergekit_fuse_by_importance_bf16_avx512(
    const void *model, const void *base, size_t first, size_t n, double factor, double threshold, void *out,
    int bf16_out) {
  (void)model; (void)base; (void)first; (void)n; (void)factor; (void)threshold; (void)out; (void)bf16_out;
}
static inline void mergekit_fuse_by_importance_f32_avx512(
    const void *model, const void *base, size_t first, size_t n, double factor, double threshold, void *out,
    int bf16_out) {
  (void)model; (void)base; (void)first; (void)n; (void)factor; (void)threshold; (void)out; (void)bf16_out;
}
static inline void mergekit_random_keep_bits_avx512(
    uint64_t key, uint64_t offset, size_t count, uint32_t bound, size_t first, size_t n, uint64_t *out) {
  (void)key; (void)offset; (void)count; (void)bound; (void)first; (void)n; (void)out;
}
#endif
#include "kernels_avx2.h"
