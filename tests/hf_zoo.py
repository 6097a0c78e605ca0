"""Tiny Hugging Face transformers for the tests, built from configs (never downloaded) and
trained for a few hundred steps on real text: the Python standard library's docstrings as
byte-level token ids (vocabulary 256).

Used only by tests (and benches); bitplan itself never imports ``transformers``: a user exports
the model to ``.pt2`` and bitplan reads that.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

VOCAB = 256  # byte-level ids
# stdlib modules whose docstrings make the corpus (plain English prose about code)
_CORPUS_MODULES = ("json/__init__.py", "textwrap.py", "collections/__init__.py", "string.py",
                   "functools.py", "argparse.py", "pathlib/__init__.py", "pathlib.py",
                   "inspect.py", "dataclasses.py", "shutil.py")


def docstring_bytes() -> bytes:
    """The docstrings of a fixed list of stdlib modules, joined by blank lines."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    for rel in _CORPUS_MODULES:
        path = root / rel
        if not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    parts.append(doc)
    return "\n\n".join(parts).encode("utf-8")


def token_windows(n: int, seq: int, seed: int, offset: int = 0) -> torch.Tensor:
    """``n`` windows of ``seq`` byte ids, int64 [n, seq], drawn from the corpus after
    ``offset`` (disjoint offsets give disjoint train / calibration text)."""
    data = torch.frombuffer(bytearray(docstring_bytes()), dtype=torch.uint8).to(torch.int64)
    half = len(data) // 2
    part = data[:half] if offset == 0 else data[half:]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(part) - seq, (n,), generator=g)
    return torch.stack([part[s : s + seq] for s in starts.tolist()])


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def llama(hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          tied: bool = False, intermediate: int | None = None, vocab: int = VOCAB,
          positions: int = 64) -> nn.Module:
    """A Llama-style decoder (RMSNorm, rotary, SDPA causal, gated MLP, GQA); ``intermediate``
    defaults to 2 x hidden. (bench/transformer.py builds its 30M-parameter model here too.)"""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden,
                      intermediate_size=intermediate or 2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=positions,
                      tie_word_embeddings=tied, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


def bert(hidden: int = 32, layers: int = 2, heads: int = 4) -> nn.Module:
    """A BERT-style encoder (no pooler): outputs the last hidden state [N, T, hidden]."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=2 * hidden,
                     max_position_embeddings=64, attn_implementation="sdpa")
    return BertModel(cfg, add_pooling_layer=False)


def gpt2(hidden: int = 32, layers: int = 2, heads: int = 4) -> nn.Module:
    """GPT-2 (its projections are ``Conv1D``: addmm with an [in, out] weight)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_layer=layers, n_head=heads,
                     n_positions=64, attn_implementation="sdpa")
    return GPT2LMHeadModel(cfg)


class CausalLM(nn.Module):
    """``forward(input_ids) -> logits`` [N, T, V] of a ``*ForCausalLM``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


class Encoder(nn.Module):
    """``forward(input_ids, attention_mask) -> [N, hidden]``: mean of the last hidden state
    over the unmasked tokens (a sentence embedding)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class TokenEncoder(nn.Module):
    """``forward(input_ids) -> [N, T, hidden]``: an encoder's last hidden state per token
    (no padding: every token attends to every other). Wraps ``Encoder.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state


def train_causal(model: nn.Module, steps: int = 200, seq: int = 32, batch: int = 16,
                 lr: float = 3e-3, seed: int = 0) -> CausalLM:
    """Next-byte prediction on the docstrings (single-threaded, so the same on any CPU)."""
    torch.manual_seed(seed)
    lm = CausalLM(model)
    ids = token_windows(steps * batch, seq + 1, seed=seed)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr)
    lm.train()
    with _one_thread():
        for step in range(steps):
            chunk = ids[step * batch : (step + 1) * batch]
            logits = lm(chunk[:, :-1])
            loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                               chunk[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return lm.eval()


def train_encoder(model: nn.Module, steps: int = 200, seq: int = 32, batch: int = 16,
                  lr: float = 3e-3, seed: int = 0) -> Encoder:
    """Masked-byte prediction (15 % of the bytes replaced by 0, predicted through a linear
    head that is dropped afterwards); returns the mean-pooled encoder."""
    torch.manual_seed(seed)
    enc = Encoder(model)
    hidden = model.config.hidden_size
    head = nn.Linear(hidden, VOCAB)
    ids = token_windows(steps * batch, seq, seed=seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=lr)
    enc.train()
    with _one_thread():
        for step in range(steps):
            chunk = ids[step * batch : (step + 1) * batch]
            masked = torch.rand(chunk.shape, generator=g) < 0.15
            inp = chunk.masked_fill(masked, 0)
            h = model(input_ids=inp, attention_mask=torch.ones_like(inp)).last_hidden_state
            loss = nn.functional.cross_entropy(head(h[masked]), chunk[masked])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return enc.eval()


def export(model: nn.Module, example: tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension on every input."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes = tuple({0: batch} for _ in example)
    with torch.no_grad():
        return torch.export.export(model.eval(), example, dynamic_shapes=shapes)


def save(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> Path:
    torch.export.save(export(model, example), str(path))
    return path


@functools.cache
def trained_llama(tied: bool = False, steps: int = 100) -> CausalLM:
    """The tiny Llama-style decoder trained once per process (seconds)."""
    torch.manual_seed(0)
    return train_causal(llama(tied=tied), steps=steps)


@functools.cache
def trained_bert(steps: int = 100) -> Encoder:
    torch.manual_seed(0)
    return train_encoder(bert(), steps=steps)


def calibration_ids(n: int = 48, seq: int = 32, seed: int = 1) -> torch.Tensor:
    """Held-out text (the corpus half no model trained on) as int64 [n, seq]."""
    return token_windows(n, seq, seed=seed, offset=1)
