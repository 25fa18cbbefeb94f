"""Optimizers and schedules by kohya's names and rules: every listed optimizer steps a real parameter on the
CPU, optimizer_args reach the constructor, class paths work, Adafactor follows kohya's relative_step rules,
and the schedules give the published values (transformers' formulas, which kohya uses)."""
import math

import pytest
import torch

from trainer_core.errors import KilnError
from trainer_core.maths.optim import (OPTIMIZERS, Schedule, build_optimizer, build_scheduler, kohya_optimizer_name,
                                steps_of)


def param():
    p = torch.nn.Parameter(torch.ones(8, 8))
    p.grad = torch.full_like(p, 0.5)
    return p


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_steps_on_the_cpu(name):
    p = param()
    opt = build_optimizer(name, [{"params": [p], "lr": 1.0}], 1.0)  # D-Adaptation/Prodigy want lr ~ 1
    if hasattr(opt, "train"):
        opt.train()
    for _ in range(6):  # RAdam's rectification makes no update in its first steps
        opt.step()
    assert not torch.equal(p.detach(), torch.ones(8, 8)), name


def test_optimizer_args_reach_the_constructor_and_defaults_are_the_packages():
    opt = build_optimizer("AdamW", [param()], 1e-3, {"weight_decay": 0.1, "betas": (0.8, 0.9)})
    assert opt.defaults["weight_decay"] == 0.1 and opt.defaults["betas"] == (0.8, 0.9)
    assert build_optimizer("AdamW", [param()], 1e-3).defaults["weight_decay"] == 0.01  # torch's own default
    sgd = build_optimizer("SGDNesterov", [param()], 1e-3)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is True  # kohya's rule
    assert build_optimizer("SGDNesterov", [param()], 1e-3, {"momentum": 0.5}).defaults["momentum"] == 0.5
    with pytest.raises(KilnError, match="optimizer_args .*do not fit"):
        build_optimizer("AdamW", [param()], 1e-3, {"no_such": 1})


def test_class_paths():
    assert type(build_optimizer("torch.optim.RAdam", [param()], 1e-3)).__name__ == "RAdam"
    assert type(build_optimizer("RAdam", [param()], 1e-3)).__name__ == "RAdam"  # bare name: torch.optim
    assert type(build_optimizer("pytorch_optimizer.CAME", [param()], 1e-3)).__name__ == "CAME"
    assert kohya_optimizer_name("AdamW", {"weight_decay": 0.1}) == "torch.optim.adamw.AdamW(weight_decay=0.1)"
    with pytest.raises(KilnError, match="neither one of"):
        build_optimizer("torch.optim.NoSuch", [param()], 1e-3)
    with pytest.raises(KilnError, match="needs the 'no_such_pkg' package.*pip install no_such_pkg"):
        build_optimizer("no_such_pkg.Opt", [param()], 1e-3)


def test_adafactor_relative_step_rules_and_schedule():
    p = param()
    p.grad = None  # as when the loop builds it: before the first backward
    opt = build_optimizer("Adafactor", [{"params": [p], "lr": 5.0}], 1e-3)
    assert opt.defaults["relative_step"] is True and opt.param_groups[0]["lr"] is None  # group lr dropped (kohya)
    sched = build_scheduler(opt, Schedule("constant"), 10, 1e-3)
    assert type(sched).__name__ == "AdafactorSchedule" and sched.get_last_lr()[0] == 1e-3
    p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(1e-2)  # relative step: min(1e-2, 1/√step) at step 1
    forced = build_optimizer("Adafactor", [param()], 1e-3, {"relative_step": False, "warmup_init": True})
    assert forced.defaults["relative_step"] is True  # warmup_init needs it (kohya)
    fixed = build_optimizer("Adafactor", [param()], 1e-3, {"relative_step": False, "scale_parameter": False})
    assert fixed.defaults["lr"] == 1e-3
    with pytest.raises(KilnError, match="adafactor goes with optimizer Adafactor"):
        build_scheduler(build_optimizer("AdamW", [param()], 1e-3), Schedule("adafactor"), 10, 1e-3)


def lrs(schedule, total=10, lr=1.0):
    opt = torch.optim.SGD([param()], lr=lr)
    sched = build_scheduler(opt, schedule, total, lr)
    out = []
    for _ in range(total):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_schedules_match_the_published_formulas():
    assert lrs(Schedule("constant")) == [1.0] * 10
    assert lrs(Schedule("constant_with_warmup", 4))[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lrs(Schedule("linear", 0))[5] == pytest.approx(0.5)                       # (T − t)/T
    assert lrs(Schedule("cosine", 0))[5] == pytest.approx(0.5)                       # ½(1 + cos(π·t/T))
    assert lrs(Schedule("cosine", 0.2))[:3] == pytest.approx([0.0, 0.5, 1.0])        # warmup 0.2 × 10 = 2 steps
    restarts = lrs(Schedule("cosine_with_restarts", 0, num_cycles=2))
    assert restarts[0] == pytest.approx(1.0) and restarts[5] == pytest.approx(1.0)  # two cycles of 5 steps
    assert lrs(Schedule("polynomial", 0, power=2.0))[5] == pytest.approx((1 - 1e-7) * 0.25 + 1e-7)  # (1 − t/T)²
    # cosine to a floor: ½(1 + cos(π·t/T))·(1 − r) + r, kohya's num_cycles/2
    assert lrs(Schedule("cosine_with_min_lr", 0, min_lr_ratio=0.1))[5] == pytest.approx(0.5 * 0.9 + 0.1)
    wsd = lrs(Schedule("warmup_stable_decay", 2, decay_steps=0.4, min_lr_ratio=0.0))  # 2 warm, 4 stable, 4 decay
    assert wsd[:2] == [0.0, 0.5] and wsd[2:6] == [1.0] * 4
    assert wsd[8] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert steps_of(0.25, 100) == 25 and steps_of(7, 100) == 7


def test_class_path_scheduler_and_schedule_free():
    got = lrs(Schedule(scheduler_type="torch.optim.lr_scheduler.StepLR", scheduler_args={"step_size": 3, "gamma": 0.5}))
    assert got[:7] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]
    opt = build_optimizer("AdamWScheduleFree", [param()], 1.0)
    assert build_scheduler(opt, Schedule("cosine"), 10, 1.0).get_last_lr() == [1.0]  # kohya: no schedule


def test_every_optimizer_offered_comes_with_a_manager_install_or_is_documented_optional():
    """ComfyUI Manager installs requirements.txt: each optimizer's package is there, ComfyUI's own (torch,
    transformers), or one of requirements-optional.txt's, which docs/install.md lists as optional."""
    from pathlib import Path
    from packaging.requirements import Requirement
    from trainer_core.maths.optim import package_of
    root = Path(__file__).resolve().parents[2]

    def names(file):
        return {Requirement(ln.split("#")[0]).name for ln in (root / file).read_text().splitlines()
                if ln.split("#")[0].strip()}
    required, optional = names("requirements.txt"), names("requirements-optional.txt")
    install = (root / "docs" / "install.md").read_text()
    for name in OPTIMIZERS:
        pkg = package_of(name)
        assert pkg in required | {None, "transformers"} or (pkg in optional and f"`{pkg}`" in install), (name, pkg)
    assert "lycoris-lora" in required and optional == {"bitsandbytes", "tensorboard"}
