"""Protobuf/gRPC modules generated from protos/stagekit/rpc/pb/*.proto (common, stage, generation).

They are not in git: `pip install` (build hook in setup.py) or `make protos` (scripts/gen_protos.py) writes them.
"""
