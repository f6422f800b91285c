"""Data-driven initialisation for guides (mixture models decide their fate at initialisation)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pyro.optim import PyroOptim

from .errors import UsageError

__all__ = ["kmeans", "Start", "Preconditioned", "precondition_", "laplace", "laplace_init_", "disperse_", "INIT_CHOICES", "start_"]


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    iterations: int = 20,
    num_inits: int = 4,
    num_trials: int | None = None,
    generator: torch.Generator | None = None,
):
    """k-means: the best of ``num_inits`` runs of greedy k-means++ seeding and Lloyd iterations.

    Plain k-means++ draws each new seed with probability proportional to the
    squared distance to the nearest seed. On well-separated clusters it still
    puts two seeds into one cluster now and then, and Lloyd's iterations cannot
    move a centre across the empty gap between clusters: the fit is then stuck
    with two components sharing a cluster (0.3 to 1.2 nats per point below
    the optimum in the cases kept in tests/test_gmm.py). The greedy variant draws
    ``num_trials`` candidates per seed and keeps the one that lowers the
    potential (sum of squared distances to the nearest seed) the most; the best
    of ``num_inits`` such runs is kept. On 20 synthetic data sets x 25 seeds
    (``ppvi.data.synthetic_gmm``), two centres ended in one cluster in 14/500
    runs of plain k-means++ (3 clusters), in 1/500 (3 clusters) and 14/500
    (5 clusters) of one greedy run, and in 0/500 for both with the default
    best of 4.

    Parameters
    ----------
    x : Tensor (N, D)
    num_clusters : int
    iterations : int
        Lloyd iterations after seeding.
    num_inits : int
        Independent seedings; the run with the lowest within-cluster sum of squares wins.
    num_trials : int, optional
        Candidates per seed; default ``2 + floor(log(num_clusters))``, as scikit-learn.
    generator : torch.Generator, optional
        Source of randomness; default the global one (seeded by ``ppvi.fit``).

    Returns
    -------
    centers : Tensor (num_clusters, D)
    labels : LongTensor (N,)

    References
    ----------
    Arthur & Vassilvitskii (2007), k-means++: the advantages of careful seeding, section 6.
    """
    num_trials = num_trials or 2 + int(math.log(num_clusters))
    runs = [_lloyd(x, _seeds(x, num_clusters, num_trials, generator), iterations) for _ in range(num_inits)]
    centers = min(runs, key=lambda centers: torch.cdist(x, centers).min(dim=1).values.square().sum())
    return centers, torch.cdist(x, centers).argmin(dim=1)


def _seeds(x, num_clusters, num_trials, generator):
    """Greedy k-means++: each seed is the best of ``num_trials`` draws proportional to squared distance."""
    num_points = x.shape[0]
    first = torch.randint(num_points, (1,), generator=generator, device=x.device)
    centers = [x[first[0]]]
    squared = (x - centers[0]).square().sum(-1)  # squared distance of each point to its nearest seed
    for _ in range(1, num_clusters):
        total = squared.sum()
        weights = squared / total if total > 0 else torch.full_like(squared, 1.0 / num_points)
        candidates = torch.multinomial(weights, num_trials, replacement=True, generator=generator)
        # potential if each candidate were added: sum_i min(squared_i, |x_i - candidate|^2)
        to_candidates = torch.cdist(x, x[candidates]).square()
        potentials = torch.minimum(squared.unsqueeze(-1), to_candidates).sum(0)
        best = potentials.argmin()
        centers.append(x[candidates[best]])
        squared = torch.minimum(squared, to_candidates[:, best])
    return torch.stack(centers)


def _lloyd(x, centers, iterations):
    num_clusters = centers.shape[0]
    for _ in range(iterations):
        labels = torch.cdist(x, centers).argmin(dim=1)
        counts = torch.bincount(labels, minlength=num_clusters).unsqueeze(-1)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        centers = torch.where(counts > 0, sums / counts.clamp(min=1), centers)  # an empty cluster keeps its center
    return centers


# ---------------------------------------------------------------------------
# Starting points for Gaussian autoguides: a Laplace start, and dispersed restarts.

INIT_CHOICES = ("auto", "laplace", "default")
LAPLACE_MAX_DIM = 500
# sqrt(g^T H^-1 g): how far (in posterior sds) the point may be from the mode; the Hessian costs one backward pass per coordinate
NEWTON_DECREMENT_TOLERANCE = 0.01


def _potential(model_fn, batch, options):
    """``(potential_fn, names, shapes, init)``: minus the log joint of the model's latents in unconstrained
    space (Jacobians included, as for NUTS), their site order and shapes, and a feasible start."""
    from pyro.infer.autoguide.initialization import init_to_feasible
    from pyro.infer.mcmc.util import initialize_model

    init, potential_fn, _, _ = initialize_model(model_fn, model_args=(batch, options), init_strategy=init_to_feasible)
    names = list(init)
    return potential_fn, names, {name: init[name].shape for name in names}, torch.cat([init[name].reshape(-1) for name in names])


def _unpack(flat, names, shapes):
    values, offset = {}, 0
    for name in names:
        size = math.prod(shapes[name])
        values[name] = flat[offset : offset + size].reshape(shapes[name])
        offset += size
    return values


def laplace(model_fn, batch, options, *, max_iter: int = 200, newton_steps: int = 3):
    """The Laplace approximation of the posterior in unconstrained space: ``(mode, cov, names, shapes)``.

    L-BFGS on minus the log joint finds the mode; a few Newton steps with the exact Hessian finish
    it (they make badly conditioned Gaussian posteriors exact to float precision, where L-BFGS
    stalls); the covariance is the inverse Hessian there. Raises ``ValueError`` when there is no
    finite mode with a positive definite Hessian (e.g. a funnel, whose log joint is unbounded).

    References
    ----------
    Zhang, L., Carpenter, B., Gelman, A., Vehtari, A. (2022). Pathfinder: parallel quasi-Newton
    variational inference. JMLR 23(306) (the same idea, along the L-BFGS path).
    """
    potential_fn, names, shapes, start = _potential(model_fn, batch, options)
    if start.numel() > LAPLACE_MAX_DIM:
        raise ValueError(f"{start.numel()} latent coordinates: more than {LAPLACE_MAX_DIM}, the Hessian is too costly")

    def objective(flat):
        return potential_fn(_unpack(flat, names, shapes))

    point = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([point], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        optimizer.zero_grad()
        value = objective(point)
        value.backward()
        return value

    optimizer.step(closure)
    point = point.detach()
    for _ in range(newton_steps):
        hessian = torch.autograd.functional.hessian(objective, point)
        gradient = torch.autograd.functional.jacobian(objective, point)
        cholesky, info = torch.linalg.cholesky_ex(hessian)
        if info or not torch.isfinite(hessian).all():
            raise ValueError("the Hessian of the log joint at the mode is not positive definite")
        candidate = point - torch.cholesky_solve(gradient.unsqueeze(-1), cholesky).squeeze(-1)
        if not objective(candidate) <= objective(point):
            break
        point = candidate
    hessian = torch.autograd.functional.hessian(objective, point)
    gradient = torch.autograd.functional.jacobian(objective, point)
    cholesky, info = torch.linalg.cholesky_ex(hessian)
    if info or not torch.isfinite(point).all():
        raise ValueError("the Hessian of the log joint at the mode is not positive definite")
    decrement = float(gradient @ torch.cholesky_solve(gradient.unsqueeze(-1), cholesky).squeeze(-1)) ** 0.5
    if not decrement < NEWTON_DECREMENT_TOLERANCE:  # the distance to the mode in sds: no mode found (a funnel's log joint is unbounded)
        raise ValueError(f"no mode found (Newton decrement {decrement:.3g} after L-BFGS)")
    return point, torch.cholesky_inverse(cholesky), names, shapes


def _set_(parameter: torch.Tensor, constraint, value: torch.Tensor) -> None:
    """Write a constrained value into a Pyro parameter in place (the param store and module keep the tensor)."""
    from torch.distributions import transform_to

    with torch.no_grad():
        parameter.unconstrained().copy_(transform_to(constraint).inv(value.to(parameter.dtype)))


@dataclass
class Start:
    """How a restart started: ``note`` for the log and config.json; ``step_scales`` maps unconstrained
    parameter tensors to per-coordinate step multipliers for :class:`Preconditioned` (empty: none)."""

    note: str
    step_scales: list = field(default_factory=list)


class Preconditioned(PyroOptim):  # an instance of PyroOptim, which pyro's SVI insists on; __init__ not called
    """Wrap a Pyro optimizer so that chosen coordinates take steps multiplied by a fixed scale.

    Adam's steps are about ``lr`` per coordinate whatever the gradient's size, so a location whose
    posterior sd is 1e-3 jitters by ten sds per step at ``lr = 0.01``, and neither a lower rate (0.001:
    means still 0.4 sd off after 4,000 steps) nor iterate averaging (R-hat never under 1.1) tames it.
    After a Laplace start the posterior sds are known: each location coordinate's step is multiplied
    by ``min(1, sd)``, so that ``lr`` is a fraction of a posterior sd there. The wrapper keeps the
    Pyro optimizer's interface (``optim(params)``), so SVI and ppvi's loop call it unchanged; it adds
    two device ops per wrapped tensor per step and no host sync.
    """

    def __init__(self, optim, step_scales: list):
        self.optim, self.step_scales = optim, step_scales

    def __call__(self, params, *args, **kwargs):
        before = [(tensor, tensor.detach().clone(), scale) for tensor, scale in self.step_scales]
        result = self.optim(params, *args, **kwargs)
        with torch.no_grad():
            for tensor, old, scale in before:
                tensor.copy_(old + scale * (tensor - old))  # theta <- theta_old + s * (Adam's step)
        return result

    def __getattr__(self, name):
        return getattr(self.optim, name)

    def get_state(self):
        return self.optim.get_state()

    def set_state(self, state):
        self.optim.set_state(state)

    def save(self, filename):
        self.optim.save(filename)

    def load(self, filename, map_location=None):
        self.optim.load(filename, map_location=map_location)


def precondition_(optimizer: torch.optim.Optimizer, step_scales: list) -> torch.optim.Optimizer:
    """The torch-optimizer form of :class:`Preconditioned`: ``optimizer.step`` scales the chosen
    coordinates' steps; returns the optimizer (unchanged without step scales). State dicts are unaffected."""
    if not step_scales:
        return optimizer
    plain_step = optimizer.step

    def step(closure=None):
        before = [(tensor, tensor.detach().clone(), scale) for tensor, scale in step_scales]
        result = plain_step(closure)
        with torch.no_grad():
            for tensor, old, scale in before:
                tensor.copy_(old + scale * (tensor - old))  # theta <- theta_old + s * (Adam's step)
        return result

    optimizer.step = step
    return optimizer


def laplace_init_(model_fn, guide, batch, options) -> Start:
    """Start a Gaussian autoguide at the Laplace approximation; returns what was done, for the log.

    AutoMultivariateNormal gets the mode and the Cholesky factor of the inverse Hessian;
    AutoLowRankMultivariateNormal and AutoNormal the mode and the marginal sds (their
    factors are left as they are). Call after the guide's parameters exist (one call of the
    guide) and before the optimizer's first step. Other guides are left alone.
    The returned :class:`Start` carries step scales ``min(1, sd)`` for the locations, for
    :class:`Preconditioned`.
    """
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal, AutoNormal

    if not isinstance(guide, (AutoNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal)):
        return Start(f"default start ({type(guide).__name__} is not a Gaussian autoguide)")
    mode, cov, names, shapes = laplace(model_fn, batch, options)
    sd = cov.diagonal().sqrt()
    step = sd.clamp(max=1.0)
    if isinstance(guide, AutoMultivariateNormal):
        full = torch.linalg.cholesky(cov)
        _set_(guide.loc, torch.distributions.constraints.real, mode)
        _set_(guide.scale, guide.scale_constraint, full.diagonal())
        _set_(guide.scale_tril, guide.scale_tril_constraint, full / full.diagonal().unsqueeze(-1))
        scales = [(guide.loc.unconstrained(), step)]
    elif isinstance(guide, AutoLowRankMultivariateNormal):
        _set_(guide.loc, torch.distributions.constraints.real, mode)
        _set_(guide.scale, guide.scale_constraint, sd / (1 + guide.cov_factor.detach().square().sum(-1)).sqrt())
        scales = [(guide.loc.unconstrained(), step)]
    else:
        scales = [(getattr(guide.locs, name).unconstrained(), value) for name, value in _unpack(step, names, shapes).items()]
        for name, loc in _unpack(mode, names, shapes).items():
            _set_(getattr(guide.locs, name), torch.distributions.constraints.real, loc)
        for name, scale in _unpack(sd, names, shapes).items():
            _set_(getattr(guide.scales, name), guide.scale_constraint, scale)
    return Start("Laplace start (mode by L-BFGS and Newton, scale from the inverse Hessian; location steps scaled by min(1, sd))", scales)


def disperse_(store, *, seed: int, radius: float = 2.0, scale_spread: float = 2.0, step_scales: list = ()) -> list[str]:
    """Move q's locations and scales to a dispersed start, in place; returns the parameters moved.

    Each location of a Gaussian guide (see ``ppvi.convergence.q_scales`` for which parameters
    count as locations) moves by Uniform(-radius, radius) per unconstrained coordinate, Stan's
    default initial radius, added to where restart 0 starts; its scale is multiplied by
    exp(Uniform(-log scale_spread, log scale_spread)). Network weights and other parameters are
    left alone (their random initialisation already differs per seed). After a Laplace start pass its
    ``Start.step_scales``: a location's move is then multiplied by ``min(1, posterior sd)``, so that
    restarts stay within ``radius`` posterior sds (a move of 2 where the sd is 1e-3 would be 2,000 sds,
    far beyond where the preconditioned steps can come back from). Restart 0 is not
    dispersed: it starts where the guide puts it (the Laplace start, or q's location at the point
    whose unconstrained value is 0 and scale ``ppvi.guides.INIT_SCALE``).
    """
    from .convergence import q_scales

    generator = torch.Generator().manual_seed(seed)
    constraints = store.get_state()["constraints"]
    moved = []
    with torch.no_grad():
        known = {id(tensor): scale for tensor, scale in step_scales}
        for name in sorted(q_scales(store)):
            location = store[name].unconstrained()
            move = (2 * torch.rand(location.shape, generator=generator, dtype=location.dtype) - 1).to(location.device) * radius
            location += move * known.get(id(location), 1.0)
            moved.append(name)
        for name in sorted(store.keys()):
            if ".scales." in name or name.endswith("_scale") or name.endswith(".scale"):
                scale = store[name]
                factor = ((2 * torch.rand(scale.shape, generator=generator, dtype=scale.dtype) - 1) * math.log(scale_spread)).exp()
                _set_(scale, constraints[name], scale * factor.to(scale.device))
                moved.append(name)
    return moved


def start_(init: str, model_fn, guide, batch, options) -> Start:
    """Restart 0's start by ``--init``: ``laplace`` (fail if impossible), ``default`` (the guide's own:
    unconstrained 0, scale ``ppvi.guides.INIT_SCALE``) or ``auto``: Laplace for the Gaussian autoguides
    ppvi builds (a gallery guide, ``guide=None``, ``--guide AutoNormal``) whose model has a finite mode
    with a positive definite Hessian, else the guide's own start. An autoguide instance the user made
    (``guide = AutoNormal(model, init_scale=...)``) keeps its own initialisation unless ``laplace`` is asked.
    ``guide`` may be a plain pair's wrapper: its ``autoguide`` attribute is the autoguide inside."""
    if init not in INIT_CHOICES:
        raise UsageError(f"--init must be one of {', '.join(INIT_CHOICES)} (got {init!r}).")
    if init == "default":
        return Start("default start (the guide's own initialisation)")
    if init == "auto" and getattr(guide, "own_instance", False):
        return Start("default start (your own autoguide instance keeps its initialisation; --init laplace starts it at the Laplace approximation)")
    try:
        return laplace_init_(model_fn, getattr(guide, "autoguide", None) or guide, batch, options)
    except (ValueError, RuntimeError, NotImplementedError) as error:
        if init == "laplace":
            raise UsageError(f"--init laplace: the Laplace start is impossible for this model: {error}. Use --init default.") from None
        return Start(f"default start (the Laplace start was impossible: {error})")
