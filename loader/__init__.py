"""loader: a streaming data-loader service that feeds PyTorch trainers with curated batches."""

from loader.client import RemoteLoader, ServiceUnreachable

__all__ = ["RemoteLoader", "ServiceUnreachable"]
__version__ = "0.1.0"
