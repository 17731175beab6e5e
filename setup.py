"""Builds the optional compiled extensions of tiled VAE decoding (csrc/): tile gather and blend in
``xar_infer._vae_tiling`` (C++, CPU) and ``xar_infer._vae_tiling_cuda`` (CUDA). Metadata lives in
pyproject.toml.

Both need torch at build time, so install with ``pip install --no-build-isolation -e .`` after
installing torch (``.ci/run`` does). The CUDA one is built when torch has CUDA and nvcc is found
(CUDA_HOME), or when FORCE_CUDA=1; TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") picks the GPU architectures,
by default those of the visible GPUs. Each extension that cannot be built is skipped with a warning:
installation still succeeds, the PyTorch implementation runs instead, and
``xar_infer.vae_tiling_backend(device)`` says which one is active.
"""

import os
import sys

from setuptools import setup


def warn(message):
    print(f"xar_infer: {message}", file=sys.stderr)


ext_modules, cmdclass = [], {}
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    warn("torch is not importable at build time; skipping the compiled VAE-tiling extensions "
         "(use pip install --no-build-isolation after installing torch to build them)")
else:
    def is_cuda(ext):
        return any(source.endswith(".cu") for source in ext.sources)

    class OptionalBuildExtension(BuildExtension):
        """A failed build is a warning, never a failed install."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # torch's checks before any build: compiler ABI, CUDA version, ...
                cpu_only = [ext for ext in self.extensions if not is_cuda(ext)]
                if len(cpu_only) == len(self.extensions):
                    warn(f"cannot build the extensions ({exc}); the PyTorch fallback will be used instead")
                    return
                warn(f"cannot build the CUDA extension ({exc}); building the CPU one only")
                self.extensions = cpu_only
                self.build_extensions()

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing, headers or CUDA versions mismatched, ...
                warn(f"could not build {ext.name} ({exc}); the PyTorch fallback will be used instead")

    # No FMA contraction: the loops must round exactly like the PyTorch reference (the CUDA kernels
    # also use explicitly rounded intrinsics; --fmad=false covers anything else).
    ext_modules = [CppExtension("xar_infer._vae_tiling", ["csrc/vae_tiling.cpp"], depends=["csrc/vae_tiling.h"],
                                extra_compile_args=["-O3", "-ffp-contract=off"])]
    force_cuda = os.environ.get("FORCE_CUDA") == "1"
    if torch.version.cuda is None:
        if force_cuda:
            warn("FORCE_CUDA=1, but this torch was built without CUDA; building the CPU extension only")
    elif CUDA_HOME is None and not force_cuda:
        warn("torch has CUDA but nvcc was not found (set CUDA_HOME); building the CPU extension only")
    else:
        try:
            ext_modules.append(CUDAExtension(
                "xar_infer._vae_tiling_cuda", ["csrc/vae_tiling.cu"], depends=["csrc/vae_tiling.h"],
                extra_compile_args={"cxx": ["-O3", "-ffp-contract=off"], "nvcc": ["-O3", "--fmad=false"]}))
        except OSError as exc:  # no CUDA toolkit found
            warn(f"cannot build the CUDA extension ({exc}); building the CPU one only")
    cmdclass = {"build_ext": OptionalBuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
