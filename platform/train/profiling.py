"""Profile a few training steps of rank 0 (`--profile-steps 5-7`).

torch.profiler records the steps' host operators and, on a GPU, their kernels. Written to
`<output_dir>/profile/`:
- `steps_A-B.txt`: the share of the steps' wall time the GPU was busy (well below 1 means
  the step waits on the host: Python, DeepSpeed hooks, launches, syncs), then the top
  operators by device time and by host time;
- `steps_A-B.json.gz`: the Chrome trace (open in https://ui.perfetto.dev).
The profiled steps run slower than the others (the profiler's own overhead).
"""
from __future__ import annotations

import logging
from pathlib import Path


log = logging.getLogger(__name__)


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """'5-7' -> (5, 7); '6' -> (6, 6); '' -> None. Raises ValueError naming the flag."""
    if not spec:
        return None
    first, sep, last = spec.partition("-")
    try:
        a, b = int(first), int(last) if sep else int(first)
    except ValueError:
        a = b = 0
    if not (1 <= a <= b):
        raise ValueError(f"RunConfig.profile_steps={spec!r}: expected 'FIRST-LAST' (or one step) "
                         "with 1 <= FIRST <= LAST, e.g. '5-7'")
    return a, b


def _device_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


class StepProfiler:
    """Call `before(step)` and `after(step, elapsed_s)` around each step (1-based), and
    `close()` at the end; active on the steps of `spec` only."""

    def __init__(self, spec: str, out_dir: Path, use_gpu: bool, message=log.info):
        self.window = parse_profile_steps(spec)
        self.out_dir, self.use_gpu, self.message = Path(out_dir), use_gpu, message
        self.prof = None
        self.wall_s = 0.0
        self.steps: list[int] = []

    def before(self, step: int) -> None:
        if self.window and self.prof is None and self.window[0] <= step <= self.window[1]:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.use_gpu else [])
            self.prof = profile(activities=activities)
            self.prof.__enter__()

    def after(self, step: int, elapsed_s: float) -> None:
        if self.prof is None:
            return
        self.wall_s += elapsed_s
        self.steps.append(step)
        if step >= self.window[1]:
            self.close()

    def close(self) -> None:
        """Stop and write (also when the run ends inside the window)."""
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.window = None  # once per run
        name = f"steps_{self.steps[0]}-{self.steps[-1]}"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        events = prof.key_averages()
        busy_s = sum(_device_us(e) for e in events if e.device_type.name == "CUDA") / 1e6
        lines = [f"steps {self.steps[0]}-{self.steps[-1]} ({len(self.steps)}): wall {self.wall_s:.3f} s"]
        if self.use_gpu:
            # kernels on several streams can overlap, so this can exceed 1 slightly
            lines.append(f"GPU busy {busy_s:.3f} s = {busy_s / self.wall_s:.2f} of the wall time "
                         "(well below 1: the step waits on the host)")
            lines += ["", "top operators by device time",
                      events.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)]
        lines += ["", "top operators by host time",
                  events.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=90)]
        (self.out_dir / f"{name}.txt").write_text("\n".join(lines) + "\n")
        prof.export_chrome_trace(str(self.out_dir / f"{name}.json.gz"))
        self.message(f"profile of {name.replace('_', ' ')} in {self.out_dir}" + (f": {lines[1]}" if self.use_gpu else ""))
