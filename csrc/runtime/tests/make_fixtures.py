"""Generate the C++ runtime test fixtures: small exported controllers + expected rates.

    python csrc/runtime/tests/make_fixtures.py [OUT_DIR]   (default: csrc/runtime/tests/data)

For each fixture: ``<name>.pt`` (written by ``autolr_fast.export``) and
``<name>_rates.csv`` with columns ``step,loss,rate``: the rate after each step computed by the
Python reference (``reference.mlrsnet_guarded_step``), on a fixed loss sequence that includes
NaN, +-Inf and negative losses. tests/test_runtime_cmake.py regenerates them and checks the
committed copies against the current Python code; ctest checks the C++ runtime against them.
"""

from __future__ import annotations

import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "..")))

from autolr_fast import (
    MLRSNet,  # noqa: E402
    export,  # noqa: E402
)
from autolr_fast.ops import reference  # noqa: E402

# name: (hidden, layers, gamma, seed)
FIXTURES = {
    "controller_h16_l1": (16, 1, 0.5, 1),
    "controller_h7_l2": (7, 2, 0.25, 2),
}
STEPS = 300


def loss_sequence(seed: int, steps: int = STEPS) -> list[float]:
    g = torch.Generator().manual_seed(1000 + seed)
    t = torch.arange(steps, dtype=torch.float64)
    base = 2.3 * torch.exp(-t / 120.0) + 0.05 + 0.3 * torch.rand(steps, generator=g, dtype=torch.float64)
    seq = base.float().tolist()
    for i, v in ((5, math.nan), (6, math.inf), (40, -0.5), (77, -math.inf), (150, 25.0), (151, math.nan), (200, 0.0)):
        if i < steps:
            seq[i] = v
    return seq


def make_controller(hidden: int, layers: int, seed: int) -> MLRSNet:
    torch.manual_seed(seed)
    net = MLRSNet(hidden_size=hidden, num_layers=layers)
    with torch.no_grad():  # larger than default init so that the state matters
        for p in net.parameters():
            p.mul_(2.0)
    return net


def reference_rates(net: MLRSNet, gamma: float, losses: list[float]) -> list[float]:
    h = torch.zeros(net.num_layers, net.hidden_size)
    c = torch.zeros_like(h)
    rate = torch.zeros(())
    g = torch.tensor(gamma, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for v in losses:
            rate, h, c, _ = reference.mlrsnet_guarded_step(torch.tensor(v, dtype=torch.float32), h, c,
                                                           net.flat_weights(), g, rate)
            out.append(float(rate))
    return out


def generate(out_dir: str) -> dict[str, tuple[str, str]]:
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name, (hidden, layers, gamma, seed) in FIXTURES.items():
        net = make_controller(hidden, layers, seed)
        pt = os.path.join(out_dir, f"{name}.pt")
        export(net, pt, gamma=gamma)
        losses = loss_sequence(seed)
        rates = reference_rates(net, gamma, losses)
        csv = os.path.join(out_dir, f"{name}_rates.csv")
        with open(csv, "w", encoding="ascii", newline="\n") as f:
            f.write("step,loss,rate\n")
            for i, (x, r) in enumerate(zip(losses, rates)):
                f.write(f"{i},{x!r},{r:.9g}\n")
        written[name] = (pt, csv)
    return written


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "data")
    for name, (pt, csv) in generate(out).items():
        print(f"{name}: {pt} ({os.path.getsize(pt)} bytes), {csv}")
