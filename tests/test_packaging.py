"""The built wheel works from a fresh venv, anywhere: the default policy ships as package data."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LOOP = """
import torch, controller, pathlib
assert pathlib.Path(controller.__file__).resolve().is_relative_to(pathlib.Path({site!r}).resolve()), controller.__file__
from controller import PolicyScheduler, default_policy_path
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
sched = PolicyScheduler(opt, total_epochs=3)
x, y = torch.randn(128, 4), torch.randn(128, 1)
for epoch in range(3):
    for i in range(0, 128, 32):
        opt.zero_grad(); loss = torch.nn.functional.mse_loss(model(x[i:i+32]), y[i:i+32]); loss.backward(); opt.step()
    sched.step(loss.item(), train_loss=loss.item())
print("OK", default_policy_path(), len(sched.history))
"""


def test_wheel_installs_in_a_fresh_venv_and_runs_the_default_policy(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(ROOT)], check=True, cwd=tmp_path)
    wheel = next(wheels.glob("lrcontrol-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # The wheel itself, non-editable; its heavy dependencies are borrowed from this test's environment
    # through a .pth file (CI's own `pip install` proves they resolve).
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "_borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    out = subprocess.run([str(python), "-c", LOOP.format(site=site)], cwd=workdir, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OK ") and "site-packages/controller/checkpoints/default.safetensors" in out.stdout
