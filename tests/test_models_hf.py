"""Hugging Face parity: small random GPT2LMHeadModel / BertForMaskedLM / ViTMAEForPreTraining
built locally (no download), loaded with from_hf, compared in float32 eval mode.

All HF parameters are re-drawn from N(0, 0.2) (LayerNorms around 1) so that no weight is at
a trivial init (zeros, ones) that a wrong mapping could match by accident. Tolerance 1e-5:
both sides compute the same float32 formulas in a different order (~1e-6 observed).
"""

from __future__ import annotations

import logging

import pytest
import torch

import python_models as pm

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

TOL = dict(rtol=1e-5, atol=1e-5)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * r if "norm" in name.lower() and name.endswith("weight") else 0.2 * r)


def hf_mae_sincos(grid: int, dim: int) -> torch.Tensor | None:
    """ViT-MAE's own fixed position embeddings (whichever transformers version is installed)."""
    mod = transformers.models.vit_mae.modeling_vit_mae
    if hasattr(mod, "build_2d_sinusoidal_position_embedding"):  # transformers >= 5
        pe = mod.build_2d_sinusoidal_position_embedding(grid, grid, embed_dim=dim, cls_token=True)
        half = dim // 2  # rotated to the pretrained checkpoints' layout, as ViT-MAE does
        return torch.cat([pe[..., half:], pe[..., :half]], dim=-1).float()
    if hasattr(mod, "get_2d_sincos_pos_embed"):  # transformers 4.x
        return torch.from_numpy(mod.get_2d_sincos_pos_embed(dim, grid, add_cls_token=True)).float()
    return None


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_gpt2_parity(activation):
    cfg = transformers.GPT2Config(
        vocab_size=97,
        n_positions=32,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=48,
        activation_function=activation,
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    randomize(hf)
    ours = pm.from_hf(hf, backend="eager").eval()
    assert ours.config.activation == {"gelu_new": "gelu_tanh", "gelu": "gelu"}[activation]
    ids = torch.randint(0, 97, (3, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
        out = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, **TOL)


def test_gpt2_unsupported_option_is_refused():
    cfg = transformers.GPT2Config(
        vocab_size=11,
        n_positions=8,
        n_embd=8,
        n_layer=1,
        n_head=2,
        scale_attn_by_inverse_layer_idx=True,
    )
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx: expected False"):
        pm.from_hf(transformers.GPT2LMHeadModel(cfg))


def test_bert_parity():
    cfg = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=40,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(cfg).eval()
    randomize(hf)
    ours = pm.from_hf(hf, backend="eager").eval()
    assert ours.config.norm_eps == 1e-12 and ours.config.activation == "gelu"
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 99, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5], labels[2, 1] = 7, 8, 9
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        out = ours(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], ref.logits[real], **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    with torch.no_grad():  # no token types: HF uses type 0
        torch.testing.assert_close(ours(ids).logits, hf(input_ids=ids).logits, **TOL)


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_vit_mae_parity(norm_pix, qkv_bias):
    cfg = transformers.ViTMAEConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        image_size=8,
        patch_size=2,
        num_channels=3,
        qkv_bias=qkv_bias,
        decoder_hidden_size=24,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=36,
        mask_ratio=0.75,
        norm_pix_loss=norm_pix,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    hf = transformers.ViTMAEForPreTraining(cfg).eval()
    randomize(hf)
    with torch.no_grad():  # the fixed sin-cos tables, as in a pretrained checkpoint
        hf.vit.embeddings.position_embeddings.copy_(hf_mae_sincos(4, 32)[None])
        hf.decoder.decoder_pos_embed.copy_(hf_mae_sincos(4, 24)[None])
    ours = pm.from_hf(hf, backend="eager").eval()
    assert ours.config.encoder.norm_eps == 1e-12 and ours.config.norm_pix_loss == norm_pix
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 8, 8, generator=g)
    noise = torch.rand(3, 16, generator=g)
    with torch.no_grad():
        ref = hf(pixel_values=images, noise=noise)
        out = ours(images, noise)
    assert torch.equal(out.ids_restore, ref.ids_restore)
    assert torch.equal(out.mask, ref.mask)
    torch.testing.assert_close(out.pred, ref.logits, **TOL)
    torch.testing.assert_close(out.loss, ref.loss, **TOL)
    # HF's patchify/unpatchify order is ours
    assert torch.equal(ours.patchify(images), hf.patchify(images))
    assert torch.equal(ours.unpatchify(ours.patchify(images)), hf.unpatchify(hf.patchify(images)))


def test_our_sincos_is_vit_mae_layout():
    for grid, dim in ((4, 32), (3, 8), (14, 64)):
        want = hf_mae_sincos(grid, dim)
        if want is None:
            pytest.skip("this transformers version exposes no ViT-MAE sin-cos helper")
        got = pm.MAE.from_name(
            "tiny", encoder=dict(image_size=grid * 2, dim=dim)
        ).encoder.pos_embed[0]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_dropout_probabilities_come_over():
    """Loaded models keep Hugging Face's dropout (residual/embedding and attention), so
    fine-tuning regularises alike; eval parity is unaffected (the tests above)."""
    gpt = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=11,
            n_positions=8,
            n_embd=8,
            n_layer=1,
            n_head=2,
            resid_pdrop=0.15,
            embd_pdrop=0.15,
            attn_pdrop=0.2,
        )
    )
    c = pm.from_hf(gpt).config
    assert (c.dropout, c.attn_dropout) == (0.15, 0.2)
    bert = transformers.BertForMaskedLM(
        transformers.BertConfig(
            vocab_size=30,
            hidden_size=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=16,
            max_position_embeddings=16,
            hidden_dropout_prob=0.05,
            attention_probs_dropout_prob=0.3,
        )
    )
    model = pm.from_hf(bert)
    assert (model.config.dropout, model.config.attn_dropout) == (0.05, 0.3)
    assert all(b.attn.dropout == 0.3 for b in model.blocks)
