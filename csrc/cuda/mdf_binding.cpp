// PyTorch binding of the MDF CUDA launchers (mdf_launch.h): argument checks, the descriptor table
// and output allocation. No c10/cuda or ATen/cuda header (so this file also compiles against a
// CPU-only torch): the stream arrives from Python as an int, torch.cuda.current_stream(device).cuda_stream,
// and must be the current stream of the tensors' device. The descriptor table stays on the host: the
// launcher passes it to the kernels by value (no host-to-device copy, nothing to wait for).
#include <torch/extension.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "cuda/mdf_launch.h"

#define CHECK_MDF_STATUS(expr, op)                                                                      \
  do {                                                                                                  \
    const ::fastloss::MdfStatus mdf_status_ = (expr);                                                   \
    TORCH_CHECK(mdf_status_.ok(), op " (cuda): ", mdf_status_.where, " failed: ", mdf_status_.message, \
                " (cudaError ", mdf_status_.code, ")");                                                 \
  } while (0)

namespace fastloss {
namespace {

MdfDtype mdf_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return MdfDtype::kFloat32;
    case at::kDouble: return MdfDtype::kFloat64;
    case at::kHalf: return MdfDtype::kFloat16;
    case at::kBFloat16: return MdfDtype::kBFloat16;
    default: TORCH_CHECK(false, op, ": features must be float32, float64, float16 or bfloat16, got ", t);
  }
}

CUstream_st* as_stream(int64_t stream) { return reinterpret_cast<CUstream_st*>(static_cast<intptr_t>(stream)); }

struct Prepared {
  std::vector<at::Tensor> x, w;  // the features (dense per sample) and weights (acc dtype), kept alive
  std::vector<bool> nhwc;
  at::Tensor table;              // [M, 8] int64 on the host, MdfTensorDesc rows
  int64_t K = 0;
};

// samples: 2 * batch for the stacked features of the forward, batch for the diffs of the backward.
Prepared prepare(const std::vector<at::Tensor>& feats, const std::vector<at::Tensor>& chan_w, int64_t batch,
                 int64_t samples, const char* op) {
  TORCH_CHECK(!feats.empty() && feats.size() == chan_w.size(), op, ": ", feats.size(), " feature tensors and ",
              chan_w.size(), " channel-weight vectors");
  TORCH_CHECK(batch >= 1, op, ": batch must be >= 1, got ", batch);
  const auto dtype = feats[0].scalar_type();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  Prepared p;
  p.table = at::zeros({static_cast<int64_t>(feats.size()), 8}, at::TensorOptions().dtype(at::kLong));
  int64_t* rows = p.table.data_ptr<int64_t>();
  for (size_t m = 0; m < feats.size(); ++m) {
    at::Tensor x = feats[m];
    TORCH_CHECK(x.is_cuda(), op, ": feats[", m, "] must be a CUDA tensor, got ", x.device());
    TORCH_CHECK(x.device() == feats[0].device(), op, ": feats[", m, "] is on ", x.device(), ", feats[0] on ",
                feats[0].device());
    TORCH_CHECK(x.dim() == 4 && x.size(0) == samples, op, ": tensor ", m, " must be [", samples,
                ", C, H, W], got ", x.sizes());
    TORCH_CHECK(x.scalar_type() == dtype, op, ": feats[", m, "] is ", x.scalar_type(), ", feats[0] is ", dtype);
    const int64_t C = x.size(1), hw = x.size(2) * x.size(3);
    TORCH_CHECK(chan_w[m].numel() == C, op, ": chan_w[", m, "] has ", chan_w[m].numel(), " entries for ", C,
                " channels");
    bool nhwc = false;
    if (!x.is_contiguous()) {
      if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
        nhwc = C > 1;
      } else {
        x = x.contiguous();
      }
    }
    at::Tensor w = chan_w[m].to(x.device(), acc).contiguous();
    rows[m * 8 + 0] = reinterpret_cast<int64_t>(x.data_ptr());
    rows[m * 8 + 1] = C * hw;
    rows[m * 8 + 2] = C;
    rows[m * 8 + 3] = nhwc ? 1 : hw;
    rows[m * 8 + 4] = reinterpret_cast<int64_t>(w.data_ptr());
    rows[m * 8 + 6] = p.K;
    p.K += (C * hw + MDF_CUDA_CHUNK - 1) / MDF_CUDA_CHUNK;
    p.x.push_back(x);
    p.w.push_back(w);
    p.nhwc.push_back(nhwc);
  }
  return p;
}

MdfParams make_params(const Prepared& p, int64_t batch, at::ScalarType dtype, const char* op) {
  MdfParams params;
  params.desc = reinterpret_cast<const MdfTensorDesc*>(p.table.data_ptr<int64_t>());
  params.M = static_cast<int32_t>(p.x.size());
  params.K = p.K;
  params.B = batch;
  params.dtype = mdf_dtype(dtype, op);
  params.device = p.x[0].get_device();
  return params;
}

std::vector<at::Tensor> empty_like_samples(Prepared& p, int64_t batch) {
  std::vector<at::Tensor> out;
  int64_t* rows = p.table.data_ptr<int64_t>();
  for (size_t m = 0; m < p.x.size(); ++m) {
    const at::Tensor& x = p.x[m];
    out.push_back(at::empty({batch, x.size(1), x.size(2), x.size(3)}, x.options(),
                            p.nhwc[m] ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
    rows[m * 8 + 5] = reinterpret_cast<int64_t>(out.back().data_ptr());
  }
  return out;
}

}  // namespace

// feats: [2B, C_m, H_m, W_m] (pred then target on the batch axis), chan_w: [C_m]. Returns loss [B]
// (float64 for float64 features, else float32) = sum_m sum_c w_m[c] sum_hw (X_m[b] - X_m[B+b])^2 and,
// when save_diff, the diffs X_m[:B] - X_m[B:] ([B, C_m, H_m, W_m], features' dtype and layout).
std::tuple<at::Tensor, std::vector<at::Tensor>> mdf_sqdiff_forward(const std::vector<at::Tensor>& feats,
                                                                   const std::vector<at::Tensor>& chan_w,
                                                                   int64_t batch, bool save_diff, int64_t stream) {
  Prepared p = prepare(feats, chan_w, batch, 2 * batch, "mdf_sqdiff_forward");
  const auto acc = feats[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> diffs = save_diff ? empty_like_samples(p, batch) : std::vector<at::Tensor>{};
  at::Tensor partial = at::empty({batch, p.K}, p.x[0].options().dtype(acc));  // [B, K]
  MdfParams params = make_params(p, batch, feats[0].scalar_type(), "mdf_sqdiff_forward");
  params.partial = partial.data_ptr();
  CHECK_MDF_STATUS(mdf_sqdiff_forward_cuda(params, as_stream(stream)), "mdf_sqdiff_forward");
  return {partial.sum(1), diffs};
}

// grad [B], diffs [B, C_m, H_m, W_m] from the forward. Returns per tensor grad[b] * 2 w_m[c] diff_m[b]
// in the diffs' dtype and memory format (the gradient of the pred half).
std::vector<at::Tensor> mdf_sqdiff_backward(const at::Tensor& grad, const std::vector<at::Tensor>& diffs,
                                            const std::vector<at::Tensor>& chan_w, int64_t stream) {
  TORCH_CHECK(!diffs.empty(), "mdf_sqdiff_backward: no diff tensors");
  const int64_t batch = diffs[0].size(0);
  Prepared p = prepare(diffs, chan_w, batch, batch, "mdf_sqdiff_backward");
  TORCH_CHECK(grad.numel() == batch, "mdf_sqdiff_backward: grad must have ", batch, " entries, got ", grad.sizes());
  const auto acc = diffs[0].scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> out = empty_like_samples(p, batch);
  const at::Tensor g = grad.reshape({batch}).to(p.x[0].device(), acc).contiguous();  // [B]
  MdfParams params = make_params(p, batch, diffs[0].scalar_type(), "mdf_sqdiff_backward");
  params.grad = g.data_ptr();
  CHECK_MDF_STATUS(mdf_sqdiff_backward_cuda(params, as_stream(stream)), "mdf_sqdiff_backward");
  return out;
}

// y [N, C, H, W] (a convolution output without its bias, dense NCHW or NHWC), b [C]:
// y = LeakyReLU(y + b[c], slope) in place.
void mdf_bias_leaky_relu_(at::Tensor& y, const at::Tensor& b, double slope, int64_t stream) {
  TORCH_CHECK(y.is_cuda() && b.is_cuda() && y.device() == b.device(), "mdf_bias_leaky_relu_: y and b must be on one "
              "CUDA device, got ", y.device(), " and ", b.device());
  TORCH_CHECK(y.dim() == 4 && b.numel() == y.size(1), "mdf_bias_leaky_relu_: y must be [N, C, H, W] and b [C], got ",
              y.sizes(), " and ", b.sizes());
  TORCH_CHECK(y.scalar_type() == b.scalar_type(), "mdf_bias_leaky_relu_: y is ", y.scalar_type(), ", b is ",
              b.scalar_type());
  const bool nchw = y.is_contiguous();
  TORCH_CHECK(nchw || y.is_contiguous(at::MemoryFormat::ChannelsLast),
              "mdf_bias_leaky_relu_: y must be dense in NCHW or NHWC, got strides ", y.strides());
  const at::Tensor bc = b.contiguous();
  MdfBiasLreluParams params;
  params.y = y.data_ptr();
  params.b = bc.data_ptr();
  params.numel = y.numel();
  params.C = y.size(1);
  params.cdiv = nchw ? y.size(2) * y.size(3) : 1;
  params.slope = slope;
  params.dtype = mdf_dtype(y.scalar_type(), "mdf_bias_leaky_relu_");
  params.device = y.get_device();
  CHECK_MDF_STATUS(mdf_bias_leaky_relu_cuda(params, as_stream(stream)), "mdf_bias_leaky_relu_");
}

void register_mdf_cuda(pybind11::module& m) {
  m.def("mdf_bias_leaky_relu_", &mdf_bias_leaky_relu_, "MDF: y = LeakyReLU(y + b[c]) in place, on CUDA",
        pybind11::arg("y"), pybind11::arg("b"), pybind11::arg("slope"), pybind11::arg("stream"));
  m.def("mdf_sqdiff_forward", &mdf_sqdiff_forward, "MDF fused squared-difference reductions on CUDA",
        pybind11::arg("feats"), pybind11::arg("chan_w"), pybind11::arg("batch"), pybind11::arg("save_diff"),
        pybind11::arg("stream"));
  m.def("mdf_sqdiff_backward", &mdf_sqdiff_backward, "MDF per-feature gradients on CUDA", pybind11::arg("grad"),
        pybind11::arg("diffs"), pybind11::arg("chan_w"), pybind11::arg("stream"));
}

}  // namespace fastloss
