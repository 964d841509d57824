"""The trainer side: RemoteLoader, a drop-in for torch.utils.data.DataLoader."""

from loader.client.channel import TLS, InsecureTokenWarning
from loader.client.reconnect import ServiceUnreachable
from loader.client.remote_loader import RemoteLoader

__all__ = ["TLS", "InsecureTokenWarning", "RemoteLoader", "ServiceUnreachable"]
