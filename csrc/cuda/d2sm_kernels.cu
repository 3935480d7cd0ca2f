// D2SM's fused pass on CUDA: the contract of csrc/cpu/d2sm.cpp (see d2sm_launch.h).
//
// With K = (G + 1) / 2 and per row i:
//   pkt:   R_i = (q + dots_i) / 2,                    j over all q,   scale = 1 / q^2
//          P = K'_ij / R'_i, Q = K_ij / R_i,  term = -Q lg,  a = -Q / (P + eps)
//   paper: R_i = (q + dots_i) / 2 - (G_ii + 1) / 2,   j != i,         scale = 1 / q
//          P = K'_ij / R'_i, Q = K_ij / R_i,  term =  P lg,  a = lg + P / (P + eps)
//   lg = log((P + eps) / (Q + eps)),  loss = scale sum_ij term,  c_i = scale sum_j a_ij P_ij
//   W_ij = (scale a_ij - c_i) / (2 R'_i) (0 on the paper diagonal),  grad_rows[n, j] = W_bj + W_jb
//
// Precision, as on the CPU: 1/R and the log argument (P + eps) / (Q + eps) are formed in float64
// and the row sums accumulate in float64 (a row's KL is a small sum of terms of both signs: a
// float32 1/R would shift every log of the row by the same rounding error).
//
// Three kernels, no atomics (deterministic):
//   d2sm_rows_kernel   one block per row: 1/R'_i, 1/R_i, c_i and the row's loss (double
//                      block reductions with cub::BlockReduce)
//   d2sm_grad_kernel   one thread per (requested row b, column j): W_bj from row b and W_jb from
//                      the same entries (G is symmetric) with row j's 1/R and c
//   d2sm_loss_kernel   one block: the loss, the sum of the rows' losses in a fixed order
#include "cuda/d2sm_launch.h"
#include "cuda/status.h"

#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

namespace fastloss {
namespace {

constexpr int ROWS_THREADS = 256;
constexpr int GRAD_THREADS = 256;
constexpr int LOSS_THREADS = 512;
constexpr int64_t MAX_GRID_Y = 65535;

__device__ __forceinline__ float log_of(float x) { return logf(x); }
__device__ __forceinline__ double log_of(double x) { return log(x); }

// (P, loss term, a = dL/dP / scale) of one entry from its kernels and its row's 1/R (float64)
template <typename T, bool PAPER>
__device__ __forceinline__ void entry(T kp, T kt, double ip, double it, double eps, T& P, T& term, T& a) {
  P = kp * static_cast<T>(ip);
  const T Q = kt * static_cast<T>(it);
  const T lg = log_of(static_cast<T>((double(kp) * ip + eps) / (double(kt) * it + eps)));
  const T e = static_cast<T>(eps);
  if (PAPER) {
    term = P * lg;
    a = lg + P / (P + e);
  } else {
    term = -Q * lg;
    a = -Q / (P + e);
  }
}

template <typename T, bool PAPER>
__device__ __forceinline__ T scale_of(int64_t q) {
  return PAPER ? T(1) / T(q) : T(1) / (T(q) * T(q));
}

// The set's size: q, or the live size *q_live clamped to [0, q], 0 when below 2 rows.
__device__ __forceinline__ int64_t set_size(int64_t q, const int64_t* q_live) {
  if (q_live == nullptr) return q;
  const int64_t v = min(max(*q_live, int64_t(0)), q);
  return v >= 2 ? v : 0;
}

template <typename T, bool PAPER>
__global__ void __launch_bounds__(ROWS_THREADS) d2sm_rows_kernel(
    const T* __restrict__ sp, int64_t sp_stride, const T* __restrict__ st, int64_t st_stride,
    const double* __restrict__ dots_p, const double* __restrict__ dots_t, int64_t q_buf,
    const int64_t* __restrict__ q_live, double eps,
    double* __restrict__ inv_p, double* __restrict__ inv_t, double* __restrict__ c_out, double* __restrict__ row_loss) {
  using BlockReduce = cub::BlockReduce<double, ROWS_THREADS>;
  __shared__ typename BlockReduce::TempStorage storage;
  const int64_t i = blockIdx.x;
  const int64_t q = set_size(q_buf, q_live);
  if (i >= q) {  // a row outside the set (the whole block returns)
    if (threadIdx.x == 0) {
      row_loss[i] = 0.0;
      c_out[i] = 0.0;
      inv_p[i] = 1.0;
      inv_t[i] = 1.0;
    }
    return;
  }
  const T* p = sp + i * sp_stride;
  const T* t = st + i * st_stride;
  double rp = (double(q) + dots_p[i]) * 0.5, rt = (double(q) + dots_t[i]) * 0.5;  // normalizers in float64
  if (PAPER) {
    rp -= (double(p[i]) + 1.0) * 0.5;
    rt -= (double(t[i]) + 1.0) * 0.5;
  }
  const double ip = 1.0 / rp, it = 1.0 / rt;
  double loss = 0.0, c = 0.0;
  for (int64_t j = threadIdx.x; j < q; j += ROWS_THREADS) {
    if (PAPER && j == i) continue;
    T P, term, a;
    entry<T, PAPER>((p[j] + T(1)) * T(0.5), (t[j] + T(1)) * T(0.5), ip, it, eps, P, term, a);
    loss += static_cast<double>(term);
    c += static_cast<double>(a * P);
  }
  const double loss_sum = BlockReduce(storage).Sum(loss);
  __syncthreads();  // storage is reused
  const double c_sum = BlockReduce(storage).Sum(c);
  if (threadIdx.x == 0) {
    const double scale = PAPER ? 1.0 / double(q) : 1.0 / (double(q) * double(q));
    row_loss[i] = loss_sum * scale;
    c_out[i] = c_sum * scale;
    inv_p[i] = ip;
    inv_t[i] = it;
  }
}

template <typename T, bool PAPER>
__global__ void __launch_bounds__(GRAD_THREADS) d2sm_grad_kernel(
    const T* __restrict__ sp, int64_t sp_stride, const T* __restrict__ st, int64_t st_stride,
    const double* __restrict__ inv_p, const double* __restrict__ inv_t, const double* __restrict__ c,
    const int64_t* __restrict__ rows, int64_t N, int64_t q, const int64_t* __restrict__ q_live, double eps,
    T* __restrict__ out) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * GRAD_THREADS + threadIdx.x;
  if (j >= q) return;
  const int64_t qs = set_size(q, q_live);  // q: the row stride of out; qs: the set
  const T scale = scale_of<T, PAPER>(qs > 0 ? qs : 1);
  for (int64_t n = blockIdx.y; n < N; n += gridDim.y) {
    const int64_t b = rows[n];
    if (b < 0 || b >= qs || j >= qs) {
      out[n * q + j] = T(0);
      continue;
    }
    const T kp = (sp[b * sp_stride + j] + T(1)) * T(0.5);
    const T kt = (st[b * st_stride + j] + T(1)) * T(0.5);
    const double ipb = inv_p[b], ipj = inv_p[j];
    T P, term, a1, a2;
    entry<T, PAPER>(kp, kt, ipb, inv_t[b], eps, P, term, a1);  // row b: P_bj, Q_bj
    entry<T, PAPER>(kp, kt, ipj, inv_t[j], eps, P, term, a2);  // row j: P_jb, Q_jb
    // a - c in float64: c_i is a row constant, and a rounding of it would shift a whole row of W
    const double w = ((double(scale * a1) - c[b]) * ipb + (double(scale * a2) - c[j]) * ipj) * 0.5;
    out[n * q + j] = (PAPER && j == b) ? T(0) : static_cast<T>(w);
  }
}

template <typename T>
__global__ void __launch_bounds__(LOSS_THREADS) d2sm_loss_kernel(const double* __restrict__ row_loss, int64_t q,
                                                                 T* __restrict__ loss) {
  using BlockReduce = cub::BlockReduce<double, LOSS_THREADS>;
  __shared__ typename BlockReduce::TempStorage storage;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < q; i += LOSS_THREADS) s += row_loss[i];
  const double total = BlockReduce(storage).Sum(s);
  if (threadIdx.x == 0) *loss = static_cast<T>(total);
}

template <typename T, bool PAPER>
D2smStatus launch(const D2smParams& p, cudaStream_t stream) {
  if (p.q > INT_MAX) return make_status(cudaErrorInvalidValue, "d2sm_forward_cuda: q must be below 2^31");
  const double eps = p.eps;
  d2sm_rows_kernel<T, PAPER><<<static_cast<unsigned>(p.q), ROWS_THREADS, 0, stream>>>(
      static_cast<const T*>(p.sp_ptr), p.sp_stride, static_cast<const T*>(p.st_ptr), p.st_stride,
      p.dots_p_ptr, p.dots_t_ptr, p.q, p.q_live_ptr, eps, p.inv_p_ptr, p.inv_t_ptr, p.c_ptr, p.row_loss_ptr);
  FASTLOSS_CUDA_RETURN_IF_ERROR(cudaGetLastError(), "d2sm rows kernel launch");
  if (p.N > 0) {
    const dim3 grid(static_cast<unsigned>((p.q + GRAD_THREADS - 1) / GRAD_THREADS),
                    static_cast<unsigned>(std::min(p.N, MAX_GRID_Y)));
    d2sm_grad_kernel<T, PAPER><<<grid, GRAD_THREADS, 0, stream>>>(
        static_cast<const T*>(p.sp_ptr), p.sp_stride, static_cast<const T*>(p.st_ptr), p.st_stride,
        p.inv_p_ptr, p.inv_t_ptr, p.c_ptr, p.rows_ptr, p.N, p.q, p.q_live_ptr, eps,
        static_cast<T*>(p.grad_rows_ptr));
    FASTLOSS_CUDA_RETURN_IF_ERROR(cudaGetLastError(), "d2sm grad kernel launch");
  }
  d2sm_loss_kernel<T><<<1, LOSS_THREADS, 0, stream>>>(p.row_loss_ptr, p.q, static_cast<T*>(p.loss_ptr));
  FASTLOSS_CUDA_RETURN_IF_ERROR(cudaGetLastError(), "d2sm loss kernel launch");
  return {};
}

template <typename T>
D2smStatus launch_mode(const D2smParams& p, cudaStream_t stream) {
  return p.paper ? launch<T, true>(p, stream) : launch<T, false>(p, stream);
}

}  // namespace

D2smStatus d2sm_forward_cuda(const D2smParams& params, CUstream_st* stream) {
  if (params.q < 2) return make_status(cudaErrorInvalidValue, "d2sm_forward_cuda: q must be >= 2");
  if (params.N < 0) return make_status(cudaErrorInvalidValue, "d2sm_forward_cuda: N must be >= 0");
  DeviceScope device(params.device);
  FASTLOSS_CUDA_RETURN_IF_ERROR(device.error(), "cudaSetDevice");
  switch (params.dtype) {
    case D2smDtype::kFloat32: return launch_mode<float>(params, stream);
    case D2smDtype::kFloat64: return launch_mode<double>(params, stream);
  }
  return make_status(cudaErrorInvalidValue, "d2sm_forward_cuda: unknown dtype");
}

}  // namespace fastloss
