"""Fulcrum's data plane: the compiled worker loop, the shared-memory snapshot
layout, the balancing algorithms and the node agent (``lbproxy``)."""

__version__ = "0.1.0"
