// MDF on CUDA: the squared-difference reductions of all feature pairs, one launch each way.
// Same contract as csrc/cpu/mdf.cpp. For feature tensors X_m [2B, C_m, H_m, W_m] (pred then target
// on the batch axis) and per-channel weights w_m:
//
//   forward:  partial[b, k] = sum over chunk k of sample b of w[c] (X[b] - X[B+b])^2
//             (the binding adds the K partials of each sample in order: no atomics, deterministic)
//             diff_m[b, i]  = X[b, i] - X[B+b, i]        (kept for the backward when asked)
//   backward: grad_m[b, i]  = g[b] * 2 w[c] diff_m[b, i]
//
// Grid (K, B): block (k, b) finds the tensor owning chunk k in the descriptor table (a kernel
// parameter, by value: nothing is copied to the device before a launch) and covers
// MDF_CUDA_CHUNK elements of sample b with MDF_CUDA_THREADS threads (coalesced, strided by the
// block size); the forward reduces in the block (warp shuffles, then shared memory).
//
// Also here: the convolutions' fused epilogue, y = LeakyReLU(y + b[c]) in place (grid-stride loop).
#include "cuda/mdf_launch.h"
#include "cuda/status.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace fastloss {
namespace {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> struct FromAcc {
  template <typename A> static __device__ __forceinline__ T apply(A x) { return static_cast<T>(x); }
};
template <> struct FromAcc<__half> {
  static __device__ __forceinline__ __half apply(float x) { return __float2half_rn(x); }
};
template <> struct FromAcc<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 apply(float x) { return __float2bfloat16_rn(x); }
};

// The descriptors of one launch, passed by value (in the kernel's parameter space).
struct MdfDescTable {
  MdfTensorDesc d[MDF_CUDA_MAX_TENSORS];
};

__device__ __forceinline__ int find_tensor(const MdfTensorDesc* desc, int M, int64_t k) {
  int m = 0;
  for (int j = 1; j < M; ++j) m = k >= desc[j].first_chunk ? j : m;
  return m;
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[MDF_CUDA_THREADS / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < MDF_CUDA_THREADS / 32 ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

template <typename scalar_t>
__global__ void __launch_bounds__(MDF_CUDA_THREADS)
mdf_forward_kernel(const MdfDescTable table, int M, int64_t k0, int64_t K, int64_t B,
                   typename AccOf<scalar_t>::type* __restrict__ partial) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t k = k0 + blockIdx.x, b = blockIdx.y;
  const MdfTensorDesc d = table.d[find_tensor(table.d, M, k)];
  const scalar_t* p = static_cast<const scalar_t*>(d.x) + b * d.n;
  const scalar_t* t = static_cast<const scalar_t*>(d.x) + (B + b) * d.n;
  const acc_t* w = static_cast<const acc_t*>(d.w);
  scalar_t* diff_out = d.out == nullptr ? nullptr : static_cast<scalar_t*>(d.out) + b * d.n;
  const int64_t begin = (k - d.first_chunk) * MDF_CUDA_CHUNK;
  const int64_t end = begin + MDF_CUDA_CHUNK < d.n ? begin + MDF_CUDA_CHUNK : d.n;
  acc_t s = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += MDF_CUDA_THREADS) {
    const acc_t diff = to_acc(p[i]) - to_acc(t[i]);
    s += w[(i / d.cdiv) % d.C] * diff * diff;
    if (diff_out != nullptr) diff_out[i] = FromAcc<scalar_t>::apply(diff);
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partial[b * K + k] = s;
}

template <typename scalar_t>
__global__ void __launch_bounds__(MDF_CUDA_THREADS)
mdf_backward_kernel(const MdfDescTable table, int M, int64_t k0,
                    const typename AccOf<scalar_t>::type* __restrict__ grad) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t k = k0 + blockIdx.x, b = blockIdx.y;
  const MdfTensorDesc d = table.d[find_tensor(table.d, M, k)];
  const scalar_t* diff = static_cast<const scalar_t*>(d.x) + b * d.n;
  scalar_t* out = static_cast<scalar_t*>(d.out) + b * d.n;
  const acc_t* w = static_cast<const acc_t*>(d.w);
  const acc_t g2 = acc_t(2) * grad[b];
  const int64_t begin = (k - d.first_chunk) * MDF_CUDA_CHUNK;
  const int64_t end = begin + MDF_CUDA_CHUNK < d.n ? begin + MDF_CUDA_CHUNK : d.n;
  for (int64_t i = begin + threadIdx.x; i < end; i += MDF_CUDA_THREADS) {
    out[i] = FromAcc<scalar_t>::apply(g2 * w[(i / d.cdiv) % d.C] * to_acc(diff[i]));
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(MDF_CUDA_THREADS)
mdf_bias_lrelu_kernel(scalar_t* __restrict__ y, const scalar_t* __restrict__ b, int64_t numel, int64_t C,
                      int64_t cdiv, typename AccOf<scalar_t>::type slope) {
  using acc_t = typename AccOf<scalar_t>::type;
  for (int64_t i = blockIdx.x * int64_t(MDF_CUDA_THREADS) + threadIdx.x; i < numel;
       i += int64_t(gridDim.x) * MDF_CUDA_THREADS) {
    const acc_t v = to_acc(y[i]) + to_acc(b[(i / cdiv) % C]);
    y[i] = FromAcc<scalar_t>::apply(v > acc_t(0) ? v : v * slope);
  }
}

MdfStatus check(const MdfParams& params, const char* where) {
  if (params.desc == nullptr || params.M < 1 || params.K < 1 || params.B < 1)
    return make_status(cudaErrorInvalidValue, where);
  if (params.K > INT_MAX || params.B > 65535) return make_status(cudaErrorInvalidConfiguration, where);
  return {};
}

template <typename scalar_t>
MdfStatus launch(const MdfParams& params, bool forward, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  // groups of up to MDF_CUDA_MAX_TENSORS tensors, each launch over its own chunks [k0, k1)
  for (int g0 = 0; g0 < params.M; g0 += MDF_CUDA_MAX_TENSORS) {
    const int m = params.M - g0 < MDF_CUDA_MAX_TENSORS ? params.M - g0 : MDF_CUDA_MAX_TENSORS;
    MdfDescTable table{};
    for (int j = 0; j < m; ++j) table.d[j] = params.desc[g0 + j];
    const int64_t k0 = table.d[0].first_chunk;
    const int64_t k1 = g0 + m < params.M ? params.desc[g0 + m].first_chunk : params.K;
    if (k1 <= k0) continue;
    const dim3 grid(static_cast<unsigned>(k1 - k0), static_cast<unsigned>(params.B));
    if (forward) {
      mdf_forward_kernel<scalar_t><<<grid, MDF_CUDA_THREADS, 0, stream>>>(table, m, k0, params.K, params.B,
                                                                          static_cast<acc_t*>(params.partial));
    } else {
      mdf_backward_kernel<scalar_t><<<grid, MDF_CUDA_THREADS, 0, stream>>>(table, m, k0,
                                                                           static_cast<const acc_t*>(params.grad));
    }
    FASTLOSS_CUDA_RETURN_IF_ERROR(cudaGetLastError(),
                                  forward ? "mdf forward kernel launch" : "mdf backward kernel launch");
  }
  return {};
}

MdfStatus run(const MdfParams& params, bool forward, cudaStream_t stream) {
  const char* where = forward ? "mdf_sqdiff_forward_cuda: bad parameters" : "mdf_sqdiff_backward_cuda: bad parameters";
  MdfStatus s = check(params, where);
  if (!s.ok()) return s;
  DeviceScope scope(params.device);
  FASTLOSS_CUDA_RETURN_IF_ERROR(scope.error(), "mdf: cudaSetDevice");
  switch (params.dtype) {
    case MdfDtype::kFloat32: return launch<float>(params, forward, stream);
    case MdfDtype::kFloat64: return launch<double>(params, forward, stream);
    case MdfDtype::kFloat16: return launch<__half>(params, forward, stream);
    case MdfDtype::kBFloat16: return launch<__nv_bfloat16>(params, forward, stream);
  }
  return make_status(cudaErrorInvalidValue, "mdf: unknown dtype");
}

template <typename scalar_t>
MdfStatus launch_bias_lrelu(const MdfBiasLreluParams& p, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t blocks = (p.numel + MDF_CUDA_THREADS - 1) / MDF_CUDA_THREADS;
  const unsigned grid = static_cast<unsigned>(blocks < (int64_t(1) << 20) ? blocks : (int64_t(1) << 20));
  mdf_bias_lrelu_kernel<scalar_t><<<grid, MDF_CUDA_THREADS, 0, stream>>>(
      static_cast<scalar_t*>(p.y), static_cast<const scalar_t*>(p.b), p.numel, p.C, p.cdiv, static_cast<acc_t>(p.slope));
  FASTLOSS_CUDA_RETURN_IF_ERROR(cudaGetLastError(), "mdf bias + LeakyReLU kernel launch");
  return {};
}

}  // namespace

MdfStatus mdf_bias_leaky_relu_cuda(const MdfBiasLreluParams& params, CUstream_st* stream) {
  if (params.numel == 0) return {};
  if (params.y == nullptr || params.b == nullptr || params.C < 1 || params.cdiv < 1)
    return make_status(cudaErrorInvalidValue, "mdf_bias_leaky_relu_cuda: bad parameters");
  DeviceScope scope(params.device);
  FASTLOSS_CUDA_RETURN_IF_ERROR(scope.error(), "mdf: cudaSetDevice");
  switch (params.dtype) {
    case MdfDtype::kFloat32: return launch_bias_lrelu<float>(params, stream);
    case MdfDtype::kFloat64: return launch_bias_lrelu<double>(params, stream);
    case MdfDtype::kFloat16: return launch_bias_lrelu<__half>(params, stream);
    case MdfDtype::kBFloat16: return launch_bias_lrelu<__nv_bfloat16>(params, stream);
  }
  return make_status(cudaErrorInvalidValue, "mdf: unknown dtype");
}

MdfStatus mdf_sqdiff_forward_cuda(const MdfParams& params, CUstream_st* stream) { return run(params, true, stream); }

MdfStatus mdf_sqdiff_backward_cuda(const MdfParams& params, CUstream_st* stream) {
  return run(params, false, stream);
}

}  // namespace fastloss
