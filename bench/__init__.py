"""Benchmarks (``make bench``). Each reports a ratio against a baseline measured in the same
run, because this machine is shared and absolute times are noise."""
