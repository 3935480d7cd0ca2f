// PDL device code: order-preserving keys and the forward / backward kernels. Needs only the CUDA
// toolkit (runtime, cub, fp16/bf16); the launchers are in pdl_kernels.cu, the math at its top.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/block/block_exchange.cuh>
#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_reduce.cuh>

#include <cstdint>
#include <type_traits>

namespace fastloss {
namespace pdl {

// Half types are computed in float32; float64 stays float64.
template <typename scalar_t> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

template <typename acc_t> struct KeyOf;
template <> struct KeyOf<float> { using type = uint32_t; };
template <> struct KeyOf<double> { using type = uint64_t; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round an acc_t result to the output dtype (round to nearest even, like a torch cast).
template <typename out_t> struct FromAcc;
template <> struct FromAcc<float> { static __device__ __forceinline__ float apply(float x) { return x; } };
template <> struct FromAcc<double> { static __device__ __forceinline__ double apply(double x) { return x; } };
template <> struct FromAcc<__half> {
  static __device__ __forceinline__ __half apply(float x) { return __float2half_rn(x); }
};
template <> struct FromAcc<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 apply(float x) { return __float2bfloat16_rn(x); }
};

// The keys of csrc/cpu/radix_sort.h: -0.0 folded into +0.0, every NaN made the positive quiet NaN,
// then the sign bit flipped for positives and all bits for negatives, so that unsigned order is
// float order with NaN last. The largest key a value can have is the NaN key (0xFFC00000 /
// 0xFFF8...), so an all-ones key pads a row past every real element. Zero and NaN are tested on
// the bits, so the keys stay right under --use_fast_math.
__device__ __forceinline__ uint32_t float_to_key(float x) {
  uint32_t bits = __float_as_uint(x);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude == 0u) bits = 0u;
  if (magnitude > 0x7F800000u) bits = 0x7FC00000u;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
__device__ __forceinline__ uint64_t float_to_key(double x) {
  uint64_t bits = static_cast<uint64_t>(__double_as_longlong(x));
  const uint64_t magnitude = bits & 0x7FFFFFFFFFFFFFFFull;
  if (magnitude == 0ull) bits = 0ull;
  if (magnitude > 0x7FF0000000000000ull) bits = 0x7FF8000000000000ull;
  return (bits & 0x8000000000000000ull) ? ~bits : (bits | 0x8000000000000000ull);
}
__device__ __forceinline__ float key_to_float(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}
__device__ __forceinline__ double key_to_float(uint64_t key) {
  const uint64_t bits = (key & 0x8000000000000000ull) ? (key & 0x7FFFFFFFFFFFFFFFull) : ~key;
  return __longlong_as_double(static_cast<long long>(bits));
}

// One rank of one row, d = sorted pred - sorted target: stores the saved derivative at `at` and
// returns this rank's term of sum |d|^p (in double, like the CPU op). sign_ptr set <=> p == 1.
template <typename acc_t>
__device__ __forceinline__ double pdl_rank_term(acc_t d, int64_t at, int8_t* sign_ptr, acc_t* d2_ptr) {
  if (sign_ptr != nullptr) {
    sign_ptr[at] = static_cast<int8_t>((d > acc_t(0)) - (d < acc_t(0)));  // sign(NaN) = 0
    if constexpr (std::is_same_v<acc_t, float>) {
      return static_cast<double>(fabsf(d));
    } else {
      return fabs(d);
    }
  }
  d2_ptr[at] = acc_t(2) * d;
  return static_cast<double>(d) * static_cast<double>(d);
}

// Striped load of one row as keys: thread t gets elements j * BLOCK_THREADS + t, elements >= N
// get the padding key.
template <int BLOCK_THREADS, int ITEMS_PER_THREAD, typename scalar_t, typename key_t>
__device__ __forceinline__ void load_row_keys_striped(const scalar_t* row_ptr, int64_t n_stride, int N,
                                                      key_t (&keys)[ITEMS_PER_THREAD]) {
#pragma unroll
  for (int j = 0; j < ITEMS_PER_THREAD; ++j) {
    const int i = j * BLOCK_THREADS + static_cast<int>(threadIdx.x);
    keys[j] = i < N ? float_to_key(to_acc(row_ptr[i * n_stride])) : ~key_t(0);
  }
}

// Rows of N <= BLOCK_THREADS * ITEMS_PER_THREAD: one block per row does the whole forward.
// Each row is loaded striped (coalesced when n_stride == 1) and transposed to the blocked
// arrangement, so that element i sits at blocked position i (thread i / IPT, item i % IPT) with
// payload i: BlockRadixSort is stable with respect to the blocked order, which makes the argsort
// stable, and the padding (positions >= N, all-ones key) sorts after every real element.
// SortBlockedToStriped leaves rank j * BLOCK_THREADS + t in thread t's item j, for pred and target
// alike, so ranks pair up in registers and the stores of perm / perm_t / deriv are coalesced.
// The launch bounds name a minimum of 1 block per SM: with the thread count alone, ptxas (CUDA
// 13.0, sm_90) held <double, 256, 4> to 64 registers and spilled 32 bytes; with it, 85 and none.
template <typename scalar_t, int BLOCK_THREADS, int ITEMS_PER_THREAD>
__global__ void __launch_bounds__(BLOCK_THREADS, 1)
pdl_block_forward_kernel(const scalar_t* __restrict__ pred_ptr, int64_t pred_b_stride, int64_t pred_c_stride,
                         int64_t pred_n_stride, const scalar_t* __restrict__ target_ptr, int64_t target_b_stride,
                         int64_t target_c_stride, int64_t target_n_stride,
                         typename AccOf<scalar_t>::type* __restrict__ w_ptr,  // [rows]
                         int32_t* __restrict__ perm_ptr,                      // [rows, N]
                         int32_t* __restrict__ perm_t_ptr,                    // [rows, N] or nullptr
                         int8_t* __restrict__ sign_ptr,                       // [rows, N] if p == 1
                         typename AccOf<scalar_t>::type* __restrict__ d2_ptr, // [rows, N] if p == 2
                         int64_t rows, int64_t C, int N) {
  using acc_t = typename AccOf<scalar_t>::type;
  using key_t = typename KeyOf<acc_t>::type;
  using BlockExchangeT = cub::BlockExchange<key_t, BLOCK_THREADS, ITEMS_PER_THREAD>;
  using BlockSortPairsT = cub::BlockRadixSort<key_t, BLOCK_THREADS, ITEMS_PER_THREAD, int32_t>;
  using BlockSortKeysT = cub::BlockRadixSort<key_t, BLOCK_THREADS, ITEMS_PER_THREAD>;
  using BlockReduceT = cub::BlockReduce<double, BLOCK_THREADS>;
  __shared__ union SharedStorage {
    typename BlockExchangeT::TempStorage exchange;
    typename BlockSortPairsT::TempStorage sort_pairs;
    typename BlockSortKeysT::TempStorage sort_keys;
    typename BlockReduceT::TempStorage reduce;
  } smem;

  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t b = row / C, c = row % C;
    const int64_t row_offset = row * N;

    key_t pred_keys[ITEMS_PER_THREAD];
    int32_t pred_idx[ITEMS_PER_THREAD];
    load_row_keys_striped<BLOCK_THREADS>(pred_ptr + b * pred_b_stride + c * pred_c_stride, pred_n_stride, N,
                                         pred_keys);
    BlockExchangeT(smem.exchange).StripedToBlocked(pred_keys);
#pragma unroll
    for (int j = 0; j < ITEMS_PER_THREAD; ++j) pred_idx[j] = tid * ITEMS_PER_THREAD + j;
    __syncthreads();
    BlockSortPairsT(smem.sort_pairs).SortBlockedToStriped(pred_keys, pred_idx);
    __syncthreads();

    key_t target_keys[ITEMS_PER_THREAD];
    int32_t target_idx[ITEMS_PER_THREAD];
    load_row_keys_striped<BLOCK_THREADS>(target_ptr + b * target_b_stride + c * target_c_stride,
                                         target_n_stride, N, target_keys);
    BlockExchangeT(smem.exchange).StripedToBlocked(target_keys);
#pragma unroll
    for (int j = 0; j < ITEMS_PER_THREAD; ++j) target_idx[j] = tid * ITEMS_PER_THREAD + j;
    __syncthreads();
    if (perm_t_ptr != nullptr) {
      BlockSortPairsT(smem.sort_pairs).SortBlockedToStriped(target_keys, target_idx);
    } else {
      BlockSortKeysT(smem.sort_keys).SortBlockedToStriped(target_keys);
    }
    __syncthreads();

    double total = 0.0;
#pragma unroll
    for (int j = 0; j < ITEMS_PER_THREAD; ++j) {
      const int i = j * BLOCK_THREADS + tid;
      if (i < N) {
        const acc_t d = key_to_float(pred_keys[j]) - key_to_float(target_keys[j]);
        total += pdl_rank_term<acc_t>(d, row_offset + i, sign_ptr, d2_ptr);
        perm_ptr[row_offset + i] = pred_idx[j];
        if (perm_t_ptr != nullptr) perm_t_ptr[row_offset + i] = target_idx[j];
      }
    }
    const double sum = BlockReduceT(smem.reduce).Sum(total);  // valid in thread 0
    if (tid == 0) w_ptr[row] = static_cast<acc_t>(sum / static_cast<double>(N));
    __syncthreads();  // smem is reused by the next row
  }
}

// Segmented path, step 1, for rows [row_begin, row_begin + rows) of the [B, C, N] inputs (a chunk
// with rows * N < 2^31): keys of both inputs and the in-row position as the sort payload, all
// chunk-local [rows, N], and the segment offsets [rows + 1] (k * N).
template <typename scalar_t>
__global__ void pdl_make_keys_kernel(const scalar_t* __restrict__ pred_ptr, int64_t pred_b_stride,
                                     int64_t pred_c_stride, int64_t pred_n_stride,
                                     const scalar_t* __restrict__ target_ptr, int64_t target_b_stride,
                                     int64_t target_c_stride, int64_t target_n_stride,
                                     typename KeyOf<typename AccOf<scalar_t>::type>::type* __restrict__ pred_keys_ptr,
                                     typename KeyOf<typename AccOf<scalar_t>::type>::type* __restrict__ target_keys_ptr,
                                     int32_t* __restrict__ position_ptr, int32_t* __restrict__ offsets_ptr,
                                     int64_t row_begin, int64_t rows, int64_t C, int64_t N) {
  const int64_t total = rows * N;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t at = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; at < total; at += step) {
    const int64_t local_row = at / N;
    const int64_t i = at - local_row * N;
    const int64_t row = row_begin + local_row;
    const int64_t b = row / C, c = row % C;
    pred_keys_ptr[at] = float_to_key(to_acc(pred_ptr[b * pred_b_stride + c * pred_c_stride + i * pred_n_stride]));
    target_keys_ptr[at] =
        float_to_key(to_acc(target_ptr[b * target_b_stride + c * target_c_stride + i * target_n_stride]));
    position_ptr[at] = static_cast<int32_t>(i);
    if (at <= rows) offsets_ptr[at] = static_cast<int32_t>(at * N);
  }
  if (total < rows + 1) {  // only when N == 1: the loop above did not reach offsets[rows]
    if (blockIdx.x == 0 && threadIdx.x == 0) offsets_ptr[rows] = static_cast<int32_t>(rows * N);
  }
}

// Segmented path, step 3: rows sorted (chunk-local [rows, N] keys), one block per row computes the
// differences by rank, stores deriv and reduces W.
template <typename acc_t, int BLOCK_THREADS>
__global__ void __launch_bounds__(BLOCK_THREADS)
pdl_sorted_rows_kernel(const typename KeyOf<acc_t>::type* __restrict__ pred_sorted_ptr,
                       const typename KeyOf<acc_t>::type* __restrict__ target_sorted_ptr,
                       acc_t* __restrict__ w_ptr,        // [B*C]
                       int8_t* __restrict__ sign_ptr,    // [B*C, N] if p == 1
                       acc_t* __restrict__ d2_ptr,       // [B*C, N] if p == 2
                       int64_t row_begin, int64_t rows, int64_t N) {
  using BlockReduceT = cub::BlockReduce<double, BLOCK_THREADS>;
  __shared__ typename BlockReduceT::TempStorage reduce_storage;
  for (int64_t local_row = blockIdx.x; local_row < rows; local_row += gridDim.x) {
    const int64_t local_offset = local_row * N;
    const int64_t row_offset = (row_begin + local_row) * N;
    double total = 0.0;
    for (int64_t i = threadIdx.x; i < N; i += BLOCK_THREADS) {
      const acc_t d = key_to_float(pred_sorted_ptr[local_offset + i]) - key_to_float(target_sorted_ptr[local_offset + i]);
      total += pdl_rank_term<acc_t>(d, row_offset + i, sign_ptr, d2_ptr);
    }
    const double sum = BlockReduceT(reduce_storage).Sum(total);
    if (threadIdx.x == 0) w_ptr[row_begin + local_row] = static_cast<acc_t>(sum / static_cast<double>(N));
    __syncthreads();
  }
}

// grad_pred[r, perm[r,i]] = g[r]/N * deriv[r,i],  grad_target[r, perm_t[r,i]] = -(same); one thread
// per (row, rank). A row's ranks are a permutation of its positions, so every output element is
// written exactly once. deriv_t is int8 (p=1) or acc_t (p=2).
template <typename out_t, typename acc_t, typename deriv_t>
__global__ void pdl_backward_kernel(const acc_t* __restrict__ grad_w_ptr,      // [rows]
                                    const int32_t* __restrict__ perm_ptr,      // [rows, N]
                                    const int32_t* __restrict__ perm_t_ptr,    // [rows, N]
                                    const deriv_t* __restrict__ deriv_ptr,     // [rows, N]
                                    out_t* __restrict__ grad_pred_ptr,         // [rows, N] or nullptr
                                    out_t* __restrict__ grad_target_ptr,       // [rows, N] or nullptr
                                    int64_t rows, int64_t N, acc_t inv_n) {
  const int64_t total = rows * N;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t at = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; at < total; at += step) {
    const int64_t row = at / N;
    const int64_t row_offset = row * N;
    const acc_t value = (grad_w_ptr[row] * inv_n) * static_cast<acc_t>(deriv_ptr[at]);
    if (grad_pred_ptr != nullptr) grad_pred_ptr[row_offset + perm_ptr[at]] = FromAcc<out_t>::apply(value);
    if (grad_target_ptr != nullptr) grad_target_ptr[row_offset + perm_t_ptr[at]] = FromAcc<out_t>::apply(-value);
  }
}

}  // namespace pdl
}  // namespace fastloss
