"""The package as users install it: a wheel built from the source, installed into a fresh virtual
environment outside the checkout, and used from a folder that is not the checkout.

Offline: the wheel is built without build isolation (the test environment's setuptools) and
installed with ``--no-deps``; the dependencies come from the test environment's site-packages,
added to the fresh environment as a plain path entry (so none of that environment's ``.pth``
hooks run, e.g. an editable install of this project). Every import is checked to come from the
fresh environment.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, serve_process
from metaaligner_core.serve import free_port

pytestmark = pytest.mark.slow  # builds a wheel, makes a virtual environment, starts the server with the embedded model

SOURCES = ("pyproject.toml", "README.md", "requirements.txt", "metaaligner_core", "annotation", "webapp")


def _run(cmd, cwd, env, timeout=600):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder of the fresh environment, a working folder, its environment variables)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building in place would leave build/ and *.egg-info in the checkout
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
          str(tmp / "dist"), str(src)], cwd=tmp, env=env)
    wheels = list((tmp / "dist").glob("metaaligner-*.whl"))
    assert len(wheels) == 1, wheels

    target = tmp / "env"
    venv.EnvBuilder(with_pip=True).create(target)
    py = target / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp, env=env).stdout.strip())
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheels[0])], cwd=tmp, env=env)
    work = tmp / "work"
    work.mkdir()
    return target / "bin", work, env, site


def test_the_wheel_holds_the_web_app_and_the_protocols(installed):
    bin_dir, work, env, site = installed
    code = ("import annotation, metaaligner_core, webapp, webapp.launch, webapp.align_tab; "
            "print(webapp.__file__); print(metaaligner_core.__file__); print(annotation.__file__)")
    files = _run([str(bin_dir / "python"), "-c", code], cwd=work, env=env).stdout.split()
    assert len(files) == 3 and all(Path(f).is_relative_to(site) for f in files), files
    assert (site / "annotation" / "protocols" / "imhi.yaml").is_file()
    assert not (site / "app.py").exists()  # the launcher script stays in the source tree


def test_the_command_line_works_from_the_wheel(installed):
    bin_dir, work, env, _ = installed
    out = _run([str(bin_dir / "metaaligner"), "--help"], cwd=work, env=env).stdout
    for command in ("align", "train", "evaluate", "annotate", "serve"):
        assert command in out
    out = _run([str(bin_dir / "metaaligner"), "annotate", "protocols"], cwd=work, env=env).stdout
    assert "imhi" in out and "correctness" in out and "2-paper-c3" in out  # read from the wheel's imhi.yaml


def test_serve_mounts_the_web_app_from_the_wheel(installed, embedded_dir):
    bin_dir, work, env, _ = installed
    port = free_port()
    log_path = work / "serve.log"
    env = {**env, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [str(bin_dir / "metaaligner"), "serve", "--port", str(port), "--max-new-tokens", "8",
           "--db", f"sqlite:///{work / 'annotations.db'}"]
    with serve_process(cmd, port=port, cwd=work, env=env, log_path=log_path) as url:
        page = httpx.get(url + "/ui/", timeout=30, follow_redirects=True)
        assert page.status_code == 200 and "<html" in page.text.lower()
        config = httpx.get(url + "/ui/config", timeout=30).json()
        labels = {c.get("props", {}).get("label") for c in config["components"]}
        assert {"Aligner (writes the correction)", "Query"} <= labels  # the Align tab of webapp
    assert "/ui is not served" not in log_path.read_text()
