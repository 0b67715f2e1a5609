"""The dependency-free C runtime (csrc/runtime): fixtures, CMake build + ctest, ctypes, find_package."""

from __future__ import annotations

import copy
import csv
import ctypes
import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from autolr_fast import exporting as ex

REPO = Path(__file__).resolve().parents[1]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME = os.path.join(ROOT, "csrc", "runtime")
DATA = os.path.join(RUNTIME, "tests", "data")


def _load_fixture_module():
    spec = importlib.util.spec_from_file_location("make_fixtures", os.path.join(RUNTIME, "tests", "make_fixtures.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read_csv(path):
    with open(path, newline="") as f:
        return [(float(r["loss"]), float(r["rate"])) for r in csv.DictReader(f)]


def _weights_entry(path):
    with zipfile.ZipFile(path) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("/extra/" + ex.WEIGHTS_ENTRY)))


def test_committed_fixtures_match_current_python(tmp_path):
    """Regenerate the ctest fixtures: the committed copies must be what the current code writes."""
    gen = _load_fixture_module()
    fresh = gen.generate(str(tmp_path))
    assert set(fresh) == set(gen.FIXTURES)
    for name, (pt, csv_path) in fresh.items():
        committed_pt = os.path.join(DATA, f"{name}.pt")
        committed_csv = os.path.join(DATA, f"{name}_rates.csv")
        assert os.path.exists(committed_pt) and os.path.exists(committed_csv), (
            f"fixture {name} missing: run python csrc/runtime/tests/make_fixtures.py"
        )
        assert _weights_entry(committed_pt) == _weights_entry(pt), f"{name}: weights differ, regenerate the fixtures"
        old, new = _read_csv(committed_csv), _read_csv(csv_path)
        assert len(old) == len(new) == gen.STEPS
        for (l0, r0), (l1, r1) in zip(old, new):
            assert (l0 == l1) or (math.isnan(l0) and math.isnan(l1))
            assert abs(r0 - r1) <= 1e-7, f"{name}: expected rates changed ({r0} vs {r1}); regenerate the fixtures"
        # and the committed TorchScript file steps like the reference
        mod = ex.load_torchscript(committed_pt)
        err = max(abs(float(mod.step(torch.tensor(x))) - r) for x, r in old)
        assert err <= 1e-6


def _toolchain():
    cmake = ex.find_cmake()
    if cmake is None:
        pytest.skip("cmake not found on PATH or next to the Python interpreter (pip install cmake)")
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("no C++ compiler found")
    return cmake


@pytest.fixture(scope="module")
def runtime_build(tmp_path_factory):
    _toolchain()
    build = tmp_path_factory.mktemp("autolr_runtime_build")
    ex.build_runtime(build, tests=True, sanitize=True, fuzz_seconds=8, jobs=2)
    return str(build)


def test_ctest(runtime_build):
    cmake = _toolchain()
    ctest = os.path.join(os.path.dirname(cmake), "ctest")
    ctest = ctest if os.path.exists(ctest) else shutil.which("ctest")
    proc = subprocess.run([ctest, "--output-on-failure", "-j", "2"], cwd=runtime_build, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    for name in ("runtime_agreement_and_errors", "runtime_agreement_and_errors_asan", "fuzz_reader",
                 "example_train_softmax"):
        assert name in proc.stdout, f"ctest did not run {name}"
    assert "100% tests passed" in proc.stdout


class _Lib:
    def __init__(self, path):
        self.lib = lib = ctypes.CDLL(path)
        lib.autolr_open_file.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.autolr_open_memory.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
        lib.autolr_step.argtypes = [ctypes.c_void_p, ctypes.c_float]
        lib.autolr_step.restype = ctypes.c_float
        lib.autolr_free.argtypes = [ctypes.c_void_p]
        lib.autolr_last_error.restype = ctypes.c_char_p
        lib.autolr_state_size.argtypes = [ctypes.c_void_p]
        lib.autolr_state_size.restype = ctypes.c_size_t
        lib.autolr_get_state.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t]
        lib.autolr_reset.argtypes = [ctypes.c_void_p]
        lib.autolr_anchor.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_float]
        lib.autolr_gamma.argtypes = [ctypes.c_void_p]
        lib.autolr_gamma.restype = ctypes.c_float


def test_ctypes_matches_torchscript_on_official_or_random(runtime_build, tmp_path):
    from conftest import OFFICIAL_DIR

    src = os.path.join(OFFICIAL_DIR, "mlr_snet_200.pth")
    if os.path.exists(src):
        from autolr_fast import MLRSNet

        net = MLRSNet.from_official(src)
    else:  # still a full-size controller
        from autolr_fast import MLRSNet

        torch.manual_seed(0)
        net = MLRSNet(hidden_size=50)
    path = ex.export(net, tmp_path / "c.pt", gamma=0.1)
    lib = _Lib(ex.shared_library_path(runtime_build)).lib
    h = ctypes.c_void_p()
    assert lib.autolr_open_file(str(path).encode(), ctypes.byref(h)) == 0, lib.autolr_last_error()
    mod = ex.load_torchscript(path)
    g = torch.Generator().manual_seed(3)
    losses = (3.0 * torch.rand(1000, generator=g)).tolist()
    losses[100] = float("nan")
    err = 0.0
    for x in losses:
        err = max(err, abs(lib.autolr_step(h, x) - float(mod.step(torch.tensor(x)))))
    assert err <= 1e-5, err
    n = lib.autolr_state_size(h)
    buf = (ctypes.c_float * n)()
    assert lib.autolr_get_state(h, buf, n) == 0
    state = torch.tensor(list(buf))
    torch.testing.assert_close(state[: n // 2], mod.h.reshape(-1), atol=1e-5, rtol=0)
    lib.autolr_free(h)
    # garbage through ctypes: an error code and a message
    h2 = ctypes.c_void_p()
    junk = os.urandom(5000)
    assert lib.autolr_open_memory(junk, len(junk), ctypes.byref(h2)) < 0 and not h2.value
    assert lib.autolr_last_error()


@pytest.mark.parametrize("languages", ["C", "C CXX"])
def test_find_package_consumer(tmp_path, languages):
    """A C or C++ project finds the runtime with find_package(autolr) via export.cmake_dir() and
    links the static target as it is (the target carries its C++ runtime dependency)."""
    cmake = _toolchain()
    proj = tmp_path / "consumer"
    proj.mkdir()
    (proj / "CMakeLists.txt").write_text(
        f"cmake_minimum_required(VERSION 3.18)\nproject(consumer {languages})\nfind_package(autolr 0.1 REQUIRED)\n"
        "add_executable(use_it main.c)\ntarget_link_libraries(use_it PRIVATE autolr::autolr)\n"
    )
    (proj / "main.c").write_text(
        '#include <stdio.h>\n#include "autolr.h"\nint main(int c, char** v) {\n  autolr_runtime* rt;\n'
        '  if (autolr_open_file(v[1], &rt) != AUTOLR_OK) { puts(autolr_last_error()); return 1; }\n'
        '  float r = 0; for (int i = 0; i < 10; ++i) r = autolr_step(rt, 2.0f - 0.1f * i);\n'
        '  printf("%.9g\\n", r); autolr_free(rt); return 0;\n}\n'
    )
    build = tmp_path / "b"
    for cmd in ([cmake, "-S", str(proj), "-B", str(build), f"-Dautolr_DIR={ex.cmake_dir()}"],
                [cmake, "--build", str(build), "-j", "2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the runtime leaves the consumer's build type (and so its asserts) as the consumer chose it
    cache = (build / "CMakeCache.txt").read_text()
    assert "CMAKE_BUILD_TYPE:STRING=\n" in cache, [ln for ln in cache.splitlines() if "CMAKE_BUILD_TYPE" in ln]
    fixture = os.path.join(DATA, "controller_h16_l1.pt")
    out = subprocess.run([str(build / "use_it"), fixture], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    mod = ex.load_torchscript(fixture)
    want = [float(mod.step(torch.tensor(2.0 - 0.1 * i, dtype=torch.float32))) for i in range(10)][-1]
    assert abs(float(out.stdout) - want) <= 1e-5


def test_zip_variants_from_other_writers(runtime_build, tmp_path, monkeypatch):
    """The reader handles zips not written by torch: Python's zipfile, a comment, zip64 records;
    a deflated weights entry is refused with a message."""
    lib = _Lib(ex.shared_library_path(runtime_build)).lib
    blob = _weights_entry(os.path.join(DATA, "controller_h7_l2.pt"))
    mod = ex.load_torchscript(os.path.join(DATA, "controller_h7_l2.pt"))
    want = float(mod.step(torch.tensor(1.25)))

    def open_bytes(data):
        h = ctypes.c_void_p()
        st = lib.autolr_open_memory(data, len(data), ctypes.byref(h))
        return st, h

    variants = {}
    for label, kwargs in (("plain", {}), ("comment", {"comment": b"x" * 300}), ("zip64", {"zip64": True})):
        p = tmp_path / f"{label}.zip"
        with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("other/data.pkl", b"\x80\x02" * 50)
            if kwargs.get("zip64"):
                with zf.open("anyname/extra/" + ex.WEIGHTS_ENTRY, "w", force_zip64=True) as f:
                    f.write(blob)
            else:
                zf.writestr("anyname/extra/" + ex.WEIGHTS_ENTRY, blob)
            if "comment" in kwargs:
                zf.comment = kwargs["comment"]
        variants[label] = p.read_bytes()
    # full zip64: zip64 EOCD + locator, central-directory sizes and offsets in the zip64 extra field
    monkeypatch.setattr(zipfile, "ZIP64_LIMIT", 0)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 0)
    p = tmp_path / "full_zip64.zip"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("other/data.pkl", b"\x80\x02" * 50)
        zf.writestr("anyname/extra/" + ex.WEIGHTS_ENTRY, blob)
    monkeypatch.undo()
    data64 = p.read_bytes()
    assert b"PK\x06\x06" in data64 and b"PK\x06\x07" in data64  # zip64 EOCD record and locator
    variants["full_zip64"] = data64
    for label, data in variants.items():
        st, h = open_bytes(data)
        assert st == 0, (label, lib.autolr_last_error())
        assert abs(lib.autolr_step(h, 1.25) - want) <= 1e-5
        lib.autolr_free(h)
    p = tmp_path / "deflated.zip"
    with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/extra/" + ex.WEIGHTS_ENTRY, blob)
    st, h = open_bytes(p.read_bytes())
    assert st == -2 and not h.value and b"compressed" in lib.autolr_last_error()


@pytest.mark.parametrize("controller", ["default", "random"])
def test_anchor_starts_a_run_as_autolrs_default_scale_does(runtime_build, tmp_path, controller):
    """reset + anchor on the first loss, then step: the rates of AutoLR(opt) at lr 0.05 (no
    envelope), whatever gamma the file was exported with."""
    from autolr_fast import AutoLR, MLRSNet, load_pretrained

    torch.manual_seed(0)
    net = load_pretrained("default") if controller == "default" else MLRSNet(hidden_size=50)
    path = ex.export(copy.deepcopy(net), tmp_path / "c.pt", gamma=0.7)
    g = torch.Generator().manual_seed(4)
    losses = (2.3 * torch.exp(-torch.arange(200) / 60.0) + 0.1 * torch.rand(200, generator=g)).tolist()
    losses[50] = float("nan")
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = AutoLR(opt, copy.deepcopy(net))
    want = []
    for x in losses:
        model.weight.grad, model.bias.grad = torch.zeros_like(model.weight), torch.zeros_like(model.bias)
        sched.step(torch.tensor(x))
        opt.step()
        want.append(float(opt.param_groups[0]["lr"]))
    lib = _Lib(ex.shared_library_path(runtime_build)).lib
    h = ctypes.c_void_p()
    assert lib.autolr_open_file(str(path).encode(), ctypes.byref(h)) == 0, lib.autolr_last_error()
    for _ in range(3):  # whatever ran before: reset and anchor start the run again
        assert lib.autolr_reset(h) == 0
        assert lib.autolr_anchor(h, losses[0], 0.05) == 0, lib.autolr_last_error()
        got = [lib.autolr_step(h, x) for x in losses]
        assert want[0] == pytest.approx(0.05, rel=1e-3)
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=0)
    assert lib.autolr_anchor(h, float("nan"), 0.05) < 0 and b"not finite" in lib.autolr_last_error()
    lib.autolr_free(h)


def test_the_shared_library_exports_only_the_c_api(runtime_build):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found")
    out = subprocess.run([nm, "-D", "--defined-only", ex.shared_library_path(runtime_build)], capture_output=True,
                         text=True, check=True).stdout.split()
    names = [w for w in out[2::3]]
    assert names and all(n.startswith("autolr_") for n in names), [n for n in names if not n.startswith("autolr_")]


def test_the_shared_library_has_a_soname_with_the_headers_version(runtime_build):
    """A program linked against this runtime records libautolr.so.MAJOR.MINOR (the ABI may change
    with a minor version before 1.0), taken from the version macros of autolr.h."""
    readelf = shutil.which("readelf")
    if readelf is None or not sys.platform.startswith("linux"):
        pytest.skip("readelf (Linux) not found")
    header = (REPO / "csrc" / "runtime" / "include" / "autolr.h").read_text()
    major, minor = (re.search(rf"#define AUTOLR_VERSION_{k} (\d+)", header).group(1) for k in ("MAJOR", "MINOR"))
    dynamic = subprocess.run([readelf, "-d", ex.shared_library_path(runtime_build)], capture_output=True, text=True,
                             check=True).stdout
    assert f"Library soname: [libautolr.so.{major}.{minor}]" in dynamic, dynamic


def test_a_large_file_that_is_no_zip_and_a_folder_are_refused_at_once(runtime_build, tmp_path):
    lib = _Lib(ex.shared_library_path(runtime_build)).lib
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(3 << 20))
    h = ctypes.c_void_p()
    assert lib.autolr_open_file(str(big).encode(), ctypes.byref(h)) == -2 and not h.value
    assert b"no end-of-central-directory record" in lib.autolr_last_error()
    assert lib.autolr_open_file(str(tmp_path).encode(), ctypes.byref(h)) == -1 and not h.value
    assert b"directory" in lib.autolr_last_error().lower()


def test_a_local_header_that_names_another_file_is_refused(runtime_build):
    """The central directory says where the weights are; the local header there must name the same
    entry, as Python's zipfile checks (a damaged or crafted archive otherwise reads other bytes)."""
    lib = _Lib(ex.shared_library_path(runtime_build)).lib
    data = bytearray(open(os.path.join(DATA, "controller_h7_l2.pt"), "rb").read())
    name = ("/extra/" + ex.WEIGHTS_ENTRY).encode()
    local = data.find(b"PK\x03\x04")  # the local headers, in order
    while local >= 0:
        n = int.from_bytes(data[local + 26:local + 28], "little")
        if data[local + 30:local + 30 + n].endswith(name):
            break
        local = data.find(b"PK\x03\x04", local + 4)
    assert local >= 0
    data[local + 30 + 2] ^= 0x01  # a letter of the folder name, in the local header only
    h = ctypes.c_void_p()
    assert lib.autolr_open_memory(bytes(data), len(data), ctypes.byref(h)) == -4 and not h.value
    assert b"names another file" in lib.autolr_last_error()
