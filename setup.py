# Metadata lives in pyproject.toml. This file stays so that the compiled VAE-tiling extension
# (csrc/) can be added with setuptools' build_ext when it lands.
from setuptools import setup

setup()
