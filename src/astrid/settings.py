"""Settings of an AstrID installation, read from the environment by entry points only.

Every setting has a default that needs no service (a SQLite file and a local artifact
folder under ``./astrid-data``) and can be overridden by an environment variable named
``ASTRID_<FIELD>`` (``ASTRID_DATABASE_URL``, ``ASTRID_WORKERS``, ...) or by a ``.env``
file in the working directory. Library code never reads them: the command line (and
later the API) builds one :class:`Settings` at start-up and passes plain values on,
e.g. :meth:`Settings.pipeline_config` to the runner.

Examples
--------
Run on PostgreSQL and an S3 bucket instead of the embedded default::

    export ASTRID_DATABASE_URL=postgresql+psycopg://astrid@db.example.org/astrid
    export ASTRID_ARTIFACT_URL=s3://astrid-artifacts/prod
    astrid process --workers 8
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from astrid.pipeline.config import CandidateScorer, PipelineConfig

__all__ = ["DEFAULT_DATA_DIR", "Settings"]

#: Folder holding the default database and artifact store, relative to the working directory.
DEFAULT_DATA_DIR = Path("astrid-data")


class Settings(BaseSettings):
    """Where AstrID keeps its data, how many processes it uses, and the pipeline options.

    Attributes
    ----------
    data_dir : Path
        Folder of the default SQLite database (``astrid.db``) and artifact store
        (``artifacts/``); ignored for whichever of the two is given by URL.
    database_url : str or None
        SQLAlchemy URL of the database; ``None`` means ``sqlite:///<data_dir>/astrid.db``.
    artifact_url : str or None
        Artifact store: a folder, ``file:///...`` or ``s3://bucket/prefix``; ``None``
        means ``<data_dir>/artifacts``.
    workers : int
        Processes that work on observations in parallel (1 runs in-process).
    overscan : bool
        Subtract the overscan and trim (raw frames with ``BIASSEC``/``TRIMSEC``); off for
        already-reduced images.
    cosmic_rays : bool
        Detect and mask cosmic rays during calibration (needs gain and read noise).
    subtraction_method : {"zogy", "al"}
        Image subtraction: ZOGY or Alard-Lupton.
    detection_threshold : float
        Candidate detection threshold on the score image, in sigma.
    min_stars : int
        Clean stars an image needs for its PSF model and to pass the quality gate.
    association_radius_arcsec : float
        Detections closer than this to an object's mean position join that object.
    cutout_size : int
        Side of the cutout stamps stored with every candidate, pixels (odd).
    real_bogus_model : str
        The model that scores candidates in the pipeline's score stage: ``"packaged"``
        (the one shipped inside the package, no network), ``"champion"`` or
        ``"challenger"`` (that alias of ``real_bogus`` in the MLflow registry under
        ``data_dir/mlflow``), a path to a model bundle folder, or ``"none"`` (candidates
        are stored without a score).
    """

    model_config = SettingsConfigDict(
        env_prefix="ASTRID_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    data_dir: Path = Field(
        default=DEFAULT_DATA_DIR, description="Folder of the default database and artifacts."
    )
    database_url: str | None = Field(
        default=None, description="Database URL; default a SQLite file in data_dir."
    )
    artifact_url: str | None = Field(
        default=None, description="Artifact store URL or folder; default data_dir/artifacts."
    )
    workers: int = Field(default=2, ge=1, description="Parallel worker processes.")
    overscan: bool = Field(default=False, description="Subtract the overscan and trim.")
    cosmic_rays: bool = Field(default=True, description="Detect and mask cosmic rays.")
    subtraction_method: Literal["zogy", "al"] = Field(
        default="zogy", description="Image subtraction method."
    )
    detection_threshold: float = Field(
        default=5.0, gt=0, description="Detection threshold on the score image, sigma."
    )
    min_stars: int = Field(default=10, ge=3, description="Stars needed for a PSF model.")
    association_radius_arcsec: float = Field(
        default=1.0, gt=0, description="Association radius of detections into objects, arcsec."
    )
    cutout_size: int = Field(default=63, ge=7, description="Cutout stamp side, pixels (odd).")
    real_bogus_model: str = Field(
        default="packaged",
        min_length=1,
        description="Scoring model: packaged, champion, challenger, a bundle path, or none.",
    )

    @field_validator("cutout_size")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 != 1:
            raise ValueError(f"cutout_size must be odd, got {value}")
        return value

    def scorer(self) -> CandidateScorer | None:
        """The real/bogus model named by :attr:`real_bogus_model`, loaded; None for ``none``.

        Raises
        ------
        ModelNotAvailable
            If the model cannot be found or loaded, or its cutout size differs from
            :attr:`cutout_size` (its candidates could not be scored).
        """
        spec = self.real_bogus_model.strip()
        if spec.lower() == "none":
            return None
        from astrid.errors import ModelNotAvailable
        from astrid.ml.registry import CHALLENGER, CHAMPION, load_scorer

        if spec == "packaged":
            scorer = load_scorer("real_bogus")
        elif spec in (CHAMPION, CHALLENGER):
            scorer = load_scorer("real_bogus", alias=spec, registry_dir=self.data_dir / "mlflow")
        else:
            scorer = load_scorer("real_bogus", path=Path(spec))
        if scorer.config.cutout_size != self.cutout_size:
            raise ModelNotAvailable(
                f"{scorer.model_name} version {scorer.model_version}",
                f"it scores {scorer.config.cutout_size}-pixel cutouts and the pipeline cuts "
                f"{self.cutout_size}-pixel ones (set cutout_size or choose another model)",
            )
        return scorer

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in :attr:`data_dir`."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'astrid.db').as_posix()}"

    def resolved_artifact_url(self) -> str:
        """The artifact store URL, defaulting to the ``artifacts`` folder in :attr:`data_dir`."""
        if self.artifact_url:
            return self.artifact_url
        return (self.data_dir / "artifacts").as_posix()

    def pipeline_config(self) -> PipelineConfig:
        """The runner's configuration: the stages' defaults with these settings applied.

        With every setting at its default this equals ``PipelineConfig()``.
        """
        from astrid.pipeline.characterize import CharacterizeConfig
        from astrid.pipeline.config import PipelineConfig

        def with_min_stars(config: CharacterizeConfig) -> CharacterizeConfig:
            return replace(
                config,
                psf=replace(config.psf, min_stars=self.min_stars),
                quality=replace(config.quality, min_stars=self.min_stars),
            )

        base = PipelineConfig()
        calibration = base.calibration
        difference = base.difference
        return replace(
            base,
            calibration=replace(
                calibration,
                overscan=replace(calibration.overscan, enabled=self.overscan),
                cosmic_rays=replace(calibration.cosmic_rays, enabled=self.cosmic_rays),
            ),
            characterize=with_min_stars(base.characterize),
            difference=replace(
                difference,
                characterize=with_min_stars(difference.characterize),
                subtract=replace(difference.subtract, method=self.subtraction_method),
                detect=replace(difference.detect, n_sigma=self.detection_threshold),
                cutout_size=self.cutout_size,
            ),
            association_radius_arcsec=self.association_radius_arcsec,
        )
