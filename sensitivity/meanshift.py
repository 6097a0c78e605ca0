"""Weight Omega after bias correction: the share of an option's damage that the correction keeps.

With ``QuantizeConfig.bias_correction`` the checkpoint stores ``b - mu`` for a quantized layer,
``mu_o = E[op(x, dW)]_o`` the mean over the calibration inputs (and every output position /
token) of the output error that the weight error ``dW = Q(W) - W`` causes in output channel
``o`` (``quantize.biascorr``). So the layer is perturbed by ``v = (dW, -mu)`` in (weight, bias)
space, not by ``dW`` alone, and its second-order loss increase is ``1/2 v^T H v``.

Per-channel error energy does not price this: downstream pooling and normalisation weigh a
per-channel constant shift far more than position-varying noise of the same energy (on the
digits CNN the mean is ~25 % of conv2's 4-bit output error energy but removing it cuts the
loss increase ~9x, docs/quality.md). So the share is measured with the Hessian itself, in its
Gauss-Newton form ``H = J^T S J`` (``S = B B^T`` the loss's Hessian in the model's outputs):
for output-space probes ``g = J^T B u`` (Rademacher ``u`` per sample and output, one forward
and backward pass each on ``MeanShiftParams.draw`` samples drawn at random, with a zero
"virtual bias" added to every layer output so ``g`` has a bias part) ``E[(g . v)^2]`` is
``v^T H v`` up to a constant factor (the expectation over the draw is the calibration mean).
With ``a = g_W . dW`` and ``m = g_b . mu`` per probe,

    kept = sum_probes (a - m)^2 / sum_probes a^2      (~ v^T H v / dW^T H dW),

and the weight Omega becomes ``omega * kept``: the estimator's own scale (trace or diagonal)
times the Gauss-Newton ratio of the corrected to the uncorrected perturbation. The ratio of two
sums over the same probes has much less noise than either sum. The constant scale of ``S``
cancels, so ``B u`` is taken unnormalised.

Where the probes come from: the Hutchinson sweep's own output-space probe passes
(``sensitivity.hessian``) are exactly such probes. A pass's backward of ``z`` against ``B u``
(``u`` Rademacher per sample and output) gives ``g = J^T B u`` for every weight, and with a zero
per-channel leaf on every layer output (``prepare(shifts=True)``) for every virtual bias too,
in the same backward. ``hutchinson(directions={layer: dW of every width})`` records
``a = g_W . dW`` per width and ``g_b`` per vector (:func:`kept_from_probes` then needs only
``mu``). Proof that these give the same ratio: ``E_u[(g . v)^2] = v^T J^T B E[u u^T] B^T J v =
v^T J^T S J v`` for any fixed ``v`` (``E[u u^T] = I``), for every ``v`` at once, so the
numerator and denominator are Hutchinson-style estimates of the two Gauss-Newton quadratic
forms from the same vectors; a pass on all samples has ``S`` of the mean loss, a drawn chunk
``S`` of its mean, whose expectation over the draw is the same. The ratio is taken over the
sweep's vectors, K of them (the trace's stopping rule decides K; at most ``max_iter``). A
Rademacher HVP pass (blocks that are not Gauss-Newton exact) gives ``H v`` for a random ``v``,
from which ``d^T H d`` is estimable as ``(v . d)((H v) . d)`` (``E[v v^T] = I``), but for
Gaussian ``v`` its variance is ``(d^T H d)^2 + |d|^2 |H d|^2``, against ``2 (d^T G d)^2`` for
``(g . d)^2`` (Gaussian ``u``; less for Rademacher): the second term is about ``n / r`` times
the first for a layer of ``n`` weights whose Hessian has effective rank ``r`` (at most outputs
x samples), so hundreds of times noisier per probe on a large layer. The kept share of an
HVP-only sweep (``estimator="hvp"``, or no Gauss-Newton-exact block) therefore comes from
:func:`gauss_newton_kept`'s own probe passes.

``mu`` per layer and width comes from :class:`ErrorMoments`: the layer's op is linear in its
input, so ``mu = InputSums.mean_output(dW)`` from the input summed per weight tap over every
calibration sample (``quantize.observe``), with the checkpoint's quantizer
(``quantize.biascorr.weight_delta``, per output channel). The sums are the activation
statistics' own (``ActivationStats.sums``, the same train samples), or, when the sweep observes
no activation statistics, summed by the observer in the activation-error pass. A folded
BatchNorm scales ``dW_o`` and ``mu_o`` by the same per-channel factor (per-channel symmetric
rounding commutes with it), so the unfolded model is used. Grouped quantizers' Omegas take the
per-channel quantizer's ``kept``.

Cost from the sweep: per probe vector one more leaf per layer in the backward and ``D`` dot
products with the weight gradient; ``mu``: one weight-sized product per layer and width (and,
without the activation statistics' sums, one small conv of the batch-summed input per chunk);
memory: the weight errors of every width (``D`` times the weights). :func:`gauss_newton_kept`
(HVP-only sweeps): ``MeanShiftParams.probes`` forward and backward passes of ``draw`` samples
(256 x 16) and the model once more.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from quantize.biascorr import weight_delta
from quantize.data import CalibrationSet
from quantize.graph import GraphLayer, insert_output_modules
from quantize.observe import InputSums, tap_sums


@dataclass(frozen=True)
class MeanShiftParams:
    """The Gauss-Newton ratio's sampling."""

    probes: int = 256  # output-space probes, each on its own drawn samples: with 64 (on
    # every sample) two of the Llama's 15 ratios were 15-30 % off the measured ones and flipped
    # a BOPS plan; 256 chose the plan of the measured ratios (docs/quality.md)
    draw: int = 16  # samples a probe draws (a fixed-batch program: its batch); the ratio's
    # expectation is over the data, so a probe need not see all of it
    seed: int = 0


class ErrorMoments:
    """Per weight width, ``mu = E[op(x, dW)]`` per output channel over every input row it is
    called with (a leaf observer: ``x`` the real rows of the layer's input). The op is linear
    in ``x``, so the observer only sums the input per weight tap (``quantize.observe.tap_sums``:
    one small conv of the batch-summed input) and every width's ``mu`` is one weight-sized
    product at the end (``InputSums.mean_output``); given the job's ``sums`` (the activation
    statistics' pass on the same samples) it needs no calls at all."""

    def __init__(self, layer: GraphLayer, weight: torch.Tensor, bits: Sequence[int],
                 sums: InputSums | None = None,
                 ratios: Mapping[int, torch.Tensor | None] | None = None) -> None:
        self.layer, self.weight, self.bits = layer, weight, tuple(int(b) for b in bits)
        self.sums = sums
        self.ratios = dict(ratios or {})  # {bits: clip ratios} of the quantizer (quantize.clip)
        self._total: torch.Tensor | None = None
        self._count = 0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        total, count = tap_sums(self.layer, x)
        self._total = total if self._total is None else self._total + total
        self._count += count
        self.sums = None  # observed rows replace any given sums

    def mean(self, bits: int) -> torch.Tensor:
        """``mu`` per output channel (float64 ``[out]``)."""
        if int(bits) not in self.bits:
            raise KeyError(f"width {bits} not among {self.bits}")
        sums = self.sums
        if sums is None:
            if self._total is None:
                return torch.zeros(int(self.weight.shape[0]), dtype=torch.float64)
            sums = InputSums(self._total, self._count)
        return sums.mean_output(weight_delta(self.weight, int(bits), None,
                                             self.ratios.get(int(bits)))).cpu()


class _VirtualBias(nn.Module):
    """Adds a zero per-channel bias that requires grad (its gradient: the loss's gradient
    with respect to a constant shift of each output channel)."""

    def __init__(self, channels: int, axis: int) -> None:
        super().__init__()
        self.axis = axis
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        axis = self.axis % y.dim()
        return y + self.bias.to(y.dtype).reshape([-1 if i == axis else 1 for i in range(y.dim())])


def output_factor(z: torch.Tensor, u: torch.Tensor, loss_kind: str) -> torch.Tensor:
    """``B u`` up to a constant, ``B B^T`` the per-sample Hessian of the loss in the outputs
    ``z``: softmax losses ``sqrt(p) u - p (sqrt(p) . u)``, MSE ``u``."""
    if loss_kind == "mse":
        return u
    prob = torch.softmax(z.detach().float(), dim=-1).to(z.dtype)
    root = prob.sqrt()
    return root * u - prob * (root * u).sum(dim=-1, keepdim=True)


def weight_directions(weight: torch.Tensor, bits: Sequence[int],
                      ratios: Mapping[int, torch.Tensor | None] | None = None) -> torch.Tensor:
    """``[len(bits), *weight.shape]``: ``Q_b(W) - W`` per width with the checkpoint's quantizer
    (per output channel, with ``ratios[b]``, the clip ratios, where given), in the weight's
    dtype and on its device (``hutchinson``'s ``directions``)."""
    ratios = ratios or {}
    return torch.stack([weight_delta(weight, int(b), None, ratios.get(int(b))) for b in bits]).to(
        device=weight.device, dtype=weight.dtype)


def kept_from_probes(dots: torch.Tensor, shift_grads: torch.Tensor, bits: Sequence[int],
                     means: Mapping[int, torch.Tensor]) -> dict[int, float]:
    """``{bits: kept}`` from K probes: ``dots[r, i] = g_W,r . dW_{bits[i]}``, ``shift_grads[r]
    = g_b,r`` ([K, out]) and ``means[bits]`` = ``mu`` ([out]): ``sum_r (a_r - g_b,r . mu)^2 /
    sum_r a_r^2`` (1 where no probe reached the weight)."""
    out: dict[int, float] = {}
    for i, b in enumerate(bits):
        a = dots[:, i].double()
        m = shift_grads.double() @ means[int(b)].double().to(shift_grads.device)
        raw = float(a.pow(2).sum())
        out[int(b)] = float((a - m).pow(2).sum()) / raw if raw > 0 else 1.0
    return out


def gauss_newton_kept(
    module: fx.GraphModule,
    layers: Sequence[GraphLayer],
    data: CalibrationSet,
    loss_kind: str,
    means: Mapping[str, Mapping[int, torch.Tensor]],
    chunk: int,
    fixed: bool = False,
    device: torch.device | str = "cpu",
    params: MeanShiftParams | None = None,
    ratios: Mapping[str, Mapping[int, torch.Tensor | None]] | None = None,
    tick: Callable[[], None] | None = None,
) -> dict[str, dict[int, float]]:
    """``{layer: {bits: kept}}`` for every layer in ``means`` (``{bits: mu [out]}``): the
    Gauss-Newton ratio of the corrected perturbation ``(dW, -mu)`` to ``dW`` (module doc);
    ``ratios``: ``{layer: {bits: clip ratios}}`` of the quantizer (None: max|W| scales);
    ``tick()`` after each probe."""
    ratios = ratios or {}
    params = params or MeanShiftParams()
    device = torch.device(device)
    gm = copy.deepcopy(module).to(device)
    named = dict(gm.named_parameters())
    for p in named.values():
        p.requires_grad_(False)
    chosen = [layer for layer in layers if layer.name in means]
    weights = [named[layer.weight] for layer in chosen]
    for w in weights:
        w.requires_grad_(True)
    vbias = {layer.name: _VirtualBias(int(named[layer.weight].shape[0]),
                                      -1 if layer.kind == "linear" else 1) for layer in chosen}
    insert_output_modules(gm, chosen, vbias, "meanshift_bias")
    biases = [vbias[layer.name].bias for layer in chosen]
    bits = {layer.name: sorted(int(b) for b in means[layer.name]) for layer in chosen}
    # per layer the weight errors and shifts of every width stacked: [widths, ...]
    deltas = {layer.name: weight_directions(named[layer.weight], bits[layer.name],
                                            ratios.get(layer.name)).to(device)
              for layer in chosen}
    mus = {layer.name: torch.stack([means[layer.name][b] for b in bits[layer.name]]).to(
        device=device, dtype=named[layer.weight].dtype) for layer in chosen}
    k = params.probes
    a = {layer.name: torch.zeros(len(bits[layer.name]), k, dtype=torch.float64, device=device)
         for layer in chosen}
    m = {name: torch.zeros_like(t) for name, t in a.items()}
    draw = min(chunk if fixed else params.draw, len(data))
    for r in range(k):
        gen = torch.Generator().manual_seed(params.seed * 1_000_003 + r)
        picked = data.subset(torch.randperm(len(data), generator=gen)[:draw])
        for batch in picked.batches(chunk, fixed=fixed):
            b = batch.to(device)
            with torch.enable_grad():
                out = gm(*b.args, **b.kwargs)
                z = (out[0] if isinstance(out, tuple | list) else out)[: b.size]
                u = (torch.randint(0, 2, z.shape, generator=gen) * 2 - 1).to(z)
                grads = torch.autograd.grad(z, weights + biases,
                                            grad_outputs=output_factor(z, u, loss_kind),
                                            allow_unused=True)
            for i, layer in enumerate(chosen):
                gw, gb = grads[i], grads[len(chosen) + i]
                if gw is not None:
                    a[layer.name][:, r] += (deltas[layer.name] * gw).flatten(1).sum(1).double()
                if gb is not None:
                    m[layer.name][:, r] += (mus[layer.name] @ gb).double()
        if tick is not None:
            tick()
    kept: dict[str, dict[int, float]] = {}
    for name, ar in a.items():
        raw = ar.pow(2).sum(1).cpu()
        corrected = (ar - m[name]).pow(2).sum(1).cpu()
        kept[name] = {b: float(c / w) if w > 0 else 1.0
                      for b, c, w in zip(bits[name], corrected, raw, strict=True)}
    return kept


__all__ = ["ErrorMoments", "MeanShiftParams", "gauss_newton_kept", "kept_from_probes",
           "output_factor", "weight_directions"]
