"""Ahead-of-time build of the fused operator (rot_kernel._C):

    pip install --no-build-isolation -e .

The CUDA kernel is built when torch has CUDA and nvcc is found; otherwise CPU only.
Without this step, `import rot_kernel` compiles the operator just in time instead.
"""
import os
import runpy

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

CSRC = "rot_kernel/csrc"
# The same flags as the just-in-time build in rot_kernel/__init__.py, which says why.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "-fmad=false"]
WITH_CUDA = torch.version.cuda is not None and CUDA_HOME is not None

fingerprint = runpy.run_path("rot_kernel/_sources.py")["fingerprint"]


class Build(BuildExtension):
    """Also writes the sources' fingerprint beside each module built (rot_kernel/_C.sources),
    where it is built and where it runs from (the source tree, for --inplace and editable
    installs): `import rot_kernel` warns when rot_kernel/csrc has changed since."""
    def run(self):
        super().run()  # (with --inplace, setuptools builds in build/ and then copies the module)
        in_source = self.inplace or getattr(self, "editable_mode", False)
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            folders = {os.path.dirname(self.get_ext_fullpath(ext.name))}
            if in_source:
                folders.add(build_py.get_package_dir(ext.name.rpartition(".")[0]))
            for folder in folders:
                with open(os.path.join(folder, "_C.sources"), "w") as f:
                    f.write(fingerprint(CSRC) + "\n")


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
    cmdclass={"build_ext": Build},
    python_requires=">=3.10",  # torch 2.13 (requirements.txt) has no wheels for 3.9
)
