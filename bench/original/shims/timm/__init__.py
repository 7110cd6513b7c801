"""Stand-in for the two timm pieces ImageBind imports (timm.models.layers)."""
