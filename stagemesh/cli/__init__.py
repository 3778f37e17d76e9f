"""The ``stagemesh`` command line."""
