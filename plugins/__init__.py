"""Built-in plugins. Each registers through the ``llmos`` entry-point group like any other."""
