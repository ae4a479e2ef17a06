"""``python -m gateway``: the gRPC server plus the Envoy REST gateway (see gateway/launch.py);
with ``--upstream HOST:PORT[,...]`` the gateway alone, in front of servers started elsewhere
(see gateway/gateway_only.py)."""

import sys

from gateway.gateway_only import main as gateway_only_main
from gateway.gateway_only import wants_gateway_only
from gateway.launch import main

sys.exit(gateway_only_main() if wants_gateway_only(sys.argv[1:]) else main())
