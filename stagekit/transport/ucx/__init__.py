"""The UCX data plane (ucxx): links between neighbouring stages, bulk KV transfers, progress."""
