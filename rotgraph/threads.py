"""How many threads rotgraph's numpy work runs on: the streamed weight rewrites (`rotgraph.weights`) and
the weight quantizers' clipping search (`rotgraph.quant`). numpy releases the GIL inside its loops, so
chunks of independent rows run at once; BLAS products bring their own threads, so where rotgraph runs
chunks on its own threads it holds BLAS to one thread each (`one_blas_thread_each`): OpenBLAS's threads
under two callers on two cores made the streamed rotations 1.3-1.8x slower (benchmarks/RESULTS.md,
"Real width (issue 28)").

The environment variable ROTGRAPH_WORKERS sets the count (default 2, this project's reference machine's
cores); results do not depend on it (each chunk's arithmetic is the same however they are spread).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

from threadpoolctl import threadpool_limits

from rotgraph.errors import RotgraphError


def workers() -> int:
    """ROTGRAPH_WORKERS, read when the work starts (a bad value is a one-line error, not an import failure)."""
    value = os.environ.get("ROTGRAPH_WORKERS", "2")
    if not value.isdigit() or int(value) < 1:
        raise RotgraphError(f"ROTGRAPH_WORKERS={value!r} is not a positive number of threads")
    return int(value)


_limit_lock = threading.Lock()
_limit_users = 0
_limit: threadpool_limits | None = None


@contextlib.contextmanager
def one_blas_thread_each(threads: int) -> Iterator[None]:
    """BLAS limited to one thread while `threads` (> 1) of rotgraph's own threads call it; as it was once
    the last such block ends (blocks may overlap: the weights saved in parallel each stream their chunks).
    The limit is process-wide: only for work that runs nothing else alongside."""
    global _limit_users, _limit
    if threads <= 1:
        yield
        return
    with _limit_lock:
        if _limit_users == 0:
            _limit = threadpool_limits(limits=1, user_api="blas")
        _limit_users += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0 and _limit is not None:
                _limit.restore_original_limits()
                _limit = None
