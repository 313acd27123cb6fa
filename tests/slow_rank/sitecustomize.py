"""Loaded only by tests (``torchrun(..., slow_rank=True)`` puts this folder on ``PYTHONPATH``).

Rank 1's first look at the run directory after joining the process group (``valid_rows`` in
generate, ``cached_scores`` in score) waits until rank 0 has written part of its share (a non-empty
``*.part0.jsonl``), or ``WAIT_S`` if rank 0 cannot write yet: the worst interleaving a loaded machine
can produce. A harness that lets a rank write before every rank has read the run directory then deals
rank 1 a different share, and images or scores go missing.
"""

import os
import time
from pathlib import Path

WAIT_S = 10.0

if os.environ.get("RANK") == "1":
    import torch.distributed as dist

    import bench.generate
    import bench.score

    _valid_rows, _cached_scores, _waited = bench.generate.valid_rows, bench.score.cached_scores, []

    def lag(root) -> None:
        if dist.is_initialized() and not _waited:
            _waited.append(True)
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline and not any(p.stat().st_size for p in Path(root).glob("*.part0.jsonl")):
                time.sleep(0.05)

    def valid_rows(root, *args, **kwargs):
        lag(root)
        return _valid_rows(root, *args, **kwargs)

    def cached_scores(root):
        lag(root)
        return _cached_scores(root)

    bench.generate.valid_rows, bench.score.cached_scores = valid_rows, cached_scores
