"""Builds the optional compiled extension ``xar_infer._vae_tiling`` (csrc/): tile gather and blend
for tiled VAE decoding. Metadata lives in pyproject.toml.

The extension needs torch at build time, so install with ``pip install --no-build-isolation -e .``
after installing torch (``.ci/run`` does). If torch is missing or the build fails, installation
still succeeds and the PyTorch implementation runs instead (``xar_infer.vae_tiling_backend()``).
"""

import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    print("xar_infer: torch is not importable at build time; skipping the compiled VAE-tiling extension "
          "(use pip install --no-build-isolation after installing torch to build it)", file=sys.stderr)
else:
    class OptionalBuildExtension(BuildExtension):
        """A failed build is a warning, never a failed install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing, headers mismatched, ...
                print(f"xar_infer: could not build {ext.name} ({exc}); the PyTorch fallback will be used",
                      file=sys.stderr)

    # No FMA contraction: the loops must round exactly like the PyTorch reference.
    flags = ["-O3", "-ffp-contract=off"]
    if os.environ.get("FORCE_CUDA") == "1":
        print("xar_infer: the CUDA version of the tiling extension is not written yet; building the CPU one",
              file=sys.stderr)
    ext_modules = [CppExtension("xar_infer._vae_tiling", ["csrc/vae_tiling.cpp"], extra_compile_args=flags)]
    cmdclass = {"build_ext": OptionalBuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
