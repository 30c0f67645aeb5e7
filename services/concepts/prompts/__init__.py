"""Prompt templates of the concepts model backends (``string.Template`` files: ``$name`` fields,
so the JSON examples in them need no escaping). Read with ``importlib.resources``."""
