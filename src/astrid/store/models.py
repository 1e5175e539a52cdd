"""Database models: every table AstrID keeps, as SQLAlchemy 2 typed mappings.

The same models and migrations run on SQLite (the default, one file) and PostgreSQL:
types are portable (see :mod:`astrid.store.types`), enums are strings with ``CHECK``
constraints, timestamps are timezone-aware UTC, JSON documents are ``JSON`` (``JSONB`` on
PostgreSQL). Constraint and index names follow :data:`NAMING_CONVENTION`, so migrations
can refer to them on both engines.

Conventions
-----------
- Sky positions are ICRS ``ra``/``dec`` in degrees, with ``healpix`` (NESTED, order 29;
  :mod:`astrid.store.healpix`) filled in automatically from them on every ORM flush.
  Bulk inserts that bypass the ORM unit of work (``session.execute(insert(...), rows)``)
  must fill it themselves with :func:`~astrid.store.healpix.healpix_index`.
- Pixel positions (``x``, ``y``) are 0-based pixel centres, as everywhere in AstrID.
- Files (images, cutouts) live in an artifact store; rows hold their content-addressed
  ``*_artifact_key`` (:mod:`astrid.store.artifacts`), never paths.
- Times of observation are Modified Julian Dates on the UTC scale (``mjd`` columns);
  bookkeeping times (``created_at``, ``started_at``, ...) are aware UTC datetimes.
- JSON columns are not mutation-tracked: assign a new dict rather than editing one in
  place.
- Uniqueness is what makes re-running a stage idempotent: an observation's content hash,
  a candidate's (difference, detection index), a score's (candidate, model, version).
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column, relationship
from sqlalchemy.sql import func

from astrid.store.healpix import healpix_index
from astrid.store.types import ID_TYPE, JSON_TYPE, UtcDateTime, string_enum, utcnow

__all__ = [
    "NAMING_CONVENTION",
    "ApiKey",
    "AuditEvent",
    "Base",
    "CalibrationFrame",
    "CalibrationKind",
    "Candidate",
    "CatalogEntry",
    "Cutout",
    "CutoutKind",
    "DifferenceImage",
    "Instrument",
    "ModelScore",
    "Observation",
    "ObservationStatus",
    "ProcessingRun",
    "ReferenceImage",
    "RunStatus",
    "SkyField",
    "SkyObject",
    "SubtractionMethod",
    "Survey",
    "User",
    "UserRole",
    "VettingEvent",
    "VettingLabel",
]

#: Constraint and index names, identical on every engine (Alembic batch mode needs them).
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SHA256_LENGTH = 64
KEY_LENGTH = 255


class Base(DeclarativeBase):
    """Declarative base of every AstrID table; ``Base.metadata`` is the schema."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# --------------------------------------------------------------------------- enums


class ObservationStatus(enum.StrEnum):
    """Where an observation is in the pipeline."""

    REGISTERED = "registered"
    """Recorded and its file stored; nothing done yet."""
    CALIBRATED = "calibrated"
    """Instrument signature removed (bias, dark, flat, cosmic rays)."""
    CHARACTERIZED = "characterized"
    """Background, PSF and quality measured, and the quality gate passed."""
    SUBTRACTED = "subtracted"
    """A difference image against a reference exists."""
    PROCESSED = "processed"
    """Candidates detected, measured and scored."""
    FAILED = "failed"
    """A stage raised an error; ``failure_reason`` says which and why."""
    REJECTED = "rejected"
    """Failed the data-quality gate (seeing, depth, ...); ``failure_reason`` has the numbers."""


class CalibrationKind(enum.StrEnum):
    """Kind of master calibration frame."""

    BIAS = "bias"
    """Zero-second exposure level and structure."""
    DARK = "dark"
    """Dark current per second."""
    FLAT = "flat"
    """Pixel-to-pixel and illumination response, per band."""
    FRINGE = "fringe"
    """Fringe pattern of red bands, per band."""
    MASK = "mask"
    """Bad-pixel mask."""


class RunStatus(enum.StrEnum):
    """State of one processing run (one stage applied to its inputs)."""

    PENDING = "pending"
    """Planned, not started."""
    RUNNING = "running"
    """Started, not finished."""
    SUCCEEDED = "succeeded"
    """Finished and wrote its outputs."""
    FAILED = "failed"
    """Raised an error; ``error_type`` and ``error_message`` say what."""
    CANCELLED = "cancelled"
    """Stopped before finishing, by a user or a shutdown."""


class SubtractionMethod(enum.StrEnum):
    """Image-subtraction algorithm of a difference image."""

    ZOGY = "zogy"
    """Zackay, Ofek & Gal-Yam (2016) proper image subtraction."""
    ALARD_LUPTON = "alard_lupton"
    """Alard & Lupton (1998) kernel matching."""


class CutoutKind(enum.StrEnum):
    """Which image a cutout stamp was cut from."""

    SCIENCE = "science"
    """The calibrated science exposure."""
    REFERENCE = "reference"
    """The reference, resampled onto the science grid."""
    DIFFERENCE = "difference"
    """The difference image."""
    SCORE = "score"
    """The detection-significance (ZOGY score) image."""


class VettingLabel(enum.StrEnum):
    """A person's verdict on a candidate."""

    REAL = "real"
    """An astrophysical change in the sky."""
    BOGUS = "bogus"
    """An artefact: bad subtraction, cosmic ray, defect, satellite, ..."""
    UNSURE = "unsure"
    """Cannot tell from the data shown."""


class UserRole(enum.StrEnum):
    """What a user may do."""

    VIEWER = "viewer"
    """Read candidates, objects and the catalog."""
    VETTER = "vetter"
    """Also label candidates and confirm catalog entries."""
    ADMIN = "admin"
    """Also manage users, keys and pipeline runs."""


# --------------------------------------------------------------------------- helpers


def _created_at() -> Mapped[datetime]:
    return mapped_column(
        UtcDateTime(),
        default=utcnow,
        server_default=func.now(),
        nullable=False,
        doc="When the row was created (UTC).",
    )


def _updated_at() -> Mapped[datetime]:
    return mapped_column(
        UtcDateTime(),
        default=utcnow,
        onupdate=utcnow,
        server_default=func.now(),
        nullable=False,
        doc="When the row was last changed through the ORM (UTC).",
    )


def _id() -> Mapped[int]:
    return mapped_column(ID_TYPE, primary_key=True, doc="Surrogate primary key.")


# --------------------------------------------------------------------------- instruments


class Survey(Base):
    """A survey or data source that observations come from (ZTF, DECam DDF, a user's own)."""

    __tablename__ = "surveys"

    id: Mapped[int] = _id()
    name: Mapped[str] = mapped_column(
        String(64), unique=True, doc="Short unique name (``ztf``, ``decam-ddf``, ``local``)."
    )
    description: Mapped[str | None] = mapped_column(Text, doc="Free-text description.")
    url: Mapped[str | None] = mapped_column(String(512), doc="Home page or archive address.")
    created_at: Mapped[datetime] = _created_at()

    fields: Mapped[list[SkyField]] = relationship(
        back_populates="survey", doc="The survey's fields (pointings or tiles)."
    )


class Instrument(Base):
    """A camera on a telescope."""

    __tablename__ = "instruments"

    id: Mapped[int] = _id()
    name: Mapped[str] = mapped_column(
        String(64), unique=True, doc="Instrument name as headers give it (``DECam``, ``ZTF``)."
    )
    telescope: Mapped[str | None] = mapped_column(
        String(128), doc="Telescope name (``CTIO-4m``, ``P48``)."
    )
    pixel_scale_arcsec: Mapped[float | None] = mapped_column(
        Double, doc="Nominal pixel scale in arcsec per pixel."
    )
    description: Mapped[str | None] = mapped_column(Text, doc="Free-text description.")
    created_at: Mapped[datetime] = _created_at()


class SkyField(Base):
    """A field: a survey pointing or tile that is imaged repeatedly."""

    __tablename__ = "fields"
    __table_args__ = (UniqueConstraint("survey_id", "name"),)

    id: Mapped[int] = _id()
    survey_id: Mapped[int] = mapped_column(
        ID_TYPE,
        ForeignKey("surveys.id", ondelete="RESTRICT"),
        doc="Survey the field belongs to.",
    )
    name: Mapped[str] = mapped_column(
        String(128), doc="Field name, unique within its survey (``COSMOS``, ``000245``)."
    )
    ra: Mapped[float] = mapped_column(Double, doc="Field centre right ascension, ICRS degrees.")
    dec: Mapped[float] = mapped_column(Double, doc="Field centre declination, ICRS degrees.")
    healpix: Mapped[int | None] = mapped_column(
        ID_TYPE, index=True, doc="HEALPix index of the centre (NESTED, order 29), from ra/dec."
    )
    radius_deg: Mapped[float | None] = mapped_column(
        Double, doc="Radius of a circle enclosing the field's footprint, in degrees."
    )
    description: Mapped[str | None] = mapped_column(Text, doc="Free-text description.")
    created_at: Mapped[datetime] = _created_at()

    survey: Mapped[Survey] = relationship(back_populates="fields", doc="The survey.")


# --------------------------------------------------------------------------- images


class Observation(Base):
    """One science exposure: its file, metadata, quality and pipeline status."""

    __tablename__ = "observations"
    __table_args__ = (
        Index("ix_observations_field_band_mjd", "field_id", "band", "mjd"),
        Index("ix_observations_status", "status"),
    )

    id: Mapped[int] = _id()
    sha256: Mapped[str] = mapped_column(
        String(SHA256_LENGTH),
        unique=True,
        doc="Hex SHA-256 of the raw file's bytes; registering the same file twice is refused.",
    )
    artifact_key: Mapped[str] = mapped_column(
        String(KEY_LENGTH), doc="Artifact-store key of the raw file as received."
    )
    calibrated_artifact_key: Mapped[str | None] = mapped_column(
        String(KEY_LENGTH), doc="Artifact-store key of the calibrated exposure, once made."
    )
    original_name: Mapped[str | None] = mapped_column(
        String(1024), doc="File name or archive URI the file was registered from."
    )
    survey_id: Mapped[int | None] = mapped_column(
        ID_TYPE,
        ForeignKey("surveys.id", ondelete="SET NULL"),
        index=True,
        doc="Survey it belongs to, if known.",
    )
    instrument_id: Mapped[int | None] = mapped_column(
        ID_TYPE,
        ForeignKey("instruments.id", ondelete="SET NULL"),
        index=True,
        doc="Instrument that took it, if known.",
    )
    field_id: Mapped[int | None] = mapped_column(
        ID_TYPE,
        ForeignKey("fields.id", ondelete="SET NULL"),
        doc="Field it covers, if assigned.",
    )
    band: Mapped[str | None] = mapped_column(
        String(32), doc="Filter or band name as the instrument writes it; NULL if unknown."
    )
    mjd: Mapped[float | None] = mapped_column(
        Double,
        index=True,
        doc="Modified Julian Date (UTC scale) of the start of the exposure; NULL if unknown.",
    )
    obs_time: Mapped[datetime | None] = mapped_column(
        UtcDateTime(), doc="Start of the exposure as a UTC timestamp (the same instant as mjd)."
    )
    exposure_time: Mapped[float | None] = mapped_column(Double, doc="Exposure time in seconds.")
    ra: Mapped[float | None] = mapped_column(
        Double, doc="Right ascension of the image centre, ICRS degrees (NULL without a WCS)."
    )
    dec: Mapped[float | None] = mapped_column(
        Double, doc="Declination of the image centre, ICRS degrees (NULL without a WCS)."
    )
    healpix: Mapped[int | None] = mapped_column(
        ID_TYPE,
        index=True,
        doc="HEALPix index of the image centre (NESTED, order 29), from ra/dec.",
    )
    width: Mapped[int | None] = mapped_column(Integer, doc="Image width (nx) in pixels.")
    height: Mapped[int | None] = mapped_column(Integer, doc="Image height (ny) in pixels.")
    airmass: Mapped[float | None] = mapped_column(Double, doc="Airmass at the start.")
    seeing_fwhm_arcsec: Mapped[float | None] = mapped_column(
        Double, doc="Measured PSF FWHM in arcsec (after characterisation)."
    )
    limiting_magnitude: Mapped[float | None] = mapped_column(
        Double, doc="5-sigma point-source limiting magnitude (after characterisation)."
    )
    zero_point: Mapped[float | None] = mapped_column(
        Double, doc="Photometric zero point: magnitude of 1 ADU in total over the exposure."
    )
    status: Mapped[ObservationStatus] = mapped_column(
        string_enum(ObservationStatus, "observation_status"),
        default=ObservationStatus.REGISTERED,
        doc="Pipeline status.",
    )
    failure_reason: Mapped[str | None] = mapped_column(
        Text, doc="Why it failed or was rejected (the typed error's message, with numbers)."
    )
    quality: Mapped[dict[str, Any] | None] = mapped_column(
        JSON_TYPE, doc="Quality metrics by name (seeing, depth, background, n_stars, ...)."
    )
    header: Mapped[dict[str, Any] | None] = mapped_column(
        JSON_TYPE, doc="Selected header cards as ``{keyword: value}``, for display and search."
    )
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()

    field: Mapped[SkyField | None] = relationship(doc="The field, if assigned.")
    instrument: Mapped[Instrument | None] = relationship(doc="The instrument, if known.")
    survey: Mapped[Survey | None] = relationship(doc="The survey, if known.")
    differences: Mapped[list[DifferenceImage]] = relationship(
        back_populates="science",
        passive_deletes=True,
        doc="Difference images made from this observation.",
    )
    runs: Mapped[list[ProcessingRun]] = relationship(
        back_populates="observation",
        passive_deletes=True,
        doc="Processing runs applied to this observation.",
    )


class CalibrationFrame(Base):
    """A master calibration frame (bias, dark, flat, ...) combined from raw frames."""

    __tablename__ = "calibration_frames"
    __table_args__ = (
        Index("ix_calibration_frames_lookup", "instrument_id", "kind", "band", "mjd"),
    )

    id: Mapped[int] = _id()
    instrument_id: Mapped[int | None] = mapped_column(
        ID_TYPE,
        ForeignKey("instruments.id", ondelete="SET NULL"),
        doc="Instrument it calibrates.",
    )
    kind: Mapped[CalibrationKind] = mapped_column(
        string_enum(CalibrationKind, "calibration_kind"), doc="Kind of frame."
    )
    band: Mapped[str | None] = mapped_column(
        String(32), doc="Band for band-dependent kinds (flat, fringe); NULL otherwise."
    )
    exposure_time: Mapped[float | None] = mapped_column(
        Double, doc="Exposure time of the inputs in seconds (darks); NULL otherwise."
    )
    mjd: Mapped[float | None] = mapped_column(
        Double, doc="Mean MJD (UTC) of the combined inputs; the nearest frame in time is used."
    )
    n_combined: Mapped[int | None] = mapped_column(Integer, doc="Number of raw frames combined.")
    sha256: Mapped[str] = mapped_column(
        String(SHA256_LENGTH), unique=True, doc="Hex SHA-256 of the master frame file."
    )
    artifact_key: Mapped[str] = mapped_column(
        String(KEY_LENGTH), doc="Artifact-store key of the master frame file."
    )
    provenance: Mapped[dict[str, Any] | None] = mapped_column(
        JSON_TYPE, doc="Input hashes, combination config and code version."
    )
    created_at: Mapped[datetime] = _created_at()

    instrument: Mapped[Instrument | None] = relationship(doc="The instrument.")


class ReferenceImage(Base):
    """A reference (template) image of a field in one band, subtracted from new images."""

    __tablename__ = "reference_images"
    __table_args__ = (Index("ix_reference_images_field_band", "field_id", "band", "is_active"),)

    id: Mapped[int] = _id()
    field_id: Mapped[int | None] = mapped_column(
        ID_TYPE,
        ForeignKey("fields.id", ondelete="SET NULL"),
        doc="Field it covers, if assigned.",
    )
    band: Mapped[str] = mapped_column(String(32), doc="Band of the reference.")
    sha256: Mapped[str] = mapped_column(
        String(SHA256_LENGTH), unique=True, doc="Hex SHA-256 of the reference file."
    )
    artifact_key: Mapped[str] = mapped_column(
        String(KEY_LENGTH), doc="Artifact-store key of the reference file."
    )
    source: Mapped[str] = mapped_column(
        String(64),
        doc="Where it came from: ``coadd`` of own observations, or an archive (``ps1``, ...).",
    )
    ra: Mapped[float] = mapped_column(Double, doc="Image centre right ascension, ICRS degrees.")
    dec: Mapped[float] = mapped_column(Double, doc="Image centre declination, ICRS degrees.")
    healpix: Mapped[int | None] = mapped_column(
        ID_TYPE, index=True, doc="HEALPix index of the centre (NESTED, order 29), from ra/dec."
    )
    n_combined: Mapped[int | None] = mapped_column(
        Integer, doc="Number of exposures combined (NULL for archive images)."
    )
    mjd_start: Mapped[float | None] = mapped_column(
        Double, doc="MJD (UTC) of the earliest input; transients before it may be in it."
    )
    mjd_end: Mapped[float | None] = mapped_column(
        Double, doc="MJD (UTC) of the end of the latest input."
    )
    seeing_fwhm_arcsec: Mapped[float | None] = mapped_column(Double, doc="PSF FWHM in arcsec.")
    limiting_magnitude: Mapped[float | None] = mapped_column(
        Double, doc="5-sigma point-source limiting magnitude."
    )
    is_active: Mapped[bool] = mapped_column(
        Boolean,
        default=True,
        doc="Whether new observations are subtracted against it (older ones are kept).",
    )
    provenance: Mapped[dict[str, Any] | None] = mapped_column(
        JSON_TYPE, doc="Input hashes, coadd config and code version."
    )
    created_at: Mapped[datetime] = _created_at()

    field: Mapped[SkyField | None] = relationship(doc="The field, if assigned.")


class ProcessingRun(Base):
    """One pipeline stage applied to its inputs: timing, outcome, config and provenance."""

    __tablename__ = "processing_runs"
    __table_args__ = (
        Index("ix_processing_runs_observation_stage", "observation_id", "stage"),
        Index("ix_processing_runs_status", "status"),
    )

    id: Mapped[int] = _id()
    stage: Mapped[str] = mapped_column(
        String(64), doc="Stage name (``calibrate``, ``subtract``, ``detect``, ``score``, ...)."
    )
    status: Mapped[RunStatus] = mapped_column(
        string_enum(RunStatus, "run_status"), default=RunStatus.PENDING, doc="Run state."
    )
    observation_id: Mapped[int | None] = mapped_column(
        ID_TYPE,
        ForeignKey("observations.id", ondelete="CASCADE"),
        doc="Observation processed, for per-observation stages; NULL otherwise.",
    )
    idempotency_key: Mapped[str | None] = mapped_column(
        String(SHA256_LENGTH),
        index=True,
        doc="Hex SHA-256 of stage, input hashes and config: a runner that finds a "
        "succeeded run with this key skips the work.",
    )
    config: Mapped[dict[str, Any] | None] = mapped_column(
        JSON_TYPE, doc="The stage's full configuration, as passed in."
    )
    provenance: Mapped[dict[str, Any] | None] = mapped_column(
        JSON_TYPE,
        doc="Input hashes, output keys, code version, library and model versions.",
    )
    code_version: Mapped[str | None] = mapped_column(
        String(64), doc="AstrID version (and commit, when known) that ran it."
    )
    worker: Mapped[str | None] = mapped_column(
        String(255), doc="Host and process or worker that ran it."
    )
    started_at: Mapped[datetime | None] = mapped_column(
        UtcDateTime(), doc="When it started (UTC); NULL while pending."
    )
    finished_at: Mapped[datetime | None] = mapped_column(
        UtcDateTime(), doc="When it finished, failed or was cancelled (UTC)."
    )
    error_type: Mapped[str | None] = mapped_column(
        String(128), doc="Class name of the error that failed it (``TooFewStarsForPsf``)."
    )
    error_message: Mapped[str | None] = mapped_column(
        Text, doc="The error's message, with its numbers."
    )
    created_at: Mapped[datetime] = _created_at()

    observation: Mapped[Observation | None] = relationship(
        back_populates="runs", doc="The observation processed."
    )

    @property
    def duration_s(self) -> float | None:
        """Wall time in seconds between start and finish (``None`` until both are set)."""
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


class DifferenceImage(Base):
    """A science observation minus a reference, by one method."""

    __tablename__ = "difference_images"
    __table_args__ = (
        UniqueConstraint(
            "science_observation_id",
            "reference_id",
            "method",
            name="uq_difference_images_science_reference_method",
        ),
    )

    id: Mapped[int] = _id()
    science_observation_id: Mapped[int] = mapped_column(
        ID_TYPE,
        ForeignKey("observations.id", ondelete="CASCADE"),
        doc="The science observation.",
    )
    reference_id: Mapped[int] = mapped_column(
        ID_TYPE,
        ForeignKey("reference_images.id", ondelete="RESTRICT"),
        index=True,
        doc="The reference subtracted.",
    )
    processing_run_id: Mapped[int | None] = mapped_column(
        ID_TYPE,
        ForeignKey("processing_runs.id", ondelete="SET NULL"),
        doc="Run that made it (config and provenance).",
    )
    method: Mapped[SubtractionMethod] = mapped_column(
        string_enum(SubtractionMethod, "subtraction_method"), doc="Subtraction algorithm."
    )
    artifact_key: Mapped[str] = mapped_column(
        String(KEY_LENGTH), doc="Artifact-store key of the difference image (with variance, mask)."
    )
    score_artifact_key: Mapped[str | None] = mapped_column(
        String(KEY_LENGTH), doc="Artifact-store key of the detection-score image, if any."
    )
    n_candidates: Mapped[int | None] = mapped_column(
        Integer, doc="Number of candidates detected (NULL before detection)."
    )
    metrics: Mapped[dict[str, Any] | None] = mapped_column(
        JSON_TYPE, doc="Subtraction diagnostics (score std, kernel residuals, ...)."
    )
    created_at: Mapped[datetime] = _created_at()

    science: Mapped[Observation] = relationship(
        back_populates="differences", doc="The science observation."
    )
    reference: Mapped[ReferenceImage] = relationship(doc="The reference.")
    candidates: Mapped[list[Candidate]] = relationship(
        back_populates="difference",
        passive_deletes=True,
        order_by="Candidate.detection_index",
        doc="Detections on this difference image.",
    )


# --------------------------------------------------------------------------- detections


class SkyObject(Base):
    """Detections at one sky position associated across epochs: a light curve's source."""

    __tablename__ = "objects"

    id: Mapped[int] = _id()
    name: Mapped[str | None] = mapped_column(
        String(64), unique=True, doc="Designation, once assigned (``AstrID J...``)."
    )
    ra: Mapped[float] = mapped_column(
        Double, doc="Mean right ascension of the associated detections, ICRS degrees."
    )
    dec: Mapped[float] = mapped_column(
        Double, doc="Mean declination of the associated detections, ICRS degrees."
    )
    healpix: Mapped[int | None] = mapped_column(
        ID_TYPE, index=True, doc="HEALPix index of the mean position (NESTED, order 29)."
    )
    n_detections: Mapped[int] = mapped_column(
        Integer, default=0, doc="Number of candidates associated."
    )
    first_mjd: Mapped[float | None] = mapped_column(
        Double, doc="MJD (UTC) of the first associated detection."
    )
    last_mjd: Mapped[float | None] = mapped_column(
        Double, doc="MJD (UTC) of the latest associated detection."
    )
    classification: Mapped[str | None] = mapped_column(
        String(64), doc="Current class (``SN Ia``, ``variable star``, ...), if any."
    )
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()

    candidates: Mapped[list[Candidate]] = relationship(
        back_populates="sky_object", order_by="Candidate.mjd", doc="Its detections, in time order."
    )


class Candidate(Base):
    """One detection on a difference image, with its measurements."""

    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("difference_id", "detection_index"),)

    id: Mapped[int] = _id()
    difference_id: Mapped[int] = mapped_column(
        ID_TYPE,
        ForeignKey("difference_images.id", ondelete="CASCADE"),
        doc="Difference image it was detected on.",
    )
    detection_index: Mapped[int] = mapped_column(
        Integer, doc="0-based position in the difference image's detection list."
    )
    object_id: Mapped[int | None] = mapped_column(
        ID_TYPE,
        ForeignKey("objects.id", ondelete="SET NULL"),
        index=True,
        doc="Object it is associated with (NULL until association).",
    )
    ra: Mapped[float] = mapped_column(Double, doc="Right ascension, ICRS degrees.")
    dec: Mapped[float] = mapped_column(Double, doc="Declination, ICRS degrees.")
    healpix: Mapped[int | None] = mapped_column(
        ID_TYPE, index=True, doc="HEALPix index of ra/dec (NESTED, order 29)."
    )
    x: Mapped[float] = mapped_column(
        Double, doc="Column on the difference image, 0-based pixel centre."
    )
    y: Mapped[float] = mapped_column(
        Double, doc="Row on the difference image, 0-based pixel centre."
    )
    mjd: Mapped[float | None] = mapped_column(
        Double,
        index=True,
        doc="MJD (UTC) of the science observation, copied so light curves need no join.",
    )
    band: Mapped[str | None] = mapped_column(
        String(32), doc="Band of the science observation, copied for light curves."
    )
    flux: Mapped[float] = mapped_column(
        Double, doc="PSF flux on the difference image, in science-image data units (ADU)."
    )
    flux_err: Mapped[float] = mapped_column(Double, doc="1-sigma uncertainty of flux.")
    snr: Mapped[float] = mapped_column(Double, doc="Signal-to-noise ratio, flux / flux_err.")
    mag: Mapped[float | None] = mapped_column(
        Double, doc="Difference magnitude, zero_point - 2.5 log10(|flux|); NULL without one."
    )
    mag_err: Mapped[float | None] = mapped_column(Double, doc="1-sigma uncertainty of mag.")
    is_negative: Mapped[bool] = mapped_column(
        Boolean, default=False, doc="Whether the flux is negative (the source faded)."
    )
    is_dipole: Mapped[bool] = mapped_column(
        Boolean, default=False, doc="Whether it looks like a dipole (misalignment residual)."
    )
    fwhm_pixels: Mapped[float | None] = mapped_column(Double, doc="Measured FWHM in pixels.")
    elongation: Mapped[float | None] = mapped_column(Double, doc="Major over minor axis ratio.")
    flags: Mapped[int] = mapped_column(
        Integer, default=0, doc="OR of the mask bits (``MaskBit``) within its footprint."
    )
    features: Mapped[dict[str, Any] | None] = mapped_column(
        JSON_TYPE, doc="Further measured features by name, as given to the models."
    )
    created_at: Mapped[datetime] = _created_at()

    difference: Mapped[DifferenceImage] = relationship(
        back_populates="candidates", doc="The difference image."
    )
    sky_object: Mapped[SkyObject | None] = relationship(
        back_populates="candidates", doc="The associated object."
    )
    cutouts: Mapped[list[Cutout]] = relationship(
        back_populates="candidate", passive_deletes=True, doc="Its image stamps."
    )
    scores: Mapped[list[ModelScore]] = relationship(
        back_populates="candidate", passive_deletes=True, doc="Its model scores."
    )
    vetting_events: Mapped[list[VettingEvent]] = relationship(
        back_populates="candidate",
        passive_deletes=True,
        order_by="VettingEvent.created_at",
        doc="People's labels, oldest first.",
    )


class Cutout(Base):
    """A small image stamp around a candidate."""

    __tablename__ = "cutouts"
    __table_args__ = (UniqueConstraint("candidate_id", "kind"),)

    id: Mapped[int] = _id()
    candidate_id: Mapped[int] = mapped_column(
        ID_TYPE, ForeignKey("candidates.id", ondelete="CASCADE"), doc="The candidate."
    )
    kind: Mapped[CutoutKind] = mapped_column(
        string_enum(CutoutKind, "cutout_kind"), doc="Image it was cut from."
    )
    artifact_key: Mapped[str] = mapped_column(
        String(KEY_LENGTH), doc="Artifact-store key of the stamp file."
    )
    size: Mapped[int] = mapped_column(Integer, doc="Width and height of the stamp in pixels.")
    created_at: Mapped[datetime] = _created_at()

    candidate: Mapped[Candidate] = relationship(back_populates="cutouts", doc="The candidate.")


class ModelScore(Base):
    """A trained model's score for a candidate (real/bogus or a class probability)."""

    __tablename__ = "model_scores"
    __table_args__ = (
        UniqueConstraint("candidate_id", "model_name", "model_version"),
        Index("ix_model_scores_model_score", "model_name", "model_version", "score"),
    )

    id: Mapped[int] = _id()
    candidate_id: Mapped[int] = mapped_column(
        ID_TYPE, ForeignKey("candidates.id", ondelete="CASCADE"), doc="The candidate."
    )
    model_name: Mapped[str] = mapped_column(
        String(128), doc="Registered model name (``real-bogus-cnn``)."
    )
    model_version: Mapped[str] = mapped_column(
        String(64), doc="Registered model version; every score names the exact model."
    )
    score: Mapped[float] = mapped_column(
        Double, doc="Score in [0, 1]; higher means more likely real."
    )
    details: Mapped[dict[str, Any] | None] = mapped_column(
        JSON_TYPE, doc="Extra outputs (class probabilities, explanations), if any."
    )
    processing_run_id: Mapped[int | None] = mapped_column(
        ID_TYPE,
        ForeignKey("processing_runs.id", ondelete="SET NULL"),
        doc="Run that scored it.",
    )
    created_at: Mapped[datetime] = _created_at()

    candidate: Mapped[Candidate] = relationship(back_populates="scores", doc="The candidate.")


# --------------------------------------------------------------------------- people


class User(Base):
    """A person who uses the dashboard or API."""

    __tablename__ = "users"

    id: Mapped[int] = _id()
    username: Mapped[str] = mapped_column(String(64), unique=True, doc="Unique login name.")
    email: Mapped[str | None] = mapped_column(
        String(320), unique=True, doc="E-mail address, unique when given."
    )
    display_name: Mapped[str | None] = mapped_column(String(255), doc="Name shown to others.")
    role: Mapped[UserRole] = mapped_column(
        string_enum(UserRole, "user_role"), default=UserRole.VIEWER, doc="What they may do."
    )
    is_active: Mapped[bool] = mapped_column(
        Boolean, default=True, doc="False disables the account (users are never deleted)."
    )
    created_at: Mapped[datetime] = _created_at()

    api_keys: Mapped[list[ApiKey]] = relationship(
        back_populates="user", passive_deletes=True, doc="Their API keys."
    )


class ApiKey(Base):
    """An API key of a user. Only a hash is stored; the key is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = _id()
    user_id: Mapped[int] = mapped_column(
        ID_TYPE, ForeignKey("users.id", ondelete="CASCADE"), index=True, doc="Owner."
    )
    name: Mapped[str] = mapped_column(String(128), doc="Label given by the owner.")
    prefix: Mapped[str] = mapped_column(
        String(16), index=True, doc="First characters of the key, shown to tell keys apart."
    )
    key_hash: Mapped[str] = mapped_column(
        String(SHA256_LENGTH),
        unique=True,
        doc="Hex SHA-256 of the full key (keys are long random tokens, so a fast hash is "
        "safe); the key itself is never stored.",
    )
    scopes: Mapped[list[str] | None] = mapped_column(
        JSON_TYPE, doc="Permissions granted (``candidates:read``, ...); NULL means the role's."
    )
    created_at: Mapped[datetime] = _created_at()
    last_used_at: Mapped[datetime | None] = mapped_column(
        UtcDateTime(), doc="Last successful use (UTC)."
    )
    expires_at: Mapped[datetime | None] = mapped_column(
        UtcDateTime(), doc="Expiry (UTC); NULL never expires."
    )
    revoked_at: Mapped[datetime | None] = mapped_column(
        UtcDateTime(), doc="When revoked (UTC); a revoked key is refused."
    )

    user: Mapped[User] = relationship(back_populates="api_keys", doc="Owner.")


class VettingEvent(Base):
    """A person's label on a candidate. Events are appended, never edited."""

    __tablename__ = "vetting_events"
    __table_args__ = (Index("ix_vetting_events_candidate_time", "candidate_id", "created_at"),)

    id: Mapped[int] = _id()
    candidate_id: Mapped[int] = mapped_column(
        ID_TYPE, ForeignKey("candidates.id", ondelete="CASCADE"), doc="The candidate."
    )
    user_id: Mapped[int] = mapped_column(
        ID_TYPE, ForeignKey("users.id", ondelete="RESTRICT"), index=True, doc="Who labelled it."
    )
    label: Mapped[VettingLabel] = mapped_column(
        string_enum(VettingLabel, "vetting_label"), doc="The verdict."
    )
    note: Mapped[str | None] = mapped_column(Text, doc="Free-text comment.")
    created_at: Mapped[datetime] = _created_at()

    candidate: Mapped[Candidate] = relationship(
        back_populates="vetting_events", doc="The candidate."
    )
    user: Mapped[User] = relationship(doc="Who labelled it.")


class CatalogEntry(Base):
    """A confirmed transient or variable in AstrID's own catalog (one per object)."""

    __tablename__ = "catalog_entries"

    id: Mapped[int] = _id()
    object_id: Mapped[int] = mapped_column(
        ID_TYPE,
        ForeignKey("objects.id", ondelete="RESTRICT"),
        unique=True,
        doc="The object confirmed.",
    )
    name: Mapped[str] = mapped_column(String(64), unique=True, doc="Catalog designation.")
    ra: Mapped[float] = mapped_column(Double, doc="Right ascension, ICRS degrees.")
    dec: Mapped[float] = mapped_column(Double, doc="Declination, ICRS degrees.")
    healpix: Mapped[int | None] = mapped_column(
        ID_TYPE, index=True, doc="HEALPix index of ra/dec (NESTED, order 29)."
    )
    classification: Mapped[str | None] = mapped_column(
        String(64), doc="Class (``SN Ia``, ``TDE``, ``variable star``, ``unknown``)."
    )
    redshift: Mapped[float | None] = mapped_column(Double, doc="Redshift, if known.")
    discovery_mjd: Mapped[float | None] = mapped_column(
        Double, doc="MJD (UTC) of the first detection."
    )
    discovery_magnitude: Mapped[float | None] = mapped_column(Double, doc="Magnitude at discovery.")
    discovery_band: Mapped[str | None] = mapped_column(String(32), doc="Band of discovery.")
    peak_magnitude: Mapped[float | None] = mapped_column(
        Double, doc="Brightest magnitude measured."
    )
    external_names: Mapped[dict[str, Any] | None] = mapped_column(
        JSON_TYPE, doc='Names in other catalogs by catalog (``{"tns": "2024abc"}``).'
    )
    notes: Mapped[str | None] = mapped_column(Text, doc="Free-text notes.")
    confirmed_by_id: Mapped[int | None] = mapped_column(
        ID_TYPE, ForeignKey("users.id", ondelete="SET NULL"), doc="Who confirmed it."
    )
    confirmed_at: Mapped[datetime | None] = mapped_column(
        UtcDateTime(), doc="When it was confirmed (UTC)."
    )
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _updated_at()

    sky_object: Mapped[SkyObject] = relationship(doc="The object.")
    confirmed_by: Mapped[User | None] = relationship(doc="Who confirmed it.")


class AuditEvent(Base):
    """Who did what, when: one row per change made through the API, dashboard or CLI."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_target", "target_type", "target_id"),)

    id: Mapped[int] = _id()
    occurred_at: Mapped[datetime] = mapped_column(
        UtcDateTime(),
        default=utcnow,
        server_default=func.now(),
        index=True,
        doc="When it happened (UTC).",
    )
    user_id: Mapped[int | None] = mapped_column(
        ID_TYPE,
        ForeignKey("users.id", ondelete="SET NULL"),
        index=True,
        doc="Who did it; NULL for the system itself.",
    )
    api_key_id: Mapped[int | None] = mapped_column(
        ID_TYPE,
        ForeignKey("api_keys.id", ondelete="SET NULL"),
        doc="Key used, for API calls.",
    )
    action: Mapped[str] = mapped_column(
        String(64), doc="What was done, as ``<domain>.<verb>`` (``candidate.vet``)."
    )
    target_type: Mapped[str | None] = mapped_column(
        String(64), doc="Kind of thing acted on (``candidate``)."
    )
    target_id: Mapped[str | None] = mapped_column(String(64), doc="Its identifier, as text.")
    details: Mapped[dict[str, Any] | None] = mapped_column(
        JSON_TYPE, doc="What changed (old and new values, parameters)."
    )
    remote_addr: Mapped[str | None] = mapped_column(String(64), doc="Client address, for requests.")


# --------------------------------------------------------------------------- events


def _fill_healpix(mapper: Mapper[Any], connection: Any, target: Any) -> None:
    """Set ``healpix`` from ``ra``/``dec`` before a row with a sky position is written."""
    if "healpix" not in mapper.columns:
        return
    ra, dec = target.ra, target.dec
    target.healpix = None if ra is None or dec is None else int(healpix_index(ra, dec))


event.listen(Base, "before_insert", _fill_healpix, propagate=True)
event.listen(Base, "before_update", _fill_healpix, propagate=True)
