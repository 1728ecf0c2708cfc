"""Ulysses context parallelism for the Wan DiT forward: one video's denoising steps over a group of ranks.

Every rank holds the whole model and the whole input; the token sequence is cut into ``P`` equal shards
(rank r holds tokens ``[r*S, (r+1)*S)``, ``S = ceil(L / P)``, the last shard padded with zeros) and each rank
runs the patch-wise parts of every block (norms, q/k/v and output projections, cross-attention, the MLP) on
its shard only. Around the self-attention op one all-to-all turns [tokens/P, all heads] into [all tokens,
heads/P], the attention op runs on the whole sequence for the rank's heads, and a second all-to-all turns it
back. The padding is cut off before the attention op (it never sees a padded key or query) and the final
output is all-gathered along tokens and cut to L, so the sequence need not divide by P. The heads must.

Why head splitting is exact for our processor (``transformer.TurboSelfAttnProcessor``): the q/k RMSNorm
("across heads") runs per token before the exchange, where each rank still has all heads of its tokens;
dense SDPA is per head; SLA's block scores, top-k block choice and linear branch are per head, and its
``proj_l`` is a Linear(head_dim, head_dim) shared by all heads, applied on the last dim. So each head's output
is the single-process one, up to matmul blocking differences. Cross-attention needs no exchange: each query
token attends to the (replicated) text keys on its own. RoPE tables are cut with the same shards, so every
token keeps its own position.

The process group is passed in (``torch.distributed`` initialised by the caller: NCCL on GPUs, gloo on the
CPU, whose all_to_all_single this torch supports). Imports nothing of the project but the transformer module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from generator.engine.api import EngineError

if TYPE_CHECKING:
    from diffusers import WanTransformer3DModel


@dataclass(frozen=True)
class _Exchange:
    """The two all-to-alls of one forward, for a sequence of ``length`` tokens in shards of ``shard``."""

    group: Any
    size: int
    length: int
    shard: int

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[*lead, S, H, D] (this rank's tokens, all heads) -> [*lead, L, H/P, D] (all tokens, its heads)."""
        *lead, s, h, d = x.shape
        p = self.size
        send = x.reshape(*lead, s, p, h // p, d).movedim(-3, 0).contiguous()  # [P, *lead, S, H/P, D]
        recv = torch.empty_like(send)  # chunk i: the tokens of shard i, for this rank's heads
        dist.all_to_all_single(recv, send, group=self.group)
        out = recv.movedim(0, -4).reshape(*lead, p * s, h // p, d)  # shards in order: token r*S + j
        return out.narrow(-3, 0, self.length)

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[*lead, L, H/P, D] -> [*lead, S, H, D]: the inverse of ``to_heads`` (padding rows are zeros)."""
        *lead, length, hp, d = x.shape
        p, s = self.size, self.shard
        if length < p * s:
            pad = x.new_zeros(*lead, p * s - length, hp, d)
            x = torch.cat([x, pad], dim=-3)
        send = x.reshape(*lead, p, s, hp, d).movedim(-4, 0).contiguous()  # chunk j: shard j's tokens
        recv = torch.empty_like(send)  # chunk i: this rank's tokens, the heads of rank i
        dist.all_to_all_single(recv, send, group=self.group)
        return recv.movedim(0, -3).reshape(*lead, s, p * hp, d)  # head i*H/P + k, as the split took them


class ContextParallel:
    """A process group running the Wan DiT forward context-parallel (``forward``); rank 0 of the group is
    the leader (the one that talks to the queue and decodes)."""

    def __init__(self, group: Any = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("context parallelism needs torch.distributed initialised by the caller")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def check_model(self, model: WanTransformer3DModel, name: str = "model") -> None:
        """Refuse (at load) a model whose attention heads do not split evenly over the group."""
        heads = int(model.config.num_attention_heads)
        if heads % self.size:
            raise EngineError(
                f"{name} has {heads} attention heads, which do not split over {self.size} GPUs; "
                f"set gpus_per_job to a divisor of {heads}.",
                code="context_parallel_unsupported",
            )

    def shard_len(self, length: int) -> int:
        return math.ceil(length / self.size)

    def shard(self, x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
        """This rank's shard of x along ``dim`` (of size ``length``), zero-padded to ``shard_len``."""
        s = self.shard_len(length)
        start = self.rank * s
        part = x.narrow(dim, min(start, length), max(0, min(s, length - start)))
        if part.shape[dim] < s:
            shape = list(x.shape)
            shape[dim] = s - part.shape[dim]
            part = torch.cat([part, x.new_zeros(shape)], dim=dim)
        return part.contiguous()

    def gather(self, x: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
        """Every rank's shard of x, concatenated along ``dim`` and cut to ``length`` (identical on all ranks)."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, length)

    def leader_says(self, flag: bool, device: torch.device) -> bool:
        """The leader's ``flag`` on every rank (a cancel decision all ranks must take together)."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.broadcast(t, group=self.group, group_src=0)
        return bool(t.item())

    @contextmanager
    def _exchanging(self, model: WanTransformer3DModel, length: int) -> Iterator[None]:
        """Point every block's self-attention processor at this forward's exchange, and back to None after."""
        from generator.engine.transformer import TurboSelfAttnProcessor

        procs = {id(b.attn1.processor): b.attn1.processor for b in model.blocks}.values()
        if not all(isinstance(p, TurboSelfAttnProcessor) for p in procs):
            raise EngineError("context parallelism needs the turbo self-attention processor on every block")
        ex = _Exchange(self.group, self.size, length, self.shard_len(length))
        for p in procs:
            p.exchange = ex
        try:
            yield
        finally:
            for p in procs:
                p.exchange = None

    def forward(
        self,
        model: WanTransformer3DModel,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``model(hidden_states, timestep, encoder_hidden_states, ...)[0]`` computed over the group: every
        rank passes the same inputs and gets the whole output. Follows diffusers' ``WanTransformer3DModel``
        forward step by step, with the token sequence sharded between the patch embedding and the
        output projection."""
        self.check_model(model)
        if timestep.ndim != 1:
            raise EngineError("context parallelism takes one timestep per sample (not per token)")
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = model.config.patch_size
        ppf, pph, ppw = frames // p_t, height // p_h, width // p_w
        length = ppf * pph * ppw

        cos, sin = model.rope(hidden_states)  # [1, L, 1, D] each
        rotary = (self.shard(cos, length), self.shard(sin, length))
        tokens = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2)
        tokens = self.shard(tokens, length)  # [B, S, dim]

        temb, timestep_proj, text, image = model.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image, timestep_seq_len=None
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        if image is not None:
            text = torch.concat([image, text], dim=1)

        with self._exchanging(model, length):
            for block in model.blocks:
                tokens = block(tokens, text, timestep_proj, rotary)

        shift, scale = (model.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        tokens = (model.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        tokens = model.proj_out(tokens)
        tokens = self.gather(tokens, length)  # [B, L, C * p_t * p_h * p_w]

        out = tokens.reshape(batch, ppf, pph, ppw, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.flatten(6, 7).flatten(4, 5).flatten(2, 3)
