"""Service latency benchmarks: zeroproxy vs kube-proxy-shaped iptables / nftables vs no proxy.

``python -m bench`` builds its own cluster of network namespaces with the test bed, programs
the same N ClusterIP services into every mode, drives them with a native client and writes a
JSON results file, a markdown table and PNG plots. See bench/README.md.
"""

# Bump when a field of the results JSON changes meaning or moves; bench/README.md documents it.
SCHEMA = "zeroproxy-bench/1"
