"""Stand-in for the top-level ``data`` module the original's header.py imports. Nothing reads it:
openllama.py uses its own ``model.ImageBind.data``."""
