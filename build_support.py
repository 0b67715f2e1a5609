"""Extension build logic for setup.py (kept apart so setup.py stays declarative).

``extension_modules()`` returns the ``autolr_fast._C`` extension (C++ ops in ``csrc/ops``,
plus their CUDA kernels when the CUDA part is switched on), ``cmdclass()`` the build command.

Switches (environment):

* ``AUTOLR_FAST_BUILD_EXT=0``: no compiled extension (pure-Python package).
* ``AUTOLR_FAST_CUDA=auto`` (default): compile the CUDA kernels when torch is a CUDA build
  (``torch.version.cuda``) and a CUDA toolkit is found (never decided by
  ``torch.cuda.is_available()``: a machine without a GPU still compiles them). ``1``: require
  them (the build fails without a toolkit); ``0``: CPU kernels only.

In ``auto`` mode a failing build never fails the install: a failed CUDA build is retried
CPU-only, a failed CPU build leaves the pure-Python fallback, and a warning says why.
The decision logic is pure functions (``decide_cuda``, ``find_cuda_toolkit``) so tests can
exercise it without building anything.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping

ROOT = os.path.dirname(os.path.abspath(__file__))
OPS_DIR = os.path.join("csrc", "ops")
CPU_SOURCES = ["ops_cpu.cpp", "mlrsnet_cpu.cpp", "python_fastpath.cpp"]
CUDA_SOURCES = ["ops_cuda.cu"]
DEFAULT_CUDA_ARCH_LIST = "9.0"
CUDA_MODES = ("auto", "0", "1")


def _warn(msg: str) -> None:
    print(f"WARNING (autolr_fast build): {msg}", file=sys.stderr, flush=True)


def _info(msg: str) -> None:
    print(f"autolr_fast build: {msg}", flush=True)


def is_cuda_toolkit(path: str | None, exists: Callable[[str], bool] = os.path.exists,
                    globber: Callable[[str], list] = glob.glob) -> bool:
    """A usable toolkit root holds ``include/cuda_runtime.h`` and ``lib64/`` (or ``lib/``) ``libcudart*``."""
    if not path:
        return False
    if not exists(os.path.join(path, "include", "cuda_runtime.h")):
        return False
    return any(globber(os.path.join(path, lib, "libcudart*")) for lib in ("lib64", "lib"))


def _toolkit_candidates_from_nvcc(nvcc: str) -> list[str]:
    """Toolkit roots implied by an ``nvcc`` on PATH: its own ``../`` after resolving links, and,
    when it is a wrapper script, the root of every absolute ``.../bin/nvcc`` it mentions."""
    out = []
    real = os.path.realpath(nvcc)
    out.append(os.path.dirname(os.path.dirname(real)))
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
        if not head.startswith(b"\x7fELF"):
            for m in re.finditer(rb"(/[^\s'\"]+)/bin/nvcc", head):
                out.append(os.path.realpath(m.group(1).decode(errors="replace")))
    except OSError:
        pass
    return out


def find_cuda_toolkit(environ: Mapping[str, str] | None = None, which: Callable[[str], str | None] = shutil.which,
                      is_toolkit: Callable[[str | None], bool] = is_cuda_toolkit) -> str | None:
    """The CUDA toolkit root: ``CUDA_HOME``/``CUDA_PATH`` if valid, else derived from ``nvcc`` on
    PATH (following links and wrapper scripts), else ``/usr/local/cuda*``; None if none is usable."""
    environ = os.environ if environ is None else environ
    candidates = [environ.get("CUDA_HOME"), environ.get("CUDA_PATH")]
    nvcc = which("nvcc")
    if nvcc:
        candidates += _toolkit_candidates_from_nvcc(nvcc)
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and is_toolkit(c):
            return c
    return None


def decide_cuda(mode: str, torch_cuda_version: str | None, toolkit: str | None) -> tuple[bool, str]:
    """Whether to compile the CUDA kernels, and why. Raises ``RuntimeError`` for ``mode="1"``
    when it is impossible, ``ValueError`` for an unknown mode. Never looks at the GPU."""
    mode = (mode or "auto").strip().lower()
    if mode not in CUDA_MODES:
        raise ValueError(f"AUTOLR_FAST_CUDA={mode!r} is not one of auto, 0, 1")
    if mode == "0":
        return False, "CUDA kernels off (AUTOLR_FAST_CUDA=0)"
    missing = []
    if not torch_cuda_version:
        missing.append("torch is a CPU-only build (torch.version.cuda is None)")
    if not toolkit:
        missing.append("no CUDA toolkit found (set CUDA_HOME to a dir with include/cuda_runtime.h and "
                       "lib64/libcudart*)")
    if missing:
        reason = "; ".join(missing)
        if mode == "1":
            raise RuntimeError(f"AUTOLR_FAST_CUDA=1 but {reason}")
        return False, f"CUDA kernels skipped: {reason}"
    return True, f"CUDA kernels on (torch CUDA {torch_cuda_version}, toolkit {toolkit})"


def _cuda_mode() -> str:
    return os.environ.get("AUTOLR_FAST_CUDA", "auto").strip().lower()


def _prepare_cuda_env(toolkit: str) -> None:
    """torch does not find libcudart through the nvcc wrapper here: point it at the toolkit."""
    os.environ.setdefault("CUDA_HOME", toolkit)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    import torch.utils.cpp_extension as cpp_ext

    if not cpp_ext.CUDA_HOME:
        cpp_ext.CUDA_HOME = os.environ["CUDA_HOME"]


_CXX_FLAGS = ["-O3", "-g0"]  # no debug info: faster compile and link, smaller .so
_NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def _make_extension(with_cuda: bool):
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = [os.path.join(OPS_DIR, s) for s in CPU_SOURCES]
    # the headers too: without ninja, setuptools rebuilds only when a listed file is newer
    headers = sorted(os.path.join(OPS_DIR, f) for f in os.listdir(os.path.join(ROOT, OPS_DIR))
                     if f.endswith((".h", ".cuh")))
    # The digest of the sources as they are now, recorded beside the extension after the build.
    # It is also on every compile command: a changed source changes the commands, so ninja
    # recompiles everything even where a file's time says it is older than its object (a copy
    # that kept old times), and the record always describes what was compiled.
    _STATE["digest"] = _digest_module().sources_digest(os.path.join(ROOT, OPS_DIR))
    macros = [("AUTOLR_FAST_SOURCES_DIGEST", _STATE["digest"])]
    if with_cuda:
        return CUDAExtension(
            "autolr_fast._C",
            sources + [os.path.join(OPS_DIR, s) for s in CUDA_SOURCES],
            depends=headers,
            extra_compile_args={"cxx": list(_CXX_FLAGS), "nvcc": list(_NVCC_FLAGS)},
            define_macros=[("AUTOLR_FAST_WITH_CUDA", "1"), *macros],
        )
    return CppExtension("autolr_fast._C", sources, depends=headers, extra_compile_args={"cxx": list(_CXX_FLAGS)},
                        define_macros=macros)


# Set by extension_modules(): whether a failure may fall back (auto mode) and why CUDA is on/off.
_STATE = {"strict": False, "cuda": False, "reason": "", "digest": ""}
_FAILED: set[str] = set()  # extensions whose build failed in auto mode (left out of the install)


def extension_modules() -> list:
    if os.environ.get("AUTOLR_FAST_BUILD_EXT", "1") == "0":
        _info("AUTOLR_FAST_BUILD_EXT=0: skipping the C++ extension (pure-Python package)")
        return []
    mode = _cuda_mode()
    try:
        import torch
    except ImportError:
        _warn("torch is not importable at build time: skipping the C++ extension (pure-Python fallback). "
              "Install torch first and build with `pip install --no-build-isolation .`")
        return []
    toolkit = find_cuda_toolkit() if mode != "0" else None
    with_cuda, reason = decide_cuda(mode, torch.version.cuda, toolkit)
    _info(reason)
    if with_cuda:
        _prepare_cuda_env(toolkit)
    _STATE.update(strict=(mode == "1"), cuda=with_cuda, reason=reason)
    return [_make_extension(with_cuda)]


def _digest_module():
    """autolr_fast/ops/sources_digest.py, loaded by path (importing the package would load _C)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_autolr_fast_sources_digest", os.path.join(ROOT, "autolr_fast", "ops", "sources_digest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record_sources(extension_file: str) -> None:
    """Write the digest of csrc/ops taken before compiling (the one on the compile commands)
    beside the built extension, where autolr_fast.ops.library checks it before loading the
    extension. A source edited during the build then reads as stale, as it is."""
    with open(str(_digest_module().sidecar_of(extension_file)), "w") as f:
        f.write(_STATE["digest"] + "\n")


def cmdclass() -> dict:
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        return {}

    class BuildExtensionWithFallback(BuildExtension):
        """torch's BuildExtension (ninja) that, in auto mode, retries a failed CUDA build CPU-only
        and turns a failed CPU build into a warning (the package then runs on the references)."""

        def build_extension(self, ext):
            built = self._build_or_fall_back(ext)
            if ext.name not in _FAILED:
                _record_sources(self.get_ext_fullpath(ext.name))
            return built

        def _build_or_fall_back(self, ext):
            try:
                return super().build_extension(ext)
            except Exception as exc:  # compiler/linker errors come in several types
                if _STATE["strict"]:
                    raise
                cuda_sources = [s for s in ext.sources if s.endswith(".cu")]
                if cuda_sources:
                    _warn(f"the CUDA build of {ext.name} failed ({exc}); retrying without CUDA kernels")
                    ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
                    ext.define_macros = [m for m in ext.define_macros if m[0] != "AUTOLR_FAST_WITH_CUDA"]
                    ext.libraries = [lib for lib in ext.libraries if "cuda" not in lib]
                    if isinstance(ext.extra_compile_args, dict):
                        ext.extra_compile_args = {"cxx": ext.extra_compile_args.get("cxx", [])}
                    try:
                        return super().build_extension(ext)
                    except Exception as exc2:
                        exc = exc2
                _warn(f"building {ext.name} failed ({exc}); autolr_fast installs without it and uses the "
                      "pure-PyTorch reference implementations. Set AUTOLR_FAST_BUILD_EXT=0 to skip the build.")
                _FAILED.add(ext.name)
                return None

        # A skipped extension has no file: keep it out of the later copy/install steps.
        def copy_extensions_to_source(self):
            kept = self.extensions
            self.extensions = [e for e in kept if e.name not in _FAILED]
            try:
                super().copy_extensions_to_source()
                # the digest travels with the extension file it describes
                import shutil

                sidecar_of = _digest_module().sidecar_of
                build_py = self.get_finalized_command("build_py")
                for ext in self.extensions:
                    inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
                    if sidecar_of(regular_file).is_file():
                        shutil.copyfile(sidecar_of(regular_file), sidecar_of(inplace_file))
            finally:
                self.extensions = kept

        def get_outputs(self):
            failed = {self.get_ext_fullpath(name) for name in _FAILED}
            return [o for o in super().get_outputs() if o not in failed]

    return {"build_ext": BuildExtensionWithFallback.with_options(use_ninja=True)}
