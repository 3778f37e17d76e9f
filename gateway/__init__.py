"""The stagemesh gateway: an OpenAI-compatible HTTP front over replicas of pipeline stages.

It reaches stages only over gRPC (`gateway.replica`). Entry points: `gateway.app.create_app`,
`gateway.server.serve` / `gateway.server.main`, and `gateway.cli` for ``stagemesh gateway``.
"""
