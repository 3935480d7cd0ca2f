// The rows of the CPU PDL forward: per (b, c) row, sort pred and target values, reduce
// |diff|^p, and keep what the permutation-cached backward needs (see pdl.cpp). Free of ATen, so
// that pdl_avx2.cpp can compile it for AVX2 (cpu/isa.h).
#pragma once

#include <vector>

#include "cpu/isa.h"
#include "cpu/radix_sort.h"

namespace fastloss {

// Where the rows are and where their results go: pred and target [B, C, N] with any strides,
// and the outputs of pdl_forward (contiguous). A plain aggregate: shared by every instruction set.
template <typename scalar_t, typename acc_t>
struct PdlRows {
  const scalar_t* pred;
  const scalar_t* target;
  int64_t C, N;
  int64_t psb, psc, psn, tsb, tsc, tsn;  // strides
  int64_t p;
  bool target_grad;
  acc_t* w;           // [B, C]
  int32_t* perm;      // [B, C, N]
  int32_t* perm_t;    // [B, C, N] when target_grad
  int8_t* sign;       // [B, C, N] for p = 1
  acc_t* deriv2;      // [B, C, N] for p = 2
};

inline namespace FASTLOSS_CPU_ISA {

// Per-thread scratch for one row: pred items (key + position), target items or keys. The
// sorted outputs have the slack that load_and_sort's stores need.
template <typename acc_t>
struct RowScratch {
  using K = typename KeyOf<acc_t>::type;
  std::vector<Keyed<acc_t>> pred, target, tmp;
  std::vector<K> tkeys, ktmp;
  RowScratch(int64_t n, bool target_idx)
      : pred(n + kSlack), target(target_idx ? n + kSlack : 0), tmp(n), tkeys(target_idx ? 0 : n + kSlack),
        ktmp(target_idx ? 0 : n) {}
};

#if defined(FASTLOSS_AVX2)
namespace simd {

// float values of 8 order-preserving keys (key_to_float).
inline __m256 values8(__m256i k) {
  const __m256i sign = _mm256_set1_epi32(int32_t(0x80000000u));
  const __m256i negative = _mm256_cmpeq_epi32(_mm256_srli_epi32(k, 31), _mm256_setzero_si256());
  return _mm256_castsi256_ps(_mm256_xor_si256(k, _mm256_or_si256(negative, sign)));
}

// Keys (high halves) and positions (low halves) of 8 float items.
inline void unpack8(const Keyed<float>* items, __m256i& keys, __m256i& pos) {
  const __m256 a = _mm256_loadu_ps(reinterpret_cast<const float*>(items));      // items 0-3
  const __m256 b = _mm256_loadu_ps(reinterpret_cast<const float*>(items + 4));  // items 4-7
  // shuffle_ps takes lanes within 128-bit halves: k0 k1 k4 k5 | k2 k3 k6 k7; permute4x64 orders them.
  keys = _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8);
  pos = _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(a, b, 0x88)), 0xD8);
}

// The rank-order pass of pdl_rows over whole blocks of 8 ranks, float32: the same operations
// in the same order per lane as the scalar loop (bit-identical results). The sorted target is
// keys (tkeys) or items (titems). Returns the ranks done.
inline int64_t rank_pass(const Keyed<float>* ps, const uint32_t* tkeys, const Keyed<float>* titems, int64_t n,
                         int64_t p, int8_t* sign_row, float* d2_row, int32_t* perm_row, double* lanes) {
  const int64_t n8 = n & ~int64_t(7);
  __m256d acc0 = _mm256_loadu_pd(lanes), acc1 = _mm256_loadu_pd(lanes + 4);
  const __m256 zero = _mm256_setzero_ps();
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // byte 0 of each 32-bit lane, within each 128-bit half
  const __m256i first_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                               0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  for (int64_t i = 0; i < n8; i += 8) {
    __m256i pk, pi, tk;
    unpack8(ps + i, pk, pi);
    if (tkeys != nullptr) {
      tk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tkeys + i));
    } else {
      __m256i unused;
      unpack8(titems + i, tk, unused);
    }
    const __m256 d = _mm256_sub_ps(values8(pk), values8(tk));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(perm_row + i), pi);
    if (p == 1) {
      const __m256i s = _mm256_sub_epi32(_mm256_castps_si256(_mm256_cmp_ps(d, zero, _CMP_LT_OQ)),
                                         _mm256_castps_si256(_mm256_cmp_ps(d, zero, _CMP_GT_OQ)));
      const __m256i b = _mm256_shuffle_epi8(s, first_bytes);
      const __m128i bytes = _mm_unpacklo_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(sign_row + i), bytes);
      const __m256 ad = _mm256_and_ps(d, magnitude);
      acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(ad)));
      acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(ad, 1)));
    } else {
      _mm256_storeu_ps(d2_row + i, _mm256_add_ps(d, d));
      const __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(d)), d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(d, 1));
      acc0 = _mm256_add_pd(acc0, _mm256_mul_pd(d0, d0));
      acc1 = _mm256_add_pd(acc1, _mm256_mul_pd(d1, d1));
    }
  }
  _mm256_storeu_pd(lanes, acc0);
  _mm256_storeu_pd(lanes + 4, acc1);
  return n8;
}

}  // namespace simd
#endif  // FASTLOSS_AVX2

// Rows [begin, end) of B * C.
template <typename scalar_t, typename acc_t>
void pdl_rows(const PdlRows<scalar_t, acc_t>& a, int64_t begin, int64_t end) {
  const int64_t N = a.N;
  RowScratch<acc_t> s(N, a.target_grad);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / a.C, c = r % a.C;
    const scalar_t* xr = a.pred + b * a.psb + c * a.psc;
    const scalar_t* yr = a.target + b * a.tsb + c * a.tsc;
    const int64_t psn = a.psn, tsn = a.tsn;
    // Strided rows are read in place (channels_last, transposed, sliced inputs: no copy).
    auto pred_at = [&](int64_t i) { return static_cast<acc_t>(xr[i * psn]); };
    auto target_at = [&](int64_t i) { return static_cast<acc_t>(yr[i * tsn]); };
    // Contiguous float32 rows also go to load_and_sort as such, for its AVX2 steps.
    constexpr bool kF32 = std::is_same<scalar_t, float>::value;
    if (psn == 1) {
      load_sort_keyed<acc_t>(s.pred.data(), s.tmp.data(), N, [&](int64_t i) { return static_cast<acc_t>(xr[i]); },
                             kF32 ? reinterpret_cast<const float*>(xr) : nullptr);
    } else {
      load_sort_keyed<acc_t>(s.pred.data(), s.tmp.data(), N, pred_at);
    }
    if (a.target_grad) {
      load_sort_keyed<acc_t>(s.target.data(), s.tmp.data(), N, target_at);
    } else if (tsn == 1) {
      load_sort_keys<acc_t>(s.tkeys.data(), s.ktmp.data(), N, [&](int64_t i) { return static_cast<acc_t>(yr[i]); },
                            kF32 ? reinterpret_cast<const float*>(yr) : nullptr);
    } else {
      load_sort_keys<acc_t>(s.tkeys.data(), s.ktmp.data(), N, target_at);
    }
    // Rank-order pass: d = sorted pred - sorted target. kLanes partial sums keep the
    // accumulation vectorisable (a single running sum would serialise on its latency).
    constexpr int kLanes = 8;
    double lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
    int32_t* perm_row = a.perm + r * N;
    const Keyed<acc_t>* ps = s.pred.data();
    int64_t done = 0;  // ranks done by the AVX2 pass
#if defined(FASTLOSS_AVX2)
    if constexpr (std::is_same<acc_t, float>::value) {
      done = simd::rank_pass(ps, a.target_grad ? nullptr : s.tkeys.data(), a.target_grad ? s.target.data() : nullptr,
                             N, a.p, a.p == 1 ? a.sign + r * N : nullptr, a.p == 2 ? a.deriv2 + r * N : nullptr,
                             perm_row, lanes);
    }
#endif
    auto rank_pass = [&](auto&& target_value, auto&& per_rank) {
      int64_t i = done;
      for (; i + kLanes <= N; i += kLanes) {
        for (int j = 0; j < kLanes; ++j) {
          const acc_t d = ps[i + j].value() - target_value(i + j);
          lanes[j] += per_rank(i + j, d);
          perm_row[i + j] = static_cast<int32_t>(ps[i + j].index());
        }
      }
      for (; i < N; ++i) {
        const acc_t d = ps[i].value() - target_value(i);
        lanes[0] += per_rank(i, d);
        perm_row[i] = static_cast<int32_t>(ps[i].index());
      }
    };
    auto run = [&](auto&& target_value) {
      if (a.p == 1) {
        int8_t* sign_row = a.sign + r * N;
        rank_pass(target_value, [&](int64_t i, acc_t d) {
          sign_row[i] = static_cast<int8_t>((d > 0) - (d < 0));
          return static_cast<double>(std::abs(d));
        });
      } else {
        acc_t* d2_row = a.deriv2 + r * N;
        rank_pass(target_value, [&](int64_t i, acc_t d) {
          d2_row[i] = acc_t(2) * d;
          return static_cast<double>(d) * static_cast<double>(d);
        });
      }
    };
    if (a.target_grad) {
      const Keyed<acc_t>* ts = s.target.data();
      run([&](int64_t i) { return ts[i].value(); });
      int32_t* pt_row = a.perm_t + r * N;
      for (int64_t i = 0; i < N; ++i) pt_row[i] = static_cast<int32_t>(ts[i].index());
    } else {
      const auto* tk = s.tkeys.data();
      run([&](int64_t i) { return key_to_float<acc_t>(tk[i]); });
    }
    double total = 0.0;
    for (int j = 0; j < kLanes; ++j) total += lanes[j];
    a.w[r] = static_cast<acc_t>(total / static_cast<double>(N));
  }
}

}  // namespace FASTLOSS_CPU_ISA

// The AVX2 build of pdl_rows for float32 and float64 rows (pdl_avx2.cpp); call only where
// cpu_has_avx2().
void pdl_rows_avx2(const PdlRows<float, float>& a, int64_t begin, int64_t end);
void pdl_rows_avx2(const PdlRows<double, double>& a, int64_t begin, int64_t end);

}  // namespace fastloss
