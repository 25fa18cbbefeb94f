"""EMA of the trained weights (trainer_core/maths/ema.py and its use in loop.train): the published update rule
computed by hand, warm-up, update interval, swapping in and out bit-identically, and a training run whose result,
saves and resume follow it."""
import pytest
import torch

from trainer_core.maths.ema import EMA
from test_loop_resume import run


def test_constant_weights_stay_and_the_rule_matches_a_hand_computation():
    w = torch.tensor([3.0, -5.0, 0.25])
    same = EMA([w.clone()], 0.9, warmup=False)
    for step in range(1, 6):
        same.update(step)
    assert torch.equal(same.shadow[0], w)  # after k steps with constant weights w, EMA = w
    p = torch.tensor([1.0, 2.0, 4.0])
    ema = EMA([p], 0.9, warmup=False)
    p.copy_(w)  # the weights jump to w and stay: shadow = w + 0.9^k (w0 - w)
    for step in range(1, 4):
        ema.update(step)
    expected = w + 0.9 ** 3 * (torch.tensor([1.0, 2.0, 4.0]) - w)
    assert torch.allclose(ema.shadow[0], expected, rtol=0, atol=1e-6)


def test_warmup_and_update_every():
    p = torch.zeros(1)
    ema = EMA([p], 0.5, update_every=2, warmup=True)
    shadow, decays = 0.0, []
    for step in range(1, 9):
        p.fill_(float(step))
        before = ema.updates
        ema.update(step)
        if step % 2 == 0:  # updates at steps 2, 4, 6, 8 only, with decay min(0.5, (1 + n)/(10 + n))
            d = min(0.5, (1 + before) / (10 + before))
            decays.append(d)
            shadow = d * shadow + (1 - d) * step
        assert ema.updates == step // 2
        assert ema.shadow[0].item() == pytest.approx(shadow, abs=1e-6)
    assert decays == [pytest.approx(v) for v in (0.1, 2 / 11, 0.25, 4 / 13)]


def test_applied_swaps_the_average_in_and_the_trained_values_back_bit_identically():
    p = torch.randn(4, 3)
    ema = EMA([p], 0.99, warmup=False, on_host=True)
    trained = torch.randn(4, 3)
    p.copy_(trained)
    ema.update(1)
    average = ema.shadow[0].clone()
    with ema.applied():
        assert torch.equal(p, average)
    assert torch.equal(p, trained) and torch.equal(ema.shadow[0], average)
    state = ema.state_dict()
    other = EMA([torch.zeros(4, 3)], 0.99, warmup=False)
    other.load_state_dict(state)
    assert torch.equal(other.shadow[0], average) and other.updates == 1
    ema.copy_to_params()
    assert torch.equal(p, average)


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr", "dora"])
def test_a_run_with_ema_saves_the_average_and_resumes_bit_identically(algorithm):
    options = dict(ema_decay=0.8, ema_update_every=2)
    plain, _, _, _ = run(algorithm=algorithm)
    averaged, result, saved, _ = run(save_every=4, options=options, algorithm=algorithm)
    assert any(not torch.equal(plain[k], averaged[k]) for k in plain)
    # the saves hold the average at that step; the state holds the trained values and the average
    state, weights, _ = saved[4]
    assert state["ema"]["updates"] == 2 and state["trained"] is not None
    resumed, resumed_result, _, _ = run(resume=state, weights=weights, options=options, algorithm=algorithm)
    assert resumed_result.losses == result.losses
    assert all(torch.equal(averaged[k], resumed[k]) for k in averaged)


def test_the_average_is_what_the_loop_returns():
    """Record the trained weights at every update and average them by the published rule, by hand."""
    import trainer_core.training.loop as loop
    made, original = [], loop.EMA

    class Recording(original):
        def __init__(self, params, *args, **kwargs):
            super().__init__(params, *args, **kwargs)
            self.start, self.seen = [p.detach().clone() for p in params], []
            made.append(self)

        def update(self, step):
            self.seen.append([p.detach().clone() for p in self.params])
            super().update(step)
    loop.EMA = Recording
    try:
        run(options=dict(ema_decay=0.7, ema_warmup=False))
    finally:
        loop.EMA = original
    ema = made[0]
    assert len(ema.seen) == 9
    shadow = [w.double() for w in ema.start]
    for weights in ema.seen:
        shadow = [0.7 * s + 0.3 * w.double() for s, w in zip(shadow, weights)]
    for final, expected in zip(ema.params, shadow):  # the network ends with the average
        assert torch.allclose(final.double(), expected, rtol=0, atol=1e-6)
