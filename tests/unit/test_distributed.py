"""trainer_core/distributed.py and the loop's data parallelism: how a global batch is shared, which GPU a rank
binds, and 2 processes (torchrun, gloo) with batch 2 each training the same LoRA as 1 process with batch 4, with
flips, caption augmentation, gradient accumulation, a last batch of 1 (one rank's share empty) and different
seeded inits on the ranks (rank 0's is broadcast)."""
import os
import subprocess
import sys

import pytest
import torch

from trainer_core.distributed import share, visible_device

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def test_share_splits_a_global_batch_contiguously():
    assert [share(4, r, 2) for r in (0, 1)] == [slice(0, 2), slice(2, 4)]
    assert [share(3, r, 2) for r in (0, 1)] == [slice(0, 2), slice(2, 3)]
    assert [share(1, r, 2) for r in (0, 1)] == [slice(0, 1), slice(1, 1)]  # a short last batch: rank 1 gets none
    assert [share(6, r, 4) for r in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 6)]
    assert share(5) == slice(0, 5)  # a single process takes everything


def test_each_rank_binds_its_own_gpu():
    assert visible_device({"LOCAL_RANK": "1"}) == "1"
    assert visible_device({"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,6"}) == "6"
    with pytest.raises(RuntimeError, match="lists only 2 device"):
        visible_device({"LOCAL_RANK": "2", "CUDA_VISIBLE_DEVICES": "4,6"})


def run(tmp_path, name, procs, batch_size, steps):
    out = str(tmp_path / f"{name}.pt")
    worker = os.path.join(HERE, "dist_loop_worker.py")
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
              if procs > 1 else [sys.executable])
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launch + [worker, out, str(batch_size), str(steps)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_two_processes_train_the_lora_one_process_trains_with_the_double_batch(tmp_path):
    one = run(tmp_path, "one", 1, 4, 5)
    two = run(tmp_path, "two", 2, 2, 5)
    assert one["lora"].keys() == two["lora"].keys()
    diff = max(float((one["lora"][k] - two["lora"][k]).abs().max()) for k in one["lora"])
    assert diff < 1e-5, diff  # same draws, same mean: only float summation order differs
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)  # the logged loss: the mean over ranks
    assert one["lora"]["lora_0.lora_up.weight"].abs().max() > 1e-3  # it trained
    state = two["states"][4][0]
    assert state["world_size"] == 2 and one["states"][4][0]["world_size"] == 1


def test_a_resume_with_another_number_of_processes_says_so(tmp_path):
    from dist_loop_worker import run as run_here
    two = run(tmp_path, "two", 2, 2, 5)
    state, weights = two["states"][2]
    assert state["world_size"] == 2 and state["total_batch"] == 8  # batch 2 x 2 processes x grad_accum 2
    resumed = run_here(4, 5, resume=state, weights=weights)
    assert any("processes 2 → 1 (total batch 8 → 8" in n for n in resumed["notes"]), resumed["notes"]
