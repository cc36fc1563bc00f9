"""sslbench's data: model cards and example specs (installed as the ``sslbench_registry`` package)."""
