"""The sdist is the whole project: package, tests (conftest and helpers too), bench, examples,
tools, the docs, LICENSE, README and CHANGELOG; its metadata carries the SPDX licence; its tests
collect once unpacked; README's set-up names every extra; the PEFT example says which extra it needs.
"""

from __future__ import annotations

import email.parser
import importlib.util
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What a checkout holds that the sdist must hold too: these directories whole, and these files.
TREES = ("tplora_kernels", "tests", "bench", "examples", "tools", "docs")
FILES = ("LICENSE", "README.md", "CHANGELOG.md", "pyproject.toml")


def _project_files() -> set[str]:
    out = set(FILES)
    for tree in TREES:
        for path in (ROOT / tree).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                out.add(path.relative_to(ROOT).as_posix())
    return out


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> dict:
    if importlib.util.find_spec("build") is None:
        pytest.skip("`build` is not installed (pip install build; the [test] extra carries it)")
    out = tmp_path_factory.mktemp("sdist")
    # No isolation: the [test] extra installs build-system.requires, and CI may not reach PyPI twice.
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(ROOT)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"python -m build --sdist failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    (archive,) = out.glob("*.tar.gz")
    with tarfile.open(archive) as tf:
        tf.extractall(out / "unpacked", filter="data")
    (top,) = (out / "unpacked").iterdir()
    return {"top": top, "files": {p.relative_to(top).as_posix() for p in top.rglob("*") if p.is_file()}}


def test_sdist_holds_the_project(sdist):
    """Every file of the project's trees (docs/ included) is in the sdist, and no bytecode."""
    missing = sorted(_project_files() - sdist["files"])
    assert not missing, f"{len(missing)} project files missing from the sdist: {missing[:20]}"
    stray = sorted(f for f in sdist["files"] if "__pycache__" in f or f.endswith(".pyc"))
    assert not stray, f"bytecode in the sdist: {stray[:10]}"


def test_sdist_license_metadata(sdist):
    """The sdist's metadata carries the SPDX licence and the full Apache-2.0 text, and every extra."""
    meta = email.parser.Parser().parsestr((sdist["top"] / "PKG-INFO").read_text())
    assert meta["License-Expression"] == "Apache-2.0", f"License-Expression {meta['License-Expression']!r}"
    assert meta.get_all("License-File") == ["LICENSE"], f"License-File {meta.get_all('License-File')}"
    text = (sdist["top"] / "LICENSE").read_text()
    for phrase in ("Apache License", "Version 2.0, January 2004", "TERMS AND CONDITIONS FOR USE, REPRODUCTION",
                   "9. Accepting Warranty or Additional Liability", "END OF TERMS AND CONDITIONS"):
        assert phrase in text, f"LICENSE lacks {phrase!r}: not the full Apache-2.0 text ({len(text)} chars)"
    extras = set(meta.get_all("Provides-Extra") or [])
    assert {"peft", "test", "bench"} <= extras, f"extras in the metadata: {sorted(extras)}"


def test_unpacked_sdist_tests_collect(sdist):
    """The unpacked sdist's own tests collect, importing its own package (not this checkout's)."""
    top = sdist["top"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=top, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"collection in the unpacked sdist failed (rc {proc.returncode}):\n" \
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    collected = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    wanted = {f for f in sdist["files"] if f.startswith("tests/") and f.rsplit("/", 1)[-1].startswith("test_")
              and f.endswith(".py")}
    assert wanted <= collected, f"test files that collected nothing: {sorted(wanted - collected)}"


def _setup_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Set up and run (fresh machine)")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_setup_names_every_extra():
    """README's set-up section names every extra of pyproject."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    section = _setup_section()
    missing = [name for name in extras if f"[{name}]" not in section]
    assert not missing, f"README's set-up section does not name the extras {missing} (it names those in [...])"


def test_peft_example_names_its_extra_without_peft():
    """Without peft the example exits with one line naming the extra, not a ModuleNotFoundError."""
    code = ("import runpy, sys; sys.modules['peft'] = None; "
            "runpy.run_path('examples/peft_example.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "[peft]" in proc.stderr and "Traceback" not in proc.stderr, \
        f"rc {proc.returncode}, stderr {proc.stderr[-2000:]!r}"
