"""HEALPix indices and cone search, checked against astropy separations."""

from __future__ import annotations

from itertools import pairwise

import astropy.units as u
import numpy as np
import pytest
from astropy.coordinates import SkyCoord
from astropy_healpix import HEALPix
from sqlalchemy import insert
from sqlalchemy.orm import Session

from astrid.store.cone import cone_search
from astrid.store.healpix import HEALPIX_NSIDE, HEALPIX_ORDER, cone_ranges, healpix_index
from astrid.store.models import SkyObject

# (ra, dec, radius) of cones: ordinary, straddling RA = 0/360 from both sides, at and near
# both poles, tiny and large.
CONES = [
    (150.0, 2.0, 0.05),
    (0.002, 10.0, 0.01),
    (359.995, -20.0, 3.0 / 3600),
    (45.0, 89.98, 0.05),
    (300.0, -90.0, 0.2),
    (120.0, 30.0, 0.5 / 3600),
    (80.0, -45.0, 12.0),
]


def test_healpix_index_matches_astropy_healpix() -> None:
    rng = np.random.default_rng(1)
    ra = rng.uniform(0, 360, 1000)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, 1000)))
    grid = HEALPix(nside=HEALPIX_NSIDE, order="nested")
    expected = grid.lonlat_to_healpix(ra * u.deg, dec * u.deg)
    np.testing.assert_array_equal(healpix_index(ra, dec), expected)
    # RA is wrapped; coarser NESTED orders are a right shift.
    assert healpix_index(370.0, 5.0) == healpix_index(10.0, 5.0)
    coarse = HEALPix(nside=2**10, order="nested").lonlat_to_healpix(ra * u.deg, dec * u.deg)
    np.testing.assert_array_equal(healpix_index(ra, dec) >> (2 * (HEALPIX_ORDER - 10)), coarse)
    with pytest.raises(ValueError, match="dec"):
        healpix_index(0.0, 91.0)


def test_cone_ranges_are_sorted_disjoint_and_cover_the_sphere_when_huge() -> None:
    ranges = cone_ranges(10.0, 20.0, 1.0)
    assert ranges == sorted(ranges)
    assert all(
        first <= last < next_first - 1 for (first, last), (next_first, _) in pairwise(ranges)
    )
    assert cone_ranges(0.0, 0.0, 180.0) == [(0, 12 * HEALPIX_NSIDE**2 - 1)]
    with pytest.raises(ValueError):
        cone_ranges(0.0, 0.0, -1.0)


def _points_around(rng: np.random.Generator, ra: float, dec: float, radius: float, n: int):
    """Points scattered over about twice the cone, as (ra, dec) arrays in degrees."""
    centre = SkyCoord(ra * u.deg, dec * u.deg)
    position_angle = rng.uniform(0, 360, n) * u.deg
    distance = radius * 2.0 * np.sqrt(rng.uniform(0, 1, n)) * u.deg
    points = centre.directional_offset_by(position_angle, distance)
    return points.ra.deg, points.dec.deg


def test_cone_search_agrees_with_astropy(session: Session) -> None:
    rng = np.random.default_rng(42)
    rows = []
    for ra, dec, radius in CONES:
        point_ra, point_dec = _points_around(rng, ra, dec, radius, 300)
        rows.append((point_ra, point_dec))
    # Uniform background over the sphere: none of it may leak into small cones.
    rows.append((rng.uniform(0, 360, 500), np.degrees(np.arcsin(rng.uniform(-1, 1, 500)))))
    all_ra = np.concatenate([r for r, _ in rows])
    all_dec = np.concatenate([d for _, d in rows])
    # Bulk insert bypasses the ORM events, so the index is filled in here.
    indices = healpix_index(all_ra, all_dec)
    session.execute(
        insert(SkyObject),
        [
            {"ra": float(r), "dec": float(d), "healpix": int(h), "n_detections": 0}
            for r, d, h in zip(all_ra, all_dec, indices, strict=True)
        ],
    )
    session.commit()
    ids = np.array([obj.id for obj in session.query(SkyObject).order_by(SkyObject.id)])
    coords = SkyCoord(all_ra * u.deg, all_dec * u.deg)

    for ra, dec, radius in CONES:
        separation = SkyCoord(ra * u.deg, dec * u.deg).separation(coords).deg
        inside = separation <= radius
        # Points within rounding of the edge may fall either way.
        edge = np.abs(separation - radius) < 1e-10
        matches = cone_search(session, SkyObject, ra, dec, radius)
        found = {m.row.id for m in matches}
        assert set(ids[inside & ~edge]) <= found
        assert found <= set(ids[inside | edge])
        assert len(found) > 50
        by_id = dict(zip(ids.tolist(), separation.tolist(), strict=True))
        np.testing.assert_allclose(
            [m.separation_deg for m in matches], [by_id[m.row.id] for m in matches], atol=1e-9
        )
        assert [m.separation_deg for m in matches] == sorted(m.separation_deg for m in matches)

    nearest = cone_search(session, SkyObject, *CONES[0], limit=3)
    assert len(nearest) == 3
    assert nearest[0].separation_deg <= nearest[-1].separation_deg
    everything = cone_search(session, SkyObject, 0.0, 0.0, 180.0)
    assert len(everything) == len(ids)


def test_cone_search_uses_orm_filled_index_and_extra_conditions(session: Session) -> None:
    session.add_all(
        [
            SkyObject(ra=359.9999, dec=0.0, classification="SN Ia"),
            SkyObject(ra=0.0001, dec=0.0, classification="AGN"),
            SkyObject(ra=0.01, dec=0.0, classification="SN Ia"),
        ]
    )
    session.commit()
    matches = cone_search(session, SkyObject, 0.0, 0.0, 1.0 / 3600)
    assert sorted(m.row.classification or "" for m in matches) == ["AGN", "SN Ia"]
    only_sn = cone_search(
        session, SkyObject, 0.0, 0.0, 1.0 / 3600, where=[SkyObject.classification == "SN Ia"]
    )
    assert [m.row.ra for m in only_sn] == [359.9999]
    assert only_sn[0].separation_deg == pytest.approx(1e-4, rel=1e-6)


def test_cone_search_needs_a_position_model(session: Session) -> None:
    from astrid.store.models import User

    with pytest.raises(TypeError, match="ra"):
        cone_search(session, User, 0.0, 0.0, 1.0)
