"""Built-in pipelines (YAML), found by name."""
