"""What a Train node is doing now (caching, preparing, training, sampling, saving) for the loss chart's header, and
how long the rest of the run takes, previews and saves included, for its ETA. The training loop's own clock counts
the previews and saves too; the chart's it/s and ETA count training steps by their own time."""
from __future__ import annotations

import time
from contextlib import contextmanager

# a sampling step is a forward pass (two with CFG) at batch 1; a training step a forward and a backward pass:
# until a preview was timed, one sampling step is guessed at this fraction of a training step
SAMPLING_STEP_GUESS = 0.5


class RunClock:
    """``send(event, data)``: Progress.send. ``preview_steps``: the steps after which a preview is drawn (the final
    one after the last step is counted apart); ``save_steps``: those after which an intermediate save is written;
    ``sampling_steps``: the sampler steps of one preview, all its prompts together."""

    def __init__(self, send, total: int, preview_steps=(), save_steps=(), sampling_steps: int = 0):
        self.send, self.total = send, total
        self.preview_steps, self.save_steps = sorted(preview_steps), sorted(save_steps)
        self.sampling_steps = sampling_steps
        self.spent = {"sampling": [], "saving": []}  # seconds of each preview and save so far
        self.step, self.step_seconds = 0, None       # the last step, and the mean time of a training step
        self.phase = ("preparing", None, None)
        self.final_done = False  # the preview after the last step

    def show(self, phase: str, done: int | None = None, total: int | None = None) -> None:
        self.phase = (phase, done, total)
        self.send("kiln.phase", {"phase": phase, "done": done, "total": total, "step": self.step,
                                 "steps": self.total, "eta": self.eta()})

    @contextmanager
    def timed(self, phase: str, total: int | None = None):
        """A preview ("sampling") or a save ("saving"): shown while it runs, its time kept for the ETA; yields
        ``done(n)`` for a phase of ``total`` parts."""
        start = time.perf_counter()
        self.show(phase, 0 if total else None, total)
        try:
            yield lambda n: self.show(phase, n, total)
        finally:
            self.spent[phase].append(time.perf_counter() - start)
            self.final_done = self.final_done or (phase == "sampling" and self.step >= self.total)
            self.show("training" if self.step < self.total else "finishing")

    def on_step(self, step: int, loop_seconds: float) -> float:
        """The training seconds of the run so far (the loop's clock less previews and saves), after ``step``."""
        self.step = step
        seconds = max(1e-6, loop_seconds - sum(sum(v) for v in self.spent.values()))
        self.step_seconds = seconds / max(step, 1)
        return seconds

    def _each(self, phase: str) -> float:
        spent = self.spent[phase]
        if spent:
            return sum(spent) / len(spent)
        if phase == "sampling":
            return self.sampling_steps * SAMPLING_STEP_GUESS * (self.step_seconds or 0.0)
        return 0.0

    def eta(self) -> float | None:
        """Seconds to the end of the run: the steps left, the previews left (the final one included), the saves
        left and the rest of the one running; None before a step has been timed."""
        if self.step_seconds is None:
            return None
        phase, done, parts = self.phase
        running = phase in ("sampling", "saving")
        final = not self.final_done and not (running and phase == "sampling" and self.step >= self.total)
        previews = sum(1 for s in self.preview_steps if s > self.step) + final
        saves = sum(1 for s in self.save_steps if s > self.step)
        left = (self.total - self.step) * self.step_seconds + previews * self._each("sampling") + \
            saves * self._each("saving")
        if running:
            left += self._each(phase) * (1 - (done or 0) / parts if parts else 0.5)
        return max(0.0, left)
