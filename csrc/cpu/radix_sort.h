// Order-preserving float keys and a small LSD radix sort for one row, used by the CPU ops.
//
// The key of a float is its bit pattern with the sign bit flipped for positives and all bits
// flipped for negatives, so that unsigned integer order equals float order (NaN, made
// positive, sorts last; -0.0 is folded into +0.0 so that ties sort like torch.sort).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>

namespace fastloss {

template <typename F> struct KeyOf;
template <> struct KeyOf<float> { using type = uint32_t; };
template <> struct KeyOf<double> { using type = uint64_t; };

template <typename F> struct FloatBits;
template <> struct FloatBits<float> { static constexpr uint32_t kInf = 0x7F800000u, kQuietNaN = 0x7FC00000u; };
template <> struct FloatBits<double> {
  static constexpr uint64_t kInf = 0x7FF0000000000000ull, kQuietNaN = 0x7FF8000000000000ull;
};

// Both transforms work on the bits with selects, no branches and no float compares: ReLU
// features are half exact zeros in random places (a branch would mispredict on every other
// element), and integer selects let the compiler vectorise the loops that call them.
template <typename F>
inline typename KeyOf<F>::type float_to_key(F x) {
  using K = typename KeyOf<F>::type;
  constexpr int kTop = sizeof(K) * 8 - 1;
  constexpr K kSign = K(1) << kTop;
  K bits;
  std::memcpy(&bits, &x, sizeof(K));
  const K magnitude = bits & ~kSign;
  bits = magnitude == 0 ? K(0) : bits;                                   // -0.0 -> +0.0
  bits = magnitude > FloatBits<F>::kInf ? FloatBits<F>::kQuietNaN : bits;  // NaN -> +qNaN, last
  const K mask = K(0) - (bits >> kTop);  // all ones for negatives
  return bits ^ (mask | kSign);
}

template <typename F>
inline F key_to_float(typename KeyOf<F>::type key) {
  using K = typename KeyOf<F>::type;
  constexpr int kTop = sizeof(K) * 8 - 1;
  constexpr K kSign = K(1) << kTop;
  const K mask = (key >> kTop) - K(1);  // all ones for negatives (top bit clear)
  const K bits = key ^ (mask | kSign);
  F x;
  std::memcpy(&x, &bits, sizeof(K));
  return x;
}

// Stable LSD radix sort of n items by the kBytes bytes of key_of(item) starting at byte
// kFirstByte (8-bit digits). `a` holds the input and receives the output; `tmp` is scratch of
// the same length. All digit counts are taken in one read before the first pass (LSD passes
// do not change them), and a pass in which every item falls into one bucket is skipped.
// (Measured here: 11-bit digits and per-part counters were no faster on rows of 1k-4k.)
template <int kFirstByte, int kBytes, typename T, typename KeyFn>
void radix_sort(T* a, T* tmp, int64_t n, KeyFn key_of) {
  if (n <= 1) return;
  uint32_t hist[kBytes][256];
  std::memset(hist, 0, sizeof(hist));
  for (int64_t i = 0; i < n; ++i) {
    const auto k = key_of(a[i]);
    for (int p = 0; p < kBytes; ++p) hist[p][(k >> (8 * (kFirstByte + p))) & 0xFF]++;
  }
  T* src = a;
  T* dst = tmp;
  for (int p = 0; p < kBytes; ++p) {
    const int shift = 8 * (kFirstByte + p);
    uint32_t* offset = hist[p];
    if (offset[(key_of(src[0]) >> shift) & 0xFF] == static_cast<uint32_t>(n)) continue;
    uint32_t sum = 0;
    for (int b = 0; b < 256; ++b) {
      const uint32_t count = offset[b];
      offset[b] = sum;
      sum += count;
    }
    for (int64_t i = 0; i < n; ++i) {
      const T item = src[i];
      dst[offset[(key_of(item) >> shift) & 0xFF]++] = item;
    }
    std::swap(src, dst);
  }
  if (src != a) std::memcpy(a, src, sizeof(T) * n);
}

// A sort item: the order-preserving key with the original position. For float32 both fit in
// one uint64 (key in the high half), so a radix pass moves one word per item.
template <typename F> struct Keyed;
template <> struct Keyed<float> {
  uint64_t bits;
  static Keyed make(float x, uint32_t i) { return {(uint64_t(float_to_key(x)) << 32) | i}; }
  uint64_t sort_key() const { return bits; }  // bytes 4..7
  static constexpr int kFirstByte = 4;
  static constexpr int kBytes = 4;
  float value() const { return key_to_float<float>(uint32_t(bits >> 32)); }
  uint32_t index() const { return uint32_t(bits); }
};
template <> struct Keyed<double> {
  uint64_t key;
  uint32_t idx;
  static Keyed make(double x, uint32_t i) { return {float_to_key(x), i}; }
  uint64_t sort_key() const { return key; }
  static constexpr int kFirstByte = 0;
  static constexpr int kBytes = 8;
  double value() const { return key_to_float<double>(key); }
  uint32_t index() const { return idx; }
};

// Below this length a comparison sort beats the radix passes, whose 256-bucket counts cost
// more than the items (measured here: std::sort wins up to ~100 items, radix beyond).
constexpr int64_t kSmallSort = 96;

// Rows sort by (key, original position): equal keys keep their order, like a stable sort.
template <typename F>
void sort_keyed(Keyed<F>* a, Keyed<F>* tmp, int64_t n) {
  if (n <= kSmallSort) {
    std::sort(a, a + n, [](const Keyed<F>& x, const Keyed<F>& y) {
      return x.sort_key() < y.sort_key() || (x.sort_key() == y.sort_key() && x.index() < y.index());
    });
    return;
  }
  radix_sort<Keyed<F>::kFirstByte, Keyed<F>::kBytes>(a, tmp, n, [](const Keyed<F>& v) { return v.sort_key(); });
}

template <typename F>
void sort_keys(typename KeyOf<F>::type* a, typename KeyOf<F>::type* tmp, int64_t n) {
  using K = typename KeyOf<F>::type;
  if (n <= kSmallSort) {
    std::sort(a, a + n);
    return;
  }
  radix_sort<0, sizeof(K)>(a, tmp, n, [](K k) { return k; });
}

}  // namespace fastloss
