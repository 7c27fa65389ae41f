// basis_change on CPU: g[l, j] = sum_a U[l,a,j] * (G_l Vh_l^T)[a,j] = diag(U_l^T G_l Vh_l^T)_j.
// One batched GEMM (MKL/OpenBLAS through ATen) for T = G Vh^T in fp32, then a fused column dot with
// U under OpenMP that never forms U*T or an r x r product. bf16/fp16 inputs are widened to fp32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "pgrpo.h"

namespace pgrpo {

namespace {
constexpr int64_t kCols = 64;  // columns per task: one row segment of U and T is 256 B of fp32

// out[0:n] = sum_a u[a, 0:n] * x[a, 0:n] for one tile of n <= kCols columns (rows strided by r).
// fp32 partial sums over blocks of kRowBlock rows, folded into fp64: as accurate as a pairwise sum.
constexpr int64_t kRowBlock = 64;

template <typename scalar_t>
PGRPO_SIMD_CLONES static void column_dot_tile(const scalar_t* u, const float* x, float* out, int64_t o,
                                              int64_t r, int64_t n) {
  double total[kCols] = {0.0};
  for (int64_t a0 = 0; a0 < o; a0 += kRowBlock) {
    float acc[kCols] = {0.f};
    const int64_t a1 = std::min(o, a0 + kRowBlock);
    for (int64_t a = a0; a < a1; ++a, u += r, x += r) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) acc[j] += static_cast<float>(u[j]) * x[j];
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) total[j] += acc[j];
  }
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(total[j]);
}

template <typename scalar_t>
void column_dot(const scalar_t* U, const float* T, float* out, int64_t L, int64_t o, int64_t r) {
  const int64_t tiles = (r + kCols - 1) / kCols;
  const int64_t tasks = L * tiles;
  const bool parallel = tasks > 1 && L * o * r >= (int64_t(1) << 18);  // small stacks: skip the thread wake-up
#pragma omp parallel for schedule(static) num_threads(at::get_num_threads()) if (parallel)
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t l = t / tiles, j0 = (t % tiles) * kCols;
    column_dot_tile<scalar_t>(U + l * o * r + j0, T + l * o * r + j0, out + l * r + j0, o, r,
                              std::min(kCols, r - j0));
  }
}
}  // namespace

at::Tensor basis_change_cpu(const at::Tensor& G, const at::Tensor& U, const at::Tensor& Vh) {
  check_basis_change(G, U, Vh);
  TORCH_CHECK_VALUE(G.device().is_cpu(), "basis_change_cpu: expected CPU tensors, got ", G.device());
  const int64_t L = G.size(0), o = G.size(1), r = U.size(2);
  at::Tensor out = at::empty({L, r}, G.options().dtype(at::kFloat));
  if (L == 0 || r == 0) return out;
  if (o == 0 || G.size(2) == 0) return out.zero_();
  // T = G Vh^T, [n,o,r] fp32, for n modules at a time (bounded scratch); the transposed view of Vh
  // goes straight to BLAS, no copy.
  const int64_t chunk = basis_chunk_modules(o, r, int64_t(256) << 20);
  at::Tensor Uc = U.contiguous();
  for (int64_t l0 = 0; l0 < L; l0 += chunk) {
    const int64_t n = std::min(chunk, L - l0);
    at::Tensor T = at::bmm(G.narrow(0, l0, n).to(at::kFloat), Vh.narrow(0, l0, n).to(at::kFloat).transpose(1, 2))
                       .contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, Uc.scalar_type(), "basis_change_cpu", [&] {
      column_dot<scalar_t>(Uc.const_data_ptr<scalar_t>() + l0 * o * r, T.const_data_ptr<float>(),
                           out.mutable_data_ptr<float>() + l0 * r, n, o, r);
    });
  }
  return out;
}

}  // namespace pgrpo

TORCH_LIBRARY_IMPL(pgrpo, CPU, m) { m.impl("basis_change", &pgrpo::basis_change_cpu); }
