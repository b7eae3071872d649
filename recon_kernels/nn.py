"""Drop-in modules built on the ops."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .ops import causal_attention, conv1d_mlp, lora_linear, masked_softmax_attention
from .ops.lora import merge_lora_
from .reference import ACTIVATIONS


class KVCache:
    """Keys and values of every layer for the tokens decoded so far (causal decoding).

    Buffers (n_layers, B, num_heads, max_len, head_dim) are allocated on the first
    ``update`` (dtype and device of the first keys). ``length`` tokens are cached; a forward
    pass writes its T new tokens into every layer with ``update`` and then calls
    ``advance(T)``. The new queries attend to the cached keys through causal_attention, whose
    mask is aligned bottom-right, so Nq < Nk needs no offset.
    """

    def __init__(self, n_layers: int, max_len: int) -> None:
        if n_layers < 1 or max_len < 1:
            raise ValueError(
                f"KVCache: expected n_layers >= 1 and max_len >= 1, got {n_layers}, {max_len}"
            )
        self.n_layers, self.max_len, self.length = n_layers, max_len, 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, head_dim) after the cached tokens of ``layer``; returns that
        layer's keys and values for all ``length + T`` tokens (strided views)."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer: expected 0..{self.n_layers - 1}, got {layer}")
        B, H, T, hd = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(
                f"kv_cache: {self.length} cached + {T} new tokens exceed max_len={self.max_len}"
            )
        if self.k is None:
            shape = (self.n_layers, B, H, self.max_len, hd)
            self.k = k.new_empty(shape)
            self.v = v.new_empty(shape)
        elif self.k.shape[1:3] != (B, H) or self.k.shape[-1] != hd:
            raise ValueError(
                f"kv_cache: expected keys of shape ({self.k.shape[1]}, {self.k.shape[2]}, T, "
                f"{self.k.shape[-1]}), got {tuple(k.shape)}"
            )
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


class MultiheadAttention(nn.Module):
    """Self-attention with a packed qkv projection, like ``nn.MultiheadAttention`` with
    ``batch_first=True`` but calling the fused ops.

    x: (B, N, E) -> (B, N, E). ``key_padding_mask``: bool (B, N), True = real token
    (the Hugging Face convention, the opposite of nn.MultiheadAttention's).
    ``mask``: bool broadcastable to (B, H, N, N), True = may attend.
    ``causal=True`` uses causal_attention (mask must then be None).
    ``kv_cache=(cache, layer)``: incremental causal decoding; x holds only the new tokens,
    which attend to the cached ones and themselves (causal=True, no masks).
    ``dropout``: on the attention probabilities, in training only (as nn.MultiheadAttention).
    ``deterministic``: passed to the attention op (False: the triton backward, and the cuda
    one on Hopper, may add dQ in a varying order; True: bit-reproducible backwards).
    ``bias`` sets both projections' biases; ``qkv_bias`` / ``proj_bias`` override it per
    projection (GPT-2 and ViT use both, some models only the input one).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        bias: bool = True,
        qkv_bias: bool | None = None,
        proj_bias: bool | None = None,
        causal: bool = False,
        dropout: float = 0.0,
        backend: str | None = None,
        deterministic: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads != 0:
            raise ValueError(
                f"num_heads: expected a divisor of embed_dim={embed_dim}, got {num_heads}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        if not isinstance(deterministic, bool):
            raise ValueError(
                f"deterministic: expected a bool, got {type(deterministic).__name__} "
                f"{deterministic!r}"
            )
        self.dropout, self.deterministic = dropout, deterministic
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.causal, self.backend = causal, backend
        kw = {"device": device, "dtype": dtype}
        qkv_bias = bias if qkv_bias is None else qkv_bias
        proj_bias = bias if proj_bias is None else proj_bias
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=qkv_bias, **kw)
        self.proj = nn.Linear(embed_dim, embed_dim, bias=proj_bias, **kw)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv_cache: tuple[KVCache, int] | None = None,
    ) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x: expected shape (B, N, {self.embed_dim}), got {tuple(x.shape)}")
        B, N, E = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        # views of the packed tensor, no copies: the kernels take any strides
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
        if kv_cache is not None:
            if not self.causal or key_padding_mask is not None or mask is not None:
                raise ValueError(
                    "kv_cache: expected causal attention without key_padding_mask or mask, got "
                    f"causal={self.causal}, key_padding_mask "
                    f"{'given' if key_padding_mask is not None else 'None'}, mask "
                    f"{'given' if mask is not None else 'None'}"
                )
            k, v = kv_cache[0].update(kv_cache[1], k, v)  # (B, H, cached + N, hd)
        p = self.dropout if self.training else 0.0
        if self.causal:
            if mask is not None:
                raise ValueError("mask: must be None when causal=True (use key_padding_mask)")
            y = causal_attention(
                q,
                k,
                v,
                key_padding_mask=key_padding_mask,
                dropout_p=p,
                backend=self.backend,
                deterministic=self.deterministic,
            )
        else:
            y = masked_softmax_attention(
                q,
                k,
                v,
                mask,
                key_padding_mask=key_padding_mask,
                dropout_p=p,
                backend=self.backend,
                deterministic=self.deterministic,
            )
        y = y.transpose(1, 2).reshape(B, N, E)  # (B, N, E)
        return self.proj(y)

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, causal={self.causal}, dropout={self.dropout}, "
            f"backend={self.backend!r}"
        )


class ConvMLP(nn.Module):
    """The transformer MLP act(x W1ᵀ + b1) W2ᵀ + b2 as one fused op (a kernel-size-1 conv).

    x: (..., in_features) -> (..., out_features). Parameters live in ``fc1``/``fc2``
    (nn.Linear layout), so state dicts of Linear-GELU-Linear MLPs load with renamed keys.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        *,
        activation: str = "gelu",
        bias: bool = True,
        backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        out_features = in_features if out_features is None else out_features
        kw = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **kw)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **kw)
        self.activation, self.backend = activation, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv1d_mlp(
            x,
            self.fc1.weight,
            self.fc1.bias,
            self.fc2.weight,
            self.fc2.bias,
            activation=self.activation,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, backend={self.backend!r}"

    @classmethod
    def _from_weights(cls, w1, b1, w2, b2, activation, backend) -> ConvMLP:
        if (b1 is None) != (b2 is None):
            raise ValueError(
                "b1/b2: ConvMLP expects both biases or neither, got "
                f"b1={'None' if b1 is None else 'a tensor'}, b2={'None' if b2 is None else 'a tensor'}"
            )
        hidden, c_in = w1.shape
        m = cls(
            c_in,
            hidden,
            w2.shape[0],
            activation=activation,
            bias=b1 is not None,
            backend=backend,
            device=w1.device,
            dtype=w1.dtype,
        )
        with torch.no_grad():
            m.fc1.weight.copy_(w1)
            m.fc2.weight.copy_(w2)
            if b1 is not None:
                m.fc1.bias.copy_(b1)
                m.fc2.bias.copy_(b2)
        return m

    @classmethod
    def from_linear(
        cls, fc1: nn.Linear, fc2: nn.Linear, activation: str = "gelu", backend: str | None = None
    ) -> ConvMLP:
        """From an nn.Linear pair (fc1: C -> hidden, fc2: hidden -> C_out)."""
        return cls._from_weights(fc1.weight, fc1.bias, fc2.weight, fc2.bias, activation, backend)

    @classmethod
    def from_conv1d(
        cls,
        conv1: nn.Conv1d,
        conv2: nn.Conv1d,
        activation: str = "gelu",
        backend: str | None = None,
    ) -> ConvMLP:
        """From two nn.Conv1d(kernel_size=1) layers, weights (out, in, 1)."""
        for name, c in (("conv1", conv1), ("conv2", conv2)):
            if c.kernel_size != (1,) or c.groups != 1:
                raise ValueError(
                    f"{name}: expected kernel_size=1 and groups=1, got kernel_size={c.kernel_size}, "
                    f"groups={c.groups}"
                )
        return cls._from_weights(
            conv1.weight[..., 0], conv1.bias, conv2.weight[..., 0], conv2.bias, activation, backend
        )

    @classmethod
    def from_hf_conv1d(
        cls,
        c_fc: nn.Module,
        c_proj: nn.Module,
        activation: str = "gelu_tanh",
        backend: str | None = None,
    ) -> ConvMLP:
        """From Hugging Face GPT-2 ``Conv1D`` layers, whose weights are (in, out)."""
        return cls._from_weights(
            c_fc.weight.t(), c_fc.bias, c_proj.weight.t(), c_proj.bias, activation, backend
        )


class LoRALinear(nn.Module):
    """y = base(x) + scaling · B(A(dropout(x))), computed by the fused ``lora_linear`` op.

    Wraps an existing nn.Linear (kept as ``base_layer``); ``lora_A``: Linear(in, r),
    ``lora_B``: Linear(r, out), no biases, peft layout and init (kaiming-uniform A, zero B,
    so the output equals the base layer's at init). scaling = alpha / r, or alpha / sqrt(r)
    with ``use_rslora=True``. ``merge()`` folds the update into the base weight in place,
    ``unmerge()`` takes it out again. With dropout > 0 in training the dropped input only
    feeds the LoRA branch, as in peft, so that path runs unfused (base matmul + small GEMMs).
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float = 1.0,
        dropout: float = 0.0,
        *,
        use_rslora: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        self.base_layer = base
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.backend = backend
        self.merged = False
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged:
            return base(x)
        if self.training and isinstance(self.lora_dropout, nn.Dropout):
            return base(x) + self.scaling * self.lora_B(self.lora_A(self.lora_dropout(x)))
        return lora_linear(
            x,
            base.weight,
            base.bias,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            backend=self.backend,
        )

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scaling · B A, in place in one fused pass. No-op if already merged."""
        if self.merged:
            return
        merge_lora_(
            self.base_layer.weight,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            backend=self.backend,
        )
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scaling · B A, in place (restores W up to two roundings). No-op if not merged."""
        if not self.merged:
            return
        merge_lora_(
            self.base_layer.weight,
            self.lora_A.weight,
            self.lora_B.weight,
            -self.scaling,
            backend=self.backend,
        )
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"
