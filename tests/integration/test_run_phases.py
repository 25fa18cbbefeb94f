"""The loss chart's header names what a Train node is doing (caching, preparing, sampling n/N, saving, finishing)
and its ETA counts the previews and saves still to come: the "kiln.phase" and "kiln.loss" events of a real run,
and the RunClock that times them."""
from __future__ import annotations

import time

import pytest

from fixtures.kiln_nodes import DATASET
from test_errors_and_cancel import TRAIN

LORA = dict(rank=2, alpha=2.0, conv_rank=0, conv_alpha=1.0, dropout=0.0, rank_dropout=0.0, module_dropout=0.0)


@pytest.mark.slow
def test_a_run_reports_its_phases_and_an_eta_with_previews_and_saves(comfy, sd1_checkpoint, dataset_dir):
    model, clip, vae = comfy.run_node("CheckpointLoaderSimple", ckpt_name=sd1_checkpoint)
    ds = comfy.run_node("KilnLoadDataset", folder=str(dataset_dir["train_dir"]), **DATASET)[0]
    ds = comfy.run_node("KilnCacheLatents", dataset=ds, vae=vae, batch_size=4)[0]
    config = comfy.run_node("KilnLoraConfig", **LORA)[0]
    comfy.run_node("KilnTrainSD1", model=model, clip=clip, dataset=ds, lora_config=config,
                   **{**TRAIN, "steps": 4, "sample_every": 2, "sample_prompts": "a toy\na kiln", "sample_steps": 2,
                      "save_every_n_steps": 2, "save_name": "kiln/phases"})
    events = [(e, d) for e, d in comfy.events if e in ("kiln.phase", "kiln.loss")]
    phases = [(d["phase"], d["done"], d["total"]) for e, d in events if e == "kiln.phase"]
    assert phases[0] == ("caching", None, None) and ("caching", 1, phases[1][2]) == phases[1], phases
    assert ("preparing", None, None) in phases
    # a preview after step 2 (two prompts), saves after steps 2 and 4 (kohya's step saves include the last step;
    # the clock names the end once that last save is written), the final preview, then the outputs
    order = [p for p in phases if p[0] in ("sampling", "saving", "finishing")]
    assert order == [("sampling", 0, 2), ("sampling", 1, 2), ("sampling", 2, 2), ("saving", None, None),
                     ("saving", None, None), ("finishing", None, None), ("sampling", 0, 2), ("sampling", 1, 2),
                     ("sampling", 2, 2), ("finishing", None, None)], "\n".join(map(str, order))
    losses = [d for e, d in events if e == "kiln.loss"]
    assert [d["step"] for d in losses] == [1, 2, 3, 4]
    assert all(0 < d["train_seconds"] <= d["seconds"] + 1e-6 for d in losses), losses
    # the last step's ETA is the final preview, measured on the mid-run one
    assert losses[-1]["eta"] > 0 and losses[0]["eta"] > losses[-1]["eta"], [d["eta"] for d in losses]
    assert [d for e, d in events if e == "kiln.phase"][-1]["eta"] == 0


def test_the_clock_counts_what_is_left(comfy):
    RunClock = comfy.pack_module("nodes.run_clock").RunClock
    sent = []
    clock = RunClock(lambda e, d: sent.append(d), total=10, preview_steps=[5], save_steps=[4, 8], sampling_steps=20)
    assert clock.eta() is None
    clock.on_step(1, 2.0)  # 2 s a step; a preview guessed at 20 sampler steps x 0.5 x 2 s, saves at 0 s until timed
    assert clock.eta() == 9 * 2.0 + 2 * 20.0
    for step in range(2, 6):
        clock.on_step(step, 2.0 * step)
    with clock.timed("sampling", 2) as done:
        time.sleep(0.05)
        done(1)
        assert sent[-1]["phase"] == "sampling" and sent[-1]["done"] == 1
    measured = clock.spent["sampling"][0]
    clock.on_step(6, 12.0 + measured)
    assert abs(clock.step_seconds - 2.0) < 1e-6  # the preview's time is not a training step's
    assert abs(clock.eta() - (4 * 2.0 + measured)) < 1e-6  # 4 steps, the final preview; the save at 8 takes ~0 s

