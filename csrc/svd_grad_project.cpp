// svd_grad_project: both stages for one uniform stack of L modules (the merged path's hot call).
// Device-generic: it calls pgrpo::basis_change then pgrpo::project_ through the dispatcher, so the
// CPU build runs the OpenMP kernels and the CUDA build the CUDA kernels, with no host round trip
// between the stages beyond project_'s own offset check.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "pgrpo.h"

namespace pgrpo {

std::tuple<at::Tensor, at::Tensor> svd_grad_project(const at::Tensor& G, const at::Tensor& U,
                                                    const at::Tensor& Vh, const at::Tensor& v,
                                                    const at::Tensor& v_offsets, const at::Tensor& ks,
                                                    double overshoot, bool one_sided) {
  check_basis_change(G, U, Vh);
  TORCH_CHECK_VALUE(ks.dim() == 1 && ks.numel() == G.size(0),
                    "svd_grad_project: ks must hold one k per module (L = ", G.size(0), "), got shape ",
                    ks.sizes());
  static auto basis = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("pgrpo::basis_change", "")
                          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  static auto project = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("pgrpo::project_", "")
                            .typed<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, double, bool)>();
  at::Tensor g = basis.call(G, U, Vh);  // [L, r] fp32, contiguous
  const int64_t L = g.size(0), r = g.size(1);
  at::Tensor flat = g.view({-1});
  at::Tensor g_offsets = at::arange(0, (L + 1) * r, std::max<int64_t>(r, 1), g.options().dtype(at::kLong));
  if (r == 0) g_offsets = at::zeros({L + 1}, g.options().dtype(at::kLong));
  at::Tensor stats = project.call(flat, g_offsets, v, v_offsets, ks, overshoot, one_sided);
  return {g, stats};
}

}  // namespace pgrpo

TORCH_LIBRARY_IMPL(pgrpo, CPU, m) { m.impl("svd_grad_project", &pgrpo::svd_grad_project); }
#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(pgrpo, CUDA, m) { m.impl("svd_grad_project", &pgrpo::svd_grad_project); }
#endif
