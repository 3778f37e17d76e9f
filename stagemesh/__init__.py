"""The top of the stack: the ``stagemesh`` command line, which composes the core
(``stagekit``), the stage service (``services``) and the gateway (``gateway``)."""
