"""The wheels the GPU acceptance kit needs on a bare GPU node, downloaded here, into an ignored folder.

The node is assumed to hold Python 3.12 on manylinux x86_64 with torch (CUDA), transformers 5, triton,
accelerate and safetensors (and their own dependencies); no network, no Transformer Engine. Steps:
  1. megatron-core and nvidia-modelopt at the current leg's pins (requirements/current-constraints.txt),
  2. what they import when loaded that such an image lacks (NOT_IN_IMAGE, found by running the kit with only
     the image's distributions), at the versions the current leg runs (this interpreter's own),
  3. nemo-optim itself as a wheel (not nemo-run: the kit does not launch through it),
  4. the total checked against the limit, and the one install line for the node printed.

    .venv-current/bin/python -m benchmarks.gpu_wheels                   # -> build/gpu-wheels/
    .venv-current/bin/python -m benchmarks.gpu_wheels --with pydantic   # an image without it

Run it with the current leg's interpreter (`make setup LEG=current`): it reads the versions it pins from there.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "requirements" / "current-constraints.txt"
PINNED = ("megatron-core", "nvidia-modelopt")
# Imported when megatron-core / ModelOpt load (`import modelopt.torch` imports all three of pulp, scipy and
# omegaconf; ModelOpt 0.47's dataset utilities import requests without declaring it) and absent from the
# dependency closure of torch + transformers 5 + triton + accelerate + safetensors. nvidia-ml-py is declared by
# ModelOpt and imported only on GPU memory paths (50 KiB). Not ninja: with it ModelOpt tries to JIT-compile its CUDA
# extensions on the node (minutes where nvcc exists); without it ModelOpt warns once and uses its torch kernels.
NOT_IN_IMAGE = ("pulp", "scipy", "omegaconf", "requests", "urllib3", "charset-normalizer", "nvidia-ml-py")
DEFAULT_OUT = REPO / "build" / "gpu-wheels"


class WheelsError(RuntimeError):
    """Something to fix before the wheels can be made, in one line."""


def pinned_versions(constraints: Path = CONSTRAINTS) -> dict[str, str]:
    """name -> version of every `name==version` line of a constraints file."""
    pins = {}
    for line in constraints.read_text().splitlines():
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;#]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def wanted(extra: list[str]) -> list[str]:
    """`name==version` of every wheel to download: PINNED from the constraints (this interpreter must have
    them: it is the leg the kit was tested on), NOT_IN_IMAGE and `extra` at this interpreter's versions."""
    pins = pinned_versions()
    specs = []
    for name in PINNED:
        installed = _installed(name)
        if installed != pins[name]:
            raise WheelsError(f"{name} {installed or 'is not installed'} here but {CONSTRAINTS.name} pins "
                              f"{pins[name]}: run this with the current leg's interpreter (make setup LEG=current; "
                              f".venv-current/bin/python)")
        specs.append(f"{name}=={pins[name]}")
    for name in (*NOT_IN_IMAGE, *extra):
        if "==" in name:
            specs.append(name)
        elif _installed(name) is None:
            raise WheelsError(f"{name} is not installed here, so no tested version is known; give it as "
                              f"{name}==VERSION")
        else:
            specs.append(f"{name}=={_installed(name)}")
    return specs


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    completed = subprocess.run(command, cwd=REPO)
    if completed.returncode:
        raise WheelsError(f"{command[2]} {command[3]} exited {completed.returncode} (its output is above)")


# what pyproject.toml builds nemo-optim's wheel from (its packages, their package-dir, its readme)
WHEEL_SOURCES = ("pyproject.toml", "README.md", "nemo_optim", "recipes")


def download(specs: list[str], out: Path, python_version: str, platform: str) -> None:
    """The node's wheels (binary only, for its interpreter and platform, no dependencies) and ours."""
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--platform", platform,
          "--python-version", python_version, "--implementation", "cp", "--no-deps", "--dest", str(out), *specs])
    # built from a fresh copy of its sources: setuptools' in-tree build/lib would carry deleted modules along,
    # and the repository gets no build/lib or egg-info; this interpreter's setuptools builds it, as `make setup` does
    with tempfile.TemporaryDirectory(prefix="nemo_optim_wheel_") as source:
        for name in WHEEL_SOURCES:
            if (REPO / name).is_dir():
                shutil.copytree(REPO / name, Path(source) / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(REPO / name, Path(source) / name)
        _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir",
              str(out.resolve()), source])


def report(out: Path, limit_mib: float) -> float:
    """Prints every wheel's size and the total; fails when the total is over `limit_mib`."""
    wheels = sorted(out.glob("*.whl"), key=lambda path: -path.stat().st_size)
    total = sum(path.stat().st_size for path in wheels) / 2**20
    for path in wheels:
        print(f"{path.stat().st_size / 2**20:8.2f} MiB  {path.name}")
    print(f"{total:8.2f} MiB  total ({len(wheels)} wheels; limit {limit_mib:g} MiB)")
    if total > limit_mib:
        raise WheelsError(f"the wheels in {out} total {total:.1f} MiB, over the {limit_mib:g} MiB limit; the "
                          f"largest is {wheels[0].name}")
    return total


def install_line(out: Path) -> str:
    shown = out.relative_to(REPO) if out.is_relative_to(REPO) else out
    return (f"pip install --no-index --no-deps --target \"$PWD/gpu-site\" {shown}/*.whl\n"
            f"PYTHONPATH=\"$PWD/gpu-site\" python -m benchmarks.gpu_acceptance --out benchmarks/results")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the wheels' folder (emptied of wheels first)")
    parser.add_argument("--python-version", default="3.12", help="the node's Python (default 3.12)")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64",
                        help="the node's platform tag (older manylinux tags are accepted with it)")
    parser.add_argument("--limit-mib", type=float, default=55.0, help="largest total allowed (default 55 MiB)")
    parser.add_argument("--with", dest="extra", nargs="*", default=[], metavar="NAME[==VERSION]",
                        help="more wheels, for a node that lacks them (e.g. pydantic pydantic-core rich)")
    args = parser.parse_args(argv)
    try:
        specs = wanted(args.extra)
        args.out.mkdir(parents=True, exist_ok=True)
        for old in args.out.glob("*.whl"):
            old.unlink()
        download(specs, args.out, args.python_version, args.platform)
        report(args.out, args.limit_mib)
    except WheelsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"\nOn the GPU node, in a copy of this repository holding these wheels:\n{install_line(args.out.resolve())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
