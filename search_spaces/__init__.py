"""Built-in search spaces (YAML), found by name."""
