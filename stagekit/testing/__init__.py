"""Test fixtures that are programs: a data-plane peer process and the host that runs one
transport in it. Tests and the transport benchmarks start them; serving code never imports them."""
