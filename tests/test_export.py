"""autolr_fast.export (module autolr_fast.exporting): TorchScript + ALRW export, load, CLI, error handling."""

from __future__ import annotations

import math
import os
import struct
import warnings
import zipfile
import zlib

import pytest
import torch
from conftest import OFFICIAL_DIR, train_steps

from autolr_fast import AutoLR, MLRSNet
from autolr_fast import exporting as ex
from autolr_fast.ops import reference

OFFICIAL = str(OFFICIAL_DIR)


def _net(hidden=12, layers=1, seed=0, scale=2.0) -> MLRSNet:
    torch.manual_seed(seed)
    net = MLRSNet(hidden_size=hidden, num_layers=layers)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(scale)
    return net


def _losses(n: int, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    seq = (2.5 * torch.exp(-torch.arange(n) / (n / 4)) + 0.4 * torch.rand(n, generator=g)).tolist()
    for i, v in ((3, math.nan), (10, math.inf), (11, -math.inf), (20, -1.0), (50, 40.0), (51, 0.0)):
        if i < n:
            seq[i] = v
    return seq


def _reference_rates(net: MLRSNet, gamma: float, losses, h=None, c=None, rate=0.0):
    h = torch.zeros(net.num_layers, net.hidden_size) if h is None else h.clone()
    c = torch.zeros_like(h) if c is None else c.clone()
    r = torch.tensor(float(rate))
    g = torch.tensor(float(gamma))
    out = []
    with torch.no_grad():
        for v in losses:
            r, h, c, _ = reference.mlrsnet_guarded_step(torch.tensor(v), h, c, net.flat_weights(), g, r)
            out.append(float(r))
    return out, h, c


@pytest.mark.parametrize("hidden,layers", [(12, 1), (7, 2), (50, 1)])
def test_torchscript_matches_reference_1000_steps(tmp_path, hidden, layers):
    net = _net(hidden, layers, seed=hidden)
    path = ex.export(net, tmp_path / "c.pt", gamma=0.3)
    mod = ex.load_torchscript(path)
    losses = _losses(1000, seed=hidden)
    want, h_ref, c_ref = _reference_rates(net, 0.3, losses)
    got = [float(mod.step(torch.tensor(v))) for v in losses]
    err = max(abs(a - b) for a, b in zip(got, want))
    assert err <= 1e-6, err
    torch.testing.assert_close(mod.h, h_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(mod.c, c_ref, atol=1e-6, rtol=0)
    assert all(0.0 <= r <= 0.3 for r in got)


def test_no_deprecation_warnings_reach_the_user(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = ex.export(_net(), tmp_path / "c.pt", gamma=0.1)
        ex.load_torchscript(path).step(torch.tensor(1.0))
        ex.load(path)
    assert not [w for w in caught if "deprecat" in str(w.message).lower()], [str(w.message) for w in caught]


def test_state_buffers_reset_and_restore(tmp_path):
    net = _net(9, 2, seed=3)
    mod = ex.load_torchscript(ex.export(net, tmp_path / "c.pt", gamma=0.2))
    names = dict(mod.named_buffers())
    for key in ("h", "c", "rate", "gamma"):
        assert key in names
    assert float(mod.gamma) == pytest.approx(0.2)
    losses = _losses(40, seed=5)
    for v in losses[:20]:
        mod.step(torch.tensor(v))
    saved = {k: v.clone() for k, v in mod.state_dict().items()}
    first = [float(mod.step(torch.tensor(v))) for v in losses[20:]]
    mod.load_state_dict(saved)
    second = [float(mod.step(torch.tensor(v))) for v in losses[20:]]
    assert first == second
    mod.reset()
    assert float(mod.rate) == 0.0 and not mod.h.any() and not mod.c.any()
    again = [float(mod.step(torch.tensor(v))) for v in losses]
    assert again[20:] == pytest.approx(_reference_rates(net, 0.2, losses)[0][20:], abs=1e-6)


def test_load_round_trip(tmp_path):
    net = _net(10, 2, seed=4)
    with torch.no_grad():
        net.h.normal_()
        net.c.normal_()
    path = ex.export(net, tmp_path / "c.pt", gamma=0.05)
    back = ex.load(path)
    assert back.version == ex.FORMAT_VERSION and back.gamma == pytest.approx(0.05) and back.rate == 0.0
    for a, b in zip(net.flat_weights(), back.controller.flat_weights()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(back.controller.h, net.h, atol=0, rtol=0)
    torch.testing.assert_close(back.controller.c, net.c, atol=0, rtol=0)
    # the exported module starts from that state
    mod = ex.load_torchscript(path)
    want, _, _ = _reference_rates(net, 0.05, [1.0, 2.0], h=net.h, c=net.c)
    assert [float(mod.step(torch.tensor(v))) for v in (1.0, 2.0)] == pytest.approx(want, abs=1e-6)


def test_weights_entry_is_stored_uncompressed(tmp_path):
    path = ex.export(_net(), tmp_path / "c.pt", gamma=0.1)
    with zipfile.ZipFile(path) as zf:
        infos = [i for i in zf.infolist() if i.filename.endswith("/extra/" + ex.WEIGHTS_ENTRY)]
        assert len(infos) == 1 and infos[0].compress_type == zipfile.ZIP_STORED
        blob = zf.read(infos[0])
    assert blob[:4] == b"ALRW" and struct.unpack_from("<I", blob, 4)[0] == ex.FORMAT_VERSION


def test_export_from_autolr(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    net = _net(8, 1, seed=6)
    sched = AutoLR(opt, net, gamma="auto", num_classes=3)
    with pytest.raises(ValueError, match="'auto' mode"):
        ex.export(sched, tmp_path / "early.pt")
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    train_steps(model, opt, sched, x, y, steps=5)
    path = ex.export(sched, tmp_path / "c.pt")
    back = ex.load(path)
    assert back.gamma == pytest.approx(float(sched.gamma))
    assert back.rate == pytest.approx(float(sched.rate))
    torch.testing.assert_close(back.controller.h, sched.controller.h, atol=0, rtol=0)
    mod = ex.load_torchscript(path)
    assert float(mod.rate) == pytest.approx(float(sched.rate))
    with pytest.raises(ValueError, match="do not pass gamma"):
        ex.export(sched, tmp_path / "x.pt", gamma=0.1)


def test_export_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="needs gamma"):
        ex.export(_net(), tmp_path / "a.pt")
    with pytest.raises(ValueError, match="positive finite"):
        ex.export(_net(), tmp_path / "a.pt", gamma=float("nan"))
    with pytest.raises(ValueError, match="gate_order"):
        ex.export(MLRSNet(hidden_size=4, gate_order="metatest"), tmp_path / "a.pt", gamma=0.1)
    with pytest.raises(TypeError, match="MLRSNet or an AutoLR"):
        ex.export(torch.nn.Linear(1, 1), tmp_path / "a.pt", gamma=0.1)
    assert not (tmp_path / "a.pt").exists()


def _blob_span(data: bytes) -> tuple[int, int]:
    off = data.index(b"ALRW")
    hidden, layers = struct.unpack_from("<II", data, off + 8)
    (n,) = struct.unpack_from("<I", data, off + 24)
    return off, 28 + 4 * (n + 2 * hidden * layers + 1) + 4


def test_load_rejects_bad_files(tmp_path):
    path = ex.export(_net(), tmp_path / "good.pt", gamma=0.1)
    good = open(path, "rb").read()
    off, length = _blob_span(good)

    def write(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    with pytest.raises(FileNotFoundError):
        ex.load(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not an exported controller"):
        ex.load(write("rand.pt", os.urandom(3000)))
    with pytest.raises(ValueError):
        ex.load(write("trunc.pt", good[: len(good) // 2]))
    flipped = bytearray(good)
    flipped[off + 40] ^= 0x10
    with pytest.raises(ValueError, match="(?i)crc|corrupt"):
        ex.load(write("flip.pt", bytes(flipped)))
    # no ALRW entry: a plain TorchScript file
    with ex._quiet_torchscript():
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(tmp_path / "plain.pt"))
    with pytest.raises(ValueError, match="without 'autolr/weights.bin'"):
        ex.load(tmp_path / "plain.pt")
    # the blob parser itself: wrong version (CRC fixed up), wrong count, trailing bytes, bad magic
    blob = bytearray(good[off : off + length])

    def recrc(b):
        b = bytearray(b)
        b[-4:] = struct.pack("<I", zlib.crc32(bytes(b[:-4])) & 0xFFFFFFFF)
        return bytes(b)

    v = bytearray(blob)
    v[4:8] = struct.pack("<I", 7)
    with pytest.raises(ValueError, match="version 7 is not supported"):
        ex.unpack_weights(recrc(v))
    w = bytearray(blob)
    w[24:28] = struct.pack("<I", struct.unpack_from("<I", blob, 24)[0] + 1)
    with pytest.raises(ValueError, match="weight count"):
        ex.unpack_weights(recrc(w))
    with pytest.raises(ValueError, match="expected"):
        ex.unpack_weights(bytes(blob) + b"\0\0\0\0")
    with pytest.raises(ValueError, match="magic"):
        ex.unpack_weights(b"XXXX" + bytes(blob[4:]))
    with pytest.raises(ValueError, match="truncated"):
        ex.unpack_weights(bytes(blob[:10]))
    nan = bytearray(blob)
    nan[28:32] = struct.pack("<f", float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        ex.unpack_weights(recrc(nan))
    assert ex.unpack_weights(bytes(blob)).gamma == pytest.approx(0.1)


def test_cli_checkpoint_and_cmake_dir(tmp_path, capsys):
    net = _net(6, 1, seed=9)
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    assert ex.main(["--checkpoint", str(tmp_path / "sd.pt"), "--gamma", "0.2", "-o", str(tmp_path / "o.pt")]) == 0
    back = ex.load(tmp_path / "o.pt")
    assert back.gamma == pytest.approx(0.2) and back.controller.hidden_size == 6
    capsys.readouterr()
    assert ex.main(["--cmake-dir"]) == 0
    cmake_dir = capsys.readouterr().out.strip()
    assert os.path.isfile(os.path.join(cmake_dir, "autolrConfig.cmake"))
    assert ex.main(["--include-dir"]) == 0
    assert os.path.isfile(os.path.join(capsys.readouterr().out.strip(), "autolr.h"))
    # errors: missing gamma (argparse exits 2), bad checkpoint (message, 2)
    with pytest.raises(SystemExit) as exc:
        ex.main(["--checkpoint", str(tmp_path / "sd.pt"), "-o", str(tmp_path / "x.pt")])
    assert exc.value.code == 2
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert ex.main(["--checkpoint", str(tmp_path / "junk.pt"), "--gamma", "0.1", "-o", str(tmp_path / "x.pt")]) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_official_checkpoint_matches_reference(tmp_path):
    src = os.path.join(OFFICIAL, "mlr_snet_200.pth")
    if not os.path.exists(src):
        pytest.skip(f"published checkpoints not found at {OFFICIAL}")
    out = tmp_path / "official.pt"
    assert ex.main(["--official", src, "--gamma", "0.1", "-o", str(out)]) == 0
    net = MLRSNet.from_official(src)
    losses = _losses(300, seed=1)
    want, _, _ = _reference_rates(net, 0.1, losses)
    mod = ex.load_torchscript(out)
    got = [float(mod.step(torch.tensor(v))) for v in losses]
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-6


def test_exported_module_matches_autolr_rates(tmp_path):
    """The exported module reproduces the rates AutoLR itself (dispatch path) wrote, step by step."""
    net = _net(16, 1, seed=11)
    path = ex.export(net, tmp_path / "c.pt", gamma=0.3)
    mod = ex.load_torchscript(path)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = AutoLR(opt, net, gamma=0.3)
    losses = _losses(300, seed=12)
    err = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # AutoLR warns once about the NaN / negative losses
        for v in losses:
            p.grad = torch.ones(3)
            sched.step(torch.tensor(v))
            opt.step()
            err = max(err, abs(float(sched.rate) - float(mod.step(torch.tensor(v)))))
    assert err <= 1e-6, err


@pytest.mark.parametrize("case", ["too_many_layers", "inf_state", "nan_weight", "tiny_gamma", "huge_gamma"])
def test_export_refuses_what_no_reader_would_open(tmp_path, case):
    """Checked before anything is written: the file export writes always loads."""
    net, gamma = _net(4, 1, seed=1), 0.1
    if case == "too_many_layers":
        net = MLRSNet(hidden_size=2, num_layers=ex.MAX_LAYERS + 1, gate_order="train")
    with torch.no_grad():
        if case == "inf_state":
            net.h[0, 0] = float("inf")
        if case == "nan_weight":
            next(iter(net.parameters())).view(-1)[0] = float("nan")
    gamma = {"tiny_gamma": 1e-50, "huge_gamma": 1e39}.get(case, gamma)
    with pytest.raises(ValueError, match="layers=17|NaN/Inf|float32"):
        ex.export(net, tmp_path / "a.pt", gamma=gamma)
    assert os.listdir(tmp_path) == []


def test_load_decodes_little_endian_on_a_big_endian_host(tmp_path, monkeypatch):
    net = _net(6, 2, seed=3)
    path = ex.export(net, tmp_path / "c.pt", gamma=0.05)
    little = ex.load(path)
    monkeypatch.setattr(ex.sys, "byteorder", "big")
    big = ex.load(path)
    for a, b in zip(little.controller.flat_weights(), big.controller.flat_weights()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert big.gamma == little.gamma and big.rate == little.rate


def test_load_names_a_damaged_entry_and_a_folder(tmp_path):
    path = ex.export(_net(), tmp_path / "good.pt", gamma=0.1)
    data = bytearray(open(path, "rb").read())
    off, _ = _blob_span(bytes(data))
    data[off + 40] ^= 0x10  # inside the stored entry: the zip's own CRC fails first
    (tmp_path / "flip.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is corrupted"):
        ex.load(tmp_path / "flip.pt")
    with pytest.raises(ValueError, match="is a folder"):
        ex.load(tmp_path)


def test_cli_unknown_pretrained_name_is_an_error_message(tmp_path, capsys):
    assert ex.main(["--pretrained", "no-such-controller", "-o", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no pretrained controller 'no-such-controller'") and "Traceback" not in err


def test_a_failed_export_leaves_no_file(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ex.torch.jit, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        ex.export(_net(), tmp_path / "a.pt", gamma=0.1)
    assert os.listdir(tmp_path) == []


def _autolr_after_three_steps(**kwargs) -> AutoLR:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=8), **kwargs)
    for _ in range(3):
        opt.zero_grad()
        loss = model(torch.ones(1, 2)).square().sum()
        loss.backward()
        sched.step(loss)
        opt.step()
    return sched


def test_exporting_an_autolr_with_an_envelope_warns_and_the_file_is_readable_by_others(tmp_path):
    import stat

    sched = _autolr_after_three_steps(total_steps=20)
    old = os.umask(0o022)
    try:
        with pytest.warns(RuntimeWarning, match=r"envelope \(total_steps=20, warmup_steps=1, envelope='wsd', "
                                                     r"decay_steps=4\) is not exported"):
            path = ex.export(sched, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_exporting_after_a_finished_warm_up_without_total_steps_does_not_warn(tmp_path):
    sched = _autolr_after_three_steps(warmup_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ex.export(sched, tmp_path / "c.pt")  # the warm-up is over: nothing of the run is lost


def test_export_warns_that_group_scales_stay_with_the_trainer(tmp_path):
    import warnings as w

    from autolr_fast import AutoLR, MLRSNet, export

    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = torch.optim.SGD([{"params": a.parameters(), "lr": 0.1}, {"params": b.parameters(), "lr": 0.01}], lr=0.1)
    sched = AutoLR(opt, MLRSNet(hidden_size=8))
    for p in (*a.parameters(), *b.parameters()):
        p.grad = torch.zeros_like(p)
    sched.step(torch.tensor(1.0))
    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        export(sched, tmp_path / "c.pt")
    assert any("that rate times [1.0, 0.1]" in str(x.message) for x in caught)


def test_a_compressed_weights_entry_is_refused_before_it_is_inflated(tmp_path):
    import zipfile

    from autolr_fast import MLRSNet, export, load
    from autolr_fast.exporting import WEIGHTS_ENTRY

    src = export(MLRSNet(hidden_size=8), tmp_path / "c.pt", gamma=0.1)
    with zipfile.ZipFile(src) as zf:
        blob = zf.read(next(n for n in zf.namelist() if n.endswith(WEIGHTS_ENTRY)))
    bad = tmp_path / "deflated.pt"
    with zipfile.ZipFile(bad, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("c/extra/" + WEIGHTS_ENTRY, blob)
    with pytest.raises(ValueError, match="compressed"):
        load(bad)


def test_cli_exports_a_saved_controller_file_with_its_gamma(tmp_path, capsys):
    """A file of save_controller (meta-training snapshots, meta-train --ship) exports from the command
    line, at the gamma it carries unless --gamma is given; an action controller is refused."""
    from autolr_fast import load_pretrained, save_controller

    net = _net(6, 1, seed=3)
    save_controller(net, tmp_path / "ctrl.pt", gamma=0.3)
    assert ex.main(["--checkpoint", str(tmp_path / "ctrl.pt"), "-o", str(tmp_path / "a.pt")]) == 0
    back = ex.load(tmp_path / "a.pt")
    assert back.gamma == pytest.approx(0.3) and back.controller.hidden_size == 6
    assert ex.main(["--checkpoint", str(tmp_path / "ctrl.pt"), "--gamma", "0.1", "-o", str(tmp_path / "b.pt")]) == 0
    assert ex.load(tmp_path / "b.pt").gamma == pytest.approx(0.1)
    load_pretrained("action-mlp").save(str(tmp_path / "action.pt"), "mlp")
    capsys.readouterr()
    assert ex.main(["--checkpoint", str(tmp_path / "action.pt"), "--gamma", "0.1", "-o", str(tmp_path / "c.pt")]) == 2
    assert "MLR-SNet controllers only" in capsys.readouterr().err


def test_a_cut_file_is_called_truncated_and_a_missing_folder_is_named(tmp_path):
    good = tmp_path / "good.pt"
    ex.export(_net(6, 1, seed=4), good, gamma=0.1)
    data = good.read_bytes()
    for n in (100, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.pt").write_bytes(data[:n])
        with pytest.raises(ValueError, match="truncated or damaged"):
            ex.load(tmp_path / "cut.pt")
    with pytest.raises(FileNotFoundError, match="the folder .*missing does not exist"):
        ex.export(_net(6, 1, seed=4), tmp_path / "missing" / "x.pt", gamma=0.1)


def test_a_text_file_is_named_as_no_torch_file():
    from autolr_fast import load_controller

    path = os.path.join(os.path.dirname(__file__), "..", "README.md")
    with pytest.raises(ValueError, match="not a torch.save file, or damaged"):
        load_controller(path)
