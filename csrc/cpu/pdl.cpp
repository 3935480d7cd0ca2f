// PDL on the CPU: per (b, c) row, sort pred and target values, reduce |diff|^p, and keep what
// the permutation-cached backward needs. Rows run in parallel; each thread owns its scratch.
//
//   W[b,c]     = (1/N) sum_i |sort(pred[b,c])_i - sort(target[b,c])_i|^p
//   dW/d(sorted pred)_i = p |d_i|^(p-1) sign(d_i) / N,   d = sorted pred - sorted target
//   grad_pred[r, perm[r,i]]     =  g[r] * dW/d(sorted pred)_i
//   grad_target[r, perm_t[r,i]] = -g[r] * dW/d(sorted pred)_i
// For p=1 the saved per-rank factor is an int8 sign, for p=2 one float (2d).
// The rows themselves are cpu/pdl_rows.h, run from its AVX2 build where the CPU has AVX2.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu/pdl_rows.h"

namespace fastloss {

// The instruction set of the sorting kernels: "avx2" where this build has them and the CPU
// runs them, else "baseline". FASTLOSS_CPU_ISA=baseline in the environment forces the
// baseline (read once, at the first PDL call; any other value but "avx2" is ignored with a
// warning); set_cpu_isa switches for the tests.
namespace {
bool cpu_runs_avx2() {
#if FASTLOSS_HAVE_AVX2_BUILD
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}
std::atomic<bool>& use_avx2() {
  static std::atomic<bool> flag([] {
    const char* env = std::getenv("FASTLOSS_CPU_ISA");
    const std::string want = env != nullptr ? env : "";
    if (want == "baseline") return false;
    if (!want.empty() && want != "avx2") {
      TORCH_WARN("FASTLOSS_CPU_ISA='", want, "' is neither 'baseline' nor 'avx2': ignored");
    } else if (want == "avx2" && !cpu_runs_avx2()) {
      TORCH_WARN("FASTLOSS_CPU_ISA=avx2, but this build or CPU has no AVX2 kernels: running the baseline");
    }
    return cpu_runs_avx2();
  }());
  return flag;
}
}  // namespace

// float16 / bfloat16 rows: the baseline build. float32 / float64 rows: the AVX2 build if asked.
template <typename scalar_t, typename acc_t>
void run_rows(const PdlRows<scalar_t, acc_t>& rows, bool, int64_t begin, int64_t end) {
  pdl_rows(rows, begin, end);
}
template <typename F>
void run_rows(const PdlRows<F, F>& rows, bool avx2, int64_t begin, int64_t end) {
#if FASTLOSS_HAVE_AVX2_BUILD
  if (avx2) return pdl_rows_avx2(rows, begin, end);
#endif
  pdl_rows(rows, begin, end);
}

std::string cpu_isa() { return use_avx2().load() ? "avx2" : "baseline"; }

void set_cpu_isa(const std::string& isa) {
  TORCH_CHECK(isa == "baseline" || isa == "avx2", "set_cpu_isa: isa must be 'baseline' or 'avx2', got '", isa, "'");
  TORCH_CHECK(isa == "baseline" || cpu_runs_avx2(), "set_cpu_isa: this build or CPU has no AVX2 kernels");
  use_avx2().store(isa == "avx2");
}

// Whether rows of C channels and N positions with strides (channel sc, position sn) are a
// channels_last feature map's flatten(2): each position's C channels side by side.
static bool channels_inner(int64_t C, int64_t N, int64_t sc, int64_t sn) {
  return C > 1 && N > 1 && sc == 1 && sn == C;
}

// out[j * N + i] = x[i * C + j] for j < g <= G: g channels of a channels_last map as rows. In
// blocks of 64 positions; a full group's channel loop has a constant trip count, so the compiler
// unrolls it into vector loads.
template <int64_t G, typename scalar_t, typename acc_t>
void gather_channels(const scalar_t* x, int64_t C, int64_t N, int64_t g, acc_t* out) {
  constexpr int64_t kBlock = 64;
  for (int64_t i0 = 0; i0 < N; i0 += kBlock) {
    const int64_t i1 = std::min(N, i0 + kBlock);
    if (g == G) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* xi = x + i * C;
        for (int64_t j = 0; j < G; ++j) out[j * N + i] = static_cast<acc_t>(xi[j]);
      }
    } else {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* xi = x + i * C;
        for (int64_t j = 0; j < g; ++j) out[j * N + i] = static_cast<acc_t>(xi[j]);
      }
    }
  }
}

// out[j * N + i] = x[j * sc + i * sn] for j < g: g rows of any strides, contiguous.
template <typename scalar_t, typename acc_t>
void gather_rows(const scalar_t* x, int64_t sc, int64_t sn, int64_t N, int64_t g, acc_t* out) {
  for (int64_t j = 0; j < g; ++j) {
    const scalar_t* xj = x + j * sc;
    acc_t* oj = out + j * N;
    if (sn == 1) {
      for (int64_t i = 0; i < N; ++i) oj[i] = static_cast<acc_t>(xj[i]);
    } else {
      for (int64_t i = 0; i < N; ++i) oj[i] = static_cast<acc_t>(xj[i * sn]);
    }
  }
}

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

    const bool avx2 = use_avx2().load();
    const bool inner = channels_inner(C, N, psc, psn) && channels_inner(C, N, tsc, tsn);
    constexpr bool kReduced = std::is_same<scalar_t, at::Half>::value || std::is_same<scalar_t, at::BFloat16>::value;
    if (inner || kReduced) {
      // Rows copied to contiguous acc_t rows, `kGroup` neighbouring channels of one image per
      // task, then sorted as such. A channels_last feature map's flatten(2) has a row's values C
      // apart, one cache line per value: the copy reads whole lines (float32 VGG16 features of
      // 4 x 96 x 96 images: 1.5x faster than reading the rows in place, measured here). float16
      // and bfloat16 rows, of any layout, run the float32 kernels (bfloat16 ones: 1.5x faster).
      // Fewer rows a task where rows are long: a thread's copies stay within 8 MiB (float32).
      constexpr int64_t kGroup = 8;
      const int64_t group = std::clamp<int64_t>((int64_t(1) << 20) / N, 1, kGroup);
      const int64_t groups = (C + group - 1) / group;
      at::parallel_for(0, B * groups, std::max<int64_t>(1, 32768 / (N * group)), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> bp(group * N), bt(group * N);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t b = t / groups, c0 = (t % groups) * group, g = std::min(group, C - c0);
          if (inner) {
            gather_channels<kGroup>(xp + b * psb + c0, C, N, g, bp.data());
            gather_channels<kGroup>(xt + b * tsb + c0, C, N, g, bt.data());
          } else {
            gather_rows(xp + b * psb + c0 * psc, psc, psn, N, g, bp.data());
            gather_rows(xt + b * tsb + c0 * tsc, tsc, tsn, N, g, bt.data());
          }
          // rows 0..g of the copy are rows r0..r0+g of the outputs
          const int64_t r0 = b * C + c0;
          const PdlRows<acc_t, acc_t> rows{bp.data(), bt.data(), g, N, 0, N, 1, 0, N, 1, p, target_grad,
                                           w_ptr + r0, perm_ptr + r0 * N,
                                           perm_t_ptr != nullptr ? perm_t_ptr + r0 * N : nullptr,
                                           sign_ptr != nullptr ? sign_ptr + r0 * N : nullptr,
                                           d2_ptr != nullptr ? d2_ptr + r0 * N : nullptr};
          run_rows(rows, avx2, 0, g);
        }
      });
      return;
    }
    const PdlRows<scalar_t, acc_t> rows{xp, xt, C, N, psb, psc, psn, tsb, tsc, tsn, p, target_grad,
                                        w_ptr, perm_ptr, perm_t_ptr, sign_ptr, d2_ptr};
    at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) { run_rows(rows, avx2, begin, end); });
  });
  return {w, perm, perm_t, deriv};
}

// grad_w [B, C], perm / perm_t / deriv from pdl_forward. Writes
//   grad_pred[r, perm[r,i]] = g[r] * deriv[r,i] / N,  grad_target[r, perm_t[r,i]] = -(same)
// as [B, C, N] tensors of `out_dtype`, undefined where that gradient is not needed: contiguous,
// or with `channels_inner` the layout of a channels_last feature map's flatten(2) (strides
// C*N, 1, C), so that the gradient meets the backbone's channels_last one without a relayout.
std::vector<at::Tensor> pdl_backward(const at::Tensor& grad_w, const at::Tensor& perm,
                                     const at::Tensor& perm_t, const at::Tensor& deriv,
                                     bool need_pred, bool need_target, at::ScalarType out_dtype,
                                     bool channels_inner) {
  TORCH_CHECK(perm.dim() == 3 && deriv.sizes() == perm.sizes(), "pdl_backward (cpu): bad saved tensors");
  TORCH_CHECK(!need_target || perm_t.sizes() == perm.sizes(), "pdl_backward (cpu): target permutation was not saved");
  const int64_t B = perm.size(0), C = perm.size(1), N = perm.size(2);
  TORCH_CHECK(grad_w.dim() == 2 && grad_w.size(0) == B && grad_w.size(1) == C, "pdl_backward (cpu): grad_w must be [B, C]");
  const bool sign_only = deriv.scalar_type() == at::kChar;
  const auto acc_type = out_dtype == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(sign_only || deriv.scalar_type() == acc_type, "pdl_backward (cpu): deriv dtype does not match out_dtype");
  const at::Tensor g = grad_w.to(acc_type).contiguous();
  auto opts = perm.options().dtype(out_dtype);
  auto make = [&] { return channels_inner ? at::empty({B, N, C}, opts).transpose(1, 2) : at::empty({B, C, N}, opts); };
  at::Tensor gp = need_pred ? make() : at::Tensor();
  at::Tensor gt = need_target ? make() : at::Tensor();
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
    // Row r = (b, c) starts at offset b*C*N + c*N (contiguous) or b*C*N + c (channels inner), and
    // its element i is `sn` further on per position.
    const int64_t sn = channels_inner ? C : 1;
    auto row_offset = [&](int64_t r) { return channels_inner ? (r / C) * C * N + r % C : r * N; };
    auto scatter = [&](int64_t r, const int32_t* pr, out_t* o, acc_t gr) {
      if (sign_only) {
        const int8_t* sr = sign_ptr + r * N;
        for (int64_t i = 0; i < N; ++i) o[pr[i] * sn] = static_cast<out_t>(gr * static_cast<acc_t>(sr[i]));
      } else {
        const acc_t* dr = d2_ptr + r * N;
        for (int64_t i = 0; i < N; ++i) o[pr[i] * sn] = static_cast<out_t>(gr * dr[i]);
      }
    };
    auto rows = [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t gr = g_ptr[r] * inv_n;
        if (gp_ptr != nullptr) scatter(r, p_ptr + r * N, gp_ptr + row_offset(r), gr);
        if (gt_ptr != nullptr) scatter(r, pt_ptr + r * N, gt_ptr + row_offset(r), -gr);
      }
    };
    if (!channels_inner) {
      at::parallel_for(0, B * C, std::max<int64_t>(1, 32768 / N), rows);
      return;
    }
    // Channels inner: one 64-byte line holds `group` neighbouring channels of a position, so a
    // task takes whole groups of one image (no line written by two threads) and its rows revisit
    // the same N lines while they are in cache.
    const int64_t group = std::max<int64_t>(1, 64 / static_cast<int64_t>(sizeof(out_t)));
    const int64_t groups = (C + group - 1) / group;
    at::parallel_for(0, B * groups, std::max<int64_t>(1, 32768 / (N * group)), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / groups, c0 = (t % groups) * group;
        rows(b * C + c0, b * C + std::min(C, c0 + group));
      }
    });
  });
  return {gp, gt};
}

void register_pdl(pybind11::module& m) {
  m.def("pdl_forward", &pdl_forward, "PDL forward on the CPU", pybind11::arg("pred"), pybind11::arg("target"),
        pybind11::arg("p"), pybind11::arg("target_grad"));
  m.def("cpu_isa", &cpu_isa, "The instruction set the CPU sorting kernels run: 'avx2' or 'baseline'");
  m.def("set_cpu_isa", &set_cpu_isa, "Switch the CPU sorting kernels' instruction set (for tests)", pybind11::arg("isa"));
  m.def("pdl_backward", &pdl_backward, "PDL permutation-cached backward on the CPU", pybind11::arg("grad_w"),
        pybind11::arg("perm"), pybind11::arg("perm_t"), pybind11::arg("deriv"), pybind11::arg("need_pred"),
        pybind11::arg("need_target"), pybind11::arg("out_dtype"), pybind11::arg("channels_inner") = false);
}

}  // namespace fastloss
