"""The DenoiseRL trainer: the step loop (step.py), its setup and resume (run.py), and the edges it
talks to (policy workers, rollout engine, reward pool, metrics)."""
