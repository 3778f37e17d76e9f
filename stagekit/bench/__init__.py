"""Benchmarks of stagemesh's parts (``stagemesh bench ...``) and the tools they share."""
