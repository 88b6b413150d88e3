"""One Llama-family definition as plain torch modules, cut into pipeline stages.

Contract: a stage is an `nn.Module` whose parameter names are Hugging Face's minus a
prefix, and `hf_names()` maps each local name to the full HF name
(`model.layers.7.self_attn.q_proj.weight`), so weights, gradients and optimizer
state are exchanged and checkpointed under HF names whatever the stage split.

- `EmbedHeadStage` (stage 0): embedding, final norm, LM head (tied to the embedding
  when the config says so: one Parameter) and the loss.
- `LayerStage(cfg, layer_start, layer_end)`: the decoder layers [start, end).
- `FullModel`: both, in one process; `keep_layers` runs a subset of the layers in a
  given order (the reference for skip/swap paths and the robustness check).

Build on the meta device (`with torch.device("meta"): ...`) and then
`load_stage_weights` (assigns the checkpoint's tensors) or `init_parameters`
(materializes on the CPU) to skip torch's default init, which costs seconds for a
full-size model.

Forward passes are causal over positions 0..T-1 with no KV cache (training). RoPE is
`edgecluster.engine.rope`'s, so serving and training share the math. The modules know
nothing of the network, the plan or the optimizer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edgecluster.engine.rope import RotaryTable, apply_rotary
from edgecluster.model_config import ModelConfig
from edgecluster.weights.checkpoint import Checkpoint

INIT_STD = 0.02  # HF Llama's default initializer_range
EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary positions."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryTable) -> None:
        super().__init__()
        h, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(h, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, h, bias=cfg.o_bias)
        self._rotary = rotary

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape  # [B, T, H]
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        cos, sin = self._rotary.lookup(torch.arange(t))  # [T, 1, head_dim]
        cos, sin = cos.to(x.device, x.dtype), sin.to(x.device, x.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )  # fmt: skip  # [B, heads, T, head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SiLU-gated feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer; parameter names are HF's minus `model.layers.{i}.`."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryTable | None = None) -> None:
        super().__init__()
        if rotary is None:
            with torch.device("cpu"):
                rotary = RotaryTable(cfg, torch.float32)
        self.self_attn = Attention(cfg, rotary)
        self.mlp = MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h))  # [B, T, H]
        return h + self.mlp(self.post_attention_layernorm(h))


class LayerStage(nn.Module):
    """Decoder layers [layer_start, layer_end) of the model; `layers[j]` is layer start+j."""

    def __init__(self, cfg: ModelConfig, layer_start: int, layer_end: int) -> None:
        super().__init__()
        if not 0 <= layer_start < layer_end <= cfg.num_layers:
            raise ValueError(
                f"layer range [{layer_start}, {layer_end}) is not a non-empty range inside "
                f"the model's {cfg.num_layers} layers"
            )
        self.layer_start, self.layer_end = layer_start, layer_end
        with torch.device("cpu"):  # real tables even when the stage is built on meta
            rotary = RotaryTable(cfg, torch.float32)  # shared by the stage's layers
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, rotary) for _ in range(layer_start, layer_end)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)  # [B, T, H]
        return h

    def layer(self, index: int) -> DecoderLayer:
        """The decoder layer with global index `index`."""
        if not self.layer_start <= index < self.layer_end:
            raise ValueError(
                f"layer {index} is not in this stage's range [{self.layer_start}, {self.layer_end})"
            )
        return self.layers[index - self.layer_start]  # type: ignore[return-value]

    def hf_names(self) -> dict[str, str]:
        names: dict[str, str] = {}
        for local, _ in self.named_parameters():
            _, j, rest = local.split(".", 2)
            names[local] = f"model.layers.{self.layer_start + int(j)}.{rest}"
        return names


class EmbedHeadStage(nn.Module):
    """Stage 0: token embedding in, final norm + LM head + summed cross-entropy out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.tied = cfg.tie_word_embeddings
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make lm_head share the embedding's Parameter when the config ties them."""
        if self.tied:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)  # [B, T] -> [B, T, H]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))  # [B, T, H] -> [B, T, V]

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """SUM of the token cross-entropies (float32 scalar); targets -100 are ignored."""
        logits = self.logits(h).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")

    def hf_names(self) -> dict[str, str]:
        by_local = {"embed_tokens.weight": EMBED, "norm.weight": NORM, "lm_head.weight": LM_HEAD}
        return {local: by_local[local] for local, _ in self.named_parameters()}


class FullModel(nn.Module):
    """The whole model in one process: `head` (stage 0) around `body` (all layers)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.head = EmbedHeadStage(cfg)
        self.body = LayerStage(cfg, 0, cfg.num_layers)

    def hidden(self, ids: torch.Tensor, keep_layers: Sequence[int] | None = None) -> torch.Tensor:
        """Final hidden state [B, T, H]; `keep_layers` = layer indices to run, in order."""
        h = self.head.embed(ids)
        if keep_layers is None:
            return self.body(h)
        for index in keep_layers:
            h = self.body.layer(index)(h)
        return h

    def forward(self, ids: torch.Tensor, keep_layers: Sequence[int] | None = None) -> torch.Tensor:
        return self.head.logits(self.hidden(ids, keep_layers))  # [B, T, V]

    def loss_sum(
        self, ids: torch.Tensor, targets: torch.Tensor, keep_layers: Sequence[int] | None = None
    ) -> torch.Tensor:
        return self.head.loss(self.hidden(ids, keep_layers), targets)

    def hf_names(self) -> dict[str, str]:
        names = {f"head.{k}": v for k, v in self.head.hf_names().items()}
        names.update({f"body.{k}": v for k, v in self.body.hf_names().items()})
        return names

    def hf_state(self) -> dict[str, torch.Tensor]:
        """Detached parameters keyed by HF name (tied: no lm_head.weight)."""
        return hf_state(self)


def _named_hf_parameters(module: nn.Module) -> Iterator[tuple[str, str, nn.Parameter]]:
    hf_names: Mapping[str, str] = module.hf_names()  # type: ignore[operator]
    params = dict(module.named_parameters())
    for local, hf in sorted(hf_names.items(), key=lambda item: item[1]):
        yield local, hf, params[local]


def hf_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A stage's (or FullModel's) parameters, detached, keyed by HF name."""
    return {hf: p.detach() for _, hf, p in _named_hf_parameters(module)}


def _name_seed(seed: int, hf_name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{hf_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def init_parameters(module: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """HF Llama's init (normal(0, 0.02) weights, zero biases, unit norms), deterministic.

    Each tensor draws from its own generator seeded by (seed, HF name), so a tensor's
    initial value depends on the seed and its layer index only, never on the split.
    A module built on the meta device is materialized on the CPU first. `cfg` is
    accepted for symmetry with the constructors; the std is HF's 0.02.
    """
    del cfg
    if any(p.is_meta for p in module.parameters()):
        module.to_empty(device="cpu")
        _retie(module)
    for _, hf, param in _named_hf_parameters(module):
        if hf.endswith("norm.weight"):
            param.fill_(1.0)
        elif hf.endswith(".bias"):
            param.zero_()
        else:
            gen = torch.Generator().manual_seed(_name_seed(seed, hf))
            value = torch.empty(param.shape, dtype=torch.float32)
            param.copy_(value.normal_(0.0, INIT_STD, generator=gen))


def load_stage_weights(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy `tensors` (keyed by HF names) into the module's parameters, all or nothing.

    Every parameter must be given with its exact shape and no other name may be; a
    tied module also accepts (and ignores) `lm_head.weight`. Parameters on the meta
    device are replaced by the given tensors themselves (assign: no copy, the module
    takes them over); others are copied into.
    """
    names = {hf: local for local, hf, _ in _named_hf_parameters(module)}
    extra = set(tensors) - set(names)
    if EMBED in names and LM_HEAD not in names:
        extra.discard(LM_HEAD)
    missing = sorted(set(names) - set(tensors))
    params = dict(module.named_parameters())
    misshaped = [
        f"{hf} (given {list(tensors[hf].shape)}, expected {list(params[local].shape)})"
        for hf, local in names.items()
        if hf in tensors and tensors[hf].shape != params[local].shape
    ]
    if missing or extra or misshaped:
        raise ValueError(
            "the weights do not match this stage: "
            + "; ".join(
                f"{label}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                for label, items in (
                    ("missing", missing),
                    ("unexpected", sorted(extra)),
                    ("wrong shape", misshaped),
                )
                if items
            )
            + ". Check that the checkpoint's config.json matches the model being trained"
        )
    state = {local: tensors[hf].to(params[local].dtype) for hf, local in names.items()}
    assign = any(p.is_meta for p in params.values())
    module.load_state_dict(state, strict=False, assign=assign)
    _retie(module)


def _retie(module: nn.Module) -> None:
    for sub in module.modules():
        if isinstance(sub, EmbedHeadStage):
            sub.tie_weights()


def read_hf_weights(model_dir: Path | str, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The named tensors of an HF checkpoint directory, as float32 copies."""
    with Checkpoint(model_dir) as ckpt:
        missing = [n for n in names if not ckpt.has(n)]
        if missing:
            raise ValueError(
                f"checkpoint {model_dir} lacks {', '.join(missing[:8])}; it is not a "
                "complete Llama-family checkpoint for this config"
            )
        return {n: ckpt.tensor(n).to(torch.float32).contiguous() for n in names}
