"""The wheel, as a user gets it: built from this repository, installed into a fresh virtualenv (no
editable link, no repository on sys.path) and driven through the ``bayeszoo`` console script from an
unrelated working directory.

To stay fast and offline the fresh venv does not download torch & co again: after the wheel is installed
(``--no-deps --no-index``), a ``.pth`` file in its site-packages appends the dev venv's site-packages to
``sys.path``. A path line in a ``.pth`` only extends ``sys.path``; ``.pth`` files inside the appended
directory are not processed, so the dev venv's editable-install finder for bayeszoo stays inactive and
every ``bayeszoo`` import must come from the wheel (checked below).
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
# import name -> repository folder, as setup.cfg's package_dir maps them
PACKAGE_DIRS = {"bayeszoo": "bayeszoo", "bayeszoo/models": "models", "bayeszoo/guides": "guides",
                "bayeszoo/inference": "inference"}
DATA_FILES = REPO / "inference" / "data_files"
# build outputs and local state that a source checkout may hold but a wheel must not depend on
NOT_SOURCE_AT_TOP = {".git", ".venv", "build", "dist", "runs", "data", "results", ".pytest_cache",
                     ".ruff_cache"}
TIMEOUT_S = 300


def _ignore_build_outputs(folder, names):
    ignored = {n for n in names if n == "__pycache__" or n.endswith(".egg-info")}
    if Path(folder).resolve() == REPO:
        ignored |= NOT_SOURCE_AT_TOP & set(names)
    return ignored


def _run(argv, **kwargs):
    """Run a command to completion; the caller asserts on its exit status and output."""
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=TIMEOUT_S,
                          **kwargs)


def _check(completed):
    assert completed.returncode == 0, (
        f"{' '.join(completed.args)} exited {completed.returncode}\n"
        f"stdout:\n{completed.stdout[-3000:]}\nstderr:\n{completed.stderr[-3000:]}")
    return completed


def _build_wheel(tmp: Path) -> Path:
    # Built from a copy: pip builds in-tree, and setuptools reuses build/lib, so a stale module left
    # there would leak into the wheel; the copy also keeps the repository's egg-info untouched.
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=_ignore_build_outputs)
    have_backend = all(importlib.util.find_spec(m) for m in ("setuptools", "wheel"))
    isolation = ["--no-build-isolation"] if have_backend else []  # else pip fetches the backend
    dist = tmp / "dist"
    _check(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--quiet",
                 "--disable-pip-version-check", "-w", dist, source]))
    wheels = list(dist.glob("bayeszoo-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _site_packages(python) -> Path:
    out = _check(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]))
    return Path(out.stdout.strip()).resolve()


def _dev_site_packages() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def _clean_env(fresh_bin: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1",
               PATH=f"{fresh_bin}{os.pathsep}{env.get('PATH', '')}")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, and a fresh venv with only that wheel installed; built once for the module."""
    tmp = tmp_path_factory.mktemp("packaging")
    wheel = _build_wheel(tmp)
    venv = tmp / "fresh"
    # no pip of its own (ensurepip costs ~5 s of CPU): the dev venv's pip installs into it (--python)
    _check(_run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", venv]))
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    _check(_run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
                 "--quiet", "--disable-pip-version-check", wheel]))
    site = _site_packages(python)
    # written after the install, so pip never sees the dev venv's bayeszoo metadata
    (site / "zz_dev_venv_dependencies.pth").write_text("\n".join(_dev_site_packages()) + "\n")
    workdir = tmp / "elsewhere"
    workdir.mkdir()
    return SimpleNamespace(wheel=wheel, names=zipfile.ZipFile(wheel).namelist(), python=python,
                           bin=bin_dir, site=site, cwd=workdir, env=_clean_env(bin_dir))


def _in_fresh(installed, argv):
    return _run(argv, cwd=installed.cwd, env=installed.env)


def _bayeszoo(installed, *args):
    return _in_fresh(installed, [installed.bin / "bayeszoo", *args])


@pytest.fixture(scope="module")
def fitted_run(installed):
    """A 1-epoch VAE fit on digits, written to a folder relative to the unrelated working directory."""
    completed = _bayeszoo(installed, "fit", "vae", "--guide", "amortized", "--data", "digits",
                          "--epochs", "1", "--hidden", "16", "--z-dim", "2", "--is-samples", "5",
                          "--no-progress", "--out", "RUN")
    return SimpleNamespace(completed=completed, folder=installed.cwd / "RUN")


# --- the wheel's file list ----------------------------------------------------------------------


def test_wheel_holds_only_the_bayeszoo_package_and_its_metadata(installed):
    strays = [n for n in installed.names
              if not (n.startswith("bayeszoo/") or re.match(r"bayeszoo-[^/]+\.dist-info/", n))]
    assert strays == []
    for top in ("models/", "guides/", "inference/"):
        assert not any(n.startswith(top) for n in installed.names), top


def test_wheel_holds_every_module_of_the_repository_under_its_import_name(installed):
    for required in ("bayeszoo/__init__.py", "bayeszoo/models/vae.py", "bayeszoo/guides/vlae.py",
                     "bayeszoo/inference/cli.py"):
        assert required in installed.names
    expected = {f"{package}/{module.relative_to(REPO / folder).as_posix()}"
                for package, folder in PACKAGE_DIRS.items() for module in (REPO / folder).rglob("*.py")}
    assert expected - set(installed.names) == set()


def test_wheel_holds_every_data_file(installed):
    data_files = [p for p in DATA_FILES.rglob("*") if p.is_file()]
    assert DATA_FILES / "nile.csv" in data_files
    for path in data_files:
        assert f"bayeszoo/inference/data_files/{path.relative_to(DATA_FILES).as_posix()}" in installed.names


def test_wheel_declares_the_console_script(installed):
    entry_points = next(n for n in installed.names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(installed.wheel).read(entry_points).decode()
    assert re.search(r"^bayeszoo\s*=\s*bayeszoo\.inference\.cli:main\s*$", text, re.M), text


# --- the installed package ----------------------------------------------------------------------


def test_import_comes_from_the_fresh_site_packages_not_the_repository(installed):
    out = _check(_in_fresh(installed, [installed.python, "-c",
                                       "import bayeszoo; print(bayeszoo.__version__, bayeszoo.__file__)"]))
    version, file = out.stdout.split()
    assert installed.wheel.name.startswith(f"bayeszoo-{version}-")
    assert Path(file).resolve() == installed.site / "bayeszoo" / "__init__.py"


def test_dev_venv_editable_finder_stays_inactive(installed):
    script = ("import json, sys, torch, bayeszoo.models, bayeszoo.guides, bayeszoo.inference.cli as cli\n"
              "files = [bayeszoo.models.__file__, bayeszoo.guides.__file__, cli.__file__]\n"
              "print(json.dumps({'files': files,\n"
              "  'torch': torch.__file__, 'path': sys.path,\n"
              "  'editable': [m for m in sys.modules if '__editable__' in m]\n"
              "    + [repr(f) for f in sys.meta_path if '__editable__' in type(f).__module__]}))")
    report = json.loads(_check(_in_fresh(installed, [installed.python, "-c", script])).stdout)
    assert report["editable"] == []
    for file in report["files"]:
        assert Path(file).resolve().is_relative_to(installed.site), file
    # the dependencies do come from the dev venv: the .pth line is what makes this test meaningful
    assert any(Path(report["torch"]).resolve().is_relative_to(Path(p).resolve())
               for p in _dev_site_packages())
    source_folders = {REPO, *(REPO / folder for folder in PACKAGE_DIRS.values())}
    assert not source_folders & {Path(p or installed.cwd).resolve() for p in report["path"]}


def test_console_script_is_the_fresh_venvs(installed):
    script = installed.bin / "bayeszoo"
    assert shutil.which("bayeszoo", path=installed.env["PATH"]) == str(script)
    # pip writes "#!<python>", or a /bin/sh trampoline naming it when that path is too long for "#!"
    launcher = "\n".join(script.read_text().splitlines()[:3])
    assert str(installed.python) in launcher, launcher


def test_course_builds_from_the_chapters_in_the_installed_package(installed):
    # `bayeszoo course --out DIR` must find the chapters in site-packages, not in a checkout.
    script = ("import json; from bayeszoo.inference.course import installed_tutorials\n"
              "print(json.dumps([str(p) for p in installed_tutorials()]))")
    out = _check(_in_fresh(installed, [installed.python, "-c", script])).stdout
    found = [Path(p) for p in json.loads(out)]
    assert [p.name for p in found] == [p.name for p in sorted((REPO / "tutorials").glob("[0-9]*.py"))]
    assert all(p.resolve().is_relative_to(installed.site / "bayeszoo" / "tutorials") for p in found)


def test_list_names_models_and_datasets(installed):
    out = _check(_bayeszoo(installed, "list")).stdout
    for name in ("vae", "bnn", "digits"):
        assert re.search(rf"\b{name}\b", out), name


def test_fit_one_epoch_on_digits_writes_metrics(fitted_run):
    _check(fitted_run.completed)
    metrics = json.loads((fitted_run.folder / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1]
    assert metrics["test"]["is_samples"] == 5


def test_evaluate_reads_the_run_folder(installed, fitted_run):
    _check(fitted_run.completed)
    _check(_bayeszoo(installed, "evaluate", "RUN", "--is-samples", "5"))
    evaluation = json.loads((fitted_run.folder / "evaluation.json").read_text())
    assert evaluation["is_samples"] == 5
