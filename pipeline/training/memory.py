"""How much memory a training worker needs, and how much arithmetic a sample costs, from the
architecture's JSON alone (no torch, no open_clip import: the plan runs before anything starts).

Architectures are open_clip's JSON configs (``pipeline/training/model_configs`` first, then
open_clip's own), read as files. Only the plain CLIP towers are modelled: a ViT image tower and
open_clip's text transformer, both of pre-norm residual blocks (layer norm, multi-head
attention, layer norm, a GELU MLP); a ResNet, timm or Hugging Face tower raises
``Unsupported``.

A worker holds (docs/plan.md, "Memory of a training worker", has the derivation and the check
against a measured peak):

- the fp32 weights (AMP keeps fp32 master weights; autocast casts per use), their fp32
  gradients and AdamW's two fp32 moments: 16 bytes a parameter, plus autocast's cached
  low-precision copy of every weight (2 bytes) under AMP;
- the local batch's inputs: uint8 images as fed (and ``prefetch_batches`` more), the normalised
  fp32 images and, under AMP, their low-precision copy for the patch embedding;
- the activations autograd keeps for backward, per sample of a micro-batch (local batch /
  ``accum_steps``). Per residual block and token: the two layer-norm inputs (the fp32 residual
  stream, 4 bytes each), and at ``p`` bytes (4 in fp32, 2 under AMP) the input of the qkv
  projection, q, k and v, the attention output, the output projection's input, the MLP's input,
  and its hidden layer twice (before and after the GELU, ``mlp_ratio`` x width each):
  ``seq * (width * (8 + 7 p) + 2 * mlp_width * p)`` bytes. A fused attention kernel (PyTorch's
  ``scaled_dot_product_attention`` on CUDA) keeps no ``seq x seq`` matrix; the math kernel keeps
  the softmax output, ``heads * seq^2 * 4`` bytes more (and its low-precision copy under AMP).
  With ``grad_checkpointing`` (open_clip checkpoints every block) only each block's input is
  kept, at the residual stream's precision (fp32 in the text tower, the patch embedding's in the
  image tower), and backward recomputes one block at a time;
- the contrastive loss: two local x global logit matrices at ``p`` bytes, their fp32
  log-softmax and its gradient. The loss is taken over the whole local batch in every
  micro-batch (``train_loop.train_step``), so accumulation does not shrink it;
- while backward runs: checkpointed, the activations of the block being recomputed; otherwise
  the gradient of one block's MLP hidden layer (fp32).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

# The folder ``pipeline.training.model`` registers with open_clip (read here as files).
CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
GIB = 1024 ** 3
FP32 = 4
# Attention kernels: "fused" keeps no seq x seq matrix for backward, "math" keeps the softmax's.
ATTENTION_KERNELS = ("fused", "math")


class Unsupported(ValueError):
    """An architecture this module does not model (a ResNet, timm or Hugging Face tower)."""


@dataclasses.dataclass(frozen=True)
class Tower:
    """One transformer tower: its blocks and what goes in and out of them."""
    layers: int
    width: int
    heads: int
    seq: int                # tokens per sample: patches + class token, or the context length
    mlp_width: int
    params: int             # the tower's parameters, its embeddings and projection included
    # The residual stream stays fp32 under autocast (the text tower: its token embedding is
    # cast to the weights' dtype), or takes the patch embedding's 16 bits (the image tower: its
    # class and position embeddings are cast to the patches' dtype).
    stream_fp32: bool = True


@dataclasses.dataclass(frozen=True)
class Architecture:
    name: str
    vision: Tower
    text: Tower
    embed_dim: int
    image_size: int
    patch_size: int
    params: int             # the whole CLIP's parameters

    @property
    def pixels(self) -> int:
        """Values of one input image (3 channels)."""
        return 3 * self.image_size ** 2


def model_config(name: str) -> dict:
    """The JSON config of an open_clip architecture: this repository's, else open_clip's own
    (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    folders = [CONFIG_DIR]
    if spec is not None and spec.submodule_search_locations:
        folders.append(Path(next(iter(spec.submodule_search_locations))) / "model_configs")
    for folder in folders:
        path = folder / f"{name}.json"
        if path.exists():
            return json.loads(path.read_text())
    known = sorted({p.stem for f in folders if f.exists() for p in f.glob("*.json")})
    raise ValueError(f"unknown model {name!r}; models: {', '.join(known)}")


def _block_params(width: int, mlp_width: int, layer_scale: bool) -> int:
    return (4 * width                           # two layer norms
            + 3 * width * width + 3 * width     # qkv projection
            + width * width + width             # output projection
            + width * mlp_width + mlp_width     # MLP in
            + mlp_width * width + width         # MLP out
            + (2 * width if layer_scale else 0))


_CUSTOM_BLOCK = ("block_type", "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner",
                 "scale_attn", "scale_fc")


def _plain(name: str, tower: str, cfg: dict, foreign: tuple[str, ...]) -> None:
    odd = [k for k in (*foreign, *_CUSTOM_BLOCK) if cfg.get(k)]
    if odd or not isinstance(cfg.get("layers", 12), int):
        raise Unsupported(f"{name}: its {tower} tower ({', '.join(odd) or 'ResNet layers'}) is not "
                          "a plain open_clip transformer; no memory or FLOP estimate for it")


def architecture(name: str, config: dict | None = None) -> Architecture:
    """The towers of ``name`` (its JSON, or ``config`` when given), with open_clip's defaults
    (``CLIPVisionCfg``, ``CLIPTextCfg``) for what the JSON leaves out."""
    cfg = config if config is not None else model_config(name)
    v, t, embed = cfg["vision_cfg"], cfg["text_cfg"], int(cfg["embed_dim"])
    _plain(name, "image", v, ("timm_model_name", "attentional_pool"))
    _plain(name, "text", t, ("hf_model_name",))

    width, layers = int(v.get("width", 768)), int(v.get("layers", 12))
    patch, size = int(v.get("patch_size", 16)), int(v.get("image_size", 224))
    mlp = int(width * float(v.get("mlp_ratio", 4.0)))
    grid = (size // patch) ** 2
    vision_params = (3 * patch * patch * width                  # patch embedding (no bias)
                     + width + (grid + 1) * width                # class and position embeddings
                     + (0 if v.get("no_ln_pre") else 2 * width)
                     + layers * _block_params(width, mlp, v.get("ls_init_value") is not None)
                     + 2 * width + width * embed)                # ln_post, projection
    vision = Tower(layers, width, width // int(v.get("head_width", 64)), grid + 1, mlp, vision_params,
                   stream_fp32=False)

    t_width, t_layers = int(t.get("width", 512)), int(t.get("layers", 12))
    t_mlp = int(t_width * float(t.get("mlp_ratio", 4.0)))
    seq = int(t.get("context_length", 77)) + (1 if t.get("embed_cls") else 0)
    projection = 0 if t.get("proj_type") == "none" else t_width * embed + (embed if t.get("proj_bias") else 0)
    text_params = (int(t.get("vocab_size", 49408)) * t_width + seq * t_width
                   + (t_width if t.get("embed_cls") else 0)
                   + t_layers * _block_params(t_width, t_mlp, t.get("ls_init_value") is not None)
                   + 2 * t_width + projection)
    text = Tower(t_layers, t_width, int(t.get("heads", 8)), seq, t_mlp, text_params)
    logit = 1 + (1 if cfg.get("init_logit_bias") is not None else 0)
    return Architecture(name, vision, text, embed, size, patch, vision_params + text_params + logit)


# ----------------------------------------------------------------------------- arithmetic
def forward_flops(arch: Architecture) -> int:
    """FLOPs (2 per multiply-add) of one sample's forward pass: the blocks' matrix products,
    attention's two seq x seq products, the patch embedding and the projections."""
    def tower(t: Tower) -> int:
        per_layer = 2 * t.seq * (4 * t.width ** 2 + 2 * t.width * t.mlp_width) + 4 * t.seq ** 2 * t.width
        return t.layers * per_layer + 2 * t.width * arch.embed_dim

    patches = 2 * (arch.vision.seq - 1) * 3 * arch.patch_size ** 2 * arch.vision.width
    return tower(arch.vision) + tower(arch.text) + patches


def train_flops(arch: Architecture, grad_checkpointing: bool = False, accum_steps: int = 1) -> int:
    """FLOPs of one sample's training step: forward and a backward of twice its cost; one
    forward more when checkpointing recomputes the blocks, and one more with accumulation, whose
    first pass takes every micro-batch's features without gradients (``train_loop.train_step``)."""
    passes = 3 + (1 if grad_checkpointing else 0) + (1 if accum_steps > 1 else 0)
    return passes * forward_flops(arch)


# ----------------------------------------------------------------------------- memory
@dataclasses.dataclass(frozen=True)
class Memory:
    """A training worker's memory at its peak, in bytes, by what holds it."""
    weights: int
    gradients: int
    optimizer: int
    weight_copies: int      # autocast's low-precision copies of the weights
    inputs: int             # the local batch's images (and tokens), as fed and normalised
    activations: int        # what backward needs, at the micro-batch
    loss: int               # the logits of the local batch against the global batch
    backward: int           # in flight during backward: a recomputed block, a hidden gradient
    per_sample: int         # activations per sample of a micro-batch

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.weight_copies + self.inputs
                + self.activations + self.loss + self.backward)

    def text(self) -> str:
        parts = {"weights": self.weights, "gradients": self.gradients, "AdamW": self.optimizer,
                 "autocast copies": self.weight_copies, "inputs": self.inputs,
                 "activations": self.activations + self.backward, "loss": self.loss}
        return f"{self.total / GIB:.1f} GiB (" + ", ".join(
            f"{k} {v / GIB:.1f}" for k, v in parts.items() if v) + ")"


def block_bytes(t: Tower, p: int, attention: str) -> int:
    """Activations one block keeps for backward, per sample (see the module docstring)."""
    kept = t.seq * (t.width * (2 * FP32 + 7 * p) + 2 * t.mlp_width * p)
    if attention == "math":
        kept += t.heads * t.seq ** 2 * (FP32 + (p if p != FP32 else 0))
    return kept


def tower_bytes(t: Tower, p: int, attention: str, grad_checkpointing: bool) -> int:
    """A tower's activations per sample: every block's (or, checkpointed, every block's input),
    plus the embeddings and the final layer norm around the blocks, at the residual stream's
    precision."""
    stream = t.seq * t.width * (FP32 if t.stream_fp32 else p)
    if grad_checkpointing:
        return t.layers * stream + 3 * stream
    return t.layers * block_bytes(t, p, attention) + 3 * stream


def estimate(arch: Architecture, *, local_batch: int, global_batch: int, accum_steps: int = 1,
             low_precision: bool = False, grad_checkpointing: bool = False,
             attention: str = "fused", prefetch_batches: int = 2) -> Memory:
    """A training worker's peak memory (``Memory``) for ``arch``.

    Args:
        local_batch: the worker's samples per step (``train.batch_size / train.num_workers``).
        global_batch: every worker's together (``train.batch_size``): the loss's negatives.
        accum_steps: micro-batches per step; activations scale with local_batch / accum_steps.
        low_precision: autocast to 16 bits (``train.precision`` amp or amp_bf16, on CUDA).
        grad_checkpointing: open_clip's checkpointing of every block.
        attention: "fused" (a kernel that keeps no seq x seq matrix: CUDA's) or "math".
        prefetch_batches: batches fed ahead of the step (``train.prefetch_batches``).
    """
    if attention not in ATTENTION_KERNELS:
        raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
    p = 2 if low_precision else FP32
    micro = -(-local_batch // accum_steps)
    towers = (arch.vision, arch.text)
    per_sample = sum(tower_bytes(t, p, attention, grad_checkpointing) for t in towers)
    if grad_checkpointing:
        backward = micro * max(block_bytes(t, p, attention) for t in towers)
    else:
        backward = micro * max(t.seq * t.mlp_width for t in towers) * FP32
    images = arch.pixels * (1 + prefetch_batches + FP32 + (p if low_precision else 0))
    tokens = arch.text.seq * 8 * (1 + prefetch_batches)
    return Memory(
        weights=arch.params * FP32, gradients=arch.params * FP32, optimizer=2 * arch.params * FP32,
        weight_copies=arch.params * p if low_precision else 0,
        inputs=local_batch * (images + tokens),
        activations=micro * per_sample,
        loss=2 * local_batch * global_batch * (p + 2 * FP32),
        backward=backward, per_sample=per_sample)
