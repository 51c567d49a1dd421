"""Only the build step that puts the shipped assets into the package; everything else is in pyproject.toml.

The top-level `recipes/`, `ds_configs/`, `slurm/` and `data/` are the source a reader sees; a wheel (or a
non-editable `pip install .`) gets copies of them as `launcher/_shipped/<folder>`, which
launcher.config.assets reads through importlib.resources. An editable install reads the folders in place.
setuptools' package-data only takes files inside a package folder, hence the copy.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
ASSET_FOLDERS = ("recipes", "ds_configs", "slurm", "data")  # as launcher/config/assets.py FOLDERS
PACKAGED = "_shipped"


class BuildWithAssets(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # the checkout's own folders are read in place
        target = Path(self.build_lib) / "launcher" / PACKAGED
        for folder in ASSET_FOLDERS:
            shutil.rmtree(target / folder, ignore_errors=True)
            shutil.copytree(ROOT / folder, target / folder,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))


setup(cmdclass={"build_py": BuildWithAssets})
