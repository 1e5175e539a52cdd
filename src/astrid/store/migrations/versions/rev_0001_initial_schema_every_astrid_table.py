"""Initial schema: every AstrID table

Revision ID: 0001
Revises: none (first revision)
Create Date: 2026-11-26 19:32:06.136399
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

__all__ = ["downgrade", "upgrade"]

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "instruments",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("telescope", sa.String(length=128), nullable=True),
        sa.Column("pixel_scale_arcsec", sa.Double(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_instruments")),
        sa.UniqueConstraint("name", name=op.f("uq_instruments_name")),
    )
    op.create_table(
        "objects",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=True),
        sa.Column("ra", sa.Double(), nullable=False),
        sa.Column("dec", sa.Double(), nullable=False),
        sa.Column("healpix", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("n_detections", sa.Integer(), nullable=False),
        sa.Column("first_mjd", sa.Double(), nullable=True),
        sa.Column("last_mjd", sa.Double(), nullable=True),
        sa.Column("classification", sa.String(length=64), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_objects")),
        sa.UniqueConstraint("name", name=op.f("uq_objects_name")),
    )
    with op.batch_alter_table("objects", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_objects_healpix"), ["healpix"], unique=False)

    op.create_table(
        "surveys",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("url", sa.String(length=512), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_surveys")),
        sa.UniqueConstraint("name", name=op.f("uq_surveys_name")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("display_name", sa.String(length=255), nullable=True),
        sa.Column(
            "role",
            sa.Enum(
                "viewer",
                "vetter",
                "admin",
                name="user_role",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("email", name=op.f("uq_users_email")),
        sa.UniqueConstraint("username", name=op.f("uq_users_username")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("user_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "scopes", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_api_keys_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_prefix"), ["prefix"], unique=False)
        batch_op.create_index(batch_op.f("ix_api_keys_user_id"), ["user_id"], unique=False)

    op.create_table(
        "calibration_frames",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "instrument_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "kind",
            sa.Enum(
                "bias",
                "dark",
                "flat",
                "fringe",
                "mask",
                name="calibration_kind",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("band", sa.String(length=32), nullable=True),
        sa.Column("exposure_time", sa.Double(), nullable=True),
        sa.Column("mjd", sa.Double(), nullable=True),
        sa.Column("n_combined", sa.Integer(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("artifact_key", sa.String(length=255), nullable=False),
        sa.Column(
            "provenance", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["instrument_id"],
            ["instruments.id"],
            name=op.f("fk_calibration_frames_instrument_id_instruments"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_calibration_frames")),
        sa.UniqueConstraint("sha256", name=op.f("uq_calibration_frames_sha256")),
    )
    with op.batch_alter_table("calibration_frames", schema=None) as batch_op:
        batch_op.create_index(
            "ix_calibration_frames_lookup", ["instrument_id", "kind", "band", "mjd"], unique=False
        )

    op.create_table(
        "catalog_entries",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "object_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("ra", sa.Double(), nullable=False),
        sa.Column("dec", sa.Double(), nullable=False),
        sa.Column("healpix", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("classification", sa.String(length=64), nullable=True),
        sa.Column("redshift", sa.Double(), nullable=True),
        sa.Column("discovery_mjd", sa.Double(), nullable=True),
        sa.Column("discovery_magnitude", sa.Double(), nullable=True),
        sa.Column("discovery_band", sa.String(length=32), nullable=True),
        sa.Column("peak_magnitude", sa.Double(), nullable=True),
        sa.Column(
            "external_names",
            sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
            nullable=True,
        ),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.Column(
            "confirmed_by_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["confirmed_by_id"],
            ["users.id"],
            name=op.f("fk_catalog_entries_confirmed_by_id_users"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["object_id"],
            ["objects.id"],
            name=op.f("fk_catalog_entries_object_id_objects"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_catalog_entries")),
        sa.UniqueConstraint("name", name=op.f("uq_catalog_entries_name")),
        sa.UniqueConstraint("object_id", name=op.f("uq_catalog_entries_object_id")),
    )
    with op.batch_alter_table("catalog_entries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_catalog_entries_healpix"), ["healpix"], unique=False)

    op.create_table(
        "fields",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "survey_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("ra", sa.Double(), nullable=False),
        sa.Column("dec", sa.Double(), nullable=False),
        sa.Column("healpix", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("radius_deg", sa.Double(), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["survey_id"],
            ["surveys.id"],
            name=op.f("fk_fields_survey_id_surveys"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fields")),
        sa.UniqueConstraint("survey_id", "name", name=op.f("uq_fields_survey_id_name")),
    )
    with op.batch_alter_table("fields", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_fields_healpix"), ["healpix"], unique=False)

    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "occurred_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("user_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column(
            "api_key_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=64), nullable=True),
        sa.Column("target_id", sa.String(length=64), nullable=True),
        sa.Column(
            "details", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
        ),
        sa.Column("remote_addr", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["api_key_id"],
            ["api_keys.id"],
            name=op.f("fk_audit_log_api_key_id_api_keys"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_audit_log_user_id_users"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_log_occurred_at"), ["occurred_at"], unique=False)
        batch_op.create_index("ix_audit_log_target", ["target_type", "target_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_log_user_id"), ["user_id"], unique=False)

    op.create_table(
        "observations",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("artifact_key", sa.String(length=255), nullable=False),
        sa.Column("calibrated_artifact_key", sa.String(length=255), nullable=True),
        sa.Column("original_name", sa.String(length=1024), nullable=True),
        sa.Column("survey_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column(
            "instrument_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("field_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("band", sa.String(length=32), nullable=True),
        sa.Column("mjd", sa.Double(), nullable=True),
        sa.Column("obs_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("exposure_time", sa.Double(), nullable=True),
        sa.Column("ra", sa.Double(), nullable=True),
        sa.Column("dec", sa.Double(), nullable=True),
        sa.Column("healpix", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("width", sa.Integer(), nullable=True),
        sa.Column("height", sa.Integer(), nullable=True),
        sa.Column("airmass", sa.Double(), nullable=True),
        sa.Column("seeing_fwhm_arcsec", sa.Double(), nullable=True),
        sa.Column("limiting_magnitude", sa.Double(), nullable=True),
        sa.Column("zero_point", sa.Double(), nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "registered",
                "calibrated",
                "characterized",
                "subtracted",
                "processed",
                "failed",
                "rejected",
                name="observation_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column(
            "quality", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
        ),
        sa.Column(
            "header", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["field_id"],
            ["fields.id"],
            name=op.f("fk_observations_field_id_fields"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["instrument_id"],
            ["instruments.id"],
            name=op.f("fk_observations_instrument_id_instruments"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["survey_id"],
            ["surveys.id"],
            name=op.f("fk_observations_survey_id_surveys"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_observations")),
        sa.UniqueConstraint("sha256", name=op.f("uq_observations_sha256")),
    )
    with op.batch_alter_table("observations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_observations_field_band_mjd", ["field_id", "band", "mjd"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_observations_healpix"), ["healpix"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_observations_instrument_id"), ["instrument_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_observations_mjd"), ["mjd"], unique=False)
        batch_op.create_index("ix_observations_status", ["status"], unique=False)
        batch_op.create_index(batch_op.f("ix_observations_survey_id"), ["survey_id"], unique=False)

    op.create_table(
        "reference_images",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("field_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("band", sa.String(length=32), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("artifact_key", sa.String(length=255), nullable=False),
        sa.Column("source", sa.String(length=64), nullable=False),
        sa.Column("ra", sa.Double(), nullable=False),
        sa.Column("dec", sa.Double(), nullable=False),
        sa.Column("healpix", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("n_combined", sa.Integer(), nullable=True),
        sa.Column("mjd_start", sa.Double(), nullable=True),
        sa.Column("mjd_end", sa.Double(), nullable=True),
        sa.Column("seeing_fwhm_arcsec", sa.Double(), nullable=True),
        sa.Column("limiting_magnitude", sa.Double(), nullable=True),
        sa.Column("is_active", sa.Boolean(), nullable=False),
        sa.Column(
            "provenance", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["field_id"],
            ["fields.id"],
            name=op.f("fk_reference_images_field_id_fields"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reference_images")),
        sa.UniqueConstraint("sha256", name=op.f("uq_reference_images_sha256")),
    )
    with op.batch_alter_table("reference_images", schema=None) as batch_op:
        batch_op.create_index(
            "ix_reference_images_field_band", ["field_id", "band", "is_active"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_reference_images_healpix"), ["healpix"], unique=False)

    op.create_table(
        "processing_runs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("stage", sa.String(length=64), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "pending",
                "running",
                "succeeded",
                "failed",
                "cancelled",
                name="run_status",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column(
            "observation_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column("idempotency_key", sa.String(length=64), nullable=True),
        sa.Column(
            "config", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
        ),
        sa.Column(
            "provenance", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
        ),
        sa.Column("code_version", sa.String(length=64), nullable=True),
        sa.Column("worker", sa.String(length=255), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error_type", sa.String(length=128), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["observation_id"],
            ["observations.id"],
            name=op.f("fk_processing_runs_observation_id_observations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_processing_runs")),
    )
    with op.batch_alter_table("processing_runs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_processing_runs_idempotency_key"), ["idempotency_key"], unique=False
        )
        batch_op.create_index(
            "ix_processing_runs_observation_stage", ["observation_id", "stage"], unique=False
        )
        batch_op.create_index("ix_processing_runs_status", ["status"], unique=False)

    op.create_table(
        "difference_images",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "science_observation_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            nullable=False,
        ),
        sa.Column(
            "reference_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "processing_run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "method",
            sa.Enum(
                "zogy",
                "alard_lupton",
                name="subtraction_method",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("artifact_key", sa.String(length=255), nullable=False),
        sa.Column("score_artifact_key", sa.String(length=255), nullable=True),
        sa.Column("n_candidates", sa.Integer(), nullable=True),
        sa.Column(
            "metrics", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["processing_run_id"],
            ["processing_runs.id"],
            name=op.f("fk_difference_images_processing_run_id_processing_runs"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["reference_id"],
            ["reference_images.id"],
            name=op.f("fk_difference_images_reference_id_reference_images"),
            ondelete="RESTRICT",
        ),
        sa.ForeignKeyConstraint(
            ["science_observation_id"],
            ["observations.id"],
            name=op.f("fk_difference_images_science_observation_id_observations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_difference_images")),
        sa.UniqueConstraint(
            "science_observation_id",
            "reference_id",
            "method",
            name="uq_difference_images_science_reference_method",
        ),
    )
    with op.batch_alter_table("difference_images", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_difference_images_reference_id"), ["reference_id"], unique=False
        )

    op.create_table(
        "candidates",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "difference_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("detection_index", sa.Integer(), nullable=False),
        sa.Column("object_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("ra", sa.Double(), nullable=False),
        sa.Column("dec", sa.Double(), nullable=False),
        sa.Column("healpix", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
        sa.Column("x", sa.Double(), nullable=False),
        sa.Column("y", sa.Double(), nullable=False),
        sa.Column("mjd", sa.Double(), nullable=True),
        sa.Column("band", sa.String(length=32), nullable=True),
        sa.Column("flux", sa.Double(), nullable=False),
        sa.Column("flux_err", sa.Double(), nullable=False),
        sa.Column("snr", sa.Double(), nullable=False),
        sa.Column("mag", sa.Double(), nullable=True),
        sa.Column("mag_err", sa.Double(), nullable=True),
        sa.Column("is_negative", sa.Boolean(), nullable=False),
        sa.Column("is_dipole", sa.Boolean(), nullable=False),
        sa.Column("fwhm_pixels", sa.Double(), nullable=True),
        sa.Column("elongation", sa.Double(), nullable=True),
        sa.Column("flags", sa.Integer(), nullable=False),
        sa.Column(
            "features", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["difference_id"],
            ["difference_images.id"],
            name=op.f("fk_candidates_difference_id_difference_images"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["object_id"],
            ["objects.id"],
            name=op.f("fk_candidates_object_id_objects"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_candidates")),
        sa.UniqueConstraint(
            "difference_id",
            "detection_index",
            name=op.f("uq_candidates_difference_id_detection_index"),
        ),
    )
    with op.batch_alter_table("candidates", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_candidates_healpix"), ["healpix"], unique=False)
        batch_op.create_index(batch_op.f("ix_candidates_mjd"), ["mjd"], unique=False)
        batch_op.create_index(batch_op.f("ix_candidates_object_id"), ["object_id"], unique=False)

    op.create_table(
        "cutouts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "candidate_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column(
            "kind",
            sa.Enum(
                "science",
                "reference",
                "difference",
                "score",
                name="cutout_kind",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("artifact_key", sa.String(length=255), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["candidate_id"],
            ["candidates.id"],
            name=op.f("fk_cutouts_candidate_id_candidates"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cutouts")),
        sa.UniqueConstraint("candidate_id", "kind", name=op.f("uq_cutouts_candidate_id_kind")),
    )
    op.create_table(
        "model_scores",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "candidate_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("score", sa.Double(), nullable=False),
        sa.Column(
            "details", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
        ),
        sa.Column(
            "processing_run_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["candidate_id"],
            ["candidates.id"],
            name=op.f("fk_model_scores_candidate_id_candidates"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["processing_run_id"],
            ["processing_runs.id"],
            name=op.f("fk_model_scores_processing_run_id_processing_runs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_scores")),
        sa.UniqueConstraint(
            "candidate_id",
            "model_name",
            "model_version",
            name=op.f("uq_model_scores_candidate_id_model_name_model_version"),
        ),
    )
    with op.batch_alter_table("model_scores", schema=None) as batch_op:
        batch_op.create_index(
            "ix_model_scores_model_score", ["model_name", "model_version", "score"], unique=False
        )

    op.create_table(
        "vetting_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "candidate_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("user_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column(
            "label",
            sa.Enum(
                "real",
                "bogus",
                "unsure",
                name="vetting_label",
                native_enum=False,
                create_constraint=True,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["candidate_id"],
            ["candidates.id"],
            name=op.f("fk_vetting_events_candidate_id_candidates"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_vetting_events_user_id_users"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vetting_events")),
    )
    with op.batch_alter_table("vetting_events", schema=None) as batch_op:
        batch_op.create_index(
            "ix_vetting_events_candidate_time", ["candidate_id", "created_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_vetting_events_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table("vetting_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_vetting_events_user_id"))
        batch_op.drop_index("ix_vetting_events_candidate_time")

    op.drop_table("vetting_events")
    with op.batch_alter_table("model_scores", schema=None) as batch_op:
        batch_op.drop_index("ix_model_scores_model_score")

    op.drop_table("model_scores")
    op.drop_table("cutouts")
    with op.batch_alter_table("candidates", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_candidates_object_id"))
        batch_op.drop_index(batch_op.f("ix_candidates_mjd"))
        batch_op.drop_index(batch_op.f("ix_candidates_healpix"))

    op.drop_table("candidates")
    with op.batch_alter_table("difference_images", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_difference_images_reference_id"))

    op.drop_table("difference_images")
    with op.batch_alter_table("processing_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_processing_runs_status")
        batch_op.drop_index("ix_processing_runs_observation_stage")
        batch_op.drop_index(batch_op.f("ix_processing_runs_idempotency_key"))

    op.drop_table("processing_runs")
    with op.batch_alter_table("reference_images", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reference_images_healpix"))
        batch_op.drop_index("ix_reference_images_field_band")

    op.drop_table("reference_images")
    with op.batch_alter_table("observations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_observations_survey_id"))
        batch_op.drop_index("ix_observations_status")
        batch_op.drop_index(batch_op.f("ix_observations_mjd"))
        batch_op.drop_index(batch_op.f("ix_observations_instrument_id"))
        batch_op.drop_index(batch_op.f("ix_observations_healpix"))
        batch_op.drop_index("ix_observations_field_band_mjd")

    op.drop_table("observations")
    with op.batch_alter_table("audit_log", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_log_user_id"))
        batch_op.drop_index("ix_audit_log_target")
        batch_op.drop_index(batch_op.f("ix_audit_log_occurred_at"))

    op.drop_table("audit_log")
    with op.batch_alter_table("fields", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fields_healpix"))

    op.drop_table("fields")
    with op.batch_alter_table("catalog_entries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_catalog_entries_healpix"))

    op.drop_table("catalog_entries")
    with op.batch_alter_table("calibration_frames", schema=None) as batch_op:
        batch_op.drop_index("ix_calibration_frames_lookup")

    op.drop_table("calibration_frames")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_user_id"))
        batch_op.drop_index(batch_op.f("ix_api_keys_prefix"))

    op.drop_table("api_keys")
    op.drop_table("users")
    op.drop_table("surveys")
    with op.batch_alter_table("objects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_objects_healpix"))

    op.drop_table("objects")
    op.drop_table("instruments")
