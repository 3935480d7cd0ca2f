// What every CUDA launcher (pdl_kernels.cu, d2sm_kernels.cu, mdf_kernels.cu) needs to report a
// failed CUDA call and to run on the tensors' device.
//
// CUDA toolkit headers only: no torch, no c10 (the .cu files compile with nvcc alone). The launch
// headers (*_launch.h) must stay free of CUDA headers, so each keeps its own status struct
// (PdlStatus, D2smStatus, MdfStatus, all {int code; const char* where; const char* message});
// make_status() answers a CudaFailure that converts to whichever of them the launcher returns.
#pragma once

#include <cuda_runtime.h>

namespace fastloss {

// A failed CUDA call and the step it failed in (a static string). Converts to a launcher's status
// struct: code = the cudaError_t, where, message = cudaGetErrorString(code).
struct CudaFailure {
  cudaError_t code;
  const char* where;

  template <typename Status>
    requires requires(Status s) {
      s.code = 0;
      s.where = "";
      s.message = "";
    }
  operator Status() const {
    Status s;
    s.code = static_cast<int>(code);
    s.where = where;
    s.message = cudaGetErrorString(code);
    return s;
  }
};

inline CudaFailure make_status(cudaError_t code, const char* where) { return {code, where}; }

// Makes `device` current for the launcher's scope (the bindings have no c10::cuda device guard).
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    error_ = cudaGetDevice(&previous_);
    if (error_ == cudaSuccess && previous_ != device) {
      error_ = cudaSetDevice(device);
      restore_ = error_ == cudaSuccess;
    }
  }
  ~DeviceScope() {
    if (restore_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  cudaError_t error() const { return error_; }

 private:
  int previous_ = 0;
  bool restore_ = false;
  cudaError_t error_ = cudaSuccess;
};

}  // namespace fastloss

// In a launcher: return the failure (as the launcher's status struct) if `expr`, a cudaError_t, is
// not cudaSuccess; `where` names the step.
#define FASTLOSS_CUDA_RETURN_IF_ERROR(expr, where)                                                \
  do {                                                                                            \
    const cudaError_t fastloss_cuda_err_ = (expr);                                                \
    if (fastloss_cuda_err_ != cudaSuccess) return ::fastloss::make_status(fastloss_cuda_err_, where); \
  } while (0)
