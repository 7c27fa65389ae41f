// The pgrpo op library: schemas (TORCH_LIBRARY), shared input checks, and the Python module stub.
// CPU kernels live in basis_change.cpp / project.cpp, CUDA kernels in cuda/*.cu; the fused entry
// point is in svd_grad_project.cpp. Importing pgrpo._C registers torch.ops.pgrpo.*.
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>

#include "pgrpo.h"

extern "C" {
// An empty module: importing it runs the static TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace pgrpo {

static bool is_float_like(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_basis_change(const at::Tensor& G, const at::Tensor& U, const at::Tensor& Vh) {
  TORCH_CHECK_VALUE(G.dim() == 3 && U.dim() == 3 && Vh.dim() == 3,
                    "basis_change: expected G [L,o,i], U [L,o,r], Vh [L,r,i] (3-D each), got G ",
                    G.sizes(), ", U ", U.sizes(), ", Vh ", Vh.sizes());
  TORCH_CHECK_VALUE(G.size(0) == U.size(0) && G.size(0) == Vh.size(0) && G.size(1) == U.size(1) &&
                        G.size(2) == Vh.size(2) && U.size(2) == Vh.size(1),
                    "basis_change: shape mismatch, expected G [L,o,i], U [L,o,r], Vh [L,r,i], got G ",
                    G.sizes(), ", U ", U.sizes(), ", Vh ", Vh.sizes());
  TORCH_CHECK_VALUE(is_float_like(G.scalar_type()),
                    "basis_change: G must have dtype float32, bfloat16 or float16, got ", G.scalar_type());
  TORCH_CHECK_VALUE(U.scalar_type() == G.scalar_type() && Vh.scalar_type() == G.scalar_type(),
                    "basis_change: G, U and Vh must share one dtype, got ", G.scalar_type(), ", ",
                    U.scalar_type(), ", ", Vh.scalar_type());
  TORCH_CHECK_VALUE(U.device() == G.device() && Vh.device() == G.device(),
                    "basis_change: G, U and Vh must be on one device, got ", G.device(), ", ",
                    U.device(), ", ", Vh.device());
}

void check_project_meta(const at::Tensor& g, const at::Tensor& g_offsets, const at::Tensor& v,
                        const at::Tensor& v_offsets, const at::Tensor& ks, double overshoot) {
  TORCH_CHECK_VALUE(g.dim() == 1 && g.scalar_type() == at::kFloat && g.is_contiguous(),
                    "project_: g must be a contiguous 1-D float32 tensor, got ", g.scalar_type(),
                    " with shape ", g.sizes());
  TORCH_CHECK_VALUE(v.dim() == 1 && v.scalar_type() == at::kFloat,
                    "project_: v must be a 1-D float32 tensor, got ", v.scalar_type(), " with shape ",
                    v.sizes());
  for (const at::Tensor* t : {&g_offsets, &v_offsets, &ks}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->scalar_type() == at::kLong,
                      "project_: g_offsets, v_offsets and ks must be 1-D int64 tensors, got ",
                      t->scalar_type(), " with shape ", t->sizes());
  }
  TORCH_CHECK_VALUE(g_offsets.numel() == ks.numel() + 1 && v_offsets.numel() == ks.numel() + 1,
                    "project_: with M = ks.numel() = ", ks.numel(),
                    " modules, g_offsets and v_offsets need M+1 entries, got ", g_offsets.numel(),
                    " and ", v_offsets.numel());
  for (const at::Tensor* t : {&g_offsets, &v, &v_offsets, &ks}) {
    TORCH_CHECK_VALUE(t->device() == g.device(),
                      "project_: all tensors must be on g's device ", g.device(), ", got one on ",
                      t->device());
  }
  TORCH_CHECK_VALUE(std::isfinite(overshoot), "project_: overshoot must be finite, got ", overshoot);
}

void check_project_offsets(const int64_t* go, const int64_t* vo, const int64_t* ks, int64_t M,
                           int64_t R, int64_t P) {
  TORCH_CHECK_VALUE(go[0] == 0 && go[M] == R, "project_: g_offsets must start at 0 and end at g.numel() = ",
                    R, ", got ", go[0], " .. ", go[M]);
  TORCH_CHECK_VALUE(vo[0] == 0 && vo[M] == P, "project_: v_offsets must start at 0 and end at v.numel() = ",
                    P, ", got ", vo[0], " .. ", vo[M]);
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK_VALUE(go[m + 1] >= go[m], "project_: g_offsets must be non-decreasing, but g_offsets[", m + 1,
                      "] = ", go[m + 1], " < g_offsets[", m, "] = ", go[m]);
    TORCH_CHECK_VALUE(ks[m] >= 0, "project_: ks must be >= 0, got ks[", m, "] = ", ks[m]);
  }
  for (int64_t m = 0; m < M; ++m) {
    const int64_t r = go[m + 1] - go[m];
    TORCH_CHECK_VALUE(vo[m + 1] - vo[m] == ks[m] * r, "project_: module ", m, " has k = ", ks[m],
                      " and r = ", r, " so v_offsets[", m + 1, "] - v_offsets[", m, "] must be ", ks[m] * r,
                      ", got ", vo[m + 1] - vo[m]);
  }
}

int64_t basis_chunk_modules(int64_t o, int64_t r, int64_t default_bytes) {
  static const int64_t env_bytes = [] {
    const char* s = std::getenv("PGRPO_BASIS_CHUNK_BYTES");
    return s ? std::atoll(s) : int64_t(0);
  }();
  const int64_t budget = env_bytes > 0 ? env_bytes : default_bytes;
  const int64_t per_module = std::max<int64_t>(1, o * r * static_cast<int64_t>(sizeof(float)));
  return std::max<int64_t>(1, budget / per_module);
}

}  // namespace pgrpo

TORCH_LIBRARY(pgrpo, m) {
  m.def("basis_change(Tensor G, Tensor U, Tensor Vh) -> Tensor");
  m.def("project_(Tensor(a!) g, Tensor g_offsets, Tensor v, Tensor v_offsets, Tensor ks, "
        "float overshoot, bool one_sided) -> Tensor");
  m.def("svd_grad_project(Tensor G, Tensor U, Tensor Vh, Tensor v, Tensor v_offsets, Tensor ks, "
        "float overshoot, bool one_sided) -> (Tensor, Tensor)");
}
