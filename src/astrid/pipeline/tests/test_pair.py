"""Preparing a pair: both branches in two processes give what one process gives."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from astrid.errors import CorruptFitsFile, ModelNotAvailable, TooFewStarsForPsf
from astrid.io.fits import write_exposure
from astrid.pipeline.pair import PairConfig, prepare_pair
from astrid.science.simulate import EpochConditions, FieldConfig, simulate_survey

FIELD = FieldConfig(shape=(512, 512), n_stars=400, n_galaxies=80)
CONDITIONS = [
    EpochConditions(fwhm=1.0, exposure_time=120.0, mjd=60000.0),
    EpochConditions(fwhm=1.5, exposure_time=60.0, dx=1.7, dy=-0.8, rotation=0.02, mjd=60010.0),
]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pair")
    survey = simulate_survey(FIELD, seed=5, conditions=CONDITIONS)
    reference, science = folder / "reference.fits", folder / "science.fits"
    write_exposure(survey.exposures[0], reference)
    write_exposure(survey.exposures[1], science)
    return science, reference


def test_two_processes_give_what_one_gives(pair_files: tuple[Path, Path]) -> None:
    science, reference = pair_files
    parallel = prepare_pair(science, reference)
    serial = prepare_pair(science, reference, config=PairConfig(parallel=False))
    for a, b in ((parallel.science, serial.science), (parallel.reference, serial.reference)):
        np.testing.assert_array_equal(a.exposure.data, b.exposure.data)
        np.testing.assert_array_equal(a.exposure.mask, b.exposure.mask)
        assert a.exposure.psf is not None and b.exposure.psf is not None
        np.testing.assert_array_equal(a.exposure.psf.stamps, b.exposure.psf.stamps)
        assert len(a.stars) == len(b.stars) > 10
    np.testing.assert_array_equal(parallel.alignment.aligned.data, serial.alignment.aligned.data)
    assert parallel.alignment.rms_pix == serial.alignment.rms_pix < 0.1
    assert parallel.science.exposure.shape == parallel.alignment.aligned.shape
    assert set(parallel.seconds) == {"science", "reference", "branches", "align"}


def test_an_error_in_the_reference_branch_reaches_the_caller_typed(
    pair_files: tuple[Path, Path], tmp_path: Path
) -> None:
    science, reference = pair_files
    broken = tmp_path / "broken.fits"
    broken.write_bytes(reference.read_bytes()[:5000])  # truncated
    with pytest.raises(CorruptFitsFile) as caught:
        prepare_pair(science, broken)
    assert str(broken) in str(caught.value)


@pytest.mark.parametrize(
    "error",
    [
        TooFewStarsForPsf(3, 10),
        ModelNotAvailable("real_bogus", "no bundle"),
        CorruptFitsFile("x.fits", "truncated"),
    ],
)
def test_typed_errors_survive_pickling(error: Exception) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)
