"""xdplb: an XDP layer-4 load balancer (Maglev, connection table, IPIP/GUE, DSR)."""

__version__ = "0.1.0"
