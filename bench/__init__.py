"""fxpass benchmarks: eager PyTorch, the naive dynamo export and fxpass's lowering, side by side.

``python -m bench`` measures on this machine and writes ``bench/results/<date>-<host-kind>.json``;
``python -m bench --readme`` regenerates docs/performance.md (the "## Performance" section) from the latest
results.  Benchmarks measure; they never assert (the targets print as met / not met).
"""

SCHEMA = "fxpass-bench/1"
