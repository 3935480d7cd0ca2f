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
#include <cstring>
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

// ---------------------------------------------------------------------------------------------
// MDFLoss(compute_dtype=bfloat16) on the CPU: the elementwise work around the bfloat16
// convolutions, one pass per layer (forward) and per LeakyReLU (backward). See
// fastloss/mdf/ops.py, ``_delta_forward``: the batch is [pred - target; target], and each
// bias-free convolution gives u = [du; u_t - b].
namespace {

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, as c10::BFloat16 does (NaN stays a quiet NaN), without a branch.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

inline const uint16_t* bf16_ptr(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}
inline uint16_t* bf16_ptr_mut(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

// Dense channels_last (or, with one channel, any dense layout): sample n, pixel p, channel c at n*P*C + p*C + c.
at::Tensor nhwc_dense(const at::Tensor& x) {
  if (x.size(1) == 1 ? x.is_contiguous() : x.is_contiguous(at::MemoryFormat::ChannelsLast)) return x;
  return x.contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor empty_nhwc(int64_t n, const at::Tensor& like, at::ScalarType dtype) {
  return at::empty({n, like.size(1), like.size(2), like.size(3)}, like.options().dtype(dtype),
                   at::MemoryFormat::ChannelsLast);
}

constexpr int64_t MDF_BF16_PIXELS = 512;  // pixels per work item of the forward step

// One pixel's C channels of mdf_bf16_delta_step; a template per output set, so that every store is
// unconditional and the loop vectorizes.
template <bool DA, bool MP, bool MT>
inline void delta_pixel(const uint16_t* __restrict du, const uint16_t* __restrict uu, const float* __restrict bp,
                        uint16_t* __restrict nd, uint16_t* __restrict nt, uint16_t* __restrict dd,
                        uint8_t* __restrict mp, uint8_t* __restrict mt, float* __restrict a, int64_t C, float s) {
  for (int64_t c = 0; c < C; ++c) {
    const float ut = bf16_to_f32(uu[c]) + bp[c];
    const float upv = ut + bf16_to_f32(du[c]);
    // LeakyReLU without a branch: max(x, 0) + s min(x, 0) is x or s x exactly
    const float at_ = std::max(ut, 0.0f) + s * std::min(ut, 0.0f);
    const float d = std::max(upv, 0.0f) + s * std::min(upv, 0.0f) - at_;
    const uint16_t db = f32_to_bf16(d);
    nd[c] = db;
    nt[c] = f32_to_bf16(at_);
    a[c] += d * d;
    if constexpr (DA) dd[c] = db;
    if constexpr (MP) mp[c] = static_cast<uint8_t>(upv > 0.0f);
    if constexpr (MT) mt[c] = static_cast<uint8_t>(ut > 0.0f);
  }
}

// The hot loops below are compiled for AVX-512 (x86-64-v4), AVX2 and the build's baseline, and the
// best one the CPU runs is picked at load time (GCC's target_clones, an ifunc); elsewhere, baseline.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && __GNUC__ >= 11
#define FASTLOSS_MDF_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FASTLOSS_MDF_CLONES __attribute__((target_clones("avx2", "default")))  // no x86-64-v4 before GCC 11
#else
#define FASTLOSS_MDF_CLONES
#endif

// The pixels [p0, p1) of one sample pair for one channel segment [c0, c0 + cj) of C.
struct DeltaSeg {
  const uint16_t* du;  // u's pred-difference row, at channel c0
  const uint16_t* uu;  // u's target row
  const float* bias;
  uint16_t* nd;        // next[j]'s rows (pixel stride cj)
  uint16_t* nt;
  uint16_t* dd;        // da (pixel stride C) or null
  uint8_t* mp;         // masks (pixel stride C) or null
  uint8_t* mt;
  float* acc;
};

FASTLOSS_MDF_CLONES
void delta_pixels(const DeltaSeg& g, int64_t p0, int64_t p1, int64_t C, int64_t cj, float s) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t e = p * C, o = p * cj;
    if (g.dd != nullptr && g.mt != nullptr) {
      delta_pixel<true, true, true>(g.du + e, g.uu + e, g.bias, g.nd + o, g.nt + o, g.dd + e, g.mp + e, g.mt + e, g.acc, cj, s);
    } else if (g.dd != nullptr && g.mp != nullptr) {
      delta_pixel<true, true, false>(g.du + e, g.uu + e, g.bias, g.nd + o, g.nt + o, g.dd + e, g.mp + e, nullptr, g.acc, cj, s);
    } else if (g.mt != nullptr) {
      delta_pixel<false, true, true>(g.du + e, g.uu + e, g.bias, g.nd + o, g.nt + o, nullptr, g.mp + e, g.mt + e, g.acc, cj, s);
    } else if (g.mp != nullptr) {
      delta_pixel<false, true, false>(g.du + e, g.uu + e, g.bias, g.nd + o, g.nt + o, nullptr, g.mp + e, nullptr, g.acc, cj, s);
    } else if (g.dd != nullptr) {
      delta_pixel<true, false, false>(g.du + e, g.uu + e, g.bias, g.nd + o, g.nt + o, g.dd + e, nullptr, nullptr, g.acc, cj, s);
    } else {
      delta_pixel<false, false, false>(g.du + e, g.uu + e, g.bias, g.nd + o, g.nt + o, nullptr, nullptr, nullptr, g.acc, cj, s);
    }
  }
}

// One pixel row of mdf_bf16_grad_step_: W pixels of C channels, strides in elements.
FASTLOSS_MDF_CLONES
void grad_row(uint16_t* o, int64_t os, const uint8_t* m, int64_t ms, const uint16_t* gr, int64_t gs, const uint16_t* dr,
              int64_t ds, const float* gw, int64_t W, int64_t C, float s, float rest) {
  for (int64_t x = 0; x < W; ++x, o += os, m += ms, gr += gr != nullptr ? gs : 0, dr += dr != nullptr ? ds : 0) {
    if (gr != nullptr && dr != nullptr) {
      for (int64_t c = 0; c < C; ++c)
        o[c] = f32_to_bf16((bf16_to_f32(gr[c]) + gw[c] * bf16_to_f32(dr[c])) * (s + rest * m[c]));
    } else if (gr != nullptr) {
      for (int64_t c = 0; c < C; ++c) o[c] = f32_to_bf16(bf16_to_f32(gr[c]) * (s + rest * m[c]));
    } else if (dr != nullptr) {
      for (int64_t c = 0; c < C; ++c) o[c] = f32_to_bf16(gw[c] * bf16_to_f32(dr[c]) * (s + rest * m[c]));
    } else {
      for (int64_t c = 0; c < C; ++c) o[c] = 0;
    }
  }
}

}  // namespace

// u [2B, C, h, w] bfloat16 (the bias-free convolution of [a_p - a_t; a_t]), bias [C] float32:
//   u_t = u[B + b] + bias, u_p = u_t + u[b], a_t = LReLU(u_t), da = LReLU(u_p) - a_t (float32)
//   next = [da; a_t] in bfloat16 (the next layer's input), da also apart when want_da (saved for
//   the backward), mask [mask_rows] = [u_p > 0] (mask_rows = B) or [u_p > 0; u_t > 0] (2B),
//   loss [B] = sum_c chan_w[c] sum_hw da^2 in float32 (double across work items) when chan_w is
//   not empty, else an empty tensor.
// next comes as one tensor per entry of ``splits`` (channel counts summing to C; empty: one tensor),
// each dense channels_last: the merged head's output split into the discriminators' inputs
// without a copy per slice.
// Each element is read once and written once per output, in channels_last; the values are the
// ones the float32 torch ops of ``_delta_forward`` give, bit for bit (the sums' order differs).
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> mdf_bf16_delta_step(
    const at::Tensor& u_in, const at::Tensor& bias_in, double slope_d, int64_t batch, const at::Tensor& chan_w_in,
    bool want_da, int64_t mask_rows, std::vector<int64_t> splits) {
  const char* op = "mdf_bf16_delta_step (cpu)";
  TORCH_CHECK(u_in.device().is_cpu() && u_in.scalar_type() == at::kBFloat16 && u_in.dim() == 4, op,
              ": u must be a 4-d bfloat16 CPU tensor, got ", u_in.scalar_type(), " ", u_in.sizes());
  TORCH_CHECK(batch >= 1 && u_in.size(0) == 2 * batch, op, ": u has ", u_in.size(0), " samples for batch ", batch);
  TORCH_CHECK(mask_rows == 0 || mask_rows == batch || mask_rows == 2 * batch, op, ": mask_rows must be 0, B or 2B");
  const int64_t C = u_in.size(1), P = u_in.size(2) * u_in.size(3), n = C * P;
  const at::Tensor u = nhwc_dense(u_in);
  const at::Tensor bias = bias_in.to(at::kFloat).contiguous();
  TORCH_CHECK(bias.numel() == C, op, ": bias has ", bias.numel(), " entries for ", C, " channels");
  const bool with_loss = chan_w_in.numel() > 0;
  const at::Tensor w = with_loss ? chan_w_in.to(at::kFloat).contiguous() : at::ones({C}, bias.options());
  TORCH_CHECK(w.numel() == C, op, ": chan_w has ", w.numel(), " entries for ", C, " channels");
  if (splits.empty()) splits.push_back(C);
  std::vector<at::Tensor> next;
  std::vector<uint16_t*> nxs;
  std::vector<int64_t> c0s;
  int64_t c0 = 0;
  for (const int64_t cj : splits) {
    TORCH_CHECK(cj >= 1, op, ": splits must be positive, got ", cj);
    next.push_back(at::empty({2 * batch, cj, u.size(2), u.size(3)}, u.options(), at::MemoryFormat::ChannelsLast));
    nxs.push_back(bf16_ptr_mut(next.back()));
    c0s.push_back(c0);
    c0 += cj;
  }
  TORCH_CHECK(c0 == C, op, ": splits sum to ", c0, " for ", C, " channels");
  at::Tensor da = want_da ? empty_nhwc(batch, u, at::kBFloat16) : at::Tensor();
  at::Tensor mask = mask_rows > 0 ? empty_nhwc(mask_rows, u, at::kBool) : at::Tensor();
  const int64_t chunks = (P + MDF_BF16_PIXELS - 1) / MDF_BF16_PIXELS;
  std::vector<double> partials(static_cast<size_t>(batch * chunks), 0.0);
  const uint16_t* up_ = bf16_ptr(u);
  uint16_t* dap = want_da ? bf16_ptr_mut(da) : nullptr;
  uint8_t* mk = mask_rows > 0 ? reinterpret_cast<uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  const float* bp = bias.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float s = static_cast<float>(slope_d);
  const bool mask_t = mask_rows == 2 * batch;
  at::parallel_for(0, batch * chunks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(static_cast<size_t>(C));
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / chunks, k = r % chunks;
      const int64_t e0 = k * MDF_BF16_PIXELS * C, e1 = std::min(P, (k + 1) * MDF_BF16_PIXELS) * C;
      const int64_t op_ = b * n, ot = (batch + b) * n;  // pred-difference and target rows
      std::fill(acc.begin(), acc.end(), 0.0f);
      float* a = acc.data();
      const int64_t p0 = e0 / C, p1 = e1 / C;
      for (size_t j = 0; j < splits.size(); ++j) {
        const int64_t cj = splits[j], c0j = c0s[j];
        const DeltaSeg seg{up_ + op_ + c0j, up_ + ot + c0j, bp + c0j, nxs[j] + b * cj * P, nxs[j] + (batch + b) * cj * P,
                           dap != nullptr ? dap + op_ + c0j : nullptr, mk != nullptr ? mk + op_ + c0j : nullptr,
                           mask_t ? mk + ot + c0j : nullptr, a + c0j};
        delta_pixels(seg, p0, p1, C, cj, s);
      }
      double sum = 0.0;
      for (int64_t c = 0; c < C; ++c) sum += static_cast<double>(wp[c]) * static_cast<double>(a[c]);
      partials[static_cast<size_t>(r)] = sum;
    }
  });
  at::Tensor loss;
  if (with_loss) {
    loss = at::empty({batch}, bias.options());
    float* lp = loss.data_ptr<float>();
    for (int64_t b = 0; b < batch; ++b) {
      double sum = 0.0;
      for (int64_t k = 0; k < chunks; ++k) sum += partials[static_cast<size_t>(b * chunks + k)];
      lp[b] = static_cast<float>(sum);
    }
  } else {
    loss = at::empty({0}, bias.options());
  }
  return {next, want_da ? da : at::empty({0}, u.options()), mask_rows > 0 ? mask : at::empty({0}, u.options().dtype(at::kBool)), loss};
}

// loss [B] (float32) = sum_m weight_m sum_chw x_m[b]^2 over bfloat16 tensors x_m [B, C_m, H_m, W_m] (any
// layout), in double: the tail maps' differences of MDF's published formula, all in one call.
at::Tensor mdf_bf16_sqsum(const std::vector<at::Tensor>& xs_in, const std::vector<double>& weights) {
  const char* op = "mdf_bf16_sqsum (cpu)";
  TORCH_CHECK(!xs_in.empty() && xs_in.size() == weights.size(), op, ": ", xs_in.size(), " tensors, ", weights.size(),
              " weights");
  const int64_t B = xs_in[0].size(0);
  std::vector<at::Tensor> xs;
  for (const auto& x : xs_in) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kBFloat16 && x.dim() == 4 && x.size(0) == B, op,
                ": tensors must be 4-d bfloat16 CPU tensors of ", B, " samples, got ", x.scalar_type(), " ", x.sizes());
    xs.push_back(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast) ? x : x.contiguous());
  }
  const int64_t M = static_cast<int64_t>(xs.size());
  std::vector<double> partials(static_cast<size_t>(B * M), 0.0);
  at::parallel_for(0, B * M, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / M, m = r % M, n = xs[m].numel() / B;  // a dense sample, either layout
      const uint16_t* p = bf16_ptr(xs[m]) + b * n;
      float acc = 0.0f;
      double sum = 0.0;
      for (int64_t i = 0; i < n; ++i) {
        const float v = bf16_to_f32(p[i]);
        acc += v * v;
        if ((i & 1023) == 1023) {
          sum += acc;
          acc = 0.0f;
        }
      }
      partials[static_cast<size_t>(r)] = weights[static_cast<size_t>(m)] * (sum + acc);
    }
  });
  at::Tensor loss = at::empty({B}, xs[0].options().dtype(at::kFloat));
  float* lp = loss.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    double sum = 0.0;
    for (int64_t m = 0; m < M; ++m) sum += partials[static_cast<size_t>(b * M + m)];
    lp[b] = static_cast<float>(sum);
  }
  return loss;
}

// In place: out[r] = (g[r] + sign_r 2 grad[r mod B] chan_w[c] d[r mod B]) * (mask[r] ? 1 : slope) in
// float32, rounded once to bfloat16; sign_r = 1 for r < B, -1 for the target rows r >= B. g (bfloat16,
// may be out itself) or d (bfloat16, B rows) may be empty (left out). out, g, d and mask are
// [R, C, h, w] views whose channels are adjacent in memory (channels_last, or channel slices of
// channels_last tensors, or one channel); the rest of their strides is free.
void mdf_bf16_grad_step_(at::Tensor& out, const at::Tensor& g, const at::Tensor& d, const at::Tensor& mask,
                         const at::Tensor& grad_in, const at::Tensor& chan_w_in, double slope_d) {
  const char* op = "mdf_bf16_grad_step_ (cpu)";
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kBFloat16 && out.dim() == 4, op,
              ": out must be a 4-d bfloat16 CPU tensor");
  const int64_t R = out.size(0), C = out.size(1), H = out.size(2), W = out.size(3);
  const bool has_g = g.numel() > 0, has_d = d.numel() > 0;
  auto check = [&](const at::Tensor& t, const char* name, at::ScalarType dt, int64_t rows) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dt && t.dim() == 4 && t.size(0) == rows &&
                    t.size(1) == C && t.size(2) == H && t.size(3) == W,
                op, ": ", name, " is ", t.scalar_type(), " ", t.sizes(), ", expected ", dt, " [", rows, ", ", C, ", ",
                H, ", ", W, "]");
    TORCH_CHECK(C == 1 || t.stride(1) == 1, op, ": ", name, "'s channels must be adjacent in memory (channels_last)");
  };
  check(out, "out", at::kBFloat16, R);
  check(mask, "mask", at::kBool, R);
  if (has_g) check(g, "g", at::kBFloat16, R);
  int64_t B = R;
  at::Tensor grad, w;
  if (has_d) {
    B = d.size(0);
    TORCH_CHECK(R == B || R == 2 * B, op, ": out has ", R, " rows for ", B, " diff rows");
    check(d, "d", at::kBFloat16, B);
    grad = grad_in.reshape({-1}).to(at::kFloat).contiguous();
    w = chan_w_in.to(at::kFloat).contiguous();
    TORCH_CHECK(grad.numel() == B && w.numel() == C, op, ": grad needs ", B, " entries and chan_w ", C);
  }
  uint16_t* op_ = bf16_ptr_mut(out);
  const uint16_t* gp = has_g ? bf16_ptr(g) : nullptr;
  const uint16_t* dp = has_d ? bf16_ptr(d) : nullptr;
  const uint8_t* mp = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const float* grp = has_d ? grad.data_ptr<float>() : nullptr;
  const float* wp = has_d ? w.data_ptr<float>() : nullptr;
  const float s = static_cast<float>(slope_d), rest = 1.0f - s;
  const int64_t os0 = out.stride(0), os2 = out.stride(2), os3 = out.stride(3);
  const int64_t ms0 = mask.stride(0), ms2 = mask.stride(2), ms3 = mask.stride(3);
  const int64_t gs0 = has_g ? g.stride(0) : 0, gs2 = has_g ? g.stride(2) : 0, gs3 = has_g ? g.stride(3) : 0;
  const int64_t ds0 = has_d ? d.stride(0) : 0, ds2 = has_d ? d.stride(2) : 0, ds3 = has_d ? d.stride(3) : 0;
  at::parallel_for(0, R * H, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> gw(has_d ? static_cast<size_t>(C) : 0);
    int64_t cached = -1;
    for (int64_t ry = lo; ry < hi; ++ry) {
      const int64_t r = ry / H, y = ry % H, b = r % B;
      if (has_d && cached != r) {
        const float f = (r < B ? 2.0f : -2.0f) * grp[b];
        for (int64_t c = 0; c < C; ++c) gw[c] = f * wp[c];
        cached = r;
      }
      grad_row(op_ + r * os0 + y * os2, os3, mp + r * ms0 + y * ms2, ms3, has_g ? gp + r * gs0 + y * gs2 : nullptr, gs3,
               has_d ? dp + b * ds0 + y * ds2 : nullptr, ds3, gw.data(), W, C, s, rest);
    }
  });
}

void register_mdf(pybind11::module& m) {
  m.def("mdf_bf16_delta_step", &mdf_bf16_delta_step,
        "MDF bfloat16: one pass after a bias-free convolution of [pred - target; target] (bias, LeakyReLU, "
        "difference, next input, mask, loss), on the CPU",
        pybind11::arg("u"), pybind11::arg("bias"), pybind11::arg("slope"), pybind11::arg("batch"),
        pybind11::arg("chan_w"), pybind11::arg("want_da"), pybind11::arg("mask_rows"), pybind11::arg("splits"));
  m.def("mdf_bf16_sqsum", &mdf_bf16_sqsum, "MDF bfloat16: sum_m weight_m sum_chw x_m[b]^2 per sample, on the CPU",
        pybind11::arg("xs"), pybind11::arg("weights"));
  m.def("mdf_bf16_grad_step_", &mdf_bf16_grad_step_,
        "MDF bfloat16: out = (g + 2 grad w d) * LeakyReLU'(mask) in place, on the CPU", pybind11::arg("out"),
        pybind11::arg("g"), pybind11::arg("d"), pybind11::arg("mask"), pybind11::arg("grad"),
        pybind11::arg("chan_w"), pybind11::arg("slope"));
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
