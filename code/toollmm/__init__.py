"""Tool_LMM: multimodal tool selection (MLLM-Tool) on a NExT-GPT style any-to-any model."""

__version__ = "0.1.0"
