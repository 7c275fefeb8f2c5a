"""The guided-diffusion / RePaint U-Net, written for fxpass with upstream-compatible state dicts."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn

from .layers import (
    AttentionBlock,
    Downsample,
    GroupNorm32,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    conv_nd,
    convert_module_to_f16,
    convert_module_to_f32,
    normalization,
    timestep_embedding,
    zero_module,
)

__all__ = ["UNetModel", "GroupNorm32"]


@dataclass(frozen=True)
class _Blocks:
    """Builds the U-Net's blocks with the settings they all share (one per ``UNetModel``)."""

    time_embed_dim: int
    dropout: float
    dims: int
    use_checkpoint: bool
    use_scale_shift_norm: bool
    num_head_channels: int
    use_new_attention_order: bool
    conv_resample: bool
    resblock_updown: bool

    def res_block(self, ch_in, ch_out, **kw):
        return ResBlock(
            ch_in,
            self.time_embed_dim,
            self.dropout,
            out_channels=ch_out,
            dims=self.dims,
            use_checkpoint=self.use_checkpoint,
            use_scale_shift_norm=self.use_scale_shift_norm,
            **kw,
        )

    def attention(self, ch, heads):
        return AttentionBlock(
            ch,
            use_checkpoint=self.use_checkpoint,
            num_heads=heads,
            num_head_channels=self.num_head_channels,
            use_new_attention_order=self.use_new_attention_order,
        )

    def downsample(self, ch):
        if self.resblock_updown:
            return self.res_block(ch, ch, down=True)
        return Downsample(ch, self.conv_resample, dims=self.dims, out_channels=ch)

    def upsample(self, ch):
        if self.resblock_updown:
            return self.res_block(ch, ch, up=True)
        return Upsample(ch, self.conv_resample, dims=self.dims, out_channels=ch)


class UNetModel(nn.Module):
    """Diffusion U-Net with attention and timestep embedding.

    ``attention_resolutions`` holds downsample rates (not pixel sizes) at which attention is used.
    ``conf`` is an object with a ``diffusion_steps`` attribute (RePaint passes its config); the
    forward refuses timesteps larger than that, as RePaint's model does.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0.0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        conf=None,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.conf = conf if conf is not None else SimpleNamespace(diffusion_steps=1000)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if self.num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        blocks = _Blocks(
            time_embed_dim=time_embed_dim,
            dropout=dropout,
            dims=dims,
            use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm,
            num_head_channels=num_head_channels,
            use_new_attention_order=use_new_attention_order,
            conv_resample=conv_resample,
            resblock_updown=resblock_updown,
        )
        ch = input_ch = int(channel_mult[0] * model_channels)
        ch, input_block_chans, ds = self._build_input_blocks(blocks, ch)
        self.middle_block = TimestepEmbedSequential(
            blocks.res_block(ch, ch),
            blocks.attention(ch, num_heads),
            blocks.res_block(ch, ch),
        )
        ch = self._build_output_blocks(blocks, ch, input_block_chans, ds)
        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    def _build_input_blocks(self, blocks: _Blocks, ch: int) -> tuple[int, list[int], int]:
        """The down path, ``self.input_blocks``, from ``ch`` channels after the input convolution.

        Returns the channels it ends with, the channels of every block (the skip connections the up
        path concatenates, last first) and the downsample rate it ends at.
        """
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(blocks.dims, self.in_channels, ch, 3, padding=1))]
        )
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers = [blocks.res_block(ch, int(mult * self.model_channels))]
                ch = int(mult * self.model_channels)
                if ds in self.attention_resolutions:
                    layers.append(blocks.attention(ch, self.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(self.channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(blocks.downsample(ch)))
                input_block_chans.append(ch)
                ds *= 2
        return ch, input_block_chans, ds

    def _build_output_blocks(self, blocks: _Blocks, ch: int, input_block_chans: list[int], ds: int) -> int:
        """The up path, ``self.output_blocks``, taking the skip connections off ``input_block_chans``;
        returns the channels it ends with."""
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [blocks.res_block(ch + ich, int(self.model_channels * mult))]
                ch = int(self.model_channels * mult)
                if ds in self.attention_resolutions:
                    layers.append(blocks.attention(ch, self.num_heads_upsample))
                if level and i == self.num_res_blocks:
                    layers.append(blocks.upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        return ch

    def convert_to_fp16(self):
        """Convert the convolutions of the torso to float16 (as ``use_fp16`` checkpoints run)."""
        self.input_blocks.apply(convert_module_to_f16)
        self.middle_block.apply(convert_module_to_f16)
        self.output_blocks.apply(convert_module_to_f16)

    def convert_to_fp32(self):
        self.input_blocks.apply(convert_module_to_f32)
        self.middle_block.apply(convert_module_to_f32)
        self.output_blocks.apply(convert_module_to_f32)

    def forward(self, x, timesteps, y=None, gt=None, **kwargs):
        """Predict [N, out_channels, H, W] from x [N, C, H, W] and timesteps [N] (y: labels)."""
        if timesteps[0].item() > self.conf.diffusion_steps:
            raise RuntimeError("timesteps larger than diffusion steps.", timesteps[0].item(), self.conf.diffusion_steps)

        hs = []
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))

        if self.num_classes is not None:
            assert y.shape == (x.shape[0],)
            emb = emb + self.label_emb(y)

        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb)
        h = h.type(x.dtype)
        return self.out(h)
