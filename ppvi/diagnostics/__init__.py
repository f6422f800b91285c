"""Posterior diagnostics for a fitted guide, with ArviZ.

Draws from the guide go into ArviZ ``InferenceData`` with ``chain`` (= restart)
and ``draw`` dimensions (:mod:`.draws`, laid out by :mod:`.layout`); then:

PSIS k-hat (:mod:`.psis`)
    Pareto k-hat of the importance ratios ``log p(x, z) - log q(z)`` (Yao,
    Vehtari, Simpson & Gelman 2018), from one PSIS fit to the draws of every
    restart pooled, with the per-restart range beside it: below 0.5 the guide is
    good, 0.5-0.7 usable with care, above 0.7 unreliable. The pooled smoothed
    weights give PSIS-corrected posterior means beside the raw ones, shown only
    where the verdict says they can be trusted.
R-hat across restarts (:mod:`.rhat`)
    ``az.rhat`` / ``az.ess`` with restarts as chains: draws within a restart are
    independent, so R-hat > 1.01 means the restarts' guides disagree (different
    modes, or an unfinished fit).
PSIS-LOO (:mod:`.loo`)
    ``az.loo`` on the per-observation log-likelihood (the guide's draws standing
    in for posterior draws), and beside it the estimate corrected for q
    (Magnusson et al. 2019), which stays sound where q's tails are too heavy.
NUTS reference (:mod:`.nuts`)
    Pyro's NUTS on the same model and full data, for models small enough, and a
    table and forest plot of VI against it.

:func:`diagnose` (:mod:`.report`) runs them all and writes the files; the data
plate is found by its size, whatever it is called.

Discrete latent sites. A discrete site inside the data plate with at most
``ENUM_MAX_SUPPORT`` values (a mixture's assignment ``z``) is summed out
exactly in the model, whether the guide samples it (gmm ``meanfield``) or
leaves it to the model (gmm ``map``): ``log p(x, theta)`` and the
per-observation log-likelihood ``log p(x_i | theta)`` are log-sum-exps over its
values, ``log q(theta)`` leaves it out, and it is not in the posterior group.
So k-hat judges the guide's marginal ``q(theta)`` against ``p(theta | x)``.
Other discrete guide sites stay in the joint ratio and in the posterior; a
discrete site that is neither sampled by the guide nor summable is refused.

Local latent sites (one value per data point, as a VAE's codes) with more than
``MAX_LOCAL_VALUES`` values per draw are left out of the posterior group and
the summary, with a line saying so; their densities still enter k-hat and LOO.

Point-estimate guides (Delta sites, e.g. gmm ``map``) have no density against
which to weigh the posterior: k-hat, PSIS means and R-hat are reported as not
applicable for them, with the reason.

References
----------
Yao, Vehtari, Simpson & Gelman (2018). Yes, but did it work?: Evaluating
variational inference. ICML.
Vehtari, Gelman & Gabry (2017). Practical Bayesian model evaluation using
leave-one-out cross-validation and WAIC. Statistics and Computing.
Magnusson, Andersen, Jonasson & Vehtari (2019). Bayesian leave-one-out
cross-validation for large data. ICML.
Vehtari, Gelman, Simpson, Carpenter & Buerkner (2021). Rank-normalization,
folding, and localization: an improved R-hat. Bayesian Analysis.
"""

from __future__ import annotations

from .draws import CHUNK_VALUES, DRAWS_PLATE, MAX_POINTWISE_VALUES, MAX_PREDICTIVE_VALUES, to_inference_data
from .layout import MAX_LOCAL_VALUES, LatentSite, Layout, ObservedSite, build_layout
from .loo import LooReport, loo_report
from .nuts import MAX_NUTS_DATA, MAX_NUTS_LATENT_DIM, NutsComparison, compare_to_reference, nuts_reference, plot_comparison
from .psis import KHAT_GOOD, KHAT_USABLE, MIN_PSIS_DRAWS, VERDICT_TEXT, PsisReport, khat_verdict, psis_diagnostics
from .report import (
    COMPARISON_FILE,
    FOREST_FILE,
    MAX_PRINTED_ROWS,
    POSTERIOR_FILE,
    REPORT_FILE,
    SUMMARY_FILE,
    Diagnosis,
    default_num_samples,
    diagnose,
    format_diagnosis,
)
from .rhat import RHAT_MAX, RestartAgreement, restart_agreement
from .summary import summarize

__all__ = [
    "CHUNK_VALUES",
    "COMPARISON_FILE",
    "DRAWS_PLATE",
    "FOREST_FILE",
    "KHAT_GOOD",
    "KHAT_USABLE",
    "MAX_LOCAL_VALUES",
    "MAX_NUTS_DATA",
    "MAX_NUTS_LATENT_DIM",
    "MAX_POINTWISE_VALUES",
    "MAX_PREDICTIVE_VALUES",
    "MAX_PRINTED_ROWS",
    "MIN_PSIS_DRAWS",
    "POSTERIOR_FILE",
    "REPORT_FILE",
    "RHAT_MAX",
    "SUMMARY_FILE",
    "VERDICT_TEXT",
    "Diagnosis",
    "LatentSite",
    "Layout",
    "LooReport",
    "NutsComparison",
    "ObservedSite",
    "PsisReport",
    "RestartAgreement",
    "build_layout",
    "compare_to_reference",
    "default_num_samples",
    "diagnose",
    "format_diagnosis",
    "khat_verdict",
    "loo_report",
    "nuts_reference",
    "plot_comparison",
    "psis_diagnostics",
    "restart_agreement",
    "summarize",
    "to_inference_data",
]
