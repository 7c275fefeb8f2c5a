"""Models written the way users' own copies of guided-diffusion / RePaint code are written.

Kept out of ``test_*.py`` files on purpose: pytest rewrites ``assert`` statements in test modules,
and capture must see the plain bytecode that users' code has.

``UserUNet`` is an independent, compact re-write of the family's constructs with other names and
module paths: ``import torch as th``, ``from math import sqrt``, its own float32 GroupNorm, its own
checkpoint helper with a custom autograd Function, the ``.item()`` timestep check against a conf
object, shape asserts, the rank loop, a sliced ``nn.Sequential``, scale-shift norm, legacy and
new-order attention, optional ``y`` / ``gt`` / ``**kwargs``.
"""

from __future__ import annotations

from math import log, sqrt

import torch as th
import torch.nn as nn
import torch.nn.functional as F


class Conf:
    def __init__(self, diffusion_steps):
        self.diffusion_steps = diffusion_steps


class Norm32(nn.GroupNorm):
    def forward(self, inp):
        return super().forward(inp.float()).type(inp.dtype)


class _Recompute(th.autograd.Function):
    @staticmethod
    def forward(ctx, fn, n_inputs, *tensors):
        ctx.fn = fn
        ctx.saved = tensors[:n_inputs]
        with th.no_grad():
            return fn(*tensors[:n_inputs])

    @staticmethod
    def backward(ctx, *grads):  # pragma: no cover - inference only here
        raise NotImplementedError


def grad_checkpoint(fn, inputs, params, enabled):
    if enabled:
        return _Recompute.apply(fn, len(inputs), *(tuple(inputs) + tuple(params)))
    return fn(*inputs)


def sinusoid(ts, dim, max_period=10000):
    half = dim // 2
    freqs = th.exp(-log(max_period) * th.arange(0, half, dtype=th.float32, device=ts.device) / half)
    angles = ts[:, None].float() * freqs[None]
    return th.cat([th.cos(angles), th.sin(angles)], dim=-1)


class Block(nn.Module):
    def __init__(self, cin, cout, emb_dim, scale_shift=True):
        super().__init__()
        self.cin, self.cout, self.scale_shift = cin, cout, scale_shift
        self.in_layers = nn.Sequential(Norm32(8, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout if scale_shift else cout))
        self.out_layers = nn.Sequential(Norm32(8, cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        return grad_checkpoint(self._run, (x, emb), self.parameters(), True)

    def _run(self, x, emb):
        assert x.shape[1] == self.cin
        h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)
        while len(e.shape) < len(h.shape):
            e = e[..., None]
        if self.scale_shift:
            norm, rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = th.chunk(e, 2, dim=1)
            h = rest(norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, channels, heads, new_order=False):
        super().__init__()
        self.heads, self.new_order = heads, new_order
        self.norm = Norm32(8, channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        bs, width, length = qkv.shape
        assert width % (3 * self.heads) == 0
        ch = width // (3 * self.heads)
        scale = 1 / sqrt(sqrt(ch))
        if self.new_order:
            q, k, v = qkv.chunk(3, dim=1)
            w = th.einsum("bct,bcs->bts", (q * scale).view(bs * self.heads, ch, length),
                          (k * scale).view(bs * self.heads, ch, length))
            v = v.reshape(bs * self.heads, ch, length)
        else:
            q, k, v = qkv.reshape(bs * self.heads, ch * 3, length).split(ch, dim=1)
            w = th.einsum("bct,bcs->bts", q * scale, k * scale)
        w = th.softmax(w.float(), dim=-1).type(w.dtype)
        a = th.einsum("bts,bcs->bct", w, v).reshape(bs, -1, length)
        return (x + self.proj(a)).reshape(b, c, *spatial)


class Down(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class Up(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UserUNet(nn.Module):
    """A two-level U-Net with attention at the bottom, 16 channels, written independently."""

    def __init__(self, ch=16, new_order=False, scale_shift=True, num_classes=None, steps=1000, use_fp16=False):
        super().__init__()
        self.conf = Conf(steps)
        self.ch = ch
        self.dtype = th.float16 if use_fp16 else th.float32
        emb = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.num_classes = num_classes
        if num_classes:
            self.label_emb = nn.Embedding(num_classes, emb)
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.enc = Block(ch, ch, emb, scale_shift)
        self.down = Down(ch)
        self.mid = Block(ch, 2 * ch, emb, scale_shift)
        self.attn = Attention(2 * ch, 2, new_order)
        self.dec = Block(2 * ch, ch, emb, scale_shift)
        self.up = Up(ch)
        self.dec2 = Block(2 * ch, ch, emb, scale_shift)
        self.out = nn.Sequential(Norm32(8, ch), nn.SiLU(), nn.Conv2d(ch, 6, 3, padding=1))

    def forward(self, x, timesteps, y=None, gt=None, **kwargs):
        if timesteps[0].item() > self.conf.diffusion_steps:
            raise RuntimeError("timestep out of range")
        emb = self.time_embed(sinusoid(timesteps, self.ch))
        if self.num_classes is not None:
            assert y.shape == (x.shape[0],)
            emb = emb + self.label_emb(y)
        h0 = self.inp(x.type(self.dtype))
        h1 = self.enc(h0, emb)
        h = self.attn(self.mid(self.down(h1), emb))
        h = self.up(self.dec(h, emb))
        h = self.dec2(th.cat([h, h1], dim=1), emb)
        return self.out(h.type(x.dtype))


class BadBranch(nn.Module):
    """A branch on a tensor's value (not a shape): becomes a guard."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class Unsupported(nn.Module):
    """Leaves torch for NumPy on a traced value: capture must name this line."""

    def forward(self, x):
        import numpy as np

        return th.as_tensor(np.asarray(x) + 1)


class FailingAssert(nn.Module):
    def forward(self, x):
        assert x.shape[1] == 4, "needs 4 channels"
        return x


class AssertThenReshape(nn.Module):
    """Tiny graph for strip_asserts: an assert on a shape, then a reshape using it."""

    def __init__(self, heads=2):
        super().__init__()
        self.heads = heads

    def forward(self, x):
        b, width, t = x.shape
        assert width % self.heads == 0
        return x.reshape(b * self.heads, width // self.heads, t) * 2.0


class TinyAttention(nn.Module):
    """Tiny graph for materialize_attention_scales: qkv projection, both attention orders."""

    def __init__(self, channels=8, heads=2, new_order=False):
        super().__init__()
        self.attention = Attention(channels, heads, new_order)

    def forward(self, x):
        return self.attention(x)


class TinyTimeNet(nn.Module):
    """Tiny graph for fold_timesteps: timestep check, embedding, MLP, scale-shift on a conv."""

    def __init__(self, steps=1000):
        super().__init__()
        self.conf = Conf(steps)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 8))
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, timesteps):
        if timesteps[0].item() > self.conf.diffusion_steps:
            raise RuntimeError("timestep out of range")
        e = self.mlp(sinusoid(timesteps, 8))
        while len(e.shape) < 4:
            e = e[..., None]
        scale, shift = e.chunk(2, dim=1)
        return self.conv(x) * (1 + scale) + shift


class NoisyUNet(UserUNet):
    """Adds fresh noise to its output: no lowering can match it, so the ORT check must refuse it."""

    def forward(self, x, timesteps, y=None, gt=None, **kwargs):
        out = super().forward(x, timesteps, y, gt, **kwargs)
        return out + th.randn_like(out)


# ---- hostile models of issue #17: decisions that a lowering must not freeze -------------------------
class _TimedConv(nn.Module):
    """conv(x) scaled by a timestep embedding: the body the models below share (table mode lowers it)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mlp = nn.Linear(8, 4)

    def body(self, x, timesteps):
        e = self.mlp(sinusoid(timesteps, 8))
        return self.conv(x) * (1 + e[:, :, None, None])


class MeanGate(_TimedConv):
    """Doubles its output when the input's mean is above 0.1: a branch on input data, in several spellings."""

    def __init__(self, spelling="tensor"):
        super().__init__()
        self.spelling = spelling

    def forward(self, x, timesteps):
        h = self.body(x, timesteps)
        if self.spelling == "tensor":
            if x.mean() > 0.1:
                h = h * 2.0
        elif self.spelling == "item":
            if x.mean().item() > 0.1:
                h = h * 2.0
        elif self.spelling == "any":
            if th.any(x.mean(dim=(1, 2, 3)) > 0.1):
                h = h * 2.0
        elif self.spelling == "bool":
            big = bool(x.mean() > 0.1)
            h = h * 2.0 if big else h
        elif self.spelling == "not":
            if not x.mean() <= 0.1:
                h = h * 2.0
        return h


class BatchBranch(_TimedConv):
    """Takes another path for a single image: a Python decision on the batch size."""

    def forward(self, x, timesteps):
        h = self.body(x, timesteps)
        if x.shape[0] == 1:
            return h * 2.0
        return h * 3.0


class BatchSizeGate(_TimedConv):
    """The same decision through ``x.size(0)``, false at a batch of one."""

    def forward(self, x, timesteps):
        h = self.body(x, timesteps)
        if x.size(0) > 1:
            h = h - h.mean(0, keepdim=True)
        return h


class BatchLoop(_TimedConv):
    """Runs the convolution image by image: a loop over ``range(x.shape[0])``."""

    def forward(self, x, timesteps):
        rows = [self.conv(x[i : i + 1]) for i in range(x.shape[0])]
        e = self.mlp(sinusoid(timesteps, 8))
        return th.cat(rows, dim=0) * (1 + e[:, :, None, None])


class BatchNumel(_TimedConv):
    """Normalises by ``int(h.numel())``: a Python number that counts the batch."""

    def forward(self, x, timesteps):
        h = self.body(x, timesteps)
        return h - h.sum() / int(h.numel())


class BatchLen(_TimedConv):
    """Averages over ``len(x)`` images, one per iteration of ``for image in x``."""

    def forward(self, x, timesteps):
        h = self.body(x, timesteps)
        total = 0
        for image in h:
            total = total + image
        return h - total / len(x)


class ShapeFacts(_TimedConv):
    """Facts that hold at every batch size: they must still go under a dynamic batch."""

    def forward(self, x, timesteps):
        assert timesteps.shape == (x.shape[0],)
        assert x.shape[0] >= 1
        if x.dtype != th.float32:
            x = x.float()
        h = self.body(x, timesteps)
        b, c, *spatial = h.shape
        return (h.reshape(b, c, -1) * (1.0 / sqrt(c))).reshape(b, c, *spatial)


class MixedTime(_TimedConv):
    """A timestep path that mixes the entries of its batch (the table rows must not)."""

    def __init__(self, how="center"):
        super().__init__()
        self.how = how

    def forward(self, x, timesteps):
        emb = sinusoid(timesteps, 8)
        if self.how == "center":
            emb = emb - emb.mean(0, keepdim=True) + emb
        elif self.how == "flip":
            emb = (emb + emb.flip(0)) * 0.5
        elif self.how == "sum":
            emb = emb.sum(0, keepdim=True) + emb
        elif self.how == "middle":  # the first and last entries stay as they are; the ones between mix
            i = th.arange(emb.shape[0], device=emb.device)
            inner = (i > 0) & (i < emb.shape[0] - 1)
            emb = th.where(inner[:, None], emb - emb.mean(0, keepdim=True), emb)
        e = self.mlp(emb)
        return self.conv(x) * (1 + e[:, :, None, None])


# ---- the guided-diffusion family's other shapes of forward (issue #13) ------------------------------
class _TinyBody(nn.Module):
    """A conv, a time MLP with scale-shift norm, an output conv: the parts every variant below shares."""

    def __init__(self, cin, ch=8, cout=3, dims=2, num_classes=None):
        super().__init__()
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        self.ch = ch
        self.inp = conv(cin, ch, 3, padding=1)
        self.time_embed = nn.Sequential(nn.Linear(ch, 2 * ch), nn.SiLU(), nn.Linear(2 * ch, 2 * ch))
        if num_classes:
            self.label_emb = nn.Embedding(num_classes, 2 * ch)
        self.norm = Norm32(4, ch)
        self.out = conv(ch, cout, 3, padding=1)

    def body(self, h, ts, y=None):
        emb = self.time_embed(sinusoid(ts, self.ch))
        if y is not None:
            emb = emb + self.label_emb(y)
        h = self.inp(h)
        while len(emb.shape) < len(h.shape):
            emb = emb[..., None]
        scale, shift = th.chunk(emb, 2, dim=1)
        return self.out(F.silu(self.norm(h) * (1 + scale) + shift))


class SuperResNet(_TinyBody):
    """guided-diffusion's SuperResModel shape: ``low_res`` upsampled and concatenated to ``x``."""

    def __init__(self, in_channels=3, image_size=16):
        super().__init__(2 * in_channels)
        self.image_size = image_size

    def forward(self, x, timesteps, low_res=None, **kwargs):
        _, _, new_height, new_width = x.shape
        upsampled = F.interpolate(low_res, (new_height, new_width), mode="bilinear")
        x = th.cat([x, upsampled], dim=1)
        return self.body(x, timesteps)


class FiveChannelNet(_TinyBody):
    """An ``x`` with five channels (e.g. an image plus mask and known-region channels)."""

    def __init__(self):
        super().__init__(5, cout=5)

    def forward(self, x, t):
        return self.body(x, t)


class NoiseLevelNet(_TinyBody):
    """Palette / SR3 style: the noisy image and the condition stacked, a continuous noise level."""

    def __init__(self):
        super().__init__(6)

    def forward(self, y_cond_and_noisy, gammas):
        return self.body(y_cond_and_noisy, gammas.view(-1) * 1000.0)


class ConfNet(_TinyBody):
    """RePaint's way: the constructor takes a ``conf`` object; the ``.item()`` range check reads it."""

    def __init__(self, conf):
        super().__init__(3, ch=conf.num_channels)
        self.conf = conf

    def forward(self, x, timesteps, y=None, gt=None, **kwargs):
        if timesteps[0].item() > self.conf.diffusion_steps:
            raise RuntimeError("timestep out of range")
        return self.body(x, timesteps)


class TenClassNet(_TinyBody):
    """Class-conditional with its own class count (ten), known only from ``label_emb``."""

    def __init__(self):
        super().__init__(3, num_classes=10)

    def forward(self, x, timesteps, y=None):
        assert y is not None, "this model is class-conditional"
        return self.body(x, timesteps, y)


class Volume3DNet(_TinyBody):
    """``dims=3``: a 5-D ``x``, with device asserts on its inputs."""

    def __init__(self):
        super().__init__(1, cout=1, dims=3)

    def forward(self, x, timesteps):
        assert x.device == timesteps.device, "x and timesteps on different devices"
        assert timesteps.dim() == 1
        return self.body(x, timesteps)


class UnknownTimeNet(_TinyBody):
    """A timestep parameter with a name fxpass does not know (``step_value``)."""

    def __init__(self):
        super().__init__(3)

    def forward(self, x, step_value):
        return self.body(x, step_value)


class ForwardBuiltNet(_TinyBody):
    """Builds a module inside forward (fresh random weights on every call)."""

    def __init__(self):
        super().__init__(3)

    def forward(self, x, timesteps):
        h = self.body(x, timesteps)
        proj = nn.Conv2d(h.size(1), 3, 1).to(device=x.device)
        return proj(h)


def make_conf_net(num_channels=8, diffusion_steps=100):
    """A factory, the way some codebases build their model (``--model-factory``)."""
    return ConfNet(_conf(num_channels, diffusion_steps))


def _conf(num_channels, diffusion_steps):
    conf = Conf(diffusion_steps)
    conf.num_channels = num_channels
    return conf


class HalfCastNet(_TinyBody):
    """Casts to float16 by itself (no use_fp16 flag fxpass could switch off)."""

    def __init__(self):
        super().__init__(3)

    def forward(self, x, timesteps):
        return self.body(x, timesteps).half().float()


# ---- image-like inputs whose shapes the model's own attributes give (issue #13) ---------------------
class SmallSizeSRNet(_TinyBody):
    """guided-diffusion's SuperResModel as its scripts build it, keeping the low resolution as
    ``small_size``: a first convolution for ``in_channels * 2``, ``low_res`` upsampled to ``x``."""

    def __init__(self, in_channels=3, image_size=16, small_size=8):
        super().__init__(2 * in_channels)
        self.in_channels = 2 * in_channels
        self.image_size, self.small_size = image_size, small_size

    def forward(self, x, timesteps, low_res=None, **kwargs):
        _, _, new_height, new_width = x.shape
        upsampled = F.interpolate(low_res, (new_height, new_width), mode="bilinear")
        return self.body(th.cat([x, upsampled], dim=1), timesteps)


class GrayLowResNet(_TinyBody):
    """A low-resolution input with its own channel count and a non-square size, both attributes."""

    def __init__(self, image_size=16, low_res_size=(8, 4), low_res_channels=1):
        super().__init__(3 + low_res_channels)
        self.image_size, self.low_res_size, self.low_res_channels = image_size, tuple(low_res_size), low_res_channels

    def forward(self, x, timesteps, low_res=None):
        return self.body(th.cat([x, F.interpolate(low_res, x.shape[2:], mode="nearest")], dim=1), timesteps)


class CondChannelsNet(_TinyBody):
    """A required conditioning image at x's resolution, its channels a ``cond_channels`` attribute
    (segmentation-by-diffusion style: the image conditions a one-channel mask)."""

    def __init__(self, cond_channels=3):
        super().__init__(1 + cond_channels, cout=1)
        self.cond_channels = cond_channels

    def forward(self, x, t, cond):
        return self.body(th.cat([x, cond], dim=1), t)


class NoSizeLowResNet(SuperResNet):
    """Says ``low_res``'s channels but not its size."""

    def __init__(self):
        super().__init__()
        self.low_res_channels = 3


class BareCondNet(CondChannelsNet):
    """Needs ``cond`` and says nothing about its shape."""

    def __init__(self):
        super().__init__()
        del self.cond_channels


class InPlaceInput(_TimedConv):
    """Scales its input in place before using it (issue #26): the reference must not hand the mutated
    tensor to the runtime it is compared with."""

    def __init__(self, how: str = "mul_"):
        super().__init__()
        self.how = how

    def forward(self, x, timesteps):
        if self.how == "mul_":
            x.mul_(2.0)
        elif self.how == "add_":
            x.add_(0.5)
        else:  # data.mul_
            x.data.mul_(2.0)
        return self.body(x, timesteps)


class ItemDictKey(_TimedConv):
    """Reads the timestep with ``.item()`` and looks it up in a dict (issue #26): no comparison a guard could
    record, so a table lowered from one example would hold one row's scale for all."""

    def forward(self, x, timesteps):
        scales = {t: 1.0 + t / 100.0 for t in range(1000)}
        return self.body(x, timesteps) * scales[timesteps[0].item()]


class ItemFString(_TimedConv):
    """Formats the timestep read with ``.item()`` into a string and uses its length (issue #26)."""

    def forward(self, x, timesteps):
        key = f"{timesteps[0].item()}"
        return self.body(x, timesteps) * (1.0 + len(key) / 10.0)


class ExitsInForward(_TimedConv):
    """Calls sys.exit(0) in forward (issue #26): fxpass must say so and write nothing, not exit 0 silently."""

    def forward(self, x, timesteps):
        import sys

        sys.exit(0)


class ProcessExitNet(_TinyBody):
    """Ends the process from its forward with ``os._exit(0)`` (the hostile run's silent exit 0)."""

    def __init__(self):
        super().__init__(3)

    def forward(self, x, timesteps):
        import os

        os._exit(0)


class LazyAttributeNet(_TinyBody):
    """Returns an attribute tensors do not have: the error is raised where no line of the model is on the stack."""

    def __init__(self):
        super().__init__(3)

    def forward(self, x, timesteps):
        return x.not_a_tensor_attribute
