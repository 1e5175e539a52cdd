"""Association of detections into objects, on positions worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from astropy.coordinates import SkyCoord, angular_separation

from astrid.science.associate import associate_positions

ARCSEC = 1.0 / 3600.0


def test_close_detections_form_one_object_and_a_far_one_another() -> None:
    # Three detections within 0.3" of (10, 0), one 5" east.
    ra = [10.0, 10.0 + 0.2 * ARCSEC, 10.0 - 0.1 * ARCSEC, 10.0 + 5.0 * ARCSEC]
    dec = [0.0, 0.1 * ARCSEC, -0.2 * ARCSEC, 0.0]
    a = associate_positions(ra, dec, radius_arcsec=1.0)
    assert a.object_index.tolist() == [0, 0, 0, 1]
    assert a.n_members.tolist() == [3, 1]
    assert a.n_existing == 0 and a.n_new == 2
    # At the equator the mean of tiny offsets is their arithmetic mean.
    assert a.ra[0] == pytest.approx(10.0 + (0.2 - 0.1) / 3 * ARCSEC, abs=1e-10)
    assert a.dec[0] == pytest.approx((0.1 - 0.2) / 3 * ARCSEC, abs=1e-10)
    assert a.ra[1] == pytest.approx(10.0 + 5.0 * ARCSEC, abs=1e-12)


def test_radius_is_inclusive_of_nearby_and_exclusive_beyond() -> None:
    a = associate_positions([0.0, 0.0], [0.0, 0.99 * ARCSEC], radius_arcsec=1.0)
    assert a.object_index.tolist() == [0, 0]
    b = associate_positions([0.0, 0.0], [0.0, 1.01 * ARCSEC], radius_arcsec=1.0)
    assert b.object_index.tolist() == [0, 1]


def test_right_ascension_wraps_at_zero() -> None:
    # 359.99995 and 0.00005 deg at the equator are 0.36" apart.
    a = associate_positions([359.99995, 0.00005], [0.0, 0.0], radius_arcsec=1.0)
    assert a.object_index.tolist() == [0, 0]
    assert min(a.ra[0], 360.0 - a.ra[0]) == pytest.approx(0.0, abs=1e-9)


def test_near_the_pole_right_ascension_differences_are_small_on_the_sky() -> None:
    # At dec 89.9999 deg, 90 deg of RA is 0.36 * sqrt(2) ~ 0.51" on the sky.
    dec = 89.9999
    a = associate_positions([0.0, 90.0], [dec, dec], radius_arcsec=1.0)
    sep = SkyCoord(0.0, dec, unit="deg").separation(SkyCoord(90.0, dec, unit="deg")).arcsec
    assert sep < 1.0
    assert a.object_index.tolist() == [0, 0]


def test_a_detection_joins_the_nearest_of_two_objects() -> None:
    objects_ra = [20.0, 20.0 + 1.5 * ARCSEC]
    a = associate_positions(
        [20.0 + 0.9 * ARCSEC],
        [0.0],
        radius_arcsec=1.0,
        object_ra=objects_ra,
        object_dec=[0.0, 0.0],
    )
    assert a.object_index.tolist() == [1]  # 0.6" from the second, 0.9" from the first
    assert a.n_new == 0


def test_existing_objects_are_weighted_by_their_counts() -> None:
    # An object of 3 detections at dec 0 gains one at +0.4": the mean moves by 0.1".
    a = associate_positions(
        [30.0],
        [0.4 * ARCSEC],
        radius_arcsec=1.0,
        object_ra=[30.0],
        object_dec=[0.0],
        object_counts=[3],
    )
    assert a.object_index.tolist() == [0]
    assert a.n_members.tolist() == [4]
    assert a.dec[0] == pytest.approx(0.1 * ARCSEC, abs=1e-10)


def test_associating_in_two_batches_equals_associating_at_once() -> None:
    rng = np.random.default_rng(4)
    centres = rng.uniform(0, 0.01, (20, 2))
    ra = np.concatenate([centres[:, 0] + rng.normal(0, 0.15 * ARCSEC, 20) for _ in range(4)])
    dec = np.concatenate([centres[:, 1] + rng.normal(0, 0.15 * ARCSEC, 20) for _ in range(4)])
    once = associate_positions(ra, dec, radius_arcsec=1.0)
    first = associate_positions(ra[:40], dec[:40], radius_arcsec=1.0)
    second = associate_positions(
        ra[40:],
        dec[40:],
        radius_arcsec=1.0,
        object_ra=first.ra,
        object_dec=first.dec,
        object_counts=first.n_members,
    )
    combined = np.concatenate([first.object_index, second.object_index])
    assert combined.tolist() == once.object_index.tolist()
    assert second.n_members.tolist() == once.n_members.tolist()
    np.testing.assert_allclose(second.ra, once.ra, atol=1e-12)
    assert once.n_new == 20


def _brute_force(ra: np.ndarray, dec: np.ndarray, radius_arcsec: float) -> list[int]:
    """The same rule, O(n^2), with astropy's separation formula (Vincenty)."""
    sums: list[np.ndarray] = []
    index = []
    for r, d in zip(ra, dec, strict=True):
        v = np.array(
            [
                math.cos(math.radians(d)) * math.cos(math.radians(r)),
                math.cos(math.radians(d)) * math.sin(math.radians(r)),
                math.sin(math.radians(d)),
            ]
        )
        best, best_sep = -1, math.inf
        for k, s in enumerate(sums):
            m = s / np.linalg.norm(s)
            mra = math.degrees(math.atan2(m[1], m[0])) % 360.0
            mdec = math.degrees(math.asin(m[2]))
            sep = (
                math.degrees(
                    angular_separation(
                        math.radians(r), math.radians(d), math.radians(mra), math.radians(mdec)
                    )
                )
                * 3600.0
            )
            if sep <= radius_arcsec and sep < best_sep:
                best, best_sep = k, sep
        if best < 0:
            sums.append(v)
            index.append(len(sums) - 1)
        else:
            sums[best] = sums[best] + v
            index.append(best)
    return index


def test_matches_a_brute_force_association_with_astropy_separations() -> None:
    rng = np.random.default_rng(9)
    n = 60
    # Crowded: sources about 2" apart, scattered by 0.4", so the choice is often close.
    centres_ra = 150.0 + rng.uniform(0, 10 * ARCSEC, 15)
    centres_dec = 2.0 + rng.uniform(0, 10 * ARCSEC, 15)
    pick = rng.integers(0, 15, n)
    ra = centres_ra[pick] + rng.normal(0, 0.4 * ARCSEC, n)
    dec = centres_dec[pick] + rng.normal(0, 0.4 * ARCSEC, n)
    a = associate_positions(ra, dec, radius_arcsec=1.0)
    assert a.object_index.tolist() == _brute_force(ra, dec, 1.0)


def test_invalid_input_is_refused() -> None:
    with pytest.raises(ValueError, match="radius"):
        associate_positions([0.0], [0.0], radius_arcsec=0.0)
    with pytest.raises(ValueError, match="finite"):
        associate_positions([np.nan], [0.0], radius_arcsec=1.0)
    with pytest.raises(ValueError, match="declinations"):
        associate_positions([0.0], [91.0], radius_arcsec=1.0)
    with pytest.raises(ValueError, match="counts"):
        associate_positions(
            [0.0], [0.0], radius_arcsec=1.0, object_ra=[0.0], object_dec=[0.0], object_counts=[0]
        )


def test_no_detections_keeps_the_existing_objects() -> None:
    a = associate_positions([], [], radius_arcsec=1.0, object_ra=[1.0], object_dec=[2.0])
    assert a.object_index.shape == (0,)
    assert a.n_existing == 1 and a.n_new == 0
    assert a.ra.tolist() == pytest.approx([1.0]) and a.dec.tolist() == pytest.approx([2.0])
