"""The README's set-up commands and CI stay in step, the CLI routes, the library stands alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from autolr_fast import AutoLR, load_pretrained
from autolr_fast.controllers.pretrained import available_pretrained

ROOT = Path(__file__).resolve().parents[1]


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.*?)\n```", text, re.S)
    assert m, f"README has no {marker} block"
    return m.group(1).strip()


def test_ci_installs_and_tests_exactly_as_the_readme_says():
    ci = (ROOT / ".ci" / "run").read_text()
    install = _readme_block("install-command")
    main_job = " && .venv/bin/python -m autolr_fast demo"
    assert install.endswith(main_job)
    assert install[: -len(main_job)] in ci, "CI must install with the README's command"
    assert _readme_block("test-command") in ci, "CI must run the README's test command"


def test_gpu_check_script_parses_and_names_real_benchmarks():
    """.ci/gpu-check only runs on a GPU machine; here: valid bash, and what it runs exists."""
    script = ROOT / ".ci" / "gpu-check"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    named = re.findall(r"bench/test_bench_\w+\.py", script.read_text())
    assert named, "gpu-check names no benchmark file"
    for rel in named:
        assert (ROOT / rel).is_file(), f".ci/gpu-check runs {rel}, which does not exist"


def test_public_api_is_exactly_what_init_declares():
    import autolr_fast

    public = {n for n in dir(autolr_fast) if not n.startswith("_")}
    modules = {n for n in public if type(getattr(autolr_fast, n)).__name__ == "module"}
    assert public - modules == set(autolr_fast.__all__) - {"__version__"}


def test_cli_help_and_unknown_command():
    out = subprocess.run([sys.executable, "-m", "autolr_fast", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "demo" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "autolr_fast", "nope"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "unknown command" in bad.stderr


def test_shipped_controller_loads():
    ctrl = load_pretrained("mnist1d-cnn")
    assert ctrl.default_gamma > 0 and ctrl.info["task"] == "mnist1d-cnn"
    with pytest.raises(KeyError, match="available"):
        load_pretrained("no-such-controller")


def test_every_shipped_controller_loads_and_steps():
    assert {"mnist1d-cnn", "action-mlp"} <= set(available_pretrained())
    for name in available_pretrained():
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sched = AutoLR(opt, load_pretrained(name))
        loss = model(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        sched.step(loss)
        opt.step()
        assert 0 <= float(sched.last_rate) <= float(sched.gamma), name


def test_import_autolr_fast_loads_no_harness():
    """The library needs torch and tqdm only: importing it loads no harness module and none of the
    harness's dependencies (checked in a fresh interpreter)."""
    harness = ("autolr_experiments", "matplotlib", "mnist1d", "sklearn")
    code = f"import sys, autolr_fast; print(sorted(m for m in sys.modules if m.split('.')[0] in {harness!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", f"import autolr_fast loaded {out.stdout.strip()}"


_WITHOUT_EXTRAS = r"""
import os, sys, tempfile, warnings
warnings.simplefilter("ignore")
import torch
from torch import nn
from autolr_fast import AutoLR, MetaConfig, export, find_lr, load, load_pretrained

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
sched = AutoLR(opt, total_steps=20,
               meta=MetaConfig(model, [(x[:16], y[:16])], nn.functional.cross_entropy, interval=5))
for i in range(20):
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x[16:]), y[16:])
    loss.backward()
    sched.step(loss)
    opt.step()
assert sched.meta.meta_steps == 4 and 0.0 <= float(sched.last_rate) < 0.1
res = find_lr(model, opt, nn.functional.cross_entropy, [(x, y)] * 4, num=8, horizons=(1,), plot=None)
assert res.suggestion > 0
path = os.path.join(tempfile.mkdtemp(), "c.pt")
export(load_pretrained("default"), path, gamma=0.1)
assert load(path).gamma > 0
loaded = {m.split(".")[0] for m in sys.modules}
assert not loaded & {"numpy", "matplotlib", "mnist1d", "sklearn", "autolr_experiments"}, loaded
print("ok")
"""
# what the library must do without: NumPy, the harness's and the frameworks' packages
_NOT_INSTALLED = ("numpy", "matplotlib", "mnist1d", "sklearn", "scikit_learn", "scipy", "lightning",
                  "pytorch_lightning", "transformers", "accelerate", "autolr_experiments")


def test_library_works_with_torch_and_tqdm_only(tmp_path):
    """The library needs torch and tqdm only: AutoLR (default controller and scale, meta-steps),
    find_lr, export/load and the shipped controllers run in an interpreter whose site-packages
    lack NumPy, the harness's and the frameworks' packages (a copy of site-packages without
    them, ``python -S``)."""
    import sysconfig

    packages = sysconfig.get_paths()["purelib"]
    bare = tmp_path / "site-packages"
    bare.mkdir()
    for entry in os.listdir(packages):
        top = entry.split("-")[0].split(".")[0].lower()
        if top in _NOT_INSTALLED or entry.endswith(".pth") or entry.startswith("__editable__"):
            continue
        os.symlink(os.path.join(packages, entry), bare / entry)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(bare), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-S", "-c", _WITHOUT_EXTRAS], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("value, minimum, ok", [(3, 1, True), (1, 1, True), (0, 1, False), (0, 0, True), (-1, 0, False),
                                                (True, 0, False), (False, 0, False), (2.0, 1, False), ("2", 1, False),
                                                (None, 0, False), (__import__("numpy").int64(3), 1, True),
                                                (__import__("numpy").bool_(True), 0, False)])
def test_is_whole_number(value, minimum, ok):
    from autolr_fast.checks import is_whole_number
    assert is_whole_number(value, minimum) is ok
