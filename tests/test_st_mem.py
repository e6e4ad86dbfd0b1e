"""ST-MEM: layout against the official checkpoints, positional table, masking, loss, encoder forward."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from services.ecg.preprocess import InputSpec, preprocess
from services.ecg.readers import read_wfdb
from services.models.st_mem import SIZES, StMemEncoder, StMemMae, attention, sincos_table

from .conftest import checkpoint_key_sections

TINY = SIZES["tiny"]


def _parse_section(title: str) -> dict:
    """One section of checkpoint-keys.txt: totals, listed (name, shape) pairs and the last entry."""
    section = checkpoint_key_sections()[title]
    return {**section, "listed": list(section["listed"].items())}


def _layout(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in module.state_dict().items()}


@pytest.fixture(scope="module")
def real_windows(ptbxl_dir: Path) -> torch.Tensor:
    """Centre windows of four real PTB-XL records, (4, 12, 2250)."""
    spec = InputSpec()
    windows = [
        preprocess(read_wfdb(ptbxl_dir / "records500" / "00000" / f"{i:05d}_hr.hea"), spec, "center")[0]
        for i in (1, 2, 3, 4)
    ]
    return torch.from_numpy(np.stack(windows))


# --------------------------------------------------------------------------------------------------
# layout


def test_base_encoder_matches_the_official_checkpoint():
    ref = _parse_section("ST-MEM encoder")
    assert (ref["tensors"], ref["elements"]) == (166, 85_150_614)
    with torch.device("meta"):
        encoder = StMemEncoder(SIZES["base"])
    layout = _layout(encoder)
    assert len(ref["listed"]) + ref["more"] == ref["tensors"]
    for name, shape in ref["listed"]:
        assert layout.get(name) == shape, name
    assert list(layout)[-1] == ref["last"][0]
    assert layout[ref["last"][0]] == ref["last"][1]
    assert len(layout) == ref["tensors"]
    assert sum(int(np.prod(s)) for s in layout.values()) == ref["elements"]


def test_base_mae_matches_the_official_checkpoint():
    ref = _parse_section("ST-MEM full")
    assert (ref["tensors"], ref["elements"]) == (228, 88_594_807)
    with torch.device("meta"):
        mae = StMemMae(SIZES["base"])
    layout = _layout(mae)
    for name, shape in ref["listed"]:
        assert layout.get(name) == shape, name
    assert layout[ref["last"][0]] == ref["last"][1]
    assert len(layout) == ref["tensors"]
    assert sum(int(np.prod(s)) for s in layout.values()) == ref["elements"]
    # the MAE's encoder is the standalone encoder: its state dict loads into StMemEncoder unchanged
    encoder_keys = {k.removeprefix("encoder.") for k in layout if k.startswith("encoder.")}
    with torch.device("meta"):
        assert encoder_keys == set(_layout(StMemEncoder(SIZES["base"])))


def test_small_encoder_parameter_count():
    with torch.device("meta"):
        encoder = StMemEncoder(SIZES["small"])
    n = sum(p.numel() for p in encoder.parameters())
    assert round(n / 1e6, 2) == 21.34  # methods.md 1.2, ViT-S/75


# --------------------------------------------------------------------------------------------------
# positional table


@pytest.mark.parametrize(("width", "n"), [(768, 30), (256, 30), (64, 30), (16, 5)])
def test_sincos_table(width: int, n: int):
    table = sincos_table(width, n).numpy()
    assert table.shape == (n + 2, width)
    assert table.dtype == np.float32
    np.testing.assert_array_equal(table[0], 0.0)
    np.testing.assert_array_equal(table[-1], 0.0)
    half = width // 2
    omega = 10000.0 ** (-np.arange(half) / half)  # methods.md 1.2: w_k = 10000^(-k/(D/2))
    angle = np.arange(n)[:, None] * omega[None, :]  # rows 1..N hold patch index 0..N-1
    np.testing.assert_allclose(table[1:-1, :half], np.sin(angle), atol=1e-6)
    np.testing.assert_allclose(table[1:-1, half:], np.cos(angle), atol=1e-6)


def test_pos_embedding_is_fixed():
    torch.manual_seed(0)
    mae = StMemMae(TINY)
    encoder = mae.encoder
    assert not encoder.pos_embedding.requires_grad
    assert not mae.decoder_pos_embed.requires_grad
    np.testing.assert_array_equal(encoder.pos_embedding[0].numpy(), sincos_table(64, 30).numpy())
    loss = mae(torch.randn(2, 12, 2250))
    loss.backward()
    assert encoder.pos_embedding.grad is None
    assert encoder.sep_embedding.grad is not None  # the rest does learn
    trainable = {id(p) for p in mae.parameters() if p.requires_grad}
    assert id(encoder.pos_embedding) not in trainable


# --------------------------------------------------------------------------------------------------
# masking


def test_random_masking():
    torch.manual_seed(0)
    b, c, n, d = 4, 12, 30, 5
    # each token carries its own patch index, so kept tokens can be traced back
    x = torch.arange(n, dtype=torch.float32)[None, None, :, None].expand(b, c, n, d).clone()
    x += torch.randn(b, c, 1, d)  # and something per sample and lead
    kept, mask, ids_restore = StMemMae.random_masking(x, 0.75)
    assert kept.shape == (b, c, 7, d)
    assert mask.shape == ids_restore.shape == (b, c, n)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.all(mask.sum(dim=2) == 23)
    assert torch.all((1 - mask).sum(dim=2) == 7)
    # kept tokens are exactly the unmasked patches of that lead
    kept_index = (kept[..., 0] - x[:, :, :1, 0]).round().long()  # patch indices kept
    for i in range(b):
        for j in range(c):
            assert sorted(kept_index[i, j].tolist()) == torch.nonzero(mask[i, j] == 0)[:, 0].tolist()
    # masks differ between leads and between samples
    flat = mask.reshape(b * c, n)
    assert len({tuple(row.tolist()) for row in flat}) == b * c
    # ids_restore undoes the shuffle
    ids_shuffle = ids_restore.argsort(dim=2)
    shuffled = torch.gather(x, 2, ids_shuffle[..., None].expand(-1, -1, -1, d))
    torch.testing.assert_close(shuffled[:, :, :7], kept)
    restored = torch.gather(shuffled, 2, ids_restore[..., None].expand(-1, -1, -1, d))
    torch.testing.assert_close(restored, x)
    # masked slots after restoring: the patches the mask marks
    np.testing.assert_array_equal(
        torch.gather((torch.arange(n) >= 7).float().expand(b, c, n), 2, ids_restore).numpy(), mask.numpy()
    )


def test_random_masking_is_random_between_calls():
    x = torch.randn(1, 12, 30, 4)
    _, m1, _ = StMemMae.random_masking(x, 0.75)
    _, m2, _ = StMemMae.random_masking(x, 0.75)
    assert not torch.equal(m1, m2)
    _, m_half, _ = StMemMae.random_masking(x, 0.5)
    assert torch.all(m_half.sum(dim=2) == 15)


# --------------------------------------------------------------------------------------------------
# loss


def test_loss_counts_masked_patches_only(real_windows: torch.Tensor):
    torch.manual_seed(0)
    mae = StMemMae(TINY)
    series = real_windows[:2]
    b, c, n, p = 2, 12, 30, 75
    pred = torch.randn(b, c, n, p)
    _, mask, _ = StMemMae.random_masking(torch.zeros(b, c, n, 1), 0.75)
    base = mae.loss(series, pred, mask)
    kept_idx = torch.nonzero(mask == 0)
    masked_idx = torch.nonzero(mask == 1)
    changed = pred.clone()
    for i, j, k in kept_idx[:20].tolist():
        changed[i, j, k] += 5.0
    assert mae.loss(series, changed, mask).item() == base.item()
    changed = pred.clone()
    i, j, k = masked_idx[0].tolist()
    changed[i, j, k] += 5.0
    assert mae.loss(series, changed, mask).item() > base.item() + 1e-3

    # norm_pix target: every patch standardised by its own mean and (unbiased) variance, eps 1e-6
    target = series.reshape(b, c, n, p).double().numpy()
    norm = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    per_patch = ((pred.double().numpy() - norm) ** 2).mean(-1)
    expected = (per_patch * mask.numpy()).sum() / mask.numpy().sum()
    assert base.item() == pytest.approx(expected, rel=1e-5)
    perfect = torch.from_numpy(norm).float()
    assert mae.loss(series, perfect, mask).item() < 1e-6
    raw = torch.from_numpy(target).float()  # the unnormalised signal is not the target
    assert mae.loss(series, raw, mask).item() > 0.1


def test_mae_forward(real_windows: torch.Tensor):
    torch.manual_seed(0)
    mae = StMemMae(TINY)
    latent, mask, ids_restore = mae.forward_encoder(real_windows, 0.75)
    assert latent.shape == (4, 12 * (7 + 2), 64)
    pred = mae.forward_decoder(latent, ids_restore)
    assert pred.shape == (4, 12, 30, 75)
    loss = mae(real_windows)
    assert loss.ndim == 0
    assert torch.isfinite(loss)
    assert 0.2 < loss.item() < 20.0


# --------------------------------------------------------------------------------------------------
# encoder forward


def test_encoder_forward_and_batch_independence(real_windows: torch.Tensor):
    torch.manual_seed(0)
    encoder = StMemMae(TINY).encoder.eval()
    with torch.no_grad():
        batch = encoder(real_windows)
        assert batch.shape == (4, 64)
        assert torch.isfinite(batch).all()
        for i in range(4):
            alone = encoder(real_windows[i : i + 1])
            torch.testing.assert_close(alone[0], batch[i], atol=1e-5, rtol=1e-5)
        # in another company and order, the same embedding
        other = encoder(torch.stack([real_windows[3], torch.randn(12, 2250), real_windows[1]]))
        torch.testing.assert_close(other[0], batch[3], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other[2], batch[1], atol=1e-5, rtol=1e-5)
    # different records give different embeddings
    assert (batch[0] - batch[1]).abs().max() > 1e-3


def test_encoder_loads_the_mae_encoder_weights(real_windows: torch.Tensor):
    torch.manual_seed(0)
    mae = StMemMae(TINY)
    encoder = StMemEncoder(TINY)
    encoder.load_state_dict(mae.encoder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(encoder.eval()(real_windows), mae.encoder.eval()(real_windows))


# --------------------------------------------------------------------------------------------------
# the plain reference of bench/pretrain_throughput.py (bench/plain_reference.py): the same results at
# the same weights


def _bench():
    spec = importlib.util.spec_from_file_location(
        "plain_reference", Path(__file__).resolve().parents[1] / "bench" / "plain_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_same_results_as_the_plain_reference(real_windows: torch.Tensor, size: str):
    # manual softmax attention and the original's lead-by-lead decoding loop, same weights and masks:
    # the same loss, reconstruction and gradients (fp32; only the summation order differs)
    torch.manual_seed(0)
    ours = StMemMae(SIZES[size])
    plain = _bench().plain_copy(ours)
    series = real_windows[:2] if size == "small" else real_windows

    torch.manual_seed(1)
    latent, mask, ids_restore = ours.forward_encoder(series, 0.75)
    pred = ours.forward_decoder(latent, ids_restore)
    loss = ours.loss(series, pred, mask)
    loss.backward()
    torch.manual_seed(1)
    ref_loss, ref_pred, ref_mask = plain.forward_all(series, 0.75)
    ref_loss.backward()

    torch.testing.assert_close(mask, ref_mask, rtol=0, atol=0)
    torch.testing.assert_close(pred, ref_pred, rtol=1e-4, atol=1e-5)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    ref_params = dict(plain.named_parameters())
    for name, p in ours.named_parameters():
        if p.grad is None:
            assert ref_params[name].grad is None, name
            continue
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-3, atol=1e-6, msg=name)


def test_cpu_attention_is_sdpa():
    torch.manual_seed(0)
    for shape in [(2, 6, 108, 64), (24, 4, 32, 64)]:
        q, k, v = (torch.randn(shape) for _ in range(3))
        torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_noise_fixes_the_masks(real_windows: torch.Tensor):
    torch.manual_seed(0)
    mae = StMemMae(TINY)
    noise = torch.rand(4, 12, 30)
    assert mae(real_windows, noise=noise).item() == mae(real_windows, noise=noise.clone()).item()
    assert mae(real_windows, noise=noise).item() != mae(real_windows, noise=torch.rand(4, 12, 30)).item()
    # the kept patches are those of the smallest noise, per lead
    x = torch.arange(30, dtype=torch.float32)[None, None, :, None].expand(4, 12, 30, 1)
    kept, mask, _ = StMemMae.random_masking(x, 0.75, noise)
    smallest = noise.argsort(dim=2)[..., :7]
    torch.testing.assert_close(kept[..., 0], smallest.float())
    assert torch.equal(mask == 0, torch.zeros_like(mask, dtype=torch.bool).scatter(2, smallest, True))


def test_fidelity_details():
    """methods.md 1.2-1.3, checked against the original code: norms, init, mask rounding, sizes."""
    torch.manual_seed(0)
    mae = StMemMae(SIZES["small"])
    assert mae.decoder_norm.eps == 1e-6  # the MAE's norm_layer: LayerNorm(eps=1e-6)
    assert mae.encoder.norm.eps == 1e-5  # the ViT's own LayerNorms keep the default
    assert all(m.eps == 1e-5 for n, m in mae.encoder.named_modules() if isinstance(m, torch.nn.LayerNorm))
    assert mae.to_patch_embedding is mae.encoder.to_patch_embedding
    for name, m in mae.named_modules():
        if isinstance(m, torch.nn.Linear):  # xavier-uniform weights, zero biases
            bound = math.sqrt(6.0 / (m.in_features + m.out_features))
            assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.9 * bound, name
            assert m.bias is None or not m.bias.any(), name
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and not m.bias.any(), name
    for p in [mae.encoder.sep_embedding, mae.mask_embedding, *mae.encoder.lead_embeddings]:
        assert 0.01 < float(p.detach().std()) < 0.03  # N(0, 0.02)
    block = mae.decoder_blocks[0]  # 4 heads x 64 = 256, MLP 4 x 256
    assert block.attn.fn.heads == 4 and block.attn.fn.to_qkv.out_features == 3 * 256
    assert block.ff.fn.net[0].out_features == 1024
    assert len(mae.decoder_blocks) == 4
    with torch.device("meta"):
        base = StMemMae(SIZES["base"])
    decoder = sum(p.numel() for n, p in base.named_parameters() if not n.startswith("encoder."))
    assert round(decoder / 1e6, 2) == 3.38  # ViT-B/75's decoder (methods.md 1.3)
    assert int(30 * (1 - 0.75)) == 7  # kept per lead: 23/30 masked
    _, mask, _ = StMemMae.random_masking(torch.zeros(1, 12, 30, 1), 0.75)
    assert torch.all(mask.sum(dim=2) == 23)
