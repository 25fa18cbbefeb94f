"""The loop's data parallelism (trainer_core/training/distributed.py) in real processes: 2 processes (torchrun, gloo) with
batch 2 each training the same LoRA as 1 process with batch 4, with flips, caption augmentation, gradient
accumulation, a last batch of 1 (one rank's share empty) and different seeded inits on the ranks (rank 0's is
broadcast). The in-process parts (share, visible_device) are tests/unit/test_distributed.py."""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_resume_with_another_number_of_processes_says_so(tmp_path):
    from dist_loop_worker import run as run_here
    two = run(tmp_path, "two", 2, 2, 5)
    state, weights = two["states"][2]
    assert state["world_size"] == 2 and state["total_batch"] == 8  # batch 2 x 2 processes x grad_accum 2
    resumed = run_here(4, 5, resume=state, weights=weights)
    assert any("processes 2 → 1 (total batch 8 → 8" in n for n in resumed["notes"]), resumed["notes"]
