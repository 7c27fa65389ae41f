// Shared input checks for the pgrpo ops. Every op validates shapes, dtypes, devices and offsets
// before touching memory, so a wrong call raises a clear ValueError instead of corrupting g.
#pragma once
#include <ATen/ATen.h>

// Hot CPU loops are compiled for AVX-512, AVX2+FMA and the baseline ISA; the loader picks the best
// one for the machine (GCC/Clang function multi-versioning), so a wheel or image built on one x86
// machine runs on any other.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define PGRPO_SIMD_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define PGRPO_SIMD_CLONES
#endif

namespace pgrpo {

// G [L,o,i], U [L,o,r], Vh [L,r,i]; same floating dtype (fp32/bf16/fp16) and device.
void check_basis_change(const at::Tensor& G, const at::Tensor& U, const at::Tensor& Vh);

// Metadata checks (no device sync): ranks, dtypes, devices, contiguity, lengths, overshoot.
void check_project_meta(const at::Tensor& g, const at::Tensor& g_offsets, const at::Tensor& v,
                        const at::Tensor& v_offsets, const at::Tensor& ks, double overshoot);

// Value checks on host copies of the index arrays (M modules, g has R and v has P elements).
void check_project_offsets(const int64_t* go, const int64_t* vo, const int64_t* ks, int64_t M,
                           int64_t R, int64_t P);

// How many modules of a [L,o,r] stack basis_change handles per GEMM so that its fp32 T = G Vh^T
// scratch stays under default_bytes (env PGRPO_BASIS_CHUNK_BYTES overrides; read once).
int64_t basis_chunk_modules(int64_t o, int64_t r, int64_t default_bytes);

at::Tensor basis_change_cpu(const at::Tensor& G, const at::Tensor& U, const at::Tensor& Vh);
at::Tensor project_cpu_(at::Tensor& g, const at::Tensor& g_offsets, const at::Tensor& v,
                        const at::Tensor& v_offsets, const at::Tensor& ks, double overshoot,
                        bool one_sided);

}  // namespace pgrpo
