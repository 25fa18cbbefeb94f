"""Reliability of what Kiln writes (issue 17, item 10) on real filesystems and processes: a full and a read-only
filesystem (a size-limited tmpfs, mounted as root; skipped elsewhere, where the fault-injection tests in
tests/unit/test_reliability.py cover the same messages), and the temp files of a writer that died."""
import os
import subprocess
import sys

import pytest
import torch

from trainer_core.files.atomic import check_writable, remove_stale_temps
from trainer_core.errors import KilnError
from trainer_core.lora.io import save_lora_file

TENSORS = {"a.lora_down.weight": torch.ones(2, 8), "a.lora_up.weight": torch.zeros(8, 2), "a.alpha": torch.tensor(2.0)}


def _mount_tmpfs(path, size="256k"):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs (needs root: mount); skipped elsewhere, where the fault-injection test of
    tests/unit/test_reliability.py covers it."""
    mnt = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(mnt):
        pytest.skip("cannot mount a size-limited filesystem here (not root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_saving_onto_a_full_filesystem(small_fs):
    target = small_fs / "lora.safetensors"
    save_lora_file(str(target), TENSORS, {})
    before = target.read_bytes()
    big = {"w": torch.zeros(256, 1024)}  # 1 MiB: does not fit
    with pytest.raises(KilnError) as e:
        save_lora_file(str(target), big, {})
    msg = str(e.value)
    assert str(target) in msg and "free" in msg and "No space left" in msg, msg
    assert target.read_bytes() == before and os.listdir(small_fs) == ["lora.safetensors"]
    with pytest.raises(KilnError, match="need about"):
        check_writable(str(small_fs), 1 << 20, "save_name", "Free disk space.")


def test_saving_into_a_read_only_filesystem(small_fs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    with pytest.raises(KilnError) as e:
        save_lora_file(str(small_fs / "lora.safetensors"), TENSORS, {})
    assert str(small_fs / "lora.safetensors") in str(e.value) and "read-only" in str(e.value)
    with pytest.raises(KilnError, match="read-only"):
        check_writable(str(small_fs), 10, "save_name", "Choose another folder.")


def test_temp_files_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".kiln-{dead.stdout.strip()}-abc.tmp"
    stale.write_bytes(b"half a LoRA")
    mine = tmp_path / f".kiln-{os.getpid()}-def.tmp"  # a live writer's: kept
    mine.write_bytes(b"in progress")
    assert remove_stale_temps(str(tmp_path)) == [stale.name]
    assert not stale.exists() and mine.exists()
