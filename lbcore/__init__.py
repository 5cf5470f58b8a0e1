"""Fulcrum's data plane: the compiled worker loop, the shared-memory image
layout, the balancing algorithms, the wire format it shares with the control
plane, and the node agent (``lbproxy``)."""
from pathlib import Path

__version__ = "0.1.0"

# The directory that holds this very package: child processes (workers, an
# embedded control plane) run ``python -m`` from it, so that they find this
# package and not a source tree that happens to be the working directory.
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
