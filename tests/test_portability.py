"""Results that do not depend on the machine: the pinned kernels under emulated other CPUs.

This host can pretend to be an older CPU (``shared.kernels.EMULATED_CPUS``: each library's dispatcher
capped below the host's instruction set). First a control: without the pin, the emulation changes
the low-order bits of a short training run (so the test below could fail). Then the same run, and
whole chapters, on the pinned kernels must give identical bits and identical results files. What
cannot be emulated here: a CPU *newer* than the host (AVX-512 on this AVX2 machine); the pin covers it
by construction (every dispatcher is held at SSE4.1, which that CPU also has), and MKL's
``MKL_CBWR=COMPATIBLE`` is MKL's own guarantee across CPU vendors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import ROOT, comparable

from shared.book.execute import execute_one
from shared.kernels import EMULATED_CPUS, PINNED_ENV

# A short deterministic training run touching every dispatcher: ATen (conv, matmul, exp), oneDNN,
# MKL (linear layers), numpy's SIMD loops and OpenBLAS. It prints one hash of everything it computed.
PROBE = r"""
import os, sys, hashlib
if sys.argv[1] == "pin":
    from shared.kernels import pin_cpu_kernels
    pin_cpu_kernels()
import numpy as np, torch
torch.manual_seed(0); torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(),
                          torch.nn.Linear(8 * 14 * 14, 10))
opt = torch.optim.Adam(net.parameters(), lr=1e-2)
x, y = torch.rand(256, 1, 16, 16, generator=g), torch.randint(0, 10, (256,), generator=g)
for _ in range(20):
    opt.zero_grad(); torch.nn.functional.cross_entropy(net(x), y).backward(); opt.step()
a = np.random.default_rng(0).standard_normal((256, 256))
h = hashlib.sha256()
for t in net.state_dict().values():
    h.update(t.detach().numpy().tobytes())
for arr in (np.exp(a.astype(np.float32)), np.tanh(a), a @ a):
    h.update(arr.tobytes())
print(torch.backends.cpu.get_cpu_capability(), h.hexdigest()[:16])
"""


def _probe(mode: str, extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in PINNED_ENV and k != "MKL_ENABLE_INSTRUCTIONS"}
    env.update({"OMP_NUM_THREADS": "1", **extra})
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="the emulated CPUs are x86-64 levels")
def test_the_emulation_changes_unpinned_bits_and_the_pin_removes_the_difference():
    host = _probe("host", {})
    emulated = {name: _probe("host", cpu) for name, cpu in EMULATED_CPUS.items()}
    assert all(e != host for e in emulated.values()), f"the emulation does not reach the kernels: {host} vs {emulated}"
    pinned = _probe("pin", {})
    assert pinned.startswith("DEFAULT ")
    for name, cpu in EMULATED_CPUS.items():
        assert _probe("pin", cpu) == pinned, f"pinned kernels under the emulated {name!r} CPU give other bits"
    assert _probe("pin", {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "OMP_NUM_THREADS": "2"}) == pinned


PORTABLE_NOTEBOOKS = ("book/entropy-in-one-page.ipynb", "templates/chapter.ipynb", "chapters/tta/lame.ipynb")
"""Chapters executed under an emulated CPU in every test run, from cold caches (source models trained
there too); ``make test-emulated`` runs every notebook the same way."""


@pytest.mark.slow
@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="the emulated CPUs are x86-64 levels")
@pytest.mark.parametrize("notebook", PORTABLE_NOTEBOOKS)
def test_chapters_under_an_emulated_cpu_write_the_committed_results(notebook, tmp_path):
    nb = ROOT / notebook
    results = tmp_path / "results"
    env = {**EMULATED_CPUS["sse4"], "ENTROPY_BOOK_RESULTS_DIR": str(results), "ENTROPY_BOOK_CACHE": str(tmp_path / "cache")}
    ex = execute_one(nb, output=tmp_path / nb.name, extra_env=env, timeout_s=900)
    assert ex.ok, ex.error
    part = nb.parent.name
    committed = ROOT / "results" / part / f"{nb.stem}.quick.json"
    assert comparable(results / part / f"{nb.stem}.quick.json") == comparable(committed)
