// Order-preserving float keys and an LSD radix sort of one row, used by the CPU PDL op.
//
// The key of a float is its bit pattern with the sign bit flipped for positives and all bits
// flipped for negatives, so that unsigned integer order equals float order (NaN, made
// positive, sorts last; -0.0 is folded into +0.0 so that ties sort like torch.sort).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
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
  bits &= K(0) - K(magnitude != 0);                                      // -0.0 -> +0.0
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

// A sort item: the order-preserving key with the original position. For float32 both fit in
// one uint64 (key in the high half), so a radix pass moves one word per item.
template <typename F> struct Keyed;
template <> struct Keyed<float> {
  uint64_t bits;
  static Keyed from_key(uint32_t key, uint32_t i) { return {(uint64_t(key) << 32) | i}; }
  uint32_t key() const { return uint32_t(bits >> 32); }
  float value() const { return key_to_float<float>(key()); }
  uint32_t index() const { return uint32_t(bits); }
};
template <> struct Keyed<double> {
  uint64_t k;
  uint32_t idx;
  static Keyed from_key(uint64_t key, uint32_t i) { return {key, i}; }
  uint64_t key() const { return k; }
  double value() const { return key_to_float<double>(k); }
  uint32_t index() const { return idx; }
};

// Below this length a comparison sort beats the radix passes, whose bucket counts cost
// more than the items (measured here: std::sort wins up to ~100 items, radix beyond).
constexpr int64_t kSmallSort = 96;
// The widest radix digit, in bits (the digit width adapts to the row, see load_and_sort).
constexpr int kMaxDigitBits = 11;

// One stable LSD pass: src[0, m) -> dst by the digit ((key - lo) >> shift) & mask. The four
// quarters of src are read in lockstep, each with its own counts and offsets (laid out
// bucket-major, quarter-minor, so that one prefix sum gives every quarter its place): the
// offset increments of the four streams are independent, where a single stream stalls on the
// store of the previous increment whenever two items in a row share a bucket (up to 2.5x
// slower per item on the few-bucket digits of float keys, measured here).
// `off` holds 4 * (mask + 1) counters. Returns false, having moved nothing, when every item
// has the same digit.
template <typename T, typename K, typename KeyFn>
bool radix_pass(const T* src, T* dst, int64_t m, K lo, int shift, K mask, uint32_t* off, KeyFn key_of) {
  const int64_t buckets = int64_t(mask) + 1;
  std::memset(off, 0, sizeof(uint32_t) * 4 * buckets);
  const int64_t h = m / 4;
  const T* s1 = src + h;
  const T* s2 = src + 2 * h;
  const T* s3 = src + 3 * h;
  auto slot = [&](const T& v) { return 4 * int64_t(((key_of(v) - lo) >> shift) & mask); };
  for (int64_t i = 0; i < h; ++i) {
    off[slot(src[i])]++;
    off[slot(s1[i]) + 1]++;
    off[slot(s2[i]) + 2]++;
    off[slot(s3[i]) + 3]++;
  }
  for (int64_t j = 4 * h; j < m; ++j) off[slot(src[j]) + 3]++;  // the tail belongs to quarter 3
  const uint32_t* first = off + slot(src[0]);
  if (first[0] + first[1] + first[2] + first[3] == static_cast<uint32_t>(m)) return false;
  uint32_t sum = 0;  // one add a bucket on the running sum's chain, not one a counter
  for (int64_t b = 0; b < 4 * buckets; b += 4) {
    const uint32_t c0 = off[b], c1 = off[b + 1], c2 = off[b + 2], c3 = off[b + 3];
    off[b] = sum;
    off[b + 1] = sum + c0;
    off[b + 2] = sum + (c0 + c1);
    off[b + 3] = sum + (c0 + c1 + c2);
    sum += (c0 + c1) + (c2 + c3);
  }
  for (int64_t i = 0; i < h; ++i) {
    const T v0 = src[i], v1 = s1[i], v2 = s2[i], v3 = s3[i];
    dst[off[slot(v0)]++] = v0;
    dst[off[slot(v1) + 1]++] = v1;
    dst[off[slot(v2) + 2]++] = v2;
    dst[off[slot(v3) + 3]++] = v3;
  }
  for (int64_t j = 4 * h; j < m; ++j) {
    const T v = src[j];
    dst[off[slot(v) + 3]++] = v;
  }
  return true;
}

// Load a row and sort it: out[i] = make(key_at(i), i) for i < n, stably sorted by key (K, an
// unsigned order-preserving key; kZero is the key of 0.0). `tmp` is scratch of n items, and an
// item is at least as large as a key.
//
// 1. The keys are formed in a loop the compiler vectorises (into tmp), with their count of
//    negatives and exact zeros and the range [lo, hi] of the non-zero keys.
// 2. ReLU features are often half exact zeros: only the m non-zero items are radix-sorted.
//    They are packed at the front of `out` in position order, the zeros at its back (the passes
//    use only the first m slots of out and tmp), and the zeros go back between the negatives
//    and the positives at the end.
// 3. The digits are those of key - lo, over only the bits that the row's range spans, in as
//    few passes as digits of at most kMaxDigitBits (and about two items a bucket) allow: a
//    ReLU row of floats spans ~27 bits (3 passes, not 4), and the top digit is spread over
//    many buckets instead of the few that the sign and exponent bits would fill.
template <typename T, typename K, typename KeyAt, typename MakeFn, typename KeyFn, typename LessFn>
void load_and_sort(T* out, T* tmp, int64_t n, K kZero, KeyAt key_at, MakeFn make, KeyFn key_of, LessFn less) {
  static_assert(sizeof(T) >= sizeof(K), "an item must have room for its key");
  if (n <= kSmallSort) {
    for (int64_t i = 0; i < n; ++i) out[i] = make(key_at(i), i);
    std::sort(out, out + n, less);
    return;
  }
  K* keys = reinterpret_cast<K*>(tmp);
  int64_t z = 0, negatives = 0;
  K lo = ~K(0), hi = 0;
  for (int64_t i = 0; i < n; ++i) {
    const K k = key_at(i);
    keys[i] = k;
    const K zero = K(0) - K(k == kZero);  // all ones for a zero
    z += k == kZero;
    negatives += k < kZero;
    lo = std::min(lo, K(k | zero));
    hi = std::max(hi, K(k & ~zero));
  }
  // Branch-free split: both stores happen, only one cursor moves. out[m] <= out[n - 1 - zi]
  // always (m + zi = i), and the zero slot is written first, so a non-zero item at the last
  // position lands in out[m].
  // Keys alone need no zeros kept: they are all kZero.
  constexpr bool kKeepZeros = !std::is_same<T, K>::value;
  int64_t m = 0, zi = 0;
  for (int64_t i = 0; i < n; ++i) {
    const K k = keys[i];
    const T item = make(k, i);
    if constexpr (kKeepZeros) out[n - 1 - zi] = item;
    out[m] = item;
    m += k != kZero;
    zi += k == kZero;
  }
  if (m > 1 && hi > lo) {
    const K range = hi - lo;
    int bits = 0;
    while (bits < int(sizeof(K) * 8) && (range >> bits) != 0) ++bits;
    int width = kMaxDigitBits;
    while (width > 8 && (int64_t(1) << width) > m / 2) --width;
    const int passes = (bits + width - 1) / width;
    width = (bits + passes - 1) / passes;
    const K mask = (K(1) << width) - 1;
    uint32_t off[4 << kMaxDigitBits];
    T* src = out;
    T* dst = tmp;
    for (int p = 0; p < passes; ++p) {
      if (radix_pass(src, dst, m, lo, p * width, mask, off, key_of)) std::swap(src, dst);
    }
    if (src != out) std::memcpy(out, src, sizeof(T) * m);
  }
  if (z == 0) return;
  if constexpr (kKeepZeros) {
    for (int64_t j = 0; j < z; ++j) tmp[j] = out[n - 1 - j];  // the zeros, in position order
  }
  std::memmove(out + negatives + z, out + negatives, sizeof(T) * (m - negatives));
  if constexpr (kKeepZeros) {
    std::memcpy(out + negatives, tmp, sizeof(T) * z);
  } else {
    std::fill(out + negatives, out + negatives + z, make(kZero, 0));
  }
}

// Rows loaded with value_at(i) (float or double) and sorted: items (key + position) or keys.
template <typename F, typename ValueAt>
void load_sort_keyed(Keyed<F>* out, Keyed<F>* tmp, int64_t n, ValueAt value_at) {
  using K = typename KeyOf<F>::type;
  load_and_sort(
      out, tmp, n, K(K(1) << (sizeof(K) * 8 - 1)), [&](int64_t i) { return float_to_key<F>(value_at(i)); },
      [](K k, int64_t i) { return Keyed<F>::from_key(k, uint32_t(i)); }, [](const Keyed<F>& v) { return v.key(); },
      [](const Keyed<F>& x, const Keyed<F>& y) {
        return x.key() < y.key() || (x.key() == y.key() && x.index() < y.index());
      });
}

template <typename F, typename ValueAt>
void load_sort_keys(typename KeyOf<F>::type* out, typename KeyOf<F>::type* tmp, int64_t n, ValueAt value_at) {
  using K = typename KeyOf<F>::type;
  load_and_sort(
      out, tmp, n, K(K(1) << (sizeof(K) * 8 - 1)), [&](int64_t i) { return float_to_key<F>(value_at(i)); },
      [](K k, int64_t) { return k; }, [](K k) { return k; }, [](K x, K y) { return x < y; });
}

}  // namespace fastloss
