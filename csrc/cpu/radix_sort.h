// Order-preserving float keys and an LSD radix sort of one row, used by the CPU PDL op.
//
// The key of a float is its bit pattern with the sign bit flipped for positives and all bits
// flipped for negatives, so that unsigned integer order equals float order (NaN, made
// positive, sorts last; -0.0 is folded into +0.0 so that ties sort like torch.sort).
//
// The code is compiled once per CPU instruction set (cpu/isa.h): each translation unit that
// includes it names its own inline namespace FASTLOSS_CPU_ISA, so the copies never merge.
#pragma once

#include "cpu/isa.h"

namespace fastloss {
inline namespace FASTLOSS_CPU_ISA {

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
  bool operator<(const Keyed& o) const { return bits < o.bits; }  // by key, then position
};
template <> struct Keyed<double> {
  uint64_t k;
  uint32_t idx;
  static Keyed from_key(uint64_t key, uint32_t i) { return {key, i}; }
  uint64_t key() const { return k; }
  double value() const { return key_to_float<double>(k); }
  uint32_t index() const { return idx; }
  bool operator<(const Keyed& o) const { return k < o.k || (k == o.k && idx < o.idx); }
};

// Up to this many items a comparison sort beats the radix passes, whose bucket counts cost
// more than the items (measured here).
constexpr int64_t kSmallSort = 24;
// load_and_sort's output has this many slots past the row, for stray stores.
constexpr int64_t kSlack = 8;
// The widest radix digit, in bits (the digit width adapts to the row, see load_and_sort).
constexpr int kMaxDigitBits = 11;
// The radix passes order the items by the top log2(m) + kGroupBits bits of their key range
// only, about 32 buckets an item; the few items that share those bits are then put in order
// by an insertion sort (finish_sort). On ReLU rows of 100 to 10k values this halves the
// passes (2, not 3 or 4) and leaves 1-5% of the items in runs longer than one (measured here).
constexpr int kGroupBits = 5;

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

// Items nearly in order (each a few slots from its place at most): finish with an insertion
// sort, one compare an item where nothing is out of place. Gives up, returning false with the
// items still a permutation in which any two items already in order have kept that order,
// once it has moved more than m / 4 items (a ReLU row moves ~m / 30): an adversarial row, say
// a narrow band of values and a few huge ones, that the coarse order left in long runs.
template <typename T, typename LessFn>
bool finish_sort(T* items, int64_t m, LessFn less) {
  int64_t budget = m / 4 + 8;
  for (int64_t i = 1; i < m; ++i) {
    if (!less(items[i], items[i - 1])) continue;
    const T v = items[i];
    int64_t w = i;
    for (; w > 0 && less(v, items[w - 1]); --w) items[w] = items[w - 1];
    items[w] = v;
    budget -= i - w;
    if (budget < 0) return false;
  }
  return true;
}

#if defined(FASTLOSS_AVX2)
// AVX2 versions of load_and_sort's first two steps for contiguous float32 rows (compiled only
// in pdl_avx2.cpp). Eight floats a step; the tail of a row goes through the scalar code.
namespace simd {

constexpr uint32_t kZeroKey = 0x80000000u;  // float_to_key(0.0f)

// float_to_key of 8 floats.
inline __m256i keys8(__m256 v) {
  const __m256i sign = _mm256_set1_epi32(int32_t(0x80000000u));
  __m256i bits = _mm256_castps_si256(v);
  const __m256i magnitude = _mm256_andnot_si256(sign, bits);
  bits = _mm256_andnot_si256(_mm256_cmpeq_epi32(magnitude, _mm256_setzero_si256()), bits);  // -0.0 -> +0.0
  const __m256i nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(int32_t(FloatBits<float>::kInf)));
  bits = _mm256_blendv_epi8(bits, _mm256_set1_epi32(int32_t(FloatBits<float>::kQuietNaN)), nan);
  return _mm256_xor_si256(bits, _mm256_or_si256(_mm256_srai_epi32(bits, 31), sign));
}

// Left-packing tables: entry `mask` lists, as bytes, the 32-bit lanes to keep in order.
// pack32: 8 lanes of 32 bits by an 8-bit mask. pack64: 4 lanes of 64 bits (lane pairs) by a
// 4-bit mask.
struct PackTables {
  uint64_t pack32[256];
  uint64_t pack64[16];
  constexpr PackTables() : pack32(), pack64() {
    for (int m = 0; m < 256; ++m) {
      uint64_t v = 0;
      int k = 0;
      for (int lane = 0; lane < 8; ++lane) {
        if (m & (1 << lane)) v |= uint64_t(lane) << (8 * k++);
      }
      pack32[m] = v;
    }
    for (int m = 0; m < 16; ++m) {
      uint64_t v = 0;
      int k = 0;
      for (int lane = 0; lane < 4; ++lane) {
        if (m & (1 << lane)) {
          v |= uint64_t(2 * lane) << (8 * k++);
          v |= uint64_t(2 * lane + 1) << (8 * k++);
        }
      }
      pack64[m] = v;
    }
  }
};
inline constexpr PackTables kPack{};

inline __m256i pack_indices(uint64_t bytes) { return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(bytes))); }

// Counts of zero and negative keys and the range [lo, hi] of the non-zero keys of x[0, n).
inline void stats(const float* x, int64_t n, int64_t& zeros, int64_t& negatives, uint32_t& lo, uint32_t& hi) {
  const __m256i kzero = _mm256_set1_epi32(int32_t(kZeroKey));
  __m256i vz = _mm256_setzero_si256(), vpos = _mm256_setzero_si256();
  __m256i vlo = _mm256_set1_epi32(-1), vhi = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i k = keys8(_mm256_loadu_ps(x + i));
    const __m256i zero = _mm256_cmpeq_epi32(k, kzero);
    vz = _mm256_sub_epi32(vz, zero);
    vpos = _mm256_add_epi32(vpos, _mm256_srli_epi32(k, 31));  // top bit set: zero or positive
    vlo = _mm256_min_epu32(vlo, _mm256_or_si256(k, zero));
    vhi = _mm256_max_epu32(vhi, _mm256_andnot_si256(zero, k));
  }
  alignas(32) uint32_t a[8], b[8], c[8], d[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(a), vz);
  _mm256_store_si256(reinterpret_cast<__m256i*>(b), vpos);
  _mm256_store_si256(reinterpret_cast<__m256i*>(c), vlo);
  _mm256_store_si256(reinterpret_cast<__m256i*>(d), vhi);
  int64_t zero_or_pos = 0;
  zeros = 0;
  lo = ~0u;
  hi = 0;
  for (int j = 0; j < 8; ++j) {
    zeros += a[j];
    zero_or_pos += b[j];
    lo = std::min(lo, c[j]);
    hi = std::max(hi, d[j]);
  }
  for (; i < n; ++i) {
    const uint32_t k = float_to_key<float>(x[i]);
    const uint32_t zero = 0u - uint32_t(k == kZeroKey);
    zeros += k == kZeroKey;
    zero_or_pos += k >> 31;
    lo = std::min(lo, k | zero);
    hi = std::max(hi, k & ~zero);
  }
  negatives = n - zero_or_pos;
}

// A row without negatives, as items: the zeros to out[0, z) and the others to out[z, n), each
// in position order. Each step stores 4 items at a cursor and moves it past the kept ones; the
// strays past a cursor are overwritten by later stores (the zeros' pass runs first, so its last
// strays, at out[z, z + 4), fall to the non-zero pass) or land in the slack out[n, n + 4).
inline void split_items(const float* x, int64_t n, int64_t z, uint64_t* out) {
  const __m256i kzero = _mm256_set1_epi32(int32_t(kZeroKey));
  const __m256i step = _mm256_set1_epi64x(8);
  int64_t i8 = n & ~int64_t(7);
  if (z > 0) {
    uint64_t* dst = out;
    __m256i ia = _mm256_setr_epi64x(0, 1, 2, 3), ib = _mm256_setr_epi64x(4, 5, 6, 7);
    const __m256i hi = _mm256_set1_epi64x(int64_t(uint64_t(kZeroKey) << 32));
    for (int64_t i = 0; i < i8; i += 8) {
      const __m256i mag = _mm256_slli_epi32(_mm256_castps_si256(_mm256_loadu_ps(x + i)), 1);  // drops the sign
      const int zmask = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(mag, _mm256_setzero_si256())));
      const int m0 = zmask & 15, m1 = zmask >> 4;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                          _mm256_permutevar8x32_epi32(_mm256_or_si256(ia, hi), pack_indices(kPack.pack64[m0])));
      dst += _mm_popcnt_u32(m0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                          _mm256_permutevar8x32_epi32(_mm256_or_si256(ib, hi), pack_indices(kPack.pack64[m1])));
      dst += _mm_popcnt_u32(m1);
      ia = _mm256_add_epi64(ia, step);
      ib = _mm256_add_epi64(ib, step);
    }
    for (int64_t i = i8; i < n; ++i) {
      *dst = (uint64_t(kZeroKey) << 32) | uint64_t(i);
      dst += float_to_key<float>(x[i]) == kZeroKey;
    }
  }
  uint64_t* dst = out + z;
  __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i step32 = _mm256_set1_epi32(8);
  for (int64_t i = 0; i < i8; i += 8) {
    const __m256i k = keys8(_mm256_loadu_ps(x + i));
    const int nz = ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, kzero))) & 255;
    const __m256i lo4 = _mm256_unpacklo_epi32(idx, k);  // items 0, 1 | 4, 5 (index low, key high)
    const __m256i hi4 = _mm256_unpackhi_epi32(idx, k);  // items 2, 3 | 6, 7
    const __m256i a = _mm256_permute2x128_si256(lo4, hi4, 0x20);  // items 0-3
    const __m256i b = _mm256_permute2x128_si256(lo4, hi4, 0x31);  // items 4-7
    const int m0 = nz & 15, m1 = nz >> 4;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permutevar8x32_epi32(a, pack_indices(kPack.pack64[m0])));
    dst += _mm_popcnt_u32(m0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permutevar8x32_epi32(b, pack_indices(kPack.pack64[m1])));
    dst += _mm_popcnt_u32(m1);
    idx = _mm256_add_epi32(idx, step32);
  }
  for (int64_t i = i8; i < n; ++i) {
    const uint32_t k = float_to_key<float>(x[i]);
    *dst = (uint64_t(k) << 32) | uint64_t(i);
    dst += k != kZeroKey;
  }
}

// A row without negatives, as keys: the zero keys fill out[0, z), the others follow in
// position order (strays as in split_items, into the slack out[n, n + 8)).
inline void split_keys(const float* x, int64_t n, int64_t z, uint32_t* out) {
  std::fill(out, out + z, kZeroKey);
  const __m256i kzero = _mm256_set1_epi32(int32_t(kZeroKey));
  uint32_t* dst = out + z;
  const int64_t i8 = n & ~int64_t(7);
  for (int64_t i = 0; i < i8; i += 8) {
    const __m256i k = keys8(_mm256_loadu_ps(x + i));
    const int nz = ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(k, kzero))) & 255;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_permutevar8x32_epi32(k, pack_indices(kPack.pack32[nz])));
    dst += _mm_popcnt_u32(nz);
  }
  for (int64_t i = i8; i < n; ++i) {
    const uint32_t k = float_to_key<float>(x[i]);
    *dst = k;
    dst += k != kZeroKey;
  }
}

}  // namespace simd
#endif  // FASTLOSS_AVX2

// Sort block[0, m), items in position order whose keys lie in [lo, hi], stably by key. `tmp`
// is scratch of m items.
//
// The digits are those of key - lo, over only the top bits of the range: as many as it spans,
// at most log2(m) + kGroupBits. A block of ReLU features spans ~27 bits; with m = 512 items, 2
// passes of 7-bit digits order it by the top 14, where 4 passes would order it fully. The
// items that share their top bits (a few percent) then lie in short runs, which an insertion
// sort by full key and position puts in order (finish_sort). At most kSmallSort items are
// comparison-sorted.
template <typename T, typename K, typename KeyFn, typename LessFn>
void sort_block(T* block, T* tmp, int64_t m, K lo, K hi, KeyFn key_of, LessFn less) {
  if (m <= 1 || hi <= lo) return;  // one key: position order is the order
  if (m <= kSmallSort) {
    std::sort(block, block + m, less);
    return;
  }
  const K range = hi - lo;
  int bits = 0;
  while (bits < int(sizeof(K) * 8) && (range >> bits) != 0) ++bits;
  int log2m = 0;
  while ((int64_t(2) << log2m) <= m) ++log2m;
  // Digits of at most log2(m) bits (no more buckets than items), at least 6 and at most
  // kMaxDigitBits.
  const int max_width = std::max(6, std::min(kMaxDigitBits, log2m));
  uint32_t off[4 << kMaxDigitBits];
  auto radix = [&](int keep) {  // stably by the top `keep` of the `bits` bits of key - lo
    const int drop = bits - keep;
    const int passes = (keep + max_width - 1) / max_width;
    const int width = (keep + passes - 1) / passes;
    const K mask = (K(1) << width) - 1;
    T* src = block;
    T* dst = tmp;
    for (int p = 0; p < passes; ++p) {
      if (radix_pass(src, dst, m, lo, drop + p * width, mask, off, key_of)) std::swap(src, dst);
    }
    if (src != block) std::memcpy(block, src, sizeof(T) * m);
  };
  const int keep = std::min(bits, log2m + kGroupBits);
  radix(keep);
  // Equal keys are in position order after the stable passes, and finish_sort keeps them so
  // even when it gives up: the full passes that then follow stay stable.
  if (keep < bits && !finish_sort(block, m, less)) radix(bits);
}

// Load a row and sort it: out[i] = make(key_at(i), i) for i < n, stably sorted by key (K, an
// unsigned order-preserving key; kZero is the key of 0.0). `out` has room for n + kSlack items
// (stray stores land there), `tmp` is scratch of n items, and an item is at least as large as
// a key. x32, if given, is the row as contiguous float32 (for the AVX2 steps).
//
// 1. A loop the compiler vectorises counts the negatives and the exact zeros and finds the
//    range [lo, hi] of the non-zero keys (the keys are formed again where they are stored:
//    cheaper than storing and reloading them).
// 2. Each item is stored once, straight into its sign's region of the sorted layout:
//    [negatives | zeros | positives], each region in position order. The zeros are then in
//    place (ReLU features are often half exact zeros).
// 3. The negatives and the positives are sorted apart (sort_block), each over its own key
//    range: a row with both signs spans nearly every key bit between them (the exponents of
//    all the tiny values), one sign alone only the exponents its values have.
template <typename T, typename K, typename KeyAt, typename MakeFn, typename KeyFn, typename LessFn>
void load_and_sort(T* out, T* tmp, int64_t n, K kZero, KeyAt key_at, MakeFn make, KeyFn key_of, LessFn less,
                   const float* x32 = nullptr) {
  static_assert(sizeof(T) >= sizeof(K), "an item must have room for its key");
  if (n <= kSmallSort) {
    for (int64_t i = 0; i < n; ++i) out[i] = make(key_at(i), i);
    std::sort(out, out + n, less);
    return;
  }
  int64_t z = 0, negatives = 0;
  K lo = ~K(0), hi = 0;
  // The AVX2 steps take float32 rows in memory order (x32: key_at(i) is the key of x32[i]).
  bool simd = false;
#if defined(FASTLOSS_AVX2)
  if constexpr (std::is_same<K, uint32_t>::value) simd = x32 != nullptr;
#endif
  if (simd) {
#if defined(FASTLOSS_AVX2)
    if constexpr (std::is_same<K, uint32_t>::value) simd::stats(x32, n, z, negatives, lo, hi);
#endif
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const K k = key_at(i);
      const K zero = K(0) - K(k == kZero);  // all ones for a zero
      z += k == kZero;
      negatives += k < kZero;
      lo = std::min(lo, K(k | zero));
      hi = std::max(hi, K(k & ~zero));
    }
  }
  const int64_t positives = n - z - negatives;
  constexpr bool kKeepZeros = !std::is_same<T, K>::value;
  // Each item is stored at a slot chosen without branches (the zeros of ReLU features lie at
  // random). Rows without negatives (ReLU), items: the zeros to out[zi], the others to
  // out[z + pi], a mask choosing. Keys: the zero keys are all kZero, filled in; each non-zero
  // key is stored at its cursor, which moves only past non-zero keys (the zeros' stray stores
  // are overwritten, the last at out[n], in the slack).
  if (negatives == 0 && simd) {
#if defined(FASTLOSS_AVX2)
    if constexpr (std::is_same<T, Keyed<float>>::value) {
      simd::split_items(x32, n, z, reinterpret_cast<uint64_t*>(out));
    } else if constexpr (std::is_same<T, uint32_t>::value) {
      simd::split_keys(x32, n, z, out);
    }
#endif
  } else if (negatives == 0) {
    if constexpr (kKeepZeros) {
      int64_t pi = 0;
      for (int64_t i = 0; i < n; ++i) {
        const K k = key_at(i);
        const int64_t is_pos = k != kZero;
        const int64_t mask = -is_pos;
        out[((z + pi) & mask) | ((i - pi) & ~mask)] = make(k, i);
        pi += is_pos;
      }
    } else {
      std::fill(out, out + z, kZero);
      T* const nonzero = out + z;
      int64_t pi = 0;
      for (int64_t i = 0; i < n; ++i) {
        const K k = key_at(i);
        nonzero[pi] = make(k, i);
        pi += k != kZero;
      }
    }
  } else {
    // Both signs: one store an item at a slot chosen with masks, ni, negatives + zi or
    // negatives + z + pi, where ni, zi, pi count the items of each sign before it.
    int64_t ni = 0, pi = 0;
    for (int64_t i = 0; i < n; ++i) {
      const K k = key_at(i);
      const int64_t is_neg = -int64_t(k < kZero), is_pos = -int64_t(k > kZero);  // all ones or 0
      const int64_t zero_slot = negatives + (i - ni - pi);
      const int64_t slot = (ni & is_neg) | ((negatives + z + pi) & is_pos) | (zero_slot & ~(is_neg | is_pos));
      out[slot] = make(k, i);
      ni -= is_neg;
      pi -= is_pos;
    }
  }
  T* const neg = out;
  T* const pos = out + negatives + z;
  K hi_neg = hi, lo_pos = lo;  // one sign: its range is the row's
  if (negatives > 0 && positives > 0) {
    hi_neg = 0;
    lo_pos = ~K(0);
    for (int64_t j = 0; j < negatives; ++j) hi_neg = std::max(hi_neg, key_of(neg[j]));
    for (int64_t j = 0; j < positives; ++j) lo_pos = std::min(lo_pos, key_of(pos[j]));
  }
  sort_block(neg, tmp, negatives, lo, hi_neg, key_of, less);
  sort_block(pos, tmp, positives, lo_pos, hi, key_of, less);
}

// Rows loaded with value_at(i) (float or double) and sorted: items (key + position) or keys.
// x32: the same row as contiguous float32, if it is one (lets the AVX2 build vectorise).
template <typename F, typename ValueAt>
void load_sort_keyed(Keyed<F>* out, Keyed<F>* tmp, int64_t n, ValueAt value_at, const float* x32 = nullptr) {
  using K = typename KeyOf<F>::type;
  load_and_sort(
      out, tmp, n, K(K(1) << (sizeof(K) * 8 - 1)), [&](int64_t i) { return float_to_key<F>(value_at(i)); },
      [](K k, int64_t i) { return Keyed<F>::from_key(k, uint32_t(i)); }, [](const Keyed<F>& v) { return v.key(); },
      [](const Keyed<F>& x, const Keyed<F>& y) { return x < y; }, x32);
}

template <typename F, typename ValueAt>
void load_sort_keys(typename KeyOf<F>::type* out, typename KeyOf<F>::type* tmp, int64_t n, ValueAt value_at,
                    const float* x32 = nullptr) {
  using K = typename KeyOf<F>::type;
  load_and_sort(
      out, tmp, n, K(K(1) << (sizeof(K) * 8 - 1)), [&](int64_t i) { return float_to_key<F>(value_at(i)); },
      [](K k, int64_t) { return k; }, [](K k) { return k; }, [](K x, K y) { return x < y; }, x32);
}

}  // namespace FASTLOSS_CPU_ISA
}  // namespace fastloss
