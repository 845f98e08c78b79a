#pragma once
// Element loops that need instructions Swift's SIMD types cannot express (AVX-512's compress).
// Each is compiled for AVX-512 only inside its own function (`target` attribute) and called
// only when `mergekit_has_avx512()` says the CPU and the OS support it; the Swift callers keep
// a portable loop for every other machine.
#include <stddef.h>
#include <stdint.h>

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

/// Counts of `bits[i] & 0x7FFFFFFF` (a float's magnitude key) against a bracket, for i < n:
/// counts[0] above `high`, counts[1] equal to `high`, counts[2] equal to `low`, counts[3]
/// strictly between `low` and `high`. Keys are below 2^31, so unsigned comparisons order them.
__attribute__((target("avx512f,popcnt"))) static inline void mergekit_bracket_counts_avx512(
    const uint32_t *bits, size_t n, uint32_t low, uint32_t high, uint64_t counts[4]) {
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i lo = _mm512_set1_epi32((int)low), hi = _mm512_set1_epi32((int)high);
  uint64_t above = 0, at_high = 0, at_low = 0, inside = 0;
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i b = _mm512_and_si512(_mm512_loadu_si512((const void *)(bits + i)), magnitude);
    above += (uint64_t)_mm_popcnt_u32(_mm512_cmpgt_epu32_mask(b, hi));
    at_high += (uint64_t)_mm_popcnt_u32(_mm512_cmpeq_epu32_mask(b, hi));
    at_low += (uint64_t)_mm_popcnt_u32(_mm512_cmpeq_epu32_mask(b, lo));
    inside += (uint64_t)_mm_popcnt_u32(_mm512_cmpgt_epu32_mask(b, lo) & _mm512_cmplt_epu32_mask(b, hi));
  }
  for (; i < n; i++) {
    uint32_t b = bits[i] & 0x7FFFFFFFu;
    above += b > high;
    at_high += b == high;
    at_low += b == low;
    inside += (b > low) & (b < high);
  }
  counts[0] = above;
  counts[1] = at_high;
  counts[2] = at_low;
  counts[3] = inside;
}

/// Writes the keys strictly between `low` and `high`, in order, to `out` and returns how many.
/// `out` must have room for that count plus 16: whole vectors are stored, and the lanes past the
/// count are overwritten by the next store or left as slack.
__attribute__((target("avx512f,popcnt"))) static inline size_t mergekit_bracket_collect_avx512(
    const uint32_t *bits, size_t n, uint32_t low, uint32_t high, uint32_t *out) {
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i lo = _mm512_set1_epi32((int)low), hi = _mm512_set1_epi32((int)high);
  size_t k = 0, i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512i b = _mm512_and_si512(_mm512_loadu_si512((const void *)(bits + i)), magnitude);
    __mmask16 m = _mm512_cmpgt_epu32_mask(b, lo) & _mm512_cmplt_epu32_mask(b, hi);
    // The compress into a register, then a full store, even of no lanes (no branch to
    // mispredict): the memory form of the compress is microcoded on some cores.
    _mm512_storeu_si512((void *)(out + k), _mm512_maskz_compress_epi32(m, b));
    k += (size_t)_mm_popcnt_u32(m);
  }
  for (; i < n; i++) {
    uint32_t b = bits[i] & 0x7FFFFFFFu;
    if (b > low && b < high) out[k++] = b;
  }
  return k;
}
#else
static inline int mergekit_has_avx512(void) { return 0; }
static inline void mergekit_bracket_counts_avx512(
    const uint32_t *bits, size_t n, uint32_t low, uint32_t high, uint64_t counts[4]) {
  (void)bits; (void)n; (void)low; (void)high;
  counts[0] = counts[1] = counts[2] = counts[3] = 0;
}
static inline size_t mergekit_bracket_collect_avx512(
    const uint32_t *bits, size_t n, uint32_t low, uint32_t high, uint32_t *out) {
  (void)bits; (void)n; (void)low; (void)high; (void)out;
  return 0;
}
#endif
