"""``python -m services.gateway``: the Open Inference Protocol front door (HTTP/REST and gRPC)."""

import sys

from services.gateway.server import METRICS_PORT_OFFSET, SERVICE, main
from services.lifecycle import run_service

sys.exit(run_service(SERVICE, main, port_offset=METRICS_PORT_OFFSET))
