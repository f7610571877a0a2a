"""TaskAwareHyperNet: a sentence embedding in, one LoRA adapter (A, B per target) out.

Text-to-LoRA style. Each LoRA target gets one query token, the sum of a layer-depth embedding and
a module-type embedding; every token is conditioned on the projected text embedding (added to it,
and present as a leading text token); a small transformer encoder mixes them; one linear head
per (in, out) shape turns a target's token into r * (in + out) numbers, split into A and B.

Shapes: P = prompts, T = targets, d = hidden_dim, E = text_dim, r = rank.

bias-HyperInit: head weights are zero and head biases are the flattened standard LoRA init
(A ~ kaiming-uniform, B = 0), so the untrained hypernet emits B = 0, i.e. Delta W = 0, for every
prompt. The first backward then reaches only the B part of the heads; once head weights are
non-zero, gradients flow into the transformer and the text projection.

``adapter_type="tucker"`` (TA-LoRA): each target has task-shared factors U (out, r) and V (r, in),
random orthogonal at init, and one shared head emits a task core C (r, r) per target, zero at
init; the adapter is A = C V, B = U, so Delta W = U C V = 0 at init while dL/dC = U^T (dL/dW) V^T
is not (U and V must never both start at zero).
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from talora.config import HyperNetConfig
from talora.core.lora import Adapter, LoraTarget


def _shape_key(t: LoraTarget) -> str:
    return f"{t.in_features}x{t.out_features}"


class TaskAwareHyperNet(nn.Module):
    def __init__(self, targets: list[LoraTarget], config: HyperNetConfig, rank: int, scale: float) -> None:
        """
        Arguments:
          targets: the LoRA targets discovered on the SAM this hypernet adapts (order is kept).
          config: transformer sizes.
          rank: r of every emitted adapter.
          scale: alpha / r, carried on the emitted Adapter.
        """
        super().__init__()
        self.targets = list(targets)
        self.rank = rank
        self.scale = scale
        d = config.hidden_dim

        # Query-token vocabularies, derived from the targets.
        depths = sorted({t.depth for t in targets})
        types = sorted({t.module_type for t in targets})
        ids = [(depths.index(t.depth), types.index(t.module_type)) for t in targets]
        if len(set(ids)) != len(ids):
            raise ValueError("two LoRA targets share (depth, module type); the hypernet could not tell them apart")
        self.register_buffer("depth_ids", torch.tensor([i for i, _ in ids]), persistent=False)
        self.register_buffer("type_ids", torch.tensor([j for _, j in ids]), persistent=False)
        self.depth_embed = nn.Embedding(len(depths), d)
        self.type_embed = nn.Embedding(len(types), d)
        self.text_proj = nn.Sequential(nn.Linear(config.text_dim, d), nn.GELU(), nn.Linear(d, d), nn.LayerNorm(d))

        layer = nn.TransformerEncoderLayer(
            d_model=d,
            nhead=config.num_heads,
            dim_feedforward=int(d * config.mlp_ratio),
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)

        self.adapter_type = config.adapter_type
        self.shape_groups: dict[str, list[int]] = {}
        self.heads = nn.ModuleDict()
        if self.adapter_type == "tucker":
            self.core_head = nn.Linear(d, rank * rank)  # zero-initialised: C = 0
            nn.init.zeros_(self.core_head.weight)
            nn.init.zeros_(self.core_head.bias)
            self.factors_u = nn.ParameterList([nn.Parameter(nn.init.orthogonal_(torch.empty(t.out_features, rank)))
                                               for t in targets])
            self.factors_v = nn.ParameterList([nn.Parameter(nn.init.orthogonal_(torch.empty(rank, t.in_features)))
                                               for t in targets])
            return

        # One head per (in, out) shape; targets of a shape are gathered and run through it at once.
        for i, t in enumerate(targets):
            self.shape_groups.setdefault(_shape_key(t), []).append(i)
        for key, members in self.shape_groups.items():
            t = targets[members[0]]
            self.heads[key] = nn.Linear(d, rank * (t.in_features + t.out_features))
        self.reset_heads()

    @torch.no_grad()
    def reset_heads(self) -> None:
        """bias-HyperInit: zero weights, bias = flattened (A = kaiming-uniform as in peft, B = 0)."""
        for key, head in self.heads.items():
            in_features, out_features = (int(v) for v in key.split("x"))
            a = torch.empty(self.rank, in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            head.weight.zero_()
            head.bias.copy_(torch.cat([a.flatten(), torch.zeros(out_features * self.rank)]))

    def forward(self, text_embeddings: torch.Tensor) -> Adapter:
        """
        Arguments:
          text_embeddings: P x E sentence embeddings.

        Returns:
          a per-row Adapter: for each target, A (P, r, in) and B (P, out, r).
        """
        P = text_embeddings.shape[0]
        r = self.rank

        # Query tokens conditioned on the task, plus the task itself as a leading token.
        text = self.text_proj(text_embeddings)  # (P, d)
        queries = self.depth_embed(self.depth_ids) + self.type_embed(self.type_ids)  # (T, d)
        tokens = queries.unsqueeze(0) + text.unsqueeze(1)  # (P, T, d)
        tokens = torch.cat([text.unsqueeze(1), tokens], dim=1)  # (P, 1 + T, d)
        hidden = self.norm(self.encoder(tokens))[:, 1:]  # (P, T, d)

        if self.adapter_type == "tucker":
            core = self.core_head(hidden).reshape(P, len(self.targets), r, r)  # (P, T, r, r)
            return Adapter({
                t.name: (core[:, i] @ v, u.expand(P, -1, -1))  # A = C V: (P, r, in); B = U: (P, out, r)
                for i, (t, u, v) in enumerate(zip(self.targets, self.factors_u, self.factors_v))
            }, self.scale)

        # One head per shape: (P, T_s, d) -> (P, T_s, r*(in+out)) -> A, B.
        weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, members in self.shape_groups.items():
            t0 = self.targets[members[0]]
            flat = self.heads[key](hidden[:, members])  # (P, T_s, r*(in+out))
            a, b = flat.split([r * t0.in_features, r * t0.out_features], dim=-1)
            a = a.reshape(P, len(members), r, t0.in_features)  # (P, T_s, r, in)
            b = b.reshape(P, len(members), t0.out_features, r)  # (P, T_s, out, r)
            for j, i in enumerate(members):
                weights[self.targets[i].name] = (a[:, j], b[:, j])
        # Keep the targets' module order, so adapters and files list them as the model does.
        return Adapter({t.name: weights[t.name] for t in self.targets}, self.scale)

    def digest(self) -> str:
        """A short content hash of the weights and targets: names the hypernet in files and run keys."""
        h = hashlib.sha256()
        for t in self.targets:
            h.update(f"{t.name}:{t.in_features}x{t.out_features};".encode())
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
