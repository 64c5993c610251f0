// CPU kernel of the per-decode-step AutoSteer work (autosteer::steer_step_cpu).
//
// Semantics: exactly autosteer/runtime/reference_op.py::steer_step_reference. For each
// sequence b of the batch:
//   x_b  = probe_hidden[probe_rows[b]]                                  (gather)
//          several layers (probe_extra, probe_sum): parts = [probe_hidden, *probe_extra], k = n / probe_sum,
//          x_b = concat_l sum_{j < probe_sum} fp32(parts[l * probe_sum + j][probe_rows[b]])  (k * H values)
//   p_b  = sigmoid(w2 . relu(W1 x_b + b1) + b2)   in fp32, if probe_mask[b]   (W1 [F, k * H])
//   latched[b] |= p_b > tau_b (a NaN p_b latches only when nan_latches), tau_b = row_tau[b]
//                             when the optional fp32 [B] row_tau is given, else the scalar tau
//   stacked probes: W1 [P, F, H], b1 [P, F], w2 [P, F], b2 [P] with row_probe [B] (int32/int64,
//                   values in [0, P)): row b is scored by probe row_probe[b]
//   if latched[b]:  logits[b] = (1 + eps) * logits[b] + eps * U (Bt g_b),
//                   g_b = head_hidden[head_rows[b]], fp32 math, cast back.
// Rows that are not latched are never written.
//   state_rows (optional int32/int64 [B]): probe_mask, latched, p_out, row_tau and row_probe are
//                   per-request tables of any length S, read and written at entry state_rows[b]
//                   (a serving store's slot tables); entries outside [0, S) raise.
//
// Work split (three phases, each an at::parallel_for):
//   1. probe + latch, parallel over groups of 4 probed rows (each W1 row is loaded once per group;
//      with stacked probes, the probed rows are grouped per probe and each probe runs in turn);
//   2. t_i = Bt g_i (r floats) for every latched row i, parallel over (row, k) pairs;
//   3. blend, parallel over blocks of kVB vocabulary entries. A block of U (kVB x r) is
//      converted to fp32 and transposed once into a small buffer (or, for fp32 U stored
//      [r, V] and passed as a transposed view, read in place), then reused by every latched
//      row (four rows at a time in registers), so U is read from memory once per call however
//      many rows are latched, and the inner loops run over contiguous vocabulary entries
//      (vectorised by the compiler). Each output element is computed by one fixed sequence of
//      operations, so the result does not depend on the thread count.
// Inputs may be fp32 / fp16 / bf16 independently (probe_hidden, head_hidden, logits, U, Bt)
// with arbitrary strides; the probe weights are fp32. The hot functions are compiled for
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2/FMA/F16C) and baseline, selected at load time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define AS_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AS_MULTIVERSION
#endif
#define AS_INLINE inline __attribute__((always_inline))

namespace autosteer {
namespace {

// ---------------------------------------------------------------- element types
enum class Kind : int { F32 = 0, F16 = 1, BF16 = 2 };

struct bf16_t {
  uint16_t x;
};

#if defined(__FLT16_MAX__)
using half_t = _Float16;
AS_INLINE float to_f(half_t v) { return static_cast<float>(v); }
AS_INLINE void put(half_t* p, float v) { *p = static_cast<half_t>(v); }
#else
using half_t = c10::Half;
AS_INLINE float to_f(half_t v) { return static_cast<float>(v); }
AS_INLINE void put(half_t* p, float v) { *p = static_cast<half_t>(v); }
#endif
static_assert(sizeof(half_t) == 2, "half storage must be 2 bytes");

AS_INLINE float to_f(float v) { return v; }
AS_INLINE void put(float* p, float v) { *p = v; }
AS_INLINE float to_f(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
// Round to nearest even, NaN -> canonical quiet NaN: the same rounding as c10::BFloat16.
AS_INLINE void put(bf16_t* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  p->x = (v != v) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

#define AS_DISPATCH_KIND(KIND, T, ...)          \
  switch (KIND) {                               \
    case Kind::F32: {                           \
      using T = float;                          \
      __VA_ARGS__;                              \
      break;                                    \
    }                                           \
    case Kind::F16: {                           \
      using T = half_t;                         \
      __VA_ARGS__;                              \
      break;                                    \
    }                                           \
    default: {                                  \
      using T = bf16_t;                         \
      __VA_ARGS__;                              \
      break;                                    \
    }                                           \
  }

Kind float_kind(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return Kind::F32;
    case at::kHalf:
      return Kind::F16;
    case at::kBFloat16:
      return Kind::BF16;
    default:
      TORCH_CHECK(false, "steer_step_cpu: ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// n elements of a strided row -> contiguous fp32.
template <typename T>
AS_INLINE void load_row(const T* src, int64_t stride, int64_t n, float* dst) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_f(src[i * stride]);
  }
}

AS_INLINE float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out[q] = dot(W + q * ldw, x, n) for q < 4: four independent accumulators share the loads of x.
AS_INLINE void dot4(const float* W, int64_t ldw, const float* x, int64_t n, float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  const float *w0 = W, *w1 = W + ldw, *w2 = W + 2 * ldw, *w3 = W + 3 * ldw;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    s0 += w0[i] * xi;
    s1 += w1[i] * xi;
    s2 += w2[i] * xi;
    s3 += w3[i] * xi;
  }
  out[0] = s0;
  out[1] = s1;
  out[2] = s2;
  out[3] = s3;
}

// out[q] = dot(W + q * ldw, x, n) for q < m.
AS_INLINE void matvec(const float* W, int64_t ldw, const float* x, int64_t n, int64_t m, float* out) {
  int64_t q = 0;
  for (; q + 4 <= m; q += 4) dot4(W + q * ldw, ldw, x, n, out + q);
  for (; q < m; ++q) out[q] = dot(W + q * ldw, x, n);
}

AS_INLINE int64_t load_index(const void* p, bool is64, int64_t stride, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i * stride] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i * stride]);
}

// ---------------------------------------------------------------- phase 1: probe + latch
constexpr int kMaxParts = 8;  // probe input tensors: at most 4 layers x (hidden, residual)

struct ProbeArgs {
  const void* ph[kMaxParts];  // the probe's input tensors [N, H], all of kind ph_kind: parts[0] = probe_hidden
  Kind ph_kind;
  int64_t ph_s0[kMaxParts], ph_s1[kMaxParts];
  int n_parts, probe_sum;  // layer l = sum of parts[l * probe_sum + j], j < probe_sum
  const void* prow;
  bool prow64;
  int64_t prow_s;
  const bool* pmask;
  int64_t pmask_s;
  bool* latched;
  int64_t lat_s;
  float* p_out;
  int64_t pout_s;
  const int64_t* st;  // [B] entry of the per-request tensors of each row (the row itself without state_rows)
  const float* W1;  // [F, D] contiguous, D = k * H
  const float* b1;  // [F] contiguous
  const float* w2;  // [F] contiguous
  float b2;
  int64_t H, F, D;  // D = k * H: the probe's input width
  float tau;
  const float* row_tau;  // [B] per-row thresholds replacing tau, or nullptr
  int64_t rtau_s;
  bool nan_latches;
};

// out[q * ldo + f] = dot(X + q * ldx, W + f * ldw, n) for q, f < 4: a 4 x 4 register block,
// so each row of W1 is loaded once per four probed rows.
AS_INLINE void dot4x4(const float* W, int64_t ldw, const float* X, int64_t ldx, int64_t n, float* out, int64_t ldo) {
  float s00 = 0.f, s01 = 0.f, s02 = 0.f, s03 = 0.f, s10 = 0.f, s11 = 0.f, s12 = 0.f, s13 = 0.f;
  float s20 = 0.f, s21 = 0.f, s22 = 0.f, s23 = 0.f, s30 = 0.f, s31 = 0.f, s32 = 0.f, s33 = 0.f;
  const float *w0 = W, *w1 = W + ldw, *w2 = W + 2 * ldw, *w3 = W + 3 * ldw;
  const float *x0 = X, *x1 = X + ldx, *x2 = X + 2 * ldx, *x3 = X + 3 * ldx;
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
  for (int64_t i = 0; i < n; ++i) {
    const float a0 = w0[i], a1 = w1[i], a2 = w2[i], a3 = w3[i];
    const float c0 = x0[i], c1 = x1[i], c2 = x2[i], c3 = x3[i];
    s00 += c0 * a0; s01 += c0 * a1; s02 += c0 * a2; s03 += c0 * a3;
    s10 += c1 * a0; s11 += c1 * a1; s12 += c1 * a2; s13 += c1 * a3;
    s20 += c2 * a0; s21 += c2 * a1; s22 += c2 * a2; s23 += c2 * a3;
    s30 += c3 * a0; s31 += c3 * a1; s32 += c3 * a2; s33 += c3 * a3;
  }
  out[0] = s00; out[1] = s01; out[2] = s02; out[3] = s03;
  out[ldo] = s10; out[ldo + 1] = s11; out[ldo + 2] = s12; out[ldo + 3] = s13;
  out[2 * ldo] = s20; out[2 * ldo + 1] = s21; out[2 * ldo + 2] = s22; out[2 * ldo + 3] = s23;
  out[3 * ldo] = s30; out[3 * ldo + 1] = s31; out[3 * ldo + 2] = s32; out[3 * ldo + 3] = s33;
}

constexpr int64_t kRB = 4;  // probed rows per work item

// Work item g = probed rows items[4g .. 4g+3] (the batch rows with probe_mask set).
template <typename T>
AS_INLINE void probe_groups_t(const ProbeArgs& a, const int64_t* items, int64_t n_items, int64_t g0, int64_t g1) {
  const int64_t H = a.H, F = a.F, D = a.D;
  std::vector<float> X(static_cast<size_t>(kRB * std::max<int64_t>(D, 1)));
  std::vector<float> hid(static_cast<size_t>(kRB * std::max<int64_t>(F, 1)));
  std::vector<float> tmp(static_cast<size_t>(a.probe_sum > 1 ? std::max<int64_t>(H, 1) : 0));
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t q0 = g * kRB, m = std::min<int64_t>(kRB, n_items - q0);
    for (int64_t q = 0; q < kRB; ++q) {  // a short last group repeats its last row (results unused)
      const int64_t b = items[q0 + std::min(q, m - 1)];
      const int64_t row = load_index(a.prow, a.prow64, a.prow_s, b);
      for (int i = 0; i < a.n_parts; ++i) {  // layer l = i / probe_sum: its parts summed in fp32, in order
        const T* src = static_cast<const T*>(a.ph[i]) + row * a.ph_s0[i];
        float* dst = X.data() + q * D + (i / a.probe_sum) * H;
        if (i % a.probe_sum == 0) {
          load_row(src, a.ph_s1[i], H, dst);
        } else {
          load_row(src, a.ph_s1[i], H, tmp.data());
          for (int64_t h = 0; h < H; ++h) dst[h] += tmp[h];
        }
      }
    }
    int64_t f = 0;
    for (; f + 4 <= F; f += 4) dot4x4(a.W1 + f * D, D, X.data(), D, D, hid.data() + f, F);
    for (; f < F; ++f)
      for (int64_t q = 0; q < kRB; ++q) hid[q * F + f] = dot(a.W1 + f * D, X.data() + q * D, D);
    for (int64_t q = 0; q < m; ++q) {
      const int64_t b = items[q0 + q];
      float s = 0.f;
      for (int64_t k = 0; k < F; ++k) {
        float h = hid[q * F + k] + a.b1[k];
        h = (h < 0.f) ? 0.f : h;  // relu that keeps NaN, like torch.relu
        s += h * a.w2[k];
      }
      s += a.b2;
      const float p = 1.f / (1.f + std::exp(-s));
      const int64_t e = a.st[b];
      a.p_out[e * a.pout_s] = p;
      const float tau = a.row_tau ? a.row_tau[e * a.rtau_s] : a.tau;
      const bool fire = (p > tau) || (a.nan_latches && std::isnan(p));
      if (fire) a.latched[e * a.lat_s] = true;
    }
  }
}

AS_MULTIVERSION
void probe_range(const ProbeArgs& a, const int64_t* items, int64_t n_items, int64_t g0, int64_t g1) {
  AS_DISPATCH_KIND(a.ph_kind, T, probe_groups_t<T>(a, items, n_items, g0, g1));
}

// ---------------------------------------------------------------- phase 2: t = Bt g
struct ProjArgs {
  const float* G;   // [nl, H] fp32, the gathered head rows
  const float* Bt;  // [r, H] fp32 contiguous
  float* T;         // [nl, r]
  int64_t H, r;
};

// Work item q = (row i, group of 4 consecutive k): T[i, k:k+4] = Bt[k:k+4] . g_i.
AS_MULTIVERSION
void proj_range(const ProjArgs& a, int64_t q0, int64_t q1) {
  const int64_t groups = (a.r + 3) / 4;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t i = q / groups, k = (q % groups) * 4;
    matvec(a.Bt + k * a.H, a.H, a.G + i * a.H, a.H, std::min<int64_t>(4, a.r - k), a.T + i * a.r + k);
  }
}

template <typename T>
AS_INLINE void gather_rows_t(const void* hh, int64_t s0, int64_t s1, const int64_t* rows, int64_t n, int64_t H,
                             float* G) {
  const T* base = static_cast<const T*>(hh);
  for (int64_t i = 0; i < n; ++i) load_row(base + rows[i] * s0, s1, H, G + i * H);
}

AS_MULTIVERSION
void gather_rows(const void* hh, Kind kind, int64_t s0, int64_t s1, const int64_t* rows, int64_t n, int64_t H,
                 float* G) {
  AS_DISPATCH_KIND(kind, T, gather_rows_t<T>(hh, s0, s1, rows, n, H, G));
}

// ---------------------------------------------------------------- phase 3: blend
constexpr int64_t kVB = 64;  // vocabulary entries per block
constexpr int64_t kKC = 64;  // rank entries per chunk of the transposed U buffer

struct BlendArgs {
  void* logits;
  Kind lg_kind;
  int64_t lg_s0, lg_s1;
  const void* U;
  Kind u_kind;
  int64_t u_s0, u_s1;
  const float* T;       // [nl, r]
  const int64_t* rows;  // latched batch rows, [nl]
  int64_t nl, V, r;
  float one_plus_eps, eps;
};

// UT[kk * kVB + j] = U[v0 + j, k0 + kk] as fp32 (a transposed block of U).
template <typename TU>
AS_INLINE void fill_ut(const TU* U, int64_t s0, int64_t s1, int64_t v0, int64_t nv, int64_t k0, int64_t kc,
                       float* UT) {
  if (s0 == 1) {  // U stored transposed ([r, V] contiguous): plain row copies
    for (int64_t kk = 0; kk < kc; ++kk) {
      const TU* src = U + v0 + (k0 + kk) * s1;
      for (int64_t j = 0; j < nv; ++j) UT[kk * kVB + j] = to_f(src[j]);
    }
  } else if (s1 == 1) {
    for (int64_t j = 0; j < nv; ++j) {
      const TU* src = U + (v0 + j) * s0 + k0;
      for (int64_t kk = 0; kk < kc; ++kk) UT[kk * kVB + j] = to_f(src[kk]);
    }
  } else {
    for (int64_t kk = 0; kk < kc; ++kk) {
      const TU* src = U + v0 * s0 + (k0 + kk) * s1;
      for (int64_t j = 0; j < nv; ++j) UT[kk * kVB + j] = to_f(src[j * s0]);
    }
  }
}

// Contiguous [V, R] U with a compile-time rank: the compiler turns the transpose into
// vector loads and permutes instead of scalar moves.
template <int R, typename TU>
AS_INLINE void fill_ut_fixed(const TU* U, int64_t v0, float* UT) {
  const TU* src = U + v0 * R;
  for (int64_t j = 0; j < kVB; ++j)
    for (int kk = 0; kk < R; ++kk) UT[kk * kVB + j] = to_f(src[j * R + kk]);
}

// acc[q * kVB + j] += sum_kk UT[kk * ldu + j] * T[q * ldt + kk] for q < 4 (four rows share the U loads).
AS_INLINE void axpy_rows4(const float* UT, int64_t ldu, int64_t kc, const float* T, int64_t ldt, float* acc) {
  float s0[kVB] = {0.f}, s1[kVB] = {0.f}, s2[kVB] = {0.f}, s3[kVB] = {0.f};
  for (int64_t kk = 0; kk < kc; ++kk) {
    const float* u = UT + kk * ldu;
    const float a0 = T[kk], a1 = T[ldt + kk], a2 = T[2 * ldt + kk], a3 = T[3 * ldt + kk];
#pragma omp simd
    for (int64_t j = 0; j < kVB; ++j) {
      s0[j] += u[j] * a0;
      s1[j] += u[j] * a1;
      s2[j] += u[j] * a2;
      s3[j] += u[j] * a3;
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < kVB; ++j) {
    acc[j] += s0[j];
    acc[kVB + j] += s1[j];
    acc[2 * kVB + j] += s2[j];
    acc[3 * kVB + j] += s3[j];
  }
}

AS_INLINE void axpy_row(const float* UT, int64_t ldu, int64_t kc, const float* T, float* acc) {
  float s[kVB] = {0.f};
  for (int64_t kk = 0; kk < kc; ++kk) {
    const float* u = UT + kk * ldu;
    const float a0 = T[kk];
#pragma omp simd
    for (int64_t j = 0; j < kVB; ++j) s[j] += u[j] * a0;
  }
#pragma omp simd
  for (int64_t j = 0; j < kVB; ++j) acc[j] += s[j];
}

template <typename TL>
AS_INLINE void blend_rows_t(const BlendArgs& a, int64_t v0, int64_t nv, const float* acc, float* z) {
  const float ope = a.one_plus_eps, e = a.eps;
  for (int64_t i = 0; i < a.nl; ++i) {
    TL* dst = static_cast<TL*>(a.logits) + a.rows[i] * a.lg_s0 + v0 * a.lg_s1;
    const float* d = acc + i * kVB;
    if (a.lg_s1 == 1) {
      for (int64_t j = 0; j < nv; ++j) put(dst + j, ope * to_f(dst[j]) + e * d[j]);
    } else {
      load_row(dst, a.lg_s1, nv, z);
      for (int64_t j = 0; j < nv; ++j) put(dst + j * a.lg_s1, ope * z[j] + e * d[j]);
    }
  }
}

template <typename TU>
AS_INLINE void blend_blocks_t(const BlendArgs& a, int64_t blk0, int64_t blk1) {
  const int64_t kcmax = std::min<int64_t>(kKC, std::max<int64_t>(a.r, 1));
  std::vector<float> ut(static_cast<size_t>(kcmax * kVB), 0.f);
  std::vector<float> acc(static_cast<size_t>(a.nl * kVB));
  float z[kVB];
  const TU* U = static_cast<const TU*>(a.U);
  const bool packed = a.u_s1 == 1 && a.u_s0 == a.r;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t v0 = blk * kVB;
    const int64_t nv = std::min<int64_t>(kVB, a.V - v0);
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t k0 = 0; k0 < a.r; k0 += kKC) {
      const int64_t kc = std::min<int64_t>(kKC, a.r - k0);
      const float* u = ut.data();
      int64_t ldu = kVB;
      if (std::is_same<TU, float>::value && a.u_s0 == 1 && nv == kVB) {
        // U stored [r, V] (passed as a transposed view): its rows are the transposed block already
        u = reinterpret_cast<const float*>(U) + v0 + k0 * a.u_s1;
        ldu = a.u_s1;
      } else if (packed && nv == kVB && a.r == 16) {
        fill_ut_fixed<16>(U, v0, ut.data());
      } else if (packed && nv == kVB && a.r == 8) {
        fill_ut_fixed<8>(U, v0, ut.data());
      } else if (packed && nv == kVB && a.r == 32) {
        fill_ut_fixed<32>(U, v0, ut.data());
      } else if (packed && nv == kVB && a.r == 64) {
        fill_ut_fixed<64>(U, v0, ut.data());
      } else {
        fill_ut(U, a.u_s0, a.u_s1, v0, nv, k0, kc, ut.data());  // lanes >= nv keep stale values, never stored
      }
      int64_t i = 0;
      for (; i + 4 <= a.nl; i += 4) axpy_rows4(u, ldu, kc, a.T + i * a.r + k0, a.r, acc.data() + i * kVB);
      for (; i < a.nl; ++i) axpy_row(u, ldu, kc, a.T + i * a.r + k0, acc.data() + i * kVB);
    }
    AS_DISPATCH_KIND(a.lg_kind, TL, blend_rows_t<TL>(a, v0, nv, acc.data(), z));
  }
}

AS_MULTIVERSION
void blend_range(const BlendArgs& a, int64_t blk0, int64_t blk1) {
  AS_DISPATCH_KIND(a.u_kind, TU, blend_blocks_t<TU>(a, blk0, blk1));
}

void check_index_tensor(const at::Tensor& t, int64_t B, const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == B, "steer_step_cpu: ", name, " must be 1-D of length B=", B, ", got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "steer_step_cpu: ", name,
              " must be int32 or int64, got ", t.scalar_type());
}

}  // namespace

void steer_step_cpu(const at::Tensor& probe_hidden, const at::Tensor& probe_rows, const at::Tensor& probe_mask,
                    const at::Tensor& head_hidden, const at::Tensor& head_rows, const at::Tensor& logits,
                    const at::Tensor& latched, const at::Tensor& p_out, const at::Tensor& W1, const at::Tensor& b1,
                    const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& U, const at::Tensor& Bt, double tau,
                    double eps, bool nan_latches, const std::optional<at::Tensor>& row_tau,
                    const std::optional<at::Tensor>& row_probe, const std::optional<at::Tensor>& state_rows,
                    const std::optional<std::vector<at::Tensor>>& probe_extra_opt, int64_t probe_sum) {
  const std::vector<at::Tensor> no_extra;
  const std::vector<at::Tensor>& probe_extra = probe_extra_opt.has_value() ? *probe_extra_opt : no_extra;
  // ---- preconditions (shapes, dtypes, devices): all checked before anything is written
  TORCH_CHECK(logits.dim() == 2, "steer_step_cpu: logits must be [B, V], got shape ", logits.sizes());
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK(probe_hidden.dim() == 2 && head_hidden.dim() == 2,
              "steer_step_cpu: probe_hidden and head_hidden must be 2-D [rows, H]");
  const int64_t H = probe_hidden.size(1);
  TORCH_CHECK(head_hidden.size(1) == H, "steer_step_cpu: head_hidden has H=", head_hidden.size(1),
              " but probe_hidden has H=", H);
  // the probe's input tensors: parts = [probe_hidden, *probe_extra], k = n / probe_sum layers of H each
  const int64_t n_parts = 1 + static_cast<int64_t>(probe_extra.size());
  TORCH_CHECK(probe_sum == 1 || probe_sum == 2, "steer_step_cpu: probe_sum must be 1 or 2, got ", probe_sum);
  TORCH_CHECK(n_parts % probe_sum == 0, "steer_step_cpu: probe_sum=", probe_sum,
              " must divide the number of probe input tensors, got ", n_parts, " (probe_hidden + ", n_parts - 1,
              " probe_extra)");
  const int64_t n_layers = n_parts / probe_sum;
  TORCH_CHECK(n_layers <= 4, "steer_step_cpu: the probe reads at most 4 layers, got k=", n_layers, " (probe_hidden + ",
              n_parts - 1, " probe_extra, probe_sum=", probe_sum, ")");
  for (size_t i = 0; i < probe_extra.size(); ++i) {
    const at::Tensor& t = probe_extra[i];
    TORCH_CHECK(t.device().is_cpu(), "steer_step_cpu: probe_extra[", i, "] must be on the CPU, got ", t.device());
    TORCH_CHECK(t.scalar_type() == probe_hidden.scalar_type(), "steer_step_cpu: probe_extra[", i,
                "] must have probe_hidden's dtype ", probe_hidden.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == probe_hidden.size(0) && t.size(1) == H, "steer_step_cpu: probe_extra[", i,
                "] must be [N=", probe_hidden.size(0), ", H=", H, "] like probe_hidden, got ", t.sizes());
  }
  const int64_t D = n_layers * H;  // the probe's input width
  // per-request tensors: one entry per row, or (state_rows) tables of S entries
  const bool by_state = state_rows.has_value();
  if (by_state) {
    TORCH_CHECK(state_rows->device().is_cpu(), "steer_step_cpu: state_rows must be on the CPU");
    check_index_tensor(*state_rows, B, "state_rows");
    TORCH_CHECK(latched.dim() == 1 && latched.size(0) >= 1,
                "steer_step_cpu: with state_rows, latched must be a 1-D table of S >= 1 entries, got ", latched.sizes());
  }
  const int64_t S = by_state ? latched.size(0) : B;
  const bool stacked = row_probe.has_value();
  TORCH_CHECK(W1.dim() == (stacked ? 3 : 2), "steer_step_cpu: W1 must be ",
              stacked ? "[P, F, H] (stacked probes, as row_probe is given)" : "[F, H] (3-D stacked probes need row_probe)",
              ", got ", W1.sizes());
  TORCH_CHECK(W1.size(-1) == D, "steer_step_cpu: W1 takes ", W1.size(-1), " input features but the probe reads k=",
              n_layers, " layer(s) x H=", H, " = ", D, " (probe_hidden + ", n_parts - 1, " probe_extra, probe_sum=",
              probe_sum, "); W1 is ", W1.sizes());
  const int64_t P = stacked ? W1.size(0) : 1;
  const int64_t F = W1.size(-2);
  if (stacked) {
    TORCH_CHECK(P >= 1, "steer_step_cpu: stacked W1 needs at least one probe");
    TORCH_CHECK(b1.dim() == 2 && b1.size(0) == P && b1.size(1) == F && w2.dim() == 2 && w2.size(0) == P &&
                    w2.size(1) == F && b2.dim() == 1 && b2.size(0) == P,
                "steer_step_cpu: stacked probes need b1 and w2 [P=", P, ", F=", F, "] and b2 [P]");
    TORCH_CHECK(row_probe->dim() == 1 && row_probe->size(0) == S &&
                    (row_probe->scalar_type() == at::kInt || row_probe->scalar_type() == at::kLong),
                "steer_step_cpu: row_probe must be int32 or int64 [", by_state ? "S=" : "B=", S, "], got ",
                row_probe->scalar_type(), " ", row_probe->sizes());
    TORCH_CHECK(row_probe->device().is_cpu(), "steer_step_cpu: row_probe must be on the CPU");
  } else {
    TORCH_CHECK(b1.numel() == F && w2.numel() == F && b2.numel() == 1,
                "steer_step_cpu: b1 and w2 must have F=", F, " elements and b2 one");
  }
  TORCH_CHECK(U.dim() == 2 && U.size(0) == V, "steer_step_cpu: U must be [V=", V, ", r], got ", U.sizes());
  const int64_t r = U.size(1);
  TORCH_CHECK(Bt.dim() == 2 && Bt.size(0) == r && Bt.size(1) == H, "steer_step_cpu: Bt must be [r=", r, ", H=", H,
              "], got ", Bt.sizes());
  check_index_tensor(probe_rows, B, "probe_rows");
  check_index_tensor(head_rows, B, "head_rows");
  const char* per = by_state ? "[S] (latched's length, as state_rows is given)" : "[B]";
  TORCH_CHECK(probe_mask.dim() == 1 && probe_mask.size(0) == S && probe_mask.scalar_type() == at::kBool,
              "steer_step_cpu: probe_mask must be bool ", per);
  TORCH_CHECK(latched.dim() == 1 && latched.size(0) == S && latched.scalar_type() == at::kBool,
              "steer_step_cpu: latched must be bool ", per);
  TORCH_CHECK(p_out.dim() == 1 && p_out.size(0) == S && p_out.scalar_type() == at::kFloat,
              "steer_step_cpu: p_out must be float32 ", per);
  for (const at::Tensor* t : {&W1, &b1, &w2, &b2}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "steer_step_cpu: probe weights (W1, b1, w2, b2) must be float32");
  }
  for (const at::Tensor* t : {&probe_hidden, &probe_rows, &probe_mask, &head_hidden, &head_rows, &logits, &latched,
                              &p_out, &W1, &b1, &w2, &b2, &U, &Bt}) {
    TORCH_CHECK(t->device().is_cpu(), "steer_step_cpu: every tensor must be on the CPU");
  }
  if (row_tau.has_value()) {
    const at::Tensor& rt = *row_tau;
    TORCH_CHECK(rt.device().is_cpu(), "steer_step_cpu: row_tau must be on the CPU, got ", rt.device());
    TORCH_CHECK(rt.scalar_type() == at::kFloat, "steer_step_cpu: row_tau must be float32, got ", rt.scalar_type());
    TORCH_CHECK(rt.dim() == 1 && rt.size(0) == S, "steer_step_cpu: row_tau must be 1-D of length ", by_state ? "S=" : "B=", S,
                ", got shape ", rt.sizes());
  }
  const Kind ph_kind = float_kind(probe_hidden, "probe_hidden");
  const Kind hh_kind = float_kind(head_hidden, "head_hidden");
  const Kind lg_kind = float_kind(logits, "logits");
  const Kind u_kind = float_kind(U, "U");
  float_kind(Bt, "Bt");
  if (B == 0) return;

  const bool prow64 = probe_rows.scalar_type() == at::kLong;
  const bool hrow64 = head_rows.scalar_type() == at::kLong;
  const bool* pmask = probe_mask.data_ptr<bool>();
  // Row indices are checked before anything is written (a CPU op may afford it): probe rows
  // where probe_mask is set, head rows where the row is latched or may latch now.
  const bool* latched_in = latched.data_ptr<bool>();
  const int64_t N = probe_hidden.size(0), M = head_hidden.size(0);
  const bool kprobe64 = stacked && row_probe->scalar_type() == at::kLong;
  // st[b]: the entry of row b in the per-request tensors (checked first: every other check reads them)
  std::vector<int64_t> st(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    st[b] = by_state ? load_index(state_rows->data_ptr(), state_rows->scalar_type() == at::kLong,
                                  state_rows->stride(0), b)
                     : b;
    TORCH_CHECK(st[b] >= 0 && st[b] < S, "steer_step_cpu: state_rows[", b, "]=", st[b], " out of range [0, ", S,
                ") (the length of latched)");
  }
  auto probe_of = [&](int64_t b) -> int64_t {
    return stacked ? load_index(row_probe->data_ptr(), kprobe64, row_probe->stride(0), st[b]) : 0;
  };
  for (int64_t b = 0; b < B; ++b) {
    if (pmask[st[b] * probe_mask.stride(0)]) {
      const int64_t pr = load_index(probe_rows.data_ptr(), prow64, probe_rows.stride(0), b);
      TORCH_CHECK(pr >= 0 && pr < N, "steer_step_cpu: probe_rows[", b, "]=", pr, " out of range [0, ", N, ")");
      const int64_t k = probe_of(b);
      TORCH_CHECK(k >= 0 && k < P, "steer_step_cpu: row_probe[", b, "]=", k, " out of range [0, ", P, ")");
    }
    if (pmask[st[b] * probe_mask.stride(0)] || latched_in[st[b] * latched.stride(0)]) {  // rows that may be blended
      const int64_t hr = load_index(head_rows.data_ptr(), hrow64, head_rows.stride(0), b);
      TORCH_CHECK(hr >= 0 && hr < M, "steer_step_cpu: head_rows[", b, "]=", hr, " out of range [0, ", M, ")");
    }
  }

  // ---- phase 1: probe + latch
  {
    const at::Tensor W1c = W1.contiguous(), b1c = b1.contiguous(), w2c = w2.contiguous();
    ProbeArgs a;
    a.ph_kind = ph_kind;
    a.n_parts = static_cast<int>(n_parts);
    a.probe_sum = static_cast<int>(probe_sum);
    for (int64_t i = 0; i < n_parts; ++i) {
      const at::Tensor& t = i == 0 ? probe_hidden : probe_extra[i - 1];
      a.ph[i] = t.data_ptr();
      a.ph_s0[i] = t.stride(0);
      a.ph_s1[i] = t.stride(1);
    }
    a.prow = probe_rows.data_ptr();
    a.prow64 = prow64;
    a.prow_s = probe_rows.stride(0);
    a.pmask = pmask;
    a.pmask_s = probe_mask.stride(0);
    a.latched = latched.data_ptr<bool>();
    a.lat_s = latched.stride(0);
    a.p_out = p_out.data_ptr<float>();
    a.pout_s = p_out.stride(0);
    a.st = st.data();
    const at::Tensor b2c = b2.reshape({-1}).contiguous();
    a.H = H;
    a.F = F;
    a.D = D;
    a.tau = static_cast<float>(tau);  // the reference compares an fp32 tensor with tau cast to fp32
    a.row_tau = row_tau.has_value() ? row_tau->data_ptr<float>() : nullptr;  // any stride (0 included)
    a.rtau_s = row_tau.has_value() ? row_tau->stride(0) : 0;
    a.nan_latches = nan_latches;
    for (int64_t k = 0; k < P; ++k) {  // one pass per probe over the rows it scores
      a.W1 = W1c.data_ptr<float>() + k * F * D;
      a.b1 = b1c.data_ptr<float>() + k * F;
      a.w2 = w2c.data_ptr<float>() + k * F;
      a.b2 = b2c.data_ptr<float>()[k];  // CPU tensor: no device sync
      std::vector<int64_t> items;  // batch rows to probe with probe k
      for (int64_t b = 0; b < B; ++b)
        if (pmask[st[b] * probe_mask.stride(0)] && probe_of(b) == k) items.push_back(b);
      const int64_t n_items = static_cast<int64_t>(items.size());
      if (n_items == 0) continue;
      const int64_t groups = (n_items + kRB - 1) / kRB;
      const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, kRB * F * D));
      at::parallel_for(0, groups, grain,
                       [&](int64_t g0, int64_t g1) { probe_range(a, items.data(), n_items, g0, g1); });
    }
  }

  // ---- which rows are latched now
  std::vector<int64_t> rows, head_idx;
  {
    const bool* lat = latched.data_ptr<bool>();
    for (int64_t b = 0; b < B; ++b) {
      if (lat[st[b] * latched.stride(0)]) {
        rows.push_back(b);
        head_idx.push_back(load_index(head_rows.data_ptr(), hrow64, head_rows.stride(0), b));
      }
    }
  }
  const int64_t nl = static_cast<int64_t>(rows.size());
  if (nl == 0) return;

  // ---- phase 2: t_i = Bt g_i
  std::vector<float> G(static_cast<size_t>(nl * H)), T(static_cast<size_t>(std::max<int64_t>(nl * r, 1)));
  gather_rows(head_hidden.data_ptr(), hh_kind, head_hidden.stride(0), head_hidden.stride(1), head_idx.data(), nl, H,
              G.data());
  {
    const at::Tensor Btf = Bt.to(at::kFloat).contiguous();
    ProjArgs a{G.data(), Btf.data_ptr<float>(), T.data(), H, r};
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, 4 * H));
    at::parallel_for(0, nl * ((r + 3) / 4), grain, [&](int64_t q0, int64_t q1) { proj_range(a, q0, q1); });
  }

  // ---- phase 3: blend
  {
    BlendArgs a;
    a.logits = logits.data_ptr();
    a.lg_kind = lg_kind;
    a.lg_s0 = logits.stride(0);
    a.lg_s1 = logits.stride(1);
    a.U = U.data_ptr();
    a.u_kind = u_kind;
    a.u_s0 = U.stride(0);
    a.u_s1 = U.stride(1);
    a.T = T.data();
    a.rows = rows.data();
    a.nl = nl;
    a.V = V;
    a.r = r;
    // The reference multiplies fp32 tensors by Python scalars, which become fp32 opmath values.
    a.one_plus_eps = static_cast<float>(1.0 + eps);
    a.eps = static_cast<float>(eps);
    const int64_t nblocks = (V + kVB - 1) / kVB;
    const int64_t work = kVB * std::max<int64_t>(1, r) * (nl + 1);
    const int64_t grain = std::max<int64_t>(1, 65536 / work);
    at::parallel_for(0, nblocks, grain, [&](int64_t k0, int64_t k1) { blend_range(a, k0, k1); });
  }
}

// Meta / fake implementation: the op returns nothing and only mutates its out-params in place.
void steer_step_meta(const at::Tensor& probe_hidden, const at::Tensor& probe_rows, const at::Tensor& probe_mask,
                     const at::Tensor& head_hidden, const at::Tensor& head_rows, const at::Tensor& logits,
                     const at::Tensor& latched, const at::Tensor& p_out, const at::Tensor& W1, const at::Tensor& b1,
                     const at::Tensor& w2, const at::Tensor& b2, const at::Tensor& U, const at::Tensor& Bt, double tau,
                     double eps, bool nan_latches, const std::optional<at::Tensor>& row_tau,
                    const std::optional<at::Tensor>& row_probe, const std::optional<at::Tensor>& state_rows,
                     const std::optional<std::vector<at::Tensor>>& probe_extra_opt, int64_t probe_sum) {
  TORCH_CHECK(probe_sum == 1 || probe_sum == 2, "steer_step_cpu: probe_sum must be 1 or 2, got ", probe_sum);
  if (probe_extra_opt.has_value())
    for (const at::Tensor& t : *probe_extra_opt) TORCH_CHECK(t.dim() == 2, "steer_step_cpu: every probe_extra tensor must be 2-D [N, H]");
  TORCH_CHECK(logits.dim() == 2 && probe_hidden.dim() == 2 && head_hidden.dim() == 2 && U.dim() == 2 && Bt.dim() == 2,
              "steer_step_cpu: logits, probe_hidden, head_hidden, U and Bt must be 2-D");
  TORCH_CHECK(latched.dim() == 1 && p_out.dim() == 1 && probe_mask.dim() == 1,
              "steer_step_cpu: latched, p_out and probe_mask must be 1-D");
  TORCH_CHECK(!row_tau.has_value() || row_tau->dim() == 1, "steer_step_cpu: row_tau must be 1-D");
  TORCH_CHECK(!row_probe.has_value() || row_probe->dim() == 1, "steer_step_cpu: row_probe must be 1-D");
  TORCH_CHECK(!state_rows.has_value() || state_rows->dim() == 1, "steer_step_cpu: state_rows must be 1-D");
}

}  // namespace autosteer
