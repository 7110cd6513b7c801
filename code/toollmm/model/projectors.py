"""Output projectors (NExT-GPT): a signal-token run's LLM states → a decoder's text conditioning.

Input: for each run, the last-layer hidden states of its n signal tokens plus the input
embeddings of those tokens (both ``(N, n, llm_hidden)``). Output: ``(N, target_tokens,
target_dim)`` from ``model.outputs.<modality>`` — 77×768 for Stable Diffusion 1.5, 77×1024 for
Zeroscope, 1×512 for AudioLDM (the published values, ``toollmm.output_modalities``). One
projector per output modality, built in the registry's order (``model.toollmm.build_model``).

Submodule names (``fc``, ``tfm``, ``model``, ``query_embs``) are the published ones, so
NExT-GPT's released output-projector weights map onto these by a prefix rename.
"""

from __future__ import annotations

import torch
from torch import nn

from toollmm.config import OutputModalityConfig, OutputProjectorConfig


class TransformerProjector(nn.Module):
    """Linear to ``hidden_size``, then an encoder-decoder transformer whose decoder reads
    ``target_tokens`` learned queries; a final linear to the decoder width (the published mode)."""

    def __init__(self, llm_hidden: int, output: OutputModalityConfig, config: OutputProjectorConfig):
        super().__init__()
        width = config.hidden_size
        self.fc = nn.Linear(llm_hidden, width)
        self.tfm = nn.Transformer(
            d_model=width, nhead=config.heads, num_encoder_layers=config.encoder_layers,
            num_decoder_layers=config.decoder_layers, dim_feedforward=config.ffn_size,
            dropout=0.0, batch_first=True, norm_first=True,
        )
        self.model = nn.Linear(width, output.target_dim)
        # randn, as published: the queries start at unit scale like the (pre-normed) inputs.
        self.query_embs = nn.Parameter(torch.randn(1, output.target_tokens, width))

    def forward(self, hidden: torch.Tensor, input_embeds: torch.Tensor) -> torch.Tensor:
        x = self.fc(hidden + input_embeds)
        queries = self.query_embs.expand(x.shape[0], -1, -1).to(x.dtype)
        return self.model(self.tfm(x, queries))


class LinearProjector(nn.Module):
    """Each signal token → the decoder width, then a learned mix over the run (n → target_tokens).

    The published ``linear`` mode cannot run (its forward returns nothing for it); this keeps
    its per-token linear map and adds the token-axis map the shapes need.
    """

    def __init__(self, llm_hidden: int, output: OutputModalityConfig):
        super().__init__()
        self.model = nn.Linear(llm_hidden, output.target_dim)
        self.mix = nn.Linear(output.signal_tokens, output.target_tokens)

    def forward(self, hidden: torch.Tensor, input_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.model(hidden + input_embeds)  # (N, n, dim)
        return self.mix(tokens.transpose(1, 2)).transpose(1, 2)


def build_output_projector(llm_hidden: int, output: OutputModalityConfig, config: OutputProjectorConfig) -> nn.Module:
    if config.mode == "transformer":
        return TransformerProjector(llm_hidden, output, config)
    if config.mode == "linear":
        return LinearProjector(llm_hidden, output)
    raise ValueError(f"model.outputs.projector.mode {config.mode!r} is not one of ['transformer', 'linear']")
