"""Load Hugging Face ``transformers`` weights into our models (no download here: pass a
model object, e.g. ``GPT2LMHeadModel.from_pretrained(...)`` built wherever it is available).

* GPT-2 (``GPT2LMHeadModel``): Conv1D weights are (in, out) and get transposed; the packed
  c_attn maps to qkv; ``gelu_new`` is the tanh GELU; LayerNorm eps from the config.
* BERT (``BertForMaskedLM``): post-LN, eps 1e-12; query/key/value are concatenated into
  qkv; the MLM decoder is tied to the word embeddings.
* ViT-MAE (``ViTMAEForPreTraining``): the Conv2d patch projection (D, C, p, p) becomes a
  Linear over patchified pixels ordered (p_row, p_col, C); the fixed sin-cos position
  embeddings are copied (ViT-MAE's layout: width coordinate first, zero [CLS] row).
  Both the transformers 4.x (``encoder.layer.N.attention.attention.query``) and 5.x
  (``layers.N.attention.q_proj``) module layouts are read.

``from_hf(hf_model)`` picks the loader from the model's ``config.model_type`` (gpt2, bert,
vit_mae); ``gpt_from_hf`` / ``bert_from_hf`` / ``mae_from_hf`` are the loaders themselves.

The parity tests (tests/test_models_hf.py) compare logits and losses in float32 eval mode.
The dropout probabilities come over too (residual/embedding and attention-probability
dropout; GPT-2's embd_pdrop is taken to equal resid_pdrop), so fine-tuning a loaded model
regularises as the Hugging Face one does.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .models.bert import BERT, BERTConfig
from .models.blocks import Block
from .models.common import ReconModel
from .models.gpt import GPT, GPTConfig
from .models.mae import MAE, MAEConfig
from .models.vit import EncoderConfig

# HF activation name -> ours (those with exactly the same formula)
_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
}


def _activation(name: object, what: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"{what}: expected one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


@torch.no_grad()
def _copy(dst: torch.Tensor | None, src: torch.Tensor | None, name: str) -> None:
    if dst is None or src is None:
        if dst is None and src is None:
            return
        raise ValueError(
            f"{name}: expected both tensors or neither, ours={dst is not None} hf={src is not None}"
        )
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(
            f"{name}: expected shape {tuple(dst.shape)}, got {tuple(src.shape)} from the HF model"
        )
    dst.copy_(src)


def _copy_linear(dst: nn.Linear, w: torch.Tensor, b: torch.Tensor | None, name: str) -> None:
    _copy(dst.weight, w, f"{name}.weight")
    _copy(dst.bias, b, f"{name}.bias")


def _copy_ln(dst: nn.LayerNorm, src: nn.LayerNorm, name: str) -> None:
    if dst.eps != src.eps:
        raise ValueError(f"{name}: expected LayerNorm eps {dst.eps}, got {src.eps}")
    _copy(dst.weight, src.weight, f"{name}.weight")
    _copy(dst.bias, src.bias, f"{name}.bias")


def _bias(m: nn.Module) -> torch.Tensor | None:
    return getattr(m, "bias", None)


def _check_tied(weight: torch.Tensor, emb: torch.Tensor, name: str) -> None:
    if weight.shape != emb.shape or not torch.equal(weight, emb):
        raise ValueError(
            f"{name}: expected output embeddings tied to the input embeddings, got untied weights"
        )


# --------------------------------------------------------------------------- GPT-2


def gpt_from_hf(hf_model: nn.Module, backend: str | None = None) -> GPT:
    """GPT from a transformers ``GPT2LMHeadModel`` (or ``GPT2Model``; the head is tied)."""
    c = hf_model.config
    for flag, want in (("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False)):
        if getattr(c, flag, want) != want:
            raise ValueError(
                f"config.{flag}: expected {want} (not supported), got {getattr(c, flag)}"
            )
    if not getattr(c, "scale_attn_weights", True):
        raise ValueError(
            "config.scale_attn_weights: expected True (1/sqrt(head_dim) scaling), got False"
        )
    cfg = GPTConfig(
        vocab_size=c.vocab_size,
        block_size=c.n_positions,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        mlp_hidden=c.n_inner,
        activation=_activation(c.activation_function, "config.activation_function"),
        norm_eps=c.layer_norm_epsilon,
        dropout=c.resid_pdrop,  # also the embedding dropout (HF's embd_pdrop: the same 0.1)
        attn_dropout=c.attn_pdrop,
    )
    model = GPT(cfg, backend=backend)
    tr = getattr(hf_model, "transformer", hf_model)
    _copy(model.wte.weight, tr.wte.weight, "wte.weight")
    _copy(model.wpe.weight, tr.wpe.weight, "wpe.weight")
    for i, (ours, h) in enumerate(zip(model.blocks, tr.h)):
        p = f"blocks.{i}"
        _copy_ln(ours.ln_1, h.ln_1, f"{p}.ln_1")
        _copy_ln(ours.ln_2, h.ln_2, f"{p}.ln_2")
        # Conv1D stores (in, out): transpose to nn.Linear's (out, in)
        _copy_linear(ours.attn.qkv, h.attn.c_attn.weight.t(), h.attn.c_attn.bias, f"{p}.attn.qkv")
        _copy_linear(ours.attn.proj, h.attn.c_proj.weight.t(), h.attn.c_proj.bias, f"{p}.attn.proj")
        _copy_linear(ours.mlp.fc1, h.mlp.c_fc.weight.t(), h.mlp.c_fc.bias, f"{p}.mlp.fc1")
        _copy_linear(ours.mlp.fc2, h.mlp.c_proj.weight.t(), h.mlp.c_proj.bias, f"{p}.mlp.fc2")
    _copy_ln(model.ln_f, tr.ln_f, "ln_f")
    head = getattr(hf_model, "lm_head", None)
    if head is not None:
        _check_tied(head.weight, tr.wte.weight, "lm_head.weight")
        if head.bias is not None:
            raise ValueError("lm_head.bias: expected no bias (GPT-2), got one")
    return model.to(tr.wte.weight.device)


# --------------------------------------------------------------------------- BERT


def _bert_special_ids(c, vocab: int) -> dict[str, int]:
    """[CLS]/[SEP]/[MASK] ids: from the HF config when set, else bert-base's (101/102/103)
    when they fit the vocabulary, else the last three ids. (Used by MLMCollator only.)"""
    defaults = (101, 102, 103) if vocab > 103 else (vocab - 3, vocab - 2, vocab - 1)
    out = {}
    for key, d in zip(("cls_token_id", "sep_token_id", "mask_token_id"), defaults):
        v = getattr(c, key, None)
        out[key] = int(v) if isinstance(v, int) and 0 <= v < vocab else d
    return out


def bert_from_hf(hf_model: nn.Module, backend: str | None = None) -> BERT:
    """BERT from a transformers ``BertForMaskedLM``."""
    c = hf_model.config
    if getattr(c, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"config.position_embedding_type: expected 'absolute', got {c.position_embedding_type!r}"
        )
    if getattr(c, "is_decoder", False):
        raise ValueError("config.is_decoder: expected False (bidirectional BERT), got True")
    cfg = BERTConfig(
        vocab_size=c.vocab_size,
        max_position=c.max_position_embeddings,
        type_vocab_size=c.type_vocab_size,
        n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads,
        dim=c.hidden_size,
        mlp_hidden=c.intermediate_size,
        activation=_activation(c.hidden_act, "config.hidden_act"),
        norm_eps=c.layer_norm_eps,
        dropout=c.hidden_dropout_prob,
        attn_dropout=c.attention_probs_dropout_prob,
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else 0,
        **_bert_special_ids(c, c.vocab_size),
    )
    model = BERT(cfg, backend=backend)
    bert = hf_model.bert
    emb = bert.embeddings
    _copy(model.tok_emb.weight, emb.word_embeddings.weight, "tok_emb.weight")
    _copy(model.pos_emb.weight, emb.position_embeddings.weight, "pos_emb.weight")
    if model.type_emb is not None:
        _copy(model.type_emb.weight, emb.token_type_embeddings.weight, "type_emb.weight")
    _copy_ln(model.emb_norm, emb.LayerNorm, "emb_norm")
    for i, (ours, layer) in enumerate(zip(model.blocks, bert.encoder.layer)):
        p = f"blocks.{i}"
        sa, so = layer.attention.self, layer.attention.output
        w = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight], dim=0)  # (3*dim, dim)
        b = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias], dim=0)  # (3*dim,)
        _copy_linear(ours.attn.qkv, w, b, f"{p}.attn.qkv")
        _copy_linear(ours.attn.proj, so.dense.weight, so.dense.bias, f"{p}.attn.proj")
        _copy_ln(ours.ln_1, so.LayerNorm, f"{p}.ln_1")
        _copy_linear(
            ours.mlp.fc1,
            layer.intermediate.dense.weight,
            layer.intermediate.dense.bias,
            f"{p}.mlp.fc1",
        )
        _copy_linear(
            ours.mlp.fc2, layer.output.dense.weight, layer.output.dense.bias, f"{p}.mlp.fc2"
        )
        _copy_ln(ours.ln_2, layer.output.LayerNorm, f"{p}.ln_2")
    pred = hf_model.cls.predictions
    _copy_linear(
        model.mlm_dense, pred.transform.dense.weight, pred.transform.dense.bias, "mlm_dense"
    )
    _copy_ln(model.mlm_norm, pred.transform.LayerNorm, "mlm_norm")
    _check_tied(pred.decoder.weight, emb.word_embeddings.weight, "cls.predictions.decoder.weight")
    bias = pred.decoder.bias if pred.decoder.bias is not None else pred.bias
    _copy(model.mlm_bias, bias, "mlm_bias")
    return model.to(emb.word_embeddings.weight.device)


# --------------------------------------------------------------------------- ViT-MAE


def _vit_layer(layer: nn.Module) -> dict[str, nn.Module]:
    """The parts of a ViT(-MAE) layer under either transformers module layout."""
    att = layer.attention
    if hasattr(att, "q_proj"):  # transformers >= 5
        q, k, v, o = att.q_proj, att.k_proj, att.v_proj, att.o_proj
        fc1, fc2 = layer.mlp.fc1, layer.mlp.fc2
    else:  # transformers 4.x
        q, k, v = att.attention.query, att.attention.key, att.attention.value
        o, fc1, fc2 = att.output.dense, layer.intermediate.dense, layer.output.dense
    return dict(
        q=q, k=k, v=v, o=o, fc1=fc1, fc2=fc2, ln1=layer.layernorm_before, ln2=layer.layernorm_after
    )


def _copy_vit_layer(ours: Block, layer: nn.Module, p: str) -> None:
    m = _vit_layer(layer)
    w = torch.cat([m["q"].weight, m["k"].weight, m["v"].weight], dim=0)  # (3*dim, dim)
    biases = [_bias(m[x]) for x in "qkv"]
    b = None if biases[0] is None else torch.cat(biases, dim=0)  # (3*dim,)
    _copy_linear(ours.attn.qkv, w, b, f"{p}.attn.qkv")
    _copy_linear(ours.attn.proj, m["o"].weight, _bias(m["o"]), f"{p}.attn.proj")
    _copy_linear(ours.mlp.fc1, m["fc1"].weight, _bias(m["fc1"]), f"{p}.mlp.fc1")
    _copy_linear(ours.mlp.fc2, m["fc2"].weight, _bias(m["fc2"]), f"{p}.mlp.fc2")
    _copy_ln(ours.ln_1, m["ln1"], f"{p}.ln_1")
    _copy_ln(ours.ln_2, m["ln2"], f"{p}.ln_2")


def mae_from_hf(hf_model: nn.Module, backend: str | None = None) -> MAE:
    """MAE from a transformers ``ViTMAEForPreTraining``."""
    c = hf_model.config
    image, patch = c.image_size, c.patch_size
    if not isinstance(image, int) or not isinstance(patch, int):
        raise ValueError(
            f"config.image_size/patch_size: expected ints (square), got {image!r}/{patch!r}"
        )
    enc = EncoderConfig(
        image_size=image,
        patch_size=patch,
        in_chans=c.num_channels,
        dim=c.hidden_size,
        depth=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        mlp_hidden=c.intermediate_size,
        activation=_activation(c.hidden_act, "config.hidden_act"),
        norm_eps=c.layer_norm_eps,
        qkv_bias=c.qkv_bias,
        dropout=c.hidden_dropout_prob,
        attn_dropout=c.attention_probs_dropout_prob,
        pool="cls",
    )
    cfg = MAEConfig(
        encoder=enc,
        decoder_dim=c.decoder_hidden_size,
        decoder_depth=c.decoder_num_hidden_layers,
        decoder_heads=c.decoder_num_attention_heads,
        decoder_mlp_hidden=c.decoder_intermediate_size,
        mask_ratio=c.mask_ratio,
        norm_pix_loss=c.norm_pix_loss,
    )
    model = MAE(cfg, backend=backend)
    vit, dec = hf_model.vit, hf_model.decoder
    emb = vit.embeddings
    conv = emb.patch_embeddings.projection  # Conv2d weight (D, C, p, p)
    w = conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1)  # (D, p*p*C) as patchify
    _copy_linear(model.encoder.patch_embed, w, conv.bias, "encoder.patch_embed")
    _copy(model.encoder.cls_token, emb.cls_token, "encoder.cls_token")
    _copy(model.encoder.pos_embed, emb.position_embeddings, "encoder.pos_embed")
    layers = vit.layers if hasattr(vit, "layers") else vit.encoder.layer
    for i, (ours, layer) in enumerate(zip(model.encoder.blocks, layers)):
        _copy_vit_layer(ours, layer, f"encoder.blocks.{i}")
    _copy_ln(model.encoder.norm, vit.layernorm, "encoder.norm")
    _copy_linear(
        model.decoder_embed, dec.decoder_embed.weight, dec.decoder_embed.bias, "decoder_embed"
    )
    _copy(model.mask_token, dec.mask_token, "mask_token")
    _copy(model.decoder_pos_embed, dec.decoder_pos_embed, "decoder_pos_embed")
    for i, (ours, layer) in enumerate(zip(model.decoder_blocks, dec.decoder_layers)):
        _copy_vit_layer(ours, layer, f"decoder_blocks.{i}")
    _copy_ln(model.decoder_norm, dec.decoder_norm, "decoder_norm")
    _copy_linear(model.decoder_pred, dec.decoder_pred.weight, dec.decoder_pred.bias, "decoder_pred")
    return model.to(conv.weight.device)


def from_hf(hf_model: nn.Module, backend: str | None = None) -> ReconModel:
    """Our model with the weights of a transformers model: ``GPT2LMHeadModel`` / ``GPT2Model``
    -> GPT, ``BertForMaskedLM`` -> BERT, ``ViTMAEForPreTraining`` -> MAE."""
    config = getattr(hf_model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in _LOADERS:
        raise ValueError(
            f"hf_model: expected a transformers model with config.model_type in "
            f"{sorted(_LOADERS)}, got {type(hf_model).__name__} (model_type {kind!r})"
        )
    return _LOADERS[kind](hf_model, backend=backend)


_LOADERS = {"gpt2": gpt_from_hf, "bert": bert_from_hf, "vit_mae": mae_from_hf}
