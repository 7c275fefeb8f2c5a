"""fxpass.models: the guided-diffusion U-Net, its blocks, and its parity with upstream checkpoints.

The numbers pinned here were measured on openai/guided-diffusion's own ``create_model`` / ``UNetModel``
(torch 2.13, CPU): the sha256 of its state-dict layout (one ``"key (shape)"`` line per tensor, in
order), its tensor and parameter counts, the tensors it zero-initialises, and, for two small configs,
its outputs after every parameter is set by :func:`randomise` (seeded) on a seeded input.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxpass.checkpoint import init_model
from fxpass.config import CAMUS, build_model, from_dict
from fxpass.models.layers import (
    AttentionBlock,
    Downsample,
    GroupNorm32,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    Upsample,
    timestep_embedding,
)
from fxpass.models.unet import UNetModel

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- upstream facts -------------------------------------------------------------------------------
# A: CAMUS's flags (legacy attention, scale-shift norm, learned sigma) at 32 px.
CONFIG_A = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                attention_resolutions="16,8", num_heads=2, learn_sigma=True, use_scale_shift_norm=True)
# B: every other switch: resblock up/down, new attention order, num_head_channels, class labels,
# additive time embedding, 3 output channels.
CONFIG_B = dict(image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                attention_resolutions="16,8", num_head_channels=16, resblock_updown=True,
                use_new_attention_order=True, class_cond=True, learn_sigma=False, use_scale_shift_norm=False)

UPSTREAM_LAYOUT = {
    # name: (sha256 of "key (shape)" lines, tensors, parameters, zero-initialised tensors)
    "camus": ("e2cb395c6d8176af05174a203b92639effca73051ed96e48889c782c61ca7f64", 612, 41_125_062, 224),
    "A": ("583dd5c135817acc69f0ba6a6b8493f3f7d2dd4491906b3bbe2462954de46f75", 184, 1_243_558, 68),
    "B": ("010e90241966324ba04a70218a61c36b70dfd91fcaf343db5970d7da8d452ce2", 217, 1_442_083, 84),
}
UPSTREAM_OUTPUT = {
    # name: (sum, sum of |.|, out[0, :, 5, 7], out[1, :, 31, 0]) for x, t = [10, 700] (y = [3, 999])
    "A": (-1195.2536017093807, 6208.105053070001,
          [-0.791721, 0.020966, -0.159993, 0.051593, -0.358577, -0.520581],
          [0.051083, 0.111003, -0.09933, -0.221521, 0.295821, -0.095878]),
    "B": (-538.9965778440237, 2717.4549453780055,
          [-0.523135, -0.205862, -0.089016],
          [-0.261976, 0.604645, 0.16641]),
}


def layout(model: nn.Module) -> tuple:
    state = model.state_dict()
    lines = "\n".join(f"{k} {tuple(v.shape)}" for k, v in state.items())
    zeros = sum(1 for v in state.values() if not v.any())
    return (hashlib.sha256(lines.encode()).hexdigest(), len(state), sum(p.numel() for p in model.parameters()), zeros)


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter random (upstream zero-initialises some convolutions), fan-in scaled."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def small(**changes):
    base = dict(image_size=32, num_channels=32, num_res_blocks=1, attention_resolutions="16,8", num_heads=2)
    return from_dict({**base, **changes})


# ---- state-dict layout and numbers equal to guided-diffusion ----------------------------------------
def test_camus_state_dict_layout_is_guided_diffusions():
    model = build_model(CAMUS)
    assert layout(model) == UPSTREAM_LAYOUT["camus"]
    state = model.state_dict()
    keys = list(state)
    assert keys[0] == "time_embed.0.weight" and keys[-1] == "out.2.bias"
    assert tuple(state["time_embed.0.weight"].shape) == (256, 64)
    assert tuple(state["time_embed.2.weight"].shape) == (256, 256)
    assert tuple(state["input_blocks.0.0.weight"].shape) == (64, 3, 3, 3)
    assert tuple(state["input_blocks.1.0.emb_layers.1.weight"].shape) == (128, 256)  # scale and shift
    assert tuple(state["input_blocks.4.0.op.weight"].shape) == (64, 64, 3, 3)  # Downsample conv
    assert tuple(state["middle_block.1.qkv.weight"].shape) == (768, 256, 1)
    assert tuple(state["output_blocks.3.2.conv.weight"].shape) == (256, 256, 3, 3)  # Upsample conv
    assert tuple(state["out.2.weight"].shape) == (6, 64, 3, 3)
    assert tuple(state["out.2.bias"].shape) == (6,)
    assert len(model.input_blocks) == 24 and len(model.output_blocks) == 24
    assert sum(isinstance(m, AttentionBlock) for m in model.modules()) == 15
    assert sum(isinstance(m, QKVAttentionLegacy) for m in model.modules()) == 15


@pytest.mark.parametrize("name, flags", [("A", CONFIG_A), ("B", CONFIG_B)])
def test_small_state_dict_layouts_are_guided_diffusions(name, flags):
    assert layout(build_model(from_dict(flags))) == UPSTREAM_LAYOUT[name]


@pytest.mark.parametrize("name, flags", [("A", CONFIG_A), ("B", CONFIG_B)])
def test_outputs_equal_guided_diffusions(name, flags):
    model = randomise(build_model(from_dict(flags)), seed=1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 32, 32, generator=g)
    y = torch.tensor([3, 999]) if flags.get("class_cond") else None
    with torch.no_grad():
        out = model(x, torch.tensor([10, 700]), y=y).double()
    total, total_abs, first, second = UPSTREAM_OUTPUT[name]
    assert out.sum().item() == pytest.approx(total, abs=1e-3)
    assert out.abs().sum().item() == pytest.approx(total_abs, abs=1e-3)
    torch.testing.assert_close(out[0, :, 5, 7], torch.tensor(first, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :, 31, 0], torch.tensor(second, dtype=torch.float64), atol=1e-5, rtol=0)


def test_state_dict_loads_strictly_into_a_fresh_model():
    cfg = from_dict(CONFIG_B)
    source = randomise(build_model(cfg), seed=3)
    target = build_model(cfg)
    target.load_state_dict(source.state_dict(), strict=True)
    for (ka, a), (kb, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert ka == kb and torch.equal(a, b)


def test_build_model_is_in_eval_mode_float32(small_cfg):
    model = build_model(small_cfg)
    assert isinstance(model, UNetModel) and not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ---- ResBlock ------------------------------------------------------------------------------------
def _randomised_block(block, seed=0):
    return randomise(block, seed).eval()


@pytest.mark.parametrize("scale_shift", [True, False])
def test_resblock_matches_its_definition(scale_shift):
    block = _randomised_block(ResBlock(32, 128, 0.0, out_channels=64, use_scale_shift_norm=scale_shift))
    assert block.emb_layers[1].out_features == (128 if scale_shift else 64)
    assert isinstance(block.skip_connection, nn.Conv2d) and block.skip_connection.kernel_size == (1, 1)
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 128)
    gn1, conv1 = block.in_layers[0], block.in_layers[2]
    gn2, conv2 = block.out_layers[0], block.out_layers[3]
    with torch.no_grad():
        h = F.conv2d(F.silu(F.group_norm(x, 32, gn1.weight, gn1.bias)), conv1.weight, conv1.bias, padding=1)
        e = block.emb_layers[1](F.silu(emb))[:, :, None, None]
        if scale_shift:
            scale, shift = e[:, :64], e[:, 64:]
            h = F.group_norm(h, 32, gn2.weight, gn2.bias) * (1 + scale) + shift
        else:
            h = F.group_norm(h + e, 32, gn2.weight, gn2.bias)
        h = F.conv2d(F.silu(h), conv2.weight, conv2.bias, padding=1)
        expected = block.skip_connection(x) + h
        torch.testing.assert_close(block(x, emb), expected, atol=1e-5, rtol=1e-5)


def test_resblock_same_width_has_identity_skip_and_conv_skip_with_use_conv():
    assert isinstance(ResBlock(32, 128, 0.0).skip_connection, nn.Identity)
    conv_skip = ResBlock(32, 128, 0.0, out_channels=64, use_conv=True).skip_connection
    assert isinstance(conv_skip, nn.Conv2d) and conv_skip.kernel_size == (3, 3)


def test_resblock_zero_initialises_its_last_conv():
    block = ResBlock(32, 128, 0.0)
    assert not block.out_layers[3].weight.any() and not block.out_layers[3].bias.any()


@pytest.mark.parametrize("up", [True, False])
def test_resblock_up_and_down(up):
    block = _randomised_block(ResBlock(32, 128, 0.0, use_scale_shift_norm=True, up=up, down=not up))
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 128)
    resample = (lambda t: F.interpolate(t, scale_factor=2, mode="nearest")) if up else (lambda t: F.avg_pool2d(t, 2))
    gn1, conv1 = block.in_layers[0], block.in_layers[2]
    gn2, conv2 = block.out_layers[0], block.out_layers[3]
    with torch.no_grad():
        out = block(x, emb)
        assert out.shape == ((2, 32, 16, 16) if up else (2, 32, 4, 4))
        # resampling sits between the in-layers' activation and their convolution, and on the skip path
        h = F.conv2d(resample(F.silu(F.group_norm(x, 32, gn1.weight, gn1.bias))), conv1.weight, conv1.bias, padding=1)
        scale, shift = block.emb_layers[1](F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = F.group_norm(h, 32, gn2.weight, gn2.bias) * (1 + scale) + shift
        h = F.conv2d(F.silu(h), conv2.weight, conv2.bias, padding=1)
        torch.testing.assert_close(out, resample(x) + h, atol=1e-5, rtol=1e-5)


def test_resblock_updown_replaces_separate_resamplers():
    separate = build_model(small())
    downs = [m for m in separate.modules() if isinstance(m, Downsample)]
    ups = [m for m in separate.modules() if isinstance(m, Upsample)]
    assert len(downs) == len(ups) == 3  # channel_mult (1, 2, 2, 2): three level changes each way
    assert all(isinstance(d.op, nn.Conv2d) and d.op.stride == (2, 2) for d in downs)
    assert all(isinstance(u.conv, nn.Conv2d) for u in ups)

    updown = build_model(small(resblock_updown=True))
    top_level = [b[-1] for b in list(updown.input_blocks) + list(updown.output_blocks)]
    assert not any(isinstance(m, (Downsample, Upsample)) for m in top_level)
    res_down = [m for m in updown.modules() if isinstance(m, ResBlock) and isinstance(m.h_upd, Downsample)]
    res_up = [m for m in updown.modules() if isinstance(m, ResBlock) and isinstance(m.h_upd, Upsample)]
    assert len(res_down) == len(res_up) == 3
    with torch.no_grad():
        out = init_model(small(resblock_updown=True))(torch.randn(1, 3, 32, 32), torch.tensor([5]))
    assert out.shape == (1, 6, 32, 32)


def test_upsample_and_downsample_without_conv():
    x = torch.randn(1, 32, 4, 4)
    torch.testing.assert_close(Upsample(32, False)(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    torch.testing.assert_close(Downsample(32, False)(x), F.avg_pool2d(x, 2))


# ---- attention -----------------------------------------------------------------------------------
def _reference_attention(q, k, v):
    """[B*H, C, T] each -> [B*H, C, T] with softmax(q.k / sqrt(C)) weights."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


@pytest.mark.parametrize("heads", [1, 4])
def test_legacy_attention_splits_heads_then_qkv(heads):
    bs, ch, length = 2, 8, 10
    qkv = torch.randn(bs, 3 * heads * ch, length)
    per_head = qkv.reshape(bs * heads, 3 * ch, length)
    q, k, v = per_head[:, :ch], per_head[:, ch:2 * ch], per_head[:, 2 * ch:]
    expected = _reference_attention(q, k, v).reshape(bs, heads * ch, length)
    torch.testing.assert_close(QKVAttentionLegacy(heads)(qkv), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [1, 4])
def test_new_order_attention_splits_qkv_then_heads(heads):
    bs, ch, length = 2, 8, 10
    qkv = torch.randn(bs, 3 * heads * ch, length)
    q, k, v = (t.reshape(bs * heads, ch, length) for t in qkv.chunk(3, dim=1))
    expected = _reference_attention(q, k, v).reshape(bs, heads * ch, length)
    torch.testing.assert_close(QKVAttention(heads)(qkv), expected, atol=1e-5, rtol=1e-5)


def test_attention_orders_differ_with_several_heads_only():
    qkv = torch.randn(2, 3 * 32, 10)
    torch.testing.assert_close(QKVAttention(1)(qkv), QKVAttentionLegacy(1)(qkv))
    assert not torch.allclose(QKVAttention(4)(qkv), QKVAttentionLegacy(4)(qkv), atol=1e-3)


def test_attention_block_heads_and_order():
    assert AttentionBlock(64, num_heads=4).num_heads == 4
    assert AttentionBlock(64, num_heads=4, num_head_channels=16).num_heads == 4
    assert AttentionBlock(64, num_heads=1, num_head_channels=32).num_heads == 2
    assert isinstance(AttentionBlock(64).attention, QKVAttentionLegacy)
    assert isinstance(AttentionBlock(64, use_new_attention_order=True).attention, QKVAttention)
    block = AttentionBlock(64)
    assert not block.proj_out.weight.any() and not block.proj_out.bias.any()
    assert tuple(block.qkv.weight.shape) == (192, 64, 1)


def test_attention_block_matches_its_definition():
    block = randomise(AttentionBlock(64, num_heads=2), seed=4).eval()
    x = torch.randn(2, 64, 4, 4)
    with torch.no_grad():
        flat = x.reshape(2, 64, 16)
        qkv = F.conv1d(F.group_norm(flat, 32, block.norm.weight, block.norm.bias), block.qkv.weight, block.qkv.bias)
        h = F.conv1d(QKVAttentionLegacy(2)(qkv), block.proj_out.weight, block.proj_out.bias)
        torch.testing.assert_close(block(x), (flat + h).reshape(2, 64, 4, 4), atol=1e-5, rtol=1e-5)


def test_model_heads_from_num_heads_num_head_channels_and_upsample():
    def heads(model, part):
        return [m.num_heads for m in getattr(model, part).modules() if isinstance(m, AttentionBlock)]

    by_heads = build_model(small(num_heads=4, num_heads_upsample=1))
    assert set(heads(by_heads, "input_blocks")) == {4} and set(heads(by_heads, "middle_block")) == {4}
    assert set(heads(by_heads, "output_blocks")) == {1}
    by_width = build_model(small(num_head_channels=16))
    blocks = [m for m in by_width.modules() if isinstance(m, AttentionBlock)]
    assert blocks and all(m.num_heads == m.channels // 16 for m in blocks)
    assert {m.num_heads for m in blocks} == {4}  # every attention level of (1, 2, 2, 2) x 32 has 64 channels
    new_order = build_model(small(use_new_attention_order=True))
    assert all(isinstance(m.attention, QKVAttention) for m in new_order.modules() if isinstance(m, AttentionBlock))


def test_attention_placement_follows_attention_resolutions():
    model = build_model(small(attention_resolutions="16"))  # 16 px of 32 = downsample rate 2 = level 1
    with_attention = [i for i, b in enumerate(model.input_blocks) if any(isinstance(m, AttentionBlock) for m in b)]
    assert with_attention == [3]  # conv, res, down, [res + attn], down, ...
    assert isinstance(model.middle_block[1], AttentionBlock)
    none = build_model(small(attention_resolutions=""))
    assert sum(isinstance(m, AttentionBlock) for m in none.modules()) == 1  # the middle block's only


# ---- whole model switches --------------------------------------------------------------------------
@pytest.mark.parametrize("size, levels", [(32, 4), (64, 4)])
def test_default_channel_mult_sets_the_levels(size, levels):
    model = build_model(from_dict({"image_size": size, "num_channels": 32, "num_res_blocks": 1,
                                   "attention_resolutions": "8"}))
    widths = [b[0].out_channels for b in model.input_blocks[1:] if isinstance(b[0], ResBlock)]
    expected = {32: [32, 64, 64, 64], 64: [32, 64, 96, 128]}[size]
    assert widths == expected
    assert sum(isinstance(m, Downsample) for m in model.modules()) == levels - 1


@pytest.mark.parametrize("learn_sigma, channels", [(True, 6), (False, 3)])
def test_learn_sigma_sets_output_channels(learn_sigma, channels):
    model = init_model(small(learn_sigma=learn_sigma))
    assert model.out[2].out_channels == channels
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32), torch.tensor([1])).shape == (1, channels, 32, 32)


def test_class_cond_adds_a_label_embedding_that_changes_the_output():
    model = init_model(small(class_cond=True))
    assert isinstance(model.label_emb, nn.Embedding)
    assert tuple(model.label_emb.weight.shape) == (1000, 128)
    assert "label_emb.weight" in model.state_dict()
    assert not hasattr(init_model(small()), "label_emb")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 3])
    with torch.no_grad():
        a = model(x, t, y=torch.tensor([0, 1]))
        b = model(x, t, y=torch.tensor([0, 2]))
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[1], b[1])


def test_dropout_is_in_every_resblock_and_off_in_eval():
    model = init_model(small(dropout=0.3))
    rates = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    assert rates == {0.3}
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([7])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), model(x, t))
        model.train()
        torch.manual_seed(0)
        a = model(x, t)
        b = model(x, t)
    assert not torch.allclose(a, b)


def test_timesteps_beyond_diffusion_steps_are_refused():
    model = build_model(small(diffusion_steps=100, timestep_respacing=""))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32), torch.tensor([100]))
        with pytest.raises(RuntimeError, match="timesteps larger than diffusion steps"):
            model(torch.randn(1, 3, 32, 32), torch.tensor([101]))


def test_forward_accepts_and_ignores_repaint_extras():
    model = init_model(small())
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([5])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, gt=torch.randn(1, 3, 32, 32), gt_keep_mask=None), model(x, t))


def test_timestep_embedding():
    emb = timestep_embedding(torch.tensor([0, 5]), 8)
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # cos half first
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.cos(5 * freqs), torch.sin(5 * freqs)]))
    odd = timestep_embedding(torch.tensor([3.5]), 7)
    assert odd.shape == (1, 7) and odd[0, -1] == 0


def test_gradient_checkpointing_gives_the_same_gradients():
    plain = randomise(build_model(small(use_checkpoint=False)), seed=5)
    ckpt = build_model(small(use_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([9])
    plain(x, t).square().mean().backward()
    ckpt(x, t).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_attention_always_runs_through_the_checkpoint_function():
    # upstream's AttentionBlock passes True to checkpoint() whatever use_checkpoint says; ResBlock obeys it
    block = AttentionBlock(32)
    assert not block.use_checkpoint
    out = block(torch.randn(1, 32, 4, 4, requires_grad=True))
    assert type(out.grad_fn).__name__ == "_CheckpointFunctionBackward"
    res = ResBlock(32, 128, 0.0)
    out = res(torch.randn(1, 32, 4, 4, requires_grad=True), torch.randn(1, 128))
    assert "CheckpointFunction" not in type(out.grad_fn).__name__


# ---- use_fp16 --------------------------------------------------------------------------------------
def test_fp16_converts_the_torso_convolutions_only():
    model = build_model(small(), fp16=True)
    assert model.dtype == torch.float16
    for part in (model.input_blocks, model.middle_block, model.output_blocks):
        for m in part.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                assert m.weight.dtype == torch.float16 and m.bias.dtype == torch.float16
            if isinstance(m, (nn.GroupNorm, nn.Linear)):
                assert m.weight.dtype == torch.float32
    assert model.time_embed[0].weight.dtype == torch.float32
    assert model.out[2].weight.dtype == torch.float32 and model.out[0].weight.dtype == torch.float32
    model.convert_to_fp32()
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_fp16_forward_runs_on_cpu_and_stays_close_to_fp32():
    cfg = small()
    reference = init_model(cfg, seed=3)
    half = build_model(cfg, fp16=True)
    half.load_state_dict(reference.state_dict())  # copies into the float16 convolutions
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        expected = reference(x, t)
        out = half(x, t)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert torch.isfinite(out).all()
    err = (out - expected).abs().max() / expected.abs().max()
    assert err < 2e-2, f"fp16 relative error {err:.3g}"


def test_groupnorm32_computes_in_float32():
    norm = GroupNorm32(32, 64)
    x = torch.randn(2, 64, 4, 4).half()
    out = norm(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, F.group_norm(x.float(), 32, norm.weight, norm.bias).half())
