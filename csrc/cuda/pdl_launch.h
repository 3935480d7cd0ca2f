// Host-side interface of the PDL CUDA kernels (csrc/cuda/pdl_kernels.cu).
//
// Plain C++ only: no CUDA and no torch headers, so the PyTorch binding (pdl_binding.cpp) compiles
// with the host compiler against a torch build that has no CUDA headers. Tensors cross this
// boundary as raw pointers + sizes + strides (in elements); the stream as a CUstream_st*, which is
// what cudaStream_t is.
#pragma once

#include <cstddef>
#include <cstdint>

struct CUstream_st;  // cudaStream_t == CUstream_st*

namespace fastloss {

enum class PdlDtype : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Rows of at most this many elements are sorted by one thread block each (cub::BlockRadixSort,
// all of the forward fused into one kernel); longer rows go through
// cub::DeviceSegmentedSort into a workspace, then a fused difference/reduction kernel.
inline constexpr int64_t PDL_BLOCK_SORT_MAX_N = 4096;

// pred / target: [B, C, N] of `dtype`, any strides (elements). Outputs are contiguous:
//   w_ptr       [B, C]    float32 (float64 for float64 input)
//   perm_ptr    [B, C, N] int32, stable argsort of the pred rows
//   perm_t_ptr  [B, C, N] int32, stable argsort of the target rows; nullptr: not needed
//   deriv_ptr   [B, C, N] p=1: int8 sign(d); p=2: 2*d in the dtype of w (d = sorted pred - sorted target)
struct PdlForwardParams {
  const void* pred_ptr = nullptr;
  int64_t pred_b_stride = 0, pred_c_stride = 0, pred_n_stride = 0;
  const void* target_ptr = nullptr;
  int64_t target_b_stride = 0, target_c_stride = 0, target_n_stride = 0;
  int64_t B = 0, C = 0, N = 0;
  PdlDtype dtype = PdlDtype::kFloat32;
  int p = 1;
  void* w_ptr = nullptr;
  int32_t* perm_ptr = nullptr;
  int32_t* perm_t_ptr = nullptr;
  void* deriv_ptr = nullptr;
  void* workspace_ptr = nullptr;  // pdl_forward_workspace_bytes() bytes, 256-byte aligned
  size_t workspace_bytes = 0;
  int device = 0;                 // CUDA device the tensors live on
};

// grad_w_ptr [rows] in the dtype of w for out_dtype (float64 if out_dtype is float64, else float32);
// perm / perm_t / deriv as written by pdl_forward_cuda. Writes, as contiguous [rows, N] of out_dtype,
//   grad_pred[r, perm[r,i]] = g[r] * deriv[r,i] / N,   grad_target[r, perm_t[r,i]] = -(same)
// A nullptr output is skipped (and its permutation is not read).
struct PdlBackwardParams {
  const void* grad_w_ptr = nullptr;
  const int32_t* perm_ptr = nullptr;
  const int32_t* perm_t_ptr = nullptr;
  const void* deriv_ptr = nullptr;
  bool sign_only = true;  // deriv is int8 (p=1), else the dtype of grad_w (p=2)
  int64_t rows = 0, N = 0;
  PdlDtype out_dtype = PdlDtype::kFloat32;
  void* grad_pred_ptr = nullptr;
  void* grad_target_ptr = nullptr;
  int device = 0;
};

// What a launcher reports. code is a cudaError_t (0: success); where names the step that failed;
// message is cudaGetErrorString(code). Both strings are static.
struct PdlStatus {
  int code = 0;
  const char* where = "";
  const char* message = "";
  bool ok() const { return code == 0; }
};

// Device scratch pdl_forward_cuda needs (0 when N <= PDL_BLOCK_SORT_MAX_N). Launches nothing.
PdlStatus pdl_forward_workspace_bytes(const PdlForwardParams& params, size_t* bytes);
PdlStatus pdl_forward_cuda(const PdlForwardParams& params, CUstream_st* stream);
PdlStatus pdl_backward_cuda(const PdlBackwardParams& params, CUstream_st* stream);

}  // namespace fastloss
