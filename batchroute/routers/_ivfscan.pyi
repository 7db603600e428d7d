# The compiled inner loop of batchroute.routers.ivf (_ivfscan.c).
from typing import Any

def scan(codes: Any, block_off: Any, ids: Any, dim: int, queries: Any, qstart: Any,
         qlist: Any, distances: Any, labels: Any, /) -> None: ...
