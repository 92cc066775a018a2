"""The lab: network namespaces (netns, namespaces), the demo topology (topology), its
backend servers (server) and XDP programs (decap), and `make demo` (demo). The load
balancer never imports this package; `xdplb lab up|down` and the tests do."""
