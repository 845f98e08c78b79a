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

/// Counts of the keys of n elements against a bracket: counts[0] above `high`, counts[1] equal
/// to `high`, counts[2] equal to `low`, counts[3] strictly between `low` and `high`. Keys are
/// below 2^31, so unsigned comparisons order them.
#define MERGEKIT_BRACKET_COUNTS(NAME, KEYS)                                                      \
  __attribute__((target("avx512f,popcnt"))) static inline void NAME(                            \
      mergekit_key_source source, size_t n, uint32_t low, uint32_t high, uint64_t counts[4]) {   \
    const __m512i lo = _mm512_set1_epi32((int)low), hi = _mm512_set1_epi32((int)high);           \
    uint64_t above = 0, at_high = 0, at_low = 0, inside = 0;                                     \
    size_t i = 0;                                                                                \
    for (; i + 16 <= n; i += 16) {                                                               \
      __m512i b = KEYS(source, i);                                                               \
      above += (uint64_t)_mm_popcnt_u32(_mm512_cmpgt_epu32_mask(b, hi));                         \
      at_high += (uint64_t)_mm_popcnt_u32(_mm512_cmpeq_epu32_mask(b, hi));                       \
      at_low += (uint64_t)_mm_popcnt_u32(_mm512_cmpeq_epu32_mask(b, lo));                        \
      inside += (uint64_t)_mm_popcnt_u32(_mm512_cmpgt_epu32_mask(b, lo) & _mm512_cmplt_epu32_mask(b, hi)); \
    }                                                                                            \
    for (; i < n; i++) {                                                                         \
      uint32_t b = KEYS##_one(source, i);                                                        \
      above += b > high;                                                                         \
      at_high += b == high;                                                                      \
      at_low += b == low;                                                                        \
      inside += (b > low) & (b < high);                                                          \
    }                                                                                            \
    counts[0] = above;                                                                           \
    counts[1] = at_high;                                                                         \
    counts[2] = at_low;                                                                          \
    counts[3] = inside;                                                                          \
  }

/// Writes the keys strictly between `low` and `high`, in order, to `out` and returns how many.
/// `out` must have room for that count plus 16: whole vectors are stored, and the lanes past the
/// count are overwritten by the next store or left as slack. The compress goes into a register,
/// then a full store, even of no lanes (no branch to mispredict): the memory form of the
/// compress is microcoded on some cores.
#define MERGEKIT_BRACKET_COLLECT(NAME, KEYS)                                                     \
  __attribute__((target("avx512f,popcnt"))) static inline size_t NAME(                          \
      mergekit_key_source source, size_t n, uint32_t low, uint32_t high, uint32_t *out) {        \
    const __m512i lo = _mm512_set1_epi32((int)low), hi = _mm512_set1_epi32((int)high);           \
    size_t k = 0, i = 0;                                                                         \
    for (; i + 16 <= n; i += 16) {                                                               \
      __m512i b = KEYS(source, i);                                                               \
      __mmask16 m = _mm512_cmpgt_epu32_mask(b, lo) & _mm512_cmplt_epu32_mask(b, hi);             \
      _mm512_storeu_si512((void *)(out + k), _mm512_maskz_compress_epi32(m, b));                 \
      k += (size_t)_mm_popcnt_u32(m);                                                            \
    }                                                                                            \
    for (; i < n; i++) {                                                                         \
      uint32_t b = KEYS##_one(source, i);                                                        \
      if (b > low && b < high) out[k++] = b;                                                     \
    }                                                                                            \
    return k;                                                                                    \
  }

MERGEKIT_BRACKET_COUNTS(mergekit_bracket_counts_avx512, mergekit_keys_of_bits)
MERGEKIT_BRACKET_COLLECT(mergekit_bracket_collect_avx512, mergekit_keys_of_bits)
MERGEKIT_BRACKET_COUNTS(mergekit_bracket_counts_bf16_differences_avx512, mergekit_keys_of_bf16_differences)
MERGEKIT_BRACKET_COLLECT(mergekit_bracket_collect_bf16_differences_avx512, mergekit_keys_of_bf16_differences)
#undef MERGEKIT_BRACKET_COUNTS
#undef MERGEKIT_BRACKET_COLLECT

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
#define MERGEKIT_ABSOLUTE_SUMS_STEP(i, k, all, kept)                                             \
  do {                                                                                           \
    __m512d d = mergekit_magnitudes_pair(v, i, k);                                               \
    all = _mm512_add_pd(all, d);                                                                 \
    kept = _mm512_add_pd(kept, _mm512_maskz_mov_pd(mergekit_keep_pair(keep, i, k), d));          \
  } while (0)
#define MERGEKIT_ABSOLUTE_SUMS_STORE(j, half, all, kept)                                         \
  do {                                                                                           \
    out[2 * (j)] = mergekit_chain_total(_mm512_extractf64x4_pd(all, half));                      \
    out[2 * (j) + 1] = mergekit_chain_total(_mm512_extractf64x4_pd(kept, half));                 \
  } while (0)
__attribute__((target("avx512f"))) static inline void mergekit_absolute_sums_avx512(
    const float *v, const uint64_t *keep, size_t first, size_t blocks, size_t block, double *out) {
  size_t j = first, end = first + blocks;
  for (; j + 4 <= end; j += 4) {
    __m512d all0 = _mm512_setzero_pd(), kept0 = all0, all1 = all0, kept1 = all0;
    for (size_t i = j * block; i < (j + 1) * block; i += 4) {
      MERGEKIT_ABSOLUTE_SUMS_STEP(i, i + block, all0, kept0);
      MERGEKIT_ABSOLUTE_SUMS_STEP(i + 2 * block, i + 3 * block, all1, kept1);
    }
    MERGEKIT_ABSOLUTE_SUMS_STORE(j, 0, all0, kept0);
    MERGEKIT_ABSOLUTE_SUMS_STORE(j + 1, 1, all0, kept0);
    MERGEKIT_ABSOLUTE_SUMS_STORE(j + 2, 0, all1, kept1);
    MERGEKIT_ABSOLUTE_SUMS_STORE(j + 3, 1, all1, kept1);
  }
  for (; j < end; j += 2) {
    size_t second = j + 1 < end ? block : 0;  // a lone block paired with itself
    __m512d all = _mm512_setzero_pd(), kept = all;
    for (size_t i = j * block; i < (j + 1) * block; i += 4) MERGEKIT_ABSOLUTE_SUMS_STEP(i, i + second, all, kept);
    MERGEKIT_ABSOLUTE_SUMS_STORE(j, 0, all, kept);
    if (second) MERGEKIT_ABSOLUTE_SUMS_STORE(j + 1, 1, all, kept);
  }
}
#undef MERGEKIT_ABSOLUTE_SUMS_STEP
#undef MERGEKIT_ABSOLUTE_SUMS_STORE
#undef MERGEKIT_PAIR_DOTS
#undef MERGEKIT_PAIR_DOTS_STEP
#undef MERGEKIT_PAIR_DOTS_STEP2
#undef MERGEKIT_PAIR_DOTS_STORE
#undef MERGEKIT_PAIR_DOTS_STORE2
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
typedef struct {
  const void *first;
  const void *second;
} mergekit_key_source;
static inline void mergekit_bracket_counts_avx512(
    mergekit_key_source source, size_t n, uint32_t low, uint32_t high, uint64_t counts[4]) {
  (void)source; (void)n; (void)low; (void)high;
  counts[0] = counts[1] = counts[2] = counts[3] = 0;
}
static inline size_t mergekit_bracket_collect_avx512(
    mergekit_key_source source, size_t n, uint32_t low, uint32_t high, uint32_t *out) {
  (void)source; (void)n; (void)low; (void)high; (void)out;
  return 0;
}
static inline void mergekit_bracket_counts_bf16_differences_avx512(
    mergekit_key_source source, size_t n, uint32_t low, uint32_t high, uint64_t counts[4]) {
  mergekit_bracket_counts_avx512(source, n, low, high, counts);
}
static inline size_t mergekit_bracket_collect_bf16_differences_avx512(
    mergekit_key_source source, size_t n, uint32_t low, uint32_t high, uint32_t *out) {
  return mergekit_bracket_collect_avx512(source, n, low, high, out);
}
#endif
