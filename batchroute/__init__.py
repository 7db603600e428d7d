"""batchroute: route queued Parquet prompts to the cheapest capable LLM and run the batch.

Importing the package is cheap: Ray, onnxruntime and the HTTP stack load only in the modules
that use them, so the CLI's help and the unit tests start fast.
"""

from batchroute.errors import (
    BatchrouteError,
    ConfigError,
    DispatchError,
    RouterError,
    SchemaError,
    SinkError,
    TerminalDispatchError,
    TransientDispatchError,
)

__all__ = [
    "BatchrouteError",
    "ConfigError",
    "DispatchError",
    "RouterError",
    "SchemaError",
    "SinkError",
    "TerminalDispatchError",
    "TransientDispatchError",
    "__version__",
]

__version__ = "0.1.0"
