"""The top of the tree: the ``dataengine`` command (``cli.py`` and its command groups) and the
composition roots that wire the services' cores together (``serve``, ``embedded``, ``studio_local``,
``pipeline``). Services import ``services.common`` and themselves only; wiring happens here."""
