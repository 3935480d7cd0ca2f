// The fastloss._C_cuda extension: PyTorch binding of the PDL CUDA launchers (pdl_launch.h).
//
// Argument checks and output allocation only; the kernels are in pdl_kernels.cu. No c10/cuda or
// ATen/cuda header is used (so this file also compiles against a CPU-only torch): the CUDA stream
// comes from Python as an int, torch.cuda.current_stream(device).cuda_stream, and must be the
// current stream of the tensors' device (the workspace is freed to the caching allocator on it).
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "cuda/pdl_launch.h"

#define CHECK_CUDA(x, name) TORCH_CHECK((x).is_cuda(), name " must be a CUDA tensor, got device ", (x).device())
#define CHECK_DIM(x, d, name) TORCH_CHECK((x).dim() == (d), name " must have ", d, " dims, got ", (x).sizes())
#define CHECK_PDL_STATUS(expr, op)                                                                       \
  do {                                                                                                   \
    const ::fastloss::PdlStatus pdl_status_ = (expr);                                                    \
    TORCH_CHECK(pdl_status_.ok(), op " (cuda): ", pdl_status_.where, " failed: ", pdl_status_.message,  \
                " (cudaError ", pdl_status_.code, ")");                                                  \
  } while (0)

namespace fastloss {
namespace {

PdlDtype pdl_dtype(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return PdlDtype::kFloat32;
    case at::kDouble: return PdlDtype::kFloat64;
    case at::kHalf: return PdlDtype::kFloat16;
    case at::kBFloat16: return PdlDtype::kBFloat16;
    default: TORCH_CHECK(false, name, " must be float32, float64, float16 or bfloat16, got ", t);
  }
}

CUstream_st* as_stream(int64_t stream) { return reinterpret_cast<CUstream_st*>(static_cast<intptr_t>(stream)); }

}  // namespace

// pred, target: [B, C, N], any strides, same dtype and device. Returns
//   w      [B, C]    float32 (float64 for float64 input), W = (1/N) sum_i |sort(pred)_i - sort(target)_i|^p
//   perm   [B, C, N] int32, stable argsort of the pred rows
//   perm_t [B, C, N] int32 stable argsort of the target rows when target_grad, else [0, C, N]
//   deriv  [B, C, N] p=1: int8 sign(d);  p=2: 2*d in the dtype of w (d = sorted pred - sorted target)
std::vector<at::Tensor> pdl_forward(const at::Tensor& pred, const at::Tensor& target, int64_t p, bool target_grad,
                                    int64_t stream) {
  CHECK_CUDA(pred, "pdl_forward: pred");
  CHECK_CUDA(target, "pdl_forward: target");
  TORCH_CHECK(pred.device() == target.device(), "pdl_forward: pred and target devices differ: ", pred.device(),
              " vs ", target.device());
  CHECK_DIM(pred, 3, "pdl_forward: pred");
  TORCH_CHECK(pred.sizes() == target.sizes(), "pdl_forward: pred and target shapes differ: ", pred.sizes(), " vs ",
              target.sizes());
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(), "pdl_forward: pred and target dtypes differ: ",
              pred.scalar_type(), " vs ", target.scalar_type());
  TORCH_CHECK(p == 1 || p == 2, "pdl_forward: p must be 1 or 2, got ", p);
  const int64_t B = pred.size(0), C = pred.size(1), N = pred.size(2);
  TORCH_CHECK(N >= 1 && N <= INT32_MAX, "pdl_forward: N (pred.size(2)) must be in [1, 2^31), got ", N);
  const PdlDtype dtype = pdl_dtype(pred.scalar_type(), "pdl_forward: pred");

  const auto acc_type = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto int_opts = pred.options().dtype(at::kInt);
  at::Tensor w = at::empty({B, C}, pred.options().dtype(acc_type));
  at::Tensor perm = at::empty({B, C, N}, int_opts);
  at::Tensor perm_t = at::empty({target_grad ? B : 0, C, N}, int_opts);
  at::Tensor deriv = at::empty({B, C, N}, pred.options().dtype(p == 1 ? at::kChar : acc_type));
  if (B * C == 0) return {w, perm, perm_t, deriv};

  PdlForwardParams params;
  params.pred_ptr = pred.data_ptr();
  params.pred_b_stride = pred.stride(0);
  params.pred_c_stride = pred.stride(1);
  params.pred_n_stride = pred.stride(2);
  params.target_ptr = target.data_ptr();
  params.target_b_stride = target.stride(0);
  params.target_c_stride = target.stride(1);
  params.target_n_stride = target.stride(2);
  params.B = B;
  params.C = C;
  params.N = N;
  params.dtype = dtype;
  params.p = static_cast<int>(p);
  params.w_ptr = w.data_ptr();
  params.perm_ptr = perm.data_ptr<int32_t>();
  params.perm_t_ptr = target_grad ? perm_t.data_ptr<int32_t>() : nullptr;
  params.deriv_ptr = deriv.data_ptr();
  params.device = pred.get_device();

  size_t workspace_bytes = 0;
  CHECK_PDL_STATUS(pdl_forward_workspace_bytes(params, &workspace_bytes), "pdl_forward");
  at::Tensor workspace;  // [workspace_bytes] uint8, segmented-sort scratch (N > PDL_BLOCK_SORT_MAX_N)
  if (workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, pred.options().dtype(at::kByte));
    params.workspace_ptr = workspace.data_ptr();
    params.workspace_bytes = workspace_bytes;
  }
  CHECK_PDL_STATUS(pdl_forward_cuda(params, as_stream(stream)), "pdl_forward");
  return {w, perm, perm_t, deriv};
}

// grad_w [B, C], perm / perm_t / deriv from pdl_forward. Returns
//   grad_pred[r, perm[r,i]] = g[r] * deriv[r,i] / N,  grad_target[r, perm_t[r,i]] = -(same)
// as contiguous [B, C, N] tensors of out_dtype; undefined (None) where that gradient is not needed.
std::vector<at::Tensor> pdl_backward(const at::Tensor& grad_w, const at::Tensor& perm, const at::Tensor& perm_t,
                                     const at::Tensor& deriv, bool need_pred, bool need_target,
                                     at::ScalarType out_dtype, int64_t stream) {
  CHECK_CUDA(grad_w, "pdl_backward: grad_w");
  CHECK_CUDA(perm, "pdl_backward: perm");
  CHECK_CUDA(deriv, "pdl_backward: deriv");
  CHECK_DIM(perm, 3, "pdl_backward: perm");
  TORCH_CHECK(perm.scalar_type() == at::kInt, "pdl_backward: perm must be int32, got ", perm.scalar_type());
  TORCH_CHECK(deriv.sizes() == perm.sizes(), "pdl_backward: deriv and perm shapes differ: ", deriv.sizes(), " vs ",
              perm.sizes());
  TORCH_CHECK(grad_w.device() == perm.device() && deriv.device() == perm.device(),
              "pdl_backward: grad_w, perm and deriv must be on one device, got ", grad_w.device(), ", ",
              perm.device(), ", ", deriv.device());
  const int64_t B = perm.size(0), C = perm.size(1), N = perm.size(2);
  TORCH_CHECK(N >= 1 && N <= INT32_MAX, "pdl_backward: N (perm.size(2)) must be in [1, 2^31), got ", N);
  TORCH_CHECK(grad_w.dim() == 2 && grad_w.size(0) == B && grad_w.size(1) == C, "pdl_backward: grad_w must be [",
              B, ", ", C, "], got ", grad_w.sizes());
  if (need_target) {
    CHECK_CUDA(perm_t, "pdl_backward: perm_t");
    TORCH_CHECK(perm_t.device() == perm.device(), "pdl_backward: perm_t is on ", perm_t.device(), ", perm on ",
                perm.device());
    TORCH_CHECK(perm_t.sizes() == perm.sizes(), "pdl_backward: target permutation was not saved: perm_t is ",
                perm_t.sizes(), ", perm is ", perm.sizes());
    TORCH_CHECK(perm_t.scalar_type() == at::kInt, "pdl_backward: perm_t must be int32, got ", perm_t.scalar_type());
  }
  const PdlDtype pdl_out_dtype = pdl_dtype(out_dtype, "pdl_backward: out_dtype");
  const bool sign_only = deriv.scalar_type() == at::kChar;
  const auto acc_type = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(sign_only || deriv.scalar_type() == acc_type, "pdl_backward: deriv must be int8 or ", acc_type,
              " for out_dtype ", out_dtype, ", got ", deriv.scalar_type());

  auto opts = perm.options().dtype(out_dtype);
  at::Tensor grad_pred = need_pred ? at::empty({B, C, N}, opts) : at::Tensor();      // [B, C, N]
  at::Tensor grad_target = need_target ? at::empty({B, C, N}, opts) : at::Tensor();  // [B, C, N]
  if (B * C == 0 || (!need_pred && !need_target)) return {grad_pred, grad_target};

  const at::Tensor g = grad_w.to(acc_type).contiguous();  // [B, C]
  const at::Tensor perm_c = perm.contiguous();
  const at::Tensor perm_t_c = need_target ? perm_t.contiguous() : at::Tensor();
  const at::Tensor deriv_c = deriv.contiguous();

  PdlBackwardParams params;
  params.grad_w_ptr = g.data_ptr();
  params.perm_ptr = perm_c.data_ptr<int32_t>();
  params.perm_t_ptr = need_target ? perm_t_c.data_ptr<int32_t>() : nullptr;
  params.deriv_ptr = deriv_c.data_ptr();
  params.sign_only = sign_only;
  params.rows = B * C;
  params.N = N;
  params.out_dtype = pdl_out_dtype;
  params.grad_pred_ptr = need_pred ? grad_pred.data_ptr() : nullptr;
  params.grad_target_ptr = need_target ? grad_target.data_ptr() : nullptr;
  params.device = perm.get_device();
  CHECK_PDL_STATUS(pdl_backward_cuda(params, as_stream(stream)), "pdl_backward");
  return {grad_pred, grad_target};
}

void register_pdl_cuda(pybind11::module& m) {
  m.def("pdl_forward", &pdl_forward, "PDL forward on CUDA", pybind11::arg("pred"), pybind11::arg("target"),
        pybind11::arg("p"), pybind11::arg("target_grad"), pybind11::arg("stream"));
  m.def("pdl_backward", &pdl_backward, "PDL permutation-cached backward on CUDA", pybind11::arg("grad_w"),
        pybind11::arg("perm"), pybind11::arg("perm_t"), pybind11::arg("deriv"), pybind11::arg("need_pred"),
        pybind11::arg("need_target"), pybind11::arg("out_dtype"), pybind11::arg("stream"));
  m.attr("pdl_block_sort_max_n") = PDL_BLOCK_SORT_MAX_N;
}

}  // namespace fastloss
