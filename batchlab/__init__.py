"""batchlab: run and compare large-minibatch trainings (Goyal et al. 2017).

``import batchlab`` stays light: the notebook client and its errors load on first use
(``batchlab.Client``), so the CLI and the service processes do not pay for httpx here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "APIError",
    "Client",
    "NotFound",
    "ServerUnavailable",
    "Unauthorized",
    "ValidationError",
]

if TYPE_CHECKING:
    from batchlab.client import (
        APIError,
        Client,
        NotFound,
        ServerUnavailable,
        Unauthorized,
        ValidationError,
    )


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import version

        return version("batchlab")
    if name in __all__:
        from batchlab import client

        return getattr(client, name)
    raise AttributeError(f"module 'batchlab' has no attribute {name!r}")
