"""Model families, each built for a layer range ``[start_layer, end_layer)``."""
