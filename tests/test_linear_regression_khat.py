"""k-hat separates a mean-field guide from a full-rank one on a Gaussian posterior (issue: diagnostics).

With correlated features the exact posterior of Bayesian linear regression is a correlated
Gaussian. The full-rank guide contains it, so the importance ratios p/q are nearly constant
(k-hat well below 0.5); the mean-field guide is narrower than the posterior along the
correlated directions, which gives the ratios a heavy right tail and a larger k-hat
(Yao et al. 2018, section 3).
"""

import pytest
import torch

import ppvi
from ppvi.diagnostics import psis_diagnostics, to_inference_data

pytestmark = pytest.mark.statistical


@pytest.fixture(scope="module")
def khats():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        values = {}
        for guide in ("meanfield", "fullrank"):
            result = ppvi.fit("linear_regression", guide=guide, steps=3000, num_particles=8, seed=0)
            values[guide] = psis_diagnostics(to_inference_data(result, num_samples=4000, seed=1)).khat_pooled
        return values
    finally:
        torch.set_num_threads(previous)


def test_full_rank_guide_on_a_gaussian_posterior_has_a_good_khat(khats):
    assert khats["fullrank"] < 0.5


def test_mean_field_guide_has_a_higher_khat_than_the_full_rank_one(khats):
    print(khats)
    assert khats["meanfield"] > khats["fullrank"] + 0.2
