"""The maths a step applies, each option by kohya's formula: losses and their weightings, noise, optimizers and schedules, EMA, output preservation."""
