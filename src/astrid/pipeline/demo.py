"""The demo: a simulated field with known transients, through the whole pipeline.

:func:`simulate_demo_field` draws a field (stars, galaxies, detector defects) and
observes it at several epochs, three days apart: a sharp, deep first epoch (which the
reference rule picks) and shallower epochs with varied seeing, sky, transparency and
pointing. Three sources change:

- a **rising supernova** on a galaxy, exploding just after the first epoch and still
  brightening at the last;
- a **variable star** (a field star whose brightness oscillates);
- a **new source** that appears half-way through.

The images are written as FITS with the truth beside them; the caller ingests and
processes them like any user's files, then :func:`recover_transients` matches the
injected positions to the objects found.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from astrid.io.fits import write_exposure
from astrid.science.simulate import (
    EpochConditions,
    FieldConfig,
    TransientSpec,
    simulate_field,
    simulate_survey,
)
from astrid.store.cone import cone_search
from astrid.store.models import Candidate, ModelScore, SkyObject

__all__ = ["DemoField", "Recovery", "recover_transients", "simulate_demo_field"]

#: Stars and galaxies per 1024x1024 pixels (as ``astrid simulate``).
_STARS_PER_MPIX = 1000
_GALAXIES_PER_MPIX = 300
_START_MJD = 60000.0
_CADENCE_DAYS = 3.0


@dataclass(frozen=True)
class DemoField:
    """The demo's simulated images and truth.

    Attributes
    ----------
    images : tuple of Path
        One FITS file per epoch, in time order.
    transients : tuple of TransientSpec
        What was injected.
    labels : tuple of str
        A short description of each transient.
    mjds : tuple of float
        Time of each epoch (MJD, UTC).
    seconds : float
        Time the simulation and writing took.
    """

    images: tuple[Path, ...]
    transients: tuple[TransientSpec, ...]
    labels: tuple[str, ...]
    mjds: tuple[float, ...]
    seconds: float


def _conditions(epochs: int, seed: int) -> list[EpochConditions]:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
    out = [
        EpochConditions(
            fwhm=0.9, exposure_time=120.0, sky_brightness=21.2, mjd=_START_MJD, airmass=1.05
        )
    ]
    seeing = (1.2, 1.0, 1.4, 1.1, 1.3)
    for k in range(1, epochs):
        out.append(
            EpochConditions(
                fwhm=seeing[(k - 1) % len(seeing)],
                exposure_time=60.0,
                sky_brightness=float(rng.uniform(20.8, 21.2)),
                transparency=float(rng.uniform(0.85, 1.0)),
                dx=float(rng.uniform(-3.0, 3.0)),
                dy=float(rng.uniform(-3.0, 3.0)),
                rotation=float(rng.uniform(-0.03, 0.03)),
                mjd=_START_MJD + _CADENCE_DAYS * k + float(rng.uniform(-0.2, 0.2)),
                airmass=1.0 + float(rng.uniform(0.0, 0.3)),
            )
        )
    return out


def _transients(
    config: FieldConfig, seed: int, mjds: list[float]
) -> tuple[list[TransientSpec], list[str]]:
    """A rising supernova on a galaxy, a variable field star, and an appearing source."""
    field = simulate_field(config, seed=seed)
    ny, nx = config.shape
    margin = 0.15 * min(nx, ny)

    def inside(table: Table) -> np.ndarray:
        x, y = np.asarray(table["x"]), np.asarray(table["y"])
        return (x > margin) & (x < nx - 1 - margin) & (y > margin) & (y < ny - 1 - margin)

    galaxies = field.galaxies
    gmag = np.asarray(galaxies["mag"])
    hosts = np.flatnonzero(inside(galaxies) & (gmag > 18.0) & (gmag < 21.0))
    if len(hosts) < 2:
        hosts = np.flatnonzero(inside(galaxies))
    stars = field.stars
    smag = np.asarray(stars["mag"])
    pool = np.flatnonzero(inside(stars) & (smag > 17.0) & (smag < 19.5))
    if len(hosts) < 2 or not len(pool):
        raise ValueError(f"a {nx}x{ny} demo field is too small to place the transients")
    host = int(hosts[np.argmin(np.abs(gmag[hosts] - 19.0))])
    second = int(hosts[np.argmax(np.abs(np.asarray(galaxies["x"])[hosts] - galaxies["x"][host]))])
    star = int(pool[np.argmin(np.abs(smag[pool] - 18.3))])
    # Offset the supernova from its host's centre by about an arcsec.
    offset = 1.0 / 3600.0
    sn_ra = float(galaxies["ra"][host]) + offset / math.cos(math.radians(config.dec))
    sn_dec = float(galaxies["dec"][host]) + 0.5 * offset
    span = mjds[-1] - mjds[0]
    supernova = TransientSpec(
        kind="supernova",
        ra=sn_ra,
        dec=sn_dec,
        mag=19.0,
        t0=mjds[0] + 1.0,
        rise_time=max(10.0, span + 2.0),
        decline_rate=0.03,
        host_galaxy=int(galaxies["id"][host]),
    )
    variable = TransientSpec(
        kind="variable",
        ra=float(stars["ra"][star]),
        dec=float(stars["dec"][star]),
        mag=float(smag[star]),
        t0=mjds[0],
        period=5.3,
        amplitude=0.5,
        host_star=int(stars["id"][star]),
    )
    appearing = TransientSpec(
        kind="appearing",
        ra=float(galaxies["ra"][second]),
        dec=float(galaxies["dec"][second]),
        mag=19.8,
        t0=mjds[len(mjds) // 2] - 0.5,
        host_galaxy=int(galaxies["id"][second]),
    )
    labels = ["rising supernova", "variable star", "appearing source"]
    return [supernova, variable, appearing], labels


def simulate_demo_field(
    folder: str | Path, *, size: int = 1024, epochs: int = 6, seed: int = 0
) -> DemoField:
    """Simulate the demo field and write ``images/epoch_NNN.fits`` and the truth tables.

    Parameters
    ----------
    folder : str or Path
        Where ``images/``, ``transients.csv`` (one row per transient per epoch it is in)
        and ``epochs.csv`` go; created if absent.
    size : int
        Side of the square images, pixels.
    epochs : int
        Number of epochs (at least 3).
    seed : int
        Seed; the same seed writes identical files.

    Returns
    -------
    DemoField
        The image paths and what was injected.
    """
    if epochs < 3:
        raise ValueError(f"the demo needs at least 3 epochs, got {epochs}")
    start = time.perf_counter()
    out = Path(folder)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    area = (size / 1024.0) ** 2
    config = FieldConfig(
        shape=(size, size),
        n_stars=round(_STARS_PER_MPIX * area),
        n_galaxies=round(_GALAXIES_PER_MPIX * area),
    )
    conditions = _conditions(epochs, seed)
    mjds = [c.mjd for c in conditions]
    specs, labels = _transients(config, seed, mjds)
    survey = simulate_survey(config, seed=seed, conditions=conditions, transients=specs)
    paths = []
    for k, epoch in enumerate(survey.epochs):
        path = images / f"epoch_{k:03d}.fits"
        write_exposure(epoch.exposure, path, overwrite=True)
        paths.append(path)
    survey.transients.write(out / "transients.csv", format="ascii.csv", overwrite=True)
    survey.epoch_table.write(out / "epochs.csv", format="ascii.csv", overwrite=True)
    return DemoField(
        images=tuple(paths),
        transients=tuple(specs),
        labels=tuple(labels),
        mjds=tuple(mjds),
        seconds=time.perf_counter() - start,
    )


@dataclass(frozen=True)
class Recovery:
    """Whether an injected transient was found as an object.

    Attributes
    ----------
    label : str
        Description of the transient.
    spec : TransientSpec
        What was injected.
    object_id : int or None
        The nearest object within the radius (``None``: not recovered).
    separation_arcsec : float or None
        Distance from the true position to that object's mean position.
    n_detections : int
        Candidates associated with that object.
    n_changed_epochs : int
        Epochs, other than the reference epoch, in which the source's brightness differs
        from that in the reference (the most it can be detected in).
    magnitudes : tuple of float
        Difference magnitudes of the object's positive detections, in time order.
    scores : tuple of float
        Real/bogus scores of the object's detections by the model asked for, in time
        order (empty without a model).
    """

    label: str
    spec: TransientSpec
    object_id: int | None
    separation_arcsec: float | None
    n_detections: int
    n_changed_epochs: int
    magnitudes: tuple[float, ...]
    scores: tuple[float, ...] = ()

    @property
    def recovered(self) -> bool:
        """Whether an object was found within the radius."""
        return self.object_id is not None


def recover_transients(
    session: Session,
    field: DemoField,
    *,
    reference_mjd: float,
    radius_arcsec: float = 1.0,
    model: tuple[str, str] | None = None,
) -> list[Recovery]:
    """Match each injected transient to the nearest object within ``radius_arcsec``.

    Parameters
    ----------
    session : Session
        Open session on the demo's database.
    field : DemoField
        The simulation.
    reference_mjd : float
        Time of the epoch used as the reference.
    radius_arcsec : float
        Match radius.
    model : (str, str) or None
        Name and version of the real/bogus model whose scores to report.
    """
    out = []
    for spec, label in zip(field.transients, field.labels, strict=True):
        base = spec.magnitude_at(reference_mjd)
        changed = sum(
            1 for mjd in field.mjds if mjd != reference_mjd and spec.magnitude_at(mjd) != base
        )
        matches = cone_search(
            session, SkyObject, spec.ra, spec.dec, radius_arcsec / 3600.0, limit=1
        )
        if not matches:
            out.append(Recovery(label, spec, None, None, 0, changed, ()))
            continue
        sky_object = matches[0].row
        mags = tuple(
            float(m or 0.0)
            for m in session.scalars(
                select(Candidate.mag)
                .where(
                    Candidate.object_id == sky_object.id,
                    Candidate.is_negative.is_(False),
                    Candidate.mag.is_not(None),
                )
                .order_by(Candidate.mjd)
            )
        )
        scores: tuple[float, ...] = ()
        if model is not None:
            scores = tuple(
                float(v)
                for v in session.scalars(
                    select(ModelScore.score)
                    .join(Candidate, ModelScore.candidate_id == Candidate.id)
                    .where(
                        Candidate.object_id == sky_object.id,
                        ModelScore.model_name == model[0],
                        ModelScore.model_version == model[1],
                    )
                    .order_by(Candidate.mjd)
                )
            )
        out.append(
            Recovery(
                label,
                spec,
                sky_object.id,
                matches[0].separation_deg * 3600.0,
                sky_object.n_detections,
                changed,
                mags,
                scores,
            )
        )
    return out
