"""Benchmark plug-ins: the only code that knows a simulator (see lcbc.benchmark for the interface)."""
