"""BERT: MLM collator statistics, padding, tied head, parity, training, compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import kernel_cases
from test_models_common import assert_kernel_parity, compile_train_step, train_smoke

import python_models as pm


def tiny_bert(**kw) -> pm.BERT:
    torch.manual_seed(0)
    return pm.BERT.from_name("tiny", backend="eager", **kw)


def padded_batch(cfg: pm.BERTConfig, B: int = 3, T: int = 11, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g)
    ids[:, 0] = cfg.cls_token_id
    lengths = [T, 7, 4][:B]
    for b, n in enumerate(lengths):
        ids[b, n - 1] = cfg.sep_token_id
        ids[b, n:] = cfg.pad_token_id
    return ids


def test_collator_statistics():
    cfg = pm.BERTConfig()
    coll = pm.MLMCollator.from_config(cfg)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (256, 128), generator=g)
    ids[:, 0] = cfg.cls_token_id
    ids[:, 100:] = cfg.pad_token_id
    ids[:, 99] = cfg.sep_token_id
    out = coll(ids, generator=g)
    special = torch.isin(ids, torch.tensor(cfg.special_token_ids))
    chosen = out["labels"] != -100
    n = (~special).sum().item()
    k = chosen.sum().item()
    # 15% of the maskable tokens, within 4 binomial standard errors
    assert abs(k / n - 0.15) < 4 * math.sqrt(0.15 * 0.85 / n), k / n
    assert not (chosen & special).any(), "a special token was chosen"
    assert (
        torch.equal(out["labels"][chosen], ids[chosen]) and (out["labels"][~chosen] == -100).all()
    )
    assert torch.equal(out["input_ids"][~chosen], ids[~chosen]), "unchosen tokens must be unchanged"
    masked = (out["input_ids"] == cfg.mask_token_id) & chosen
    kept = (out["input_ids"] == ids) & chosen
    rand = chosen & ~masked & ~kept
    # kept includes random draws that hit the original id (1/vocab of the 10%)
    p_keep = 0.1 + 0.1 / cfg.vocab_size
    for got, p in (
        (masked.sum().item(), 0.8),
        (kept.sum().item(), p_keep),
        (rand.sum().item(), 0.1 - 0.1 / cfg.vocab_size),
    ):
        assert abs(got / k - p) < 4 * math.sqrt(p * (1 - p) / k), (got / k, p)
    assert torch.equal(out["attention_mask"], ids != cfg.pad_token_id)
    assert ids[0, 0] == cfg.cls_token_id, "input modified in place"
    with pytest.raises(ValueError, match="mlm_probability"):
        pm.MLMCollator(10, 3, [0], 0, mlm_probability=0.0)


def test_padding_is_invisible_to_real_tokens():
    model = tiny_bert().eval()
    ids = padded_batch(model.config)
    mask = ids != model.config.pad_token_id
    full = model(ids, attention_mask=mask).logits
    alone = model(ids[1:2, :7]).logits  # row 1 without its padding
    torch.testing.assert_close(full[1:2, :7], alone, rtol=1e-5, atol=1e-5)
    ids2 = ids.clone()
    ids2[2, 5] = 17  # changing a padded position changes no real output
    torch.testing.assert_close(
        model(ids2, attention_mask=mask).logits[2, :4], full[2, :4], rtol=0, atol=0
    )


def test_head_is_tied_and_loss_is_masked_ce():
    model = tiny_bert()
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert not any("decoder" in n for n, _ in model.named_parameters())  # no untied copy
    ids = padded_batch(model.config)
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 2] = 5, 9
    out = model(ids, attention_mask=ids != 256, labels=labels)
    ref = F.cross_entropy(out.logits[labels != -100], labels[labels != -100])
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=0)
    out.loss.backward()
    assert model.tok_emb.weight.grad[5].abs().max() > 0  # through the tied decoder
    assert model(ids).loss is None
    assert model.features(ids).shape == (3, 32)


@pytest.mark.parametrize("backend,device", kernel_cases())
def test_bert_kernel_matches_eager(backend, device):
    model = tiny_bert().to(device)
    cfg = model.config
    ids = padded_batch(cfg)
    batch = pm.MLMCollator(
        cfg.vocab_size, cfg.mask_token_id, cfg.special_token_ids, cfg.pad_token_id, 0.4
    )(ids, generator=torch.Generator().manual_seed(0))
    batch = {k: v.to(device) for k, v in batch.items()}
    types = torch.zeros_like(batch["input_ids"])
    types[:, 5:] = 1
    assert_kernel_parity(model, lambda m: m(**batch, token_type_ids=types), backend)


def test_bert_trains():
    model = tiny_bert()
    ids = padded_batch(model.config, seed=2)
    batch = pm.MLMCollator.from_config(model.config, 0.3)(
        ids, generator=torch.Generator().manual_seed(0)
    )
    first, last = train_smoke(model, lambda m: m(**batch))
    assert last < 0.5 * first, (first, last)


def test_compile_bert_training_step():
    model = tiny_bert()
    ids = padded_batch(model.config)
    batch = pm.MLMCollator.from_config(model.config, 0.3)(
        ids, generator=torch.Generator().manual_seed(0)
    )
    ref = model(**batch).loss.detach()
    loss = compile_train_step(model, lambda m: m(**batch))
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=0)
