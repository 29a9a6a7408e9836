"""The Triton Inference Server to run: the one shipped inside the nvidia-pytriton wheel (with our private
backends tree), or a system install such as NGC's image's (``$MULTIADAPTER_TRITON_HOME``: /opt/tritonserver).

The wheel holds ``pytriton/tritonserver/{bin/tritonserver, backends/python/, python_backend_stubs/X.Y/}``
and the binaries' shared libraries in ``site-packages/nvidia_pytriton.libs``. Only these files are used,
never PyTriton's Python API. The Python backend needs the ``triton_python_backend_stub`` built for the
interpreter that runs the models, so we assemble a copy of ``backends/python/`` with that stub added,
outside site-packages.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from server.errors import LaunchError

STUB_NAME = "triton_python_backend_stub"
# A system install (bin/tritonserver, backends/python with its stub built for the system Python), used as is.
TRITON_HOME_ENV = "MULTIADAPTER_TRITON_HOME"


@dataclass(frozen=True)
class TritonInstall:
    """Paths into an installed nvidia-pytriton wheel, or into a system install (`libs_dir` None)."""

    root: Path  # site-packages/pytriton/tritonserver, or e.g. /opt/tritonserver
    libs_dir: Path | None  # site-packages/nvidia_pytriton.libs; None for a system install

    @property
    def system(self) -> bool:
        return self.libs_dir is None

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    @property
    def stubs_dir(self) -> Path:
        return self.root / "python_backend_stubs"

    def stub_versions(self) -> list[str]:
        """The ``X.Y`` Python versions the wheel has a backend stub for, sorted numerically."""
        found = [path.parent.name for path in self.stubs_dir.glob(f"*/{STUB_NAME}")]
        return sorted(found, key=lambda version: tuple(int(part) for part in version.split(".")))

    def stub(self, python_version: tuple[int, int]) -> Path:
        """The backend stub for ``python_version`` (major, minor); LaunchError if the wheel has none."""
        version = f"{python_version[0]}.{python_version[1]}"
        path = self.stubs_dir / version / STUB_NAME
        if not path.is_file():
            available = ", ".join(self.stub_versions()) or "none"
            raise LaunchError(
                f"no Triton Python backend stub for Python {version} in {self.stubs_dir} "
                f"(available: {available}); run the server with one of those Python versions"
            )
        return path


def find_triton_install(env: Mapping[str, str] | None = None) -> TritonInstall:
    """The system install at $MULTIADAPTER_TRITON_HOME when set, else tritonserver inside the installed
    nvidia-pytriton wheel (found without importing pytriton)."""
    home = (os.environ if env is None else env).get(TRITON_HOME_ENV)
    if home:
        install = TritonInstall(root=Path(home), libs_dir=None)
        if not os.access(install.binary, os.X_OK):
            raise LaunchError(f"${TRITON_HOME_ENV} is {home!r}, which has no executable bin/tritonserver")
        if not (install.python_backend / STUB_NAME).is_file():
            raise LaunchError(f"${TRITON_HOME_ENV} is {home!r}, which has no Python backend with its stub")
        return install
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError("nvidia-pytriton is not installed in this Python environment; run `make venv`")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    install = TritonInstall(
        root=package_dir / "tritonserver",
        libs_dir=package_dir.parent / "nvidia_pytriton.libs",
    )
    if not os.access(install.binary, os.X_OK):
        raise LaunchError(f"the nvidia-pytriton wheel has no executable tritonserver at {install.binary}")
    return install


def prepare_backends(
    install: TritonInstall,
    build_root: Path,
    python_version: tuple[int, int] | None = None,
) -> Path:
    """Assemble ``<build_root>/backends/python`` and return ``<build_root>/backends``.

    The tree is the wheel's ``backends/python/`` plus the stub for ``python_version`` (default: the
    running interpreter). A stub the wheel's own ``backends/python/`` may hold (PyTriton drops the one for
    whatever Python ran it there) is never copied: only the one for ``python_version`` is. Files are copied
    only when missing or different in size or mtime, and each copy replaces its target atomically, so a
    server already running from the tree is not disturbed.
    """
    if install.system:  # its stub is built for the system's Python: used in place
        return install.root / "backends"
    version = python_version or (sys.version_info.major, sys.version_info.minor)
    backends_dir = build_root / "backends"
    python_dir = backends_dir / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    sources = [path for path in install.python_backend.iterdir() if path.is_file() and path.name != STUB_NAME]
    sources.append(install.stub(version))
    for source in sources:
        sync_file(source, python_dir / source.name)
    return backends_dir


def sync_file(source: Path, target: Path) -> bool:
    """Copy ``source`` to ``target`` (keeping mode and mtime) unless it is already there; True if copied."""
    if _same_file_stat(source, target):
        return False
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        shutil.copy2(source, tmp_name)
        # Replacing (not overwriting) avoids ETXTBSY when another server is executing the old stub.
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return True


def _same_file_stat(source: Path, target: Path) -> bool:
    try:
        src, dst = source.stat(), target.stat()
    except FileNotFoundError:
        return False
    return src.st_size == dst.st_size and src.st_mtime_ns == dst.st_mtime_ns
