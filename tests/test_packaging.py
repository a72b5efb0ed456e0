"""The wheel ships the Hydra configs: fmtrain composes from an install that has no checkout beside it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_configs_compose_from_an_installed_wheel(tmp_path: Path) -> None:
    # From a copy of the sources: setuptools' build/ folder in a checkout keeps modules of earlier builds.
    source = tmp_path / "source"
    for name in ("fmtrain", "launch", "conf"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("fmtrain-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"fmtrain/conf/train.yaml", "fmtrain/conf/model/tiny.yaml", "launch/cli.py"} <= set(names)
    sources = {str(p.relative_to(ROOT)) for package in ("fmtrain", "launch") for p in (ROOT / package).rglob("*.py")}
    assert sources - set(names) == set(), "modules the wheel leaves out (pyproject's packages list)"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True)
    probe = (
        "from launch.compose import compose, conf_dir; "
        "print(conf_dir()); print(compose(['model=small', 'trainer.max_steps=5', 'trainer.device=cpu']).model.dim)"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {probe}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    conf, dim = result.stdout.split()
    assert Path(conf) == target / "fmtrain" / "conf"
    assert dim == "512"
