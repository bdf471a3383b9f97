"""Ahead-of-time build of the fused operator (rot_kernel._C):

    pip install --no-build-isolation -e .

The CUDA kernel is built when torch has CUDA and nvcc is found; otherwise CPU only.
Without this step, `import rot_kernel` compiles the operator just in time instead.
"""
import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

CSRC = "rot_kernel/csrc"
# The same flags as the just-in-time build in rot_kernel/__init__.py, which says why.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "-fmad=false"]
WITH_CUDA = torch.version.cuda is not None and CUDA_HOME is not None

Extension = CUDAExtension if WITH_CUDA else CppExtension
sources = [f"{CSRC}/rotation_batch.cpp", f"{CSRC}/emulated.cpp"] + ([f"{CSRC}/rotation_batch_cuda.cu"] if WITH_CUDA else [])

setup(
    name="rotnet",
    version="0.1.0",
    description="RotNet (ICLR 2018) with a fused rotation-batch operator",
    packages=["rot_kernel"],
    package_data={"rot_kernel": ["csrc/*"]},
    ext_modules=[Extension("rot_kernel._C", sources,
                           extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
                           extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.9",
)
