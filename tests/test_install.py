"""tunefleet installed the ordinary way: a wheel in a fresh environment, used from another folder.

The wheel is built from this checkout (`pip wheel --no-deps`) and installed with `--no-deps` into a new
virtual environment whose only other entry is this environment's site-packages as a plain path (so the
dependencies import, while this checkout's editable install, a .pth hook there, is not loaded). Every
command then runs from a folder that holds nothing of the checkout.
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def clean_environment(**extra) -> dict:
    """This environment without what would put a checkout or a user's folders on the installed tool's path."""
    unset = ("PYTHONPATH", "TUNEFLEET_RECIPES", "TUNEFLEET_CLUSTERS")
    return {**{k: v for k, v in os.environ.items() if k not in unset}, **extra}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("install")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(base / "wheel"), str(ROOT)], check=True, capture_output=True, text=True)
    wheel = next((base / "wheel").glob("tunefleet-*.whl"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=clean_environment())
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, env=clean_environment()).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True,
                   env=clean_environment())
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    return venv, elsewhere


def tunefleet(installed, *words, env=None):
    venv, elsewhere = installed
    return subprocess.run([str(venv / "bin" / "tunefleet"), *words], cwd=elsewhere, env=clean_environment(**(env or {})),
                          capture_output=True, text=True, timeout=300)


def test_the_installed_package_is_the_wheel_not_this_checkout(installed):
    venv, elsewhere = installed
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import launcher; print(launcher.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, check=True, env=clean_environment()).stdout
    assert where.startswith(str(venv)), where


def test_an_installed_tunefleet_lists_validates_plans_and_renders_from_another_folder(installed):
    listed = tunefleet(installed, "recipes")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()] == SHIPPED_RECIPES

    for recipe in ("lora", "lora_zero3", "distill_classify"):  # a DeepSpeed JSON; a shipped teacher run folder
        valid = tunefleet(installed, "validate", f"recipe={recipe}")
        assert valid.returncode == 0 and "# ok" in valid.stdout, valid.stderr[-2000:]

    plan = tunefleet(installed, "plan", "recipe=lora_zero3", "--device", "h100")
    assert plan.returncode == 0 and "compatibility: ok" in plan.stdout, plan.stderr[-2000:]
    assert "/site-packages/launcher/run.py" in plan.stdout  # the launch runs the installed script

    submission = tunefleet(installed, "submit", "recipe=lora", "cluster=example",
                           "--dry-run")
    assert submission.returncode == 0, submission.stderr[-2000:]
    assert "#SBATCH --gpus-per-node=8" in submission.stdout and "set -- recipe=lora" in submission.stdout
    assert list(installed[1].iterdir()) == [], "a dry run writes nothing"


def test_a_users_own_recipe_and_profile_folders_come_first(installed, tmp_path):
    mine = tmp_path / "mine"
    (mine / "recipes").mkdir(parents=True)
    (mine / "clusters").mkdir()
    shipped = (ROOT / "recipes" / "lora.yaml").read_text()
    (mine / "recipes" / "lora.yaml").write_text(shipped.replace("description:", "description: my own lora #", 1))
    (mine / "clusters" / "site.yaml").write_text("partition: a100\ngpus_per_node: 4\n")
    env = {"TUNEFLEET_RECIPES": str(mine / "recipes"), "TUNEFLEET_CLUSTERS": str(mine / "clusters")}

    listed = tunefleet(installed, "recipes", env=env).stdout
    lora = next(line for line in listed.splitlines() if line.split()[0] == "lora")
    assert "my own lora" in lora and str(mine / "recipes" / "lora.yaml") in lora
    submission = tunefleet(installed, "submit", "recipe=lora", "cluster=site", "--dry-run",
                           env=env)
    assert submission.returncode == 0, submission.stderr[-2000:]
    assert "#SBATCH --partition=a100" in submission.stdout and "#SBATCH --gpus-per-node=4" in submission.stdout


def test_a_missing_profile_names_where_it_looked(installed):
    missing = tunefleet(installed, "submit", "recipe=lora", "cluster=nowhere", "--dry-run")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "cluster=nowhere: no such profile" in missing.stderr and "example" in missing.stderr
