"""Code shared by every service: settings, storage, codecs, proto stubs, containers."""
