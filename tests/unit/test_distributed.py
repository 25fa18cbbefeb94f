"""trainer_core/training/distributed.py: how a global batch is shared and which GPU a rank binds (the 2-process loop test
that launches torchrun is tests/system/test_distributed_loop.py)."""
import pytest

from trainer_core.training.distributed import share, visible_device


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
