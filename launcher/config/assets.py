"""Where the shipped assets are, and where a user's own come first.

Shipped assets are the recipes, the DeepSpeed JSONs, the sbatch templates with the cluster profiles,
and the data the shipped recipes name (`data/...`). Their source is the top-level folders of the
repository (`recipes/`, `ds_configs/`, `slurm/`, `data/`), which is what a reader of the repository
sees and edits. A wheel carries copies of them inside the package (`launcher/_shipped/<folder>`,
copied there by `setup.py`'s build step), read here through `importlib.resources`; a checkout or an
editable install has no such copy and reads the top-level folders.

A user's folders come first (the search path, also in `docs/`):
- recipes: the folders in `TUNEFLEET_RECIPES` (separated by `os.pathsep`), then `./recipes` of the
  working directory, then the shipped recipes;
- cluster profiles: the folders in `TUNEFLEET_CLUSTERS`, then `./clusters`, then the shipped ones.
A name found in an earlier folder hides the same name later; `tunefleet recipes` says where each is from.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

FOLDERS = ("recipes", "ds_configs", "slurm", "data")
PACKAGED = "_shipped"  # inside the launcher package, in a wheel
CHECKOUT_ROOT = Path(__file__).resolve().parents[2]


def shipped_root() -> Path:
    """The folder holding the shipped `recipes/`, `ds_configs/`, `slurm/` and `data/`."""
    packaged = resources.files("launcher") / PACKAGED
    if packaged.is_dir():
        # An installed wheel is a plain folder on disk (pip never installs a package zipped).
        return Path(str(packaged))
    return CHECKOUT_ROOT


def shipped(folder: str) -> Path:
    assert folder in FOLDERS, folder
    return shipped_root() / folder


def _user_folders(variable: str, local: str) -> list[Path]:
    listed = [Path(p).expanduser() for p in os.environ.get(variable, "").split(os.pathsep) if p]
    return [*listed, Path.cwd() / local]


def search_path(kind: str) -> list[Path]:
    """Folders searched for recipes (kind "recipes") or cluster profiles (kind "clusters"), first wins.
    Folders that do not exist are kept (and skipped when listing), so error messages can name them."""
    if kind == "recipes":
        folders = [*_user_folders("TUNEFLEET_RECIPES", "recipes"), shipped("recipes")]
    elif kind == "clusters":
        folders = [*_user_folders("TUNEFLEET_CLUSTERS", "clusters"), shipped("slurm") / "clusters"]
    else:
        raise ValueError(kind)
    unique: dict[Path, None] = {}
    for folder in folders:
        unique.setdefault(folder.resolve() if folder.exists() else folder, None)
    return list(unique)


def named_yaml_files(kind: str) -> dict[str, Path]:
    """name -> file for every `*.yaml` on the search path; an earlier folder's name hides a later one's."""
    found: dict[str, Path] = {}
    for folder in search_path(kind):
        if folder.is_dir():
            for path in sorted(folder.glob("*.yaml")):
                found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def is_shipped(path: Path) -> bool:
    try:
        path.resolve().relative_to(shipped_root().resolve())
    except ValueError:
        return False
    return True


def relative_to_shipped(name: str) -> Path | None:
    """A relative path that does not exist from the working directory but does among the shipped
    assets (the shipped recipes name `data/wordnet/...` and `data/teachers/...`), else None."""
    path = Path(name).expanduser()
    if path.is_absolute() or path.exists():
        return None
    candidate = shipped_root() / path
    return candidate if candidate.exists() else None
