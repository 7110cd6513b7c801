"""ImageBind's vision and audio encoders, reimplemented with the official parameter layout.

The module tree mirrors Meta's ``ImageBindModel`` closely enough that ``state_dict()`` has
exactly the key names and shapes of ``imagebind_huge.pth`` for these two modalities, so
the official file loads without any renaming. The numerics follow the reference model:

* vision: an image is repeated to 2 frames, then a Conv3d (2,14,14) patchifies it; a cls
  token and a learned position embedding are added; a LayerNorm (eps 1e-6) precedes the
  blocks.
* audio: a Conv2d (16, stride 10) over the 128x204 log-mel "image", then a LayerNorm
  (PyTorch default eps 1e-5, unlike every other norm here), cls token, position embedding;
  no pre-block norm; attention has learned bias_k / bias_v tokens.
* blocks: pre-norm (LayerNorm eps 1e-6), attention, exact GELU MLP of ratio 4, stochastic
  depth in training only (audio: linearly 0 -> 0.1 over the blocks).
* head: LayerNorm (eps 1e-6) -> cls token -> Linear without bias; then L2 normalisation,
  and for audio a fixed logit scale of 20 (the official ``log_logit_scale`` buffer).
* inputs with a clip axis ``[B, S, ...]`` are encoded clip by clip and the final
  embeddings are averaged over S (after normalisation and scaling, as the reference does,
  so a clip-averaged embedding is not exactly unit-norm).

Attention runs through ``F.scaled_dot_product_attention`` instead of
``nn.MultiheadAttention`` so the flash / memory-efficient kernels apply on GPU; the
parameters keep ``nn.MultiheadAttention``'s names (``in_proj_weight``, ``out_proj``...).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BRANCHES = ("vision", "audio")
# Modalities the official checkpoint also carries; their keys are dropped on load.
_OFFICIAL_MODALITIES = ("vision", "text", "audio", "depth", "thermal", "imu")
_GROUPS = ("modality_preprocessors", "modality_trunks", "modality_heads", "modality_postprocessors")
_MLP_RATIO = 4
# The reference clips the (fixed) audio logit scale here; exp(log 20) is far below it.
_MAX_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class ImageBindConfig:
    """Architecture of the vision and audio branches. Defaults are the official huge model."""

    vision_embed_dim: int = 1280
    vision_num_blocks: int = 32
    vision_num_heads: int = 16
    vision_kernel: tuple[int, int, int] = (2, 14, 14)
    image_size: int = 224
    num_frames: int = 2
    audio_embed_dim: int = 768
    audio_num_blocks: int = 12
    audio_num_heads: int = 12
    audio_kernel: int = 16
    audio_stride: int = 10
    audio_num_mel_bins: int = 128
    audio_target_len: int = 204
    audio_drop_path: float = 0.1
    out_embed_dim: int = 1024
    audio_logit_scale_init: float = 20.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "vision_kernel", tuple(int(k) for k in self.vision_kernel))
        for branch in BRANCHES:
            dim, heads = getattr(self, f"{branch}_embed_dim"), getattr(self, f"{branch}_num_heads")
            if dim % heads:
                raise ValueError(f"{branch}_embed_dim={dim} is not divisible by {branch}_num_heads={heads}")

    @classmethod
    def huge(cls) -> ImageBindConfig:
        """The official ``imagebind_huge`` architecture (vision ViT-H/14, audio ViT-B)."""
        return cls()

    @classmethod
    def tiny(cls) -> ImageBindConfig:
        """Same layout and output size as huge, 32-wide 2-block trunks: for tests and CPU runs."""
        return cls(
            vision_embed_dim=32,
            vision_num_blocks=2,
            vision_num_heads=2,
            audio_embed_dim=32,
            audio_num_blocks=2,
            audio_num_heads=2,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["vision_kernel"] = list(self.vision_kernel)  # JSON/YAML friendly
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageBindConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ImageBindConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**dict(d))

    def num_tokens(self, branch: str) -> int:
        """Sequence length of a branch, cls token included."""
        if branch == "vision":
            kt, kh, kw = self.vision_kernel
            grid = (self.num_frames // kt) * (self.image_size // kh) * (self.image_size // kw)
        elif branch == "audio":
            k, s = self.audio_kernel, self.audio_stride
            grid = ((self.audio_num_mel_bins - k) // s + 1) * ((self.audio_target_len - k) // s + 1)
        else:
            raise ValueError(f"unknown branch {branch!r}; expected one of {BRANCHES}")
        return 1 + grid


# --------------------------------------------------------------------------- building blocks


class _RepeatFrames(nn.Module):
    """[B,C,H,W] or single-frame [B,C,1,H,W] -> [B,C,T,H,W] by repeating the frame, so an
    image meets the temporal kernel of the video stem (the reference's repeat padding)."""

    def __init__(self, num_frames: int):
        super().__init__()
        self.num_frames = num_frames

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)
        elif x.ndim != 5:
            raise ValueError(f"vision stem expects [B,3,H,W] or [B,3,T,H,W], got {tuple(x.shape)}")
        if x.shape[2] == 1:
            x = x.expand(-1, -1, self.num_frames, -1, -1)
        return x


class _PatchStem(nn.Module):
    """Patchify with ``proj``, flatten to tokens, optional LayerNorm. Attribute names are
    the official ones (``proj``, ``norm_layer``) because the checkpoint keys depend on them."""

    def __init__(self, proj: nn.Module, norm_layer: nn.Module | None = None):
        super().__init__()
        self.proj = proj
        self.norm_layer = norm_layer

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)  # [B, D, (T)HW] -> [B, L, D]
        if self.norm_layer is not None:
            x = self.norm_layer(x)
        return x


class _VisionStem(_PatchStem):
    """The vision stem computed as one matrix product over non-overlapping patches.

    cuDNN runs this Conv3d on a slow path (about 25 TFLOP/s on an H100, 4 of 92 ms of a
    batch-128 forward); unfolding the patches and multiplying is the same arithmetic at GEMM
    speed. A still image is two identical frames, so its kernel is summed over time first
    (half the work, no repeated frame). Same parameters (``proj.1.weight``) as the Conv3d.
    """

    def forward(self, x: Tensor) -> Tensor:
        weight = self.proj[1].weight  # [D, 3, T, kh, kw]
        dim, channels, frames, kh, kw = weight.shape
        if x.ndim == 5 and x.shape[2] == 1:
            x = x[:, :, 0]
        if x.ndim == 4:
            b, _, h, w = x.shape
            kernel = weight.float().sum(2).to(weight.dtype).reshape(dim, -1)
            patches = x.reshape(b, channels, h // kh, kh, w // kw, kw).permute(0, 2, 4, 1, 3, 5)
        else:
            b, _, t, h, w = x.shape
            if t != frames:
                raise ValueError(f"vision clips must have {frames} frames, got {t}")
            kernel = weight.reshape(dim, -1)
            patches = x.reshape(b, channels, t, h // kh, kh, w // kw, kw).permute(0, 3, 5, 1, 2, 4, 6)
        return patches.reshape(b * patches.shape[1] * patches.shape[2], -1).matmul(kernel.t()).view(b, -1, dim)


class _PosEmbedding(nn.Module):
    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.empty(1, num_tokens, dim))


class _Tokenizer(nn.Module):
    """Stem + cls token + learned position embedding (one cls token, as the official model).

    With ``bias_kv_slot`` a zero placeholder token is appended after the position embedding:
    the trunk's attention puts its learned bias key/value there (see ``_Attention``).
    """

    def __init__(self, stem: _PatchStem, num_tokens: int, dim: int, bias_kv_slot: bool = False):
        super().__init__()
        self.bias_kv_slot = bias_kv_slot
        self.rgbt_stem = stem  # the official name for both vision and audio stems
        self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
        self.pos_embedding_helper = _PosEmbedding(num_tokens, dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # OpenCLIP-style, as the reference: N(0,1) scaled by dim^-0.5.
        scale = self.cls_token.shape[-1] ** -0.5
        with torch.no_grad():
            nn.init.normal_(self.cls_token).mul_(scale)
            nn.init.normal_(self.pos_embedding_helper.pos_embed).mul_(scale)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.rgbt_stem(x)
        pos = self.pos_embedding_helper.pos_embed
        if tokens.shape[1] + 1 != pos.shape[1]:
            # The reference would interpolate the position table here; every input this
            # project feeds (224x224 images, 2-frame clips, 128x204 mel) needs none.
            raise ValueError(
                f"input {tuple(x.shape)} gives {tokens.shape[1]} patches but the position "
                f"embedding holds {pos.shape[1] - 1}: resize the input to the configured size"
            )
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + pos
        return F.pad(tokens, (0, 0, 0, 1)) if self.bias_kv_slot else tokens


class _Attention(nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameter names, computed by SDPA."""

    def __init__(self, dim: int, num_heads: int, add_bias_kv: bool):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, dim))
            self.bias_v = nn.Parameter(torch.empty(1, 1, dim))
        else:
            self.bias_k = self.bias_v = None
        self.out_proj = nn.Linear(dim, dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if self.bias_k is not None:
            # add_bias_kv: one extra learned key/value token every query attends to. The
            # tokenizer appended a placeholder token for it; its key and value are overwritten
            # here, in place (concatenating k and v cost 17% of an audio forward), so real
            # tokens never see the placeholder's own state. Its output is never read.
            qkv[:, -1, d : 2 * d] = self.bias_k.view(d)
            qkv[:, -1, 2 * d :] = self.bias_v.view(d)
        q, k, v = qkv.chunk(3, dim=-1)
        h = self.num_heads
        q, k, v = (t.unflatten(-1, (h, d // h)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as the reference
        self.fc2 = nn.Linear(hidden, dim)
        for fc in (self.fc1, self.fc2):  # the reference trunk's (JAX ViT) init
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and not torch.is_grad_enabled():
            # cuBLASLt's bias+GELU epilogue saves a pass over the 4×-wide activation (about 6%
            # of a bf16 forward on an H100). It uses GELU's tanh form; in bf16/fp16 the
            # difference from the exact form is below the format's rounding (cosine to fp32
            # ≥ 0.9999 measured). fp32, where the parity tests run, keeps the exact GELU.
            hidden = torch._addmm_activation(self.fc1.bias, x.flatten(0, -2), self.fc1.weight.t(), use_gelu=True)
            return self.fc2(hidden.view(*x.shape[:-1], -1))
        return self.fc2(self.act(self.fc1(x)))


def _drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth: drop a residual branch per sample, rescaling the survivors."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class _Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, add_bias_kv: bool, drop_path: float):
        super().__init__()
        self.attn = _Attention(dim, num_heads, add_bias_kv)
        self.norm_1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, _MLP_RATIO * dim)
        self.norm_2 = nn.LayerNorm(dim, eps=1e-6)
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        x = x + _drop_path(self.attn(self.norm_1(x)), self.drop_path, self.training)
        return x + _drop_path(self.mlp(self.norm_2(x)), self.drop_path, self.training)


class _Trunk(nn.Module):
    def __init__(self, dim: int, num_blocks: int, num_heads: int, pre_norm: bool, add_bias_kv: bool, drop_path: float):
        super().__init__()
        # Index 0 is the official key position of the vision pre-norm; audio has none and
        # an empty Sequential passes its input through.
        self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(dim, eps=1e-6)) if pre_norm else nn.Sequential()
        rates = torch.linspace(0, drop_path, num_blocks, device="cpu").tolist() if num_blocks else []
        self.blocks = nn.Sequential(*(_Block(dim, num_heads, add_bias_kv, r) for r in rates))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.blocks(self.pre_transformer_layer(tokens))


class _TakeToken(nn.Module):
    """Select token ``index`` (the cls token); parameter-free so the Linear stays at ``.2``."""

    def __init__(self, index: int = 0):
        super().__init__()
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return x[:, self.index]


class _Normalize(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=2, dim=-1)


class _LogitScale(nn.Module):
    """Fixed multiplier stored as a log, as the official (non-learnable) buffer."""

    def __init__(self, init: float):
        super().__init__()
        self.register_buffer("log_logit_scale", torch.full((), math.log(init)))

    def forward(self, x: Tensor) -> Tensor:
        return self.log_logit_scale.exp().clamp(max=_MAX_LOGIT_SCALE) * x


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim, eps=1e-6), _TakeToken(0), nn.Linear(dim, out_dim, bias=False))


# --------------------------------------------------------------------------- the encoder


class ImageBindEncoder(nn.Module):
    """ImageBind vision and/or audio encoder; ``forward(branch, inputs) -> [B, out_embed_dim]``.

    Build on the meta device (``with torch.device("meta"):``) to inspect shapes for free.
    """

    def __init__(self, config: ImageBindConfig, branches: Iterable[str] = BRANCHES):
        super().__init__()
        self.config = config
        self.branches = tuple(branches)
        bad = [b for b in self.branches if b not in BRANCHES]
        if bad or not self.branches:
            raise ValueError(f"branches must be a non-empty subset of {BRANCHES}, got {self.branches}")
        c = config
        self.modality_preprocessors = nn.ModuleDict()
        self.modality_trunks = nn.ModuleDict()
        self.modality_heads = nn.ModuleDict()
        self.modality_postprocessors = nn.ModuleDict()
        if "vision" in self.branches:
            conv = nn.Conv3d(3, c.vision_embed_dim, kernel_size=c.vision_kernel, stride=c.vision_kernel, bias=False)
            stem = _VisionStem(nn.Sequential(_RepeatFrames(c.num_frames), conv))
            self.modality_preprocessors["vision"] = _Tokenizer(stem, c.num_tokens("vision"), c.vision_embed_dim)
            self.modality_trunks["vision"] = _Trunk(
                c.vision_embed_dim, c.vision_num_blocks, c.vision_num_heads, pre_norm=True, add_bias_kv=False, drop_path=0.0
            )
            self.modality_heads["vision"] = _head(c.vision_embed_dim, c.out_embed_dim)
            self.modality_postprocessors["vision"] = nn.Sequential(_Normalize())
        if "audio" in self.branches:
            conv = nn.Conv2d(1, c.audio_embed_dim, kernel_size=c.audio_kernel, stride=c.audio_stride, bias=False)
            stem = _PatchStem(conv, nn.LayerNorm(c.audio_embed_dim))  # default eps 1e-5, as the reference
            self.modality_preprocessors["audio"] = _Tokenizer(stem, c.num_tokens("audio"), c.audio_embed_dim, bias_kv_slot=True)
            self.modality_trunks["audio"] = _Trunk(
                c.audio_embed_dim,
                c.audio_num_blocks,
                c.audio_num_heads,
                pre_norm=False,
                add_bias_kv=True,
                drop_path=c.audio_drop_path,
            )
            self.modality_heads["audio"] = _head(c.audio_embed_dim, c.out_embed_dim)
            self.modality_postprocessors["audio"] = nn.Sequential(_Normalize(), _LogitScale(c.audio_logit_scale_init))

    def _check_input(self, branch: str, x: Tensor) -> None:
        if branch not in self.branches:
            raise ValueError(f"branch {branch!r} is not in this encoder (built with {self.branches})")
        c = self.config
        if branch == "vision":
            ok = x.ndim in (4, 5, 6) and x.shape[-3 if x.ndim != 6 else -4] == 3
            want = "[B,3,H,W], [B,S,3,H,W] or [B,S,3,T,H,W]"
        else:
            ok = x.ndim in (4, 5) and tuple(x.shape[-3:]) == (1, c.audio_num_mel_bins, c.audio_target_len)
            want = f"[B,1,{c.audio_num_mel_bins},{c.audio_target_len}] or [B,S,1,{c.audio_num_mel_bins},{c.audio_target_len}]"
        if not ok:
            raise ValueError(f"{branch} input must be {want}, got {tuple(x.shape)}")

    def forward(self, branch: str, inputs: Tensor) -> Tensor:
        self._check_input(branch, inputs)
        # As the reference: 5-D and larger inputs carry a clip axis S after the batch.
        clips = inputs.ndim >= 5
        if clips:
            b, s = inputs.shape[:2]
            inputs = inputs.flatten(0, 1)
        tokenizer = self.modality_preprocessors[branch]
        inputs = inputs.to(tokenizer.cls_token.dtype)
        x = self.modality_trunks[branch](tokenizer(inputs))
        x = self.modality_postprocessors[branch](self.modality_heads[branch](x))
        if clips:
            x = x.view(b, s, -1).mean(dim=1)
        return x


# --------------------------------------------------------------------------- checkpoint IO


def _branch_of(key: str) -> str | None:
    """The modality a checkpoint key belongs to (``modality_trunks.audio.x`` -> ``audio``)."""
    parts = key.split(".", 2)
    if len(parts) >= 2 and parts[0] in _GROUPS:
        return parts[1]
    return None


def check_imagebind_file(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"ImageBind checkpoint {path} does not exist (see pretrained_checkpoint/README.md)")


def load_imagebind(
    path: str | os.PathLike, config: ImageBindConfig, branches: Iterable[str] = BRANCHES
) -> ImageBindEncoder:
    """Build an encoder for ``config`` and fill it from an ``imagebind_huge.pth``-layout file.

    Keys of other official modalities (text, depth, thermal, imu) and of branches not asked
    for are dropped. Anything else that does not fit -- a missing key, an unknown key, a
    wrong shape -- raises ``ValueError`` naming the file and the keys.
    """
    path = Path(path)
    branches = tuple(branches)
    check_imagebind_file(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ValueError(f"cannot read ImageBind checkpoint {path}: {err}") from err
    if not isinstance(raw, Mapping) or not all(isinstance(v, Tensor) for v in raw.values()):
        raise ValueError(
            f"{path} is not a flat state dict of tensors (got {type(raw).__name__}); "
            "expected the official imagebind_huge.pth layout"
        )

    # Built on the meta device and filled with load_state_dict(assign=True): allocating
    # and randomly initialising the huge model first would cost ~10 s and 4.8 GB for
    # values that are overwritten at once.
    with torch.device("meta"):
        encoder = ImageBindEncoder(config, branches)
    expected = encoder.state_dict()
    kept = {}
    unexpected = []
    for key, value in raw.items():
        owner = _branch_of(key)
        if owner in branches:
            kept[key] = value
        elif owner not in _OFFICIAL_MODALITIES:
            unexpected.append(key)
    missing = [k for k in expected if k not in kept]
    unexpected += [k for k in kept if k not in expected]
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in kept.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        size = "huge" if config == ImageBindConfig.huge() else "tiny" if config == ImageBindConfig.tiny() else "custom"
        lines = [f"ImageBind checkpoint {path} does not fit the {size} config for branches {branches}:"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                more = f" ... (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                lines.append(f"  {len(keys)} {label}: {', '.join(keys[:5])}{more}")
        lines.append(
            f"  Is this imagebind_huge.pth? The config says vision {config.vision_embed_dim}-wide x "
            f"{config.vision_num_blocks} blocks, audio {config.audio_embed_dim}-wide x {config.audio_num_blocks} blocks; "
            "set model.imagebind_size to match the file, or point model.imagebind_path at the right file."
        )
        raise ValueError("\n".join(lines))
    # Same dtype as a freshly built encoder, whatever precision the file was saved in.
    dtype = torch.get_default_dtype()
    kept = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kept.items()}
    encoder.load_state_dict(kept, strict=True, assign=True)  # cannot fail after the checks above
    return encoder


def save_imagebind(encoder: ImageBindEncoder, path: str | os.PathLike) -> None:
    """Write the encoder's state dict in the flat official layout, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
