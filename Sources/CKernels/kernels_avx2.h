#pragma once
// The AVX2 forms of `kernels.h`'s element loops, for x86-64 machines without AVX-512 (AVX2 came
// with Haswell and Zen 1): eight floats or four doubles a step. Each loop does the same
// operations in the same order as its AVX-512 form and the Swift loops, so the results are the
// same to the bit (FP_CONTRACT OFF: no product is fused into a sum). Compiled for AVX2 only inside
// its functions (`target` attribute) and called only when `mergekit_has_avx2()` says so.
// Included by `kernels.h`, after the helpers it shares with the AVX-512 loops.

#if defined(__x86_64__)
#define MERGEKIT_AVX2 __attribute__((target("avx2,popcnt")))

/// 1 when the CPU has AVX2 and POPCNT, and the OS saves the 256-bit registers (XCR0 bits 1, 2).
static inline int mergekit_has_avx2(void) {
  unsigned int eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return 0;
  if (!(ecx & (1u << 27)) || !(ecx & (1u << 28)) || !(ecx & (1u << 23))) return 0;  // OSXSAVE, AVX, POPCNT
  unsigned int xcr0_low, xcr0_high;
  __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
  if ((xcr0_low & 0x6u) != 0x6u) return 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return 0;
  return (ebx & (1u << 5)) != 0;  // AVX2
}

/// Eight stored elements from `i` as floats: BF16 bit patterns, or floats.
MERGEKIT_AVX2 static inline __m256 mergekit_bf16_floats8(const void *p, size_t i) {
  __m128i halves = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}
MERGEKIT_AVX2 static inline __m256 mergekit_f32_floats8(const void *p, size_t i) {
  return _mm256_loadu_ps((const float *)p + i);
}

/// The sum of eight 32-bit lanes (each below 2^28).
MERGEKIT_AVX2 static inline uint64_t mergekit_lane_total8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return (uint64_t)(uint32_t)_mm_cvtsi128_si32(s);
}

/// AVX2 has no compress: entry m lists the set bits of m in increasing order, one per nibble
/// from the lowest (entry 0b10110 is 0x421), the lane order that moves the chosen lanes of a
/// vector of eight to its front.
static const uint32_t mergekit_compress_order8[256] = {
    0x00000000, 0x00000000, 0x00000001, 0x00000010, 0x00000002, 0x00000020, 0x00000021, 0x00000210,
    0x00000003, 0x00000030, 0x00000031, 0x00000310, 0x00000032, 0x00000320, 0x00000321, 0x00003210,
    0x00000004, 0x00000040, 0x00000041, 0x00000410, 0x00000042, 0x00000420, 0x00000421, 0x00004210,
    0x00000043, 0x00000430, 0x00000431, 0x00004310, 0x00000432, 0x00004320, 0x00004321, 0x00043210,
    0x00000005, 0x00000050, 0x00000051, 0x00000510, 0x00000052, 0x00000520, 0x00000521, 0x00005210,
    0x00000053, 0x00000530, 0x00000531, 0x00005310, 0x00000532, 0x00005320, 0x00005321, 0x00053210,
    0x00000054, 0x00000540, 0x00000541, 0x00005410, 0x00000542, 0x00005420, 0x00005421, 0x00054210,
    0x00000543, 0x00005430, 0x00005431, 0x00054310, 0x00005432, 0x00054320, 0x00054321, 0x00543210,
    0x00000006, 0x00000060, 0x00000061, 0x00000610, 0x00000062, 0x00000620, 0x00000621, 0x00006210,
    0x00000063, 0x00000630, 0x00000631, 0x00006310, 0x00000632, 0x00006320, 0x00006321, 0x00063210,
    0x00000064, 0x00000640, 0x00000641, 0x00006410, 0x00000642, 0x00006420, 0x00006421, 0x00064210,
    0x00000643, 0x00006430, 0x00006431, 0x00064310, 0x00006432, 0x00064320, 0x00064321, 0x00643210,
    0x00000065, 0x00000650, 0x00000651, 0x00006510, 0x00000652, 0x00006520, 0x00006521, 0x00065210,
    0x00000653, 0x00006530, 0x00006531, 0x00065310, 0x00006532, 0x00065320, 0x00065321, 0x00653210,
    0x00000654, 0x00006540, 0x00006541, 0x00065410, 0x00006542, 0x00065420, 0x00065421, 0x00654210,
    0x00006543, 0x00065430, 0x00065431, 0x00654310, 0x00065432, 0x00654320, 0x00654321, 0x06543210,
    0x00000007, 0x00000070, 0x00000071, 0x00000710, 0x00000072, 0x00000720, 0x00000721, 0x00007210,
    0x00000073, 0x00000730, 0x00000731, 0x00007310, 0x00000732, 0x00007320, 0x00007321, 0x00073210,
    0x00000074, 0x00000740, 0x00000741, 0x00007410, 0x00000742, 0x00007420, 0x00007421, 0x00074210,
    0x00000743, 0x00007430, 0x00007431, 0x00074310, 0x00007432, 0x00074320, 0x00074321, 0x00743210,
    0x00000075, 0x00000750, 0x00000751, 0x00007510, 0x00000752, 0x00007520, 0x00007521, 0x00075210,
    0x00000753, 0x00007530, 0x00007531, 0x00075310, 0x00007532, 0x00075320, 0x00075321, 0x00753210,
    0x00000754, 0x00007540, 0x00007541, 0x00075410, 0x00007542, 0x00075420, 0x00075421, 0x00754210,
    0x00007543, 0x00075430, 0x00075431, 0x00754310, 0x00075432, 0x00754320, 0x00754321, 0x07543210,
    0x00000076, 0x00000760, 0x00000761, 0x00007610, 0x00000762, 0x00007620, 0x00007621, 0x00076210,
    0x00000763, 0x00007630, 0x00007631, 0x00076310, 0x00007632, 0x00076320, 0x00076321, 0x00763210,
    0x00000764, 0x00007640, 0x00007641, 0x00076410, 0x00007642, 0x00076420, 0x00076421, 0x00764210,
    0x00007643, 0x00076430, 0x00076431, 0x00764310, 0x00076432, 0x00764320, 0x00764321, 0x07643210,
    0x00000765, 0x00007650, 0x00007651, 0x00076510, 0x00007652, 0x00076520, 0x00076521, 0x00765210,
    0x00007653, 0x00076530, 0x00076531, 0x00765310, 0x00076532, 0x00765320, 0x00765321, 0x07653210,
    0x00007654, 0x00076540, 0x00076541, 0x00765410, 0x00076542, 0x00765420, 0x00765421, 0x07654210,
    0x00076543, 0x00765430, 0x00765431, 0x07654310, 0x00765432, 0x07654320, 0x07654321, 0x76543210,
};

/// The magnitude keys of eight elements from `i`: of floats' bit patterns, or of the float
/// differences of two BF16 arrays (`mergekit_keys_of_*` in eights).
MERGEKIT_AVX2 static inline __m256i mergekit_keys8_of_bits(mergekit_key_source s, size_t i) {
  return _mm256_and_si256(_mm256_loadu_si256((const __m256i *)((const uint32_t *)s.first + i)),
                          _mm256_set1_epi32(0x7FFFFFFF));
}
MERGEKIT_AVX2 static inline __m256i mergekit_keys8_of_bf16_differences(mergekit_key_source s, size_t i) {
  __m256 difference = _mm256_sub_ps(mergekit_bf16_floats8(s.first, i), mergekit_bf16_floats8(s.second, i));
  return _mm256_and_si256(_mm256_castps_si256(difference), _mm256_set1_epi32(0x7FFFFFFF));
}

/// `mergekit_bracket_summary_*` in eights: the same counts and inside keys. Keys, `low` and
/// `high` are below 2^31, so signed comparisons order them; a comparison's lanes are -1 where it
/// holds, subtracted from the per-lane counts. The inside keys move to the front of their vector
/// by the compress table, and the whole vector is stored (no branch).
#define MERGEKIT_BRACKET_SUMMARY_AVX2(NAME, KEYS, KEYS_ONE)                                      \
  MERGEKIT_AVX2 static inline size_t NAME(mergekit_key_source source, size_t n, uint32_t low, uint32_t high, \
                                          uint64_t counts[4], uint32_t *out) {                   \
    const __m256i lo = _mm256_set1_epi32((int)low), hi = _mm256_set1_epi32((int)high);           \
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), nibble = _mm256_set1_epi32(0xF); \
    __m256i above = _mm256_setzero_si256(), at_high = above, at_low = above;                     \
    uint64_t above_total = 0, at_high_total = 0, at_low_total = 0;                               \
    size_t k = 0, i = 0;                                                                         \
    while (i + 8 <= n) {                                                                         \
      /* Lanes count to at most 2^20 before they are added up: no overflow. */                  \
      size_t end = i + ((n - i) / 8 < (1u << 20) ? (n - i) / 8 : (1u << 20)) * 8;                \
      for (; i < end; i += 8) {                                                                  \
        __m256i b = KEYS(source, i);                                                             \
        above = _mm256_sub_epi32(above, _mm256_cmpgt_epi32(b, hi));                              \
        at_high = _mm256_sub_epi32(at_high, _mm256_cmpeq_epi32(b, hi));                          \
        at_low = _mm256_sub_epi32(at_low, _mm256_cmpeq_epi32(b, lo));                            \
        __m256i inside = _mm256_and_si256(_mm256_cmpgt_epi32(b, lo), _mm256_cmpgt_epi32(hi, b)); \
        unsigned m = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(inside));                  \
        __m256i order = _mm256_and_si256(                                                        \
            _mm256_srlv_epi32(_mm256_set1_epi32((int)mergekit_compress_order8[m]), shifts), nibble); \
        _mm256_storeu_si256((__m256i *)(out + k), _mm256_permutevar8x32_epi32(b, order));         \
        k += (size_t)_mm_popcnt_u32(m);                                                          \
      }                                                                                          \
      above_total += mergekit_lane_total8(above);                                                \
      at_high_total += mergekit_lane_total8(at_high);                                            \
      at_low_total += mergekit_lane_total8(at_low);                                              \
      above = at_high = at_low = _mm256_setzero_si256();                                         \
    }                                                                                            \
    for (; i < n; i++) {                                                                         \
      uint32_t b = KEYS_ONE(source, i);                                                          \
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
MERGEKIT_BRACKET_SUMMARY_AVX2(mergekit_bracket_summary_avx2, mergekit_keys8_of_bits, mergekit_keys_of_bits_one)
MERGEKIT_BRACKET_SUMMARY_AVX2(mergekit_bracket_summary_bf16_differences_avx2, mergekit_keys8_of_bf16_differences,
                              mergekit_keys_of_bf16_differences_one)
#undef MERGEKIT_BRACKET_SUMMARY_AVX2

/// The keep lanes (-1 kept, 0 dropped) of eight elements from `i`: by packed flags (any `i`),
/// or by the band `lowest ... highest` of the deltas' magnitude keys (kept when neither
/// `key - lowest` nor `highest - key` has its sign bit set, as the AVX-512 loop tests them).
MERGEKIT_AVX2 static inline __m256i mergekit_flag_lanes8(const uint64_t *words, size_t i) {
  size_t shift = i & 63;
  uint64_t v = words[i >> 6] >> shift;
  if (shift > 56) v |= words[(i >> 6) + 1] << (64 - shift);
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)(v & 0xFFu)), bits), bits);
}
MERGEKIT_AVX2 static inline __m256i mergekit_band_lanes8(__m256 d, uint32_t lowest, uint32_t highest) {
  __m256i key = _mm256_and_si256(_mm256_castps_si256(d), _mm256_set1_epi32(0x7FFFFFFF));
  __m256i outside = _mm256_or_si256(_mm256_sub_epi32(key, _mm256_set1_epi32((int)lowest)),
                                    _mm256_sub_epi32(_mm256_set1_epi32((int)highest), key));
  return _mm256_cmpgt_epi32(outside, _mm256_set1_epi32(-1));
}

/// Eight floats to BF16 bits (`mergekit_bf16_of_floats` in eights).
MERGEKIT_AVX2 static inline __m128i mergekit_bf16_of_floats8(__m256 v) {
  const __m256i b = _mm256_castps_si256(v);
  const __m256i high = _mm256_srli_epi32(b, 16);
  __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7FFF)), _mm256_and_si256(high, _mm256_set1_epi32(1))), 16);
  __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7FFFFFFF)), _mm256_set1_epi32(0x7F800000));
  __m256i quiet = _mm256_or_si256(
      high, _mm256_and_si256(_mm256_cmpeq_epi32(_mm256_and_si256(high, _mm256_set1_epi32(0x7F)), _mm256_setzero_si256()),
                             _mm256_set1_epi32(0x40)));
  __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);
  // Every lane is at most 0xFFFF, so the unsigned pack keeps it; the pack works within 128-bit
  // halves, and the permute gathers their low quadwords.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

/// Eight results at `out + i` from two vectors of four, as floats or (`bf16_out`) BF16.
MERGEKIT_AVX2 static inline void mergekit_store8(void *out, size_t i, __m128 low, __m128 high, int bf16_out) {
  __m256 both = _mm256_insertf128_ps(_mm256_castps128_ps256(low), high, 1);
  if (bf16_out) {
    _mm_storeu_si128((__m128i *)((uint16_t *)out + i), mergekit_bf16_of_floats8(both));
  } else {
    _mm256_storeu_ps((float *)out + i, both);
  }
}

/// Floats `4h ..< 4h + 4` of `v` as doubles; `..._lanes`: 32-bit lanes `4h ..< 4h + 4` of `m`
/// widened to 64 bits (-1 stays -1).
MERGEKIT_AVX2 static inline __m256d mergekit_doubles_of_half8(__m256 v, int h) {
  return _mm256_cvtps_pd(h == 0 ? _mm256_castps256_ps128(v) : _mm256_extractf128_ps(v, 1));
}
MERGEKIT_AVX2 static inline __m256d mergekit_wide_lanes_of_half8(__m256i m, int h) {
  return _mm256_castsi256_pd(_mm256_cvtepi32_epi64(h == 0 ? _mm256_castsi256_si128(m) : _mm256_extracti128_si256(m, 1)));
}

/// `mergekit_sparse_consensus_*` in eights: the same operations in the same order. A dropped
/// delta becomes +0 before its product (after its rescaling, when it has one), as there.
#define MERGEKIT_SPARSE_CONSENSUS_AVX2(NAME, LOAD8, ONE)                                         \
  MERGEKIT_AVX2 __attribute__((always_inline)) static inline void NAME##_step(                  \
      const void *base, const mergekit_consensus_model *models, size_t count, size_t i, __m256d lambda, int normalize, \
      int elect, void *out, int bf16_out, int any_words, int any_scale) {                         \
    const __m256i magnitude64 = _mm256_set1_epi64x(0x7FFFFFFFFFFFFFFFll), zero = _mm256_setzero_si256(); \
    const __m256i sign64 = _mm256_set1_epi64x((long long)0x8000000000000000ull);                  \
    __m256 b = LOAD8(base, i);                                                                    \
    __m256d products[2][MERGEKIT_CONSENSUS_MODELS];                                               \
    __m256d total[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()};                                \
    _Pragma("unroll") for (size_t t = 0; t < count; t++) {                                        \
      __m256 d = _mm256_sub_ps(LOAD8(models[t].elements, i), b);                                  \
      __m256i keep = any_words && models[t].words ? mergekit_flag_lanes8(models[t].words, i)      \
                                                  : mergekit_band_lanes8(d, models[t].lowest, models[t].highest); \
      const int scaled = any_scale && models[t].scale != 1;                                       \
      if (!scaled) d = _mm256_and_ps(d, _mm256_castsi256_ps(keep));                               \
      const __m256d weight = _mm256_set1_pd(models[t].weight);                                    \
      _Pragma("unroll") for (int h = 0; h < 2; h++) {                                             \
        __m256d v = mergekit_doubles_of_half8(d, h);                                              \
        if (scaled) {                                                                             \
          v = _mm256_cvtps_pd(_mm256_cvtpd_ps(_mm256_mul_pd(v, _mm256_set1_pd(models[t].scale)))); \
          v = _mm256_and_pd(v, mergekit_wide_lanes_of_half8(keep, h));                            \
        }                                                                                         \
        products[h][t] = _mm256_mul_pd(weight, v);                                                \
        total[h] = _mm256_add_pd(total[h], products[h][t]);                                       \
      }                                                                                           \
    }                                                                                             \
    __m128 merged[2];                                                                             \
    _Pragma("unroll") for (int h = 0; h < 2; h++) {                                               \
      __m256d mixed = total[h];                                                                   \
      if (elect) {                                                                                \
        __m256i sum = _mm256_castpd_si256(total[h]);                                              \
        __m256i elected = _mm256_andnot_si256(_mm256_cmpeq_epi64(_mm256_and_si256(sum, magnitude64), zero), \
                                              _mm256_and_si256(sum, sign64));                     \
        __m256d divisor = _mm256_setzero_pd();                                                    \
        mixed = _mm256_setzero_pd();                                                              \
        _Pragma("unroll") for (size_t t = 0; t < count; t++) {                                    \
          __m256d agrees = _mm256_castsi256_pd(                                                   \
              _mm256_cmpgt_epi64(_mm256_xor_si256(_mm256_castpd_si256(products[h][t]), elected), zero)); \
          mixed = _mm256_add_pd(mixed, _mm256_and_pd(agrees, products[h][t]));                    \
          divisor = _mm256_add_pd(divisor, _mm256_and_pd(agrees, _mm256_set1_pd(models[t].weight))); \
        }                                                                                         \
        if (normalize)                                                                            \
          mixed = _mm256_div_pd(                                                                  \
              mixed, _mm256_blendv_pd(divisor, _mm256_set1_pd(1), _mm256_cmp_pd(divisor, _mm256_setzero_pd(), _CMP_EQ_OQ))); \
      }                                                                                           \
      merged[h] = _mm256_cvtpd_ps(_mm256_add_pd(mergekit_doubles_of_half8(b, h), _mm256_mul_pd(lambda, mixed))); \
    }                                                                                             \
    mergekit_store8(out, i, merged[0], merged[1], bf16_out);                                      \
  }                                                                                               \
  MERGEKIT_AVX2 static inline void NAME(const void *base, const mergekit_consensus_model *models, size_t count, \
                                        size_t first, size_t n, double lambda, int normalize, int elect, void *out, \
                                        int bf16_out) {                                          \
    const __m256d lambdas = _mm256_set1_pd(lambda);                                               \
    size_t i = first, end = first + n;                                                            \
    MERGEKIT_CONSENSUS_STEPS(NAME##_step, 8);                                                     \
    for (; i < end; i++) ONE(base, models, count, i, lambda, normalize, elect, out, bf16_out);           \
  }
MERGEKIT_SPARSE_CONSENSUS_AVX2(mergekit_sparse_consensus_bf16_avx2, mergekit_bf16_floats8,
                               mergekit_sparse_consensus_bf16_avx512_one)
MERGEKIT_SPARSE_CONSENSUS_AVX2(mergekit_sparse_consensus_f32_avx2, mergekit_f32_floats8,
                               mergekit_sparse_consensus_f32_avx512_one)
#undef MERGEKIT_SPARSE_CONSENSUS_AVX2

/// `mergekit_bits32_16` in eights: `CounterRNG.bits32` of counters `low + j` (j = 0 ..< 8, the
/// low words wrapping into `high + 1`).
MERGEKIT_AVX2 static inline __m256i mergekit_bits32_8(uint32_t low, uint32_t high, uint64_t key) {
  const __m256i lows = _mm256_add_epi32(_mm256_set1_epi32((int)low), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  // Unsigned `lows < low` as a signed comparison of both with their sign bits flipped.
  const __m256i flip = _mm256_set1_epi32((int)0x80000000u);
  const __m256i wrapped = _mm256_cmpgt_epi32(_mm256_xor_si256(_mm256_set1_epi32((int)low), flip),
                                             _mm256_xor_si256(lows, flip));
  const __m256i highs = _mm256_sub_epi32(_mm256_set1_epi32((int)high), wrapped);
  __m256i x = _mm256_xor_si256(
      _mm256_xor_si256(_mm256_mullo_epi32(lows, _mm256_set1_epi32((int)0x9E3779B9u)), _mm256_set1_epi32((int)(uint32_t)key)),
      _mm256_mullo_epi32(highs, _mm256_set1_epi32((int)0x85EBCA6Bu)));
  for (int round = 0; round < 2; round++) {
    if (round == 1) x = _mm256_xor_si256(x, _mm256_set1_epi32((int)(uint32_t)(key >> 32)));
    x = _mm256_mullo_epi32(_mm256_xor_si256(x, _mm256_srli_epi32(x, 16)), _mm256_set1_epi32((int)0x7FEB352Du));
    x = _mm256_mullo_epi32(_mm256_xor_si256(x, _mm256_srli_epi32(x, 15)), _mm256_set1_epi32((int)0x846CA68Bu));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  }
  return x;
}

/// `mergekit_random_keep_bits_avx512` in eights: the same words.
MERGEKIT_AVX2 static inline void mergekit_random_keep_bits_avx2(uint64_t key, uint64_t offset, size_t count,
                                                                uint32_t bound, size_t first, size_t n, uint64_t *out) {
  const __m256i flip = _mm256_set1_epi32((int)0x80000000u);
  const __m256i bounds = _mm256_xor_si256(_mm256_set1_epi32((int)bound), flip);
  for (size_t w = first; w < first + n; w++) {
    uint64_t word = 0;
    for (int part = 0; part < 8; part++) {
      uint64_t counter = offset + 64 * (uint64_t)w + 8 * (uint64_t)part;
      __m256i draws = mergekit_bits32_8((uint32_t)counter, (uint32_t)(counter >> 32), key);
      __m256i below = _mm256_cmpgt_epi32(bounds, _mm256_xor_si256(draws, flip));
      word |= (uint64_t)(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(below)) << (8 * part);
    }
    size_t valid = count - 64 * w;
    if (valid < 64) word &= ((uint64_t)1 << valid) - 1;
    out[w] = word;
  }
}

/// The magnitudes of eight elements from `i`, as floats: of floats, or of the float differences
/// of two BF16 arrays (`mergekit_key_source`: first the model, second the base, rounded as
/// `Kernels.differences` rounds them).
MERGEKIT_AVX2 static inline __m256 mergekit_magnitudes8(const float *v, size_t i) {
  return _mm256_and_ps(_mm256_loadu_ps(v + i), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
}
MERGEKIT_AVX2 static inline __m256 mergekit_bf16_difference_magnitudes8(mergekit_key_source s, size_t i) {
  __m256 difference = _mm256_sub_ps(mergekit_bf16_floats8(s.first, i), mergekit_bf16_floats8(s.second, i));
  return _mm256_and_ps(difference, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF)));
}

/// A block's four chains added as `(c0 + c1) + (c2 + c3)`.
MERGEKIT_AVX2 static inline double mergekit_chain_total4(__m256d v) {
  double lanes[4];
  _mm256_storeu_pd(lanes, v);
  return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

/// `mergekit_absolute_sums_*` for blocks of a multiple of 8 elements, with one block's four
/// chains in a vector of four lanes, two blocks swept side by side (a lone last block alone):
/// the same sums in the same order. Eight elements of a block are formed at once and added to
/// its chains as two quads, the first first. A dropped element adds +0 to the kept sum, as the
/// AVX-512 loop's masked move does.
#define MERGEKIT_ABSOLUTE_SUMS_AVX2_ADD(all, kept, half, flags, bits)                           \
  do {                                                                                           \
    __m256d mask = _mm256_castsi256_pd(_mm256_cmpeq_epi64(_mm256_and_si256(flags, bits), bits)); \
    all = _mm256_add_pd(all, half);                                                              \
    kept = _mm256_add_pd(kept, _mm256_and_pd(mask, half));                                       \
  } while (0)
#define MERGEKIT_ABSOLUTE_SUMS_AVX2(NAME, SOURCE, MAGNITUDES8)                                   \
  MERGEKIT_AVX2 static inline void NAME(SOURCE v, const uint64_t *keep, size_t first, size_t blocks, size_t block, \
                                        double *out) {                                           \
    const __m256i low_bits = _mm256_setr_epi64x(1, 2, 4, 8), high_bits = _mm256_setr_epi64x(16, 32, 64, 128); \
    for (size_t j = first, end = first + blocks; j < end; j += 2) {                              \
      size_t second = j + 1 < end ? block : 0; /* a lone block swept twice, stored once */       \
      __m256d all[2] = {_mm256_setzero_pd(), _mm256_setzero_pd()}, kept[2] = {all[0], all[0]};   \
      for (size_t i = j * block; i < (j + 1) * block; i += 8) {                                  \
        _Pragma("unroll") for (int s = 0; s < 2; s++) {                                          \
          size_t at = i + s * second;                                                            \
          __m256 d = MAGNITUDES8(v, at);                                                         \
          /* Eight flags from `at`, a multiple of 8: within one word. */                         \
          __m256i flags = _mm256_set1_epi64x((long long)((keep[at / 64] >> (at % 64)) & 0xFFu)); \
          MERGEKIT_ABSOLUTE_SUMS_AVX2_ADD(all[s], kept[s], _mm256_cvtps_pd(_mm256_castps256_ps128(d)), flags, low_bits); \
          MERGEKIT_ABSOLUTE_SUMS_AVX2_ADD(all[s], kept[s], _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1)), flags, high_bits); \
        }                                                                                        \
      }                                                                                          \
      for (int s = 0; s < (second ? 2 : 1); s++) {                                               \
        out[2 * (j + s)] = mergekit_chain_total4(all[s]);                                        \
        out[2 * (j + s) + 1] = mergekit_chain_total4(kept[s]);                                   \
      }                                                                                          \
    }                                                                                            \
  }
MERGEKIT_ABSOLUTE_SUMS_AVX2(mergekit_absolute_sums_avx2, const float *, mergekit_magnitudes8)
MERGEKIT_ABSOLUTE_SUMS_AVX2(mergekit_absolute_sums_bf16_differences_avx2, mergekit_key_source,
                            mergekit_bf16_difference_magnitudes8)
#undef MERGEKIT_ABSOLUTE_SUMS_AVX2

/// `mergekit_importance_keys8` in fours: AVX2 has no 64-bit arithmetic shift, so a negative
/// value's mask is a signed comparison with 0.
MERGEKIT_AVX2 __attribute__((always_inline)) static inline __m256i mergekit_importance_keys4(__m256d m, __m256d b,
                                                                                            __m256d factor) {
  __m256i magnitude = _mm256_and_si256(_mm256_castpd_si256(_mm256_sub_pd(m, b)), _mm256_set1_epi64x(INT64_MAX));
  __m256i bits = _mm256_castpd_si256(_mm256_mul_pd(_mm256_castsi256_pd(magnitude), factor));
  __m256i negative = _mm256_cmpgt_epi64(_mm256_setzero_si256(), bits);
  return _mm256_xor_si256(bits, _mm256_or_si256(negative, _mm256_set1_epi64x(INT64_MIN)));
}
/// `mergekit_importance_keys_*_avx512` in eights: the unsigned range tests as signed ones on
/// keys with the top bit flipped, the few matching keys picked out of a lane mask in order.
/// `out` has room for `n` keys.
#define MERGEKIT_IMPORTANCE_KEYS_AVX2(NAME, LOAD8, LOAD1)                                        \
  MERGEKIT_AVX2 static inline size_t NAME(const void *model, const void *base, size_t first, size_t n, double factor, \
                                          const uint64_t *lows, const uint64_t *highs, uint64_t *out) { \
    const __m256d f = _mm256_set1_pd(factor);                                                    \
    const __m256i flip = _mm256_set1_epi64x(INT64_MIN);                                          \
    __m256i l[3], h[3];                                                                          \
    for (int q = 0; q < 3; q++) {                                                                \
      l[q] = _mm256_xor_si256(_mm256_set1_epi64x((long long)lows[q]), flip);                     \
      h[q] = _mm256_xor_si256(_mm256_set1_epi64x((long long)highs[q]), flip);                    \
    }                                                                                            \
    size_t i = first, end = first + n, found = 0;                                                \
    for (; i + 8 <= end; i += 8) {                                                               \
      __m256 m = LOAD8(model, i), b = LOAD8(base, i);                                            \
      _Pragma("unroll") for (int half = 0; half < 2; half++) {                                   \
        __m256i k = mergekit_importance_keys4(mergekit_doubles_of_half8(m, half), mergekit_doubles_of_half8(b, half), f); \
        __m256i signed_k = _mm256_xor_si256(k, flip);                                            \
        __m256i outside = _mm256_set1_epi64x(-1);                                                \
        _Pragma("unroll") for (int q = 0; q < 3; q++) {                                          \
          outside = _mm256_and_si256(outside, _mm256_or_si256(_mm256_cmpgt_epi64(l[q], signed_k), \
                                                              _mm256_cmpgt_epi64(signed_k, h[q]))); \
        }                                                                                        \
        int hits = ~_mm256_movemask_pd(_mm256_castsi256_pd(outside)) & 0xF;                      \
        if (hits) {                                                                              \
          uint64_t lanes[4];                                                                     \
          _mm256_storeu_si256((__m256i *)lanes, k);                                              \
          for (; hits; hits &= hits - 1) out[found++] = lanes[__builtin_ctz((unsigned)hits)];     \
        }                                                                                        \
      }                                                                                          \
    }                                                                                            \
    return mergekit_importance_keys_rest(model, base, i, end, factor, lows, highs, out, found, LOAD1); \
  }
MERGEKIT_IMPORTANCE_KEYS_AVX2(mergekit_importance_keys_bf16_avx2, mergekit_bf16_floats8, mergekit_bf16_one)
MERGEKIT_IMPORTANCE_KEYS_AVX2(mergekit_importance_keys_f32_avx2, mergekit_f32_floats8, mergekit_f32_one)
#undef MERGEKIT_IMPORTANCE_KEYS_AVX2
#undef MERGEKIT_ABSOLUTE_SUMS_AVX2_ADD
#undef MERGEKIT_AVX2
#undef MERGEKIT_CONSENSUS_STEPS

#else
static inline int mergekit_has_avx2(void) { return 0; }
static inline size_t mergekit_importance_keys_bf16_avx2(const void *model, const void *base, size_t first, size_t n,
                                                        double factor, const uint64_t *lows, const uint64_t *highs,
                                                        uint64_t *out) {
  (void)model; (void)base; (void)first; (void)n; (void)factor; (void)lows; (void)highs; (void)out;
  return 0;
}
static inline size_t mergekit_importance_keys_f32_avx2(const void *model, const void *base, size_t first, size_t n,
                                                       double factor, const uint64_t *lows, const uint64_t *highs,
                                                       uint64_t *out) {
  (void)model; (void)base; (void)first; (void)n; (void)factor; (void)lows; (void)highs; (void)out;
  return 0;
}
static inline size_t mergekit_bracket_summary_avx2(
    mergekit_key_source source, size_t n, uint32_t low, uint32_t high, uint64_t counts[4], uint32_t *out) {
  return mergekit_bracket_summary_avx512(source, n, low, high, counts, out);
}
static inline size_t mergekit_bracket_summary_bf16_differences_avx2(
    mergekit_key_source source, size_t n, uint32_t low, uint32_t high, uint64_t counts[4], uint32_t *out) {
  return mergekit_bracket_summary_avx512(source, n, low, high, counts, out);
}
static inline void mergekit_sparse_consensus_bf16_avx2(
    const void *base, const mergekit_consensus_model *models, size_t count, size_t first, size_t n, double lambda,
    int normalize, int elect, void *out, int bf16_out) {
  mergekit_sparse_consensus_bf16_avx512(base, models, count, first, n, lambda, normalize, elect, out, bf16_out);
}
static inline void mergekit_sparse_consensus_f32_avx2(
    const void *base, const mergekit_consensus_model *models, size_t count, size_t first, size_t n, double lambda,
    int normalize, int elect, void *out, int bf16_out) {
  mergekit_sparse_consensus_f32_avx512(base, models, count, first, n, lambda, normalize, elect, out, bf16_out);
}
static inline void mergekit_random_keep_bits_avx2(
    uint64_t key, uint64_t offset, size_t count, uint32_t bound, size_t first, size_t n, uint64_t *out) {
  mergekit_random_keep_bits_avx512(key, offset, count, bound, first, n, out);
}
static inline void mergekit_absolute_sums_avx2(
    const float *v, const uint64_t *keep, size_t first, size_t blocks, size_t block, double *out) {
  mergekit_absolute_sums_avx512(v, keep, first, blocks, block, out);
}
static inline void mergekit_absolute_sums_bf16_differences_avx2(
    mergekit_key_source v, const uint64_t *keep, size_t first, size_t blocks, size_t block, double *out) {
  mergekit_absolute_sums_bf16_differences_avx512(v, keep, first, blocks, block, out);
}
#endif
