// D2SM on the CPU: the fused pass over the cosine-similarity matrices (kernel, row
// normalization, log, KL and the gradient with respect to the similarities, rows in parallel),
// and the D2SMQueue helpers (row normalization, the cache update, the skinny products).
//
// Inputs of the pass: the pred-side and target-side similarities G' = sp, G = st ([q, q],
// symmetric, unit stride along a row), their row sums dots_i = sum_k G_ik (float64, the sums of
// these very entries: d2sm_kl sums the matrices, a D2SMQueue keeps running sums of its cache), and
// the rows b whose gradient is wanted. With K = (G + 1) / 2:
//
//   pkt:   R_i = (q + dots_i) / 2,                   j over all q,   scale = 1 / q^2
//          P = K'_ij / R'_i, Q = K_ij / R_i,   term = -Q lg,   a = -Q / (P + eps)
//   paper: R_i = (q + dots_i) / 2 - (G_ii + 1) / 2,  j over j != i,  scale = 1 / q
//          P = K'_ij / R'_i, Q = K_ij / R_i,   term =  P lg,   a = lg + P / (P + eps)
//   lg = log((P + eps) / (Q + eps));   loss = scale * sum_ij term
//
// (pkt's T log((T + eps) / (S + eps)) is -Q lg with S = P, T = Q.) a_ij is dL/dP_ij / scale.
// Through the row normalization, with c_i = scale sum_j a_ij P_ij:
//   W_ij = dL/dG'_ij = (scale a_ij - c_i) / (2 R'_i)        (0 on the diagonal in paper mode)
// and the op returns, for each requested row b, grad_rows[n, j] = W_bj + W_jb: the derivative of
// the loss with respect to f_hat_b . f_hat_j, which appears at (b, j) and at (j, b) of G'. W_jb is
// recomputed from row b (G' and G are symmetric) with row j's 1/R'_j, 1/R_j and c_j, so the
// only q x q data read are the two similarity matrices, once for the loss and once more for the
// requested rows. Pass 1 (loss, c, 1/R per row) and pass 2 (grad_rows) both run rows in parallel.
//
// Precision. A row's KL is a small sum of terms of both signs (P ~ Q): an error that shifts a
// whole row (a rounded 1/R, a rounded c_i) moves it by as much as the error, which is large next
// to a KL of 1e-4. So R, 1/R, c_i, the log arguments and the row sums are float64; the entries
// are computed in float32 for float32 input.
//
// float32 rows use a vectorizable log (Cephes' logf polynomial, ~1 ulp) inside `#pragma omp
// simd` loops, compiled for AVX-512, AVX2 and the baseline (target_clones picks one at load
// time); a row whose log argument leaves the normal range (eps = 0, a zero normalizer, NaN)
// is recomputed with std::log. float64 uses std::log throughout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTLOSS_D2SM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTLOSS_D2SM_CLONES
#endif
// Everything a cloned function calls is inlined into it, so that it is compiled for that target.
#if defined(__GNUC__)
#define D2SM_INLINE __attribute__((always_inline)) inline
#else
#define D2SM_INLINE inline
#endif

namespace fastloss {
namespace {

// log(x) for a positive normal float x, branch-free so that it vectorizes: x = m 2^e with m in
// [sqrt(1/2), sqrt(2)), then Cephes' degree-9 polynomial for log(1 + (m - 1)).
D2SM_INLINE float log_normal_f32(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int32_t e = ((bits >> 23) & 0xff) - 126;  // x = m * 2^e, m in [0.5, 1)
  const int32_t mbits = (bits & 0x007fffff) | 0x3f000000;
  float m;
  std::memcpy(&m, &mbits, sizeof m);
  const int32_t small = m < 0.707106781186547524f;
  e -= small;
  m = m + (small ? m : 0.0f) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

template <typename T>
inline T log_any(T x) {
  return std::log(x);
}

// One entry: P (pred side) and Q (target side) probabilities -> loss term and a = dL/dP / scale.
template <typename T, bool PAPER>
D2SM_INLINE void entry_terms(T P, T Q, T lg, T eps, T& term, T& a) {
  if constexpr (PAPER) {
    term = P * lg;
    a = lg + P / (P + eps);
  } else {
    term = -Q * lg;
    a = -Q / (P + eps);
  }
}

template <typename T, bool PAPER>
D2SM_INLINE T entry_a(T P, T Q, T lg, T eps) {
  T term, a;
  entry_terms<T, PAPER>(P, Q, lg, eps, term, a);
  return a;
}

// The log argument (P + eps) / (Q + eps) of a float32 entry, formed in float64 from the row's
// 1/R in float64. A row's KL is a small sum of terms of both signs (P ~ Q): a float32 1/R would
// shift every log of the row by the same rounding error (up to 6e-8, and alike across rows
// whose R are alike), which moves a KL of 1e-4 by 1e-4 relative; rounded once here, the error
// differs from entry to entry and averages out.
D2SM_INLINE float log_arg_f32(float kp, float kt, double ip, double it, double eps) {
  return static_cast<float>((double(kp) * ip + eps) / (double(kt) * it + eps));
}

// Sum of term and of a * P over j in [begin, end) of one row (float64 accumulators); returns
// false if a log argument left the normal float range (the caller then redoes the row with std::log).
template <bool PAPER, bool FAST_LOG>
D2SM_INLINE bool row_sums_f32(const float* p, const float* t, int64_t begin, int64_t end, double ip_d, double it_d,
                              float eps, double& loss, double& c) {
  const float ip = static_cast<float>(ip_d), it = static_cast<float>(it_d);
  double sl = 0.0, sc = 0.0;
  int bad = 0;
#pragma omp simd reduction(+ : sl, sc) reduction(| : bad)
  for (int64_t j = begin; j < end; ++j) {
    const float kp = (p[j] + 1.f) * 0.5f, kt = (t[j] + 1.f) * 0.5f;
    const float P = kp * ip, Q = kt * it;
    const float x = log_arg_f32(kp, kt, ip_d, it_d, eps);
    float lg;
    if constexpr (FAST_LOG) {
      bad |= (x >= FLT_MIN) & (x <= FLT_MAX) ? 0 : 1;  // & and not &&: no branch in the loop
      lg = log_normal_f32(x);
    } else {
      lg = std::log(x);
    }
    float term, a;
    entry_terms<float, PAPER>(P, Q, lg, eps, term, a);
    sl += static_cast<double>(term);
    sc += static_cast<double>(a * P);
  }
  loss += sl;
  c += sc;
  return bad == 0;
}

template <bool PAPER>
inline void row_sums_f64(const double* p, const double* t, int64_t begin, int64_t end, double ip, double it,
                         double eps, double& loss, double& c) {
  for (int64_t j = begin; j < end; ++j) {
    const double P = (p[j] + 1.) * 0.5 * ip;
    const double Q = (t[j] + 1.) * 0.5 * it;
    double term, a;
    entry_terms<double, PAPER>(P, Q, std::log((P + eps) / (Q + eps)), eps, term, a);
    loss += term;
    c += a * P;
  }
}

struct PassArgs {
  const void* sp;
  const void* st;
  int64_t ldp, ldt;        // row strides of sp, st (elements)
  const void* dots_p;
  const void* dots_t;
  int64_t q;
  double eps;
  double* inv_p;           // [q] 1 / R'_i
  double* inv_t;           // [q] 1 / R_i
  double* c;               // [q] c_i = scale * sum_j a_ij P_ij
  double* row_loss;        // [q] scale * sum_j term_ij
};

// Pass 1 over rows [begin, end).
template <typename T, bool PAPER>
D2SM_INLINE void pass1_impl(const PassArgs& a, int64_t begin, int64_t end) {
  const T* sp = static_cast<const T*>(a.sp);
  const T* st = static_cast<const T*>(a.st);
  const double* dp = static_cast<const double*>(a.dots_p);
  const double* dt = static_cast<const double*>(a.dots_t);
  double* inv_p = a.inv_p;
  double* inv_t = a.inv_t;
  double* c_out = a.c;
  const int64_t q = a.q;
  const T eps = static_cast<T>(a.eps);
  const double scale = PAPER ? 1.0 / double(q) : 1.0 / (double(q) * double(q));
  for (int64_t i = begin; i < end; ++i) {
    const T* p = sp + i * a.ldp;
    const T* t = st + i * a.ldt;
    double rp = (double(q) + dp[i]) * 0.5, rt = (double(q) + dt[i]) * 0.5;
    if (PAPER) {
      rp -= (double(p[i]) + 1.0) * 0.5;
      rt -= (double(t[i]) + 1.0) * 0.5;
    }
    const double ip = 1.0 / rp, it = 1.0 / rt;
    double loss = 0.0, c = 0.0;
    if constexpr (std::is_same<T, float>::value) {
      bool ok = true;
      if (PAPER) {
        ok &= row_sums_f32<PAPER, true>(p, t, 0, i, ip, it, eps, loss, c);
        ok &= row_sums_f32<PAPER, true>(p, t, i + 1, q, ip, it, eps, loss, c);
      } else {
        ok &= row_sums_f32<PAPER, true>(p, t, 0, q, ip, it, eps, loss, c);
      }
      if (!ok) {
        loss = c = 0.0;
        if (PAPER) {
          row_sums_f32<PAPER, false>(p, t, 0, i, ip, it, eps, loss, c);
          row_sums_f32<PAPER, false>(p, t, i + 1, q, ip, it, eps, loss, c);
        } else {
          row_sums_f32<PAPER, false>(p, t, 0, q, ip, it, eps, loss, c);
        }
      }
    } else {
      if (PAPER) {
        row_sums_f64<PAPER>(p, t, 0, i, ip, it, eps, loss, c);
        row_sums_f64<PAPER>(p, t, i + 1, q, ip, it, eps, loss, c);
      } else {
        row_sums_f64<PAPER>(p, t, 0, q, ip, it, eps, loss, c);
      }
    }
    inv_p[i] = ip;
    inv_t[i] = it;
    c_out[i] = c * scale;
    a.row_loss[i] = loss * scale;
  }
}

FASTLOSS_D2SM_CLONES void pass1_f32_paper(const PassArgs& a, int64_t b, int64_t e) { pass1_impl<float, true>(a, b, e); }
FASTLOSS_D2SM_CLONES void pass1_f32_pkt(const PassArgs& a, int64_t b, int64_t e) { pass1_impl<float, false>(a, b, e); }

// The log argument of an entry in the compute dtype (see log_arg_f32).
template <typename T>
D2SM_INLINE T log_arg(T kp, T kt, double ip, double it, double eps) {
  if constexpr (std::is_same<T, float>::value) {
    return log_arg_f32(kp, kt, ip, it, eps);
  } else {
    return (kp * ip + eps) / (kt * it + eps);
  }
}

// Pass 2: out[n, j] = W_bj + W_jb for the entries [j0, j1) of requested row b = rows[n].
template <typename T, bool PAPER, bool FAST_LOG>
D2SM_INLINE void pass2_range(const PassArgs& a, int64_t b, int64_t j0, int64_t j1, T* out) {
  const T* p = static_cast<const T*>(a.sp) + b * a.ldp;
  const T* t = static_cast<const T*>(a.st) + b * a.ldt;
  const double* inv_p = a.inv_p;
  const double* inv_t = a.inv_t;
  const double* c = a.c;
  const T eps = static_cast<T>(a.eps);
  const T scale = PAPER ? T(1) / T(a.q) : T(1) / (T(a.q) * T(a.q));
  const double ipb_d = inv_p[b], itb_d = inv_t[b];
  const T ipb = static_cast<T>(ipb_d), itb = static_cast<T>(itb_d);
  const double cb = c[b];
#pragma omp simd
  for (int64_t j = j0; j < j1; ++j) {
    const T kp = (p[j] + T(1)) * T(0.5), kt = (t[j] + T(1)) * T(0.5);
    const T ipj = static_cast<T>(inv_p[j]);
    const T P1 = kp * ipb, Q1 = kt * itb;                        // row b: P_bj, Q_bj
    const T P2 = kp * ipj, Q2 = kt * static_cast<T>(inv_t[j]);   // row j: P_jb, Q_jb (symmetric G)
    const T x1 = log_arg<T>(kp, kt, ipb_d, itb_d, a.eps), x2 = log_arg<T>(kp, kt, inv_p[j], inv_t[j], a.eps);
    T lg1, lg2;
    if constexpr (FAST_LOG) {
      lg1 = log_normal_f32(x1);
      lg2 = log_normal_f32(x2);
    } else {
      lg1 = log_any<T>(x1);
      lg2 = log_any<T>(x2);
    }
    // a - c in float64: c_i is a row constant, and its float32 rounding would shift a whole row
    // of W, which the product with the features turns into a gradient along sum_k f_hat_k
    const double w1 = (double(scale * entry_a<T, PAPER>(P1, Q1, lg1, eps)) - cb) * ipb_d;
    const double w2 = (double(scale * entry_a<T, PAPER>(P2, Q2, lg2, eps)) - c[j]) * inv_p[j];
    out[j] = static_cast<T>(0.5 * (w1 + w2));
  }
}

// log arguments of one requested row all in the normal float range (else the row takes std::log)
D2SM_INLINE bool pass2_row_is_normal_f32(const PassArgs& a, int64_t b, int64_t j0, int64_t j1) {
  const float* p = static_cast<const float*>(a.sp) + b * a.ldp;
  const float* t = static_cast<const float*>(a.st) + b * a.ldt;
  const double ipb = a.inv_p[b], itb = a.inv_t[b];
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t j = j0; j < j1; ++j) {
    const float kp = (p[j] + 1.f) * 0.5f, kt = (t[j] + 1.f) * 0.5f;
    const float x1 = log_arg_f32(kp, kt, ipb, itb, a.eps), x2 = log_arg_f32(kp, kt, a.inv_p[j], a.inv_t[j], a.eps);
    bad |= (x1 >= FLT_MIN) & (x1 <= FLT_MAX) & (x2 >= FLT_MIN) & (x2 <= FLT_MAX) ? 0 : 1;
  }
  return bad == 0;
}

template <typename T, bool PAPER>
D2SM_INLINE void pass2_impl(const PassArgs& a, const int64_t* rows, int64_t n, int64_t j0, int64_t j1, T* out_row) {
  const int64_t b = rows[n];
  if constexpr (std::is_same<T, float>::value) {
    if (pass2_row_is_normal_f32(a, b, j0, j1)) {
      pass2_range<float, PAPER, true>(a, b, j0, j1, out_row);
    } else {
      pass2_range<float, PAPER, false>(a, b, j0, j1, out_row);
    }
  } else {
    pass2_range<T, PAPER, false>(a, b, j0, j1, out_row);
  }
  if (PAPER && b >= j0 && b < j1) out_row[b] = T(0);  // the diagonal is not in the paper's loss
}

FASTLOSS_D2SM_CLONES void pass2_f32_paper(const PassArgs& a, const int64_t* rows, int64_t n, int64_t j0, int64_t j1,
                                          float* out) {
  pass2_impl<float, true>(a, rows, n, j0, j1, out);
}
FASTLOSS_D2SM_CLONES void pass2_f32_pkt(const PassArgs& a, const int64_t* rows, int64_t n, int64_t j0, int64_t j1,
                                        float* out) {
  pass2_impl<float, false>(a, rows, n, j0, j1, out);
}

template <typename T>
void pass1(const PassArgs& a, bool paper, int64_t begin, int64_t end) {
  if constexpr (std::is_same<T, float>::value) {
    paper ? pass1_f32_paper(a, begin, end) : pass1_f32_pkt(a, begin, end);
  } else {
    paper ? pass1_impl<T, true>(a, begin, end) : pass1_impl<T, false>(a, begin, end);
  }
}

template <typename T>
void pass2(const PassArgs& a, bool paper, const int64_t* rows, int64_t n, int64_t j0, int64_t j1, T* out) {
  if constexpr (std::is_same<T, float>::value) {
    paper ? pass2_f32_paper(a, rows, n, j0, j1, out) : pass2_f32_pkt(a, rows, n, j0, j1, out);
  } else {
    paper ? pass2_impl<T, true>(a, rows, n, j0, j1, out) : pass2_impl<T, false>(a, rows, n, j0, j1, out);
  }
}

at::Tensor unit_row_stride(const at::Tensor& x) { return x.stride(1) == 1 ? x : x.contiguous(); }

}  // namespace

// sp, st [q, q] (float32 or float64, one dtype; any row stride), dots_p, dots_t [q] float64,
// rows [N] int64 in [0, q). Returns
//   loss       0-dim, the D2SM KL of `paper` (else pkt) mode, scale as in the header
//   grad_rows  [N, q], grad_rows[n, j] = dL/dG'_bj + dL/dG'_jb with b = rows[n]
std::vector<at::Tensor> d2sm_forward(const at::Tensor& sp_in, const at::Tensor& st_in, const at::Tensor& dots_p_in,
                                     const at::Tensor& dots_t_in, const at::Tensor& rows_in, bool paper, double eps) {
  TORCH_CHECK(sp_in.device().is_cpu() && st_in.device().is_cpu(), "d2sm_forward (cpu): tensors must be on the CPU");
  TORCH_CHECK(sp_in.dim() == 2 && sp_in.size(0) == sp_in.size(1), "d2sm_forward (cpu): sp must be [q, q], got ",
              sp_in.sizes());
  TORCH_CHECK(st_in.sizes() == sp_in.sizes(), "d2sm_forward (cpu): sp and st shapes differ: ", sp_in.sizes(), " vs ",
              st_in.sizes());
  const auto dtype = sp_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "d2sm_forward (cpu): sp must be float32 or float64, got ",
              dtype);
  TORCH_CHECK(st_in.scalar_type() == dtype, "d2sm_forward (cpu): sp and st dtypes differ");
  TORCH_CHECK(dots_p_in.scalar_type() == at::kDouble && dots_t_in.scalar_type() == at::kDouble,
              "d2sm_forward (cpu): dots_p and dots_t must be float64");
  const int64_t q = sp_in.size(0);
  TORCH_CHECK(q >= 2, "d2sm_forward (cpu): needs at least 2 rows, got q=", q);
  TORCH_CHECK(dots_p_in.numel() == q && dots_t_in.numel() == q, "d2sm_forward (cpu): dots_p and dots_t must have q=", q,
              " entries");
  TORCH_CHECK(rows_in.scalar_type() == at::kLong && rows_in.dim() == 1, "d2sm_forward (cpu): rows must be 1-D int64");
  const at::Tensor sp = unit_row_stride(sp_in), st = unit_row_stride(st_in);
  const at::Tensor dots_p = dots_p_in.contiguous(), dots_t = dots_t_in.contiguous(), rows = rows_in.contiguous();
  const int64_t N = rows.numel();
  const int64_t* rows_ptr = rows.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(rows_ptr[n] >= 0 && rows_ptr[n] < q, "d2sm_forward (cpu): rows[", n, "]=", rows_ptr[n],
                " is out of [0, ", q, ")");
  }

  auto opts = sp.options();
  at::Tensor inv_p = at::empty({q}, opts.dtype(at::kDouble)), inv_t = at::empty({q}, opts.dtype(at::kDouble));
  at::Tensor c = at::empty({q}, opts.dtype(at::kDouble));  // [q] per row, float64: 1/R'_i, 1/R_i, c_i
  at::Tensor row_loss = at::empty({q}, opts.dtype(at::kDouble));                                       // [q]
  at::Tensor grad_rows = at::empty({N, q}, opts);                                                      // [N, q]

  AT_DISPATCH_FLOATING_TYPES(dtype, "d2sm_forward_cpu", [&] {
    PassArgs a{sp.data_ptr(), st.data_ptr(), sp.stride(0), st.stride(0), dots_p.data_ptr(), dots_t.data_ptr(),
               q, eps, inv_p.data_ptr<double>(), inv_t.data_ptr<double>(), c.data_ptr<double>(),
               row_loss.data_ptr<double>()};
    const int64_t grain = std::max<int64_t>(1, 32768 / q);  // ~32K entries a thread
    at::parallel_for(0, q, grain, [&](int64_t begin, int64_t end) { pass1<scalar_t>(a, paper, begin, end); });
    if (N > 0) {
      // (row, block of columns) tasks so that a handful of requested rows still spreads over the threads
      constexpr int64_t kBlock = 1024;
      const int64_t blocks = (q + kBlock - 1) / kBlock;
      scalar_t* out = grad_rows.data_ptr<scalar_t>();
      const int64_t task_grain = std::max<int64_t>(1, 32768 / std::min(q, kBlock));  // ~32K entries a thread
      at::parallel_for(0, N * blocks, task_grain, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t n = task / blocks, j0 = (task % blocks) * kBlock;
          pass2<scalar_t>(a, paper, rows_ptr, n, j0, std::min(q, j0 + kBlock), out + n * q);
        }
      });
    }
  });
  double total = 0.0;  // rows in order: the same loss for any thread count
  const double* rl = row_loss.data_ptr<double>();
  for (int64_t i = 0; i < q; ++i) total += rl[i];
  return {at::scalar_tensor(total, opts.dtype(at::kDouble)).to(dtype), grad_rows};
}

// The queue's skinny products. A call multiplies its N (about 16) new rows with the whole set,
// and its N gradient rows back. Each thread runs one single-threaded at::mm (calls inside
// at::parallel_for are serial) on its own share: one side of the queue each in
// d2sm_queue_insert, a slice of D in d2sm_rows_combine. One fork per product, the two sides'
// products side by side, and no gemm-internal synchronization.

namespace {

// One side of d2sm_queue_insert: the bank rows, the products, the cache and its row sums.
template <typename T>
void insert_side(const at::Tensor& rows, const int64_t* slots, int64_t q, const at::Tensor& bank,
                       const at::Tensor& sim, const at::Tensor& rowsum) {
  const int64_t N = rows.size(0), D = rows.size(1), size = sim.size(0);
  const T* new_ptr = rows.data_ptr<T>();
  T* bank_ptr = bank.data_ptr<T>();
  T* sim_ptr = sim.data_ptr<T>();
  double* rs = rowsum.data_ptr<double>();
  for (int64_t n = 0; n < N; ++n) std::memcpy(bank_ptr + slots[n] * D, new_ptr + n * D, sizeof(T) * D);
  const at::Tensor m = at::mm(rows, bank.narrow(0, 0, q).t()).contiguous();  // [N, q] new rows x set
  const T* m_ptr = m.data_ptr<T>();
  // Every other row's sum changes by its new entries minus the old ones in the new rows' columns.
  for (int64_t j = 0; j < q; ++j) {
    double delta = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      delta += static_cast<double>(m_ptr[n * q + j]) - static_cast<double>(sim_ptr[j * size + slots[n]]);
      sim_ptr[j * size + slots[n]] = m_ptr[n * q + j];
    }
    rs[j] += delta;
  }
  for (int64_t n = 0; n < N; ++n) {  // the new rows; between two new rows one product serves both entries
    const int64_t b = slots[n];
    std::memcpy(sim_ptr + b * size, m_ptr + n * q, sizeof(T) * q);
    for (int64_t k = 0; k < N; ++k) {
      const T v = n <= k ? m_ptr[n * q + slots[k]] : m_ptr[k * q + b];
      sim_ptr[b * size + slots[k]] = v;
    }
  }
  for (int64_t n = 0; n < N; ++n) {  // and their own sums, afresh
    const T* row = sim_ptr + slots[n] * size;
    double total = 0.0;
    for (int64_t j = 0; j < q; ++j) total += static_cast<double>(row[j]);
    rs[slots[n]] = total;
  }
}

}  // namespace

// Inserts the N new normalized rows of both sides of a D2SMQueue into `slots` (distinct, in
// [0, q)) and updates, in place: bank [S, D] (the queue), sim [S, S] (the similarity cache: rows
// and columns `slots`, entries [0, q)) and rowsum [S] float64 (each row's sum of its cached
// similarities over the set: a running sum kept per row, O(N q) a call). The caller reads the
// row sums from rowsum itself.
void d2sm_queue_insert(const at::Tensor& new_p, const at::Tensor& new_t, const at::Tensor& slots_in,
                                          int64_t q, const at::Tensor& bank_p, const at::Tensor& bank_t,
                                          const at::Tensor& sim_p, const at::Tensor& sim_t,
                                          const at::Tensor& rowsum_p, const at::Tensor& rowsum_t) {
  const at::Tensor* banks[2] = {&bank_p, &bank_t};
  const at::Tensor* sims[2] = {&sim_p, &sim_t};
  const at::Tensor* rowsums[2] = {&rowsum_p, &rowsum_t};
  const at::Tensor rows[2] = {new_p.contiguous(), new_t.contiguous()};
  const auto dtype = bank_p.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "d2sm_queue_insert (cpu): the queue must be float32 or "
              "float64, got ", dtype);
  const int64_t size = bank_p.size(0), D = bank_p.size(1), N = new_p.size(0);
  for (int side = 0; side < 2; ++side) {
    TORCH_CHECK(banks[side]->is_contiguous() && banks[side]->dim() == 2 && banks[side]->size(0) == size &&
                    banks[side]->size(1) == D && banks[side]->scalar_type() == dtype,
                "d2sm_queue_insert (cpu): the banks must be contiguous [S, D] of one dtype");
    TORCH_CHECK(sims[side]->is_contiguous() && sims[side]->dim() == 2 && sims[side]->size(0) == size &&
                    sims[side]->size(1) == size && sims[side]->scalar_type() == dtype,
                "d2sm_queue_insert (cpu): the caches must be contiguous [S, S] of the banks' dtype");
    TORCH_CHECK(rowsums[side]->is_contiguous() && rowsums[side]->numel() == size &&
                    rowsums[side]->scalar_type() == at::kDouble,
                "d2sm_queue_insert (cpu): the row sums must be contiguous float64 [S]");
    TORCH_CHECK(rows[side].dim() == 2 && rows[side].size(0) == N && rows[side].size(1) == D &&
                    rows[side].scalar_type() == dtype,
                "d2sm_queue_insert (cpu): the new rows must be [N, D] of the banks' dtype");
  }
  TORCH_CHECK(q >= 1 && q <= size && N <= q, "d2sm_queue_insert (cpu): need N <= q <= S, got N=", N, ", q=", q,
              ", S=", size);
  const at::Tensor slots = slots_in.contiguous();
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == N, "d2sm_queue_insert (cpu): slots must be [N] int64");
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(slot_ptr[n] >= 0 && slot_ptr[n] < q, "d2sm_queue_insert (cpu): slots[", n, "]=", slot_ptr[n],
                " is out of [0, ", q, ")");
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "d2sm_queue_insert_cpu", [&] {
    at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
      for (int64_t side = begin; side < end; ++side) {
        insert_side<scalar_t>(rows[side], slot_ptr, q, *banks[side], *sims[side], *rowsums[side]);
      }
    });
  });
}

// g [N, q] x bank [q, D] -> g bank [N, D]: the gradient of the new rows from grad_rows.
at::Tensor d2sm_rows_combine(const at::Tensor& g, const at::Tensor& bank) {
  TORCH_CHECK(g.dim() == 2 && bank.dim() == 2 && g.size(1) == bank.size(0), "d2sm_rows_combine (cpu): bad shapes ",
              g.sizes(), " and ", bank.sizes());
  const int64_t D = bank.size(1);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), D / 256));
  if (threads == 1) return at::mm(g, bank);
  std::vector<at::Tensor> parts(threads);  // [N, D / threads] each
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t d0 = D * t / threads, d1 = D * (t + 1) / threads;
      parts[t] = at::mm(g, bank.narrow(1, d0, d1 - d0));
    }
  });
  return at::cat(parts, 1);
}

// Row normalization f_hat = f / (||f||_2 + eps), entries that come out NaN set to 0, and its
// backward, as autograd differentiates that formula (fastloss/d2sm.py, _normalize):
//   g_raw = 0 where f / (n + eps) is NaN, else g
//   grad_f = g_raw / (n + eps) - (g_raw . f) / (n + eps)^2 * f / n     (the last term 0 where n = 0)
// Both in float64 for float32 rows: the norm's squares, the division (a denormal or huge norm
// rounded to float32 would lose its digits) and the backward's second term, written as
//   grad_f = (g_raw - (g_raw . u) u n / (n + eps)) / (n + eps),   u = f / n,
// whose factors stay near 1 however large or small the row (f / n^3 formed directly underflows:
// 1e-60 for a float32 row of 1e30, 0 in float32). float64 rows whose largest magnitude is out
// of [2^-450, 2^450] are scaled by a power of two for the norm (exact), as in _normalize.
// Rows in parallel only past ~256K elements: a queue call's few rows stay on the calling thread
// (a parallel region costs more than the work, and much more when the cores are busy).
namespace {
template <typename T>
double row_norm(const T* x, int64_t D) {
  double top = 0.0;
  if constexpr (std::is_same<T, double>::value) {
    for (int64_t d = 0; d < D; ++d) top = std::max(top, std::fabs(x[d]));  // NaN: not counted
  }
  int e = 0;
  if (top > 0x1p450 || (top > 0.0 && top < 0x1p-450)) {
    if (std::isinf(top)) return top;  // an infinite entry: an infinite norm, as autograd's formula
    std::frexp(top, &e);
  }
  double ss = 0.0;
  if (e == 0) {
    for (int64_t d = 0; d < D; ++d) ss += double(x[d]) * double(x[d]);
    return std::sqrt(ss);
  }
  for (int64_t d = 0; d < D; ++d) {
    const double v = std::ldexp(double(x[d]), -e);
    ss += v * v;
  }
  return std::ldexp(std::sqrt(ss), e);
}

template <typename T>
void normalize_rows(const T* f, T* out, double* norms, int64_t rows, int64_t D, double eps) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = f + r * D;
      const double n = row_norm(x, D);
      norms[r] = n;
      const double den = n + eps;
      T* o = out + r * D;
      for (int64_t d = 0; d < D; ++d) {
        const T v = static_cast<T>(double(x[d]) / den);
        o[d] = std::isnan(v) ? T(0) : v;
      }
    }
  });
}

template <typename T>
void normalize_rows_backward(const T* g, const T* f, const double* norms, T* out, int64_t rows, int64_t D,
                             double eps) {
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = f + r * D;
      const T* gr = g + r * D;
      const double n = norms[r];
      const double den = n + eps;
      double s = 0.0;  // g_raw . u
      if (n != 0.0) {
        for (int64_t d = 0; d < D; ++d) {
          const double graw = std::isnan(double(x[d]) / den) ? 0.0 : double(gr[d]);
          s += graw * (double(x[d]) / n);
        }
      }
      const double k = n == 0.0 ? 0.0 : s * (n / den);
      T* o = out + r * D;
      for (int64_t d = 0; d < D; ++d) {
        const double graw = std::isnan(double(x[d]) / den) ? 0.0 : double(gr[d]);
        const double u = n == 0.0 ? 0.0 : double(x[d]) / n;
        o[d] = static_cast<T>((graw - k * u) / den);
      }
    }
  });
}
}  // namespace

// f [R, D] float32 / float64 -> {f_hat [R, D], norms [R] float64}
std::vector<at::Tensor> d2sm_normalize(const at::Tensor& f_in, double eps) {
  TORCH_CHECK(f_in.dim() == 2, "d2sm_normalize (cpu): f must be [rows, D], got ", f_in.sizes());
  const at::Tensor f = f_in.contiguous();
  at::Tensor out = at::empty_like(f);
  at::Tensor norms = at::empty({f.size(0)}, f.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "d2sm_normalize_cpu", [&] {
    normalize_rows<scalar_t>(f.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), norms.data_ptr<double>(), f.size(0),
                             f.size(1), eps);
  });
  return {out, norms};
}

// grad [R, D] of f_hat, f [R, D] and norms [R] from d2sm_normalize -> grad of f [R, D]
at::Tensor d2sm_normalize_backward(const at::Tensor& grad_in, const at::Tensor& f_in, const at::Tensor& norms_in,
                                   double eps) {
  TORCH_CHECK(f_in.dim() == 2 && grad_in.sizes() == f_in.sizes() && norms_in.numel() == f_in.size(0) &&
                  norms_in.scalar_type() == at::kDouble,
              "d2sm_normalize_backward (cpu): bad shapes ", grad_in.sizes(), ", ", f_in.sizes(), ", ", norms_in.sizes());
  const at::Tensor f = f_in.contiguous(), grad = grad_in.to(f.scalar_type()).contiguous(), norms = norms_in.contiguous();
  at::Tensor out = at::empty_like(f);
  AT_DISPATCH_FLOATING_TYPES(f.scalar_type(), "d2sm_normalize_backward_cpu", [&] {
    normalize_rows_backward<scalar_t>(grad.data_ptr<scalar_t>(), f.data_ptr<scalar_t>(), norms.data_ptr<double>(),
                                      out.data_ptr<scalar_t>(), f.size(0), f.size(1), eps);
  });
  return out;
}

void register_d2sm(pybind11::module& m) {
  m.def("d2sm_normalize", &d2sm_normalize, "D2SM row normalization on the CPU", pybind11::arg("f"),
        pybind11::arg("eps"));
  m.def("d2sm_normalize_backward", &d2sm_normalize_backward, "backward of d2sm_normalize", pybind11::arg("grad"),
        pybind11::arg("f"), pybind11::arg("norms"), pybind11::arg("eps"));
  m.def("d2sm_queue_insert", &d2sm_queue_insert, "D2SMQueue: insert new rows, update the cache in place",
        pybind11::arg("new_p"), pybind11::arg("new_t"), pybind11::arg("slots"), pybind11::arg("q"),
        pybind11::arg("bank_p"), pybind11::arg("bank_t"), pybind11::arg("sim_p"), pybind11::arg("sim_t"),
        pybind11::arg("rowsum_p"), pybind11::arg("rowsum_t"));
  m.def("d2sm_rows_combine", &d2sm_rows_combine, "g @ bank, one single-threaded mm per thread on a slice of D",
        pybind11::arg("g"), pybind11::arg("bank"));
  m.def("d2sm_forward", &d2sm_forward, "D2SM fused pass over the similarity matrices on the CPU", pybind11::arg("sp"),
        pybind11::arg("st"), pybind11::arg("dots_p"), pybind11::arg("dots_t"), pybind11::arg("rows"),
        pybind11::arg("paper"), pybind11::arg("eps"));
}

}  // namespace fastloss
