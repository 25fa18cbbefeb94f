"""Mixed precision through the Train node, on the device ComfyUI picked: the CPU here, CUDA under KILN_TEST_GPU=1
(bench/gpu_suite.sh's correctness step). bf16 and fp16 autocast (fp16 through the GradScaler) train a LoRA with
finite losses and weights that moved, and leave the input MODEL's weights as they were (the same tensors, the same
values, no forward left patched). Two steps: CPU autocast in fp16 is slow, and the point is the precision path."""
from __future__ import annotations

import math

import pytest
import torch

from test_train_sd1 import TRAIN, load_and_cache

RUN = TRAIN | dict(steps=2, learning_rate=5e-3, sample_prompts="", sample_every=0, sample_steps=1)


@pytest.fixture(scope="module")
def sd1(comfy, sd1_checkpoint, dataset_dir):
    return load_and_cache(comfy, sd1_checkpoint, dataset_dir)


@pytest.mark.slow  # 35-55 s each on 2 CPU cores: CPU autocast is emulated there
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_and_leaves_the_input_model_alone(comfy, sd1, precision):
    model, clip, cached = sd1
    unet = model.model.diffusion_model
    before = {n: (t, t.data_ptr(), t.detach().clone()) for n, t in unet.state_dict(keep_vars=True).items()}
    cfg = comfy.run_node("KilnLoraConfig", rank=4, alpha=4.0, conv_rank=0, conv_alpha=1.0, dropout=0.0,
                         rank_dropout=0.0, module_dropout=0.0)[0]
    lora = comfy.run_node("KilnTrainSD1", model=model, clip=clip, dataset=cached, lora_config=cfg,
                          **RUN | {"precision": precision})[1]
    losses = [d["loss"] for e, d in comfy.events if e == "kiln.loss"]
    assert lora.metadata["ss_mixed_precision"] == precision
    assert len(losses) == RUN["steps"] and all(math.isfinite(x) and x > 0 for x in losses), losses
    assert all(torch.isfinite(v).all() for v in lora.state_dict.values())
    ups = [v for k, v in lora.state_dict.items() if k.endswith(".lora_up.weight")]
    assert ups and any(v.abs().sum() > 0 for v in ups)  # lora_up starts at zero: the optimizer steps moved it
    now = unet.state_dict(keep_vars=True)
    assert now.keys() == before.keys()
    for name, (t, ptr, values) in before.items():
        assert now[name] is t and t.data_ptr() == ptr and torch.equal(t, values), name
    assert not any("forward" in m.__dict__ for m in unet.modules())
