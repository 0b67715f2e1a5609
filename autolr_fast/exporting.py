"""Export an MLR-SNet controller to one file for C++: TorchScript + self-describing weights.

``export(controller_or_scheduler, path, gamma=...)`` writes a TorchScript archive (a zip file)
that

* ``torch.jit.load`` (Python) and ``torch::jit::load`` (C++) open as a module with methods
  ``step(loss: Tensor) -> Tensor`` (the rate ``gamma * p`` with the NaN/Inf guard and clamp of
  :func:`autolr_fast.reference.mlrsnet_guarded_step`), ``reset()``, and the buffers ``h``,
  ``c``, ``rate``, ``gamma`` (the state, saved and restored through ``state_dict``);
* carries the weights, shapes, gamma and state once more as an extra file
  ``extra/autolr/weights.bin`` in the ALRW format (``docs/runtime.md``), stored uncompressed, so
  the dependency-free C runtime in ``csrc/runtime`` reads it with a minimal zip reader.

``load(path)`` reads the ALRW part back into a Python :class:`~autolr_fast.MLRSNet` without
TorchScript. TorchScript is deprecated in recent PyTorch (``torch.jit.script/save/load`` emit a
``FutureWarning``); this module silences exactly those warnings around its own calls, so users
see none. The C runtime does not depend on TorchScript at all.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile
import zlib
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .controllers.files import read_file
from .controllers.mlrsnet import MLRSNet
from .controllers.pretrained import controller_from_blob, load_pretrained
from .ops import reference
from .scheduler import AutoLR

__all__ = [
    "FORMAT_VERSION",
    "WEIGHTS_ENTRY",
    "Exported",
    "export",
    "load",
    "load_torchscript",
    "pack_weights",
    "unpack_weights",
    "cmake_dir",
    "include_dir",
    "find_cmake",
    "build_runtime",
    "shared_library_path",
    "main",
]

FORMAT_VERSION = 1
MAGIC = b"ALRW"
WEIGHTS_ENTRY = "autolr/weights.bin"  # key of the extra file; in the zip: <archive>/extra/<key>
_HEADER = struct.Struct("<4sIIIIfI")  # magic, version, hidden, layers, flags, gamma, n_weights
MAX_HIDDEN = 4096
MAX_LAYERS = 16


@contextlib.contextmanager
def _quiet_torchscript():
    """Silence the deprecation warnings of ``torch.jit.script/save/load`` (and only those)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*TorchScript.*deprecat", category=UserWarning)
        yield


# ------------------------------------------------------------------------------------------------
# The scriptable module (gate order "train", the cell of reference.mlrsnet_forward)
# ------------------------------------------------------------------------------------------------
class _ScriptCell(nn.Module):
    def __init__(self, w: list[Tensor]) -> None:
        super().__init__()
        names = ["i2h0_w", "i2h0_b", "i2h2_w", "i2h2_b", "h2h0_w", "h2h0_b", "h2h2_w", "h2h2_b"]
        for name, t in zip(names, w):
            self.register_buffer(name, t.detach().to(torch.float32).clone().contiguous())

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        w = [self.i2h0_w, self.i2h0_b, self.i2h2_w, self.i2h2_b, self.h2h0_w, self.h2h0_b, self.h2h2_w, self.h2h2_b]
        return reference.mlrsnet_cell(x, h, c, w, False)


class ExportedMLRSNet(nn.Module):
    """What ``export`` scripts: the guarded MLR-SNet step with its state in buffers."""

    def __init__(self, net: MLRSNet, gamma: float, h: Tensor, c: Tensor, rate: float) -> None:
        super().__init__()
        w = [t.detach().cpu().float() for t in net.flat_weights()]
        self.hidden_size = int(net.hidden_size)
        self.num_layers = int(net.num_layers)
        self.format_version = FORMAT_VERSION
        self.cells = nn.ModuleList([_ScriptCell(w[8 * k : 8 * k + 8]) for k in range(net.num_layers)])
        self.register_buffer("head_w", w[-2].clone().contiguous())
        self.register_buffer("head_b", w[-1].clone().contiguous())
        self.register_buffer("h", h.detach().cpu().float().clone().reshape(net.num_layers, net.hidden_size))
        self.register_buffer("c", c.detach().cpu().float().clone().reshape(net.num_layers, net.hidden_size))
        self.register_buffer("rate", torch.tensor(float(rate), dtype=torch.float32))
        self.register_buffer("gamma", torch.tensor(float(gamma), dtype=torch.float32))

    @torch.jit.export
    def step(self, loss: Tensor) -> Tensor:
        """Guarded step on one loss value; returns the new rate (0-dim float32)."""
        x = loss.detach().reshape(()).to(torch.float32)
        finite = torch.isfinite(x)
        safe = torch.where(finite, x.clamp_min(0.0), torch.zeros_like(x))
        inp = safe.reshape(1, 1)
        hs: list[Tensor] = []
        cs: list[Tensor] = []
        k = 0
        for cell in self.cells:
            h_new, c_new = cell(inp, self.h[k : k + 1], self.c[k : k + 1])
            hs.append(h_new)
            cs.append(c_new)
            inp = h_new
            k += 1
        p = torch.sigmoid(torch.nn.functional.linear(inp, self.head_w, self.head_b)).reshape(())
        rate = torch.minimum(torch.clamp_min(self.gamma * p, 0.0), self.gamma)
        ok = finite & torch.isfinite(rate)
        self.rate.copy_(torch.where(ok, rate, self.rate))
        self.h.copy_(torch.where(ok, torch.cat(hs, 0), self.h))
        self.c.copy_(torch.where(ok, torch.cat(cs, 0), self.c))
        return self.rate.clone()

    @torch.jit.export
    def reset(self) -> None:
        """Zero ``h``, ``c`` and the rate (the start of a new training run)."""
        self.h.zero_()
        self.c.zero_()
        self.rate.zero_()

    def forward(self, loss: Tensor) -> Tensor:
        return self.step(loss)


# ------------------------------------------------------------------------------------------------
# ALRW: the self-describing weights blob (docs/runtime.md)
# ------------------------------------------------------------------------------------------------
def _expected_sizes(hidden: int, layers: int) -> list[int]:
    return [math.prod(shape) for shape in reference.weight_shapes(layers, hidden)]


def pack_weights(net: MLRSNet, gamma: float, h: Tensor, c: Tensor, rate: float) -> bytes:
    """The ALRW bytes of a controller, its gamma and state (little-endian, CRC32 at the end)."""
    if net.gate_order != "train":
        raise ValueError("only gate_order='train' controllers can be exported (the runtime implements that cell)")
    flat = torch.cat([t.detach().cpu().float().reshape(-1) for t in net.flat_weights()])
    state = torch.cat([h.detach().cpu().float().reshape(-1), c.detach().cpu().float().reshape(-1),
                       torch.tensor([float(rate)])])
    g32 = float(torch.tensor(float(gamma), dtype=torch.float32))  # what the file can hold
    if not (math.isfinite(g32) and g32 > 0):
        raise ValueError(f"gamma {gamma!r} is not a positive finite float32 (the file stores it as one)")
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, net.hidden_size, net.num_layers, 0, g32, flat.numel())
    values = flat.tolist() + state.tolist()
    body = header + struct.pack(f"<{len(values)}f", *values)
    blob = body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)
    unpack_weights(blob, source="the controller to export")  # refuse what no reader would open
    return blob


class Exported(NamedTuple):
    """What :func:`load` returns: the controller (state in ``h``/``c``), gamma and the rate."""

    controller: MLRSNet
    gamma: float
    rate: float
    version: int


def _little_endian_floats(data: bytes) -> Tensor:
    """The little-endian float32 values of ``data`` as a tensor, on a host of either byte order."""
    if sys.byteorder == "little":
        return torch.frombuffer(bytearray(data), dtype=torch.float32).clone()
    return torch.tensor(struct.unpack(f"<{len(data) // 4}f", data), dtype=torch.float32)


def unpack_weights(data: bytes, source: str = "<bytes>") -> Exported:
    """Parse ALRW bytes (checked: magic, version, sizes, CRC32) into an :class:`Exported`."""
    def bad(msg: str) -> ValueError:
        return ValueError(f"{source}: {msg}")

    if len(data) < _HEADER.size + 4:
        raise bad(f"ALRW weights are truncated ({len(data)} bytes, the header alone is {_HEADER.size + 4})")
    magic, version, hidden, layers, flags, gamma, n = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise bad(f"not ALRW weights (magic {magic!r}, expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise bad(f"ALRW format version {version} is not supported (this autolr_fast reads version {FORMAT_VERSION}); "
                  "re-export the controller with this version")
    if not (2 <= hidden <= MAX_HIDDEN) or not (1 <= layers <= MAX_LAYERS):
        raise bad(f"implausible shape hidden={hidden} layers={layers}")
    if flags != 0:
        raise bad(f"unknown flags {flags:#x}")
    sizes = _expected_sizes(hidden, layers)
    if n != sum(sizes):
        raise bad(f"weight count {n} does not match hidden={hidden} layers={layers} (expected {sum(sizes)})")
    n_state = 2 * layers * hidden + 1
    total = _HEADER.size + 4 * (n + n_state) + 4
    if len(data) != total:
        raise bad(f"ALRW weights have {len(data)} bytes, expected {total} (truncated or trailing data)")
    (crc,) = struct.unpack_from("<I", data, total - 4)
    if zlib.crc32(data[: total - 4]) & 0xFFFFFFFF != crc:
        raise bad("CRC32 mismatch: the weights are corrupted")
    if not (math.isfinite(gamma) and gamma > 0):
        raise bad(f"gamma {gamma} is not a positive finite number")
    floats = _little_endian_floats(data[_HEADER.size : total - 4])
    if not torch.isfinite(floats).all():
        raise bad("weights or state contain NaN/Inf")
    net = MLRSNet(hidden_size=hidden, num_layers=layers, gate_order="train")
    with torch.no_grad():
        off = 0
        for p, size in zip(net.flat_weights(), sizes):
            p.copy_(floats[off : off + size].reshape(p.shape))
            off += size
        net.h.copy_(floats[off : off + layers * hidden].reshape(layers, hidden))
        off += layers * hidden
        net.c.copy_(floats[off : off + layers * hidden].reshape(layers, hidden))
        off += layers * hidden
        rate = float(floats[off])
    if not 0.0 <= rate <= gamma:
        raise bad(f"the stored rate {rate} is outside [0, gamma={gamma}]")
    return Exported(net, float(gamma), rate, version)


# ------------------------------------------------------------------------------------------------
# export / load
# ------------------------------------------------------------------------------------------------
def _resolve(obj, gamma: float | None) -> tuple[MLRSNet, float, Tensor, Tensor, float]:
    if isinstance(obj, AutoLR):
        if gamma is not None:
            raise ValueError("export(AutoLR, ...) takes gamma from the scheduler; do not pass gamma=")
        net = obj.controller
        if not isinstance(net, MLRSNet):
            raise TypeError(f"only MLRSNet controllers can be exported, this AutoLR has a {type(net).__name__}")
        g = float(obj.scale.peak)  # the peak: the envelope is the run's, not the controller's
        if not (math.isfinite(g) and g > 0):
            raise ValueError(
                f"this AutoLR's scale ({obj.scale.mode!r} mode) is not set yet (no finite loss seen, or no "
                "usable anchor); run at least one step first, or export the controller with an explicit gamma="
            )
        if obj.scale.varies_at(obj.step_count):  # a finished warm-up without total_steps loses nothing
            warnings.warn(
                f"export: this AutoLR's envelope ({obj.scale.describe_envelope()}) is not exported: the runtime "
                f"sets rates at the peak scale {g:.4g}, without a warm-up or decay; at step {obj.step_count} the "
                f"run's factor is {obj.scale.factor(obj.step_count):.4g}. Multiply the "
                "runtime's rate by the envelope in your trainer", RuntimeWarning, stacklevel=3)
        if any(scale != 1.0 for scale in obj.lr_scales):
            scales = [float(f"{scale:.6g}") for scale in obj.lr_scales]
            warnings.warn(f"export: the runtime returns AutoLR's rate (scale 1); this AutoLR gives its param groups "
                          f"that rate times {scales}: multiply the runtime's rate by each group's scale in your "
                          "trainer", RuntimeWarning, stacklevel=3)
        return net, g, net.h, net.c, float(obj.rate)
    if isinstance(obj, MLRSNet):
        if gamma is None:
            raise ValueError("export(MLRSNet, ...) needs gamma= (a positive float: the largest rate)")
        return obj, float(gamma), obj.h, obj.c, 0.0
    raise TypeError(f"export takes an MLRSNet or an AutoLR, got {type(obj).__name__}")


def _umask() -> int:
    """The process's umask, read without setting it (os.umask would change it for every thread)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return 0o022  # the usual default where /proc is not there


def export(controller_or_scheduler, path: str | os.PathLike, gamma: float | None = None) -> str:
    """Write the controller (and its state) to ``path`` as TorchScript + ALRW weights.

    Args:
        controller_or_scheduler: an :class:`MLRSNet` (gate order ``"train"``; then ``gamma`` is
            required) or an :class:`AutoLR` (controller, gamma, state and rate taken from it).
        path: the output file (conventionally ``*.pt``).
        gamma: the rate scale for an ``MLRSNet``.

    Returns the path written.
    """
    net, g, h, c, rate = _resolve(controller_or_scheduler, gamma)
    if not (math.isfinite(g) and g > 0):
        raise ValueError(f"gamma must be a positive finite float, got {g!r}")
    if net.gate_order != "train":
        raise ValueError(
            "only gate_order='train' controllers can be exported (the runtime implements the cell that "
            "trained the published checkpoints); load it with gate_order='train'"
        )
    blob = pack_weights(net, g, h, c, rate)  # checked before anything is written
    module = ExportedMLRSNet(net, g, h, c, rate).eval()
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder: give the file to write, e.g. {os.path.join(path, 'controller.pt')}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise FileNotFoundError(f"cannot write {path}: the folder {os.path.dirname(os.path.abspath(path))} does not "
                                "exist")
    # written beside the target, then renamed into place: a reader never sees half a file
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        with _quiet_torchscript():
            torch.jit.save(torch.jit.script(module), tmp, _extra_files={WEIGHTS_ENTRY: blob})
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would create it (mkstemp's file is 0600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def load_torchscript(path: str | os.PathLike):
    """``torch.jit.load`` the exported module, without the deprecation warnings."""
    with _quiet_torchscript():
        try:
            return torch.jit.load(os.fspath(path), map_location="cpu")
        except Exception as exc:
            raise ValueError(f"could not load {os.fspath(path)!r} as TorchScript: {exc}") from exc


def _read_weights_entry(path: str) -> bytes:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.split("/", 1)[-1] == "extra/" + WEIGHTS_ENTRY]
            if not names:
                raise ValueError(
                    f"{path!r} is a zip/TorchScript file without {WEIGHTS_ENTRY!r}: not written by "
                    "autolr_fast.export"
                )
            info = zf.getinfo(names[0])
            if info.compress_type != zipfile.ZIP_STORED:  # export stores it; inflating could take any memory
                raise ValueError(f"{path!r}: its {WEIGHTS_ENTRY!r} entry is compressed, and export stores it "
                                 "uncompressed: not written by autolr_fast.export")
            return zf.read(names[0])
    except zipfile.BadZipFile as exc:
        if "CRC" in str(exc):  # a zip whose entry's checksum fails: damaged, not foreign
            raise ValueError(f"{path!r} is corrupted: {exc}") from exc
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":  # a zip's first header, and no end record: cut short
                raise ValueError(f"{path!r} is truncated or damaged: a zip archive without its end record "
                                 f"({exc})") from exc
        raise ValueError(f"{path!r} is not an exported controller (not a zip/TorchScript archive: {exc})") from exc
    except (IsADirectoryError, PermissionError, FileNotFoundError):
        raise
    except (zipfile.LargeZipFile, RuntimeError, NotImplementedError) as exc:
        # encrypted or unsupported-compression entries: not something export writes
        raise ValueError(f"{path!r} is not an exported controller ({exc})") from exc
    except (zlib.error, EOFError, OSError) as exc:
        raise ValueError(f"{path!r} is corrupted: {exc}") from exc


def load(path: str | os.PathLike) -> Exported:
    """Read an exported file back: ``Exported(controller, gamma, rate, version)``.

    Reads only the ALRW entry (no TorchScript involved). Raises ``ValueError`` saying what is
    wrong for a corrupted, truncated or foreign file, ``FileNotFoundError`` if it is missing.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder, not an exported controller file")
    return unpack_weights(_read_weights_entry(path), source=path)


# ------------------------------------------------------------------------------------------------
# Packaging helpers: where the C++ runtime sources and CMake package config live
# ------------------------------------------------------------------------------------------------
def _runtime_root() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for cand in (os.path.join(here, "runtime"), os.path.join(os.path.dirname(here), "csrc", "runtime")):
        if os.path.exists(os.path.join(cand, "CMakeLists.txt")):
            return cand
    raise FileNotFoundError(
        "the C++ runtime sources were not found (neither autolr_fast/runtime/ in the installed package "
        "nor csrc/runtime/ in a source checkout)"
    )


def cmake_dir() -> str:
    """Folder with ``autolrConfig.cmake``: ``-Dautolr_DIR=<this>`` then ``find_package(autolr)``."""
    return os.path.join(_runtime_root(), "cmake")


def include_dir() -> str:
    """Folder with ``autolr.h``."""
    return os.path.join(_runtime_root(), "include")


def find_cmake() -> str | None:
    """``cmake`` on PATH, or next to the Python interpreter (the ``cmake`` PyPI package)."""
    found = shutil.which("cmake")
    if found:
        return found
    for cand in (os.path.join(os.path.dirname(sys.executable), "cmake"),
                 os.path.join(os.path.dirname(os.path.realpath(sys.executable)), "cmake")):
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def build_runtime(build_dir: str | os.PathLike, *, tests: bool = False, sanitize: bool = False,
                  bench: bool = False, fuzz_seconds: int = 10, jobs: int = 2,
                  extra_args: list[str] | None = None) -> str:
    """Configure and build the C runtime with CMake into ``build_dir``; returns ``build_dir``.

    The shared library is ``<build_dir>/libautolr.so`` (``.dylib``/``.dll`` elsewhere). Raises
    ``RuntimeError`` with CMake's output if a step fails, ``FileNotFoundError`` without cmake.
    """
    cmake = find_cmake()
    if cmake is None:
        raise FileNotFoundError("cmake was not found (pip install cmake, or install it with your package manager)")
    build_dir = os.fspath(build_dir)
    args = [cmake, "-S", _runtime_root(), "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
            f"-DAUTOLR_BUILD_TESTS={'ON' if tests else 'OFF'}", f"-DAUTOLR_SANITIZE={'ON' if sanitize else 'OFF'}",
            f"-DAUTOLR_BUILD_BENCH={'ON' if bench else 'OFF'}", f"-DAUTOLR_FUZZ_SECONDS={int(fuzz_seconds)}",
            *(extra_args or [])]
    for cmd in (args, [cmake, "--build", build_dir, "-j", str(jobs)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return build_dir


def shared_library_path(build_dir: str | os.PathLike) -> str:
    """The path of the runtime's shared library inside a ``build_runtime`` folder."""
    names = {"darwin": "libautolr.dylib", "win32": "autolr.dll"}
    return os.path.join(os.fspath(build_dir), names.get(sys.platform, "libautolr.so"))


# ------------------------------------------------------------------------------------------------
# CLI: python -m autolr_fast export ...
# ------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m autolr_fast export",
        description="Export an MLR-SNet controller to TorchScript + ALRW weights for the C++ runtime.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--official", metavar="PATH", help="a published MLR-SNet checkpoint (mlr_snet_*.pth)")
    src.add_argument("--checkpoint", metavar="PATH", help="a controller file (save_controller, meta-training "
                     "snapshots) or a torch.save'd MLRSNet state_dict")
    src.add_argument("--pretrained", metavar="NAME", help="a pretrained controller shipped with autolr_fast")
    p.add_argument("--gamma", type=float, help="the rate scale (largest rate); required unless the "
                   "controller (pretrained, or a controller file) carries one")
    p.add_argument("-o", "--output", metavar="OUT", help="output file, e.g. controller.pt")
    p.add_argument("--cmake-dir", action="store_true", help="print the folder with autolrConfig.cmake and exit")
    p.add_argument("--include-dir", action="store_true", help="print the folder with autolr.h and exit")
    return p


def _load_checkpoint(path: str) -> MLRSNet:
    """An MLRSNet from a controller file (``save_controller``: meta-training snapshots, ``meta-train
    --ship``; its gamma in ``default_gamma``) or from a bare ``state_dict``."""
    state = read_file(path, "an MLRSNet controller file or state_dict")
    if isinstance(state, dict) and "format" in state:
        net = controller_from_blob(state, path)
        if not isinstance(net, MLRSNet):
            raise ValueError(f"{path!r} holds a {type(net).__name__}; the runtime runs MLR-SNet controllers only")
        return net
    if not isinstance(state, dict) or "head.weight" not in state or "h" not in state:
        raise ValueError(f"{path!r} is neither an autolr_fast controller file nor an MLRSNet state_dict (expected "
                         "keys 'cells.0...', 'head.weight', 'h', 'c')")
    layers, hidden = state["h"].shape
    net = MLRSNet(hidden_size=int(hidden), num_layers=int(layers))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{path!r}: {exc}") from exc
    return net


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.cmake_dir or args.include_dir:
            print(cmake_dir() if args.cmake_dir else include_dir())
            return 0
        if not args.output:
            parser.error("-o/--output is required")
        gamma = args.gamma
        if args.official:
            net = MLRSNet.from_official(args.official, gate_order="train")
        elif args.checkpoint:
            net = _load_checkpoint(args.checkpoint)
            if gamma is None:
                gamma = net.default_gamma  # a controller file's; None for a bare state_dict
        elif args.pretrained:
            net = load_pretrained(args.pretrained)
            if not isinstance(net, MLRSNet):
                parser.error(f"{args.pretrained!r} is not an MLR-SNet controller; the runtime runs MLR-SNet only")
            if gamma is None:
                gamma = net.default_gamma
        else:
            parser.error("give one of --official PATH, --checkpoint PATH, --pretrained NAME")
        if gamma is None:
            parser.error("--gamma is required (the largest rate, e.g. 0.1)")
        out = export(net, args.output, gamma=float(gamma))
    except (ValueError, TypeError, OSError, KeyError) as exc:
        print(f"error: {exc.args[0] if isinstance(exc, KeyError) and exc.args else exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} (hidden={net.hidden_size}, layers={net.num_layers}, gamma={float(gamma):g}, "
          f"ALRW format v{FORMAT_VERSION}, {os.path.getsize(out)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
