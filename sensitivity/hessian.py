"""Per-layer Hessian traces (weights and input activations) by Hutchinson's estimator.

The loss is the mean over the train calibration set, L = sum_c (n_c / N) L_c over chunks c of
n_c real samples (a fixed-batch program's padded rows are dropped from L_c). Each quantizable
layer's weight W_i and input activation x_i (made a differentiable leaf: a probe module adds a
zero tensor that requires grad, one per chunk) is one block; every estimate below is unbiased
for Tr(H_ii) of every block at once.

Two estimators, chosen per block by ``structure.gauss_newton_exact``:

- output-space probes, for blocks whose Hessian equals the Gauss-Newton block J_i^T S J_i
  exactly (piecewise-linear paths to the logits, or a self-distillation loss at the FP32
  point). With S = B B^T and Rademacher u per sample in output space, g = J^T B u is ONE
  backward pass and ||g_i||^2 has expectation Tr(H_ii) for every block, with no cross-layer
  noise (the term that swamps a joint HVP sweep: on a random ResNet-18 at 200 samples, joint
  HVPs left most layers at 10-80 % relative error where the probes reach 5 %).
- joint Hessian-vector products (pyhessian's ``hessian_vector_product``) for the other blocks:
  one HVP with Rademacher v over all of them gives v_i . (H v)_i with expectation Tr(H_ii)
  (cross blocks have zero mean); v is zero on the probe blocks, which removes their share of
  the cross noise.

Chunks bound memory, not the estimator: a probe vector is the same whatever the chunking (the
weight part drawn once per probe and shared by every chunk, per-sample parts drawn chunk after
chunk from one generator per probe and block), weight gradients are summed over chunks before
their norm is taken and HVP products are summed over chunks; so each sample equals the
one-chunk sample up to float summation order (tested).

Per forward pass, ``vectors_per_pass`` vectors reuse the graph, looped or as one
``torch.autograd.grad(is_grads_batched=True)`` call (``vectorize``).

Stopping rule (pyhessian 0.1's divides by the signed running mean and can stop after two
samples): a block has converged when its running mean is positive and its standard error is
below ``tol`` times the mean. Sampling stops when every block has converged (after
``min_iter`` samples) or at ``max_iter``; a block with a trace near zero or negative can only
stop at ``max_iter`` and is reported as not converged.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pyhessian.utils import group_product, hessian_vector_product
from torch import fx, nn

from quantize.data import Batch, CalibrationSet
from quantize.graph import GraphLayer, insert_input_modules, insert_output_modules

from .convergence import SweepProgress

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, float], None]
LOSS_KINDS = ("cross_entropy", "kl", "mse")
ESTIMATORS = ("auto", "hvp")
SAMPLINGS = ("all", "chunk", "auto")
AUTO_CHECK = 4  # drawn passes before 'auto' compares the modes: on the 30M Llama bench 10
# drawn passes (its min_iter) before switching to 'all' cost 40 % of all's floor
KINDS = ("gn", "hvp")  # output-space probes, joint HVPs


@dataclass(frozen=True)
class HessianConfig:
    """Hutchinson settings.

    ``max_iter``: most Rademacher samples; ``tol``: target relative standard error per block;
    ``min_iter``: samples before the stopping rule may fire (a standard error from a handful of
    samples is itself too noisy to trust); ``batch_size``: samples per forward pass for a
    dynamic-batch program (None: the whole train set; a fixed-batch program always uses its
    export batch); ``vectors_per_pass``: random vectors per forward pass; ``estimator``:
    ``auto`` (output-space probes where exact, HVPs elsewhere) or ``hvp`` (HVPs for every
    block); ``vectorize``: batch the vectors of a pass with vmap (None: on CUDA only);
    ``activations``: also estimate the input-activation traces; ``memory_budget``: bytes a
    pass may use (None: no limit); with ``batch_size`` None the chunk size then comes from
    the budget and a measured per-sample cost (``sensitivity.memory``); ``diagonal``: also
    keep each weight block's Hessian diagonal, from the same probes (one running sum the size
    of the weights per layer, no extra pass); ``sampling``: ``all`` (every probe pass sees every
    train sample, chunk after chunk) or ``chunk`` (each probe pass draws ``draw_size`` samples
    at random, or ``batch_size`` when set, see :func:`hutchinson`).
    """

    max_iter: int = 200
    tol: float = 0.05
    seed: int = 0
    batch_size: int | None = None
    min_iter: int = 10
    vectors_per_pass: int = 8
    estimator: str = "auto"
    vectorize: bool | None = None
    activations: bool = True
    memory_budget: int | None = None
    diagonal: bool = False
    sampling: str = "all"
    draw_size: int = 8  # samples a ``chunk`` pass draws: on ResNet-18 16 left every block's
    # relative se at 0.022 after 6 passes (tol 0.05), so min_iter binds, and time ~ c
    # (bench/sampling.py, docs/benchmarks.md)

    def __post_init__(self) -> None:
        if self.memory_budget is not None and self.memory_budget < 1:
            raise ValueError(f"memory_budget must be positive, got {self.memory_budget}")
        if self.max_iter < 2:
            raise ValueError(f"max_iter must be at least 2, got {self.max_iter}")
        if not 0.0 < self.tol < 1.0:
            raise ValueError(f"tol must be in (0, 1), got {self.tol}")
        if self.min_iter < 2:
            raise ValueError(f"min_iter must be at least 2, got {self.min_iter}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.vectors_per_pass < 1:
            raise ValueError("vectors_per_pass must be at least 1")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if self.draw_size < 1:
            raise ValueError(f"draw_size must be positive, got {self.draw_size}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HessianConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown HessianConfig fields {sorted(unknown)}")
        return cls(**d)


@dataclass
class BlockStats:
    """Running Hutchinson samples of one block's trace."""

    samples: list[float] = field(default_factory=list)
    converged_at: int | None = None  # sample count when the rule first held
    estimator: str = "hvp"  # "output-probe" (Gauss-Newton-exact block) or "hvp"

    @property
    def n(self) -> int:
        return len(self.samples)

    @property
    def mean(self) -> float:
        return math.fsum(self.samples) / self.n if self.samples else 0.0

    @property
    def stderr(self) -> float:
        if self.n < 2:
            return math.inf
        m = self.mean
        var = math.fsum((s - m) ** 2 for s in self.samples) / (self.n - 1)
        return math.sqrt(var / self.n)

    def converged(self, tol: float) -> bool:
        m = self.mean
        return self.n >= 2 and m > 0.0 and self.stderr <= tol * m


@dataclass
class TraceEstimates:
    """Per-layer weight and activation trace statistics after a sweep."""

    weight: dict[str, BlockStats]
    activation: dict[str, BlockStats]
    iterations: int
    method: str
    passes: int
    # weight block -> Hutchinson mean of diag(H_ww) (weight's shape), with HessianConfig.diagonal
    weight_diag: dict[str, torch.Tensor] = field(default_factory=dict)
    sampling: str = "all"  # the mode the estimates come from: "chunk", "all" (or auto's switch)
    # layer -> (g_W . d per output-probe vector and direction [K, directions], g_shift per
    # vector [K, out]): with ``directions`` (see :func:`hutchinson`); empty without
    shift_probes: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class _Leaf(nn.Module):
    """Adds a fresh zero leaf (requires grad) to its input, so d loss / d x is reachable.

    In ``observe`` mode it records min/max of the input's real rows instead (no leaf)."""

    def __init__(self) -> None:
        super().__init__()
        self.leaf: torch.Tensor | None = None
        self.active = False
        self.rows: int | None = None  # real (unpadded) rows of the current chunk
        self.observer: Callable[[torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(x if self.rows is None else x[: self.rows])
        if not self.active:
            return x
        leaf = torch.zeros_like(x, requires_grad=True)
        self.leaf = leaf
        return x + leaf


class _Shift(nn.Module):
    """On a layer's output: when active, adds a fresh zero leaf of one entry per output channel
    (requires grad; a virtual bias), so each backward also gives the gradient with respect to
    a constant shift of every channel (``sensitivity.meanshift``)."""

    def __init__(self, axis: int) -> None:
        super().__init__()
        self.axis = axis  # the output channel axis: 1 (conv), -1 (linear)
        self.active = False
        self.leaf: torch.Tensor | None = None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return y
        axis = self.axis % y.dim()
        shape = (y.shape[axis],) + (1,) * (y.dim() - 1 - axis)  # broadcasts from the right
        self.leaf = torch.zeros(shape, dtype=y.dtype, device=y.device, requires_grad=True)
        return y + self.leaf


@dataclass
class Prepared:
    """A private copy of the module with probes, its weights and the calibration chunks."""

    module: fx.GraphModule
    names: list[str]
    weights: list[torch.Tensor]
    leaves: dict[str, _Leaf]
    chunks: Sequence[Batch]  # a list, or read on demand (CalibrationSet.chunks)
    n_total: int
    loss_kind: str
    data: CalibrationSet  # the train set the chunks come from (``chunk`` sampling draws it)
    fixed: bool  # a fixed-batch program: every chunk is padded to its export batch
    shifts: dict[str, _Shift] = field(default_factory=dict)  # output virtual biases


def prepare(
    module: fx.GraphModule,
    layers: Sequence[GraphLayer],
    data: CalibrationSet,
    loss_kind: str,
    chunk: int,
    fixed: bool,
    device: torch.device,
    shifts: bool = False,
) -> Prepared:
    """Copy ``module`` to ``device``, add input probes, chunk the data. (The self-distillation
    losses' FP32 targets are the copy's own outputs, taken in each forward: nothing per
    sample is kept.) ``shifts``: also a virtual bias on every layer's output (pass-through
    until :func:`hutchinson` is given ``directions``)."""
    if loss_kind not in LOSS_KINDS:
        raise ValueError(f"loss_kind must be one of {LOSS_KINDS}")
    gm = copy.deepcopy(module).to(device)
    params = dict(gm.named_parameters())
    for p in params.values():
        p.requires_grad_(False)
    weights = []
    for layer in layers:
        w = params[layer.weight]
        w.requires_grad_(True)
        weights.append(w)
    leaves = {layer.name: _Leaf() for layer in layers}
    insert_input_modules(gm, list(layers), leaves, "hessian_probe")
    out_shifts = {layer.name: _Shift(-1 if layer.kind == "linear" else 1)
                  for layer in layers} if shifts else {}
    if out_shifts:
        insert_output_modules(gm, list(layers), out_shifts, "hessian_shift")
    chunks = data.chunks(chunk, fixed, device)  # read chunk by chunk when streamed
    return Prepared(gm, [layer.name for layer in layers], weights, leaves, chunks,
                    len(data), loss_kind, data, fixed, out_shifts)


def _output(gm: nn.Module, b: Batch) -> torch.Tensor:
    out = gm(*b.args, **b.kwargs)
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out[: b.size]


def chunk_loss(p: Prepared, i: int) -> torch.Tensor:
    """(n_c / N) * mean loss of chunk ``i`` (padding excluded), so chunk terms sum to L."""
    b = p.chunks[i]
    out = _output(p.module, b)
    if p.loss_kind == "cross_entropy":
        # [N, C] with [N] labels, or [N, T, V] logits with [N, T] targets (-100 not scored)
        loss = F.cross_entropy(out.flatten(0, -2), b.labels[: b.size].reshape(-1))
    elif p.loss_kind == "kl":
        # KL(p_fp32 || q_model) over the last dim, mean over samples (and over tokens for
        # [N, T, V] logits); zero with zero gradient at the FP32 point. The module is the
        # unmodified FP32 copy, so its detached output is the FP32 target.
        target = F.log_softmax(out.detach(), dim=-1)
        loss = F.kl_div(F.log_softmax(out, dim=-1), target, log_target=True,
                        reduction="none").sum(-1).mean()
    else:
        loss = F.mse_loss(out, out.detach())
    return loss * (b.size / p.n_total)


def rademacher(shape: Sequence[int], gen: torch.Generator, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """+-1 entries drawn on the CPU generator (so results do not depend on the device)."""
    v = torch.randint(0, 2, tuple(shape), generator=gen, dtype=torch.int8)
    return (v.to(dtype) * 2 - 1).to(device)


def _hvp_loop(inputs: list[torch.Tensor], grads: list[torch.Tensor],
              vs: list[list[torch.Tensor]], diag: dict[int, torch.Tensor] | None = None,
              ) -> torch.Tensor:
    """[k, blocks] of v_b . (H v)_b, one pyhessian HVP per vector; adds v_b * (H v)_b (the
    Hutchinson diagonal sample) to ``diag[b]`` for the blocks it holds."""
    live = [j for j, g in enumerate(grads) if g.requires_grad]
    out = torch.zeros(len(vs), len(inputs), dtype=torch.float64, device=inputs[0].device)
    for r, v in enumerate(vs):
        if not live:
            break
        try:
            hv = hessian_vector_product([grads[j] for j in live], inputs, [v[j] for j in live])
        except RuntimeError:
            # An input the gradient graph never reaches (its Hessian rows are zero);
            # pyhessian's helper has no allow_unused, so ask autograd directly.
            hv = torch.autograd.grad([grads[j] for j in live], inputs,
                                     grad_outputs=[v[j] for j in live], retain_graph=True,
                                     allow_unused=True)
        for b, (vb, hb) in enumerate(zip(v, hv, strict=True)):
            if hb is not None:
                out[r, b] = group_product([vb], [hb]).double()
                if diag is not None and b in diag:
                    diag[b] += (vb * hb).to(diag[b].dtype)
    return out


def _hvp_batched(inputs: list[torch.Tensor], grads: list[torch.Tensor],
                 vs: list[list[torch.Tensor]], diag: dict[int, torch.Tensor] | None = None,
                 ) -> torch.Tensor:
    """Same as :func:`_hvp_loop` with all k vectors in one vmapped backward."""
    live = [j for j, g in enumerate(grads) if g.requires_grad]
    out = torch.zeros(len(vs), len(inputs), dtype=torch.float64, device=inputs[0].device)
    if not live:
        return out
    stacked = [torch.stack([v[j] for v in vs]) for j in range(len(inputs))]
    hv = torch.autograd.grad([grads[j] for j in live], inputs,
                             grad_outputs=[stacked[j] for j in live], retain_graph=True,
                             allow_unused=True, is_grads_batched=True)
    for b, hb in enumerate(hv):
        if hb is not None:
            prod = stacked[b] * hb
            out[:, b] = prod.flatten(1).sum(1).double()
            if diag is not None and b in diag:
                diag[b] += prod.sum(0).to(diag[b].dtype)
    return out


def _output_factor(p: Prepared, z: torch.Tensor, u: torch.Tensor,
                   prob: torch.Tensor | None) -> torch.Tensor:
    """B u with B B^T = d2L/dz2 for chunk ``i``'s real rows (L the mean loss over N samples).

    Softmax losses (CE, and KL at any target): d2l/dz2 = diag(p) - p p^T = B B^T with
    B = (I - p 1^T) diag(sqrt p), p = softmax(z); so B u = sqrt(p) u - p (sqrt(p) . u).
    MSE (mean over N * d elements): B = sqrt(2 / (N d)) I.
    """
    if p.loss_kind == "mse":
        d = z[0].numel()
        return u * math.sqrt(2.0 / (p.n_total * d))
    root = prob.sqrt()
    bu = root * u - prob * (root * u).sum(dim=-1, keepdim=True)
    per_sample = z[0].numel() // z.shape[-1]  # tokens per sample for [N, T, V] logits
    return bu / math.sqrt(p.n_total * per_sample)


def _forward(p: Prepared, i: int, inputs_for: Sequence[str], activations: bool):
    """Forward of chunk i with activation leaves: (z of the real rows, weight+leaf inputs)."""
    for leaf in p.leaves.values():
        leaf.active = activations
        leaf.leaf = None
    with torch.enable_grad():
        z = _output(p.module, p.chunks[i])
    inputs = list(p.weights)
    if activations:
        inputs += [p.leaves[n].leaf for n in inputs_for]
    return z, inputs


def _probe_grads(z: torch.Tensor, inputs: list[torch.Tensor], ws: list[torch.Tensor],
                 blocks: list[int], batched: bool, extra: Sequence[torch.Tensor] = (),
                 ) -> Iterator[tuple[int | slice, list[torch.Tensor | None]]]:
    """Yields (rows, per-block J_b^T w, then J^T w for each of ``extra``) for the k
    output-space vectors ``ws``: one vmapped backward (rows ``:``, gradients [k, *shape]) or
    one backward per vector (rows r), each yielded before the next is computed so its
    gradients can be reduced and freed."""
    sel = [inputs[b] for b in blocks] + list(extra)
    if batched:
        yield slice(None), list(torch.autograd.grad(
            z, sel, grad_outputs=torch.stack(ws), retain_graph=True, allow_unused=True,
            is_grads_batched=True))
        return
    for r, w in enumerate(ws):
        yield r, list(torch.autograd.grad(z, sel, grad_outputs=w, retain_graph=True,
                                          allow_unused=True))


def _vector_generator(seed: int, kind: str, t: int, block: int) -> torch.Generator:
    """The generator of probe vector ``t`` of ``kind`` for ``block`` (-1: the output space).

    Per-sample vectors (output space, activation leaves) are drawn from it chunk after chunk,
    so a vector's entries do not depend on how the samples are chunked (torch's CPU generator
    gives the same stream for one [N, ...] draw as for consecutive [n_c, ...] draws)."""
    key = ((seed * 1_000_003 + KINDS.index(kind)) * 1_000_003 + t) * 1_000_003 + block + 1
    return torch.Generator().manual_seed(key % (1 << 63))


def _sample_vector(gen: torch.Generator, like: torch.Tensor, rows: int) -> torch.Tensor:
    """Rademacher for the first ``rows`` (real) rows of ``like``, zeros on padding rows."""
    v = rademacher((rows, *like.shape[1:]), gen, like.dtype, like.device)
    if rows < like.shape[0]:
        v = torch.cat([v, v.new_zeros((like.shape[0] - rows, *like.shape[1:]))])
    return v


def _hvp_graph(p: Prepared, i: int, blocks: list[int], n_layers: int,
               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """create_graph gradient of chunk i's loss w.r.t. ``blocks`` (weights, then leaves)."""
    activations = any(b >= n_layers for b in blocks)
    for leaf in p.leaves.values():
        leaf.active = activations
        leaf.leaf = None
    with torch.enable_grad():
        loss = chunk_loss(p, i)
        inputs = [p.weights[b] if b < n_layers else p.leaves[p.names[b - n_layers]].leaf
                  for b in blocks]
        grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs, strict=True)]
    return inputs, grads


def hutchinson(p: Prepared, cfg: HessianConfig, progress: ProgressFn | None = None,
               stage: str = "sensitivity", exact: dict[str, tuple[bool, bool]] | None = None,
               directions: dict[str, torch.Tensor] | None = None) -> TraceEstimates:
    """Hutchinson estimates of every layer's weight (and input-activation) Hessian trace.

    Blocks marked in ``exact`` (H_ii equals its Gauss-Newton block, see ``structure.py``) are
    estimated in output space: for Rademacher u (per sample, in R^C), g = J^T B u is one
    backward pass and ||g_i||^2 is an unbiased estimate of Tr(J_i^T B B^T J_i) = Tr(H_ii) for
    every such block at once, with no cross-layer noise. Other blocks share joint HVPs
    (v zero on the exact blocks). ``cfg.estimator == "hvp"`` sends every block to HVPs.

    Chunks only bound memory: each probe vector is the same whatever the chunking (weight
    vectors are drawn once per probe, per-sample vectors from per-probe generators), weight
    gradients J_w^T B u are summed over chunks before the norm is taken, and HVP products
    v . H_c v are summed over chunks; so every sample equals the one-chunk sample up to float
    summation order. ``progress`` is called after every chunk.

    With ``cfg.sampling == "chunk"`` each probe pass draws its own chunk of c samples (c =
    ``batch_size`` or ``draw_size``, at most N; without replacement within the chunk, a fresh
    seeded draw per pass) and estimates the trace of the chunk's mean-loss Hessian H_c with
    the pass's k vectors. Every sample enters a chunk with probability c / N, so E[H_c] = H,
    and the pass's mean over its k vectors is unbiased for Tr(H_ii); passes are i.i.d. (their
    vectors and chunks are drawn independently), so a block's samples are the pass means and
    their standard error holds both the probe noise and the sampling of data: the stopping
    rule (``min_iter`` counts passes here) sees both. The cost of a pass no longer grows
    with N.

    With ``cfg.diagonal`` the same samples also give each weight block's Hessian diagonal:
    E[g_i * g_i] = diag(J_i^T B B^T J_i) for the output probes (g summed over chunks first),
    E[v_i * (H v)_i] = diag(H_ii) for the HVPs (Rademacher v: E[v v^T] = I); one running sum
    the size of the weights per layer, divided by the block's sample count at the end.

    ``directions`` (``{layer: [D, *weight shape]}``, needs ``prepare(shifts=True)``): every
    output-probe vector's backward also reaches each listed layer's weight and the virtual
    bias on its output (one more leaf per layer: no extra pass), and records ``g_W . d`` for
    each direction ``d`` and the shift gradient ``g_s`` (``TraceEstimates.shift_probes``, one
    row per vector, summed over chunks: the rows of ``g = J^T B u`` for the whole pass's
    loss). Layers whose weight block is an HVP block get it too: ``g`` is a Gauss-Newton probe
    of every layer whatever its own block's estimator. Only output-probe passes record it; a
    sweep without them (``estimator="hvp"``, or no Gauss-Newton-exact block) records none.
    """
    activations = cfg.activations
    n = len(p.names)
    if cfg.estimator == "hvp" or exact is None:
        exact = {name: (False, False) for name in p.names}
    gn_blocks = [i for i, name in enumerate(p.names) if exact[name][0]]
    hvp_blocks = [i for i, name in enumerate(p.names) if not exact[name][0]]
    if activations:
        gn_blocks += [n + i for i, name in enumerate(p.names) if exact[name][1]]
        hvp_blocks += [n + i for i, name in enumerate(p.names) if not exact[name][1]]
    # vmap-batched backward passes pay off on CUDA; on CPU the bench measured no gain on a
    # ResNet (the looped passes already saturate the cores), so the loop is the CPU default.
    batched = cfg.vectorize if cfg.vectorize is not None else p.weights[0].is_cuda
    stats = [BlockStats() for _ in range(2 * n)]
    blocks_of = {"gn": gn_blocks, "hvp": hvp_blocks}
    done = {"gn": 0, "hvp": 0}  # vectors
    taken = {"gn": 0, "hvp": 0}  # samples of each block: vectors, or passes when drawing
    cache: dict[str, Any] = {}  # single chunk: forward graph / create_graph gradient kept
    passes = 0
    whole = (p.chunks, p.n_total)
    draw_size = min(cfg.batch_size or cfg.draw_size, len(p.data))
    # an 'all' pass costs N samples and the rule needs ceil(min_iter / k) of them; a drawn
    # pass costs c and the rule needs min_iter of them
    all_floor = math.ceil(cfg.min_iter / cfg.vectors_per_pass) * len(p.data)
    draw = cfg.sampling == "chunk" or (cfg.sampling == "auto"
                                       and cfg.min_iter * draw_size < all_floor)
    switched = False
    n_chunks = 1 if draw else len(p.chunks)
    shown = SweepProgress()  # the fraction of the projected vectors, never backwards
    live = [kind for kind in KINDS if blocks_of[kind]]
    diag = {b: torch.zeros(p.weights[b].shape, dtype=p.weights[b].dtype,
                           device=p.weights[b].device) for b in range(n)} if cfg.diagonal else {}
    directions = directions or {}
    recorded: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in directions}
    for name in directions:
        p.shifts[name].active = True

    def pending(kind: str) -> bool:
        bl = blocks_of[kind]
        return bool(bl) and done[kind] < cfg.max_iter and (
            taken[kind] < cfg.min_iter or not all(stats[b].converged(cfg.tol) for b in bl))

    def report(kind: str, k: int, c: float) -> None:
        if progress is None:
            return
        progress(stage, shown.update(done, {kind: k * (c + 1) / n_chunks},  # projected total
                                     {x: [stats[b] for b in blocks_of[x]] for x in live}, cfg,
                                     draw))

    while pending("gn") or pending("hvp"):
        passes += 1
        if draw:
            _draw(p, draw_size, cfg.seed, passes - 1)
            cache.clear()
        for kind in KINDS:
            if not pending(kind):
                continue
            bl = blocks_of[kind]
            k = min(cfg.vectors_per_pass, cfg.max_iter - done[kind])
            ts = range(done[kind], done[kind] + k)
            if kind == "hvp":
                total = _hvp_pass(p, bl, n, cfg.seed, ts, batched, cache,
                                  lambda c, kind=kind, k=k: report(kind, k, c), diag)
            else:
                total = _probe_pass(p, bl, n, cfg.seed, ts, batched, cache,
                                    lambda c, kind=kind, k=k: report(kind, k, c), diag,
                                    directions, recorded)
            done[kind] += k
            taken[kind] += 1 if draw else k
            for j, b in enumerate(bl):
                s = stats[b]
                if draw:  # one sample a pass: its vectors share the pass's chunk
                    s.samples.append(float(total[:, j].mean()))
                else:
                    s.samples.extend(total[:, j].tolist())
                if s.converged_at is None and s.n >= cfg.min_iter and s.converged(cfg.tol):
                    s.converged_at = s.n
        if (draw and cfg.sampling == "auto"
                and _drawing_costs_more(stats, blocks_of, taken, cfg, draw_size, all_floor)):
            # the data's spread makes drawn chunks need more samples than whole passes
            # would: start again with every sample in every pass (the drawn samples are
            # dropped, so each estimate stays one mode's i.i.d. mean)
            log.info("sampling: auto switches to all after %d drawn passes", passes)
            draw, switched, n_chunks = False, True, len(whole[0])
            p.chunks, p.n_total = whole
            cache.clear()
            stats = [BlockStats() for _ in range(2 * n)]
            done, taken = {"gn": 0, "hvp": 0}, {"gn": 0, "hvp": 0}
            for d in diag.values():
                d.zero_()
            for rec in recorded.values():
                rec.clear()
    cache.clear()
    p.chunks, p.n_total = whole
    for leaf in p.leaves.values():
        leaf.active, leaf.leaf = False, None
    for shift in p.shifts.values():
        shift.active, shift.leaf = False, None
    if progress is not None:
        progress(stage, 1.0)
    w_stats = {name: stats[i] for i, name in enumerate(p.names)}
    a_stats = {name: stats[n + i] for i, name in enumerate(p.names)} if activations else {}
    for i, name in enumerate(p.names):
        w_stats[name].estimator = "output-probe" if i in gn_blocks else "hvp"
        if activations:
            a_stats[name].estimator = "output-probe" if n + i in gn_blocks else "hvp"
    stuck = [nm for nm, s in [*w_stats.items(), *a_stats.items()] if not s.converged(cfg.tol)]
    if stuck:
        log.info("%d block(s) did not reach tol=%s: %s", len(stuck), cfg.tol, stuck[:10])
    weight_diag = {name: diag[i] / max(done["gn" if i in gn_blocks else "hvp"], 1)
                   for i, name in enumerate(p.names) if i in diag}
    sampled = "chunk" if draw else ("all (auto switched)" if switched else "all")
    shift_probes = {m: (torch.cat([a for a, _ in rec]), torch.cat([g for _, g in rec]))
                    for m, rec in recorded.items() if rec}
    return TraceEstimates(w_stats, a_stats, max(done.values()),
                          "batched" if batched else "loop", passes, weight_diag, sampled,
                          shift_probes)


def _drawing_costs_more(stats: list[BlockStats], blocks_of: dict[str, list[int]],
                        taken: dict[str, int], cfg: HessianConfig, draw_size: int,
                        all_floor: int) -> bool:
    """``auto``: after ``AUTO_CHECK`` drawn passes, whether the drawn passes still needed (the
    largest n * (se / (tol * mean))^2 - n over the blocks, at least what ``min_iter`` asks,
    each a pass of ``draw_size`` samples) cost more samples than ``all`` would at its floor.
    A wrong call costs time, not correctness: both modes are unbiased."""
    n_min = min(taken[kind] for kind in KINDS if blocks_of[kind])
    if n_min < min(AUTO_CHECK, cfg.min_iter):
        return False
    need = float(cfg.min_iter - n_min)
    for b in (b for kind in KINDS for b in blocks_of[kind]):
        s = stats[b]
        if s.converged(cfg.tol):
            continue
        if s.mean <= 0.0:  # only max_iter stops it in either mode
            continue
        need = max(need, s.n * (s.stderr / (cfg.tol * s.mean)) ** 2 - s.n)
    return need * draw_size > all_floor


def _draw(p: Prepared, size: int, seed: int, t: int) -> None:
    """Make ``p``'s one chunk ``size`` train samples drawn at random for probe pass ``t``
    (without replacement; seeded by ``seed`` and ``t`` only); the loss is their mean."""
    n = len(p.data)
    size = min(size, n)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + 7) * 1_000_003 + t)
    idx = torch.randperm(n, generator=gen)[:size].sort().values
    device = p.weights[0].device
    p.chunks = [b.to(device) for b in p.data.subset(idx).batches(size, fixed=p.fixed)]
    p.n_total = size


def _probe_pass(p: Prepared, bl: list[int], n: int, seed: int, ts: range, batched: bool,
                cache: dict[str, Any], tick: Callable[[float], None],
                diag: dict[int, torch.Tensor] | None = None,
                directions: dict[str, torch.Tensor] | None = None,
                recorded: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
                ) -> torch.Tensor:
    """[k, blocks] output-probe samples for probe vectors ``ts``, chunk by chunk; adds the
    squared weight gradients summed over the k vectors to ``diag[b]`` (weight blocks held);
    appends ([k, D] of ``g_W . d``, [k, out] of ``g_shift``) to ``recorded[layer]`` for each
    layer of ``directions`` (both linear in ``g``, so summed over chunks as they come)."""
    diag = diag or {}
    directions = directions or {}
    k, n_chunks = len(ts), len(p.chunks)
    total = torch.zeros(k, len(bl), dtype=torch.float64)
    index = {name: i for i, name in enumerate(p.names)}
    # a tracked layer's weight gradient: its block's when the pass has it, else an extra input
    own = {m: bl.index(index[m]) for m in directions if index[m] in bl}
    more = [m for m in directions if m not in own]
    dots = {m: torch.zeros(k, d.shape[0], dtype=torch.float64) for m, d in directions.items()}
    sgrads: dict[str, torch.Tensor] = {}
    gens = [_vector_generator(seed, "gn", t, -1) for t in ts]
    acc: dict[int, torch.Tensor] = {}  # weight block -> sum over chunks of [k, *shape]
    for c in range(n_chunks):
        if "gn" in cache:
            z, inputs, prob, extra = cache["gn"]
        else:
            z, inputs = _forward(p, c, p.names, any(b >= n for b in bl))
            prob = None if p.loss_kind == "mse" else torch.softmax(z.detach(), dim=-1)
            extra = ([p.weights[index[m]] for m in more]
                     + [p.shifts[m].leaf for m in directions])
            if n_chunks == 1:
                cache["gn"] = (z, inputs, prob, extra)
        ws = [_output_factor(p, z, _sample_vector(g, z, z.shape[0]), prob) for g in gens]
        for rows, every in _probe_grads(z, inputs, ws, bl, batched, extra):
            grads, ex = every[: len(bl)], every[len(bl):]
            for q, m in enumerate(directions):
                gw = grads[own[m]] if m in own else ex[more.index(m)]
                gs = ex[len(more) + q]
                d = directions[m].flatten(1)
                if gw is not None:
                    dots[m][rows] += (gw.flatten(1) @ d.T if batched
                                      else d @ gw.flatten()).double().cpu()
                if gs is not None:
                    gs = gs.reshape(k, -1) if batched else gs.reshape(-1)
                    if m not in sgrads:
                        sgrads[m] = torch.zeros(k, gs.shape[-1], dtype=torch.float64)
                    sgrads[m][rows] += gs.double().cpu()
            for j, (b, g) in enumerate(zip(bl, grads, strict=True)):
                if g is None:
                    continue
                if b >= n or n_chunks == 1:  # activation blocks are disjoint over chunks
                    if b in diag:
                        sq = g.double().pow(2)
                        diag[b] += (sq.sum(0) if batched else sq).to(diag[b].dtype)
                    else:  # one float32 square (cascade sum, ~1e-7): activation gradients
                        sq = g.square()  # are the pass's largest tensors
                    total[rows, j] += (sq.flatten(1).sum(1) if batched else sq.sum()).double().cpu()
                else:
                    if j not in acc:
                        acc[j] = g.new_zeros((k, *inputs[b].shape))
                    acc[j][rows] += g
            del grads, every, ex
            if isinstance(rows, int) and rows + 1 < k:  # a looped vector done: progress moves
                tick(c - 1 + (rows + 1) / k)  # within a pass of a large model
        del z, inputs, prob, ws, extra
        tick(c)
    for j, g in acc.items():
        sq = g.double().pow(2)
        total[:, j] = sq.flatten(1).sum(1).cpu()
        if bl[j] in diag:
            diag[bl[j]] += sq.sum(0).to(diag[bl[j]].dtype)
    if recorded is not None:
        for m, d in dots.items():
            out = sgrads.get(m, torch.zeros(k, int(p.weights[index[m]].shape[0]),
                                            dtype=torch.float64))
            recorded[m].append((d, out))
    return total


def _hvp_pass(p: Prepared, bl: list[int], n: int, seed: int, ts: range, batched: bool,
              cache: dict[str, Any], tick: Callable[[int], None],
              diag: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """[k, blocks] joint-HVP samples v_b . (H v)_b for probe vectors ``ts``, chunk by chunk
    (H = sum_c H_c; the weight part of v is shared by every chunk, so the chunks' v * H_c v
    add up to the diagonal sample v * H v, summed into ``diag[b]`` for weight blocks)."""
    held = {j: diag[b] for j, b in enumerate(bl) if diag and b in diag}
    k, n_chunks = len(ts), len(p.chunks)
    total = torch.zeros(k, len(bl), dtype=torch.float64)
    wv: list[dict[int, torch.Tensor]] = [{} for _ in ts]  # weight vectors, drawn once
    gens = [{b: _vector_generator(seed, "hvp", t, b) for b in bl if b >= n} for t in ts]
    for c in range(n_chunks):
        if "hvp" in cache:
            inputs, grads = cache["hvp"]
        else:
            inputs, grads = _hvp_graph(p, c, bl, n)
            if n_chunks == 1:
                cache["hvp"] = (inputs, grads)
        rows = p.chunks[c].size
        vs = []
        for r, t in enumerate(ts):
            v = []
            for b, x in zip(bl, inputs, strict=True):
                if b >= n:
                    v.append(_sample_vector(gens[r][b], x, rows))
                else:
                    if b not in wv[r]:
                        wv[r][b] = rademacher(x.shape, _vector_generator(seed, "hvp", t, b),
                                              x.dtype, x.device)
                    v.append(wv[r][b])
            vs.append(v)
        total += (_hvp_batched if batched else _hvp_loop)(inputs, grads, vs, held).cpu()
        del inputs, grads, vs
        tick(c)
    return total
