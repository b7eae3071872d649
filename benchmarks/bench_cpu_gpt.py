"""CPU side by side: our GPT (python_models.GPT on the eager backend) vs nanoGPT, char-level
Tiny Shakespeare with nanoGPT's README CPU settings (4 layers, 4 heads, 128 wide, block 64,
batch 12, AdamW lr 1e-3 with 100 warmup steps and cosine decay to 1e-4 over 2000 steps,
betas (0.9, 0.99), weight decay 0.1, grad clip 1.0, no dropout).

    python benchmarks/bench_cpu_gpt.py [--nanogpt /path/to/nanoGPT] [--steps 300]
        [--full 2000] [--data /path/to/tinyshakespeare.txt]

The models train interleaved, ``--chunk`` steps each in turn (order alternating), so machine
load hits all of them alike; every step is timed (forward, backward, clip, optimizer step;
data loading is the same ``get_batch`` for all and is timed too). Reported: ms/iter median
and [p20, p80] per model, the ratio of medians, and (``--full N``: N steps each from the
same init seed and data stream, then nanoGPT's estimate: 200 random val batches) val loss.

Models: ``ours`` (python_models.GPT on the eager backend with its CPU fast paths, built
with the peer's architecture: exact GELU and ``bias`` as the peer's; ``--gpt2-arch`` keeps
our GPT-2 defaults, tanh GELU and biases), ``ours_reference`` (the eager
backend forced onto reference.py's plain formulas: what it was before the fast paths; skip
with ``--no-reference``), and ``nanogpt`` (its model.py from ``--nanogpt``, bias=False as its
train.py) or, without a checkout, ``plain_torch``: the same architecture in plain PyTorch
(F.scaled_dot_product_attention, nn.GELU, LayerNorm without bias, tied head).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from python_models import GPT, GPTConfig  # noqa: E402

DATA = Path("/work/shared/data/tinyshakespeare.txt")


# --------------------------------------------------------------------------- data


class CharData:
    """nanoGPT's data/shakespeare_char/prepare.py: sorted characters, 90/10 split."""

    def __init__(self, path: Path, block: int, batch: int) -> None:
        text = path.read_text()
        chars = sorted(set(text))
        self.vocab = len(chars)
        stoi = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
        n = int(0.9 * len(ids))
        self.split = {"train": ids[:n], "val": ids[n:]}
        self.block, self.batch = block, batch

    def get_batch(self, split: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.split[split]
        ix = torch.randint(len(d) - self.block, (self.batch,), generator=gen)
        x = torch.stack([d[i : i + self.block] for i in ix.tolist()])
        y = torch.stack([d[i + 1 : i + 1 + self.block] for i in ix.tolist()])
        return x, y


# --------------------------------------------------------------------------- baselines


class _PlainBlock(nn.Module):
    def __init__(self, c: int, nh: int) -> None:
        super().__init__()
        self.nh = nh
        self.ln_1 = nn.LayerNorm(c, bias=False)
        self.c_attn = nn.Linear(c, 3 * c, bias=False)
        self.c_proj = nn.Linear(c, c, bias=False)
        self.ln_2 = nn.LayerNorm(c, bias=False)
        self.fc = nn.Linear(c, 4 * c, bias=False)
        self.proj = nn.Linear(4 * c, c, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.nh, C // self.nh).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.proj(F.gelu(self.fc(self.ln_2(x))))


class PlainGPT(nn.Module):
    """nanoGPT's architecture in plain PyTorch (its model.py with bias=False, dropout 0)."""

    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block, n_embd)
        self.h = nn.ModuleList(_PlainBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for n, p in self.named_parameters():
            if p.dim() >= 2:
                std = (
                    0.02 / math.sqrt(2 * n_layer)
                    if n.endswith(("c_proj.weight", "proj.weight"))
                    else 0.02
                )
                nn.init.normal_(p, std=std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for b in self.h:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def nanogpt_model(path: Path, vocab: int, a) -> nn.Module:
    sys.path.insert(0, str(path))
    import model as ng  # nanoGPT's model.py

    cfg = ng.GPTConfig(
        block_size=a.block,
        vocab_size=vocab,
        n_layer=a.n_layer,
        n_head=a.n_head,
        n_embd=a.n_embd,
        dropout=0.0,
        bias=a.nanogpt_bias,
    )
    m = ng.GPT(cfg)
    m.loss_fn = lambda idx, y: m(idx, y)[1]
    return m


# --------------------------------------------------------------------------- training


def get_lr(it: int, a) -> float:
    """nanoGPT's train.py get_lr."""
    if it < a.warmup:
        return a.lr * (it + 1) / (a.warmup + 1)
    if it > a.decay_steps:
        return a.min_lr
    r = (it - a.warmup) / (a.decay_steps - a.warmup)
    return a.min_lr + 0.5 * (1.0 + math.cos(math.pi * r)) * (a.lr - a.min_lr)


class Runner:
    def __init__(self, name: str, model: nn.Module, loss_fn, data: CharData, a, seed: int):
        self.name, self.model, self.loss_fn, self.data = name, model, loss_fn, data
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=a.lr,
            betas=(0.9, 0.99),
        )
        self.gen = torch.Generator().manual_seed(seed)
        self.it, self.a, self.times = 0, a, []

    def step(self) -> float:
        t0 = time.perf_counter()
        for g in self.opt.param_groups:
            g["lr"] = get_lr(self.it, self.a)
        x, y = self.data.get_batch("train", self.gen)
        loss = self.loss_fn(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.it += 1
        return time.perf_counter() - t0

    @torch.no_grad()
    def val_loss(self, iters: int, seed: int) -> float:
        gen = torch.Generator().manual_seed(seed)
        self.model.eval()
        losses = [self.loss_fn(*self.data.get_batch("val", gen)).item() for _ in range(iters)]
        self.model.train()
        return sum(losses) / len(losses)


def reference_eager():
    """A context in which the eager backend runs reference.py's formulas (no fast paths)."""
    import contextlib
    import importlib

    from recon_kernels.ops import _dispatch

    @contextlib.contextmanager
    def ctx():
        orig = _dispatch.impl

        def impl(backend, family):
            if backend == "eager":
                return importlib.import_module("recon_kernels.reference")
            return orig(backend, family)

        _dispatch.impl = impl
        try:
            yield
        finally:
            _dispatch.impl = orig

    return ctx


def pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", type=Path, default=None, help="nanoGPT checkout (model.py)")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--steps", type=int, default=300, help="timed steps per model")
    ap.add_argument("--warmup-steps", type=int, default=10, help="untimed steps per model")
    ap.add_argument("--chunk", type=int, default=10, help="steps per model per turn")
    ap.add_argument("--full", type=int, default=0, help="train N steps each, then val loss")
    ap.add_argument("--eval-iters", type=int, default=200)
    ap.add_argument(
        "--nanogpt-bias", action="store_true", help="nanoGPT with biases (as our GPT has)"
    )
    ap.add_argument(
        "--gpt2-arch",
        action="store_true",
        help="ours with GPT-2 defaults (gelu_tanh, biases) instead of the peer's architecture",
    )
    ap.add_argument("--no-reference", action="store_true", help="skip ours_reference")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--tag", default="")
    a = ap.parse_args()
    a.block, a.batch, a.n_layer, a.n_head, a.n_embd = 64, 12, 4, 4, 128
    a.lr, a.min_lr, a.warmup, a.decay_steps = 1e-3, 1e-4, 100, 2000
    if a.threads:
        torch.set_num_threads(a.threads)
    data = CharData(a.data, a.block, a.batch)

    # the peer's architecture: nanoGPT's nn.GELU() is the exact erf GELU, and its
    # shakespeare_char config has bias=False; --gpt2-arch keeps our GPT-2 defaults instead
    arch = {} if a.gpt2_arch else {"activation": "gelu", "bias": a.nanogpt_bias}
    runners = []
    torch.manual_seed(a.seed)
    ours = GPT(
        GPTConfig(
            vocab_size=data.vocab,
            block_size=a.block,
            n_layer=a.n_layer,
            n_head=a.n_head,
            n_embd=a.n_embd,
            **arch,
        ),
        backend="eager",
    )
    runners.append(Runner("ours", ours, lambda x, y: ours(x, y).loss, data, a, a.seed))
    ref_ctx = reference_eager()
    if not a.no_reference:
        torch.manual_seed(a.seed)
        ours_ref = GPT(
            GPTConfig(
                vocab_size=data.vocab,
                block_size=a.block,
                n_layer=a.n_layer,
                n_head=a.n_head,
                n_embd=a.n_embd,
                **arch,
            ),
            backend="eager",
        )

        def ref_loss(x, y):
            with ref_ctx():
                return ours_ref(x, y).loss

        r = Runner("ours_reference", ours_ref, ref_loss, data, a, a.seed)
        step = r.step

        def step_ref():  # backward inside the context too
            with ref_ctx():
                return step()

        r.step = step_ref
        runners.append(r)
    torch.manual_seed(a.seed)
    if a.nanogpt is not None:
        base = nanogpt_model(a.nanogpt, data.vocab, a)
        runners.append(Runner("nanogpt", base, base.loss_fn, data, a, a.seed))
    else:
        base = PlainGPT(data.vocab, a.block, a.n_layer, a.n_head, a.n_embd)
        runners.append(Runner("plain_torch", base, lambda x, y: base(x, y)[1], data, a, a.seed))
    peer = runners[-1].name

    total = max(a.steps + a.warmup_steps, a.full)
    rounds = math.ceil(total / a.chunk)
    t_start = time.time()
    for rnd in range(rounds):
        order = runners if rnd % 2 == 0 else runners[::-1]
        for r in order:
            for _ in range(a.chunk):
                if r.it >= total:
                    break
                dt = r.step()
                if a.warmup_steps <= r.it - 1 < a.warmup_steps + a.steps:
                    r.times.append(dt * 1e3)
    wall = time.time() - t_start

    res = {
        "settings": {k: v for k, v in vars(a).items() if not isinstance(v, Path)},
        "data": str(a.data),
        "threads": torch.get_num_threads(),
        "wall_s": round(wall, 1),
        "torch": torch.__version__,
        "peer": peer,
        "ours_arch": arch or "gpt2 (gelu_tanh, bias=True)",
        "models": {},
    }
    for r in runners:
        res["models"][r.name] = {
            "ms_median": round(statistics.median(r.times), 2),
            "ms_p20": round(pct(r.times, 0.2), 2),
            "ms_p80": round(pct(r.times, 0.8), 2),
            "timed_steps": len(r.times),
            "params": sum(p.numel() for p in r.model.parameters()),
        }
        if a.full:
            if r.name == "ours_reference":
                with ref_ctx():
                    vl = r.val_loss(a.eval_iters, a.seed + 1)
            else:
                vl = r.val_loss(a.eval_iters, a.seed + 1)
            res["models"][r.name].update(val_loss=round(vl, 4), trained_steps=r.it)
    pm = res["models"][peer]["ms_median"]
    for m in res["models"].values():
        m["ratio_vs_peer"] = round(m["ms_median"] / pm, 3)
    a.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_cpu_gpt{a.tag}"
    (a.out / f"{stem}.json").write_text(json.dumps(res, indent=1))
    lines = [
        f"CPU GPT, Tiny Shakespeare char, {a.n_layer}L/{a.n_head}H/{a.n_embd}, block "
        f"{a.block}, batch {a.batch}; {a.steps} timed steps each, interleaved in chunks of "
        f"{a.chunk}; torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "| model | ms/iter median [p20, p80] | x peer | val loss |",
        "|---|---|---|---|",
    ]
    for n, m in res["models"].items():
        vl = m.get("val_loss", "")
        lines.append(
            f"| {n} | {m['ms_median']} [{m['ms_p20']}, {m['ms_p80']}] | "
            f"{m['ratio_vs_peer']} | {vl} |"
        )
    (a.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
