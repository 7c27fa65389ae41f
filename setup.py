"""Builds the package and its extension ``pgrpo._C``.

- CUDA sources (csrc/cuda/*.cu) are compiled when FORCE_CUDA=1, or when FORCE_CUDA is unset and CUDA
  is usable (torch.cuda.is_available() and CUDA_HOME found). FORCE_CUDA=0 forces a CPU-only build.
- Install after torch: ``pip install -e . --no-build-isolation``.
- PGRPO_NO_EXT=1 skips the extension entirely (the package then runs on its pure-torch path).
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def extension_modules():
    if os.environ.get("PGRPO_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    force = os.environ.get("FORCE_CUDA")
    if force == "1":
        use_cuda = True
    elif force == "0":
        use_cuda = False
    else:
        use_cuda = torch.cuda.is_available() and CUDA_HOME is not None
    if use_cuda and CUDA_HOME is None:
        raise SystemExit("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME).")

    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    openmp = ["-fopenmp"] if os.name != "nt" else ["/openmp"]
    cxx = ["-O3", "-std=c++17", "-DPy_LIMITED_API=0x03090000"] + openmp
    extra = {"cxx": cxx}
    libs = {"extra_link_args": ["-fopenmp"]}
    if use_cuda:
        cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo", "-DWITH_CUDA"]
        extra["cxx"] = cxx + ["-DWITH_CUDA"]
        ext = CUDAExtension("pgrpo._C", cpp + cu, extra_compile_args=extra, py_limited_api=True, **libs)
    else:
        ext = CppExtension("pgrpo._C", cpp, extra_compile_args=extra, py_limited_api=True, **libs)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    name="pgrpo",
    version="0.1.0",
    description="GRPO with gradient projection away from a reward-hack direction, in the SVD basis of each weight.",
    packages=find_packages(include=["pgrpo", "pgrpo.*"]),
    package_data={"pgrpo": ["data/*.jsonl", "data/*.json"]},
    python_requires=">=3.10",
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
    entry_points={"console_scripts": ["pgrpo = pgrpo.cli:main"]},
)
