"""shmmel's load generator: ``shmmel bench text|audio`` and ``shmmel gen-audio``.

Several forked processes drive keep-alive connections (closed or open loop, latencies in
HdrHistogram, merged); reports put every figure beside its target. See docs/PERFORMANCE.md.
"""
