"""The gateway's gRPC face: ``stagemesh.v1.Generation`` with health and reflection.

Only `codec`, `servicer` and `server` here touch protobuf; requests become the same
pydantic requests the REST endpoints take, so both APIs share every check and limit.
"""
