"""`keplm kg neighbours`: PEPR (SMedBERT §3.2) top-K neighbours on a Ray actor pool.

The iteration, as the paper writes it::

    V_i = (1 - α) · A · V_{i-1} + α · P

- ``A``: the column-stochastic adjacency of the undirected KG (``adjacency.npz`` of ``kg build``).
  Isolated entities have an all-zero column; the mass that reaches none is sent back along ``P``
  (networkx's rule for dangling nodes), so every ``V_i`` stays a probability vector.
- ``P`` (our reading of "jump probability 1 for the mention, 1/Z for the rest"): ``p_e = 1`` for the
  mention's entity ``m``, ``p_e = 1/Z`` for every other entity, ``P = p / Σp`` (normalised, as networkx
  normalises a personalisation vector).
- ``V_0`` (our reading of eq. 1, garbled in the PDF): ``v_e = t_e / T`` for entities seen in the corpus
  (``t_e`` its linked-mention count, ``T = Σ t``) and ``1 / M`` for unseen ones (``M`` = number of
  pre-training samples, i.e. the prepare stage's segments); ``V_0 = v / Σv``. Without a corpus every
  entity is unseen and ``V_0`` is uniform. ``V_0`` only sets the starting point: the fixed point is the
  same, so it changes the iteration count, not the scores.
- ``α`` (``pepr.alpha``) is the probability of the personalised jump; networkx's ``alpha`` is ``1 - α``.

Two exact solvers of that fixed point, selected by ``pepr.method``; both stop when a rigorous bound on
the max-abs error of every score is below ``pepr.tol``:

- ``power``: the iteration above, for a block of seeds at once (a sparse x dense product per step),
  from ``V_0``. Bound: ``max|V - V*| <= ||V - V*||_1 <= (1-α)/α · ||V_i - V_{i-1}||_1``.
- ``cg`` (default, 3-6x fewer products): linearity gives ``V* ∝ R p`` with ``R = (I - (1-α)A)^{-1}``, and
  ``R p = (1 - 1/Z) R e_m + (1/Z) g`` with ``g = R·1`` computed once. ``Σ R e_m = 1/α`` for a connected
  ``m`` (A is stochastic on its component), ``Σ g`` likewise, so the normaliser is exact and each seed
  needs only ``y = R e_m``. On an undirected graph ``I - (1-α)A = D^{1/2}(I - (1-α)S)D^{-1/2}`` with
  ``S = D^{-1/2} W D^{-1/2}`` symmetric, so ``y`` comes from conjugate gradients on an SPD system whose
  eigenvalues lie in ``[α, 2-α]``. Bound: ``|y_t - y*_t| = sqrt(d_t) · |e_t| <= sqrt(d_t) · ||r||_2 / α``
  (``e`` the error of the symmetrised unknown, ``||e||_2 <= ||r||_2 / λ_min``), and a score moves by at most
  ``α`` times that (its normaliser is at least ``c1/α``), so ``y`` is solved to ``pepr.tol / α`` (less the
  tiny share left to ``g``'s error: ``y_tolerance``). Where every score is returned, ``d_t`` is bounded by
  ``d_max``; a per-seed solve read only at the seed's neighbours, by their largest ``d_t``; the cover solve
  below reads only the entries on the solved entity's edges, and bounds each by its own ``d_t``.
  Deflation (``pepr.deflate``, default on): ``S`` has eigenvalue 1 on each connected component, eigenvector
  ``u ∝ sqrt(d)``, so the right-hand side's part along ``u`` is solved exactly (``/ α``) and CG runs on the rest, where the spectrum starts at the component's floor
  ``1 - (1-α)·λ2(S)`` (``spectral_floors``: exact for small components, Lanczos plus a margin for large ones)
  instead of ``α``; the bound becomes ``sqrt(d_t)·||r||_2 / floor``. On the real KG the floor is 0.44, on
  the synthetic power-law graph 0.64: about a third fewer iterations.
  Entrywise bound (``CGSolver.error_bound``): ``M^{-1} = I + (1-α)S·M^{-1}`` gives, entry by entry,
  ``|e_t| <= ||r||_∞ + c·||r||_2`` with ``c = max((1-α)/(2-α), 1/floor - 1)`` the norm of ``(1-α)S·M^{-1}`` on
  the complement (S's eigenvalues there lie in ``[-1, λ2]``); CG stops on the smaller of the two bounds. A
  residual spread over many entries has ``||r||_∞`` far below ``||r||_2``, so on the synthetic graph the
  bound is 2-2.5x tighter than ``||r||_2/floor`` and most cover columns skip CG's last iteration.
  Sparse start: a unit right-hand side's first Krylov vectors live on the seed's 1- and 2-hop
  neighbourhoods, so those iterations run on sparse vectors (``CGSolver._sparse_start``) and the dense
  products begin at the third: the same iterates, about a third less time per cover solve on the
  synthetic graph (only graphs of at least ``SPARSE_START_MIN_NNZ`` matrix entries take it).

Neighbour candidates of ``m`` are the entities sharing a triple with it (either direction); they are
ranked by PEPR score (ties to 12 decimals: lower id first) and the top ``pepr.k_max`` kept, so any ``K <= k_max`` is a
prefix. When several triples join ``m`` and a neighbour, the relation is that of the first such triple in
``triples.parquet`` order; ``inverse`` says whether that triple is ``(neighbour, r, m)``.

Output (schema version 1): ``neighbours.parquet`` with ``entity``, ``rank`` (0-based), ``neighbour``,
``relation``, ``inverse`` (bool), ``score`` (float64), sorted by ``(entity, rank)``; ids as in the graph's
``entities.parquet`` / ``relations.parquet`` (copied beside it).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components
from pydantic import Field, model_validator

from keplm.kg.graph import Graph, load_graph
from keplm.platform.config import Section
from keplm.platform.console import placement
from keplm.platform.errors import KeplmError
from keplm.platform.faults import exit_once
from keplm.platform.manifest import hash_inputs, read_manifest, write_manifest
from keplm.platform.ray_session import pipelined_calls

log = logging.getLogger(__name__)

NEIGHBOURS_SCHEMA_VERSION = 1
NEIGHBOURS_SCHEMA = pa.schema([
    ("entity", pa.int32()), ("rank", pa.int16()), ("neighbour", pa.int32()), ("relation", pa.int32()),
    ("inverse", pa.bool_()), ("score", pa.float64()),
])


class PEPRConfig(Section):
    alpha: float = Field(0.15, gt=0, lt=1, description="probability of the personalised jump (the paper's α)")
    k_max: int = Field(30, ge=1, description="neighbours kept per entity; any K <= k_max is a prefix")
    tol: float = Field(1e-7, gt=0, description="bound on the max-abs error of every score")
    max_iter: int = Field(1000, ge=1, description="iterations per solve; a solve not converged by then fails the job")
    batch_size: int = Field(256, ge=1, description="at most this many seeds solved together (columns of one dense block)")
    block_mib: float = Field(8, gt=0, description="the dense block's working set per actor is cut to fit this (actors "
                                                   "sharing a last-level cache must not evict each other's vectors)")
    block_min_seeds: int = Field(16, ge=1, description="the cache budget never cuts a block below this many seeds (on a "
                                                       "graph too big for the cache, fewer columns only re-read the "
                                                       "matrix more often)")
    call_blocks: int = Field(4, ge=1, description="blocks per actor call, solved one after another: every call costs "
                                                  "the driver and the actor a Ray round trip (fewer when that would "
                                                  "leave an actor without queued calls)")
    num_actors: int = Field(2, ge=1, description="Ray actors solving blocks of seeds in parallel")
    actor_num_cpus: float = Field(1.0, gt=0, description="CPUs per actor (also the threads of its sparse products)")
    method: Literal["cg", "power"] = Field("cg", description="cg: conjugate gradients on the fixed point; power: "
                                                             "the iteration as written")
    solve: Literal["cover", "seeds"] = Field(
        "cover", description="cg only. cover: solve a vertex cover of the seeds' edges and read the other "
                             "side by symmetry (R[t,m] = d_t/d_m R[m,t]); seeds: one solve per seed")
    deflate: bool = Field(
        True, description="cg only: remove each connected component's known eigenvector from the system, so CG and "
                          "its error bound work on the component's spectral gap (estimated by Lanczos) instead of α")
    dtype: Literal["float64", "float32"] = Field("float64", description="precision of the solves; float32 "
                                                                        "halves memory traffic, needs tol >= 1e-5")
    seeds: Literal["auto", "all", "linked"] = Field(
        "auto", description="auto: entities linked in the corpus when the graph has frequencies, else all")
    actor_restarts: int = Field(3, ge=0, description="times Ray restarts an actor whose process or node died; its "
                                                     "calls in flight are retried there, so the output stays whole")
    fault_at_call: int | None = Field(None, ge=1, description="fault injection (tests): the actor serving its N-th "
                                                              "call exits once, before answering")

    @model_validator(mode="after")
    def _float32_precision(self):
        # below this, float32 round-off can fake convergence of the recursively updated CG residual
        if self.dtype == "float32" and self.tol < 1e-5:
            raise ValueError(f"dtype float32 needs tol >= 1e-5 (got {self.tol}); use float64 for tighter scores")
        return self


# calls the driver keeps queued on each actor (pipelined_calls)
CALL_DEPTH = 4

# dense n x B arrays one block keeps live: CG's x, r, p, A·p, a temporary and its output (the power iteration: fewer)
_BLOCK_ARRAYS = 6


def block_seeds(cfg: PEPRConfig, n: int) -> int:
    """Seeds per block: pepr.batch_size, cut so the block's dense arrays fit pepr.block_mib. Measured on the
    real KG (24.9 K entities, 2 actors on 2 cores sharing a 32 MiB L3): 16-32 seeds gave 1.74-1.85x from 1 to
    2 actors, 64 gave 1.58x, 128 1.59x; a block that spills the shared cache slows both actors down. With
    in-place CG updates, float32 blocks of 28 (16 MiB) gave 1.68x twice, of 16 (8 MiB) 1.74-1.81x. Never
    below pepr.block_min_seeds: on the 275 K-entity synthetic graph (float32) a cover solve took 164 ms in
    blocks of 2 seeds (the budget's cut), 56 ms in blocks of 16, 76 ms in blocks of 64."""
    per_seed = _BLOCK_ARRAYS * n * (4 if cfg.dtype == "float32" else 8)
    fit = max(int(cfg.block_mib * 2**20 // per_seed), cfg.block_min_seeds, 1)
    return min(cfg.batch_size, fit)


def call_groups(items: np.ndarray, block: int, cfg: PEPRConfig) -> list[np.ndarray]:
    """``items`` cut into actor calls of up to ``pepr.call_blocks`` blocks of ``block``: at most as many blocks
    per call as still queues ``CALL_DEPTH`` calls on every actor. On the real KG (618 blocks of 16 seeds, 2
    actors on 2 cores), 155 calls instead of 618 cut the driver's CPU time from 2.0-2.5 s to 1.5-1.7 s per run,
    CPU that two actors on two cores otherwise lose (the host's noise hid any change in wall time)."""
    blocks = -(-len(items) // block)
    per_call = max(1, min(cfg.call_blocks, blocks // (CALL_DEPTH * cfg.num_actors)))
    step = per_call * block
    return [items[i:i + step] for i in range(0, len(items), step)]


class PEPRNoConvergence(KeplmError):
    pass


G_TOL_FACTOR = 1e-3   # g = R·1 is solved to pepr.tol times this


def y_tolerance(tol: float, alpha: float, n: int) -> float:
    """What each R[t, m] must meet for its score to be within tol. A score is (c1·R[t, m] + c2·g_t) / N with
    N >= c1/α, c1 = 1 - 1/n, c2 = 1/n, so its error is at most α·err(R[t, m]) + α·(c2/c1)·err(g_t)."""
    return tol / alpha - G_TOL_FACTOR * tol / max(n - 1, 1)


# ------------------------------------------------------------------------------------ the math


def initial_vector(freq: np.ndarray | None, num_samples: int | None, n: int) -> np.ndarray:
    """V_0 of eq. 1 (see the module docstring for the reading)."""
    if freq is None or freq.sum() == 0:
        return np.full(n, 1.0 / n)
    v = np.where(freq > 0, freq / freq.sum(), 1.0 / max(num_samples or n, 1))
    return v / v.sum()


def personalization(n: int, seed: int) -> np.ndarray:
    p = np.full(n, 1.0 / n)
    p[seed] = 1.0
    return p / p.sum()


def power_block(a: sp.csr_matrix, seeds: np.ndarray, v0: np.ndarray, alpha: float, tol: float,
                max_iter: int, dtype=np.float64) -> tuple[np.ndarray, int]:
    """The paper's iteration for many seeds at once -> (scores Z x B, iterations)."""
    n, b = a.shape[0], len(seeds)
    beta = 1.0 - alpha
    dangling = np.asarray(a.sum(axis=0)).ravel() == 0
    p = np.full((n, b), 1.0 / n, dtype)
    p[seeds, np.arange(b)] = 1.0
    p /= p.sum(axis=0, keepdims=True)
    v = np.repeat(v0.astype(dtype)[:, None], b, axis=1)
    a = a.astype(dtype)
    out = np.empty_like(v)
    active = np.arange(b)
    for it in range(1, max_iter + 1):
        vn = beta * (a @ v + p * v[dangling].sum(axis=0, keepdims=True)) + alpha * p
        change = np.abs(vn - v).sum(axis=0)
        done = beta / alpha * change <= tol
        if done.any():
            out[:, active[done]] = vn[:, done]
            keep = ~done
            active, vn, p = active[keep], vn[:, keep], p[:, keep]
        v = vn
        if len(active) == 0:
            return out, it
    raise PEPRNoConvergence(f"PEPR (power) did not reach tol={tol} in {max_iter} iterations; "
                            f"raise pepr.max_iter or pepr.tol")


# Lanczos' estimate of a component's second eigenvalue of S is raised by this before it sets a floor
SPECTRAL_MARGIN = 0.02
_DENSE_COMPONENT = 256   # components up to this size get their eigenvalues exactly (dense)


def spectral_floors(s: sp.csr_matrix, component: np.ndarray, u: np.ndarray, alpha: float) -> np.ndarray:
    """Per component: a floor of M = I - (1-α)S's spectrum on the complement of its eigenvector u (M u = α u),
    i.e. 1 - (1-α)·λ2 with λ2 the component's second-largest eigenvalue of S. Exact (dense) for components of
    up to 256 entities; for larger ones ARPACK's Lanczos estimate of the largest eigenvalue of S - u uᵀ on the
    component plus ``SPECTRAL_MARGIN`` (a Ritz value approaches the top eigenvalue from below), or α, the
    floor without deflation, when it does not converge. An isolated entity's row is the identity: floor 1."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh

    order = np.argsort(component, kind="stable")
    sizes = np.bincount(component)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    s_sorted = s[order][:, order].astype(np.float64).tocsr()   # each component a diagonal block
    u_sorted = u[order].astype(np.float64)
    floors = np.ones(len(sizes))
    for c in np.flatnonzero(sizes > 1):
        lo, hi = starts[c], starts[c + 1]
        block, uc = s_sorted[lo:hi, lo:hi], u_sorted[lo:hi]
        if hi - lo <= _DENSE_COMPONENT:
            lam2 = np.linalg.eigvalsh(block.toarray())[-2] + 1e-9
        else:
            op = LinearOperator(block.shape, matvec=lambda x, m=block, v=uc: m @ x - v * (v @ x), dtype=np.float64)
            try:
                top = eigsh(op, k=1, which="LA", tol=1e-4, v0=np.random.default_rng(0).random(hi - lo),
                            return_eigenvectors=False)
            except ArpackNoConvergence:
                log.warning("PEPR: Lanczos did not converge on a component of %d entities; it keeps the floor α",
                            hi - lo)
                floors[c] = alpha
                continue
            lam2 = float(top[0]) + SPECTRAL_MARGIN
        floors[c] = 1.0 - (1.0 - alpha) * min(1.0, max(lam2, -1.0))
    return floors


# a unit block's first CG iterations run on sparse vectors while the next product gathers fewer row entries
# than this share of a dense product's: scipy's sparse x sparse product costs 8-12 ns per entry gathered, torch's
# dense one about 0.45 ns per entry and column (275 K synthetic graph, one thread), so the break-even is near
# 0.05. There, iterations 1 and 2 ran sparse (0.003 % and 0.3 % of the dense work), the third would have
# gathered 30 %: 25.6-25.9 instead of 32.3-34.1 ms per cover solve, interleaved A/B
SPARSE_START_WORK = 0.02
# ... and only on graphs whose dense product is costly: on the real KG (0.55 M matrix entries) scipy's per-call
# overhead outweighed the saved products (2.6-2.9 instead of 1.9-2.1 ms per seed), on the synthetic graph
# (8.5 M) the sparse start saved a third
SPARSE_START_MIN_NNZ = 2_000_000


def column_abs_max(r: np.ndarray) -> np.ndarray:
    """max_t |r_tj| per column of a C-order Z x B block. numpy reduces along axis 0 slowly when B is small (11 ms
    for 275 K x 16), so the block is read as rows of 4096 entries (1.1 ms), then folded to B."""
    n, width = r.shape
    k = max(1, 4096 // max(width, 1))
    bulk = (n // k) * k
    out = np.zeros(width, np.float64)
    if bulk:
        wide = r[:bulk].reshape(-1, k * width)
        out = np.maximum(wide.max(axis=0), -wide.min(axis=0)).reshape(k, width).max(axis=0).astype(np.float64)
    if bulk < n:
        out = np.maximum(out, np.abs(r[bulk:]).max(axis=0))
    return out


class CGSolver:
    """Solves (I - (1-α)A) y = rhs for blocks of right-hand sides on the symmetrised system."""

    def __init__(self, a: sp.csr_matrix, degree: np.ndarray, alpha: float, dtype=np.float64, deflate: bool = True,
                 floors: np.ndarray | None = None):
        self.alpha, self.beta = alpha, 1.0 - alpha
        self.n = a.shape[0]
        d = np.maximum(degree, 1).astype(np.float64)  # isolated entities: decoupled identity rows
        self.sqrt_d = np.sqrt(d).astype(dtype)
        self.isolated = degree == 0
        rows = np.repeat(np.arange(self.n), np.diff(a.indptr))
        s_data = (1.0 / np.sqrt(d[rows] * d[a.indices])).astype(dtype)
        # entities renumbered by decreasing degree: the rows of the dense block that most products gather
        # (the hubs') sit together and stay cached (10 % faster sparse x dense products on power-law graphs)
        self.order = np.argsort(-degree, kind="stable")
        self.position = np.empty(self.n, np.int64)
        self.position[self.order] = np.arange(self.n)
        self.s = sp.csr_matrix((s_data, a.indices, a.indptr), shape=a.shape)[self.order][:, self.order]
        self.s.sort_indices()
        # the products go through torch's CSR kernel, on the same buffers: about 30 % faster per cover solve
        # than scipy's csr_matvecs on the 275 K synthetic graph (16-column float32 blocks, one thread)
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # "sparse CSR support is in beta"
            self._s_torch = torch.sparse_csr_tensor(torch.from_numpy(self.s.indptr), torch.from_numpy(self.s.indices),
                                                    torch.from_numpy(self.s.data), size=self.s.shape)
        self.sqrt_d_max = float(np.sqrt(d.max()))
        self.dtype = dtype
        self.row_nnz = np.diff(self.s.indptr)
        self.u_all = np.zeros(self.n, dtype)   # every component's u side by side (they do not overlap)
        # the components (renumbered), their unit eigenvectors u ∝ sqrt(d) (zero on isolated entities, whose
        # rows are the identity) as a components x Z matrix, and the floor of each one's spectrum on u's
        # complement (``spectral_floors``); without deflation, nothing is removed and every floor is α
        if not deflate:
            self.eigvec = sp.csr_matrix((0, self.n), dtype=dtype)
            self.component = np.zeros(self.n, np.int64)
            self.floors = np.array([alpha])
            self.u_max = np.zeros(1)
            return
        _, comp = connected_components(self.s, directed=False)
        self.component = comp
        u = np.where(self.isolated[self.order], 0.0, np.sqrt(d[self.order]))
        norm = np.sqrt(np.bincount(comp, weights=u * u))
        u = np.divide(u, norm[comp], out=np.zeros_like(u), where=norm[comp] > 0)
        self.eigvec = sp.csr_matrix((u.astype(dtype), (comp, np.arange(self.n))), shape=(comp.max() + 1, self.n))
        self.u_all = u.astype(dtype)
        self.floors = spectral_floors(self.s, comp, u, alpha) if floors is None else np.asarray(floors)
        # per component: max u, and its entities in increasing renumbered id, i.e. by decreasing u (u ∝ sqrt(d)
        # and the renumbering is by decreasing degree): the largest u outside a sparse support is its first gap
        self.u_max = np.zeros(len(self.floors))
        np.maximum.at(self.u_max, comp, self.u_all.astype(np.float64))
        self.members = np.argsort(comp, kind="stable")
        self.member_start = np.concatenate([[0], np.cumsum(np.bincount(comp, minlength=len(self.floors)))])

    def solve(self, rhs: np.ndarray, tol, max_iter: int, read_scale=None) -> tuple[np.ndarray, int]:
        """rhs (Z x B) -> (y with |y_t - y*_t| <= tol for every entry t, iterations); tol a scalar or one per column.

        ``read_scale`` (one per column; default ``sqrt(d_max)``): the largest ``sqrt(d_t) · w_t`` over the entries
        ``t`` the caller reads, where ``w_t`` is the factor by which the caller's use of ``y_t`` scales its error.
        A column stops when ``read_scale · error_bound(...) <= tol`` (at most ``||r||_2 / floor``), which bounds each
        read ``w_t · |y_t - y*_t|``; ``floor`` is the least spectral floor of the components (α without deflation)."""
        return self._cg((rhs / self.sqrt_d[:, None]).astype(self.dtype)[self.order], tol, max_iter, read_scale,
                        float(self.floors.min()))

    def solve_units(self, seeds: np.ndarray, tol, max_iter: int, read_scale=None) -> tuple[np.ndarray, int]:
        """solve() for the unit columns e_seed, without a dense right-hand side beside the block; each column's
        error lives in its seed's component, so it stops on that component's floor. The first iterations run on
        sparse vectors (``_sparse_start``) on graphs of at least ``SPARSE_START_MIN_NNZ`` matrix entries."""
        seeds = np.asarray(seeds, np.int64)
        if self.s.nnz >= SPARSE_START_MIN_NNZ:
            b = sp.csr_matrix((1.0 / self.sqrt_d[seeds], (np.arange(len(seeds)), self.position[seeds])),
                              shape=(len(seeds), self.n), dtype=self.dtype)
        else:
            b = np.zeros((self.n, len(seeds)), self.dtype)
            b[self.position[seeds], np.arange(len(seeds))] = 1.0 / self.sqrt_d[seeds]
        return self._cg(b, tol, max_iter, read_scale, self.floors[self.component[self.position[seeds]]])

    def _cg(self, b, tol, max_iter: int, read_scale, floor) -> tuple[np.ndarray, int]:
        """CG on the renumbered symmetric system from x = 0; b (renumbered, Z x B dense, or B x Z sparse for
        ``_sparse_start``) becomes the residual.

        Deflation: M = I - (1-α)S has M u = α u for each component's u, so b's part along the u's is solved
        exactly (coefficient / α) and CG runs on the rest, where M's spectrum starts at the component's floor
        instead of α: fewer iterations, and ``||e||_2 <= ||r||_2 / floor``. The solution is projected off the
        u's at the end, so round-off that leaked into them cannot add an error the bound does not see."""
        import torch

        width = b.shape[0] if sp.issparse(b) else b.shape[1]
        tol = np.broadcast_to(np.asarray(tol, np.float64), (width,))
        scale = np.broadcast_to(np.asarray(self.sqrt_d_max if read_scale is None else read_scale, np.float64),
                                (width,))
        floor = np.broadcast_to(np.asarray(floor, np.float64), (width,))

        def stops(active, rs, extremes):
            """The columns whose every read is within tol. ``extremes(cols)`` -> (||r||_∞, off_u) of those columns
            costs a pass over the block, so it is asked only for the columns the entrywise bound could stop."""
            s, f, t = scale[active], floor[active], tol[active]
            done = s * self.error_bound(rs, f) <= t                                   # ||r||_∞ unknown yet
            maybe = np.flatnonzero(~done & (s * self.error_bound(rs, f, 0.0) <= t))   # the least it can give
            if len(maybe):
                r_max, off_u = extremes(maybe)
                done[maybe] = s[maybe] * self.error_bound(rs[maybe], f[maybe], r_max, off_u) <= t[maybe]
            return done

        out = np.zeros((self.n, width), self.dtype)
        if sp.issparse(b):
            along = (b @ self.eigvec.T).T.toarray()   # components x B: b's coefficient on each u
            exact = along / self.alpha                # that part of the solution
            x, r, p, rs, active, it = self._sparse_start(b, stops, exact, out, max_iter)
            if len(active) == 0:
                return out[self.position] * self.sqrt_d[:, None], it
        else:
            along = np.asarray(self.eigvec @ b)
            b -= self.eigvec.T @ along
            exact = along / self.alpha
            x, r, p = np.zeros_like(b), b, b.copy()
            rs = np.einsum("ij,ij->j", r, r)
            active, it = np.arange(width), 0
        # the n x B updates run in place as torch ops on views of the same buffers: each axpy is one
        # addcmul_, a third of numpy's multiply-then-add time (2-7 % less per cover solve on the 275 K synthetic
        # graph; torch's addmm for (I - βS)p was slower than the product and two in-place ops)
        X, R, P = (torch.from_numpy(v) for v in (x, r, p))
        for it in range(it + 1, max_iter + 1):
            MP = self._s_torch @ P
            MP.mul_(-self.beta).add_(P)
            mp = MP.numpy()
            step = rs / np.einsum("ij,ij->j", p, mp)
            X.addcmul_(P, torch.from_numpy(step))
            R.addcmul_(MP, torch.from_numpy(step), value=-1)
            rs_new = np.einsum("ij,ij->j", r, r)
            done = stops(active, rs_new, lambda cols: self.dense_extremes(r, cols))
            if done.any():
                self._finish(out, x[:, done], active[done], exact)
                keep = ~done
                active, x, r, p, rs, rs_new = active[keep], x[:, keep], r[:, keep], p[:, keep], rs[keep], rs_new[keep]
                X, R, P = (torch.from_numpy(v) for v in (x, r, p))
                if len(active) == 0:
                    return out[self.position] * self.sqrt_d[:, None], it
            P.mul_(torch.from_numpy(rs_new / rs)).add_(R)
            rs = rs_new
        raise PEPRNoConvergence(f"PEPR (cg) did not reach tol={float(tol.min()):g} in {max_iter} iterations; "
                                f"raise pepr.max_iter or pepr.tol")

    def error_bound(self, rs: np.ndarray, floor: np.ndarray, r_max=np.inf, off_u=0.0) -> np.ndarray:
        """Per column, a bound on max_t |e_t| for the error e = P M^{-1} r of the returned solution (P projects off
        the u's, as ``_finish`` does), from ``rs`` = ||r||², ``r_max`` = ||r||_∞ (unknown: only the 2-norm bound)
        and ``off_u`` >= ||r - P r||_∞.

        ||e||_2 <= ||r||_2 / floor, and, entry by entry, M^{-1} = I + βS M^{-1} gives
        |e_t| <= |(P r)_t| + ||βS M^{-1} P r||_2 <= ||r||_∞ + off_u + c·||r||_2, where c is the largest |βλ/(1-βλ)| over
        the eigenvalues λ of S on the complement, which lie in [-1, λ2]: c = max(β/(1+β), 1/floor - 1). Where the
        residual is spread over many entries (||r||_∞ well below ||r||_2) the second is the tighter one: on the
        275 K synthetic graph (floor 0.64) 2-2.5x, which saves CG's last iteration for most cover columns."""
        rn = np.sqrt(rs)
        c = np.maximum(self.beta / (1.0 + self.beta), 1.0 / floor - 1.0)
        return np.minimum(rn / floor, r_max + off_u + c * rn)

    def dense_extremes(self, r: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For the columns ``cols`` of a dense Z x B block: ||r||_∞, and ||r - P r||_∞ = max_t |u_t|·|uᵀr| (t's
        own component's u), zero in exact arithmetic, round-off in practice."""
        sub = r if len(cols) == r.shape[1] else np.ascontiguousarray(r[:, cols])
        if self.eigvec.shape[0] == 0:
            return column_abs_max(sub), np.zeros(len(cols))
        return column_abs_max(sub), (self.u_max[:, None] * np.abs(np.asarray(self.eigvec @ sub))).max(axis=0)

    def _finish(self, out: np.ndarray, x: np.ndarray, cols: np.ndarray, exact: np.ndarray) -> None:
        """Converged columns: CG's part projected off the u's, plus the exact part along them."""
        out[:, cols] = x - self.eigvec.T @ (self.eigvec @ x - exact[:, cols])

    def _sparse_start(self, b: sp.csr_matrix, stops, exact, out, max_iter: int):
        """CG's first iterations for unit right-hand sides, on sparse vectors: from e_m the k-th iterate lives
        on m's k-hop neighbourhood, so the first products cost the degrees there instead of a pass over the
        whole matrix. Each vector is kept as ``s + c·u`` (s sparse, one B x Z CSR row per column; c one
        coefficient per column; u the column's component eigenvector, unit norm), which holds the deflated
        vectors exactly (b - u uᵀb = b + c·u, and M u = α u). Runs while the next product costs less than
        ``SPARSE_START_WORK`` of a dense one, then hands (x, r, p, rs) over dense; converged columns are
        finished here as in the dense loop.

        Round-off: a dot product (s1 + c1 u)·(s2 + c2 u) = s1·s2 + c1 uᵀs2 + c2 uᵀs1 + c1 c2 cancels when s
        cancels c·u on its support. While u's mass on the supports is at most 1/2, |c| <= sqrt(2)·||s + c u||
        and ||s|| <= 2·||s + c u||, so the error stays a few ulps of ||v1||·||v2||, as in the dense dot; past
        1/2 (a small component, or a hub-heavy neighbourhood) the column's c·u is folded into s (c = 0)."""
        beta, alpha = self.beta, self.alpha
        u2 = self.u_all.astype(np.float64) ** 2
        cols = b.indices[b.indptr[:-1]]                            # each column's (renumbered) seed
        uu = (self.u_all[cols] != 0).astype(np.float64)           # uᵀu per column: 1, or 0 (isolated/no deflation)
        active = np.arange(b.shape[0])
        sx, sr, sp_ = sp.csr_matrix(b.shape, dtype=self.dtype), b, b
        cx = np.zeros(len(active))
        cr = -(b @ self.u_all).astype(np.float64)                 # minus b's coefficient on its own u
        cp = cr.copy()

        def dot(s1, c1, s2, c2):   # (s1 + c1 u)·(s2 + c2 u) per column
            return (np.asarray(s1.multiply(s2).sum(axis=1), np.float64).ravel() + c1 * (s2 @ self.u_all)
                    + c2 * (s1 @ self.u_all) + c1 * c2 * uu)

        def scaled(s, f):
            return sp.diags(np.asarray(f, self.dtype)) @ s

        rs = dot(sr, cr, sr, cr)
        it = 0
        while (len(active) and it < max_iter
               and self.row_nnz[sp_.indices].sum() < SPARSE_START_WORK * self.s.nnz * len(active)):
            it += 1
            msp = sp_ - beta * (sp_ @ self.s)          # (M p)ᵀ's sparse part, S symmetric
            mcp = alpha * cp
            # supp(r_new) and supp(x_new) lie in supp(p) ∪ supp(Mp): fold where u's mass there passes 1/2
            pattern = abs(msp) + abs(sp_)
            pattern.data = u2[pattern.indices]
            fold = (np.asarray(pattern.sum(axis=1)).ravel() > 0.5) & (uu > 0)
            if fold.any():
                rows = np.flatnonzero(fold)
                pick = sp.csr_matrix((np.ones(len(rows), self.dtype), (rows, np.arange(len(rows)))),
                                     shape=(len(active), len(rows)))
                own_u = pick @ self.eigvec[self.component[cols[rows]]]   # u in the folded rows, 0 elsewhere
                sx, sr, sp_, msp = (s + scaled(own_u, c) for s, c in ((sx, cx), (sr, cr), (sp_, cp), (msp, mcp)))
                cx, cr, cp, mcp = (np.where(fold, 0.0, c) for c in (cx, cr, cp, mcp))
            step = rs / dot(sp_, cp, msp, mcp)
            sx, cx = sx + scaled(sp_, step), cx + step * cp
            sr, cr = sr - scaled(msp, step), cr - step * mcp
            rs_new = np.maximum(dot(sr, cr, sr, cr), 0.0)
            done = stops(active, rs_new, lambda rows: self.sparse_extremes(sr[rows], cr[rows], cols[rows]))
            if done.any():
                self._finish(out, self._densify(sx[done], cx[done], cols[done]), active[done], exact)
                keep = ~done
                active, cols, uu = active[keep], cols[keep], uu[keep]
                sx, cx, sr, cr, sp_, cp = sx[keep], cx[keep], sr[keep], cr[keep], sp_[keep], cp[keep]
                rs, rs_new = rs[keep], rs_new[keep]
            ratio = rs_new / rs
            sp_, cp = sr + scaled(sp_, ratio), cr + ratio * cp
            rs = rs_new
        x, r, p = (self._densify(s, c, cols) for s, c in ((sx, cx), (sr, cr), (sp_, cp)))
        return x, r, p, np.einsum("ij,ij->j", r, r), active, it

    def sparse_extremes(self, s: sp.csr_matrix, c: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``dense_extremes`` for the sparse start's rows s + c·u: (||s + c·u||_∞, u_max·|uᵀ(s + c·u)|)."""
        uu = (self.u_all[cols] != 0)   # uᵀu: 1, or 0 for an isolated entity / without deflation
        return self.sparse_abs_max(s, c, cols), self.u_max[self.component[cols]] * np.abs(s @ self.u_all + c * uu)

    def sparse_abs_max(self, s: sp.csr_matrix, c: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """||s + c·u||_∞ per row (u: the row's own component eigenvector, ``cols`` a member of it per row): on s's
        support entry by entry; outside it |c| times the largest u there, the component's first entity (they are
        in decreasing u) missing from the support."""
        lengths = np.diff(s.indptr)
        on = np.abs(s.data + np.repeat(c, lengths) * self.u_all[s.indices]).astype(np.float64)
        out = np.zeros(s.shape[0])
        filled = lengths > 0
        if filled.any():   # (a CSR matrix of these values would share, and its max() could sort, s's indices)
            out[filled] = np.maximum.reduceat(on, s.indptr[:-1][filled])
        for i in np.flatnonzero(c != 0):
            comp = self.component[cols[i]]
            members = self.members[self.member_start[comp]:self.member_start[comp + 1]]
            support = np.sort(s.indices[s.indptr[i]:s.indptr[i + 1]])   # within the component
            gap = np.flatnonzero(members[:len(support)] != support)
            first = gap[0] if len(gap) else len(support)
            if first < len(members):
                out[i] = max(out[i], abs(c[i]) * float(self.u_all[members[first]]))
        return out

    def _densify(self, s: sp.csr_matrix, c: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """s + c·u as a dense Z x B block (u: each column's own component eigenvector)."""
        import torch

        # C order, as the dense loop's products need: a column-major block made each cover solve about 18 % slower
        dense = np.ascontiguousarray(s.toarray().T)
        comps = self.component[cols]
        for comp in np.unique(comps[c != 0]):
            u = np.where(self.component == comp, self.u_all, 0) if self.eigvec.shape[0] > 1 else self.u_all
            coef = np.where(comps == comp, c, 0).astype(self.dtype)
            torch.from_numpy(dense).addr_(torch.from_numpy(u), torch.from_numpy(coef))   # in place: dense += u cᵀ
        return dense


class PEPRSolver:
    """PEPR score vectors for blocks of seeds (both methods); see the module docstring."""

    def __init__(self, a: sp.csr_matrix, degree: np.ndarray, cfg: PEPRConfig, v0: np.ndarray | None = None,
                 g: np.ndarray | None = None, floors: np.ndarray | None = None):
        self.a, self.degree, self.cfg = a, degree, cfg
        self.n = a.shape[0]
        self.dtype = np.float64 if cfg.dtype == "float64" else np.float32
        self.v0 = v0 if v0 is not None else np.full(self.n, 1.0 / self.n)
        if cfg.method == "cg":
            self.cg = CGSolver(a, degree, cfg.alpha, self.dtype, cfg.deflate, floors)
            # g = R·1 feeds every seed's score: solve it 1000x tighter than the scores need
            self.g = g if g is not None else self.cg.solve(np.ones((self.n, 1)), cfg.tol * G_TOL_FACTOR, cfg.max_iter)[0][:, 0]
            connected = ~self.cg.isolated
            self.g_sum = connected.sum() / cfg.alpha + (~connected).sum()
        self.iterations: list[int] = []

    def scores(self, seeds: np.ndarray, read_scale: np.ndarray | None = None) -> np.ndarray:
        """Z x B PEPR scores (each column sums to 1) for the seeds, every one within pepr.tol; with ``read_scale``
        (cg only, one per seed: ``neighbour_read_scales``) only the scores at each seed's neighbours are."""
        seeds = np.asarray(seeds, np.int64)
        if self.cfg.method == "power":
            v, it = power_block(self.a, seeds, self.v0, self.cfg.alpha, self.cfg.tol, self.cfg.max_iter, self.dtype)
            self.iterations.append(it)
            return v
        n, alpha = self.n, self.cfg.alpha
        y, it = self.cg.solve_units(seeds, y_tolerance(self.cfg.tol, alpha, n), self.cfg.max_iter, read_scale)
        self.iterations.append(it)
        iso = self.cg.isolated[seeds]
        y[:, iso] = 0.0
        y[seeds[iso], np.flatnonzero(iso)] = 1.0  # R e_m = e_m for an isolated m
        y_sum = np.where(iso, 1.0, 1.0 / alpha)
        c1, c2 = 1.0 - 1.0 / n, 1.0 / n
        return (c1 * y + c2 * self.g[:, None]) / (c1 * y_sum + c2 * self.g_sum)[None, :]


# ------------------------------------------------------------------------------------ cover solving
#
# PEPR of seed m at neighbour t needs R[t, m] = (R e_m)[t]. On the undirected graph R^T = D^{-1} R D, so
# R[t, m] = (d_t / d_m) · R[m, t] = (d_t / d_m) · (R e_t)[m]: the solve for t gives every value the edge
# (m, t) needs. So only a vertex cover of the seeds' edges is solved: on the real KG every edge touches a
# disease, so 9.2 K solves replace 24.9 K. The solve for v reads y = R e_v only at v's neighbours t: at t
# itself when v is a seed, and scaled by d_v / d_t when t is a seed outside the cover; it stops once the
# bound of every such read (CGSolver.solve's read_scale) is within tol / α.


def reverse_positions(a: sp.csr_matrix) -> np.ndarray:
    """For every stored entry (i, j) of a symmetric pattern, the position of (j, i)."""
    if a.has_canonical_format:
        # sorted rows, no duplicates: the transpose (scipy's linear-time CSR conversion) of a matrix holding each
        # entry's position lists its entries in a's order, so its data is the answer. The sort below took 6.7 s
        # on the 275 K synthetic graph, this 0.14 s.
        positions = sp.csr_matrix((np.arange(a.nnz, dtype=np.int64), a.indices, a.indptr), shape=a.shape)
        transposed = positions.T.tocsr()
        transposed.sort_indices()
        return transposed.data
    n = a.shape[0]
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(a.indptr))
    cols = a.indices.astype(np.int64)
    key = rows * n + cols
    order = np.argsort(key, kind="stable")
    return order[np.searchsorted(key[order], cols * n + rows)]


def greedy_cover(a: sp.csr_matrix, degree: np.ndarray, needed: np.ndarray, rev: np.ndarray) -> np.ndarray:
    """A vertex cover (bool per entity) of the entries with ``needed`` (or its reverse) set: the complement of a
    maximal independent set of those edges that low-degree entities join first. It is built in rounds (Luby's
    parallel independent set, with the degree left as the priority): an entity joins when its (degree among the
    entities left, id) is below every remaining neighbour's; then it and its neighbours leave. On the 275 K
    synthetic graph: 189.5 K solves in 0.3 s, where adding entities in a fixed decreasing-degree order gave
    210.5 K in 1.5 s. The seeds themselves are always a cover (every needed entry is a seed's row): used when
    not larger."""
    n = a.shape[0]
    want = needed | needed[rev]
    rows = np.repeat(np.arange(n), np.diff(a.indptr))
    src, dst = rows[want], a.indices[want]
    touched = np.bincount(src, minlength=n) > 0
    alive, independent = touched.copy(), np.zeros(n, bool)
    ids = np.arange(n, dtype=np.int64)
    while alive.any():   # the alive entity of least key always joins: at most n rounds, 4 on the synthetic graph
        live = alive[src] & alive[dst]
        src, dst = src[live], dst[live]
        key = np.bincount(src, minlength=n).astype(np.int64) * n + ids
        lowest = np.full(n, np.iinfo(np.int64).max)
        np.minimum.at(lowest, src, key[dst])
        join = alive & (key < lowest)
        independent |= join
        leave = join.copy()
        leave[dst[join[src]]] = True
        alive &= ~leave
    in_cover = touched & ~independent
    seeds = np.zeros(n, bool)
    seeds[rows[needed]] = True
    return in_cover if in_cover.sum() < seeds.sum() else seeds


def cover_read_scales(a: sp.csr_matrix, degree: np.ndarray, needed: np.ndarray, rev: np.ndarray,
                      in_cover: np.ndarray) -> np.ndarray:
    """Per entity: CGSolver.solve's read_scale for its solve, max over the entries t it serves of
    sqrt(d_t) · w_t, with w_t = 1 for its own seed's value and d_v / d_t for a value read through the
    transpose (0 when it serves none)."""
    n = a.shape[0]
    rows = np.repeat(np.arange(n), np.diff(a.indptr))
    d = np.maximum(degree, 1).astype(np.float64)
    t = a.indices
    own = needed & in_cover[rows]
    # entry p = (v, t) of a solved v serves seed t through the transpose when (t, v) is needed and t is not solved
    via = needed[rev] & in_cover[rows] & ~in_cover[t]
    w = np.maximum(np.where(own, 1.0, 0.0), np.where(via, d[rows] / d[t], 0.0))
    scale = np.zeros(n)
    np.maximum.at(scale, rows, np.sqrt(d[t]) * w)
    return scale


def edge_values(a: sp.csr_matrix, degree: np.ndarray, needed: np.ndarray, rev: np.ndarray, in_cover: np.ndarray,
                solved: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From y[:, j] = R e_{solved[j]}: (entry positions p = (m, t), R[t, m]) for every needed entry served."""
    d = np.maximum(degree, 1).astype(np.float64)
    pos_out, val_out = [], []
    for j, v in enumerate(solved.tolist()):
        lo, hi = a.indptr[v], a.indptr[v + 1]
        p = np.arange(lo, hi)
        t = a.indices[lo:hi]
        own = needed[p]                                  # seed v, neighbour t: R[t, v] = y_v[t]
        pos_out.append(p[own])
        val_out.append(y[t[own], j])
        back = needed[rev[p]] & ~in_cover[t]             # seed t (not solved), neighbour v: R[v, t] = d_v/d_t y_v[t]
        pos_out.append(rev[p[back]])
        val_out.append(d[v] / d[t[back]] * y[t[back], j])
    if not pos_out:
        return np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(pos_out).astype(np.int64), np.concatenate(val_out).astype(np.float64)


def neighbour_read_scales(a: sp.csr_matrix, degree: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Per seed, the largest sqrt(d_t) over its neighbours t: the read scale of a per-seed solve whose scores
    are read only there (top_k_neighbours). 1 for a seed without neighbours (solved exactly)."""
    seeds = np.asarray(seeds, np.int64)
    lengths = a.indptr[seeds + 1] - a.indptr[seeds]
    rows = np.repeat(np.arange(len(seeds)), lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)   # offset in the row
    pos = (np.repeat(a.indptr[seeds], lengths) + within).astype(np.int64)
    out = np.ones(len(seeds))
    np.maximum.at(out, rows, np.sqrt(degree[a.indices[pos]].astype(np.float64)))
    return out


def top_k_neighbours(a: sp.csr_matrix, edge_relation: np.ndarray, edge_inverse: np.ndarray,
                     seeds: np.ndarray, scores: np.ndarray | None, k_max: int,
                     edge_score: np.ndarray | None = None) -> pa.Table:
    """Rank each seed's direct neighbours by score (desc; ties by lower id) and keep the first k_max.

    Scores come from ``scores`` (Z x len(seeds)) or, per stored entry of ``a``, from ``edge_score``."""
    seeds = np.asarray(seeds, np.int64)
    starts, ends = a.indptr[seeds], a.indptr[seeds + 1]
    lengths = ends - starts
    col = np.repeat(np.arange(len(seeds)), lengths)
    pos = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(seeds) else np.zeros(0, np.int64)
    pos = pos.astype(np.int64)
    neigh = a.indices[pos].astype(np.int64)
    score = (edge_score[pos] if edge_score is not None else scores[neigh, col]).astype(np.float64)
    # scores equal to 12 decimals are ties (round-off must not reorder symmetric neighbours): lower id first
    order = np.lexsort((neigh, -np.round(score, 12), col))
    col, neigh, score, pos = col[order], neigh[order], score[order], pos[order]
    seg_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    rank = np.arange(len(col)) - seg_start
    keep = rank < k_max
    return pa.table({
        "entity": pa.array(seeds[col[keep]], pa.int32()),
        "rank": pa.array(rank[keep], pa.int16()),
        "neighbour": pa.array(neigh[keep], pa.int32()),
        "relation": pa.array(edge_relation[pos[keep]], pa.int32()),
        "inverse": pa.array(edge_inverse[pos[keep]], pa.bool_()),
        "score": pa.array(score[keep], pa.float64()),
    }, schema=NEIGHBOURS_SCHEMA)


# ------------------------------------------------------------------------------------ Ray


class PEPRWorker:
    """One actor: holds the graph (zero-copy numpy views of the object store) and solves seed blocks."""

    def __init__(self, cfg: PEPRConfig, fault_marker: str | None = None):
        # one actor per core: its products (torch's CSR kernel) get the threads of the CPUs it holds
        import torch

        torch.set_num_threads(max(1, int(cfg.actor_num_cpus)))
        self.cfg = cfg
        self.fault_marker, self.calls = fault_marker, 0
        import ray

        # which process answers, and whether Ray restarted this actor (counted as actor_restarts)
        ctx = ray.get_runtime_context()
        self.process = (f"{ctx.get_node_id()}:{os.getpid()}", ctx.was_current_actor_reconstructed)
        self.solver = None

    def _start_call(self, graph: tuple) -> None:
        """Every call carries the graph's object refs: an actor Ray restarted (its process or node died) starts
        empty, loads them here and answers the retried call the same."""
        self.calls += 1
        if self.fault_marker and self.calls == self.cfg.fault_at_call:
            exit_once(self.fault_marker)   # whichever actor gets there first; the restarted one gets past it
        if self.solver is None:
            self.load(*graph)

    def load(self, indptr, indices, data, edge_relation, edge_inverse, degree, v0, g, floors) -> str:
        """The graph and what the driver solved once (g, the spectral floors); a separate call so the actor's
        start (a process, torch's import) overlaps the driver's work. -> the actor's node id."""
        cfg = self.cfg
        n = len(indptr) - 1
        self.a = sp.csr_matrix((data, indices, indptr), shape=(n, n), copy=False)
        self.edge_relation, self.edge_inverse = edge_relation, edge_inverse
        self.solver = PEPRSolver(self.a, degree, cfg, v0=v0, g=g, floors=floors)
        return self.process[0].split(":")[0]

    def run_cover(self, solved: np.ndarray, read_scale: np.ndarray, block: int, needed, rev, in_cover, *graph
                  ) -> tuple[np.ndarray, np.ndarray, list[int], float]:
        """Solve R e_v for cover entities, ``block`` at a time; -> the needed entries they serve, R[t, m] there,
        and each block's iterations."""
        t0 = time.perf_counter()
        self._start_call(graph)
        self.needed, self.rev, self.in_cover = needed, rev, in_cover
        tol = y_tolerance(self.cfg.tol, self.cfg.alpha, self.solver.n)
        pos, val, iters = [], [], []
        for i in range(0, len(solved), block):
            part = solved[i:i + block]
            y, it = self.solver.cg.solve_units(part, tol, self.cfg.max_iter, read_scale[i:i + block])
            p, v = edge_values(self.a, self.solver.degree, self.needed, self.rev, self.in_cover, part, y)
            pos.append(p)
            val.append(v)
            iters.append(it)
        return np.concatenate(pos), np.concatenate(val), iters, time.perf_counter() - t0, self.process

    def run(self, seeds: np.ndarray, block: int, *graph) -> tuple[pa.Table, list[int], float]:
        t = time.perf_counter()
        self._start_call(graph)
        tables, iters = [], []
        for i in range(0, len(seeds), block):
            part = seeds[i:i + block]
            # top_k_neighbours reads each seed's scores only at its neighbours: bound those, not every entry
            scale = neighbour_read_scales(self.a, self.solver.degree, part) if self.cfg.method == "cg" else None
            scores = self.solver.scores(part, scale)
            tables.append(top_k_neighbours(self.a, self.edge_relation, self.edge_inverse, part, scores,
                                           self.cfg.k_max))
            iters.append(self.solver.iterations[-1])
        return pa.concat_tables(tables), iters, time.perf_counter() - t, self.process


def select_seeds(graph: Graph, mode: str) -> np.ndarray:
    freq = graph.freq
    if mode == "linked" and freq is None:
        raise KeplmError("pepr.seeds=linked needs a graph built with --corpus (entity frequencies)")
    if mode == "all" or (mode == "auto" and freq is None):
        return np.arange(graph.num_entities)
    return np.flatnonzero(freq > 0)


def compute_neighbours(graph: Graph, cfg: PEPRConfig, num_samples: int | None = None,
                       seeds: np.ndarray | None = None) -> tuple[pa.Table, Counter]:
    """All seeds' top-k_max on a pool of ``cfg.num_actors`` Ray actors (Ray must be connected)."""
    import ray

    seeds = select_seeds(graph, cfg.seeds) if seeds is None else np.asarray(seeds)
    a = graph.adjacency
    v0 = initial_vector(graph.freq, num_samples, graph.num_entities)
    # SPREAD: one actor per node before a second on any, so a cluster's nodes each solve with their own cores
    # and memory rather than two actors sharing one node while another idles
    actor_cls = ray.remote(num_cpus=cfg.actor_num_cpus, scheduling_strategy="SPREAD", max_restarts=cfg.actor_restarts,
                           max_task_retries=cfg.actor_restarts)(PEPRWorker)
    fault_marker = None
    if cfg.fault_at_call:
        import tempfile

        fault_marker = os.path.join(tempfile.mkdtemp(prefix="keplm-pepr-fault-"), "fault_injected")
    actors = [actor_cls.remote(cfg, fault_marker) for _ in range(cfg.num_actors)]   # they start while the driver works
    try:   # the actors go when this ends, also on an error (a solve that does not converge)
        g = floors = None
        if cfg.method == "cg":  # solved once here, not once per actor
            driver = PEPRSolver(a, graph.degree, cfg)
            g, floors = driver.g, driver.cg.floors
        refs = [ray.put(x) for x in (a.indptr, a.indices, a.data, graph.edge_relation, graph.edge_inverse,
                                     graph.degree, v0, g, floors)]
        # an actor runs one caller's calls in order, so load runs before any solve; it is awaited (its errors
        # surface as themselves) only once the driver has nothing else to do
        loaded = [actor.load.remote(*refs) for actor in actors]
        tables, counts = [], Counter()
        bs = block_seeds(cfg, graph.num_entities)
        if cfg.method == "cg" and cfg.solve == "cover":
            table = _cover_neighbours(graph, cfg, seeds, g, actors, loaded, counts, bs, refs)
        else:
            ray.get(loaded)
            start = time.perf_counter()
            for table, iters, secs, process in pipelined_calls(actors, lambda actor, part: actor.run.remote(part, bs, *refs),
                                                      call_groups(seeds, bs, cfg), depth=CALL_DEPTH):
                tables.append(table)
                _count_call(counts, iters, secs, process)
            counts["solve_wall_seconds"] = time.perf_counter() - start
            counts["solves"] = int(len(seeds))
            table = pa.concat_tables(tables) if tables else NEIGHBOURS_SCHEMA.empty_table()
        nodes = sorted(set(ray.get(loaded)))   # where each actor loaded the graph
        log.info("neighbours: %s (%s)", placement(len(actors), "actor", nodes), ", ".join(nodes))
    finally:
        for actor in actors:
            ray.kill(actor)
        if fault_marker:
            shutil.rmtree(os.path.dirname(fault_marker), ignore_errors=True)
    table = table.sort_by([("entity", "ascending"), ("rank", "ascending")])
    deg = graph.degree[seeds]
    # actors Ray restarted (a process or node that died) whose new process then served calls
    counts["actor_restarts"] = sum(restarted for _, restarted in counts.pop("processes", ()))
    counts.update({
        "block_seeds": bs,
        "seeds": int(len(seeds)),
        "seeds_without_neighbours": int((deg == 0).sum()),
        "seeds_truncated_to_k_max": int((deg > cfg.k_max).sum()),
        "rows": table.num_rows,
    })
    # actor time in solves (summed) and the wall time from the first call to the last result, which leaves
    # out the actors' start and the driver's g solve, cover and final sort
    counts["solve_seconds"] = round(counts["solve_seconds"], 3)
    counts["solve_wall_seconds"] = round(counts["solve_wall_seconds"], 3)
    return table, counts


def _count_call(counts: Counter, iters: list[int], secs: float, process: tuple[str, bool]) -> None:
    counts.setdefault("processes", set()).add(process)
    counts["calls"] += 1
    counts["blocks"] += len(iters)
    counts["iterations_max"] = max(counts["iterations_max"], *iters)
    counts["iterations_total"] += sum(iters)
    counts["solve_seconds"] += secs


def _cover_neighbours(graph: Graph, cfg: PEPRConfig, seeds: np.ndarray, g: np.ndarray, actors, loaded,
                      counts: Counter, bs: int, graph_refs: list) -> pa.Table:
    import ray

    a, degree, n = graph.adjacency, graph.degree, graph.num_entities
    rows = np.repeat(np.arange(n), np.diff(a.indptr))
    is_seed = np.zeros(n, bool)
    is_seed[seeds] = True
    needed = is_seed[rows]
    rev = reverse_positions(a)
    in_cover = greedy_cover(a, degree, needed, rev)
    scales = cover_read_scales(a, degree, needed, rev, in_cover)
    cover = np.flatnonzero(in_cover)
    # tight solves together: a block runs until its slowest column converges
    cover = cover[np.argsort(-scales[cover], kind="stable")]
    refs = [ray.put(x) for x in (needed, rev, in_cover)]
    ray.get(loaded)
    value = np.full(a.nnz, np.nan)

    def call(actor, part):
        return actor.run_cover.remote(part, scales[part], bs, *refs, *graph_refs)

    start = time.perf_counter()
    for pos, val, iters, secs, process in pipelined_calls(actors, call, call_groups(cover, bs, cfg), depth=CALL_DEPTH):
        value[pos] = val
        _count_call(counts, iters, secs, process)
    counts["solve_wall_seconds"] = time.perf_counter() - start
    if np.isnan(value[needed]).any():   # the cover left an edge unserved: a bug, never silent
        raise RuntimeError(f"PEPR cover: {int(np.isnan(value[needed]).sum())} needed entries unsolved")
    counts["solves"] = int(len(cover))
    # every seed here has neighbours, so it is connected: Σ R e_m = 1/α (module docstring)
    c1, c2 = 1.0 - 1.0 / n, 1.0 / n
    connected = degree > 0
    g_sum = connected.sum() / cfg.alpha + (~connected).sum()
    edge_score = (c1 * value + c2 * g[a.indices]) / (c1 / cfg.alpha + c2 * g_sum)
    return top_k_neighbours(a, graph.edge_relation, graph.edge_inverse, seeds, None, cfg.k_max, edge_score=edge_score)


def run_neighbours(graph_dir: str | Path, out_dir: str | Path, cfg: PEPRConfig, config_dump: dict) -> dict:
    graph = load_graph(graph_dir)
    manifest = read_manifest(graph_dir, "kg_build")
    num_samples = manifest["counts"].get("corpus_segments")
    t = time.perf_counter()
    table, counts = compute_neighbours(graph, cfg, num_samples)
    counts["wall_seconds"] = round(time.perf_counter() - t, 3)
    from keplm.platform.outputs import staged

    counts = dict(sorted(counts.items()))
    with staged(out_dir, "kg_neighbours") as out:   # published into out_dir, manifest last, on success
        pq.write_table(table, out / "neighbours.parquet")
        for name in ("entities.parquet", "relations.parquet"):
            shutil.copy(Path(graph_dir) / name, out / name)
        write_manifest(out, "kg_neighbours", NEIGHBOURS_SCHEMA_VERSION, config_dump, hash_inputs([str(graph_dir)]),
                       counts)
    return counts
