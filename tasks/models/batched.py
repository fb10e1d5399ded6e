"""Train many patterns' forecasters at once: one stacked model per size bucket, vmapped over patterns.

Each pattern keeps its own parameters, data, batch order and early stopping, exactly as `forecast.train`
would run it; only the arithmetic is shared. Patterns are padded to a common node count (a multiple of
`node_multiple`, so padding wastes little), their parameters stacked (`torch.func.stack_module_state`)
and the model called under `torch.func.vmap` with one shared edge list and per-pattern edge weights
(the recipe of `tasks.models.nn.stgcn`). One Adam steps the stacked tensors: Adam is elementwise, so
this equals one Adam per pattern. The summed loss gives each pattern the gradient of its own loss.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from tasks.models.features import CALLS, COUNTS, LATENCIES
from tasks.models.forecast import Prepared, TrainConfig, TrainResult, epoch_batches, make_model, stopping_start
from tasks.models.nn import STGCN, pad_nodes

Forward = Callable[[dict[str, Tensor], dict[str, Tensor], Tensor, Tensor, Tensor], Tensor]


def size_buckets(preps: list[Prepared], node_multiple: int) -> list[tuple[int, list[int]]]:
    """Pattern indices by padded node count (the next multiple of `node_multiple`), smallest first."""
    by_size: dict[int, list[int]] = {}
    for i, prep in enumerate(preps):
        n = prep.x.size(2)
        by_size.setdefault(node_multiple * math.ceil(n / node_multiple), []).append(i)
    return sorted(by_size.items())


@dataclass
class Group:
    """A bucket's data padded to `n_pad` nodes and the longest split (sample masks mark the real ones)."""

    xt: Tensor  # [P, St, W, n, F]
    yt: Tensor  # [P, St, n, F]
    ot: Tensor  # [P, St, n, 2]
    xv: Tensor  # [P, Sv, W, n, F]
    yv: Tensor
    ov: Tensor
    n_train: list[int]
    n_val: list[int]
    node_mask: Tensor  # [P, n]
    edge_index: Tensor  # [2, E] the union of the group's edges (no self-loops: GCNConv adds them)
    edge_weight: Tensor  # [P, E] 1 where the pattern has the edge
    rt_mean: Tensor  # [P, n, 2] normaliser of the log latencies (0 / 1 on padded nodes)
    rt_std: Tensor
    adjacency: Tensor  # [P, n, n] the same graphs as dense normalised matrices

    def graph(self, dense: bool) -> Tensor:
        return self.adjacency if dense else self.edge_weight


def _pad_samples(parts: list[Tensor], n_pad: int, nodes_dim: int) -> Tensor:
    """Stacks per-pattern tensors, zero-padding their sample and node dims."""
    s_max = max(len(t) for t in parts)
    out = parts[0].new_zeros((len(parts), s_max, *parts[0].shape[1:nodes_dim], n_pad, *parts[0].shape[nodes_dim + 1 :]))
    for p, t in enumerate(parts):
        out[p, : len(t), ..., : t.size(nodes_dim), :] = t
    return out


def build_group(preps: list[Prepared], n_pad: int, dev: torch.device, cfg: TrainConfig) -> Group:
    lat = list(LATENCIES)
    pairs = sorted({(s, d) for prep in preps for s, d in prep.edge_index.t().tolist() if s != d})
    edge_index = torch.tensor(pairs, dtype=torch.long).t().reshape(2, -1)
    weight = torch.zeros(len(preps), len(pairs))
    position = {pair: k for k, pair in enumerate(pairs)}
    rt_mean, rt_std = torch.zeros(len(preps), n_pad, len(lat)), torch.ones(len(preps), n_pad, len(lat))
    masks = []
    for p, prep in enumerate(preps):
        for s, d in prep.edge_index.t().tolist():
            if s != d:
                weight[p, position[(s, d)]] = 1.0
        n = prep.x.size(2)
        rt_mean[p, :n] = torch.tensor(prep.norm.mean, dtype=torch.float32)[:, lat]
        rt_std[p, :n] = torch.tensor(prep.norm.std, dtype=torch.float32)[:, lat]
        masks.append(pad_nodes(prep.x[:1], n_pad)[1])

    stops = [stopping_start(len(p.x), p.split, cfg) for p in preps]  # validation: what early stopping watches

    def split(part: str, train: bool) -> Tensor:
        dim = {"x": 2, "y": 1, "offsets": 1}[part]
        tensors = [getattr(p, part)[: p.split] if train else getattr(p, part)[stop:] for p, stop in zip(preps, stops)]
        return _pad_samples(tensors, n_pad, dim).to(dev)

    return Group(
        split("x", True),
        split("y", True),
        split("offsets", True),
        split("x", False),
        split("y", False),
        split("offsets", False),
        [p.split for p in preps],
        [len(p.x) - stop for p, stop in zip(preps, stops)],
        torch.stack(masks).to(dev),
        edge_index.to(dev),
        weight.to(dev),
        rt_mean.to(dev),
        rt_std.to(dev),
        gcn_adjacency(edge_index, weight, n_pad).to(dev),
    )


def batched_loss(
    out: Tensor,
    y: Tensor,
    offsets: Tensor,
    sample_mask: Tensor,
    node_mask: Tensor,
    rt_mean: Tensor,
    rt_std: Tensor,
    cfg: TrainConfig,
) -> Tensor:
    """`forecast.loss_fn` of every pattern [P] over its real samples and nodes only."""
    m = (sample_mask[:, :, None] & node_mask[:, None, :]).to(out.dtype)[..., None]  # [P, B, n, 1]
    log_rate = out[..., list(COUNTS)] + offsets
    counts = y[..., list(COUNTS)]
    terms = (torch.exp(log_rate) - counts * log_rate) * m
    poisson = terms.sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * len(COUNTS))
    calls = y[..., CALLS : CALLS + 1]
    weight = calls / (calls + cfg.rt_weight_calls) * m
    logs = torch.log(torch.clamp(y[..., list(LATENCIES)], min=1e-3))
    rt_obs = torch.nan_to_num((logs - rt_mean[:, None]) / rt_std[:, None], nan=0.0)
    sq = (weight * (out[..., list(LATENCIES)] - rt_obs) ** 2).sum(dim=(1, 2, 3))
    return poisson + sq / weight.sum(dim=(1, 2, 3)).clamp(min=1.0) / len(LATENCIES)


def stacked_forward(base: torch.nn.Module, edge_index: Tensor) -> Forward:
    """vmap over patterns of the base model with each pattern's parameters, edge weights and node mask."""

    def one(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, w: Tensor, m: Tensor) -> Tensor:
        return functional_call(base, (params, buffers), (x, edge_index, w, m))

    return vmap(one, randomness="different")


def gcn_adjacency(edge_index: Tensor, edge_weight: Tensor, n: int) -> Tensor:
    """[P, n, n] GCNConv's normalisation as a dense matrix: D^-1/2 (A + I) D^-1/2, rows the targets."""
    a = edge_weight.new_zeros(edge_weight.size(0), n, n)
    a[:, edge_index[1], edge_index[0]] = edge_weight  # message source -> target: row target, column source
    a = a + torch.eye(n, device=a.device)
    d = a.sum(dim=2).rsqrt()
    return d[:, :, None] * a * d[:, None, :]


def _tconv(params: dict[str, Tensor], name: str, x: Tensor, k: int) -> Tensor:
    """TemporalGatedConv on [P, B, T, n, C] with stacked weights (convolution as one batched matmul)."""
    w = params[f"{name}.conv.weight"][..., 0]  # [P, 2O, C, k]
    pq = torch.einsum("pbtnck,pock->pbtno", x.unfold(2, k, 1), w) + params[f"{name}.conv.bias"][:, None, None, None]
    p, q = pq.chunk(2, dim=-1)
    res = x[:, :, k - 1 :]
    if f"{name}.align.weight" in params:
        align = params[f"{name}.align.weight"][..., 0, 0]
        res = torch.einsum("pbtnc,poc->pbtno", res, align) + params[f"{name}.align.bias"][:, None, None, None]
    elif res.size(-1) < p.size(-1):
        res = F.pad(res, (0, p.size(-1) - res.size(-1)))
    return p * torch.sigmoid(q) + res


def dense_forward(base: STGCN) -> Forward:
    """STGCN's forward for a stack of patterns as batched matmuls, the graph as dense [P, n, n] matrices:
    the same maths (see the tests), ~2x faster on CPU than vmapped gather/scatter message passing."""
    k, blocks, use_graph, dropout = base.kernel_size, base.num_blocks, base.use_graph, base.dropout

    def fwd(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, adj: Tensor, m: Tensor) -> Tensor:
        mask = m.to(x.dtype)[:, None, None, :, None]  # [P, 1, 1, n, 1]
        h = x * mask
        for i in range(blocks):
            b = f"blocks.{i}"
            h = _tconv(params, f"{b}.tconv1", h, k) * mask
            if use_graph:
                h = torch.einsum("pbtnc,poc->pbtno", h, params[f"{b}.spatial.lin.weight"])
                h = torch.einsum("pij,pbtjc->pbtic", adj, h)
            else:
                h = torch.einsum("pbtnc,poc->pbtno", h, params[f"{b}.spatial.weight"])
            h = F.relu(h + params[f"{b}.spatial.bias"][:, None, None, None])
            h = F.layer_norm(_tconv(params, f"{b}.tconv2", h, k), h.shape[-1:])
            h = h * params[f"{b}.norm.weight"][:, None, None, None] + params[f"{b}.norm.bias"][:, None, None, None]
            h = F.dropout(h, p=dropout, training=base.training) * mask
        h = torch.einsum("pbtnc,poct->pbno", h, params["head_conv.weight"][..., 0])
        h = F.relu(h + params["head_conv.bias"][:, None, None])
        out = torch.einsum("pbnc,poc->pbno", h, params["head_lin.weight"]) + params["head_lin.bias"][:, None, None]
        return out * mask[:, :, 0]

    return fwd


@dataclass
class Slot:
    """One pattern's place in a stack: its batch order, position in the epoch and early-stopping state."""

    pattern: int
    gen: torch.Generator
    batches: list[Tensor] = field(default_factory=list)
    best: float = math.inf
    waited: int = 0
    history: list[float] = field(default_factory=list)
    done: bool = False
    patience: int = 20  # `train`'s: cfg.patience from scratch, cfg.warm_patience from a champion


def _next_batches(slots: list[Slot], g: Group, cfg: TrainConfig, dev: torch.device) -> tuple[Tensor, Tensor]:
    """Each slot's next training batch, padded to the longest: sample indices [P, B] and mask [P, B]."""
    for s in slots:
        if not s.batches:  # a new epoch: the same draw as `train` makes from its own generator
            s.batches = epoch_batches(g.n_train[s.pattern], cfg, s.gen)
    taken = [s.batches.pop(0) for s in slots]
    b = max(len(t) for t in taken)
    idx = torch.zeros(len(slots), b, dtype=torch.long)
    mask = torch.zeros(len(slots), b, dtype=torch.bool)
    for i, t in enumerate(taken):
        idx[i, : len(t)], mask[i, : len(t)] = t, True
    return idx.to(dev), mask.to(dev)


class _Stack:
    """The stacked parameters, their Adam, and the best state of every slot still in the stack."""

    def __init__(self, models: list[torch.nn.Module], cfg: TrainConfig) -> None:
        params, self.buffers = stack_module_state(models)
        self.params = {k: v.detach().requires_grad_() for k, v in params.items()}
        self.best = {k: v.detach().clone() for k, v in self.params.items()}
        self.cfg = cfg
        self.opt = torch.optim.Adam(self.params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def keep(self, rows: Tensor) -> None:
        """Drops the other rows (finished patterns) from parameters, Adam moments and best states."""
        old = self.opt
        params = {k: v.detach()[rows].requires_grad_() for k, v in self.params.items()}
        self.opt = torch.optim.Adam(params.values(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        for k, p in params.items():
            state = old.state[self.params[k]]
            if state:
                self.opt.state[p] = {"step": state["step"], **{m: state[m][rows] for m in ("exp_avg", "exp_avg_sq")}}
        self.params = params
        self.buffers = {k: v[rows] for k, v in self.buffers.items()}
        self.best = {k: v[rows] for k, v in self.best.items()}

    def best_state(self, row: int) -> dict[str, Tensor]:
        return {k: v[row].clone() for k, v in (self.best | self.buffers).items()}


def _validate(
    fwd: Forward, stack: _Stack, rows: list[int], g: Group, pats: list[int], cfg: TrainConfig, opts: BatchOptions
) -> list[float]:
    """Validation loss of the given rows (their patterns `pats`), forward in sample chunks."""
    r = torch.tensor(rows, device=g.xv.device)
    pt = torch.tensor(pats, device=g.xv.device)
    with torch.no_grad(), torch.autocast(g.xv.device.type, torch.bfloat16, enabled=opts.bf16):
        params = {k: v[r] for k, v in stack.params.items()}
        buffers = {k: v[r] for k, v in stack.buffers.items()}
        w, m = g.graph(opts.dense)[pt], g.node_mask[pt]
        xv = g.xv[pt]
        out = torch.cat(
            [fwd(params, buffers, xv[:, c : c + cfg.batch_size], w, m) for c in range(0, xv.size(1), cfg.batch_size)], 1
        )
    sample_mask = (
        torch.arange(xv.size(1), device=xv.device)[None, :]
        < torch.tensor([g.n_val[p] for p in pats], device=xv.device)[:, None]
    )
    loss = batched_loss(out.float(), g.yv[pt], g.ov[pt], sample_mask, m, g.rt_mean[pt], g.rt_std[pt], cfg)
    return [float(v) for v in loss]


def train_group(
    preps: list[Prepared],
    n_pad: int,
    cfg: TrainConfig,
    dev: torch.device,
    use_graph: bool,
    opts: BatchOptions,
    inits: list[dict[str, Tensor] | None],
) -> list[TrainResult]:
    """One stack: steps every unfinished pattern each step until all have stopped early or run out of epochs."""
    started = time.perf_counter()
    g = build_group(preps, n_pad, dev, cfg)
    models = []
    for init in inits:  # built exactly as `train` builds its model: same seed, same initial weights
        torch.manual_seed(cfg.seed)
        model = make_model(cfg, use_graph)
        if init is not None:
            model.load_state_dict(init)
        models.append(model.to(dev))
    stack = _Stack(models, cfg)
    base = cast(STGCN, copy.deepcopy(models[0]).to("meta"))  # `make_model` builds an STGCN
    fwd = dense_forward(base) if opts.dense else stacked_forward(base, g.edge_index)
    if opts.compile_model:
        fwd = torch.compile(fwd)
    slots = [
        Slot(p, torch.Generator().manual_seed(cfg.seed), patience=cfg.patience if init is None else cfg.warm_patience)
        for p, init in enumerate(inits)
    ]
    results: dict[int, tuple[dict[str, Tensor], list[float], float]] = {}
    while slots:
        idx, smask = _next_batches(slots, g, cfg, dev)
        pt = torch.tensor([s.pattern for s in slots], device=dev)
        base.train()
        with torch.autocast(dev.type, torch.bfloat16, enabled=opts.bf16):
            out = fwd(stack.params, stack.buffers, g.xt[pt[:, None], idx], g.graph(opts.dense)[pt], g.node_mask[pt])
        yt, ot = g.yt[pt[:, None], idx], g.ot[pt[:, None], idx]
        active = torch.tensor([not s.done for s in slots], device=dev)  # finished rows still in the stack: no gradient
        loss = batched_loss(out.float(), yt, ot, smask, g.node_mask[pt], g.rt_mean[pt], g.rt_std[pt], cfg)
        stack.opt.zero_grad()
        torch.where(active, loss, torch.zeros_like(loss)).sum().backward()
        stack.opt.step()
        ended = [i for i, s in enumerate(slots) if not s.done and not s.batches]
        if ended:
            base.eval()
            vals = _validate(fwd, stack, ended, g, [slots[i].pattern for i in ended], cfg, opts)
            _early_stopping(stack, slots, ended, vals, cfg, results)
        live = [i for i, s in enumerate(slots) if not s.done]
        if len(live) < len(slots) * opts.compact_fraction or not live:
            stack.keep(torch.tensor(live, dtype=torch.long, device=dev))
            slots = [slots[i] for i in live]
    seconds = (time.perf_counter() - started) / len(preps)  # the stack's wall time, shared evenly
    out_results = []
    for p in range(len(preps)):
        state, history, best = results[p]
        model = make_model(cfg, use_graph)
        model.load_state_dict(state)
        params = sum(q.numel() for q in model.parameters())
        out_results.append(TrainResult(model.to(dev), len(history), best, seconds, params, history))
    return out_results


def _early_stopping(
    stack: _Stack,
    slots: list[Slot],
    ended: list[int],
    vals: list[float],
    cfg: TrainConfig,
    results: dict[int, tuple[dict[str, Tensor], list[float], float]],
) -> None:
    """`train`'s rule per slot: keep the best state; stop after `patience` epochs without improvement."""
    improved = []
    for i, val in zip(ended, vals):
        s = slots[i]
        s.history.append(val)
        if val < s.best - 1e-5:
            s.best, s.waited = val, 0
            improved.append(i)
        else:
            s.waited += 1
    if improved:
        r = torch.tensor(improved, device=next(iter(stack.params.values())).device)
        with torch.no_grad():
            for k, v in stack.params.items():
                stack.best[k][r] = v.detach()[r]
    for i in ended:
        s = slots[i]
        if s.waited >= s.patience or len(s.history) >= cfg.max_epochs:
            if math.isinf(s.best):
                raise RuntimeError(f"pattern #{s.pattern}: the validation loss never improved (not finite?)")
            s.done = True
            results[s.pattern] = (stack.best_state(i), s.history, s.best)


@dataclass
class BatchOptions:
    node_multiple: int = 8  # padded node counts: multiples of this (bounds the padding to < 8 nodes)
    max_elements: int = 2**26  # cap on one activation's elements (P * batch * window * nodes * hidden)
    compact_fraction: float = 1.0  # drop finished patterns when fewer than this share of the stack is live
    dense: bool = True  # dense_forward (batched matmuls); False: vmap of the STGCN module itself
    bf16: bool = False
    compile_model: bool = False

    @classmethod
    def for_device(cls, dev: torch.device) -> BatchOptions:
        """bf16 autocast and torch.compile on CUDA; on CPU plain float32 (and exact parity with `train`).
        On CUDA finished patterns are dropped only when a quarter of the stack is done (fewer recompiles)."""
        cuda = dev.type == "cuda"
        return cls(compact_fraction=0.75 if cuda else 1.0, bf16=cuda, compile_model=cuda)


def train_batched(
    preps: list[Prepared],
    cfg: TrainConfig,
    dev: torch.device,
    use_graph: bool = True,
    opts: BatchOptions | None = None,
    inits: list[dict[str, Tensor] | None] | None = None,
) -> list[TrainResult]:
    """`forecast.train` for many patterns of one architecture at once (each from its `inits` weights
    where given, as `train(init=...)`); results in the order of `preps`."""
    opts = opts or BatchOptions.for_device(dev)
    inits = inits or [None] * len(preps)
    results: list[TrainResult | None] = [None] * len(preps)
    for n_pad, idx in size_buckets(preps, opts.node_multiple):
        per_pattern = cfg.batch_size * cfg.window * n_pad * cfg.hidden
        cap = max(1, opts.max_elements // per_pattern)
        for k in range(0, len(idx), cap):
            chunk = idx[k : k + cap]
            group = train_group([preps[i] for i in chunk], n_pad, cfg, dev, use_graph, opts, [inits[i] for i in chunk])
            for i, result in zip(chunk, group):
                results[i] = result
    return [r for r in results if r is not None]
