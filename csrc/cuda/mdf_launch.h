// Host-side interface of the MDF CUDA kernels (csrc/cuda/mdf_kernels.cu).
//
// Plain C++ only: no CUDA and no torch headers, so the PyTorch binding (mdf_binding.cpp) compiles
// with the host compiler against a torch build that has no CUDA headers. The stream crosses as a
// CUstream_st*, which is what cudaStream_t is.
#pragma once

#include <cstdint>

struct CUstream_st;  // cudaStream_t == CUstream_st*

namespace fastloss {

enum class MdfDtype : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Elements of one sample that one thread block reduces or writes.
inline constexpr int64_t MDF_CUDA_CHUNK = 4096;
inline constexpr int MDF_CUDA_THREADS = 256;

// One tensor: forward, the features X [2B, C, H, W] (pred = samples [0, B), target = [B, 2B));
// backward, the diffs [B, C, H, W]. Each sample dense; the channel of element i of a sample is
// (i / cdiv) % C (cdiv = H*W for NCHW, 1 for NHWC). Laid out as 8 int64 so that the binding can
// build the table as an int64 tensor [M, 8].
struct MdfTensorDesc {
  const void* x;        // features (forward) or diffs (backward), dtype of MdfParams
  int64_t n;            // C * H * W
  int64_t C;
  int64_t cdiv;
  const void* w;        // [C] per-channel weight, acc dtype (float64 for float64, else float32)
  void* out;            // [B, C, H, W], layout of a sample of x: forward, the diff pred - target
                        // (nullptr: not kept); backward, the gradient of the pred half
  int64_t first_chunk;  // chunks [first_chunk, first_chunk + ceil(n / MDF_CUDA_CHUNK)) are this tensor's
  int64_t unused;
};
static_assert(sizeof(MdfTensorDesc) == 64, "MdfTensorDesc must be 8 int64");

// Descriptors per launch: the table travels by value as a kernel parameter (48 x 64 = 3 KiB, within
// the 4 KiB every CUDA version accepts), so no table is copied to the device before a launch (that
// copy from pageable host memory waits for the host, and cannot be captured in a CUDA graph). More
// tensors than this take several launches.
inline constexpr int MDF_CUDA_MAX_TENSORS = 48;

//   forward:  partial[b, k] = sum over chunk k of sample b of w[c] (X[b] - X[B+b])^2   (acc dtype, [B, K])
//             out[b, i]     = X[b, i] - X[B+b, i]                                     (when out != nullptr)
//   backward: out[b, i]     = grad[b] * 2 w[c] diff[b, i]
struct MdfParams {
  const MdfTensorDesc* desc = nullptr;  // host memory, [M]: copied into the launches' parameters
  int32_t M = 0;
  int64_t K = 0;                        // chunks per sample, all tensors together
  int64_t B = 0;
  MdfDtype dtype = MdfDtype::kFloat32;
  void* partial = nullptr;              // forward output
  const void* grad = nullptr;           // backward input [B], acc dtype
  int device = 0;
};

struct MdfStatus {
  int code = 0;            // cudaError_t
  const char* where = "";
  const char* message = "";
  bool ok() const { return code == 0; }
};

// The fused epilogue of the fast path's convolutions: y = LeakyReLU(y + b[c], slope) in place, on
// a convolution output computed without its bias. y: `numel` elements of `dtype`, dense NCHW or NHWC
// (channel of element i = (i / cdiv) % C); b: [C] of the same dtype.
struct MdfBiasLreluParams {
  void* y = nullptr;
  const void* b = nullptr;
  int64_t numel = 0, C = 0, cdiv = 1;
  double slope = 0.2;
  MdfDtype dtype = MdfDtype::kFloat32;
  int device = 0;
};

MdfStatus mdf_bias_leaky_relu_cuda(const MdfBiasLreluParams& params, CUstream_st* stream);
MdfStatus mdf_sqdiff_forward_cuda(const MdfParams& params, CUstream_st* stream);
MdfStatus mdf_sqdiff_backward_cuda(const MdfParams& params, CUstream_st* stream);

}  // namespace fastloss
