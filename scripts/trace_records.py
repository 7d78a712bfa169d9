"""The records of a QWEN_CUDA_TRACE file (crates/kernels-cuda/src/trace.rs),
shared by scripts/trace-summary.py and scripts/trace-steps.py: one line a
kernel, `time_ns grid_x grid_y threads`, `#` lines skipped."""


def read(path):
    """The file's records as (time ns, grid x, grid y, threads), by time."""
    recs = []
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                continue
            t, gx, gy, th = map(int, line.split())
            recs.append((t, gx, gy, th))
    recs.sort()
    return recs
