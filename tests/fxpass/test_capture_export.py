"""Issue #27, capture route 2: ``torch.export`` (``fxpass.capture_export``) for code the example-value
tracer (route 1) refuses, and ``fxpass lower --capture {auto,trace,export}``.

The models are written here the way lucidrains' denoising-diffusion-pytorch is written (einops
``rearrange`` in the attention and the time projection, index assignment ``h[:, :c] = ...``, a timestep
parameter named ``time``, ``torch.cat((emb.sin(), emb.cos()), dim=-1)``) and the way guided-diffusion is
(``1 / sqrt(sqrt(ch))`` attention scale, scale-shift norm, the rank loop).  None has an ``assert``
statement, so pytest's rewriting of this module changes nothing capture sees; the CLI reaches them
through ``--model-factory test_capture_export:...`` (this folder is on ``sys.path``).

    EinopsUNet exported (before) and folded in table mode (after)::

        time ─ sin,cos ─ linear ─ gelu ─ linear ─ silu ─ linear ─ view ─ split ─ add 1 ─┐
        x ─ conv ─ group_norm ─────────────────────────────────────────────────── mul ─ add ─ ...

        t_index ─ index_select(_fxpass_ttable_k) ─┐
        x ─ conv ─ group_norm ──────────────── mul ─ add ─ ...
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from fxpass.capture_export import capture_exported
from fxpass.checkpoint import save_checkpoint
from fxpass.cli import main
from fxpass.errors import FxpassError
from fxpass.metadata import parse, read_props
from fxpass.passes import check_no_guards_left, fold_timesteps, rewrite

#: a respaced schedule's worth of timesteps for the Python-level tests
SCHEDULE = list(range(999, -1, -111))


# ---- models: lucidrains' style -------------------------------------------------------------------------
class SinusoidalPosEmb(nn.Module):
    def __init__(self, dim, theta=10000):
        super().__init__()
        self.dim = dim
        self.theta = theta

    def forward(self, x):
        half_dim = self.dim // 2
        emb = math.log(self.theta) / (half_dim - 1)
        emb = torch.exp(torch.arange(half_dim, device=x.device) * -emb)
        emb = x[:, None] * emb[None, :]
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class Block(nn.Module):
    def __init__(self, dim, dim_out, groups=4):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.SiLU()

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.act(x)


class ResnetBlock(nn.Module):
    def __init__(self, dim, dim_out, time_emb_dim):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out)
        self.block2 = Block(dim_out, dim_out)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, time_emb):
        time_emb = rearrange(self.mlp(time_emb), "b c -> b c 1 1")
        h = self.block1(x, scale_shift=time_emb.chunk(2, dim=1))
        return self.block2(h) + self.res_conv(x)


class Attention(nn.Module):
    def __init__(self, dim, heads=2, dim_head=8):
        super().__init__()
        self.scale = dim_head ** -0.5
        self.heads = heads
        hidden = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        qkv = self.to_qkv(x).chunk(3, dim=1)
        q, k, v = map(lambda t: rearrange(t, "b (h c) x y -> b h c (x y)", h=self.heads), qkv)
        sim = torch.einsum("b h d i, b h d j -> b h i j", q * self.scale, k)
        out = torch.einsum("b h i j, b h d j -> b h i d", sim.softmax(dim=-1), v)
        return self.to_out(rearrange(out, "b h (x y) d -> b (h d) x y", x=h, y=w))


class EinopsUNet(nn.Module):
    """One level down and up, attention in the middle; route 1 refuses its ``rearrange``."""

    def __init__(self, dim=16, channels=3, self_condition=False):
        super().__init__()
        self.channels = channels
        self.self_condition = self_condition
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(SinusoidalPosEmb(dim), nn.Linear(dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))
        self.init_conv = nn.Conv2d(channels * (2 if self_condition else 1), dim, 7, padding=3)
        self.down = ResnetBlock(dim, dim, time_dim)
        self.downsample = nn.Conv2d(dim, dim * 2, 4, 2, 1)
        self.mid = ResnetBlock(dim * 2, dim * 2, time_dim)
        self.attn = Attention(dim * 2)
        self.upsample = nn.ConvTranspose2d(dim * 2, dim, 4, 2, 1)
        self.up = ResnetBlock(dim * 2, dim, time_dim)
        self.final_conv = nn.Conv2d(dim, channels, 1)

    def forward(self, x, time, x_self_cond=None):
        if self.self_condition:
            x_self_cond = x_self_cond if x_self_cond is not None else torch.zeros_like(x)
            x = torch.cat((x_self_cond, x), dim=1)
        x = self.init_conv(x)
        r = x.clone()
        t = self.time_mlp(time)
        h = self.downsample(self.down(x, t))
        h = self.mid(h, t)
        h = h + self.attn(h)
        h = self.upsample(h)
        c = h.shape[1] // 2
        h[:, :c] = h[:, :c] * 0.5  # index assignment into a computed tensor
        h = self.up(torch.cat((h, r), dim=1), t)
        return self.final_conv(h)


class BranchyEinopsUNet(EinopsUNet):
    """A decision on x's values: route 1 stops at ``rearrange`` first, route 2 at this line."""

    def forward(self, x, time, x_self_cond=None):
        if x.mean() > 0:
            x = x * 0.5
        return super().forward(x, time, x_self_cond)


# ---- models: guided-diffusion's style ------------------------------------------------------------------
def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, channels, emb_channels, out_channels):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(4, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels))
        self.out_norm = nn.GroupNorm(4, out_channels)
        self.out_rest = nn.Sequential(nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(channels, out_channels, 1) if channels != out_channels else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while len(emb_out.shape) < len(h.shape):
            emb_out = emb_out[..., None]
        scale, shift = torch.chunk(emb_out, 2, dim=1)
        h = self.out_rest(self.out_norm(h) * (1 + scale) + shift)
        return self.skip(x) + h


class QKVAttention(nn.Module):
    def __init__(self, channels, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(4, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, -1))
        bs, width, length = qkv.shape
        ch = width // (3 * self.heads)
        q, k, v = qkv.reshape(bs * self.heads, ch * 3, length).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
        h = torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)
        return x + self.proj(h).reshape(b, c, *spatial)


class GuidedStyleUNet(nn.Module):
    """guided-diffusion's constructs without its ``.item()`` check (which torch.export cannot take)."""

    def __init__(self, ch=16):
        super().__init__()
        self.ch = ch
        self.time_embed = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.enc = ResBlock(ch, 4 * ch, ch)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.mid = ResBlock(ch, 4 * ch, 2 * ch)
        self.attn = QKVAttention(2 * ch)
        self.dec = ResBlock(2 * ch, 4 * ch, ch)
        self.dec2 = ResBlock(2 * ch, 4 * ch, ch)
        self.out = nn.Sequential(nn.GroupNorm(4, ch), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1))

    def forward(self, x, timesteps, y=None):
        emb = self.time_embed(timestep_embedding(timesteps, self.ch))
        h1 = self.enc(self.inp(x), emb)
        h = self.attn(self.mid(self.down(h1), emb))
        h = F.interpolate(self.dec(h, emb), scale_factor=2, mode="nearest")
        return self.out(self.dec2(torch.cat([h, h1], dim=1), emb))


class CheckedTableNet(nn.Module):
    """Reads its embedding row by ``.item()`` under ``torch._check``: export's ``_assert_scalar`` nodes."""

    def __init__(self, steps=1000):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.emb = nn.Parameter(torch.randn(steps, 3))

    def forward(self, x, timesteps):
        i = timesteps[0].item()
        torch._check(i >= 0)
        torch._check(i < self.emb.shape[0])
        return self.conv(x) * (1 + self.emb[i][None, :, None, None])


def make_einops_unet():
    return EinopsUNet()


def make_branchy_unet():
    return BranchyEinopsUNet()


def make_guided_style_unet():
    return GuidedStyleUNet()


# ---- helpers ---------------------------------------------------------------------------------------------
USER_FLAGS = ["--diffusion-steps", "1000", "--timestep-respacing", "50", "--image-size", "32"]


def _lower(directory, factory, model, *flags):
    """``fxpass lower`` of ``test_capture_export:<factory>`` (weights of ``model``) with ``--report``:
    (exit code, ONNX path, the report or None)."""
    ckpt, out, report = directory / f"{factory}.pt", directory / f"{factory}.onnx", directory / f"{factory}.json"
    save_checkpoint(model, ckpt)
    code = main(["lower", str(ckpt), "-o", str(out), "--report", str(report),
                 "--model-factory", f"test_capture_export:{factory}", *USER_FLAGS, *flags])
    return code, out, (json.loads(report.read_text()) if report.exists() else None)


def _against_eager(out, model):
    """ORT on ``out`` against the eager ``model`` (called by its own parameter names) at the first, middle
    and last t_index: the worst error relative to max|ref|, each."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    timesteps = parse(read_props(onnx.load(out))).model_timesteps
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    errors = []
    for k in (0, len(timesteps) // 2, len(timesteps) - 1):
        got = sess.run(None, {"x": x.numpy(), "t_index": np.array([k])})[0]
        with torch.no_grad():
            ref = model.eval()(x, torch.tensor([timesteps[k]])).numpy()
        errors.append(float(np.abs(got - ref).max() / np.abs(ref).max()))
    return errors


def _error(capsys) -> str:
    """The one ``fxpass: ...`` line a refused command printed (never a traceback or an internal error)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fxpass:")]
    assert len(lines) == 1, err
    assert "internal error" not in err and "Traceback" not in err
    return lines[0]


# ---- capture_exported and the fx passes on its graph --------------------------------------------------
def test_exported_graph_has_the_forward_names_and_one_output():
    torch.manual_seed(0)
    model = EinopsUNet().eval()
    inputs = {"x": torch.randn(1, 3, 32, 32), "time": torch.tensor([999])}
    gm = capture_exported(model, inputs)
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "time"]
    assert gm.meta["fxpass_route"] == "export" and gm.meta["fxpass_output"] is None
    assert set(gm.meta["fxpass_example_inputs"]) == {"x", "time"}
    assert not any(n.op == "call_module" for n in gm.graph.nodes)  # no _guards_fn, parameters as get_attr
    assert any(n.op == "get_attr" for n in gm.graph.nodes)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert isinstance(out.args[0], torch.fx.Node) and out.args[0].meta["fxpass_shape"] == (1, 3, 32, 32)
    assert any("h[:, :c] = h[:, :c] * 0.5" in (n.meta.get("stack_trace") or "") for n in gm.graph.nodes)
    assert any(n.meta.get("fxpass_source", ("",))[0] == __file__ for n in gm.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs.values()), model(**inputs), rtol=0, atol=0)


def test_fold_on_exported_graph_tables_and_idempotence():
    """(f) t_index replaces time; each cone output a registered table; a second fold changes nothing;
    each row matches the eager model at its timestep."""
    torch.manual_seed(0)
    model = EinopsUNet().eval()
    x = torch.randn(1, 3, 32, 32)
    gm = rewrite(capture_exported(model, {"x": x, "time": torch.tensor([SCHEDULE[-1]])}), timesteps=SCHEDULE)
    check_no_guards_left(gm)
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert names == ["x", "t_index"]
    tables = {name: b for name, b in gm.named_buffers() if name.startswith("_fxpass_ttable")}
    assert gm.meta["fxpass_rewrites"]["fold_timesteps"] == len(tables) == 6  # (1 + scale), shift × 3 blocks
    assert all(b.shape[0] == len(SCHEDULE) for b in tables.values())
    before = gm.graph.python_code("self").src
    assert fold_timesteps(gm, SCHEDULE).modified is False  # no timestep input left: a no-op
    assert gm.graph.python_code("self").src == before
    for k in (0, len(SCHEDULE) // 2, len(SCHEDULE) - 1):
        with torch.no_grad():
            torch.testing.assert_close(gm(x, torch.tensor([k])), model(x, torch.tensor([SCHEDULE[k]])),
                                       rtol=1e-5, atol=1e-5)


def test_dataclass_output_reduced_to_its_sample():
    from dataclasses import dataclass

    @dataclass
    class Output:
        sample: torch.Tensor
        extra: torch.Tensor

    class Wrapped(GuidedStyleUNet):
        def forward(self, x, timesteps, y=None):
            out = super().forward(x, timesteps)
            return Output(out, out * 2)

    gm = capture_exported(Wrapped().eval(), {"x": torch.randn(1, 3, 16, 16), "timesteps": torch.tensor([5])})
    assert gm.meta["fxpass_output"] == "sample"
    out = next(n for n in gm.graph.nodes if n.op == "output")
    assert out.args[0].meta["fxpass_shape"] == (1, 3, 16, 16)


def test_export_refusal_names_the_users_line():
    with pytest.raises(FxpassError) as info:
        capture_exported(BranchyEinopsUNet().eval(), {"x": torch.randn(1, 3, 32, 32), "time": torch.tensor([3])})
    message = str(info.value)
    assert "\n" not in message and "torch.export cannot handle this" in message
    assert f"{__file__}:" in message and "`if x.mean() > 0:`" in message


def test_export_runtime_asserts_are_guards_checked_at_every_entry():
    """``torch._check`` on the timestep: folded where every entry keeps it, refused where one breaks it."""
    torch.manual_seed(0)
    model = CheckedTableNet().eval()
    x = torch.randn(1, 3, 8, 8)
    gm = capture_exported(model, {"x": x, "timesteps": torch.tensor([5])})
    assert any(str(n.target) == "aten._assert_scalar.default" for n in gm.graph.nodes)
    folded = rewrite(gm, timesteps=[999, 500, 0])
    check_no_guards_left(folded)
    with torch.no_grad():
        torch.testing.assert_close(folded(x, torch.tensor([1])), model(x, torch.tensor([500])), rtol=0, atol=0)
    gm = capture_exported(model, {"x": x, "timesteps": torch.tensor([5])})
    with pytest.raises(FxpassError, match=r"t_index 0, timestep 1000 breaks .*u0 <= 999"):
        rewrite(gm, timesteps=[1000, 3])


def test_a_module_built_in_forward_is_not_passed_to_route_2():
    """Route 1's refusal of the model itself stands: torch.export would take one call's random weights."""
    import fxpass
    from fxpass.config import user_class_config
    from user_models import ForwardBuiltNet

    cfg = user_class_config(None, diffusion_steps=100, timestep_respacing="10", image_size=16)
    with pytest.raises(FxpassError) as info:
        fxpass.lower(ForwardBuiltNet(), config=cfg)
    assert "build it in __init__" in str(info.value) and "route 2" not in str(info.value)


# ---- fxpass lower --capture ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def einops_lowered(tmp_path_factory):
    """EinopsUNet lowered with the default --capture auto: route 1 refuses rearrange, route 2 runs."""
    torch.manual_seed(0)
    model = EinopsUNet()
    code, out, report = _lower(tmp_path_factory.mktemp("einops"), "make_einops_unet", model)
    return code, out, report, model


@pytest.mark.xdist_group("capture-export")
def test_auto_falls_back_to_export_and_says_why(einops_lowered):
    """(a)"""
    code, out, report, _ = einops_lowered
    assert code == 0
    route = report["capture_route"]
    assert route["route"] == "export"
    assert route["why"].startswith("route 1 (trace) refused: ") and "einops" in route["why"]
    assert report["request"]["source"]["capture"] == "auto"
    assert report["fx_rewrites"]["fold_timesteps"] > 0


@pytest.mark.xdist_group("capture-export")
def test_table_mode_matches_eager(einops_lowered):
    """(b) ORT on the written file against the eager model at the first, middle and last t_index."""
    code, out, report, model = einops_lowered
    assert code == 0 and report["check"]["passed"]
    assert report["check"]["max_rel_to_scale"] <= 1e-5
    assert max(_against_eager(out, model)) <= 1e-5


def test_capture_export_on_guided_style_model(tmp_path):
    """(c) --capture export on guided-diffusion's constructs: folded, and equal to eager."""
    torch.manual_seed(0)
    model = GuidedStyleUNet()
    code, out, report = _lower(tmp_path, "make_guided_style_unet", model, "--capture", "export")
    assert code == 0
    assert report["capture_route"] == {"route": "export", "why": "--capture export"}
    assert report["fx_rewrites"]["fold_timesteps"] > 0
    assert max(_against_eager(out, model)) <= 1e-5


def test_capture_trace_refuses_einops_in_one_line(tmp_path, capsys):
    """(d)"""
    code, out, report = _lower(tmp_path, "make_einops_unet", EinopsUNet(), "--capture", "trace")
    assert code == 2 and not out.exists() and report is None
    line = _error(capsys)
    assert "Tensor type unknown to einops" in line and "route 2" not in line


def test_neither_route_one_line_naming_both(tmp_path, capsys):
    """(e) exit 2, one line: route 1's refusal and route 2's, with the user's line."""
    code, out, _ = _lower(tmp_path, "make_branchy_unet", BranchyEinopsUNet())
    assert code == 2 and not out.exists()
    line = _error(capsys)
    assert "route 1 (trace):" in line and "einops" in line
    assert "route 2 (torch.export):" in line and "`if x.mean() > 0:`" in line


def test_capture_flag_checked(tmp_path, capsys):
    from fxpass.request import LowerRequest

    with pytest.raises(FxpassError, match="--capture fast: expected auto or trace or export"):
        LowerRequest.of(capture="fast").validate()
    with pytest.raises(FxpassError, match="--dynamic-batch needs --capture trace"):
        LowerRequest.of(capture="export", dynamic_batch=True).validate()
