"""Reference selection rule and coadd."""

from __future__ import annotations

import numpy as np
import pytest

from astrid.errors import ShapeMismatch
from astrid.science.reference import (
    EpochSummary,
    NoEligibleReference,
    ReferenceConfig,
    choose_reference,
    coadd,
)


def test_deepest_among_sharp_epochs_wins() -> None:
    epochs = [
        EpochSummary("blurred-but-deep", fwhm_pix=6.0, limiting_mag=23.5),
        EpochSummary("sharp", fwhm_pix=3.0, limiting_mag=22.0),
        EpochSummary("sharp-and-deep", fwhm_pix=3.5, limiting_mag=22.8),
        EpochSummary("failed", fwhm_pix=2.5, limiting_mag=24.0, passed=False),
    ]
    choice = choose_reference(epochs)
    assert choice.keys == ("sharp-and-deep",)
    assert choice.ranking == ("sharp-and-deep", "sharp", "blurred-but-deep")
    assert "22.80" in choice.reason
    two = choose_reference(epochs, config=ReferenceConfig(n_coadd=2))
    assert two.keys == ("sharp-and-deep", "sharp")


def test_no_eligible_epoch() -> None:
    with pytest.raises(NoEligibleReference) as info:
        choose_reference([EpochSummary("a", 3.0, 22.0, passed=False)])
    assert info.value.n_epochs == 1


def test_coadd_of_noise_has_the_predicted_variance() -> None:
    rng = np.random.default_rng(2)
    sig = [1.0, 2.0, 3.0]
    imgs = [rng.normal(10.0, s, (300, 300)) for s in sig]
    res = coadd(imgs, [np.full((300, 300), s**2) for s in sig])
    expected_var = 1.0 / sum(1.0 / s**2 for s in sig)
    assert float(res.variance[0, 0]) == pytest.approx(expected_var, rel=1e-6)
    assert np.std(res.data) == pytest.approx(np.sqrt(expected_var), rel=0.02)
    assert np.mean(res.data) == pytest.approx(10.0, abs=0.01)
    masks = [np.zeros((300, 300), bool) for _ in sig]
    masks[0][0, 0] = True
    res2 = coadd(
        imgs, [np.full((300, 300), s**2) for s in sig], masks=masks, scales=[1.0, 2.0, 1.0]
    )
    assert res2.n_inputs[0, 0] == 2 and res2.n_inputs[1, 1] == 3
    with pytest.raises(ShapeMismatch):
        coadd([imgs[0], imgs[1][:10]], [imgs[0], imgs[1]])
