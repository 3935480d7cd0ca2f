// PyTorch binding of the D2SM CUDA launcher (d2sm_launch.h), part of fastloss._C_cuda.
//
// Argument checks and output allocation only; the kernels are in d2sm_kernels.cu. No c10/cuda or
// ATen/cuda header is used (so this file also compiles against a CPU-only torch): the CUDA stream
// comes from Python as an int, torch.cuda.current_stream(device).cuda_stream, and must be the
// current stream of the tensors' device. module_binding.cpp calls register_d2sm_cuda.
#include <torch/extension.h>

#include <cstdint>
#include <vector>

#include "cuda/d2sm_launch.h"

#define D2SM_CHECK_CUDA(x, name) TORCH_CHECK((x).is_cuda(), name " must be a CUDA tensor, got device ", (x).device())

namespace fastloss {
namespace {

at::Tensor unit_row_stride(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

// sp, st [q, q] float32 / float64 (one dtype), dots_p, dots_t [q] float64, rows [N] int64 in [0, q),
// q_live: none, or a one-element int64 device tensor, the set's size (see D2smParams).
// Returns
//   loss       0-dim, the D2SM KL (paper mode when `paper`, else pkt)
//   grad_rows  [N, q], dL/dG'_bj + dL/dG'_jb for b = rows[n]
std::vector<at::Tensor> d2sm_forward(const at::Tensor& sp_in, const at::Tensor& st_in, const at::Tensor& dots_p_in,
                                     const at::Tensor& dots_t_in, const at::Tensor& rows_in, bool paper, double eps,
                                     int64_t stream, const c10::optional<at::Tensor>& q_live) {
  D2SM_CHECK_CUDA(sp_in, "d2sm_forward: sp");
  D2SM_CHECK_CUDA(st_in, "d2sm_forward: st");
  D2SM_CHECK_CUDA(dots_p_in, "d2sm_forward: dots_p");
  D2SM_CHECK_CUDA(dots_t_in, "d2sm_forward: dots_t");
  D2SM_CHECK_CUDA(rows_in, "d2sm_forward: rows");
  const auto device = sp_in.device();
  TORCH_CHECK(st_in.device() == device && dots_p_in.device() == device && dots_t_in.device() == device &&
                  rows_in.device() == device,
              "d2sm_forward: sp, st, dots_p, dots_t and rows must be on one device");
  TORCH_CHECK(sp_in.dim() == 2 && sp_in.size(0) == sp_in.size(1), "d2sm_forward: sp must be [q, q], got ",
              sp_in.sizes());
  TORCH_CHECK(st_in.sizes() == sp_in.sizes(), "d2sm_forward: sp and st shapes differ: ", sp_in.sizes(), " vs ",
              st_in.sizes());
  const auto dtype = sp_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "d2sm_forward: sp must be float32 or float64, got ", dtype);
  TORCH_CHECK(st_in.scalar_type() == dtype, "d2sm_forward: sp and st dtypes differ: ", dtype, " vs ",
              st_in.scalar_type());
  TORCH_CHECK(dots_p_in.scalar_type() == at::kDouble && dots_t_in.scalar_type() == at::kDouble,
              "d2sm_forward: dots_p and dots_t must be float64");
  const int64_t q = sp_in.size(0);
  TORCH_CHECK(q >= 2 && q <= INT32_MAX, "d2sm_forward: q must be in [2, 2^31), got ", q);
  TORCH_CHECK(dots_p_in.numel() == q && dots_t_in.numel() == q, "d2sm_forward: dots_p and dots_t must have q=", q,
              " entries");
  TORCH_CHECK(rows_in.scalar_type() == at::kLong && rows_in.dim() == 1, "d2sm_forward: rows must be 1-D int64, got ",
              rows_in.scalar_type(), " of shape ", rows_in.sizes());

  if (q_live.has_value()) {
    D2SM_CHECK_CUDA(*q_live, "d2sm_forward: q_live");
    TORCH_CHECK(q_live->device() == device && q_live->scalar_type() == at::kLong && q_live->numel() == 1,
                "d2sm_forward: q_live must be a one-element int64 tensor on ", device, ", got ",
                q_live->scalar_type(), " of shape ", q_live->sizes(), " on ", q_live->device());
  }
  const at::Tensor sp = unit_row_stride(sp_in), st = unit_row_stride(st_in);
  const at::Tensor dots_p = dots_p_in.contiguous(), dots_t = dots_t_in.contiguous(), rows = rows_in.contiguous();
  const int64_t N = rows.numel();
  const auto opts = sp.options();
  at::Tensor work = at::empty({4, q}, opts.dtype(at::kDouble));  // [4, q] 1/R'_i, 1/R_i, c_i, each row's loss
  at::Tensor loss = at::empty({}, opts);                          // 0-dim
  at::Tensor grad_rows = at::empty({N, q}, opts);                 // [N, q]

  D2smParams params;
  params.sp_ptr = sp.data_ptr();
  params.sp_stride = sp.stride(0);
  params.st_ptr = st.data_ptr();
  params.st_stride = st.stride(0);
  params.dots_p_ptr = dots_p.data_ptr<double>();
  params.dots_t_ptr = dots_t.data_ptr<double>();
  params.rows_ptr = rows.data_ptr<int64_t>();
  params.N = N;
  params.q = q;
  params.q_live_ptr = q_live.has_value() ? q_live->data_ptr<int64_t>() : nullptr;
  params.eps = eps;
  params.paper = paper;
  params.dtype = dtype == at::kDouble ? D2smDtype::kFloat64 : D2smDtype::kFloat32;
  params.inv_p_ptr = work[0].data_ptr<double>();
  params.inv_t_ptr = work[1].data_ptr<double>();
  params.c_ptr = work[2].data_ptr<double>();
  params.row_loss_ptr = work[3].data_ptr<double>();
  params.loss_ptr = loss.data_ptr();
  params.grad_rows_ptr = grad_rows.data_ptr();
  params.device = sp.get_device();
  const D2smStatus status =
      d2sm_forward_cuda(params, reinterpret_cast<CUstream_st*>(static_cast<intptr_t>(stream)));
  TORCH_CHECK(status.ok(), "d2sm_forward (cuda): ", status.where, " failed: ", status.message, " (cudaError ",
              status.code, ")");
  return {loss, grad_rows};
}

}  // namespace

void register_d2sm_cuda(pybind11::module& m) {
  m.def("d2sm_forward", &d2sm_forward, "D2SM fused pass over the similarity matrices on CUDA", pybind11::arg("sp"),
        pybind11::arg("st"), pybind11::arg("dots_p"), pybind11::arg("dots_t"), pybind11::arg("rows"),
        pybind11::arg("paper"), pybind11::arg("eps"), pybind11::arg("stream"), pybind11::arg("q_live") = pybind11::none());
}

}  // namespace fastloss
