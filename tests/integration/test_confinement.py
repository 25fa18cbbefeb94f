"""Dataset path confinement for a shared server (issue 17, item 16): with KILN_CONFINE_DATASETS / KILN_DATASET_ROOTS
set, Load Dataset, its TOML, regularization and mask folders, and every file in them stay inside ComfyUI's input
folder and the allowed roots, against '..' and symlink escapes; unset, any path works as before."""
from __future__ import annotations

import os
import shutil

import pytest

from fixtures.datasets import make_dataset
from fixtures.kiln_nodes import DATASET, kiln_error


@pytest.fixture(scope="module")
def places(comfy, tmp_path_factory):
    outside = make_dataset(tmp_path_factory.mktemp("outside"), count=2)
    inside = make_dataset(comfy.input_dir / "confine_ok", count=2)
    links = comfy.input_dir / "confine_links"
    links.mkdir(exist_ok=True)
    if not (links / "dir").exists():
        (links / "dir").symlink_to(outside["train_dir"], target_is_directory=True)
    sneaky = comfy.input_dir / "confine_sneaky" / "train" / "1_toy"
    sneaky.mkdir(parents=True, exist_ok=True)
    shutil.copy(inside["images"][0], sneaky / "own.png")
    if not (sneaky / "stolen.png").exists():
        (sneaky / "stolen.png").symlink_to(outside["images"][0])
        (sneaky / "stolen.txt").symlink_to("/etc/hostname")
    toml = comfy.input_dir / "confine_escape.toml"
    toml.write_text(f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{outside["image_dir"]}"\n')
    return dict(outside=outside, inside=inside)


@pytest.fixture
def confined(monkeypatch):
    monkeypatch.setenv("KILN_CONFINE_DATASETS", "1")


def load(comfy, folder, **kw):
    return comfy.run_node("KilnLoadDataset", folder=str(folder), **{**DATASET, **kw})


@pytest.mark.parametrize("folder", ["abs", "../dotdot", "confine_links/dir", "confine_sneaky/train",
                                    "confine_escape.toml"])
def test_confined_paths_refuse_every_escape(comfy, places, confined, folder):
    outside = places["outside"]
    target = {"abs": str(outside["train_dir"]),
              "../dotdot": os.path.relpath(outside["train_dir"], comfy.input_dir)}.get(folder, folder)
    with pytest.raises(Exception) as e:
        load(comfy, target)
    assert "outside the folders this server allows" in kiln_error(e) or "links outside" in str(e.value)


def test_confined_regularization_and_mask_folders(comfy, places, confined):
    with pytest.raises(Exception) as e:
        load(comfy, "confine_ok/train", regularization_folder=str(places["outside"]["train_dir"]))
    assert "regularization" in kiln_error(e) and "outside" in str(e.value)
    ds = load(comfy, "confine_ok/train")[0]
    with pytest.raises(Exception) as e:
        comfy.run_node("KilnMaskSource", dataset=ds, mode="folder", mask_folder=str(places["outside"]["mask_dir"]),
                       missing_mask_is_white=False)
    assert "Alpha/Mask Source" in kiln_error(e) and "outside" in str(e.value)


def test_inside_and_extra_roots_still_load(comfy, places, confined, monkeypatch):
    assert len(load(comfy, "confine_ok/train")[0].dataset.items) == 2
    monkeypatch.setenv("KILN_DATASET_ROOTS", str(places["outside"]["root"]))
    assert len(load(comfy, str(places["outside"]["train_dir"]))[0].dataset.items) == 2


def test_without_the_setting_any_path_loads_as_before(comfy, places, monkeypatch):
    monkeypatch.delenv("KILN_CONFINE_DATASETS", raising=False)
    monkeypatch.delenv("KILN_DATASET_ROOTS", raising=False)
    assert len(load(comfy, str(places["outside"]["train_dir"]))[0].dataset.items) == 2
