"""``python -m gateway``: the gRPC server plus the Envoy REST gateway (see gateway/launch.py)."""

import sys

from gateway.launch import main

sys.exit(main())
