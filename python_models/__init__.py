"""Models built on the recon_kernels ops: the same weights run on ``backend="eager"`` (the
reference) or on the Triton / CUDA kernels.

Every model is a ``ReconModel``: ``Model(config, backend=None)``, ``Model.from_name("tiny" |
"small" | "base", backend=..., **config_overrides)``, ``model.set_backend(name)``,
``model.save_pretrained(dir)`` / ``Model.from_pretrained(dir)`` (config.json +
model.safetensors; ``load_pretrained(dir)`` picks the class), ``model.config`` a dataclass
with a comment per field. ``forward`` returns a NamedTuple whose first field is ``loss``:

=================  ============================================  ==================================
model              forward(...)                                  returns
=================  ============================================  ==================================
GPT                (idx (B,T), targets=None, attention_mask=None)  GPTOutput(loss, logits (B,T,V))
BERT               (input_ids, attention_mask=None,              BERTOutput(loss | None, logits)
                   token_type_ids=None, labels=None)
MAE                (images (B,C,H,W), noise=None, mask_ratio=None) MAEOutput(loss, pred (B,L,P),
                                                                 mask (B,L), ids_restore (B,L))
Autoencoder        (images)                                      AutoencoderOutput(loss, pred, latent)
SimCLR             (images, views=None)                          SimCLROutput(loss, z1, z2)
ImageGPT           (images)                                      ImageGPTOutput(loss, pred (B,L,P))
=================  ============================================  ==================================

(L = number of patches, P = patch_size² · channels.)

* GPT: targets=None trains next-token prediction on idx itself (HF ``labels=input_ids``);
  ``generate(idx, max_new_tokens, temperature=1.0, top_k=None)``; ``from_hf(GPT2LMHeadModel)``.
* BERT: labels from ``MLMCollator.from_config(cfg)(input_ids)`` (15%, 80/10/10, -100 elsewhere);
  ``features(input_ids, attention_mask)`` -> (B, dim) [CLS] state; ``from_hf(BertForMaskedLM)``.
* Image models (MAE, Autoencoder, SimCLR, ImageGPT) share one encoder class,
  ``vit.ViTEncoder`` configured by ``vit.EncoderConfig`` (the ``encoder`` field of their
  configs): ``model.encoder`` is that module (LoRA-wrap it with
  ``lora.inject_lora(model.encoder, "(qkv|proj|fc1|fc2)")``) and ``model.features(images)``
  -> (B, dim) is its [CLS] (or mean, ``EncoderConfig.pool``) representation on the full
  image. Images are (B, C, H, W) float; the tiny/small presets fit sklearn digits (1x8x8,
  patch 2). ``MAE.from_hf(ViTMAEForPreTraining)``.
* LoRA (``python_models.lora``): ``inject_lora(model, patterns, r=, alpha=, trainable=("head",))``,
  ``merge_lora``/``unmerge_lora``/``unwrap_lora``, ``save_adapters``/``load_adapters``.
"""

from __future__ import annotations

from .autoencoder import Autoencoder, AutoencoderConfig, AutoencoderOutput
from .bert import BERT, BERTConfig, BERTOutput, MLMCollator
from .common import (
    IGNORE_INDEX,
    MODEL_REGISTRY,
    ModelConfig,
    ReconModel,
    load_pretrained,
    set_backend,
)
from .contrastive import SimCLR, SimCLRConfig, SimCLROutput
from .gpt import GPT, GPTConfig, GPTOutput, ImageGPT, ImageGPTConfig, ImageGPTOutput
from .mae import MAE, MAEConfig, MAEOutput, random_masking
from .vit import EncoderConfig, ViTEncoder

__all__ = [
    "BERT",
    "GPT",
    "IGNORE_INDEX",
    "MAE",
    "MODEL_REGISTRY",
    "Autoencoder",
    "AutoencoderConfig",
    "AutoencoderOutput",
    "BERTConfig",
    "BERTOutput",
    "EncoderConfig",
    "GPTConfig",
    "GPTOutput",
    "ImageGPT",
    "ImageGPTConfig",
    "ImageGPTOutput",
    "MAEConfig",
    "MAEOutput",
    "MLMCollator",
    "ModelConfig",
    "ReconModel",
    "SimCLR",
    "SimCLRConfig",
    "SimCLROutput",
    "ViTEncoder",
    "load_pretrained",
    "random_masking",
    "set_backend",
]
