"""A module that fails to import, for the loader's error report."""

raise RuntimeError("this plug-in module is broken on purpose")
