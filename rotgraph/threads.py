"""How many threads rotgraph's numpy work runs on: the streamed weight rewrites (`rotgraph.weights`) and
the weight quantizers' clipping search (`rotgraph.quant`). numpy releases the GIL inside its loops, so
chunks of independent rows run at once; BLAS products bring their own threads.

The environment variable ROTGRAPH_WORKERS sets the count (default 2, this project's reference machine's
cores); results do not depend on it (each chunk's arithmetic is the same however they are spread).
"""

from __future__ import annotations

import os

from rotgraph.errors import RotgraphError


def workers() -> int:
    """ROTGRAPH_WORKERS, read when the work starts (a bad value is a one-line error, not an import failure)."""
    value = os.environ.get("ROTGRAPH_WORKERS", "2")
    if not value.isdigit() or int(value) < 1:
        raise RotgraphError(f"ROTGRAPH_WORKERS={value!r} is not a positive number of threads")
    return int(value)
