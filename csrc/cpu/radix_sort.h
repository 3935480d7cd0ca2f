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
// kFirstByte (8-bit digits), given the digit counts `hist` of the n items (LSD passes do not
// change them; they are turned into offsets here). `a` holds the input and receives the
// output; `tmp` is scratch of the same length. A pass in which every item falls into one
// bucket is skipped.
// (Measured here: 11-bit digits, 4-way split counters and an MSD first pass were no faster on
// rows of 1k-4k.)
template <int kFirstByte, int kBytes, typename T, typename KeyFn>
void radix_sort_counted(T* a, T* tmp, int64_t n, uint32_t (*hist)[256], KeyFn key_of) {
  if (n <= 1) return;
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

template <int kFirstByte, int kBytes, typename T, typename KeyFn>
void radix_sort(T* a, T* tmp, int64_t n, KeyFn key_of) {
  if (n <= 1) return;
  uint32_t hist[kBytes][256];
  std::memset(hist, 0, sizeof(hist));
  for (int64_t i = 0; i < n; ++i) {
    const auto k = key_of(a[i]);
    for (int p = 0; p < kBytes; ++p) hist[p][(k >> (8 * (kFirstByte + p))) & 0xFF]++;
  }
  radix_sort_counted<kFirstByte, kBytes>(a, tmp, n, hist, key_of);
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
  bool is_zero() const { return uint32_t(bits >> 32) == 0x80000000u; }
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
  bool is_zero() const { return key == 0x8000000000000000ull; }
};

// Below this length a comparison sort beats the radix passes, whose 256-bucket counts cost
// more than the items (measured here: std::sort wins up to ~100 items, radix beyond).
constexpr int64_t kSmallSort = 96;

// Load a row and sort it in one go: out[i] = make(i) for i < n, then a stable sort by the kBytes
// key bytes from kFirstByte. `tmp` is scratch of n items.
//
// ReLU features are often half exact zeros. Items with is_zero(item) are set aside while the
// row is loaded (they arrive in position order, which is their sorted order), the digit counts
// are taken in the same pass, and only the other items are radix-sorted; the zeros are then put
// back between the negatives and the positives. The key's top byte must be byte
// kFirstByte + kBytes - 1, so that negatives are the keys whose top byte is below 0x80.
template <int kFirstByte, int kBytes, typename T, typename MakeFn, typename KeyFn, typename ZeroFn, typename LessFn>
void load_and_sort(T* out, T* tmp, int64_t n, MakeFn make, KeyFn key_of, ZeroFn is_zero, LessFn less) {
  if (n <= kSmallSort) {
    for (int64_t i = 0; i < n; ++i) out[i] = make(i);
    std::sort(out, out + n, less);
    return;
  }
  uint32_t hist[kBytes][256];
  std::memset(hist, 0, sizeof(hist));
  int64_t m = 0, z = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T item = make(i);
    const auto k = key_of(item);
    for (int p = 0; p < kBytes; ++p) hist[p][(k >> (8 * (kFirstByte + p))) & 0xFF]++;
    const bool zero = is_zero(item);
    // Branch-free split: both stores happen, only one cursor moves. tmp fills from the end,
    // so its first n - z slots stay free as scratch for sorting the other m = n - z items.
    out[m] = item;
    tmp[n - 1 - z] = item;
    m += !zero;
    z += zero;
  }
  if (z > 0) {
    const auto zk = key_of(tmp[n - 1]);
    for (int p = 0; p < kBytes; ++p) hist[p][(zk >> (8 * (kFirstByte + p))) & 0xFF] -= static_cast<uint32_t>(z);
  }
  uint32_t negatives = 0;
  for (int b = 0; b < 128; ++b) negatives += hist[kBytes - 1][b];
  radix_sort_counted<kFirstByte, kBytes>(out, tmp, m, hist, key_of);
  if (z == 0) return;
  std::memmove(out + negatives + z, out + negatives, sizeof(T) * (m - negatives));
  for (int64_t j = 0; j < z; ++j) out[negatives + j] = tmp[n - 1 - j];
}

// Rows loaded with value_at(i) (float or double) and sorted: items (key + position) or keys.
template <typename F, typename ValueAt>
void load_sort_keyed(Keyed<F>* out, Keyed<F>* tmp, int64_t n, ValueAt value_at) {
  load_and_sort<Keyed<F>::kFirstByte, Keyed<F>::kBytes>(
      out, tmp, n, [&](int64_t i) { return Keyed<F>::make(value_at(i), uint32_t(i)); },
      [](const Keyed<F>& v) { return v.sort_key(); }, [](const Keyed<F>& v) { return v.is_zero(); },
      [](const Keyed<F>& x, const Keyed<F>& y) {
        return x.sort_key() < y.sort_key() || (x.sort_key() == y.sort_key() && x.index() < y.index());
      });
}

template <typename F, typename ValueAt>
void load_sort_keys(typename KeyOf<F>::type* out, typename KeyOf<F>::type* tmp, int64_t n, ValueAt value_at) {
  using K = typename KeyOf<F>::type;
  constexpr K kZero = K(1) << (sizeof(K) * 8 - 1);
  load_and_sort<0, sizeof(K)>(
      out, tmp, n, [&](int64_t i) { return float_to_key<F>(value_at(i)); }, [](K k) { return k; },
      [](K k) { return k == kZero; }, [](const K& x, const K& y) { return x < y; });
}

}  // namespace fastloss
