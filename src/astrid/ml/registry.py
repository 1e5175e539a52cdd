"""Experiment tracking and the model registry (MLflow), dataset hashes, energy, model cards.

MLflow runs on one machine with no server: a SQLite file holds runs and the registry and a
local folder holds artifacts (:meth:`RegistryConfig.local`); pointing ``tracking_uri`` at
an MLflow server scales it out with the same code. Nothing is created at import time: a
:class:`ModelRegistry` opens its client when it is constructed, from the configuration
passed in, and touches no global MLflow state (no ``mlflow.set_tracking_uri``).

Each registered version is one MLflow run whose artifacts hold

* ``model/``: the bundle of :mod:`astrid.ml.serve` (``weights.pt``, ``metadata.json``)
  and ``MODEL_CARD.md``, so that :meth:`ModelRegistry.load_scorer` can score with it
  offline;
* ``plots/``: ROC, reliability and completeness PNGs;

and whose parameters, metrics and tags record the training configuration, the test
metrics, the SHA-256 of the data set and split (:func:`dataset_hash`), and the energy the
training used as measured by codecarbon (:func:`measure_energy`), or the reason it could
not be measured.

Two aliases mark the versions in use: ``champion`` (scores production candidates) and
``challenger`` (runs in shadow, :func:`astrid.ml.serve.shadow_score`). :meth:`promote`
makes a version champion and :meth:`rollback` restores the previous one; the order of
champions is kept in the registered model's tag ``astrid.champion_history``.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from astrid.errors import ModelNotAvailable
from astrid.ml.models import TripletCnn, TripletCnnEnsemble
from astrid.ml.serve import ModelMetadata, Scorer, save_model_bundle

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "EnergyMeter",
    "EnergyReport",
    "ModelCardInfo",
    "ModelRegistry",
    "RegisteredModelSummary",
    "RegisteredVersion",
    "RegistryConfig",
    "dataset_hash",
    "load_scorer",
    "measure_energy",
    "render_model_card",
]

CHAMPION = "champion"
"""Alias of the version that scores production candidates."""

CHALLENGER = "challenger"
"""Alias of the version that runs in shadow, candidate for promotion."""

_HISTORY_TAG = "astrid.champion_history"
_MODEL_ARTIFACT = "model"
_PLOTS_ARTIFACT = "plots"
_CARD_FILE = "MODEL_CARD.md"


# --------------------------------------------------------------------------------------
# dataset hash


def _update_array(digest: Any, label: str, array: np.ndarray) -> None:
    """Hash an array's name, dtype, shape and bytes (little-endian, C order)."""
    data = np.ascontiguousarray(array)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    digest.update(f"{label}|{data.dtype.str}|{data.shape}|".encode())
    # The buffer itself, not a bytes copy: a training set's stamps are gigabytes.
    digest.update(data.reshape(-1).view(np.uint8).data)


def dataset_hash(
    triplets: ArrayLike,
    labels: ArrayLike,
    split_assignment: ArrayLike,
    *,
    groups: ArrayLike | None = None,
) -> str:
    """SHA-256 of a training set's content: triplets, labels, split, and optionally groups.

    Two data sets hash alike only if they hold the same pixels (as float32), the same
    labels, the same assignment of examples to splits and (if given) the same groups, in
    the same order. Recorded with each model, it tells whether two models saw the same
    data.

    Parameters
    ----------
    triplets : array_like, shape (n, 3, ny, nx)
        The (normalised) cutouts.
    labels : array_like, shape (n,)
        0 or 1.
    split_assignment : array_like, shape (n,)
        Split code of each example (:attr:`astrid.ml.train.GroupSplit.assignment`).
    groups : array_like, shape (n,), or None
        Group ids; their string form is hashed. None leaves them out.

    Returns
    -------
    str
        Hexadecimal SHA-256.
    """
    digest = hashlib.sha256(b"astrid-dataset-v1|")
    _update_array(digest, "triplets", np.asarray(triplets, dtype=np.float32))
    _update_array(digest, "labels", np.asarray(labels).astype(np.int8))
    _update_array(digest, "split", np.asarray(split_assignment).astype(np.int8))
    if groups is not None:
        text = "\x00".join(str(g) for g in np.asarray(groups).reshape(-1).tolist())
        digest.update(b"groups|")
        digest.update(text.encode("utf-8"))
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# energy


@dataclass(frozen=True)
class EnergyReport:
    """Energy used by a block of code, as codecarbon reported it, or why it could not.

    Attributes
    ----------
    measured : bool
        True when codecarbon returned an energy figure; every number below is then set.
    energy_kwh : float or None
        Total energy, kWh (CPU + RAM + GPU).
    cpu_energy_kwh, ram_energy_kwh, gpu_energy_kwh : float or None
        Its parts, kWh.
    emissions_kg : float or None
        CO2-equivalent emissions, kg, for ``country_iso_code``'s electricity mix.
    duration_s : float or None
        Wall-clock seconds measured.
    method : str
        How codecarbon obtained the figures (its version and the hardware probes it used;
        ``CPU(RAPL)`` reads energy counters, ``CPU(Cpu Load)`` is codecarbon's estimate
        from the CPU load and the processor's TDP).
    country_iso_code : str
        Country whose carbon intensity was used.
    reason : str
        When not measured, why; empty otherwise.
    """

    measured: bool
    energy_kwh: float | None = None
    cpu_energy_kwh: float | None = None
    ram_energy_kwh: float | None = None
    gpu_energy_kwh: float | None = None
    emissions_kg: float | None = None
    duration_s: float | None = None
    method: str = ""
    country_iso_code: str = ""
    reason: str = ""

    def summary(self) -> str:
        """One line for a model card or a log."""
        if not self.measured:
            return f"not measured: {self.reason}"
        return (
            f"{self.energy_kwh:.3g} kWh (CPU {self.cpu_energy_kwh:.3g}, RAM "
            f"{self.ram_energy_kwh:.3g}, GPU {self.gpu_energy_kwh:.3g}) over "
            f"{self.duration_s:.1f} s, {self.emissions_kg:.3g} kg CO2eq at the "
            f"{self.country_iso_code} grid mix; {self.method}"
        )


class EnergyMeter:
    """Holder of the :class:`EnergyReport` that :func:`measure_energy` fills on exit."""

    def __init__(self) -> None:
        self.report: EnergyReport | None = None


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


@contextmanager
def measure_energy(*, country_iso_code: str) -> Iterator[EnergyMeter]:
    """Measure the energy used inside a ``with`` block with codecarbon, offline.

    Uses ``codecarbon.OfflineEmissionsTracker`` (no network; no file written), which
    tracks CPU and RAM, and NVIDIA GPUs where present. If codecarbon is missing, fails to
    start or returns no figure, the report says so with the reason; no number is ever
    made up.

    Parameters
    ----------
    country_iso_code : str
        ISO 3166-1 alpha-3 code of the country whose electricity mix converts energy to
        emissions (``"FRA"``, ``"USA"``).

    Yields
    ------
    EnergyMeter
        Its ``report`` is set when the block exits (also when it raises).
    """
    meter = EnergyMeter()
    tracker: Any = None
    started = time.perf_counter()
    try:
        from codecarbon import OfflineEmissionsTracker

        with warnings.catch_warnings():
            # codecarbon 3.3 deprecates save_to_file in favour of output_methods, which
            # older 3.x releases lack; the argument still works across the pinned range.
            warnings.simplefilter("ignore", DeprecationWarning)
            tracker = OfflineEmissionsTracker(
                country_iso_code=country_iso_code, log_level="error", save_to_file=False
            )
        tracker.start()
    except Exception as exc:  # codecarbon can fail in many ways on unusual hardware
        meter.report = EnergyReport(
            measured=False,
            country_iso_code=country_iso_code,
            reason=f"codecarbon could not start ({type(exc).__name__}: {exc})",
        )
        tracker = None
    try:
        yield meter
    finally:
        if tracker is not None:
            meter.report = _stop_tracker(tracker, country_iso_code, started)


def _stop_tracker(tracker: Any, country_iso_code: str, started: float) -> EnergyReport:
    try:
        tracker.stop()
        data = tracker.final_emissions_data
    except Exception as exc:
        return EnergyReport(
            measured=False,
            country_iso_code=country_iso_code,
            reason=f"codecarbon failed to stop ({type(exc).__name__}: {exc})",
        )
    energy = _finite(getattr(data, "energy_consumed", None))
    if data is None or energy is None:
        return EnergyReport(
            measured=False,
            country_iso_code=country_iso_code,
            duration_s=time.perf_counter() - started,
            reason="codecarbon returned no energy figure",
        )
    conf = getattr(tracker, "_conf", {}) or {}
    probes = ", ".join(str(h) for h in conf.get("hardware", [])) or "unknown probes"
    version = getattr(data, "codecarbon_version", "") or conf.get("codecarbon_version", "")
    if "RAPL" not in probes:
        # "CPU(Cpu Load)": no RAPL counter was readable, so codecarbon models CPU power
        # from the load and the processor's TDP; RAM power is modelled from its size.
        probes += " (CPU and RAM from codecarbon's power models, not energy counters)"
    return EnergyReport(
        measured=True,
        energy_kwh=energy,
        cpu_energy_kwh=_finite(getattr(data, "cpu_energy", 0.0)) or 0.0,
        ram_energy_kwh=_finite(getattr(data, "ram_energy", 0.0)) or 0.0,
        gpu_energy_kwh=_finite(getattr(data, "gpu_energy", 0.0)) or 0.0,
        emissions_kg=_finite(getattr(data, "emissions", None)) or 0.0,
        duration_s=_finite(getattr(data, "duration", None)) or time.perf_counter() - started,
        method=f"codecarbon {version} offline: {probes}",
        country_iso_code=country_iso_code,
    )


# --------------------------------------------------------------------------------------
# model card


@dataclass(frozen=True)
class ModelCardInfo:
    """The prose of a model card; the numbers come from the run.

    Attributes
    ----------
    data : str
        What the model was trained and evaluated on (surveys, fields, dates, how labels
        were made, class balance).
    intended_use : str
        What the scores are for.
    limitations : str
        Where the model is known or expected to fail.
    """

    data: str = "Not described."
    intended_use: str = (
        "Ranking candidates detected on AstrID difference images by the probability that "
        "they are real astrophysical transients, to order and filter them for vetting. "
        "Scores are calibrated probabilities on data like the validation split."
    )
    limitations: str = (
        "Scores are only calibrated for data like the training data (same survey, seeing, "
        "depth and cutout normalisation); a change of instrument or pipeline needs a "
        "retrained or at least recalibrated model. Rare artefacts absent from training "
        "may score high. The model sees the candidate's cutout triplet only (the "
        "architecture gives its size and any central crop), not the light curve or "
        "catalog context."
    )


def render_model_card(
    metadata: ModelMetadata,
    info: ModelCardInfo,
    *,
    energy: EnergyReport | None = None,
    params: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> str:
    """A markdown model card for one model version.

    Parameters
    ----------
    metadata : ModelMetadata
        Name, version, calibration, metrics and dataset hash.
    info : ModelCardInfo
        Data description, intended use and limitations.
    energy : EnergyReport or None
        Energy used in training; None is stated as not measured.
    params : mapping or None
        Training parameters to list.
    run_id : str or None
        MLflow run of the training.

    Returns
    -------
    str
        The card's markdown.
    """
    lines = [
        f"# Model card: {metadata.name} version {metadata.version}",
        "",
        "## Model",
        "",
        f"- Architecture: {metadata.architecture} {json.dumps(metadata.model_config)}",
        f"- Input normalisation: `{metadata.normalisation}`"
        + (f" (clip {metadata.normalisation_clip})" if metadata.normalisation_clip else ""),
        f"- Calibration temperature: {metadata.temperature:.4f}",
        f"- Weights SHA-256: `{metadata.weights_sha256}`",
    ]
    if run_id:
        lines.append(f"- Training run: `{run_id}`")
    lines += ["", "## Data", "", info.data, ""]
    digest = metadata.dataset_hash or "unknown"
    lines.append(f"Dataset SHA-256 (triplets, labels, split): `{digest}`")
    lines += ["", "## Metrics", ""]
    if metadata.metrics:
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_metric_cell(v)} |" for k, v in sorted(metadata.metrics.items())]
    else:
        lines.append("No metrics recorded.")
    if params:
        lines += ["", "## Training parameters", "", "| parameter | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(params.items())]
    lines += ["", "## Intended use", "", info.intended_use, ""]
    lines += ["## Limitations", "", info.limitations, ""]
    lines += ["## Energy", ""]
    lines.append(energy.summary() if energy is not None else "not measured: no report given")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class RegistryConfig:
    """Where MLflow keeps runs, the registry and artifacts.

    Attributes
    ----------
    tracking_uri : str
        MLflow tracking (and registry) URI: ``sqlite:///<folder>/mlflow.db`` on one
        machine, ``http://host:5000`` for a server.
    artifact_location : str
        Artifact root of the experiment (a ``file://`` URI or folder, or an object-store
        URI); used when the experiment is created.
    experiment : str
        Experiment name.
    """

    tracking_uri: str
    artifact_location: str
    experiment: str = "astrid-real-bogus"

    @classmethod
    def local(
        cls, directory: str | Path, *, experiment: str = "astrid-real-bogus"
    ) -> RegistryConfig:
        """SQLite store ``<directory>/mlflow.db`` and artifacts in ``<directory>/artifacts``."""
        folder = Path(directory).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        return cls(
            tracking_uri=f"sqlite:///{folder / 'mlflow.db'}",
            artifact_location=(folder / "artifacts").as_uri(),
            experiment=experiment,
        )


@dataclass(frozen=True)
class RegisteredVersion:
    """A model version just registered.

    Attributes
    ----------
    name : str
        Registered model name.
    version : int
        Its version number.
    run_id : str
        MLflow run that holds its artifacts.
    source : str
        Artifact URI of its bundle.
    metadata : ModelMetadata
        The bundle's metadata.
    """

    name: str
    version: int
    run_id: str
    source: str
    metadata: ModelMetadata


@dataclass(frozen=True)
class RegisteredModelSummary:
    """One registered model, for listings.

    Attributes
    ----------
    name : str
        Registered model name.
    versions : tuple of int
        All its versions, ascending.
    aliases : dict of str to int
        Alias to version (``{"champion": 3, "challenger": 4}``).
    champion_history : tuple of int
        Versions that were champion, oldest first; the last is the current one.
    """

    name: str
    versions: tuple[int, ...]
    aliases: dict[str, int] = field(default_factory=dict)
    champion_history: tuple[int, ...] = ()


class ModelRegistry:
    """Log training runs and manage model versions in MLflow.

    Parameters
    ----------
    config : RegistryConfig
        Tracking URI and artifact location.
    """

    def __init__(self, config: RegistryConfig) -> None:
        from mlflow import MlflowClient

        self.config = config
        self.client = MlflowClient(
            tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri
        )
        self._experiment_id: str | None = None

    # runs ---------------------------------------------------------------------------

    def experiment_id(self) -> str:
        """Id of the configured experiment, created on first use."""
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.config.experiment)
            self._experiment_id = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(
                    self.config.experiment, artifact_location=self.config.artifact_location
                )
            )
        return self._experiment_id

    def log_run(
        self,
        *,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        plots: Sequence[str | Path] = (),
        dataset_sha256: str | None = None,
        energy: EnergyReport | None = None,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        end: bool = True,
    ) -> str:
        """Record one training or evaluation run.

        Parameters
        ----------
        params : mapping or None
            Configuration values (logged as MLflow parameters).
        metrics : mapping of str to float or None
            Results; non-finite values are logged as tags instead, since MLflow metrics
            must be numbers.
        plots : sequence of path
            PNG files, logged under ``plots/``.
        dataset_sha256 : str or None
            :func:`dataset_hash` of the data (tag ``dataset_sha256``).
        energy : EnergyReport or None
            Energy used; logged as metrics when measured, else the reason as the tag
            ``energy_status``.
        run_name : str or None
            Display name.
        tags : mapping or None
            Extra tags.
        end : bool
            Mark the run finished; False leaves it open for more artifacts.

        Returns
        -------
        str
            The run id.
        """
        client = self.client
        run = client.create_run(self.experiment_id(), run_name=run_name, tags=dict(tags or {}))
        run_id = run.info.run_id
        for key, value in (params or {}).items():
            client.log_param(run_id, key, value)
        for key, value in (metrics or {}).items():
            number = _finite(value)
            if number is None:
                client.set_tag(run_id, f"metric_not_finite.{key}", str(value))
            else:
                client.log_metric(run_id, key, number)
        if dataset_sha256 is not None:
            client.set_tag(run_id, "dataset_sha256", dataset_sha256)
        self._log_energy(run_id, energy)
        for plot in plots:
            client.log_artifact(run_id, str(plot), _PLOTS_ARTIFACT)
        if end:
            client.set_terminated(run_id)
        return run_id

    def _log_energy(self, run_id: str, energy: EnergyReport | None) -> None:
        client = self.client
        if energy is None:
            client.set_tag(run_id, "energy_status", "not measured: no energy report given")
            return
        if not energy.measured:
            client.set_tag(run_id, "energy_status", f"not measured: {energy.reason}")
            return
        client.set_tag(run_id, "energy_status", "measured")
        client.set_tag(run_id, "energy_method", energy.method)
        client.set_tag(run_id, "energy_country", energy.country_iso_code)
        values = {
            "energy_kwh": energy.energy_kwh,
            "energy_cpu_kwh": energy.cpu_energy_kwh,
            "energy_ram_kwh": energy.ram_energy_kwh,
            "energy_gpu_kwh": energy.gpu_energy_kwh,
            "emissions_kg_co2eq": energy.emissions_kg,
            "energy_duration_s": energy.duration_s,
        }
        for key, value in values.items():
            if value is not None:
                client.log_metric(run_id, key, float(value))

    # registration -------------------------------------------------------------------

    def register(
        self,
        model: TripletCnn | TripletCnnEnsemble,
        *,
        name: str,
        temperature: float,
        normalisation: str = "normalise_triplet",
        normalisation_clip: float | None = None,
        params: Mapping[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        plots: Sequence[str | Path] = (),
        dataset_sha256: str | None = None,
        energy: EnergyReport | None = None,
        card: ModelCardInfo | None = None,
        alias: str | None = CHALLENGER,
        run_name: str | None = None,
    ) -> RegisteredVersion:
        """Log a run for ``model`` and register it as a new version of ``name``.

        The run gets the parameters, metrics, plots, dataset hash and energy (as
        :meth:`log_run`), and under ``model/`` the bundle (:func:`save_model_bundle`,
        with the registry's version number as its version) and ``MODEL_CARD.md``.

        Parameters
        ----------
        model : TripletCnn or TripletCnnEnsemble
            Trained network, or an ensemble of them.
        name : str
            Registered model name (created if new).
        temperature : float
            Calibration temperature.
        normalisation, normalisation_clip
            Input normalisation the model was trained with.
        params, metrics, plots, dataset_sha256, energy, run_name
            As for :meth:`log_run`.
        card : ModelCardInfo or None
            Prose of the model card; None uses the defaults.
        alias : str or None
            Alias to give the new version (``"challenger"`` by default; ``"champion"``
            promotes it at once; None gives none).

        Returns
        -------
        RegisteredVersion
            Name, version, run and metadata.
        """
        from mlflow.exceptions import MlflowException

        client = self.client
        run_id = self.log_run(
            params=params,
            metrics=metrics,
            plots=plots,
            dataset_sha256=dataset_sha256,
            energy=energy,
            run_name=run_name,
            tags={"astrid.model_name": name},
            end=False,
        )
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(
                name, description="AstrID real/bogus classifier of candidate cutout triplets"
            )
        run = client.get_run(run_id)
        source = f"{run.info.artifact_uri}/{_MODEL_ARTIFACT}"
        # The version number is assigned by the registry; the bundle records it, so the
        # version is created first and its artifacts written right after.
        model_version = client.create_model_version(name, source=source, run_id=run_id)
        version = int(model_version.version)
        with tempfile.TemporaryDirectory() as tmp:
            bundle = Path(tmp) / _MODEL_ARTIFACT
            metadata = save_model_bundle(
                bundle,
                model,
                name=name,
                version=str(version),
                temperature=temperature,
                normalisation=normalisation,
                normalisation_clip=normalisation_clip,
                metrics=metrics,
                dataset_hash=dataset_sha256,
            )
            card_text = render_model_card(
                metadata, card or ModelCardInfo(), energy=energy, params=params, run_id=run_id
            )
            (bundle / _CARD_FILE).write_text(card_text, encoding="utf-8")
            client.log_artifacts(run_id, str(bundle), _MODEL_ARTIFACT)
        client.set_tag(run_id, "astrid.model_version", str(version))
        client.set_terminated(run_id)
        if alias == CHAMPION:
            self.promote(name, version)
        elif alias is not None:
            client.set_registered_model_alias(name, alias, str(version))
        return RegisteredVersion(name, version, run_id, source, metadata)

    # aliases ------------------------------------------------------------------------

    def alias_version(self, name: str, alias: str) -> int | None:
        """Version of ``name`` that carries ``alias``, or None."""
        aliases = self.client.get_registered_model(name).aliases
        version = aliases.get(alias)
        return None if version is None else int(version)

    def _history(self, name: str) -> list[int]:
        tags = self.client.get_registered_model(name).tags or {}
        return [int(v) for v in json.loads(tags.get(_HISTORY_TAG, "[]"))]

    def set_challenger(self, name: str, version: int) -> None:
        """Mark ``version`` of ``name`` as the challenger."""
        self.client.set_registered_model_alias(name, CHALLENGER, str(int(version)))

    def promote(self, name: str, version: int | None = None) -> int:
        """Make a version the champion (by default, the current challenger).

        The previous champion is remembered for :meth:`rollback`; the challenger alias is
        removed if it pointed at the promoted version.

        Returns
        -------
        int
            The new champion's version.

        Raises
        ------
        ModelNotAvailable
            If no version is given and there is no challenger.
        """
        client = self.client
        if version is None:
            version = self.alias_version(name, CHALLENGER)
            if version is None:
                raise ModelNotAvailable(name, "no challenger to promote")
        version = int(version)
        client.get_model_version(name, str(version))  # raises if the version does not exist
        history = self._history(name)
        current = self.alias_version(name, CHAMPION)
        if current is not None and (not history or history[-1] != current):
            history.append(current)  # a champion set outside promote()
        if not history or history[-1] != version:
            history.append(version)
        client.set_registered_model_alias(name, CHAMPION, str(version))
        client.set_registered_model_tag(name, _HISTORY_TAG, json.dumps(history))
        if self.alias_version(name, CHALLENGER) == version:
            client.delete_registered_model_alias(name, CHALLENGER)
        return version

    def rollback(self, name: str) -> int:
        """Give the champion alias back to the previous champion.

        Returns
        -------
        int
            The restored champion's version.

        Raises
        ------
        ModelNotAvailable
            If there is no earlier champion.
        """
        history = self._history(name)
        if len(history) < 2:
            raise ModelNotAvailable(name, "no earlier champion to roll back to")
        demoted = history.pop()
        restored = history[-1]
        self.client.set_registered_model_alias(name, CHAMPION, str(restored))
        self.client.set_registered_model_tag(name, _HISTORY_TAG, json.dumps(history))
        self.client.set_model_version_tag(name, str(demoted), "astrid.rolled_back", "true")
        return restored

    # listing and loading ------------------------------------------------------------

    def list_models(self) -> list[RegisteredModelSummary]:
        """Every registered model with its versions, aliases and champion history."""
        out = []
        for model in self.client.search_registered_models():
            versions = self.client.search_model_versions(f"name='{model.name}'")
            tags = model.tags or {}
            out.append(
                RegisteredModelSummary(
                    name=model.name,
                    versions=tuple(sorted(int(v.version) for v in versions)),
                    aliases={k: int(v) for k, v in (model.aliases or {}).items()},
                    champion_history=tuple(json.loads(tags.get(_HISTORY_TAG, "[]"))),
                )
            )
        return sorted(out, key=lambda s: s.name)

    def load_scorer(self, name: str, alias: str = CHAMPION, *, batch_size: int = 256) -> Scorer:
        """A :class:`~astrid.ml.serve.Scorer` for the version of ``name`` with ``alias``.

        The bundle is downloaded to a temporary folder, loaded into memory and the folder
        removed.

        Raises
        ------
        ModelNotAvailable
            If the model or alias does not exist or its bundle does not load.
        """
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            raise ModelNotAvailable(name, f"no version with alias {alias!r}") from exc
        if version.run_id is None:
            raise ModelNotAvailable(name, f"version {version.version} has no run")
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = self.client.download_artifacts(version.run_id, _MODEL_ARTIFACT, tmp)
            except (MlflowException, OSError) as exc:
                raise ModelNotAvailable(
                    name, f"artifacts of version {version.version} not readable: {exc}"
                ) from exc
            return Scorer.from_path(local, batch_size=batch_size)

    def export_bundle(
        self,
        name: str,
        directory: str | Path,
        *,
        alias: str | None = CHAMPION,
        version: int | None = None,
    ) -> Path:
        """Copy a version's bundle (weights, metadata, model card) into ``directory``.

        The result loads with :meth:`~astrid.ml.serve.Scorer.from_path`; exported into
        ``astrid/ml/weights/<name>/`` it ships with the package
        (:meth:`~astrid.ml.serve.Scorer.packaged`).

        Parameters
        ----------
        name : str
            Registered model name.
        directory : str or Path
            Destination folder (created; bundle files in it are replaced).
        alias : str or None
            Alias of the version to export (``"champion"`` by default).
        version : int or None
            Export this version instead of the alias's.

        Returns
        -------
        Path
            ``directory``.

        Raises
        ------
        ModelNotAvailable
            If the version or alias does not exist or its artifacts are unreadable.
        """
        import shutil

        from mlflow.exceptions import MlflowException

        try:
            if version is not None:
                found = self.client.get_model_version(name, str(int(version)))
            elif alias is not None:
                found = self.client.get_model_version_by_alias(name, alias)
            else:
                raise ModelNotAvailable(name, "give an alias or a version to export")
        except MlflowException as exc:
            raise ModelNotAvailable(name, f"no such version or alias: {exc}") from exc
        if found.run_id is None:
            raise ModelNotAvailable(name, f"version {found.version} has no run")
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = Path(self.client.download_artifacts(found.run_id, _MODEL_ARTIFACT, tmp))
            except (MlflowException, OSError) as exc:
                raise ModelNotAvailable(
                    name, f"artifacts of version {found.version} not readable: {exc}"
                ) from exc
            for item in sorted(local.iterdir()):
                if item.is_file():
                    shutil.copyfile(item, target / item.name)
        return target

    def model_card(self, name: str, version: int) -> str:
        """The markdown model card stored with ``version`` of ``name``."""
        run_id = self.client.get_model_version(name, str(int(version))).run_id
        if run_id is None:
            raise ModelNotAvailable(name, f"version {version} has no run")
        with tempfile.TemporaryDirectory() as tmp:
            path = self.client.download_artifacts(run_id, f"{_MODEL_ARTIFACT}/{_CARD_FILE}", tmp)
            return Path(path).read_text(encoding="utf-8")


def load_scorer(
    name: str,
    *,
    path: str | Path | None = None,
    alias: str | None = None,
    registry_dir: str | Path | None = None,
) -> Scorer:
    """The :class:`~astrid.ml.serve.Scorer` a user named: a bundle, an alias, or the package's.

    Parameters
    ----------
    name : str
        Registered (and packaged) model name, e.g. ``"real_bogus"``.
    path : path or None
        A bundle folder; takes precedence.
    alias : str or None
        A registry alias (``champion``, ``challenger``...), looked up in the local
        registry under ``registry_dir``.
    registry_dir : path or None
        The MLflow folder of the local registry; needed with ``alias``.

    Returns
    -------
    Scorer
        From ``path``, else from the registry's ``alias``, else the bundle shipped in the
        package.

    Raises
    ------
    ModelNotAvailable
        If the bundle, alias or packaged model cannot be loaded.
    """
    if path is not None:
        return Scorer.from_path(path)
    if alias is not None:
        if registry_dir is None:
            raise ValueError("registry_dir is needed to look up an alias")
        return ModelRegistry(RegistryConfig.local(registry_dir)).load_scorer(name, alias)
    return Scorer.packaged(name)


def _metric_cell(value: float) -> str:
    """A metric as a model card shows it: counts in full, other values to 4 digits."""
    if math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return f"{value:.4g}"
