// PDL (projected distribution loss) on CUDA: launchers for the kernels in pdl_kernels.cuh.
// Same contract as csrc/cpu/pdl.cpp. Per row r = (b, c) of pred, target [B, C, N]:
//
//   W[r] = (1/N) sum_i |sort(pred[r])_i - sort(target[r])_i|^p,   p in {1, 2}
//   d = sorted pred - sorted target (by rank);  saved deriv: p=1 int8 sign(d), p=2 2*d
//   grad_pred[r, perm[r,i]] = g[r] deriv[r,i] / N,   grad_target[r, perm_t[r,i]] = -g[r] deriv[r,i] / N
//
// Sorting is a stable argsort on order-preserving unsigned keys (-0.0 == +0.0, NaN last), so ties
// keep their original order, like the CPU op. Where the sort runs depends on N:
//   N <= PDL_BLOCK_SORT_MAX_N (4096): one thread block per row, cub::BlockRadixSort of keys with
//     int32 positions (the smallest of 128x1, 128x2, 128x4, 256x4, 256x8, 512x8 threads x items
//     that holds N; the tail padded with an all-ones key), and the difference, |d|^p, deriv and
//     the block reduction to W in the same kernel: one launch, nothing but the outputs in memory.
//   N > 4096: keys + positions into a workspace, cub::DeviceSegmentedSort::StableSortPairs (one
//     segment per row; perm / perm_t are its value outputs), then one fused kernel for the
//     difference, deriv and W. Rows go in chunks of <= 2^25 elements (cub counts items in int),
//     which also bounds the workspace (pdl_forward_workspace_bytes); each chunk is sorted
//     SORT_SEGMENTS_PER_CALL rows per call (see there).
//     Not cub::DeviceSegmentedRadixSort: compiled for sm_90 (CUDA 13.0), its kernel spills 24 bytes
//     (pairs) and 4 bytes (keys only) at the tuning policy CUB picks (benchmarks/gpu_static.py,
//     issue 13); DeviceSegmentedSort's kernels spill nothing on sm_80 or sm_90.
// Backward is one scatter kernel over (row, rank).
#include "cuda/pdl_kernels.cuh"
#include "cuda/pdl_launch.h"
#include "cuda/status.h"

#include <cub/device/device_segmented_sort.cuh>

#include <algorithm>
#include <climits>
#include <cstdint>

namespace fastloss {
namespace {

using pdl::AccOf;
using pdl::KeyOf;

constexpr int64_t MAX_GRID = INT_MAX;                      // gridDim.x limit
constexpr int64_t SEGMENTED_CHUNK_ELEMENTS = int64_t(1) << 25;  // ~0.8 GB of float32 workspace
constexpr int SEGMENTED_BLOCK_THREADS = 256;
constexpr int ELEMENTWISE_BLOCK_THREADS = 256;
constexpr int64_t ELEMENTWISE_MAX_GRID = int64_t(1) << 20;  // grid-stride loops beyond this
constexpr size_t WORKSPACE_ALIGN = 256;
// Rows per cub::DeviceSegmentedSort call. Above PARTITIONING_THRESHOLD segments (300 or 500 by
// arch in CUDA 13.0's tuning_segmented_sort.cuh) CUB first partitions the segments by size and
// copies the group sizes to the host with a stream synchronisation (dispatch_segmented_sort.cuh,
// without relocatable device code), which would stall every step and break CUDA-graph capture.
// At most 256 segments per call it runs one kernel, a block per segment, and never synchronises.
constexpr int64_t SORT_SEGMENTS_PER_CALL = 256;
static_assert(512 * 8 == PDL_BLOCK_SORT_MAX_N, "the largest block-sort tile must be PDL_BLOCK_SORT_MAX_N");

template <typename T> struct TypeTag { using type = T; };

template <typename F>
PdlStatus dispatch_dtype(PdlDtype dtype, F&& f) {
  switch (dtype) {
    case PdlDtype::kFloat32: return f(TypeTag<float>{});
    case PdlDtype::kFloat64: return f(TypeTag<double>{});
    case PdlDtype::kFloat16: return f(TypeTag<__half>{});
    case PdlDtype::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
  }
  return make_status(cudaErrorInvalidValue, "pdl: unknown dtype");
}

PdlStatus check_forward_params(const PdlForwardParams& params) {
  if (params.B < 0 || params.C < 0 || params.N < 1 || params.N > INT32_MAX)
    return make_status(cudaErrorInvalidValue, "pdl_forward_cuda: B, C must be >= 0 and N in [1, 2^31)");
  if (params.p != 1 && params.p != 2) return make_status(cudaErrorInvalidValue, "pdl_forward_cuda: p must be 1 or 2");
  return {};
}

// ---- N <= PDL_BLOCK_SORT_MAX_N: one fused kernel -------------------------------------------------

template <typename scalar_t, int BLOCK_THREADS, int ITEMS_PER_THREAD>
PdlStatus launch_block_forward(const PdlForwardParams& params, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t rows = params.B * params.C;
  const int grid = static_cast<int>(std::min(rows, MAX_GRID));
  pdl::pdl_block_forward_kernel<scalar_t, BLOCK_THREADS, ITEMS_PER_THREAD><<<grid, BLOCK_THREADS, 0, stream>>>(
      static_cast<const scalar_t*>(params.pred_ptr), params.pred_b_stride, params.pred_c_stride,
      params.pred_n_stride, static_cast<const scalar_t*>(params.target_ptr), params.target_b_stride,
      params.target_c_stride, params.target_n_stride, static_cast<acc_t*>(params.w_ptr), params.perm_ptr,
      params.perm_t_ptr, params.p == 1 ? static_cast<int8_t*>(params.deriv_ptr) : nullptr,
      params.p == 2 ? static_cast<acc_t*>(params.deriv_ptr) : nullptr, rows, params.C, static_cast<int>(params.N));
  FASTLOSS_CUDA_RETURN_IF_ERROR(cudaGetLastError(), "pdl block-sort forward kernel launch");
  return {};
}

template <typename scalar_t>
PdlStatus block_forward(const PdlForwardParams& params, cudaStream_t stream) {
  const int64_t N = params.N;
  if (N <= 128) return launch_block_forward<scalar_t, 128, 1>(params, stream);
  if (N <= 256) return launch_block_forward<scalar_t, 128, 2>(params, stream);
  if (N <= 512) return launch_block_forward<scalar_t, 128, 4>(params, stream);
  if (N <= 1024) return launch_block_forward<scalar_t, 256, 4>(params, stream);
  if (N <= 2048) return launch_block_forward<scalar_t, 256, 8>(params, stream);
  return launch_block_forward<scalar_t, 512, 8>(params, stream);
}

// ---- N > PDL_BLOCK_SORT_MAX_N: segmented sort, then a fused kernel ----------------------------------

size_t align_up(size_t bytes) { return (bytes + WORKSPACE_ALIGN - 1) / WORKSPACE_ALIGN * WORKSPACE_ALIGN; }

// A target without grad is sorted keys only, except float64's: compiled for sm_80 (CUDA 13.0),
// DeviceSegmentedSort's 64-bit keys-only kernels spill 76 bytes and its pairs kernels nothing, so
// float64 sorts (key, position) pairs and drops the positions into a scratch slot.
template <typename key_t> inline constexpr bool kKeysOnlyTarget = sizeof(key_t) == 4;

// Byte offsets into the workspace, for chunks of chunk_rows rows. keys_a holds the pred keys and,
// once pred is sorted, receives the sorted target keys. scratch_positions: the discarded payload
// of a float64 target sorted without grad.
struct SegmentedLayout {
  int64_t chunk_rows = 0;
  size_t keys_a = 0, keys_b = 0, pred_sorted = 0, positions = 0, scratch_positions = 0, offsets = 0, cub_temp = 0;
  size_t cub_temp_bytes = 0, total_bytes = 0;
};

// Temp storage of one sort call: at most SORT_SEGMENTS_PER_CALL rows of N.
template <typename key_t>
cudaError_t cub_sort_bytes(int64_t chunk_rows, int64_t N, bool target_grad, size_t* bytes) {
  const int64_t call_rows = std::min(chunk_rows, SORT_SEGMENTS_PER_CALL);
  const int items = static_cast<int>(call_rows * N);
  const int segments = static_cast<int>(call_rows);
  const int32_t* offsets = nullptr;
  size_t pairs_bytes = 0, keys_bytes = 0;
  cudaError_t err = cub::DeviceSegmentedSort::StableSortPairs(
      nullptr, pairs_bytes, static_cast<const key_t*>(nullptr), static_cast<key_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), items, segments, offsets, offsets + 1);
  if (err != cudaSuccess) return err;
  if constexpr (kKeysOnlyTarget<key_t>) {
    if (!target_grad) {
      err = cub::DeviceSegmentedSort::StableSortKeys(nullptr, keys_bytes, static_cast<const key_t*>(nullptr),
                                                     static_cast<key_t*>(nullptr), items, segments, offsets,
                                                     offsets + 1);
      if (err != cudaSuccess) return err;
    }
  }
  *bytes = std::max(pairs_bytes, keys_bytes);
  return cudaSuccess;
}

template <typename key_t>
cudaError_t segmented_layout(const PdlForwardParams& params, SegmentedLayout* layout) {
  const int64_t rows = params.B * params.C, N = params.N;
  int64_t chunk_rows = std::max<int64_t>(1, SEGMENTED_CHUNK_ELEMENTS / N);
  chunk_rows = std::min<int64_t>(chunk_rows, INT32_MAX / N);  // >= 1 since N < 2^31
  chunk_rows = std::max<int64_t>(1, std::min(chunk_rows, rows));
  const size_t elements = static_cast<size_t>(chunk_rows * N);
  SegmentedLayout l;
  l.chunk_rows = chunk_rows;
  cudaError_t err = cub_sort_bytes<key_t>(chunk_rows, N, params.perm_t_ptr != nullptr, &l.cub_temp_bytes);
  if (err != cudaSuccess) return err;
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t start = at;
    at = align_up(at + bytes);
    return start;
  };
  l.keys_a = take(elements * sizeof(key_t));
  l.keys_b = take(elements * sizeof(key_t));
  l.pred_sorted = take(elements * sizeof(key_t));
  l.positions = take(elements * sizeof(int32_t));
  const bool scratch = params.perm_t_ptr == nullptr && !kKeysOnlyTarget<key_t>;
  l.scratch_positions = take(scratch ? elements * sizeof(int32_t) : 0);
  l.offsets = take(static_cast<size_t>(chunk_rows + 1) * sizeof(int32_t));
  l.cub_temp = take(l.cub_temp_bytes);
  l.total_bytes = at;
  *layout = l;
  return cudaSuccess;
}

template <typename scalar_t>
PdlStatus segmented_forward(const PdlForwardParams& params, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  using key_t = typename KeyOf<acc_t>::type;
  SegmentedLayout layout;
  FASTLOSS_CUDA_RETURN_IF_ERROR(segmented_layout<key_t>(params, &layout),
                                "cub::DeviceSegmentedSort temp-storage query");
  if (params.workspace_ptr == nullptr || params.workspace_bytes < layout.total_bytes)
    return make_status(cudaErrorInvalidValue, "pdl_forward_cuda: workspace smaller than pdl_forward_workspace_bytes()");

  char* workspace = static_cast<char*>(params.workspace_ptr);
  key_t* keys_a = reinterpret_cast<key_t*>(workspace + layout.keys_a);            // [chunk, N]
  key_t* keys_b = reinterpret_cast<key_t*>(workspace + layout.keys_b);            // [chunk, N]
  key_t* pred_sorted = reinterpret_cast<key_t*>(workspace + layout.pred_sorted);  // [chunk, N]
  int32_t* positions = reinterpret_cast<int32_t*>(workspace + layout.positions);  // [chunk, N]
  int32_t* target_positions = params.perm_t_ptr != nullptr  // [chunk, N] rows of perm_t, or scratch
                                  ? nullptr
                                  : reinterpret_cast<int32_t*>(workspace + layout.scratch_positions);
  int32_t* offsets = reinterpret_cast<int32_t*>(workspace + layout.offsets);      // [chunk + 1]
  void* cub_temp = workspace + layout.cub_temp;

  const int64_t rows = params.B * params.C, N = params.N;
  acc_t* w_ptr = static_cast<acc_t*>(params.w_ptr);
  int8_t* sign_ptr = params.p == 1 ? static_cast<int8_t*>(params.deriv_ptr) : nullptr;
  acc_t* d2_ptr = params.p == 2 ? static_cast<acc_t*>(params.deriv_ptr) : nullptr;

  for (int64_t row_begin = 0; row_begin < rows; row_begin += layout.chunk_rows) {
    const int64_t chunk_rows = std::min(layout.chunk_rows, rows - row_begin);
    const int64_t elements = chunk_rows * N;

    const int64_t key_grid = std::min(ELEMENTWISE_MAX_GRID,
                                      (elements + ELEMENTWISE_BLOCK_THREADS - 1) / ELEMENTWISE_BLOCK_THREADS);
    pdl::pdl_make_keys_kernel<scalar_t><<<static_cast<int>(key_grid), ELEMENTWISE_BLOCK_THREADS, 0, stream>>>(
        static_cast<const scalar_t*>(params.pred_ptr), params.pred_b_stride, params.pred_c_stride,
        params.pred_n_stride, static_cast<const scalar_t*>(params.target_ptr), params.target_b_stride,
        params.target_c_stride, params.target_n_stride, keys_a, keys_b, positions, offsets, row_begin, chunk_rows,
        params.C, N);
    FASTLOSS_CUDA_RETURN_IF_ERROR(cudaGetLastError(), "pdl make-keys kernel launch");

    // Sort SORT_SEGMENTS_PER_CALL rows per call. offsets[k] = k * N, so the first call_rows + 1
    // offsets serve every call once the key / value pointers start at the call's first row.
    for (int64_t call_begin = 0; call_begin < chunk_rows; call_begin += SORT_SEGMENTS_PER_CALL) {
      const int64_t call_rows = std::min(SORT_SEGMENTS_PER_CALL, chunk_rows - call_begin);
      const int64_t at = call_begin * N;
      const int items = static_cast<int>(call_rows * N), segments = static_cast<int>(call_rows);
      const int32_t* begin_offsets = offsets;
      size_t temp_bytes = layout.cub_temp_bytes;
      FASTLOSS_CUDA_RETURN_IF_ERROR(
          cub::DeviceSegmentedSort::StableSortPairs(
              cub_temp, temp_bytes, static_cast<const key_t*>(keys_a) + at, pred_sorted + at,
              static_cast<const int32_t*>(positions) + at, params.perm_ptr + row_begin * N + at, items, segments,
              begin_offsets, begin_offsets + 1, stream),
          "cub::DeviceSegmentedSort::StableSortPairs (pred rows)");
      temp_bytes = layout.cub_temp_bytes;
      auto sort_target_pairs = [&](int32_t* target_out) -> PdlStatus {
        FASTLOSS_CUDA_RETURN_IF_ERROR(
            cub::DeviceSegmentedSort::StableSortPairs(
                cub_temp, temp_bytes, static_cast<const key_t*>(keys_b) + at, keys_a + at,
                static_cast<const int32_t*>(positions) + at, target_out, items, segments, begin_offsets,
                begin_offsets + 1, stream),
            "cub::DeviceSegmentedSort::StableSortPairs (target rows)");
        return {};
      };
      PdlStatus target_status;
      if (params.perm_t_ptr != nullptr) {
        target_status = sort_target_pairs(params.perm_t_ptr + row_begin * N + at);
      } else if constexpr (kKeysOnlyTarget<key_t>) {  // (a discarded branch is never instantiated)
        FASTLOSS_CUDA_RETURN_IF_ERROR(
            cub::DeviceSegmentedSort::StableSortKeys(cub_temp, temp_bytes, static_cast<const key_t*>(keys_b) + at,
                                                     keys_a + at, items, segments, begin_offsets, begin_offsets + 1,
                                                     stream),
            "cub::DeviceSegmentedSort::StableSortKeys (target rows)");
      } else {
        target_status = sort_target_pairs(target_positions + at);
      }
      if (!target_status.ok()) return target_status;
    }

    pdl::pdl_sorted_rows_kernel<acc_t, SEGMENTED_BLOCK_THREADS>
        <<<static_cast<int>(chunk_rows), SEGMENTED_BLOCK_THREADS, 0, stream>>>(pred_sorted, keys_a, w_ptr, sign_ptr,
                                                                                d2_ptr, row_begin, chunk_rows, N);
    FASTLOSS_CUDA_RETURN_IF_ERROR(cudaGetLastError(), "pdl sorted-rows kernel launch");
  }
  return {};
}

// ---- backward --------------------------------------------------------------------------------------

template <typename out_t, typename deriv_t>
PdlStatus launch_backward(const PdlBackwardParams& params, cudaStream_t stream) {
  using acc_t = typename AccOf<out_t>::type;
  const int64_t elements = params.rows * params.N;
  const int64_t grid =
      std::min(ELEMENTWISE_MAX_GRID, (elements + ELEMENTWISE_BLOCK_THREADS - 1) / ELEMENTWISE_BLOCK_THREADS);
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(params.N);
  pdl::pdl_backward_kernel<out_t, acc_t, deriv_t><<<static_cast<int>(grid), ELEMENTWISE_BLOCK_THREADS, 0, stream>>>(
      static_cast<const acc_t*>(params.grad_w_ptr), params.perm_ptr, params.perm_t_ptr,
      static_cast<const deriv_t*>(params.deriv_ptr), static_cast<out_t*>(params.grad_pred_ptr),
      static_cast<out_t*>(params.grad_target_ptr), params.rows, params.N, inv_n);
  FASTLOSS_CUDA_RETURN_IF_ERROR(cudaGetLastError(), "pdl backward scatter kernel launch");
  return {};
}

}  // namespace

PdlStatus pdl_forward_workspace_bytes(const PdlForwardParams& params, size_t* bytes) {
  *bytes = 0;
  PdlStatus status = check_forward_params(params);
  if (!status.ok()) return status;
  if (params.N <= PDL_BLOCK_SORT_MAX_N || params.B * params.C == 0) return {};
  DeviceScope device(params.device);
  FASTLOSS_CUDA_RETURN_IF_ERROR(device.error(), "cudaSetDevice");
  return dispatch_dtype(params.dtype, [&](auto tag) -> PdlStatus {
    using acc_t = typename AccOf<typename decltype(tag)::type>::type;
    SegmentedLayout layout;
    FASTLOSS_CUDA_RETURN_IF_ERROR(segmented_layout<typename KeyOf<acc_t>::type>(params, &layout),
                                  "cub::DeviceSegmentedSort temp-storage query");
    *bytes = layout.total_bytes;
    return {};
  });
}

PdlStatus pdl_forward_cuda(const PdlForwardParams& params, CUstream_st* stream) {
  PdlStatus status = check_forward_params(params);
  if (!status.ok()) return status;
  if (params.B * params.C == 0) return {};
  DeviceScope device(params.device);
  FASTLOSS_CUDA_RETURN_IF_ERROR(device.error(), "cudaSetDevice");
  return dispatch_dtype(params.dtype, [&](auto tag) -> PdlStatus {
    using scalar_t = typename decltype(tag)::type;
    return params.N <= PDL_BLOCK_SORT_MAX_N ? block_forward<scalar_t>(params, stream)
                                            : segmented_forward<scalar_t>(params, stream);
  });
}

PdlStatus pdl_backward_cuda(const PdlBackwardParams& params, CUstream_st* stream) {
  if (params.rows < 0 || params.N < 1 || params.N > INT32_MAX)
    return make_status(cudaErrorInvalidValue, "pdl_backward_cuda: rows must be >= 0 and N in [1, 2^31)");
  if (params.rows == 0 || (params.grad_pred_ptr == nullptr && params.grad_target_ptr == nullptr)) return {};
  DeviceScope device(params.device);
  FASTLOSS_CUDA_RETURN_IF_ERROR(device.error(), "cudaSetDevice");
  return dispatch_dtype(params.out_dtype, [&](auto tag) -> PdlStatus {
    using out_t = typename decltype(tag)::type;
    using acc_t = typename AccOf<out_t>::type;
    return params.sign_only ? launch_backward<out_t, int8_t>(params, stream)
                            : launch_backward<out_t, acc_t>(params, stream);
  });
}

}  // namespace fastloss
