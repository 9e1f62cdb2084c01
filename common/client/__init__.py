"""The client side: the async SDK, the partitioner that picks a cut, phone classes, uplink traces, workloads.

``from common.client import GraftClient`` is the SDK entry point (``common.client.sdk``).
"""

from common.client.sdk import ClientClosed, GraftClient

__all__ = ["ClientClosed", "GraftClient"]
