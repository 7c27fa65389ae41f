// basis_change on CUDA: T = G Vh^T through cuBLAS (ATen bmm; bf16/fp16 inputs accumulate and write
// fp32 via bmm's out_dtype overload), then one custom kernel for the column dot
// g[l,j] = sum_a U[l,a,j] T[l,a,j]: a block owns 32 adjacent columns of one module, its 8 warps
// stride over rows (coalesced 32-wide reads of U and T) and reduce through shared memory.
// Everything runs on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../pgrpo.h"

namespace pgrpo {

namespace {
constexpr int kTileCols = 32;
constexpr int kRowSlices = 8;

template <typename scalar_t>
__global__ void column_dot_kernel(const scalar_t* __restrict__ U, const float* __restrict__ T,
                                  float* __restrict__ out, int64_t o, int64_t r) {
  const int64_t l = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTileCols + threadIdx.x;
  const scalar_t* Ul = U + l * o * r;
  const float* Tl = T + l * o * r;
  float acc = 0.f;
  if (j < r) {
    for (int64_t a = threadIdx.y; a < o; a += kRowSlices) acc += static_cast<float>(Ul[a * r + j]) * Tl[a * r + j];
  }
  __shared__ float red[kRowSlices][kTileCols + 1];
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && j < r) {
    float s = 0.f;
#pragma unroll
    for (int y = 0; y < kRowSlices; ++y) s += red[y][threadIdx.x];
    out[l * r + j] = s;
  }
}
}  // namespace

at::Tensor basis_change_cuda(const at::Tensor& G, const at::Tensor& U, const at::Tensor& Vh) {
  check_basis_change(G, U, Vh);
  TORCH_CHECK_VALUE(G.is_cuda(), "basis_change_cuda: expected CUDA tensors, got ", G.device());
  const c10::cuda::CUDAGuard guard(G.device());
  const int64_t L = G.size(0), o = G.size(1), r = U.size(2);
  at::Tensor out = at::empty({L, r}, G.options().dtype(at::kFloat));
  if (L == 0 || r == 0) return out;
  if (o == 0 || G.size(2) == 0) return out.zero_();
  // fp32 T = G Vh^T for up to `chunk` modules at a time: at most ~1 GiB of scratch even for the
  // 9728 x 2560 gate/up stacks of a 4B model, and GEMMs that still fill the GPU.
  const int64_t chunk = std::min<int64_t>(65535, basis_chunk_modules(o, r, int64_t(1) << 30));
  at::Tensor Uc = U.contiguous();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();  // same as at::cuda::getCurrentCUDAStream()
  for (int64_t l0 = 0; l0 < L; l0 += chunk) {
    const int64_t n = std::min(chunk, L - l0);
    const at::Tensor Gn = G.narrow(0, l0, n), VhTn = Vh.narrow(0, l0, n).transpose(1, 2);
    at::Tensor T = G.scalar_type() == at::kFloat ? at::bmm(Gn, VhTn) : at::bmm(Gn, VhTn, at::kFloat);
    T = T.contiguous();
    const dim3 grid(static_cast<unsigned>((r + kTileCols - 1) / kTileCols), static_cast<unsigned>(n));
    const dim3 block(kTileCols, kRowSlices);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, Uc.scalar_type(), "basis_change_cuda", [&] {
      column_dot_kernel<scalar_t><<<grid, block, 0, stream>>>(Uc.const_data_ptr<scalar_t>() + l0 * o * r,
                                                              T.const_data_ptr<float>(),
                                                              out.mutable_data_ptr<float>() + l0 * r, o, r);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace pgrpo

TORCH_LIBRARY_IMPL(pgrpo, CUDA, m) { m.impl("basis_change", &pgrpo::basis_change_cuda); }
