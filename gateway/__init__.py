"""The stagemesh gateway: an OpenAI-compatible HTTP front and the gRPC ``stagemesh.v1.Generation``
API over data-parallel replicas of pipeline stages, with admission control, routing
(round robin, least loaded, prefix-aware), health checks, failover and metrics.

It reaches stages only over gRPC (`gateway.replica`). Entry points: `gateway.app.create_app`,
`gateway.server.serve` / `gateway.server.main`, and `gateway.cli` for ``stagemesh gateway``.
"""
