"""What ``ppvi fit`` prints when it is done: per restart the final ELBO, and what was found.

For a small model (at most :data:`MAX_SCALARS` fitted numbers) it lists the fitted parameters
and the guide's posterior means and sds (from draws of the best restart's guide); for a large
one it says where the values are (the run directory's ``params.pt``, ``result.params``).
"""

from __future__ import annotations

import torch

import pyro
import pyro.poutine as poutine

from .batching import num_points
from .data import Batch
from .pyro_util import is_baseline_state

__all__ = ["describe_fit", "posterior_moments", "MAX_SCALARS"]

MAX_SCALARS = 20  # a model with at most this many fitted numbers gets them printed
NUM_DRAWS = 1000  # guide draws behind the printed posterior means and sds (sd of a mean: sd / 31)


def _fitted(params: dict) -> dict:
    return {name: value for name, value in params.items() if not is_baseline_state(name)}


def _format(value: torch.Tensor) -> str:
    value = value.detach().cpu().reshape(-1)
    return ", ".join(f"{float(v):.4g}" for v in value) if value.numel() > 1 else f"{float(value):.4g}"


def posterior_moments(result, restart=None, num_draws: int = NUM_DRAWS) -> dict:
    """``{site: (mean, sd)}`` of the guide's latent sites, from ``num_draws`` draws of a restart's guide.

    The restart's fitted values are loaded into a scoped param store (nothing leaks); sites whose
    draws total more than :data:`MAX_SCALARS` numbers, and guides that cannot be run again here,
    give an empty dict.
    """
    restart = restart or result.best
    data = result.data or {}
    num_data = num_points(data)
    batch = Batch(data, torch.arange(num_data, device=result.device), num_data)
    draws: dict = {}
    try:
        with pyro.get_param_store().scope(), torch.no_grad(), poutine.block():
            store = pyro.get_param_store()
            for name, value in restart.params.items():
                store[name] = value  # constrained values, stored without a constraint: read back as they are
            for _ in range(num_draws):
                trace = poutine.trace(restart.guide_fn).get_trace(batch, result.options)
                for name, site in trace.iter_stochastic_nodes():
                    if site["infer"].get("is_auxiliary"):
                        continue
                    draws.setdefault(name, []).append(site["value"].detach().float().cpu())
                if sum(values[0].numel() for values in draws.values()) > MAX_SCALARS:
                    return {}
    except Exception:  # a guide that needs more than the fitted values (a report is no place to fail)
        return {}
    return {name: (torch.stack(values).mean(0), torch.stack(values).std(0)) for name, values in draws.items()}


def describe_fit(result) -> str:
    """A few lines for the terminal: final ELBO per restart, fitted values (small models) or where to find them."""
    lines = []
    for restart in result.restarts:
        best = " (best)" if restart is result.best and len(result.restarts) > 1 else ""
        per_point = restart.final_elbo / result.config["num_data"] if result.config.get("num_data") else float("nan")
        lines.append(f"restart {restart.restart} (seed {restart.seed}): final ELBO {restart.final_elbo:.6g} "
                     f"({per_point:.4g} per point; median of the last 10% of steps){best}")
    params = _fitted(result.params or {})
    count = sum(value.numel() for value in params.values())
    where = f"{result.run_dir}/params.pt" if result.run_dir is not None else "result.params"
    if count > MAX_SCALARS:
        lines.append(f"{count:,} fitted numbers in {len(params)} parameters: see {where}.")
        return "\n".join(lines)
    if params:
        lines.append("fitted parameters:")
        lines += [f"  {name} = {_format(value)}" for name, value in params.items()]
    moments = posterior_moments(result)
    if moments:
        lines.append(f"posterior (guide, {NUM_DRAWS} draws): mean +- sd")
        for name, (mean, sd) in moments.items():
            if mean.numel() == 1:
                lines.append(f"  {name}: {float(mean):.4g} +- {float(sd):.3g}")
            else:
                pairs = ", ".join(f"{float(m):.4g} +- {float(s):.3g}" for m, s in zip(mean.reshape(-1), sd.reshape(-1)))
                lines.append(f"  {name}: [{pairs}]")
    if not params and not moments:
        lines.append(f"no fitted parameters to show (see {where}).")
    return "\n".join(lines)
