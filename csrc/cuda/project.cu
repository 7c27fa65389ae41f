// project_ on CUDA: ONE launch for all modules, one block per module (ragged r, per-module k).
// Per block: ||g_m|| (block reduction) -> c = V g with one warp per row of V (shuffle reductions,
// c kept in shared memory, relu + overshoot applied) -> each thread owns columns j and computes
// d_j = sum_i c_i V[i,j], g_j -= d_j, accumulating ||d||^2 -> stats[m] = (||g||, ||d||).
// The index arrays are validated on the host first (one small device->host copy that also carries
// the non-finite flag of g), so the kernel never reads or writes out of bounds.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../pgrpo.h"

namespace pgrpo {

namespace {
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Sum over the block; the result is valid in thread 0. `red` holds kWarps floats.
__device__ __forceinline__ float block_sum(float x, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  x = warp_sum(x);
  __syncthreads();  // red may still be read from a previous reduction
  if (lane == 0) red[warp] = x;
  __syncthreads();
  float s = 0.f;
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += red[w];
  }
  return s;
}

__global__ void project_kernel(float* __restrict__ g, const int64_t* __restrict__ go,
                               const float* __restrict__ v, const int64_t* __restrict__ vo,
                               const int64_t* __restrict__ ks, float overshoot, bool one_sided,
                               float* __restrict__ stats) {
  extern __shared__ float c[];  // [k] coefficients of this module
  __shared__ float red[kWarps];
  const int64_t m = blockIdx.x;
  const int64_t g0 = go[m], r = go[m + 1] - g0, k = ks[m];
  float* x = g + g0;
  const float* V = v + vo[m];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  float s = 0.f;
  for (int64_t j = threadIdx.x; j < r; j += kThreads) s += x[j] * x[j];
  s = block_sum(s, red);
  if (threadIdx.x == 0) {
    stats[2 * m] = sqrtf(s);
    stats[2 * m + 1] = 0.f;
  }
  if (k == 0 || r == 0) return;  // uniform across the block

  for (int64_t i = warp; i < k; i += kWarps) {
    const float* Vi = V + i * r;
    float d = 0.f;
    for (int64_t j = lane; j < r; j += 32) d += Vi[j] * x[j];
    d = warp_sum(d);
    if (lane == 0) c[i] = overshoot * ((one_sided && d < 0.f) ? 0.f : d);
  }
  __syncthreads();

  float rem = 0.f;
  for (int64_t j = threadIdx.x; j < r; j += kThreads) {
    float d = 0.f;
    for (int64_t i = 0; i < k; ++i) d += c[i] * V[i * r + j];
    x[j] -= d;
    rem += d * d;
  }
  rem = block_sum(rem, red);
  if (threadIdx.x == 0) stats[2 * m + 1] = sqrtf(rem);
}
}  // namespace

at::Tensor project_cuda_(at::Tensor& g, const at::Tensor& g_offsets, const at::Tensor& v,
                         const at::Tensor& v_offsets, const at::Tensor& ks, double overshoot,
                         bool one_sided) {
  check_project_meta(g, g_offsets, v, v_offsets, ks, overshoot);
  TORCH_CHECK_VALUE(g.is_cuda(), "project_cuda_: expected CUDA tensors, got ", g.device());
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t M = ks.numel();
  at::Tensor goc = g_offsets.contiguous(), voc = v_offsets.contiguous(), kc = ks.contiguous();
  at::Tensor vc = v.contiguous();

  // One device->host copy: [g_offsets | v_offsets | ks | all(isfinite(g))].
  at::Tensor finite = at::isfinite(g).all().to(at::kLong).view({1});
  at::Tensor host = at::cat({goc, voc, kc, finite}).cpu();
  const int64_t* h = host.const_data_ptr<int64_t>();
  check_project_offsets(h, h + (M + 1), h + 2 * (M + 1), M, g.numel(), vc.numel());
  TORCH_CHECK_VALUE(h[3 * M + 2] == 1, "project_: g contains non-finite values (NaN or Inf); refusing to project");
  const int64_t kmax = M > 0 ? *std::max_element(h + 2 * (M + 1), h + 3 * M + 2) : 0;
  TORCH_CHECK_VALUE(kmax <= 8192, "project_cuda_: k <= 8192 rows of v_hack per module, got ", kmax);

  at::Tensor stats = at::empty({M, 2}, g.options());
  if (M == 0) return stats;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // same as at::cuda::getCurrentCUDAStream()
  const size_t smem = static_cast<size_t>(std::max<int64_t>(kmax, 1)) * sizeof(float);
  project_kernel<<<static_cast<unsigned>(M), kThreads, smem, stream>>>(
      g.mutable_data_ptr<float>(), goc.const_data_ptr<int64_t>(), vc.const_data_ptr<float>(),
      voc.const_data_ptr<int64_t>(), kc.const_data_ptr<int64_t>(), static_cast<float>(overshoot),
      one_sided, stats.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return stats;
}

}  // namespace pgrpo

TORCH_LIBRARY_IMPL(pgrpo, CUDA, m) { m.impl("project_", &pgrpo::project_cuda_); }
