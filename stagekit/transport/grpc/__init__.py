"""The gRPC data plane: frames as a client stream of Stage.PushFrames to the next stage."""
