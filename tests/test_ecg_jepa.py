"""ECG-JEPA: the official layout, CroPA, masks, the loss against a plain transcription of the original,
EMA and weight decay, checkpoint import, ONNX export and training through the one loop, on real records."""

import importlib.util
import math
import re
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from services.ecg.preprocess import prepare_signal, preprocess
from services.ecg.readers import read_wfdb
from services.errors import ClientError
from services.export.onnx import INPUT_NAME, OUTPUT_NAME, export_checked
from services.jobs.pretrain import run_pretrain_job
from services.models import ecg_jepa
from services.models.checkpoints import FORMATS, load_ecg_jepa_encoder, load_encoder, load_st_mem_encoder
from services.models.ecg_jepa import (
    INPUT_SPEC,
    LEADS,
    SIZES,
    EcgJepa,
    EcgJepaEncoder,
    MaskConfig,
    block_time_mask,
    cropa_attention,
    cropa_mask,
    random_time_mask,
    sincos_2d,
)
from services.models.st_mem import SIZES as ST_MEM_SIZES
from services.models.st_mem import StMemEncoder
from services.training.loop import CropDataset, TrainConfig, train

from .conftest import checkpoint_key_sections

TINY = SIZES["tiny"]
CPU = torch.device("cpu")


def _reference_section() -> dict:
    """The ECG-JEPA section of checkpoint-keys.txt: totals, listed (name, shape) in order, the last entry."""
    section = checkpoint_key_sections()["ECG-JEPA"]
    return {**section, "listed": list(section["listed"].items())}


def _layout(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


@pytest.fixture(scope="module")
def real_windows(ptbxl_dir: Path) -> torch.Tensor:
    """Standardised centre windows of four real PTB-XL records, (4, 8, 2500)."""
    headers = [ptbxl_dir / "records500" / "00000" / f"{i:05d}_hr.hea" for i in (1, 2, 3, 4)]
    return torch.from_numpy(np.stack([preprocess(read_wfdb(h), INPUT_SPEC, "center")[0] for h in headers]))


# --------------------------------------------------------------------------------------------------
# layout and sizes


def test_tiny_tokens_carry_the_signal_at_initialisation(real_windows):
    """The tiny size draws W_P at std 0.4: at the original 0.02 the position table, added before every
    block, dwarfs the patch tokens, and tiny pretraining collapsed onto position (module docstring)."""

    def across_records(cfg: ecg_jepa.EcgJepaConfig) -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            tokens = EcgJepaEncoder(cfg).eval().forward_tokens(real_windows)  # (4, 400, D)
        tokens = F.layer_norm(tokens, tokens.shape[-1:])  # as the targets
        return float(tokens.var(0).mean() / tokens.reshape(-1, tokens.shape[-1]).var(0).mean())

    assert TINY.patch_init_std == 0.4 and SIZES["base"].patch_init_std is None  # base: the original's init
    assert across_records(TINY) > 0.6  # measured 0.74
    assert across_records(replace(TINY, patch_init_std=None)) < 0.1  # measured 0.035
    torch.manual_seed(0)
    assert float(EcgJepaEncoder(TINY).W_P.weight.detach().std()) == pytest.approx(0.4, rel=0.05)


def test_base_encoder_matches_the_official_checkpoint():
    ref = _reference_section()
    assert (ref["entry"], ref["tensors"], ref["elements"]) == ("encoder", 137, 85_374_720)
    with torch.device("meta"):
        layout = _layout(EcgJepaEncoder(SIZES["base"]))
    assert len(layout) == ref["tensors"] == len(ref["listed"]) + ref["more"]
    assert list(layout)[: len(ref["listed"])] == [name for name, _ in ref["listed"]]  # names, in order
    for name, shape in ref["listed"]:
        assert layout[name] == shape, name
    assert list(layout)[-1] == ref["last"][0] and layout[ref["last"][0]] == ref["last"][1]
    assert sum(math.prod(s) for s in layout.values()) == ref["elements"]


def test_base_sizes_and_parameter_counts():
    base = SIZES["base"]
    assert (base.num_leads, base.seq_len, base.patch_size, base.num_patches) == (8, 2500, 50, 50)
    assert (base.width, base.depth, base.heads, base.qkv_bias, base.mlp_ratio) == (768, 12, 16, False, 4.0)
    assert (base.predictor_width, base.predictor_depth, base.predictor_heads) == (384, 6, 12)
    with torch.device("meta"):
        model = EcgJepa(base)
    trainable = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    assert round(trainable / 1e6, 2) == 85.07  # methods.md 2.2 (+0.31 M fixed positions)
    assert model.encoder.pos_embed.numel() == 400 * 768 and not model.encoder.pos_embed.requires_grad
    assert round(sum(p.numel() for p in model.predictor.parameters()) / 1e6, 2) == 11.25  # methods.md 2.2
    assert model.encoder.encoder_blocks.blocks[0].attn.heads == 16
    assert model.predictor.predictor_blocks.blocks[0].attn.heads == 12
    assert _layout(model.target_encoder) == _layout(model.encoder)
    # drop-path rises linearly from 0 to 0.1 over the 12 encoder blocks
    rates = [b.drop_path.p for b in model.encoder.encoder_blocks.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates[6] == pytest.approx(0.6 / 11)


def test_the_2d_sincos_table():
    width, leads, patches = 64, 8, 50
    table = sincos_2d(width, leads, patches).numpy().reshape(leads, patches, width)
    quarter = width // 4
    omega = 10000.0 ** (-np.arange(quarter) / quarter)  # MAE's 1-D table of width D/2
    time = np.arange(patches)[:, None] * omega
    lead = np.arange(leads)[:, None] * omega
    for i in range(leads):  # first half: the time patch; second half: the lead
        np.testing.assert_allclose(table[i, :, :quarter], np.sin(time), atol=1e-6)
        np.testing.assert_allclose(table[i, :, quarter : 2 * quarter], np.cos(time), atol=1e-6)
        lead_sin, lead_cos = np.sin(lead[i])[None].repeat(50, 0), np.cos(lead[i])[None].repeat(50, 0)
        np.testing.assert_allclose(table[i, :, 2 * quarter : 3 * quarter], lead_sin, atol=1e-6)
        np.testing.assert_allclose(table[i, :, 3 * quarter :], lead_cos, atol=1e-6)
    torch.manual_seed(0)
    model = EcgJepa(TINY)
    np.testing.assert_array_equal(model.encoder.pos_embed.numpy(), sincos_2d(64, 8, 50).numpy())
    predictor_table = model.predictor.pos_embed.numpy()  # 1 x 50 grid: the lead half is constant
    np.testing.assert_array_equal(predictor_table[:, 16:], np.tile(predictor_table[:1, 16:], (50, 1)))
    assert not model.predictor.pos_embed.requires_grad


# --------------------------------------------------------------------------------------------------
# CroPA


def _cropa_as_the_original(c: int, p: int) -> torch.Tensor:
    """The original ``_cross_attention_mask``: lead blocks on the diagonal plus every p-th column."""
    rows = torch.zeros(c * p, c * p)
    for i in range(c):
        rows[i * p : (i + 1) * p, i * p : (i + 1) * p] = 1
    cols = torch.zeros(c * p, c * p)
    for i in range(p):
        cols[i::p, i::p] = 1
    return (rows + cols).clamp(max=1).bool()


def test_cropa_mask_sees_57_keys_per_query_and_is_cached():
    mask = cropa_mask(8, 50, CPU)
    assert mask.shape == (400, 400) and mask.dtype == torch.bool
    assert torch.all(mask.sum(dim=1) == 57)  # 50 of its lead + 8 of its time patch - itself
    assert mask.float().mean().item() == pytest.approx(0.1425)
    assert torch.equal(mask, _cropa_as_the_original(8, 50))
    assert cropa_mask(8, 50, CPU) is mask  # built once per shape


def test_cropa_mask_of_the_visible_subset():
    # the context encoder's mask for the kept time patches equals the full mask sliced to those tokens
    full = cropa_mask(8, 50, CPU)
    for seed in range(5):
        keep = ~block_time_mask(50, (0.175, 0.225)) if seed % 2 else ~random_time_mask(50, (0.6, 0.7))
        tokens = keep.repeat(8)  # (400,) lead-major
        n = int(keep.sum())
        assert torch.equal(cropa_mask(8, n, CPU), full[tokens][:, tokens]), seed


@pytest.mark.parametrize("kept", [50, 39, 1])  # all time patches, the context encoder's visible ones, one
def test_cropa_attention_equals_attention_under_the_mask(kept: int):
    torch.manual_seed(kept)
    q, k, v = (torch.randn(3, 4, 8 * kept, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=cropa_mask(8, kept, CPU))
    factored = cropa_attention(q, k, v, num_leads=8)
    torch.testing.assert_close(factored, masked, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(masked)
    ours = torch.autograd.grad(factored, (q, k, v), grad)
    for got, expected in zip(ours, torch.autograd.grad(masked, (q, k, v), grad), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_a_token_sees_only_its_lead_and_its_time_patch(real_windows: torch.Tensor):
    # one block: the output at (lead i, patch a) depends on the input tokens it may attend to, no others
    torch.manual_seed(0)
    encoder = EcgJepaEncoder(replace(TINY, depth=1)).eval()
    series = real_windows[:1].clone()
    lead, patch = 2, 10

    def token_after(changed: tuple[int, int] | None) -> torch.Tensor:
        x = series.clone()
        if changed is not None:
            j, b = changed
            x[0, j, b * 50 : (b + 1) * 50] += 10.0
        with torch.no_grad():
            return encoder.forward_tokens(x)[0, lead * 50 + patch]

    before = token_after(None)
    for hidden in [(5, 30), (0, 0), (7, 49), (3, 11)]:
        assert torch.equal(token_after(hidden), before), hidden
    for seen in [(lead, 30), (5, patch), (lead, patch)]:
        assert (token_after(seen) - before).abs().max() > 1e-6, seen  # (hidden ones: exactly 0)


# --------------------------------------------------------------------------------------------------
# masks over time patches


def test_random_mask_hides_60_to_70_percent():
    torch.manual_seed(0)
    counts = torch.stack([random_time_mask(50, (0.6, 0.7)) for _ in range(2000)]).sum(dim=1)
    assert counts.min() == 30 and counts.max() == 34  # int(50 r), r in [0.6, 0.7)
    assert counts.float().mean().item() == pytest.approx(32.0, abs=0.2)
    assert MaskConfig("random").ratios == (0.6, 0.7) and MaskConfig().ratios == (0.175, 0.225)


def _runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of masked patches."""
    padded = torch.cat([torch.tensor([False]), mask, torch.tensor([False])]).int()
    edges = padded.diff().nonzero()[:, 0]
    return (edges[1::2] - edges[::2]).tolist()


def test_block_mask_fixed_and_original_starts():
    torch.manual_seed(0)
    fixed = torch.stack([block_time_mask(50, (0.175, 0.225)) for _ in range(3000)]).float()
    original = torch.stack([block_time_mask(50, (0.175, 0.225), original_starts=True) for _ in range(3000)])
    original = original.float()
    for masks in (fixed, original):
        counts = masks.sum(dim=1)
        assert counts.min() >= 8 and counts.max() <= 44  # 4 runs of 8..11 patches, possibly overlapping
        assert counts.float().mean().item() == pytest.approx(27.4, abs=0.6)  # methods.md 2.3
        assert 0.55 < masks[:, 20:30].mean().item() < 0.75  # about 0.65 in the middle
        assert all(n >= 8 for m in masks[:200].bool() for n in _runs(m))
    assert original[:, -1].sum() == 0  # the original never masks the last patch
    assert 0.05 < fixed[:, -1].mean().item() < 0.15  # the fixed sampler does, as often as the first
    assert 0.05 < original[:, 0].mean().item() < 0.15 and 0.05 < fixed[:, 0].mean().item() < 0.15


def test_one_mask_per_step_shared_by_the_batch_and_the_leads(real_windows: torch.Tensor):
    torch.manual_seed(0)
    model = EcgJepa(TINY, MaskConfig("random")).eval()
    drawn: list[torch.Tensor] = []
    sample = model.sample_mask

    def counted() -> torch.Tensor:
        drawn.append(sample())
        return drawn[-1]

    model.sample_mask = counted
    model(real_windows)
    assert len(drawn) == 1 and drawn[0].shape == (50,)
    # the loss of a sample is the loss at that mask for the sample alone
    with torch.no_grad():
        whole = model(real_windows, drawn[0]).item()
        alone = [model(real_windows[i : i + 1], drawn[0]).item() for i in range(4)]
    assert whole == pytest.approx(np.mean(alone), rel=1e-5)
    with pytest.raises(ValueError, match="some but not all"):
        model(real_windows, torch.zeros(50, dtype=torch.bool))


# --------------------------------------------------------------------------------------------------
# the loss, against a plain transcription of the original forward


def _plain_block(block: torch.nn.Module, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """timm's Block with an explicit softmax; disallowed logits set to -inf as the original does."""
    b, n, d = x.shape
    h = block.attn.heads
    qkv = block.attn.qkv(block.norm1(x)).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
    logits = qkv[0] @ qkv[1].transpose(-2, -1) * (d // h) ** -0.5
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    out = (logits.softmax(dim=-1) @ qkv[2]).transpose(1, 2).reshape(b, n, d)
    x = x + block.attn.proj(out)
    return x + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x))))


def _plain_encoder(encoder: EcgJepaEncoder, series: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The original MaskTransformer.forward: project all 400 patches, then slice tokens, positions, mask."""
    b = series.shape[0]
    x = encoder.W_P(series.reshape(b, 400, 50))
    pos = encoder.pos_embed[None].expand(b, -1, -1)
    allowed = _cropa_as_the_original(8, 50)
    if keep is not None:
        tokens = keep.repeat(8)
        x, pos, allowed = x[:, tokens], pos[:, tokens], allowed[tokens][:, tokens]
    for block in encoder.encoder_blocks.blocks:
        x = _plain_block(block, x + pos, allowed)
    return encoder.norm(x)


def _plain_loss(model: EcgJepa, series: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The original ecg_jepa.forward and MaskTransformerPredictor.forward, transcribed."""
    b, d = series.shape[0], model.cfg.width
    with torch.no_grad():
        h = _plain_encoder(model.target_encoder, series, None)
        h = F.layer_norm(h, (d,)).reshape(b, 8, 50, d)
        target = h[:, :, mask, :].reshape(b, -1, d)
    context = _plain_encoder(model.encoder, series, ~mask)
    pred = model.predictor
    num_mask = int(mask.sum())
    x = pred.predictor_embed(context)
    x = x.reshape(b * 8, -1, x.shape[-1])
    x = torch.cat([x, pred.mask_token.expand(b * 8, num_mask, -1)], dim=1)
    idx = torch.cat([(~mask).nonzero(as_tuple=True)[0], mask.nonzero(as_tuple=True)[0]])
    pos = pred.pos_embed[idx][None].expand(x.shape[0], -1, -1)
    for block in pred.predictor_blocks.blocks:
        x = _plain_block(block, x + pos, None)
    z = pred.predictor_proj(pred.predictor_norm(x)).reshape(b, -1, d)
    z_pred = z.reshape(b, 8, 50, -1)[:, :, -num_mask:, :].reshape(b, -1, d)
    return torch.nn.SmoothL1Loss()(z_pred, target)


@pytest.mark.parametrize("kind", ["block", "random"])
def test_loss_and_gradients_equal_the_plain_original(real_windows: torch.Tensor, kind: str):
    torch.manual_seed(0)
    model = EcgJepa(TINY, MaskConfig(kind))
    with torch.no_grad():  # a target encoder that differs from the context encoder, as during training
        for p in model.target_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    mask = model.sample_mask()
    loss = model(real_windows, mask)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ref = _plain_loss(model, real_windows, mask)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5) and loss.item() > 0.05
    assert all(n.startswith(("encoder.", "predictor.")) for n in grads)  # no gradient into the target
    assert "encoder.pos_embed" not in grads
    assert "encoder.W_P.weight" in grads and "predictor.mask_token" in grads
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-3, atol=1e-6, msg=name)


def _plain_reference():
    """bench/plain_reference.py: the plain ECG-JEPA that bench/pretrain_throughput.py times against ours."""
    spec = importlib.util.spec_from_file_location(
        "plain_reference", Path(__file__).resolve().parents[1] / "bench" / "plain_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("kind", ["block", "random"])
def test_the_benchmarks_plain_reference_gives_the_same_loss_gradients_and_ema(real_windows, kind: str):
    # the reference the benchmark times (CroPA as a float 0/1 mask rebuilt per call, masked_fill with
    # -inf, all patches projected; the EMA as a loop) holds our weights (strict load) and, under the same
    # RNG state, draws the same mask: the same loss, gradients, and target encoder after an AdamW step
    torch.manual_seed(0)
    model = EcgJepa(TINY, MaskConfig(kind))
    with torch.no_grad():
        for p in model.target_encoder.parameters():
            p.add_(0.01 * torch.randn_like(p))
    plain = _plain_reference().plain_jepa_copy(model)
    losses = []
    for m in (model, plain):
        torch.manual_seed(7)
        loss = m(real_windows)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] > 0.05
    plain_params = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is None:
            assert plain_params[name].grad is None, name
            continue
        torch.testing.assert_close(p.grad, plain_params[name].grad, rtol=1e-3, atol=1e-6, msg=name)
    for m in (model, plain):
        groups = m.param_groups(0.05)
        torch.optim.AdamW(groups, lr=1e-3).step()
        m.after_step(3, 10)
    plain_state = plain.state_dict()
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, plain_state[name], rtol=1e-4, atol=1e-6, msg=name)


def test_representation_is_the_mean_of_the_normalised_tokens(real_windows: torch.Tensor):
    torch.manual_seed(0)
    encoder = EcgJepa(TINY).encoder.eval()
    with torch.no_grad():
        embedding = encoder(real_windows)
        expected = _plain_encoder(encoder, real_windows, None).mean(dim=1)
        alone = torch.cat([encoder(real_windows[i : i + 1]) for i in range(4)])
    assert embedding.shape == (4, 64)
    torch.testing.assert_close(embedding, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone, embedding, rtol=1e-4, atol=1e-5)  # no mixing across the batch
    assert (embedding[0] - embedding[1]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# EMA, weight decay


def test_ema_momentum_rises_linearly_and_updates_the_target():
    torch.manual_seed(0)
    model = EcgJepa(TINY)
    assert model.momentum_at(0, 100) == 0.996 and model.momentum_at(100, 100) == 1.0
    assert model.momentum_at(50, 100) == pytest.approx(0.998)
    assert model.momentum_at(25, 100) - model.momentum_at(24, 100) == pytest.approx(0.004 / 100)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in model.target_encoder.named_parameters()}
    context = dict(model.encoder.named_parameters())
    model.after_step(30, 100)
    m = 0.996 + 0.004 * 0.3
    assert model.momentum == pytest.approx(m)
    for name, p in model.target_encoder.named_parameters():
        torch.testing.assert_close(p, m * before[name] + (1 - m) * context[name], msg=name)
    assert not any(p.requires_grad for p in model.target_encoder.parameters())


def test_param_groups_exclude_biases_norms_and_fixed_tables():
    torch.manual_seed(0)
    model = EcgJepa(TINY)
    decay, no_decay = model.param_groups(0.05)
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.05, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "encoder.W_P.weight" in decayed and "predictor.mask_token" in decayed
    assert "encoder.encoder_blocks.blocks.0.attn.qkv.weight" in decayed
    assert {"encoder.W_P.bias", "encoder.norm.weight", "predictor.predictor_norm.weight"} <= not_decayed
    assert "encoder.encoder_blocks.blocks.1.norm2.weight" in not_decayed
    assert all(p.ndim >= 2 for p in decay["params"]) and all(not n.endswith(".bias") for n in decayed)
    assert all(p.ndim == 1 for p in no_decay["params"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | not_decayed == trainable and not decayed & not_decayed
    assert not any(n.startswith("target_encoder.") or n.endswith("pos_embed") for n in trainable)


# --------------------------------------------------------------------------------------------------
# checkpoint import (synthetic files with the official names and shapes)


def _random_state(layout: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in layout.items():
        value = torch.randn(shape, generator=g) * (shape[-1] ** -0.5 if len(shape) >= 2 else 0.05)
        state[name] = value + 1.0 if re.search(r"norm\d?\.weight$", name) else value
    return state


def test_official_base_checkpoint_loads_strictly(tmp_path: Path):
    ref = _reference_section()
    with torch.device("meta"):
        layout = _layout(EcgJepaEncoder(SIZES["base"]))  # == the reference (test above)
    assert all(layout[name] == shape for name, shape in ref["listed"]) and len(layout) == ref["tensors"]
    state = _random_state(layout, seed=1)
    path = tmp_path / "epoch100.pth"
    torch.save({"encoder": state, "epoch": 99}, path)

    encoder, info = load_encoder("ecg_jepa", path)
    assert isinstance(encoder, EcgJepaEncoder) and not encoder.training
    assert (info.format, info.layout, info.size, info.tensors) == ("ecg_jepa", "encoder", "base", 137)
    assert (info.parameters, info.embedding_dim, info.samples, info.fs) == (85_374_720, 768, 2500, 250.0)
    assert info.leads == LEADS == ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6") and info.num_leads == 8
    loaded = encoder.state_dict()
    assert list(loaded) == list(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert "ecg_jepa" in FORMATS


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {k: v.clone() for k, v in EcgJepaEncoder(TINY).state_dict().items()}


def test_a_bare_tiny_state_dict_loads_and_embeds_alike(tmp_path: Path, tiny_state, real_windows):
    torch.save(tiny_state, tmp_path / "bare.pth")
    encoder, info = load_ecg_jepa_encoder(tmp_path / "bare.pth")
    assert (info.size, info.tensors, info.embedding_dim) == ("tiny", 27, 64)
    reference = EcgJepaEncoder(TINY).eval()
    reference.load_state_dict(tiny_state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(encoder(real_windows), reference(real_windows), rtol=0, atol=0)


def _refusal(tmp_path: Path, obj: object, loader=load_ecg_jepa_encoder) -> str:
    path = tmp_path / "bad.pth"
    torch.save(obj, path)
    with pytest.raises(ClientError) as caught:
        loader(path)
    return str(caught.value)


def test_checkpoints_of_another_layout_are_refused_naming_the_problem(tmp_path: Path, tiny_state):
    no_block = {k: v for k, v in tiny_state.items() if not k.startswith("encoder_blocks.blocks.1.")}
    message = _refusal(tmp_path, {"encoder": no_block})
    assert "ECG-JEPA tiny encoder layout" in message and "27 tensors; the file has 16" in message
    assert "11 missing key(s): encoder_blocks.blocks.1.norm1.weight" in message

    with_bias = {**tiny_state, "encoder_blocks.blocks.0.attn.qkv.bias": torch.zeros(192)}
    assert "1 unexpected key(s): encoder_blocks.blocks.0.attn.qkv.bias" in _refusal(tmp_path, with_bias)

    wide_mlp = {**tiny_state, "encoder_blocks.blocks.0.mlp.fc1.weight": torch.zeros(128, 64)}
    message = _refusal(tmp_path, {"encoder": wide_mlp})
    assert "encoder_blocks.blocks.0.mlp.fc1.weight is (128, 64) in the file, expected (256, 64)" in message

    odd_width = {**tiny_state, "W_P.weight": torch.zeros(96, 50), "pos_embed": torch.zeros(400, 96)}
    message = _refusal(tmp_path, odd_width)
    assert "width 96 (W_P.weight) is no known ECG-JEPA size (tiny 64, base 768)" in message

    st_mem = StMemEncoder(ST_MEM_SIZES["tiny"]).state_dict()
    for obj in ({"model": st_mem}, {"encoder": st_mem}, st_mem):
        message = _refusal(tmp_path, obj)
        assert "looks like an ST-MEM checkpoint" in message
        assert "format 'ecg_jepa' expects pos_embed" in message
    assert "has no 'encoder' entry" in _refusal(tmp_path, {"state": st_mem, "epoch": 3})
    # and the other way round
    message = _refusal(tmp_path, {"model": tiny_state}, loader=load_st_mem_encoder)
    assert "looks like an ECG-JEPA encoder" in message


# --------------------------------------------------------------------------------------------------
# serving: ONNX export with CroPA


def test_onnx_export_keeps_cropa(tmp_path: Path, real_windows: torch.Tensor, monkeypatch):
    torch.manual_seed(0)
    encoder = EcgJepa(TINY).encoder
    windows = real_windows.numpy()
    assert windows.shape == (4, 8, 2500) and INPUT_SPEC.samples == 2500 and INPUT_SPEC.fs == 250.0
    parity = export_checked(encoder, windows, tmp_path / "encoder.onnx")  # exported with one window
    assert parity <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "encoder.onnx"), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: windows})[0]
    assert got.shape == (4, 64)
    # the mask matters: the same weights attending everywhere give different embeddings
    attend_everywhere = lambda q, k, v, leads: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    monkeypatch.setattr(ecg_jepa, "cropa_attention", attend_everywhere)
    with torch.no_grad():
        unmasked = encoder(real_windows).numpy()
    assert np.abs(unmasked - got).max() > 100 * parity + 1e-3


# --------------------------------------------------------------------------------------------------
# training through the one loop, on real records


def test_training_lowers_the_loss_and_moves_the_ema_target(ptbxl_dir: Path, tmp_path: Path):
    headers = [ptbxl_dir / "records500" / "00000" / f"{i:05d}_hr.hea" for i in range(1, 17)]
    signals = np.stack([prepare_signal(read_wfdb(h), INPUT_SPEC) for h in headers])  # (16, 8, 2500)
    dataset = CropDataset(signals, INPUT_SPEC.samples, random_crop=True)
    cfg = TrainConfig(
        epochs=8, batch_size=8, learning_rate=2e-3, weight_decay=0.05, warmup_epochs=1, amp=False,
        checkpoint_every=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = EcgJepa(TINY)
    initial_target = {n: p.clone() for n, p in model.target_encoder.named_parameters()}
    steps: list[tuple[int, int]] = []
    ema_step = model.after_step
    model.after_step = lambda step, total: steps.append((step, total)) or ema_step(step, total)

    result = train(model, dataset, cfg, CPU, tmp_path / "jepa.pt")
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.85 * losses[0], losses  # 0.432 -> 0.339 (W_P at std 0.4: no shortcut via position)
    assert steps == [(i, 16) for i in range(16)]  # after every optimiser step, 0-based, of 16
    assert model.momentum == pytest.approx(0.996 + 0.004 * 15 / 16)
    target, context = dict(model.target_encoder.named_parameters()), dict(model.encoder.named_parameters())
    moved = [n for n, p in target.items() if not torch.equal(p, initial_target[n])]
    assert len(moved) == len(target) - 1  # everything but the fixed positions
    assert max((target[n] - context[n]).abs().max().item() for n in target) > 1e-3
    # the AdamW groups of the loop are the model's (no decay on biases and norms)
    state = torch.load(tmp_path / "jepa.pt", weights_only=False)
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.05, 0.0]
    for name, p in target.items():  # the checkpoint holds the EMA target
        assert torch.equal(state["model"][f"target_encoder.{name}"], p), name

    # resume two more epochs: the target is restored from the checkpoint, not copied from the context
    cfg.epochs = 10
    resumed = EcgJepa(TINY)
    resumed_steps: list[int] = []
    target_at_first_step: dict[str, torch.Tensor] = {}
    resumed_ema = resumed.after_step

    def spy(step: int, total: int) -> None:
        if not resumed_steps:  # before the first EMA update: the target as loaded
            target_at_first_step.update({n: p.clone() for n, p in resumed.target_encoder.named_parameters()})
        resumed_steps.append(step)
        resumed_ema(step, total)

    resumed.after_step = spy
    result = train(resumed, dataset, cfg, CPU, tmp_path / "jepa.pt")
    assert result.resumed_from_epoch == 8 and resumed_steps == list(range(16, 20))
    for name, p in target_at_first_step.items():
        assert torch.equal(p, state["model"][f"target_encoder.{name}"]), name
    assert resumed.momentum == pytest.approx(0.996 + 0.004 * 19 / 20)


# --------------------------------------------------------------------------------------------------
# the service: POST /jobs/pretrain with method ecg_jepa, then /embed from its ONNX export


def test_an_ecg_jepa_job_pretrains_exports_and_serves_an_awkward_upload(
    client: TestClient, settings_env: pytest.MonkeyPatch, ptb_record: Path
) -> None:
    settings_env.setenv("ECGSSL_DEVICE", "cpu")
    name = f"jepa-{uuid.uuid4().hex[:6]}"
    body = {
        "dataset": "ptbxl-500", "method": "ecg_jepa", "epochs": 2, "batch_size": 8, "record_limit": 24,
        "learning_rate": 1e-3, "jepa_masking": {"kind": "random", "scale": [0.6, 0.7]}, "model_name": name,
    }  # fmt: skip
    response = client.post("/jobs/pretrain", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert run_pretrain_job(uuid.UUID(job_id), worker="test-worker") == "succeeded"  # as the worker would
    job = client.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job["error"]
    assert job["params"]["weight_decay"] == 0.05  # the method's recipe, filled in and kept on the job row
    losses = [m["values"]["train_loss"] for m in job["metrics"]]
    assert len(losses) == 2 and all(np.isfinite(losses))

    version = client.get("/models").json()["models"]
    served = next(m for m in version if m["name"] == name)["versions"][0]
    assert served["method"] == "ecg_jepa" and served["embedding_dim"] == TINY.width
    assert served["input_spec"]["leads"] == list(LEADS) and served["input_spec"]["samples"] == 2500
    assert served["parity_max_abs_diff"] < 1e-3  # measured on real records by the job: CroPA exported

    # the 1000 Hz, 15-channel PTB Diagnostic record: 8 of its leads, resampled to 250 Hz, 2500-sample windows
    files = [("files", (p.name, p.read_bytes())) for p in (ptb_record, ptb_record.with_suffix(".dat"))]
    embedded = client.post("/embed", params={"model": f"{name}@1"}, files=files)
    assert embedded.status_code == 200, embedded.text
    out = embedded.json()
    assert out["dimension"] == TINY.width and out["record"]["windows"] >= 3
    assert np.abs(out["embedding"]).max() > 0.01


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"method": "ecg_jepa", "model_size": "small"}, "model_size 'small' does not exist for ecg_jepa"),
        ({"method": "ecg_jepa", "jepa_masking": {"kind": "random", "scale": [0.7, 0.6]}}, "scale"),
        ({"method": "ecg_jepa", "jepa_masking": {"kind": "grid"}}, "kind"),
        ({"method": "ecg_jepa", "jepa_masking": {"blocks": 0}}, "blocks"),
        ({"method": "ecg_jepa", "jepa_masking": {"unknown": 1}}, "unknown"),
        ({"method": "jepa2"}, "method"),
    ],
)
def test_bad_ecg_jepa_job_requests_get_422(client: TestClient, change: dict, expected: str) -> None:
    response = client.post("/jobs/pretrain", json={"dataset": "ptbxl-500", "epochs": 1, **change})
    assert response.status_code == 422, response.text
    assert expected in response.text
