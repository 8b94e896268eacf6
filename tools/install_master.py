"""Install CompressAI master beside the project's compressai, in a folder of its own.

    python tools/install_master.py [--dir DIR] [--package SPEC] [--force]

CompressAI master is published on PyPI as the source distribution ``compressai-temp`` (it installs
the ``compressai`` package and compiles a small C++ extension, so it needs a C++ compiler and
``pybind11``).  Its wavelet layers import ``pytorch_wavelets``, which imports ``pkg_resources``, gone
from setuptools 81 on.  All three go into one folder with ``pip install --no-deps --target``, never
into the environment: the environment keeps its own compressai (PyPI 1.2.8), and whoever puts the
folder first on ``PYTHONPATH`` gets master::

    PYTHONPATH=$(python tools/install_master.py) lic-verify SRC --target installed

The folder is ``--dir``, else ``$LIC_MASTER_DIR``, else ``~/.cache/lic-checkpoints/compressai-master``.
A folder built before (it holds ``.lic-master.json``, written last, for this Python) is reused as it
is.  A new one is built in a temporary folder beside it, checked (master's class of every family the
registry names must import from it) and only then renamed into place, so an interrupted build leaves
nothing half-made behind.

On success the folder's path is the only line on stdout (progress goes to stderr).  Without a
compiler, without the package, or when the build fails, one line on stderr says why and the exit
status is 1 (2 for a usage error); pip's full output is kept in ``<folder>.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

#: what CI installs: the snapshot of CompressAI master the project measured (docs/compressai-master.md)
DEFAULT_PACKAGE = "compressai-temp==1.2.9.dev0"
#: installed beside it: master's wavelet layers import pytorch_wavelets, which needs pkg_resources
COMPANIONS = ("pytorch_wavelets", "setuptools<81")
MARKER = ".lic-master.json"
ENV_VAR = "LIC_MASTER_DIR"


class InstallError(Exception):
    """A failure the user can act on; its message is one line."""


def default_dir() -> Path:
    """Where the master folder lives: ``$LIC_MASTER_DIR``, else the user cache."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "lic-checkpoints" / "compressai-master"


def python_tag() -> str:
    """The interpreter a compiled extension in the folder was built for."""
    return f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}-{sysconfig.get_platform()}"


def read_marker(folder: Path) -> dict | None:
    """The folder's record of a finished build, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def usable(folder: Path) -> str | None:
    """Why ``folder`` cannot be used as it is (None: it can)."""
    marker = read_marker(folder)
    if marker is None:
        return f"{folder} holds no finished build ({MARKER} is missing)"
    if marker.get("python") != python_tag():
        return f"{folder} was built for {marker.get('python')}, this is {python_tag()}"
    if not (folder / "compressai" / "__init__.py").is_file():
        return f"{folder} has no compressai package"
    return None


def find_compiler() -> str:
    """The C++ compiler pip's build will call (``$CXX``, Python's configured one, ``c++`` or ``g++``)."""
    candidates = []
    if os.environ.get("CXX"):
        candidates.append(os.environ["CXX"].split()[0])
    else:
        configured = (sysconfig.get_config_var("CXX") or "").split()
        candidates += configured[:1] + ["c++", "g++", "clang++"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    raise InstallError(f"no C++ compiler found (tried {', '.join(candidates)}); compressai-temp compiles a C++ "
                       "extension: install g++ (e.g. apt-get install g++) or set CXX")


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _pip_error(log: str) -> str:
    """The most telling line of pip's output."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for marker in ("ERROR: No matching distribution", "ERROR: Could not find a version", "error: command",
                   "fatal error:", "ERROR:"):
        for line in lines:
            if marker in line:
                return line
    return lines[-1] if lines else "no output"


def build(folder: Path, package: str, say) -> dict:
    """Install ``package`` and its companions into a new folder beside ``folder``, check, rename."""
    compiler = find_compiler()
    folder.parent.mkdir(parents=True, exist_ok=True)
    log_path = folder.with_name(folder.name + ".log")
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--disable-pip-version-check",
                   "--target", str(staging), package, *COMPANIONS]
        # Build in this environment when it has the build requirements (no download; the extension
        # is plain pybind11 and links no torch); otherwise let pip fetch them into an isolated build.
        if all(_has_module(m) for m in ("pybind11", "setuptools", "wheel")):
            command.insert(4, "--no-build-isolation")
        say(f"installing {package} ({' '.join(COMPANIONS)}) into {folder} with {compiler}; log: {log_path}")
        started = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True)
        log_path.write_text(f"$ {' '.join(command)}\n{run.stdout}\n{run.stderr}")
        if run.returncode != 0:
            raise InstallError(f"pip could not install {package}: {_pip_error(run.stdout + run.stderr)} "
                               f"(full log: {log_path})")
        problem = check(staging)
        if problem:
            raise InstallError(f"{package} installed but does not work: {problem} (log: {log_path})")
        marker = {"package": package, "companions": list(COMPANIONS), "python": python_tag(),
                  "compiler": compiler, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "build_seconds": round(time.perf_counter() - started, 1)}
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp made it private
        if folder.exists() and usable(folder) is not None:
            shutil.rmtree(folder)  # ours: the caller checked that it holds a (stale) build of ours
        try:
            staging.rename(folder)
        except OSError:
            if usable(folder) is None:  # another build finished first: use it
                return read_marker(folder)
            raise
        return marker
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


#: run with the new folder first on PYTHONPATH: compressai must come from it, and master's class of
#: every family the registry names must import
_CHECK = r"""
import sys, warnings
from pathlib import Path
warnings.simplefilter("ignore")
folder = Path(sys.argv[1]).resolve()
import compressai
if folder not in Path(compressai.__file__).resolve().parents:
    sys.exit(f"compressai is imported from {compressai.__file__}, not from the new folder")
import pytorch_wavelets
from lic_checkpoints.convert import registry
for family in registry.families():
    spec = family.target.get("compressai_class")
    if spec:
        registry.import_class(spec)
print(compressai.__version__)
"""


def check(folder: Path) -> str | None:
    """Why the master in ``folder`` does not import (None: it does)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])]))
    run = subprocess.run([sys.executable, "-c", _CHECK, str(folder)], capture_output=True, text=True, env=env)
    if run.returncode == 0:
        return None
    lines = [line for line in (run.stderr or run.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {run.returncode}"


def install(folder: Path, package: str = DEFAULT_PACKAGE, force: bool = False, say=lambda m: None) -> Path:
    """The folder holding master, built unless a finished build for this Python is there already."""
    problem = usable(folder)
    if problem is None and not force:
        say(f"reusing {folder} ({read_marker(folder).get('package')})")
        return folder
    if folder.exists() and read_marker(folder) is None and any(folder.iterdir()):
        raise InstallError(f"{folder} exists and is not a folder this script built; remove it or choose another "
                           f"with --dir or ${ENV_VAR}")
    build(folder, package, say)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Install CompressAI master (compressai-temp) into its own folder "
                                                 "and print the folder.")
    parser.add_argument("--dir", type=Path, help=f"the folder (default: ${ENV_VAR}, else {default_dir()})")
    parser.add_argument("--package", default=DEFAULT_PACKAGE, help="what pip installs (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even when a finished build is there")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    say = (lambda m: None) if args.quiet else (lambda m: print(f"install_master: {m}", file=sys.stderr))
    folder = (args.dir or default_dir()).expanduser().resolve()
    try:
        install(folder, args.package, args.force, say)
    except InstallError as error:
        print(f"install_master: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"install_master: error: {folder}: {error.strerror or error}", file=sys.stderr)
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
