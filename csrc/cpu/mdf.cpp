// MDF on the CPU: the squared-difference reductions of all feature pairs, fused into one op.
//
// Every feature tensor holds pred and target stacked on the batch axis (pred = samples [0, B),
// target = [B, 2B)), as the fused feature extraction produces them. With a weight per channel,
// w[c] = 1 / (C_f H W) for the feature f that owns channel c (merged discriminators share a tensor):
//
//   loss[b]         = sum_m sum_c w_m[c] sum_{h,w} (X_m[b,c,h,w] - X_m[B+b,c,h,w])^2
//   diff_m[b,c,h,w] = X_m[b,c,h,w] - X_m[B+b,c,h,w]            (kept for the backward when asked)
//   grad_m[b,c,h,w] = g[b] * 2 w_m[c] * diff_m[b,c,h,w]         (the backward: each feature's gradient)
//
// Work items are (sample, chunk of one tensor's per-sample elements), in parallel; each writes a
// double partial sum, and loss[b] adds its partials in a fixed order, so the result does not
// depend on the thread count. A tensor is read in place when each sample is dense in NCHW or in
// NHWC (channels_last); anything else is copied first. Diffs and gradients keep that layout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace fastloss {
namespace {

constexpr int64_t MDF_CHUNK = 1 << 15;  // elements per work item (~128 KiB of float32 per side)

struct MdfFeature {
  at::Tensor x;       // [2B, C, H, W], NCHW- or NHWC-dense
  at::Tensor w;       // [C] acc dtype, contiguous
  int64_t C = 0, hw = 0, n = 0;  // channels, H*W, C*H*W
  bool nhwc = false;
  int64_t chunk = 0;  // elements per item (a multiple of C for NHWC)
  int64_t items = 0;
};

struct MdfItem {
  int32_t m;
  int64_t begin, end;  // element range within one sample
};

// samples: 2 * batch for the stacked features of the forward, batch for the diffs of the backward.
std::vector<MdfFeature> prepare(const std::vector<at::Tensor>& feats, const std::vector<at::Tensor>& chan_w,
                                int64_t batch, int64_t samples, const char* op, std::vector<MdfItem>* items) {
  TORCH_CHECK(!feats.empty(), op, ": no feature tensors");
  TORCH_CHECK(feats.size() == chan_w.size(), op, ": ", feats.size(), " feature tensors but ", chan_w.size(),
              " channel-weight vectors");
  TORCH_CHECK(batch >= 1, op, ": batch must be >= 1, got ", batch);
  const auto dtype = feats[0].scalar_type();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<MdfFeature> out;
  for (size_t m = 0; m < feats.size(); ++m) {
    const at::Tensor& x = feats[m];
    TORCH_CHECK(x.device().is_cpu(), op, ": tensor ", m, " must be a CPU tensor, got ", x.device());
    TORCH_CHECK(x.dim() == 4, op, ": tensor ", m, " must be [N, C, H, W], got ", x.sizes());
    TORCH_CHECK(x.size(0) == samples, op, ": tensor ", m, " has ", x.size(0), " samples, expected ", samples);
    TORCH_CHECK(x.scalar_type() == dtype, op, ": tensor ", m, " is ", x.scalar_type(), ", tensor 0 is ", dtype);
    MdfFeature f;
    f.C = x.size(1);
    f.hw = x.size(2) * x.size(3);
    f.n = f.C * f.hw;
    TORCH_CHECK(chan_w[m].numel() == f.C, op, ": chan_w[", m, "] has ", chan_w[m].numel(), " entries for ", f.C,
                " channels");
    if (x.is_contiguous()) {
      f.x = x;
    } else if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      f.x = x;
      f.nhwc = f.C > 1;
    } else {
      f.x = x.contiguous();
    }
    f.w = chan_w[m].to(acc).contiguous();
    f.chunk = f.nhwc ? std::max<int64_t>(1, MDF_CHUNK / f.C) * f.C : MDF_CHUNK;
    f.items = f.n == 0 ? 0 : (f.n + f.chunk - 1) / f.chunk;
    for (int64_t i = 0; i < f.items; ++i) {
      items->push_back({static_cast<int32_t>(m), i * f.chunk, std::min(f.n, (i + 1) * f.chunk)});
    }
    out.push_back(std::move(f));
  }
  return out;
}

// sum over [begin, end) of one sample of w[c] (p - t)^2, in double; d[i] = p[i] - t[i] when d != nullptr.
template <typename scalar_t, typename acc_t>
double partial(const MdfFeature& f, const scalar_t* p, const scalar_t* t, const acc_t* w, int64_t begin, int64_t end,
               scalar_t* d, std::vector<double>& acc) {
  if (f.nhwc) {  // whole pixels; channel = i % C
    acc.assign(f.C, 0.0);
    for (int64_t i = begin; i < end; i += f.C) {
      for (int64_t c = 0; c < f.C; ++c) {
        const double e = static_cast<double>(p[i + c]) - static_cast<double>(t[i + c]);
        acc[c] += e * e;
      }
      if (d != nullptr) {
        for (int64_t c = 0; c < f.C; ++c)
          d[i + c] = static_cast<scalar_t>(static_cast<acc_t>(p[i + c]) - static_cast<acc_t>(t[i + c]));
      }
    }
    double s = 0.0;
    for (int64_t c = 0; c < f.C; ++c) s += static_cast<double>(w[c]) * acc[c];
    return s;
  }
  double s = 0.0;  // channel planes; channel = i / HW
  for (int64_t i = begin; i < end;) {
    const int64_t c = i / f.hw;
    const int64_t stop = std::min(end, (c + 1) * f.hw);
    double seg = 0.0;
    for (int64_t j = i; j < stop; ++j) {
      const double e = static_cast<double>(p[j]) - static_cast<double>(t[j]);
      seg += e * e;
    }
    if (d != nullptr) {
      for (int64_t j = i; j < stop; ++j) d[j] = static_cast<scalar_t>(static_cast<acc_t>(p[j]) - static_cast<acc_t>(t[j]));
    }
    s += static_cast<double>(w[c]) * seg;
    i = stop;
  }
  return s;
}

std::vector<at::Tensor> empty_like_samples(const std::vector<MdfFeature>& f, int64_t batch) {
  std::vector<at::Tensor> out;
  for (const auto& ft : f) {
    out.push_back(at::empty({batch, ft.x.size(1), ft.x.size(2), ft.x.size(3)}, ft.x.options(),
                            ft.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  }
  return out;
}

}  // namespace

// feats: [2B, C_m, H_m, W_m] (pred then target on the batch axis), one dtype; chan_w: [C_m] per tensor.
// Returns loss [B] (float64 for float64 features, else float32) and, when save_diff, the diffs
// pred - target per tensor ([B, C_m, H_m, W_m], features' dtype and layout), else an empty list.
std::tuple<at::Tensor, std::vector<at::Tensor>> mdf_sqdiff_forward(const std::vector<at::Tensor>& feats,
                                                                   const std::vector<at::Tensor>& chan_w,
                                                                   int64_t batch, bool save_diff) {
  std::vector<MdfItem> items;
  const auto f = prepare(feats, chan_w, batch, 2 * batch, "mdf_sqdiff_forward (cpu)", &items);
  const auto dtype = feats[0].scalar_type();
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> diffs = save_diff ? empty_like_samples(f, batch) : std::vector<at::Tensor>{};
  const int64_t K = static_cast<int64_t>(items.size());
  std::vector<double> partials(static_cast<size_t>(batch * K), 0.0);  // [B, K]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mdf_sqdiff_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    at::parallel_for(0, batch * K, 1, [&](int64_t lo, int64_t hi) {
      std::vector<double> acc;
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t b = r / K;
        const MdfItem& it = items[r % K];
        const MdfFeature& ft = f[it.m];
        const scalar_t* base = ft.x.data_ptr<scalar_t>();
        scalar_t* d = save_diff ? diffs[it.m].data_ptr<scalar_t>() + b * ft.n : nullptr;
        partials[r] = partial<scalar_t, acc_t>(ft, base + b * ft.n, base + (batch + b) * ft.n,
                                               ft.w.data_ptr<acc_t>(), it.begin, it.end, d, acc);
      }
    });
  });
  at::Tensor loss = at::empty({batch}, feats[0].options().dtype(at::kDouble));
  double* lp = loss.data_ptr<double>();
  for (int64_t b = 0; b < batch; ++b) {
    double s = 0.0;
    for (int64_t k = 0; k < K; ++k) s += partials[b * K + k];
    lp[b] = s;
  }
  return {loss.to(acc_type), diffs};
}

// grad [B]; diffs [B, C_m, H_m, W_m] from the forward; chan_w as in the forward. Returns, per tensor,
// the gradient of sum_b grad[b] loss[b] with respect to its pred half, in the diffs' dtype and layout:
//   grad_m[b,c,h,w] = grad[b] * 2 w_m[c] * diff_m[b,c,h,w]
// (the target half's gradient is its negation).
std::vector<at::Tensor> mdf_sqdiff_backward(const at::Tensor& grad, const std::vector<at::Tensor>& diffs,
                                            const std::vector<at::Tensor>& chan_w) {
  TORCH_CHECK(!diffs.empty(), "mdf_sqdiff_backward (cpu): no diff tensors");
  const int64_t batch = diffs[0].size(0);
  std::vector<MdfItem> items;
  const auto f = prepare(diffs, chan_w, batch, batch, "mdf_sqdiff_backward (cpu)", &items);
  TORCH_CHECK(grad.numel() == batch, "mdf_sqdiff_backward (cpu): grad must have ", batch, " entries, got ",
              grad.sizes());
  const auto dtype = diffs[0].scalar_type();
  const auto acc_type = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad.reshape({batch}).to(acc_type).contiguous();
  std::vector<at::Tensor> out = empty_like_samples(f, batch);
  const int64_t K = static_cast<int64_t>(items.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "mdf_sqdiff_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const acc_t* gp = g.data_ptr<acc_t>();
    at::parallel_for(0, batch * K, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t b = r / K;
        const MdfItem& it = items[r % K];
        const MdfFeature& ft = f[it.m];
        const scalar_t* d = ft.x.data_ptr<scalar_t>() + b * ft.n;
        scalar_t* o = out[it.m].data_ptr<scalar_t>() + b * ft.n;
        const acc_t* w = ft.w.data_ptr<acc_t>();
        const acc_t g2 = acc_t(2) * gp[b];
        if (ft.nhwc) {
          for (int64_t i = it.begin; i < it.end; i += ft.C) {
            for (int64_t c = 0; c < ft.C; ++c) o[i + c] = static_cast<scalar_t>(g2 * w[c] * static_cast<acc_t>(d[i + c]));
          }
        } else {
          for (int64_t i = it.begin; i < it.end;) {
            const int64_t c = i / ft.hw;
            const int64_t stop = std::min(it.end, (c + 1) * ft.hw);
            const acc_t gw = g2 * w[c];
            for (; i < stop; ++i) o[i] = static_cast<scalar_t>(gw * static_cast<acc_t>(d[i]));
          }
        }
      }
    });
  });
  return out;
}

// g *= (mask ? 1 : slope) in place: LeakyReLU's backward from a saved bool mask (input > 0).
// One pass when g and mask share their strides and are dense (the fast path's case), else ATen ops.
void mdf_leaky_relu_backward_(at::Tensor& g, const at::Tensor& mask, double slope) {
  TORCH_CHECK(g.device().is_cpu() && mask.device().is_cpu(), "mdf_leaky_relu_backward_ (cpu): CPU tensors only");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mdf_leaky_relu_backward_ (cpu): mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(g.sizes() == mask.sizes(), "mdf_leaky_relu_backward_ (cpu): g ", g.sizes(), " and mask ",
              mask.sizes(), " differ");
  const auto cl = at::MemoryFormat::ChannelsLast;
  const bool dense = (g.is_contiguous() && mask.is_contiguous()) ||
                     (g.dim() == 4 && g.is_contiguous(cl) && mask.is_contiguous(cl));
  const bool bf16 = g.scalar_type() == at::kBFloat16;
  if (!dense || !(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble || bf16)) {
    g.mul_(at::where(mask, at::ones({}, g.options()), at::full({}, slope, g.options())));
    return;
  }
  const int64_t n = g.numel();
  const uint8_t* mp = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());  // 0 or 1
  if (bf16) {  // MDFLoss(compute_dtype=bfloat16): the factor in float32, so the slope is not rounded to bf16
    at::BFloat16* gp = g.data_ptr<at::BFloat16>();
    const float s = static_cast<float>(slope), rest = 1.0f - s;
    at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) gp[i] = static_cast<at::BFloat16>(static_cast<float>(gp[i]) * (s + rest * mp[i]));
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "mdf_leaky_relu_backward_cpu", [&] {
    scalar_t* gp = g.data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(slope), rest = scalar_t(1) - s;
    at::parallel_for(0, n, 1 << 16, [&](int64_t lo, int64_t hi) {
      // branch-free so that the compiler vectorizes it: factor = slope + (1 - slope) * mask
      for (int64_t i = lo; i < hi; ++i) gp[i] *= s + rest * static_cast<scalar_t>(mp[i]);
    });
  });
}

void register_mdf(pybind11::module& m) {
  m.def("mdf_leaky_relu_backward_", &mdf_leaky_relu_backward_,
        "MDF: g *= (mask ? 1 : slope) in place, LeakyReLU's backward from a saved mask, on the CPU",
        pybind11::arg("g"), pybind11::arg("mask"), pybind11::arg("slope"));
  m.def("mdf_sqdiff_forward", &mdf_sqdiff_forward,
        "MDF: weighted squared differences of all pred/target feature pairs, per sample, on the CPU",
        pybind11::arg("feats"), pybind11::arg("chan_w"), pybind11::arg("batch"), pybind11::arg("save_diff"));
  m.def("mdf_sqdiff_backward", &mdf_sqdiff_backward,
        "MDF: gradient of each feature's pred half, written directly, on the CPU", pybind11::arg("grad"),
        pybind11::arg("diffs"), pybind11::arg("chan_w"));
}

}  // namespace fastloss
