"""The shared fixing pool: fixer replicas on Ray actors behind one named router that batches across callers.

``client = start_pool(checkpoint, min_replicas=1, max_replicas=4)``; any Ray task then calls
``get_pool().submit(images, refs)`` (or receives ``client`` itself: it pickles) and ``shutdown_pool()`` ends it.
"""

from .client import PoolClient, get_pool, request_key, shutdown_pool, start_pool
from .config import PoolConfig
from .errors import PoolFixError, PoolRequestError, PoolUnavailableError

__all__ = ["PoolClient", "PoolConfig", "PoolFixError", "PoolRequestError", "PoolUnavailableError", "get_pool",
           "request_key", "shutdown_pool", "start_pool"]
