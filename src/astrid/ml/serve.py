"""Score candidates with a trained, calibrated real/bogus model: no network, no fallback.

A *model bundle* is a folder with two files:

``weights.pt``
    The network's ``state_dict`` (a :class:`~astrid.ml.models.TripletCnn`, or a
    :class:`~astrid.ml.models.TripletCnnEnsemble` whose logit is the mean over several
    networks and views of the stamps), written by :func:`torch.save` and read back with
    ``weights_only=True`` (tensors only, no pickled code).
``metadata.json``
    :class:`ModelMetadata`: name, version, architecture and its config, the calibration
    temperature, the name of the input normalisation, the evaluation metrics, the content
    hash of the training data and the SHA-256 of ``weights.pt``.

:meth:`Scorer.from_path` loads a bundle, checks the weights against their checksum, and
applies the recorded normalisation and temperature, so its scores are calibrated
probabilities. Anything missing or inconsistent raises
:class:`~astrid.errors.ModelNotAvailable`: there is never a fallback to an untrained or
random model. Production bundles are shipped inside the package under
``astrid/ml/weights/<name>/`` (:meth:`Scorer.packaged`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy.special import expit

from astrid.errors import BadImageShape, ModelNotAvailable
from astrid.ml.models import (
    TripletCnn,
    TripletCnnConfig,
    TripletCnnEnsemble,
    fuse_batch_norm,
    predict_logits,
    views_as_weights,
)

__all__ = [
    "ARCHITECTURES",
    "BUNDLE_FORMAT_VERSION",
    "METADATA_FILE",
    "NORMALISATIONS",
    "WEIGHTS_FILE",
    "ModelMetadata",
    "Scorer",
    "ShadowScores",
    "load_bundle",
    "packaged_model_path",
    "save_model_bundle",
    "shadow_score",
]

WEIGHTS_FILE = "weights.pt"
"""File name of a bundle's ``state_dict``."""

METADATA_FILE = "metadata.json"
"""File name of a bundle's :class:`ModelMetadata`."""

BUNDLE_FORMAT_VERSION = 1
"""Version of the bundle layout written by :func:`save_model_bundle`."""


def _normalise_triplet(triplets: NDArray[np.float32], clip: float | None) -> NDArray[np.float32]:
    from astrid.ml.alerts import normalise_triplet

    return normalise_triplet(triplets, clip=clip)


def _no_normalisation(triplets: NDArray[np.float32], clip: float | None) -> NDArray[np.float32]:
    if not np.isfinite(triplets).all():
        raise ValueError("triplets contain non-finite pixels and the model normalises nothing")
    return triplets if clip is None else np.clip(triplets, -clip, clip)


NORMALISATIONS: Mapping[str, Callable[[NDArray[np.float32], float | None], NDArray[np.float32]]]
NORMALISATIONS = {
    "normalise_triplet": _normalise_triplet,
    "none": _no_normalisation,
}
"""Input normalisations a bundle may name: ``"normalise_triplet"``
(:func:`astrid.ml.alerts.normalise_triplet`, a robust z-score of each plane) or ``"none"``
(inputs are used as given)."""


@dataclass(frozen=True)
class ModelMetadata:
    """Everything needed to use a bundle's weights, and what they were shown to do.

    Attributes
    ----------
    name : str
        Model name (``"real_bogus"``).
    version : str
        Version of these weights (a registry version number or a release tag).
    temperature : float
        Calibration temperature: probabilities are ``sigmoid(logit / temperature)``.
    normalisation : str
        Key of :data:`NORMALISATIONS` applied to raw cutouts before the network.
    normalisation_clip : float or None
        ``clip`` passed to the normalisation; None does not clip.
    architecture : str
        Network class: ``"TripletCnn"`` or ``"TripletCnnEnsemble"``.
    model_config : dict
        For a ``TripletCnn``, the fields of :class:`~astrid.ml.models.TripletCnnConfig`;
        for a ``TripletCnnEnsemble``, ``{"members": [<those fields>, ...], "views":
        [<dihedral transforms>]}``.
    metrics : dict of str to float
        Evaluation metrics on the test split (AUC, FNR at 1 % FPR, ECE...).
    dataset_hash : str or None
        :func:`astrid.ml.registry.dataset_hash` of the training data; None if unknown.
        For an ensemble made by ``astrid models combine``, the set whose validation split
        calibrated it (its members record their own training data in their bundles).
    weights_sha256 : str
        SHA-256 of ``weights.pt``, checked on load.
    format_version : int
        :data:`BUNDLE_FORMAT_VERSION` of the writer.
    """

    name: str
    version: str
    temperature: float
    normalisation: str = "normalise_triplet"
    normalisation_clip: float | None = None
    architecture: str = "TripletCnn"
    model_config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    dataset_hash: str | None = None
    weights_sha256: str = ""
    format_version: int = BUNDLE_FORMAT_VERSION

    def to_json(self) -> str:
        """The metadata as indented JSON."""
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        """Parse :meth:`to_json` output; unknown keys are an error."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("metadata must be a JSON object")
        return cls(**data)

    def cnn_config(self) -> TripletCnnConfig:
        """The :class:`~astrid.ml.models.TripletCnnConfig` of a ``TripletCnn`` bundle.

        Raises
        ------
        ValueError
            If the bundle holds another architecture.
        """
        if self.architecture != TripletCnn.__name__:
            raise ValueError(f"a {self.architecture} has no single TripletCnnConfig")
        return _cnn_config(self.model_config)

    def build_network(self) -> TripletCnn | TripletCnnEnsemble:
        """An untrained network of the recorded architecture, ready for the weights.

        Returns
        -------
        TripletCnn or TripletCnnEnsemble
            Built from ``model_config``.

        Raises
        ------
        ValueError
            If the architecture is unknown or its config malformed.
        """
        if self.architecture == TripletCnn.__name__:
            return TripletCnn(self.cnn_config())
        if self.architecture == TripletCnnEnsemble.__name__:
            config = self.model_config
            if set(config) != {"members", "views"}:
                raise ValueError(
                    "a TripletCnnEnsemble config has exactly the keys 'members' and 'views', "
                    f"not {sorted(config)}"
                )
            members, views = config["members"], config["views"]
            if not isinstance(members, list) or not members:
                raise ValueError("a TripletCnnEnsemble config needs a non-empty 'members' list")
            if not isinstance(views, list) or not all(
                isinstance(k, int) and not isinstance(k, bool) for k in views
            ):
                raise ValueError(f"'views' must be a list of integers, not {views!r}")
            return TripletCnnEnsemble([TripletCnn(_cnn_config(m)) for m in members], views=views)
        raise ValueError(
            f"unknown architecture {self.architecture!r}; known: {sorted(ARCHITECTURES)}"
        )


ARCHITECTURES = (TripletCnn.__name__, TripletCnnEnsemble.__name__)
"""Networks a bundle may hold."""


def _cnn_config(raw: Mapping[str, Any]) -> TripletCnnConfig:
    config = dict(raw)
    # Bundles written before the centre window existed pooled the whole map only.
    config.setdefault("centre_window", 0)
    if "block_channels" in config:
        config["block_channels"] = tuple(config["block_channels"])
    return TripletCnnConfig(**config)


def _config_dict(config: TripletCnnConfig) -> dict[str, Any]:
    out = asdict(config)
    out["block_channels"] = list(out["block_channels"])
    return out


def _model_config(model: TripletCnn | TripletCnnEnsemble) -> dict[str, Any]:
    if isinstance(model, TripletCnnEnsemble):
        return {
            "members": [_config_dict(c) for c in model.member_configs],
            "views": list(model.views),
        }
    return _config_dict(model.config)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_model_bundle(
    directory: str | Path,
    model: TripletCnn | TripletCnnEnsemble,
    *,
    name: str,
    version: str,
    temperature: float,
    normalisation: str = "normalise_triplet",
    normalisation_clip: float | None = None,
    metrics: Mapping[str, float] | None = None,
    dataset_hash: str | None = None,
) -> ModelMetadata:
    """Write ``model`` and its metadata as a bundle that :meth:`Scorer.from_path` reads.

    Parameters
    ----------
    directory : str or Path
        Folder to write (created if needed); existing bundle files are replaced.
    model : TripletCnn or TripletCnnEnsemble
        Trained network (not fused: its batch normalisation is kept, so the weights can
        also be trained further), or an ensemble of them.
    name, version : str
        Identify the model.
    temperature : float
        Calibration temperature (:func:`astrid.ml.train.fit_temperature`).
    normalisation : str
        Key of :data:`NORMALISATIONS` the model was trained with.
    normalisation_clip : float or None
        Its ``clip``.
    metrics : mapping of str to float or None
        Evaluation metrics to record.
    dataset_hash : str or None
        Content hash of the training data.

    Returns
    -------
    ModelMetadata
        What was written to ``metadata.json``.
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, not {temperature}")
    if normalisation not in NORMALISATIONS:
        raise ValueError(
            f"unknown normalisation {normalisation!r}; known: {sorted(NORMALISATIONS)}"
        )
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, weights)
    metadata = ModelMetadata(
        name=name,
        version=str(version),
        temperature=float(temperature),
        normalisation=normalisation,
        normalisation_clip=None if normalisation_clip is None else float(normalisation_clip),
        architecture=type(model).__name__,
        model_config=_model_config(model),
        metrics={k: float(v) for k, v in (metrics or {}).items()},
        dataset_hash=dataset_hash,
        weights_sha256=_sha256(weights),
    )
    (folder / METADATA_FILE).write_text(metadata.to_json(), encoding="utf-8")
    return metadata


def packaged_model_path(name: str = "real_bogus") -> Path:
    """Folder of a bundle shipped inside the package (``astrid/ml/weights/<name>``).

    Raises
    ------
    ModelNotAvailable
        If the package holds no such bundle.
    """
    resource = files("astrid.ml").joinpath("weights", name)
    if not isinstance(resource, Path):
        raise ModelNotAvailable(
            name, "packaged weights must be installed as files, not inside a zip archive"
        )
    if not resource.is_dir():
        raise ModelNotAvailable(
            name,
            f"no packaged weights: astrid/ml/weights/{name}/ is not in this installation "
            "(train and ship a model bundle there, or load one with Scorer.from_path)",
        )
    return resource


def load_bundle(path: str | Path) -> tuple[TripletCnn | TripletCnnEnsemble, ModelMetadata]:
    """Read a bundle folder written by :func:`save_model_bundle`, checks included.

    Parameters
    ----------
    path : str or Path
        The bundle folder.

    Returns
    -------
    network : TripletCnn or TripletCnnEnsemble
        The trained network, not fused (it can be trained further or combined with others
        in a :class:`~astrid.ml.models.TripletCnnEnsemble`).
    metadata : ModelMetadata
        Its metadata.

    Raises
    ------
    ModelNotAvailable
        If the folder, its weights or metadata are missing or unreadable, the weights
        do not match their checksum or the architecture, or the metadata names an
        unknown architecture or bundle format.
    """
    folder = Path(path)
    label = str(path)
    if not folder.is_dir():
        raise ModelNotAvailable(label, f"no model bundle folder at {folder}")
    meta_file, weights_file = folder / METADATA_FILE, folder / WEIGHTS_FILE
    for needed in (meta_file, weights_file):
        if not needed.is_file():
            raise ModelNotAvailable(label, f"missing {needed.name} in {folder}")
    try:
        metadata = ModelMetadata.from_json(meta_file.read_text(encoding="utf-8"))
    except (ValueError, TypeError) as exc:
        raise ModelNotAvailable(label, f"unreadable {METADATA_FILE}: {exc}") from exc
    label = f"{metadata.name} version {metadata.version}"
    if metadata.format_version != BUNDLE_FORMAT_VERSION:
        raise ModelNotAvailable(
            label,
            f"bundle format {metadata.format_version}, this code reads {BUNDLE_FORMAT_VERSION}",
        )
    if metadata.architecture not in ARCHITECTURES:
        raise ModelNotAvailable(label, f"unknown architecture {metadata.architecture!r}")
    digest = _sha256(weights_file)
    if digest != metadata.weights_sha256:
        raise ModelNotAvailable(
            label,
            f"{WEIGHTS_FILE} has SHA-256 {digest[:12]}..., metadata records "
            f"{metadata.weights_sha256[:12]}...",
        )
    try:
        model = metadata.build_network()
    except (TypeError, ValueError) as exc:
        raise ModelNotAvailable(label, f"malformed model_config: {exc}") from exc
    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError, OSError) as exc:
        raise ModelNotAvailable(label, f"weights do not load: {exc}") from exc
    return model, metadata


#: Triplets per chunk of the input normalisation: 64 triplets of 63 x 63 float32 planes
#: are 3 MB, so the several passes over a chunk stay in the processor's caches.
_CHUNK = 64


class Scorer:
    """Calibrated real/bogus scores of cutout triplets from a trained model.

    Parameters
    ----------
    model : TripletCnn or TripletCnnEnsemble
        Trained network; a copy with batch normalisation fused (and an ensemble's views
        moved into its weights, :func:`~astrid.ml.models.views_as_weights`) is used for
        inference.
    metadata : ModelMetadata
        Its metadata (temperature and normalisation are applied from here).
    batch_size : int
        Triplets per forward pass.

    Notes
    -----
    Build one with :meth:`from_path` or :meth:`packaged` rather than by hand. Inference
    uses torch's current thread setting (``torch.set_num_threads``), which the caller
    controls.
    """

    def __init__(
        self,
        model: TripletCnn | TripletCnnEnsemble,
        metadata: ModelMetadata,
        *,
        batch_size: int = 256,
    ) -> None:
        if metadata.normalisation not in NORMALISATIONS:
            raise ModelNotAvailable(
                metadata.name,
                f"unknown input normalisation {metadata.normalisation!r}; "
                f"known: {sorted(NORMALISATIONS)}",
            )
        if not (metadata.temperature > 0 and math.isfinite(metadata.temperature)):
            raise ModelNotAvailable(
                metadata.name, f"invalid calibration temperature {metadata.temperature}"
            )
        self.metadata = metadata
        self.config = model.config
        self.batch_size = int(batch_size)
        fused = fuse_batch_norm(model)
        if isinstance(fused, TripletCnnEnsemble):
            fused = views_as_weights(fused)
        self._model = fused.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    @classmethod
    def from_path(cls, path: str | Path, *, batch_size: int = 256) -> Scorer:
        """Load a bundle folder written by :func:`save_model_bundle`.

        Raises
        ------
        ModelNotAvailable
            As :func:`load_bundle`, or if the recorded normalisation or temperature is
            invalid.
        """
        model, metadata = load_bundle(path)
        return cls(model, metadata, batch_size=batch_size)

    @classmethod
    def packaged(cls, name: str = "real_bogus", *, batch_size: int = 256) -> Scorer:
        """Load the bundle shipped in the package under ``astrid/ml/weights/<name>``.

        Raises
        ------
        ModelNotAvailable
            If it is not there or does not load.
        """
        return cls.from_path(packaged_model_path(name), batch_size=batch_size)

    @property
    def version(self) -> str:
        """Version of the loaded weights."""
        return self.metadata.version

    @property
    def model_name(self) -> str:
        """Registered model name, stored with every score (the pipeline's scorer interface)."""
        return self.metadata.name

    @property
    def model_version(self) -> str:
        """Exact version of the weights, stored with every score."""
        return self.metadata.version

    def _check(self, triplets: ArrayLike) -> NDArray[np.float32]:
        data = np.asarray(triplets, dtype=np.float32)
        if data.ndim == 3:
            data = data[None]
        size = self.config.cutout_size
        expected = (self.config.in_channels, size, size)
        if data.ndim != 4 or data.shape[1:] != expected:
            raise BadImageShape(
                data.shape, f"cutout triplets of shape (n, {', '.join(map(str, expected))})"
            )
        return data

    def normalise(self, triplets: ArrayLike) -> NDArray[np.float32]:
        """Apply the bundle's input normalisation to raw triplets ``(n, 3, ny, nx)``.

        Each plane is normalised on its own, so a large batch is done in chunks of
        ``_CHUNK`` triplets (small enough for the processor's caches), spread over
        ``torch.get_num_threads()`` threads (numpy's partial sorts release the GIL); the
        result is identical to one call on the whole batch.
        """
        data = self._check(triplets)
        fn = NORMALISATIONS[self.metadata.normalisation]
        clip = self.metadata.normalisation_clip
        if len(data) <= _CHUNK:
            return fn(data, clip)
        out = np.empty(data.shape, dtype=np.float32)
        starts = range(0, len(data), _CHUNK)

        def run(start: int) -> None:
            out[start : start + _CHUNK] = fn(data[start : start + _CHUNK], clip)

        threads = torch.get_num_threads()
        if threads < 2:
            for start in starts:
                run(start)
        else:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, starts))
        return out

    def logits(self, triplets: ArrayLike, *, normalised: bool = False) -> NDArray[np.float32]:
        """Uncalibrated logits (before temperature scaling).

        Parameters
        ----------
        triplets : array_like, shape (n, 3, ny, nx) or (3, ny, nx)
            Raw cutouts (science, reference, difference; NaN where masked), or already
            normalised ones if ``normalised``.
        normalised : bool
            True when ``triplets`` were already passed through :meth:`normalise`.

        Returns
        -------
        ndarray of float32, shape (n,)
        """
        data = self._check(triplets) if normalised else self.normalise(triplets)
        return predict_logits(self._model, data, batch_size=self.batch_size)

    def score(self, triplets: ArrayLike, *, normalised: bool = False) -> NDArray[np.float64]:
        """Calibrated probabilities that each candidate is real.

        Parameters
        ----------
        triplets : array_like, shape (n, 3, ny, nx) or (3, ny, nx)
            As for :meth:`logits`.
        normalised : bool
            As for :meth:`logits`.

        Returns
        -------
        ndarray of float64, shape (n,)
            ``sigmoid(logit / temperature)``.
        """
        logits = self.logits(triplets, normalised=normalised).astype(np.float64)
        return np.asarray(expit(logits / self.metadata.temperature))


@dataclass(frozen=True)
class ShadowScores:
    """Scores of the same candidates by the champion and by a challenger.

    Attributes
    ----------
    champion, challenger : ndarray of float64, shape (n,)
        Calibrated probabilities from each model.
    champion_version, challenger_version : str
        Versions of the two models.
    """

    champion: NDArray[np.float64]
    challenger: NDArray[np.float64]
    champion_version: str
    challenger_version: str

    @property
    def disagreement(self) -> NDArray[np.float64]:
        """``challenger - champion`` per candidate."""
        return self.challenger - self.champion


def shadow_score(champion: Scorer, challenger: Scorer, triplets: ArrayLike) -> ShadowScores:
    """Score with the champion (whose scores are used) and the challenger (only recorded).

    Running a challenger in shadow on live candidates shows how it would behave before it
    is promoted. Each model applies its own normalisation; when both use the same one the
    triplets are normalised once.

    Parameters
    ----------
    champion, challenger : Scorer
        The two models.
    triplets : array_like, shape (n, 3, ny, nx)
        Raw cutout triplets.

    Returns
    -------
    ShadowScores
        Both sets of calibrated probabilities.
    """
    same = (champion.metadata.normalisation, champion.metadata.normalisation_clip) == (
        challenger.metadata.normalisation,
        challenger.metadata.normalisation_clip,
    )
    if same:
        data = champion.normalise(triplets)
        first = champion.score(data, normalised=True)
        second = challenger.score(data, normalised=True)
    else:
        first, second = champion.score(triplets), challenger.score(triplets)
    return ShadowScores(first, second, champion.version, challenger.version)
