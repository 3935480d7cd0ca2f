// Host-side interface of the D2SM CUDA kernels (csrc/cuda/d2sm_kernels.cu).
//
// Plain C++ only: no CUDA and no torch headers, so the PyTorch binding (d2sm_binding.cpp)
// compiles with the host compiler against a torch build that has no CUDA headers. Tensors cross
// this boundary as raw pointers + sizes + row strides (in elements); the stream as a
// CUstream_st*, which is what cudaStream_t is.
#pragma once

#include <cstddef>
#include <cstdint>

struct CUstream_st;  // cudaStream_t == CUstream_st*

namespace fastloss {

enum class D2smDtype : int32_t { kFloat32 = 0, kFloat64 = 1 };

// The fused pass of csrc/cpu/d2sm.cpp. sp / st: [q, q] similarities G' and G (symmetric, unit
// stride along a row), dots_p / dots_t: [q] float64, their row sums, rows: [N] int64 in [0, q)
// (a row outside it gets a zero gradient row). All of `dtype` except rows and the float64 ones.
// Writes
//   inv_p, inv_t, c  [q]    float64 workspace: 1/R'_i, 1/R_i, c_i
//   row_loss         [q]    float64 workspace: each row's share of the loss
//   loss             [1]    dtype: the D2SM KL (pkt, or paper when `paper`)
//   grad_rows        [N, q] dtype, contiguous: dL/dG'_bj + dL/dG'_jb for b = rows[n]
// q_live_ptr: null (the set is all q rows), or a device int64, the set's size (a queue's fill
// level), read by the kernels so that the host never waits for it: the set is then the leading
// q_live x q_live block, rows and entries outside it get zeros, and a set of fewer than 2 rows a
// zero loss.
struct D2smParams {
  const void* sp_ptr = nullptr;
  int64_t sp_stride = 0;
  const void* st_ptr = nullptr;
  int64_t st_stride = 0;
  const double* dots_p_ptr = nullptr;
  const double* dots_t_ptr = nullptr;
  const int64_t* rows_ptr = nullptr;
  int64_t N = 0;
  int64_t q = 0;
  const int64_t* q_live_ptr = nullptr;
  double eps = 1e-6;
  bool paper = true;
  D2smDtype dtype = D2smDtype::kFloat32;
  double* inv_p_ptr = nullptr;
  double* inv_t_ptr = nullptr;
  double* c_ptr = nullptr;
  double* row_loss_ptr = nullptr;
  void* loss_ptr = nullptr;
  void* grad_rows_ptr = nullptr;
  int device = 0;  // CUDA device the tensors live on
};

// What the launcher reports. code is a cudaError_t (0: success); where names the step that
// failed; message is cudaGetErrorString(code). Both strings are static.
struct D2smStatus {
  int code = 0;
  const char* where = "";
  const char* message = "";
  bool ok() const { return code == 0; }
};

D2smStatus d2sm_forward_cuda(const D2smParams& params, CUstream_st* stream);

}  // namespace fastloss
