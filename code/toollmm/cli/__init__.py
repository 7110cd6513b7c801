"""Command-line entry points (``toollmm.cli.console`` holds the installed ``toollmm-*`` scripts)."""
