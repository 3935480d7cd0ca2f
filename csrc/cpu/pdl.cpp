// PDL on the CPU: per (b, c) row, sort pred and target values, reduce |diff|^p, and keep what
// the permutation-cached backward needs. Rows run in parallel; each thread owns its scratch.
//
//   W[b,c]     = (1/N) sum_i |sort(pred[b,c])_i - sort(target[b,c])_i|^p
//   dW/d(sorted pred)_i = p |d_i|^(p-1) sign(d_i) / N,   d = sorted pred - sorted target
//   grad_pred[r, perm[r,i]]     =  g[r] * dW/d(sorted pred)_i
//   grad_target[r, perm_t[r,i]] = -g[r] * dW/d(sorted pred)_i
// For p=1 the saved per-rank factor is an int8 sign, for p=2 one float (2d).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <vector>

#include "cpu/radix_sort.h"

namespace fastloss {
namespace {

// Per-thread scratch for one row: pred items (key + position), target items or keys. The
// sorted outputs have the one slack slot that load_and_sort's stores need.
template <typename acc_t>
struct RowScratch {
  using K = typename KeyOf<acc_t>::type;
  std::vector<Keyed<acc_t>> pred, target, tmp;
  std::vector<K> tkeys, ktmp;
  RowScratch(int64_t n, bool target_idx)
      : pred(n + 1), target(target_idx ? n + 1 : 0), tmp(n), tkeys(target_idx ? 0 : n + 1), ktmp(target_idx ? 0 : n) {}
};

}  // namespace

// pred, target: [B, C, N], any strides, same dtype. Returns
//   w      [B, C]    acc dtype (float32, or float64 for float64 input)
//   perm   [B, C, N] int32, stable argsort of the pred rows
//   perm_t [B, C, N] int32 stable argsort of the target rows when target_grad, else empty
//   deriv  [B, C, N] per-rank derivative of W wrt sorted pred, without the 1/N:
//          p=1: int8 sign(d);  p=2: acc dtype 2*d
std::vector<at::Tensor> pdl_forward(const at::Tensor& pred, const at::Tensor& target, int64_t p,
                                    bool target_grad) {
  TORCH_CHECK(pred.device().is_cpu() && target.device().is_cpu(), "pdl_forward (cpu): tensors must be on the CPU");
  TORCH_CHECK(pred.dim() == 3 && pred.sizes() == target.sizes(), "pdl_forward (cpu): pred and target must be [B, C, N] of one shape");
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(), "pdl_forward (cpu): pred and target dtypes differ");
  TORCH_CHECK(p == 1 || p == 2, "pdl_forward (cpu): p must be 1 or 2, got ", p);
  const int64_t B = pred.size(0), C = pred.size(1), N = pred.size(2);
  TORCH_CHECK(N >= 1 && N <= INT32_MAX, "pdl_forward (cpu): N must be in [1, 2^31), got ", N);
  const auto acc_type = pred.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto int_opts = pred.options().dtype(at::kInt);
  at::Tensor w = at::empty({B, C}, pred.options().dtype(acc_type));
  at::Tensor perm = at::empty({B, C, N}, int_opts);
  at::Tensor perm_t = at::empty({target_grad ? B : 0, C, N}, int_opts);
  at::Tensor deriv = at::empty({B, C, N}, pred.options().dtype(p == 1 ? at::kChar : acc_type));
  if (B * C == 0) return {w, perm, perm_t, deriv};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "pdl_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const scalar_t* xp = pred.data_ptr<scalar_t>();
    const scalar_t* xt = target.data_ptr<scalar_t>();
    const int64_t psb = pred.stride(0), psc = pred.stride(1), psn = pred.stride(2);
    const int64_t tsb = target.stride(0), tsc = target.stride(1), tsn = target.stride(2);
    acc_t* w_ptr = w.data_ptr<acc_t>();
    int32_t* perm_ptr = perm.data_ptr<int32_t>();
    int32_t* perm_t_ptr = target_grad ? perm_t.data_ptr<int32_t>() : nullptr;
    int8_t* sign_ptr = p == 1 ? deriv.data_ptr<int8_t>() : nullptr;
    acc_t* d2_ptr = p == 2 ? deriv.data_ptr<acc_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, 32768 / N);

    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      RowScratch<acc_t> s(N, target_grad);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / C, c = r % C;
        const scalar_t* xr = xp + b * psb + c * psc;
        const scalar_t* yr = xt + b * tsb + c * tsc;
        // Strided rows are read in place (channels_last, transposed, sliced inputs: no copy).
        auto pred_at = [&](int64_t i) { return static_cast<acc_t>(xr[i * psn]); };
        auto target_at = [&](int64_t i) { return static_cast<acc_t>(yr[i * tsn]); };
        if (psn == 1) {
          load_sort_keyed<acc_t>(s.pred.data(), s.tmp.data(), N, [&](int64_t i) { return static_cast<acc_t>(xr[i]); });
        } else {
          load_sort_keyed<acc_t>(s.pred.data(), s.tmp.data(), N, pred_at);
        }
        if (target_grad) {
          load_sort_keyed<acc_t>(s.target.data(), s.tmp.data(), N, target_at);
        } else if (tsn == 1) {
          load_sort_keys<acc_t>(s.tkeys.data(), s.ktmp.data(), N, [&](int64_t i) { return static_cast<acc_t>(yr[i]); });
        } else {
          load_sort_keys<acc_t>(s.tkeys.data(), s.ktmp.data(), N, target_at);
        }
        // Rank-order pass: d = sorted pred - sorted target. kLanes partial sums keep the
        // accumulation vectorisable (a single running sum would serialise on its latency).
        constexpr int kLanes = 8;
        double lanes[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
        int32_t* perm_row = perm_ptr + r * N;
        const Keyed<acc_t>* ps = s.pred.data();
        auto rank_pass = [&](auto&& target_value, auto&& per_rank) {
          int64_t i = 0;
          for (; i + kLanes <= N; i += kLanes) {
            for (int j = 0; j < kLanes; ++j) {
              const acc_t d = ps[i + j].value() - target_value(i + j);
              lanes[j] += per_rank(i + j, d);
              perm_row[i + j] = static_cast<int32_t>(ps[i + j].index());
            }
          }
          for (; i < N; ++i) {
            const acc_t d = ps[i].value() - target_value(i);
            lanes[0] += per_rank(i, d);
            perm_row[i] = static_cast<int32_t>(ps[i].index());
          }
        };
        auto run = [&](auto&& target_value) {
          if (p == 1) {
            int8_t* sign_row = sign_ptr + r * N;
            rank_pass(target_value, [&](int64_t i, acc_t d) {
              sign_row[i] = static_cast<int8_t>((d > 0) - (d < 0));
              return static_cast<double>(std::abs(d));
            });
          } else {
            acc_t* d2_row = d2_ptr + r * N;
            rank_pass(target_value, [&](int64_t i, acc_t d) {
              d2_row[i] = acc_t(2) * d;
              return static_cast<double>(d) * static_cast<double>(d);
            });
          }
        };
        if (target_grad) {
          const Keyed<acc_t>* ts = s.target.data();
          run([&](int64_t i) { return ts[i].value(); });
          int32_t* pt_row = perm_t_ptr + r * N;
          for (int64_t i = 0; i < N; ++i) pt_row[i] = static_cast<int32_t>(ts[i].index());
        } else {
          const auto* tk = s.tkeys.data();
          run([&](int64_t i) { return key_to_float<acc_t>(tk[i]); });
        }
        double total = 0.0;
        for (int j = 0; j < kLanes; ++j) total += lanes[j];
        w_ptr[r] = static_cast<acc_t>(total / static_cast<double>(N));
      }
    });
  });
  return {w, perm, perm_t, deriv};
}

// grad_w [B, C], perm / perm_t / deriv from pdl_forward. Writes
//   grad_pred[r, perm[r,i]] = g[r] * deriv[r,i] / N,  grad_target[r, perm_t[r,i]] = -(same)
// as contiguous [B, C, N] tensors of `out_dtype`; undefined where that gradient is not needed.
std::vector<at::Tensor> pdl_backward(const at::Tensor& grad_w, const at::Tensor& perm,
                                     const at::Tensor& perm_t, const at::Tensor& deriv,
                                     bool need_pred, bool need_target, at::ScalarType out_dtype) {
  TORCH_CHECK(perm.dim() == 3 && deriv.sizes() == perm.sizes(), "pdl_backward (cpu): bad saved tensors");
  TORCH_CHECK(!need_target || perm_t.sizes() == perm.sizes(), "pdl_backward (cpu): target permutation was not saved");
  const int64_t B = perm.size(0), C = perm.size(1), N = perm.size(2);
  TORCH_CHECK(grad_w.dim() == 2 && grad_w.size(0) == B && grad_w.size(1) == C, "pdl_backward (cpu): grad_w must be [B, C]");
  const bool sign_only = deriv.scalar_type() == at::kChar;
  const auto acc_type = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(sign_only || deriv.scalar_type() == acc_type, "pdl_backward (cpu): deriv dtype does not match out_dtype");
  const at::Tensor g = grad_w.to(acc_type).contiguous();
  auto opts = perm.options().dtype(out_dtype);
  at::Tensor gp = need_pred ? at::empty({B, C, N}, opts) : at::Tensor();
  at::Tensor gt = need_target ? at::empty({B, C, N}, opts) : at::Tensor();
  if (B * C == 0 || (!need_pred && !need_target)) return {gp, gt};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "pdl_backward_cpu", [&] {
    using out_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const acc_t* g_ptr = g.data_ptr<acc_t>();
    const int8_t* sign_ptr = sign_only ? deriv.data_ptr<int8_t>() : nullptr;
    const acc_t* d2_ptr = sign_only ? nullptr : deriv.data_ptr<acc_t>();
    const int32_t* p_ptr = perm.data_ptr<int32_t>();
    const int32_t* pt_ptr = need_target ? perm_t.data_ptr<int32_t>() : nullptr;
    out_t* gp_ptr = need_pred ? gp.data_ptr<out_t>() : nullptr;
    out_t* gt_ptr = need_target ? gt.data_ptr<out_t>() : nullptr;
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);
    const int64_t grain = std::max<int64_t>(1, 32768 / N);
    auto scatter = [&](int64_t r, const int32_t* pr, out_t* o, acc_t gr) {
      if (sign_only) {
        const int8_t* sr = sign_ptr + r * N;
        for (int64_t i = 0; i < N; ++i) o[pr[i]] = static_cast<out_t>(gr * static_cast<acc_t>(sr[i]));
      } else {
        const acc_t* dr = d2_ptr + r * N;
        for (int64_t i = 0; i < N; ++i) o[pr[i]] = static_cast<out_t>(gr * dr[i]);
      }
    };
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t gr = g_ptr[r] * inv_n;
        if (gp_ptr != nullptr) scatter(r, p_ptr + r * N, gp_ptr + r * N, gr);
        if (gt_ptr != nullptr) scatter(r, pt_ptr + r * N, gt_ptr + r * N, -gr);
      }
    });
  });
  return {gp, gt};
}

void register_pdl(pybind11::module& m) {
  m.def("pdl_forward", &pdl_forward, "PDL forward on the CPU", pybind11::arg("pred"), pybind11::arg("target"),
        pybind11::arg("p"), pybind11::arg("target_grad"));
  m.def("pdl_backward", &pdl_backward, "PDL permutation-cached backward on the CPU", pybind11::arg("grad_w"),
        pybind11::arg("perm"), pybind11::arg("perm_t"), pybind11::arg("deriv"), pybind11::arg("need_pred"),
        pybind11::arg("need_target"), pybind11::arg("out_dtype"));
}

}  // namespace fastloss
