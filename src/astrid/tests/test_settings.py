"""Settings: defaults that need no service, environment overrides, the pipeline config."""

from __future__ import annotations

from pathlib import Path

import pytest

from astrid.pipeline.config import PipelineConfig
from astrid.settings import Settings


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (
        "DATA_DIR",
        "DATABASE_URL",
        "ARTIFACT_URL",
        "WORKERS",
        "OVERSCAN",
        "REAL_BOGUS_MODEL",
    ):
        monkeypatch.delenv(f"ASTRID_{name}", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env file


def test_defaults_are_a_sqlite_file_and_a_local_folder() -> None:
    settings = Settings()
    assert settings.resolved_database_url() == "sqlite:///astrid-data/astrid.db"
    assert settings.resolved_artifact_url() == "astrid-data/artifacts"
    assert settings.workers == 2


def test_default_settings_give_the_default_pipeline_config() -> None:
    assert Settings().pipeline_config() == PipelineConfig()


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASTRID_DATABASE_URL", "postgresql+psycopg://u@h/astrid")
    monkeypatch.setenv("ASTRID_DATA_DIR", "elsewhere")
    monkeypatch.setenv("ASTRID_WORKERS", "5")
    monkeypatch.setenv("ASTRID_OVERSCAN", "true")
    settings = Settings()
    assert settings.resolved_database_url() == "postgresql+psycopg://u@h/astrid"
    assert settings.resolved_artifact_url() == "elsewhere/artifacts"
    assert settings.workers == 5
    config = settings.pipeline_config()
    assert config.calibration.overscan.enabled


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="odd"):
        Settings(cutout_size=64)
    with pytest.raises(ValueError):
        Settings(workers=0)
    config = Settings(
        min_stars=7, subtraction_method="al", detection_threshold=4.0
    ).pipeline_config()
    assert config.difference.characterize.psf.min_stars == 7
    assert config.characterize.quality.min_stars == 7
    assert config.difference.subtract.method == "al"
    assert config.difference.detect.n_sigma == 4.0


def test_the_default_scorer_is_the_shipped_model(tmp_path: Path) -> None:
    from astrid.errors import ModelNotAvailable
    from astrid.pipeline.config import CandidateScorer

    scorer = Settings(data_dir=tmp_path).scorer()
    assert isinstance(scorer, CandidateScorer)
    assert scorer.model_name == "real_bogus"
    assert Settings(data_dir=tmp_path, real_bogus_model="none").scorer() is None
    with pytest.raises(ModelNotAvailable, match="no model bundle folder"):
        Settings(data_dir=tmp_path, real_bogus_model=str(tmp_path / "missing")).scorer()
    with pytest.raises(ModelNotAvailable, match="41-pixel ones"):
        Settings(data_dir=tmp_path, cutout_size=41).scorer()
    with pytest.raises(ModelNotAvailable):  # an empty registry has no champion
        Settings(data_dir=tmp_path, real_bogus_model="champion").scorer()
