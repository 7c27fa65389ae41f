// project_ on CPU: every module's slice of the flat g is projected against its own v_hack block in
// one call, OpenMP over modules (dynamic schedule: r and k differ per module, k = 0 passes through).
// Two parallel sweeps: (1) norms of g per module, which doubles as the non-finite check so that a bad
// g raises before anything is written; (2) c = V g (relu if one-sided), d = overshoot * c V,
// g -= d, ||d||, touching each V block twice while it is hot in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "pgrpo.h"

namespace pgrpo {

constexpr int64_t kParallelMinElems = int64_t(1) << 20;  // v + 2 g floats; below this, one thread

PGRPO_SIMD_CLONES
static double sum_squares(const float* x, int64_t r) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < r; ++j) s += static_cast<double>(x[j]) * x[j];
  return s;
}

// One module: c = V x (relu if one-sided, times overshoot), d = c V, x -= d; returns ||d||^2.
// The [k, r] block of V (k * r * 4 bytes, e.g. 15 KB) is read twice, the second time from L1/L2.
// Rows go four at a time: four independent SIMD accumulators (the dot products are otherwise
// bound by FMA latency) and one load of x / one update of d per four rows.
// Compiled for AVX-512 / AVX2+FMA / baseline and picked at load time (the build uses no -march).
PGRPO_SIMD_CLONES
static double project_one(float* __restrict__ x, const float* __restrict__ V, int64_t k, int64_t r, float os,
                          bool one_sided, float* __restrict__ c, float* __restrict__ d) {
  int64_t i = 0;
  for (; i + 4 <= k; i += 4) {
    const float *V0 = V + i * r, *V1 = V0 + r, *V2 = V1 + r, *V3 = V2 + r;
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t j = 0; j < r; ++j) {
      const float xj = x[j];
      s0 += V0[j] * xj;
      s1 += V1[j] * xj;
      s2 += V2[j] * xj;
      s3 += V3[j] * xj;
    }
    c[i] = s0, c[i + 1] = s1, c[i + 2] = s2, c[i + 3] = s3;
  }
  for (; i < k; ++i) {
    const float* Vi = V + i * r;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < r; ++j) s += Vi[j] * x[j];
    c[i] = s;
  }
  for (i = 0; i < k; ++i) c[i] = os * (one_sided && c[i] < 0.f ? 0.f : c[i]);

  std::fill(d, d + r, 0.f);
  for (i = 0; i + 4 <= k; i += 4) {
    const float c0 = c[i], c1 = c[i + 1], c2 = c[i + 2], c3 = c[i + 3];
    if (c0 == 0.f && c1 == 0.f && c2 == 0.f && c3 == 0.f) continue;  // one-sided: nothing along these rows
    const float *V0 = V + i * r, *V1 = V0 + r, *V2 = V1 + r, *V3 = V2 + r;
#pragma omp simd
    for (int64_t j = 0; j < r; ++j) d[j] += c0 * V0[j] + c1 * V1[j] + c2 * V2[j] + c3 * V3[j];
  }
  for (; i < k; ++i) {
    const float ci = c[i];
    if (ci == 0.f) continue;
    const float* Vi = V + i * r;
#pragma omp simd
    for (int64_t j = 0; j < r; ++j) d[j] += ci * Vi[j];
  }
  double rem = 0.0;
#pragma omp simd reduction(+ : rem)
  for (int64_t j = 0; j < r; ++j) {
    x[j] -= d[j];
    rem += static_cast<double>(d[j]) * d[j];
  }
  return rem;
}

at::Tensor project_cpu_(at::Tensor& g, const at::Tensor& g_offsets, const at::Tensor& v,
                        const at::Tensor& v_offsets, const at::Tensor& ks, double overshoot,
                        bool one_sided) {
  check_project_meta(g, g_offsets, v, v_offsets, ks, overshoot);
  TORCH_CHECK_VALUE(g.device().is_cpu(), "project_cpu_: expected CPU tensors, got ", g.device());
  const int64_t M = ks.numel();
  at::Tensor goc = g_offsets.contiguous(), voc = v_offsets.contiguous(), kc = ks.contiguous();
  at::Tensor vc = v.contiguous();
  const int64_t* go = goc.const_data_ptr<int64_t>();
  const int64_t* vo = voc.const_data_ptr<int64_t>();
  const int64_t* kk = kc.const_data_ptr<int64_t>();
  check_project_offsets(go, vo, kk, M, g.numel(), vc.numel());

  at::Tensor stats = at::zeros({M, 2}, g.options());
  if (M == 0) return stats;
  float* gp = g.mutable_data_ptr<float>();
  const float* vp = vc.const_data_ptr<float>();
  float* st = stats.mutable_data_ptr<float>();
  // Threads only pay off for big stacks: a parallel region costs a wake-up of the other threads,
  // which on a busy (shared, oversubscribed) machine can be a whole scheduler slice, while the whole
  // projection of e.g. 56 modules x r=320 x k=12 takes ~50 us on one core.
  const bool parallel = M > 1 && vc.numel() + 2 * g.numel() >= kParallelMinElems;
  const int nthreads = parallel ? at::get_num_threads() : 1;

  // Sweep 1: ||g_m|| in double (no overflow), and the non-finite check, before any write.
  int64_t bad = -1;
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads) if (parallel)
  for (int64_t m = 0; m < M; ++m) {
    const double s = sum_squares(gp + go[m], go[m + 1] - go[m]);
    if (!std::isfinite(s)) {
#pragma omp critical
      if (bad < 0 || m < bad) bad = m;
    }
    st[2 * m] = static_cast<float>(std::sqrt(s));
  }
  TORCH_CHECK_VALUE(bad < 0, "project_: g contains non-finite values (NaN or Inf) in module ", bad,
                    " (g[", go[bad], ":", go[bad + 1], "]); refusing to project");

  // Sweep 2: the projection itself.
  const float os = static_cast<float>(overshoot);
#pragma omp parallel num_threads(nthreads) if (parallel)
  {
    std::vector<float> c, d;  // per-thread scratch: coefficients [k] and removed component [r]
#pragma omp for schedule(dynamic, 1)
    for (int64_t m = 0; m < M; ++m) {
      const int64_t k = kk[m], r = go[m + 1] - go[m];
      if (k == 0 || r == 0) continue;
      if (static_cast<int64_t>(c.size()) < k) c.resize(k);
      if (static_cast<int64_t>(d.size()) < r) d.resize(r);
      const double rem = project_one(gp + go[m], vp + vo[m], k, r, os, one_sided, c.data(), d.data());
      st[2 * m + 1] = static_cast<float>(std::sqrt(rem));
    }
  }
  return stats;
}

}  // namespace pgrpo

TORCH_LIBRARY_IMPL(pgrpo, CPU, m) { m.impl("project_", &pgrpo::project_cpu_); }
