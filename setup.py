"""Build of autolr_fast.

The pure-Python package always installs. The C++ ops (``autolr_fast._C``) are built when a
C++ compiler and torch are present; their CUDA part is switched by ``AUTOLR_FAST_CUDA``:

* ``auto`` (default): build CUDA sources when torch is a CUDA build (``torch.version.cuda``)
  and a CUDA toolkit (nvcc) is found; never decided by ``torch.cuda.is_available()``, so a
  machine without a GPU still compiles them;
* ``1``: require the CUDA build (fail if no toolkit); ``0``: CPU only.

``AUTOLR_FAST_BUILD_EXT=0`` skips the compiled extension altogether.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from setuptools import find_packages, setup

from build_support import cmdclass, extension_modules  # noqa: E402

EXPERIMENTS = ["numpy", "matplotlib", "mnist1d", "scikit-learn"]

setup(
    name="autolr_fast",
    version="0.1.0",
    description="Learned, transferable learning-rate control for PyTorch training loops (MLR-SNet)",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(os.path.dirname(__file__), "README.md"))
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["autolr_fast", "autolr_fast.*", "autolr_experiments", "autolr_experiments.*"])
    + ["autolr_fast.runtime"],
    package_dir={"autolr_fast.runtime": "csrc/runtime"},
    package_data={
        "autolr_fast.controllers": ["weights/*.pt", "weights/*.json"],
        "autolr_experiments": ["weights/*.pt", "weights/*.json"],  # the harness's ablation controllers
        # the C runtime's sources, headers and CMake config: C/C++ trainers build it from here
        "autolr_fast.runtime": ["CMakeLists.txt", "include/*.h", "src/*.cpp", "cmake/*", "examples/*.c",
                                "examples/*.cpp", "bench/*.cpp", "fuzz/*.cpp", "tests/*.cmake", "tests/*.cpp",
                                "tests/*.h", "tests/*.py", "tests/data/*"],
    },
    # The library needs torch and tqdm only; the experiment harness (autolr_experiments: demo,
    # compare, meta-train, ...) needs the "experiments" extra.
    install_requires=["torch>=2.10", "tqdm"],
    extras_require={
        "experiments": EXPERIMENTS,
        "compare": EXPERIMENTS + ["schedulefree", "prodigyopt", "torch-lr-finder", "dog-optimizer", "dadaptation",
                                  "mechanic-pytorch"],
        "test": ["pytest", "pytest-benchmark", "pytest-timeout", "ninja", "ruff"],
        # the framework adapters of autolr_fast.integrations (tested with these versions)
        "integrations": ["lightning>=2.6", "transformers>=5.24", "accelerate>=1.15"],
    },
    ext_modules=extension_modules(),
    cmdclass=cmdclass(),
    entry_points={"console_scripts": ["autolr-fast=autolr_fast.__main__:main"]},
)
