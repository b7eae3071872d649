r"""Models built on the recon_kernels ops: the same weights run on ``backend="eager"`` (the
reference) or on the Triton / CUDA kernels.

Every model is a ``ReconModel``: ``Model(config, backend=None)``, ``Model.from_name("tiny" |
"small" | "base", backend=..., **config_overrides)``, ``model.set_backend(name)``,
``model.save_pretrained(dir)`` / ``Model.from_pretrained(dir)`` (config.json +
model.safetensors; ``load_pretrained(dir)`` picks the class), ``model.config`` a dataclass
with a comment per field. ``forward`` returns a NamedTuple whose first field is ``loss``
(so a training loop can do ``loss = model(**batch)[0]``):

* ``GPT.forward(idx (B, T) long, targets=None, attention_mask=None)``
  -> ``GPTOutput(loss, logits (B, T, V))``. targets=None trains next-token prediction on
  idx itself (HF ``labels=input_ids``; padding from attention_mask ignored).
  ``generate(idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
  use_cache=True)`` (KV-cached decoding; ``hidden_states(idx, kv_cache=model.new_cache())``
  continues a cache by hand);
  ``features(idx, attention_mask=None)`` -> (B, n_embd) mean of the final states.
* ``BERT.forward(input_ids, attention_mask=None, token_type_ids=None, labels=None)``
  -> ``BERTOutput(loss or None, logits (B, T, V))``; batches from
  ``MLMCollator.from_config(cfg)(input_ids)`` -> dict(input_ids, labels, attention_mask)
  (15% of non-special tokens, 80/10/10, labels -100 elsewhere);
  ``features(input_ids, attention_mask)`` -> (B, dim) final [CLS] state.
* ``MAE.forward(images (B, C, H, W), noise=None, mask_ratio=None)``
  -> ``MAEOutput(loss, pred (B, L, P), mask (B, L) 1 = masked, ids_restore (B, L))``.
* ``Autoencoder.forward(images)`` -> ``AutoencoderOutput(loss, pred (B, L, P), latent (B, bottleneck))``.
* ``SimCLR.forward(images, views=None)`` -> ``SimCLROutput(loss, z1, z2)`` (two augmentations
  drawn inside unless ``views=(v1, v2)`` is given).
* ``ImageGPT.forward(images)`` -> ``ImageGPTOutput(loss, pred (B, L, P))`` (next-patch regression).

(L = number of patches, P = patch_size² · channels.) ``from_hf(hf_model)`` (python_models.hf):
a ``GPT2LMHeadModel`` -> GPT, ``BertForMaskedLM`` -> BERT, ``ViTMAEForPreTraining`` -> MAE.

Image models (MAE, Autoencoder, SimCLR, ImageGPT) share one encoder class, ``ViTEncoder``,
configured by ``EncoderConfig`` (models/vit.py) (the ``encoder`` field of their configs; give all four
the same one to compare objectives). ``model.encoder`` is that module and
``model.features(images)`` -> (B, dim) its [CLS] (or mean, ``EncoderConfig.pool``)
representation of the full, unmasked image. Images are (B, C, H, W) float; the tiny/small
presets fit sklearn digits (1x8x8, patch 2; patch 4 works too).

LoRA (``python_models.lora``): ``inject_lora(root, patterns, r=8, alpha=16, trainable=())``
wraps the matching nn.Linear layers under ``root`` and freezes every other parameter of
``root``. For a few-shot probe, put encoder and head in one module and inject there:

    clf = nn.ModuleDict({"encoder": mae.encoder, "head": nn.Linear(dim, n_classes)})
    lora.inject_lora(clf, r"encoder\..*(qkv|proj|fc1|fc2)", r=4, trainable=("head",))

then ``merge_lora``/``unmerge_lora``/``unwrap_lora`` and ``save_adapters``/``load_adapters``.

Layout (imports point one way: runs -> data, lora, hf -> models -> recon_kernels):

    models/   common (config, base class, registry), blocks (attention/MLP blocks, shared
              helpers), vit, gpt, bert, mae, autoencoder, contrastive
    data.py   offline data: digits, MNIST IDX, .npz, image folders, text + tokenizers
    lora.py   LoRA injection, merge/unmerge, adapters
    hf.py     Hugging Face weight loading: ``from_hf``
    runs/     config, seeding, tasks, checkpoint, metrics, distributed, train, evaluate,
              claims, stats, report, compare, args, cli (the ``recon`` command)
"""

from __future__ import annotations

from .hf import from_hf
from .models.autoencoder import Autoencoder, AutoencoderConfig, AutoencoderOutput
from .models.bert import BERT, BERTConfig, BERTOutput, MLMCollator
from .models.common import (
    IGNORE_INDEX,
    MODEL_REGISTRY,
    ModelConfig,
    ReconModel,
    load_pretrained,
    set_backend,
)
from .models.contrastive import SimCLR, SimCLRConfig, SimCLROutput
from .models.gpt import GPT, GPTConfig, GPTOutput, ImageGPT, ImageGPTConfig, ImageGPTOutput
from .models.mae import MAE, MAEConfig, MAEOutput, random_masking
from .models.vit import EncoderConfig, ViTEncoder

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
    "from_hf",
    "load_pretrained",
    "random_masking",
    "set_backend",
]
