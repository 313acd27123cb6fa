"""ToyClip: a small contrastive image-text model of the toy world (the analogue of CLIP, PickScore, HPSv2).

* image tower: float images ``[B, 3, H, W]`` in [0, 1] (resized to 64 x 64 with antialiasing when
  another size, differentiably), centred on the background grey, a stem and four stride-2 stages of
  (conv 3x3, GroupNorm, SiLU) x 2 down to a 4 x 4 map; its mean and max over positions (what is there,
  wherever it is: colour-shape conjunctions, counts) and the map reduced to a few channels and
  flattened (where things are, which the position prompts need) go through an MLP to the pooled
  features (:meth:`ToyClip.image_features`, used by ``toy-fd``);
* text tower: word embeddings of the closed vocabulary (:func:`rtdmd.toyworld.text.token_ids`) plus
  learned positions, a pre-norm transformer encoder with a key-padding mask, a masked mean over words;
* both projected to ``embed_dim`` and L2-normalised; the score of a pair is their cosine, the
  contrastive logits are ``exp(logit_scale) * cosine`` (``logit_scale`` learned, capped at ln 100 as CLIP).

The architecture sizes travel with the weights (safetensors metadata), so :meth:`ToyClip.load` needs
only the file. The caption algebra used to train and test it (one spelling per meaning, captions
that differ in one compositional detail) is at the end of the module.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rtdmd.checkpoint import load_tensors, save_tensors
from rtdmd.seeding import seed_for
from rtdmd.toyworld.text import MAX_WORDS, PAD, VOCAB_SIZE, token_ids
from rtdmd.toyworld.world import BACKGROUND, PALETTE, PLURALS, SHAPES, SIZE

FORMAT = "rtdmd.toy_clip/1"
# inputs are centred on the background grey and scaled so the palette spans about +-2
PIXEL_MEAN = tuple(c / 255 for c in BACKGROUND)
PIXEL_STD = 0.25
MAX_LOGIT_SCALE = math.log(100.0)


@dataclass(frozen=True)
class ToyClipArch:
    """Sizes of a :class:`ToyClip` (saved with its weights)."""

    widths: tuple[int, ...] = (32, 64, 128, 192)  # channels of the stride-2 stages: 64 -> 32 -> 16 -> 8 -> 4 px
    groups: int = 8  # GroupNorm groups
    map_channels: int = 16  # channels of the 4 x 4 map that is flattened
    feature_dim: int = 128  # pooled image features (toy-fd's feature space)
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    embed_dim: int = 64

    def validate(self) -> None:
        if len(self.widths) != 4:
            raise ValueError("widths: ToyClip has exactly 4 stride-2 stages (64 px -> 4 px)")
        if any(w % self.groups for w in self.widths) or self.text_width % self.text_heads:
            raise ValueError("every width must divide into `groups`, text_width into `text_heads`")


def _conv_block(c_in: int, c_out: int, groups: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(groups, c_out), nn.SiLU()]


class ToyClip(nn.Module):
    def __init__(self, arch: ToyClipArch = ToyClipArch(), seed: int = 0) -> None:
        super().__init__()
        arch.validate()
        self.arch = arch
        # the initial weights depend on the seed only, not on the caller's global RNG (which is restored)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed_for("toy-clip-init", seed))
            self._build(arch)

    def _build(self, a: ToyClipArch) -> None:
        layers: list[nn.Module] = _conv_block(3, a.widths[0], a.groups, 1)
        for c_in, c_out in zip((a.widths[0], *a.widths[:-1]), a.widths, strict=True):
            layers += _conv_block(c_in, c_out, a.groups, 2) + _conv_block(c_out, c_out, a.groups, 1)
        self.image_trunk = nn.Sequential(*layers)
        self.image_map = nn.Sequential(nn.Conv2d(a.widths[-1], a.map_channels, 1), nn.SiLU(), nn.Flatten())
        pooled = 2 * a.widths[-1] + a.map_channels * (SIZE // 16) ** 2
        self.image_head = nn.Sequential(
            nn.Linear(pooled, 2 * a.feature_dim), nn.SiLU(), nn.Linear(2 * a.feature_dim, a.feature_dim)
        )
        self.image_proj = nn.Linear(a.feature_dim, a.embed_dim)

        self.word_embedding = nn.Embedding(VOCAB_SIZE, a.text_width)
        self.position_embedding = nn.Parameter(torch.randn(MAX_WORDS, a.text_width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            a.text_width,
            a.text_heads,
            2 * a.text_width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # no nested-tensor fast path: the output of a row must not depend on the other rows' lengths
        self.text_encoder = nn.TransformerEncoder(layer, a.text_layers, enable_nested_tensor=False)
        self.text_norm = nn.LayerNorm(a.text_width)
        self.text_proj = nn.Linear(a.text_width, a.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ towers

    def image_features(self, images: Tensor) -> Tensor:
        """Pooled image features ``[B, feature_dim]`` (before the projection) of images in [0, 1], in the
        model's dtype."""
        x = images.to(self.pixel_mean.dtype)
        if x.shape[-2:] != (SIZE, SIZE):
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        h = self.image_trunk((x - self.pixel_mean) / PIXEL_STD)
        return self.image_head(torch.cat([h.mean((2, 3)), h.amax((2, 3)), self.image_map(h)], dim=1))

    def encode_image(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings ``[B, embed_dim]``."""
        return F.normalize(self.image_proj(self.image_features(images)), dim=-1)

    def text_features(self, prompts: Sequence[str] | Tensor) -> Tensor:
        """Masked mean of the encoded words ``[B, text_width]``; prompts as strings or token ids."""
        ids = prompts if isinstance(prompts, Tensor) else token_ids(prompts)
        ids = ids.to(self.position_embedding.device)
        valid = ids != PAD
        # an empty prompt reads as the padding token at position 0 (no all-masked attention rows)
        valid[:, 0] |= ~valid.any(dim=1)
        h = self.word_embedding(ids) + self.position_embedding[: ids.shape[1]]
        h = self.text_norm(self.text_encoder(h, src_key_padding_mask=~valid))
        weights = valid.unsqueeze(-1).to(h.dtype)
        return (h * weights).sum(1) / weights.sum(1)

    def encode_text(self, prompts: Sequence[str] | Tensor) -> Tensor:
        """Unit-norm text embeddings ``[B, embed_dim]``."""
        return F.normalize(self.text_proj(self.text_features(prompts)), dim=-1)

    def scale(self) -> Tensor:
        """The contrastive temperature ``exp(logit_scale)``, capped at 100."""
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()

    def forward(self, images: Tensor, prompts: Sequence[str] | Tensor) -> Tensor:
        """Cosine ``[B]`` between image ``i`` and prompt ``i``."""
        return (self.encode_image(images) * self.encode_text(prompts)).sum(-1)

    # ------------------------------------------------------------------ files

    def save(self, path: str | Path, extra: dict[str, str] | None = None) -> Path:
        """Write the weights and the architecture (safetensors metadata ``arch``) atomically."""
        metadata = {"format": FORMAT, "arch": json.dumps(asdict(self.arch)), **(extra or {})}
        return save_tensors(self.state_dict(), path, metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> ToyClip:
        """A ToyClip from a file written by :meth:`save`, in eval mode with frozen parameters."""
        tensors = load_tensors(path, device)
        metadata = checkpoint_metadata(path)
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a ToyClip checkpoint (format {metadata.get('format')!r}, want {FORMAT!r})")
        fields = json.loads(metadata["arch"])
        arch = ToyClipArch(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
        model = cls(arch).to(device)
        model.load_state_dict(tensors, strict=True)
        return model.eval().requires_grad_(False)


def checkpoint_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of a ToyClip checkpoint (architecture, training summary)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


# ---------------------------------------------------------------- captions

COLORS = tuple(PALETTE)
_PLURAL_WORDS = tuple(PLURALS[s] for s in SHAPES)
_NUMBER_WORDS = ("two", "three", "four")
_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
KINDS = ("color", "binding", "shape", "relation", "count")


def _with_articles(words: list[str]) -> str:
    """Join words, choosing "a"/"an" by the next word's first letter (as the prompt templates do)."""
    fixed = list(words)
    for i in range(len(fixed) - 1):
        if fixed[i] in ("a", "an"):
            fixed[i] = "an" if fixed[i + 1][0] in "aeiou" else "a"
    return " ".join(fixed)


def canonical(prompt: str) -> str:
    """One spelling per meaning: "B below A" -> "A above B", "X right of Y" -> "Y left of X", the two
    halves of "X and Y" sorted; captions with the same canonical form describe the same scenes."""
    body = prompt.removeprefix("a photo of ")
    for relation, opposite in (("right of", "left of"), ("below", "above")):
        if f" {relation} " in body:
            first, second = body.split(f" {relation} ", 1)
            body = f"{second} {opposite} {first}"
    if " and " in body:
        body = " and ".join(sorted(body.split(" and ")))
    return body


def caption_negatives(prompt: str) -> dict[str, list[str]]:
    """Captions that differ from ``prompt`` in one compositional detail, by kind: ``color`` (a colour
    replaced by one not in the caption), ``binding`` (the two colours swapped), ``shape`` (a shape
    replaced by one not in the caption), ``relation`` (the opposite relation, or the two shapes
    swapped), ``count`` (another number). Each is false of every scene the prompt describes."""
    words = prompt.split()
    colors = [i for i, w in enumerate(words) if w in COLORS]
    shapes = [i for i, w in enumerate(words) if w in SHAPES]
    plurals = [i for i, w in enumerate(words) if w in _PLURAL_WORDS]
    edits: dict[str, list[dict[int, str]]] = {kind: [] for kind in KINDS}
    used_colors = {words[i] for i in colors}
    used_shapes = {words[i] for i in shapes}
    edits["color"] = [{i: c} for i in colors for c in COLORS if c not in used_colors]
    if len(colors) == 2:
        edits["binding"] = [{colors[0]: words[colors[1]], colors[1]: words[colors[0]]}]
    edits["shape"] = [{i: s} for i in shapes for s in SHAPES if s not in used_shapes]
    edits["shape"] += [{i: p} for i in plurals for p in _PLURAL_WORDS if p != words[i]]
    for i, w in enumerate(words):
        if w in _OPPOSITE:
            edits["relation"].append({i: _OPPOSITE[w]})
            if len(shapes) == 2:  # "A left of B" -> "B left of A"
                edits["relation"].append({shapes[0]: words[shapes[1]], shapes[1]: words[shapes[0]]})
        if w in _NUMBER_WORDS:
            edits["count"] += [{i: n} for n in _NUMBER_WORDS if n != w]
    own = canonical(prompt)
    out: dict[str, list[str]] = {}
    for kind, changes in edits.items():
        seen: dict[str, str] = {}
        for change in changes:
            text = _with_articles([change.get(i, w) for i, w in enumerate(words)])
            seen.setdefault(canonical(text), text)
        seen.pop(own, None)
        if seen:
            out[kind] = list(seen.values())
    return out


def spellings(prompt: str) -> list[str]:
    """Every caption with the same :func:`canonical` form as ``prompt`` (itself first): the two
    orders of "X and Y", "A left of B" and "B right of A"."""
    body = prompt.removeprefix("a photo of ")
    head = prompt[: len(prompt) - len(body)]
    out = [prompt]
    if " and " in body:
        first, second = body.split(" and ", 1)
        out.append(f"{head}{second} and {first}")
    for relation, opposite in (
        ("left of", "right of"),
        ("right of", "left of"),
        ("above", "below"),
        ("below", "above"),
    ):
        if f" {relation} " in body:
            first, second = body.split(f" {relation} ", 1)
            out.append(f"{head}{second} {opposite} {first}")
    return out
