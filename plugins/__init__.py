"""sslbench's built-in plugins.

Each module here is registered through the entry-point group ``sslbench`` listed in pyproject.toml,
exactly as a third-party plugin is; none is imported by the core.
"""
