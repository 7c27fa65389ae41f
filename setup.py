"""Builds the package and its extension ``pgrpo._C`` (csrc/*.cpp, plus csrc/cuda/*.cu for CUDA).

- CUDA sources are compiled when FORCE_CUDA=1, or when FORCE_CUDA is unset and CUDA is usable
  (torch.cuda.is_available() and a toolkit at CUDA_HOME). FORCE_CUDA=0 forces a CPU-only build.
  FORCE_CUDA=1 needs only nvcc, not a GPU (CI compiles the .cu files on CPU machines this way);
  pick the GPU generation with TORCH_CUDA_ARCH_LIST (e.g. "9.0" for H100).
- Install after torch: ``pip install -e . --no-build-isolation``.
- PGRPO_NO_EXT=1 skips the extension entirely (the package then runs on its pure-torch path).
- The module only registers torch.ops.pgrpo.* and uses no CPython API beyond module creation, so it
  is built against the stable ABI (py_limited_api, cp39): one wheel serves every Python >= 3.9.
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def pip_cuda_includes(cuda_home):
    """Headers of the pip-installed CUDA libraries (nvidia/*/include) when the toolkit at CUDA_HOME is a
    minimal one without them (e.g. nvcc + cudart only): torch's CUDA headers include cublas/cusparse."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    import site
    dirs = []
    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    found = [d for d in dirs if os.path.exists(os.path.join(d, "cusparse.h"))][:1]
    # the toolkit's own headers (cuda_runtime.h, ...) must still win, so list CUDA_HOME/include first
    return [os.path.join(cuda_home, "include")] + found if found else []


def extension_modules():
    if os.environ.get("PGRPO_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force = os.environ.get("FORCE_CUDA", "")
    if force == "1":
        use_cuda = True
    elif force == "0":
        use_cuda = False
    else:
        use_cuda = torch.cuda.is_available() and CUDA_HOME is not None
    if use_cuda and CUDA_HOME is None:
        raise SystemExit("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME, e.g. /usr/local/cuda).")

    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    openmp = ["-fopenmp"] if os.name != "nt" else ["/openmp"]
    cxx = ["-O3"] + openmp  # torch adds the C++ standard it needs (C++20 for torch >= 2.10)
    extra = {"cxx": cxx}
    link = {"extra_link_args": ["-fopenmp"] if os.name != "nt" else []}
    if use_cuda:
        cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["cxx"] = cxx + ["-DWITH_CUDA"]
        extra["nvcc"] = ["-O3", "-lineinfo", "-DWITH_CUDA"]
        ext = CUDAExtension("pgrpo._C", cpp + cu, extra_compile_args=extra, py_limited_api=True,
                            include_dirs=pip_cuda_includes(CUDA_HOME), **link)
    else:
        ext = CppExtension("pgrpo._C", cpp, extra_compile_args=extra, py_limited_api=True, **link)
    print(f"pgrpo: building pgrpo._C ({'CPU + CUDA' if use_cuda else 'CPU only'})")
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    name="pgrpo",
    version="0.1.0",
    description="GRPO with gradient projection away from a reward-hack direction, in the SVD basis of each weight.",
    packages=find_packages(include=["pgrpo", "pgrpo.*"]),
    package_data={"pgrpo": ["data/*.jsonl", "data/*.json", "data/substrate/*", "data/substrate/warm/*"]},
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
    entry_points={"console_scripts": ["pgrpo = pgrpo.cli:main"]},
)
