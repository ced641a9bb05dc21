"""Fault tolerance for spot capacity: what lets a preempted run lose at most the work
since its last checkpoint, never a sample, and never a good checkpoint.

- `integrity`: checksummed, atomically published checkpoints; resume skips a torn or
  corrupt newest checkpoint for the previous good one; keep the last K.
- `ledger`: the global sample indices each checkpoint's weights were trained on, so a
  run can prove nothing was skipped or repeated across restarts.
- `preemption`: SIGTERM and cloud notices (AWS spot/instance-action, GCP preempted)
  turned into "finish the step, checkpoint, exit" on every worker at the same step.
- `worker`: the per-worker object the training loop calls (cadence, agreement, sealing).
- `inject`: fault-injection hooks for tests and `jobs/chaos.py`.
"""
