"""The training-set builder on tiny simulated fields: classes, labels, splits, hash, files."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from threadpoolctl import threadpool_limits

from astrid.ml.dataset import BOGUS, REAL, TrainingSet
from astrid.pipeline.training_set import (
    SFFT_DECAM_KNOWN_SOURCES,
    FakeConfig,
    SimulatedPairSpec,
    TrainingSetConfig,
    _near_pixels,
    build_training_set,
    few_star_difference_config,
    load_training_set,
    real_pair_specs,
    run_real_pair,
    simulated_pair_specs,
)
from astrid.science.simulate import EpochConditions, FieldConfig

FIELD = FieldConfig(
    shape=(160, 160),
    pixel_scale=1.0,
    n_stars=180,
    star_mag_range=(14.0, 22.0),
    n_galaxies=20,
    cosmic_ray_rate=3.0,
    n_bad_columns=1,
)


def _spec(group: str, recipe: str, seed: int) -> SimulatedPairSpec:
    shift = {"resampled": (3.3, -2.1), "misaligned": (0.5, 0.3)}[recipe]
    return SimulatedPairSpec(
        group=group,
        profile="ztf",
        recipe=recipe,
        field_config=FIELD,
        field_seed=seed,
        science=EpochConditions(fwhm=2.2, exposure_time=60.0, dx=shift[0], dy=shift[1]),
        reference=EpochConditions(fwhm=1.8, exposure_time=300.0),
        science_seed=seed + 1,
        reference_seed=seed + 2,
        reference_cosmic_ray_rate=0.5,
        reference_bad_columns=False,
        unmask_bad_columns=True,
        psf_scale=1.0,
        fakes=FakeConfig(n_fakes=(10, 12)),
        fake_seed=seed + 3,
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainingSet, dict, Path]:
    folder = tmp_path_factory.mktemp("training")
    config = TrainingSetConfig(
        name="tiny",
        fractions=(0.5, 0.5, 0.0),
        real_pairs=False,
        difference=few_star_difference_config(),
    )
    specs = [_spec("sim-a", "resampled", 10), _spec("sim-b", "misaligned", 40)]
    with threadpool_limits(1):
        training_set, manifest = build_training_set(config, folder, specs=specs)
    return training_set, manifest, folder


def test_both_classes_with_the_right_labels(built: tuple[TrainingSet, dict, Path]) -> None:
    training_set, manifest, _ = built
    assert manifest["n_pairs_used"] == 2 and manifest["n_fakes_detected"] > 0
    labels = training_set.labels
    assert np.any(labels == REAL) and np.any(labels == BOGUS)
    # A real candidate is a fake under the stamp centre: its difference there has the
    # candidate's sign (science minus reference) and the fake's injected S/N.
    real = labels == REAL
    centre = np.nansum(training_set.triplets[:, 2, 30:33, 30:33], axis=(1, 2))
    assert np.all(np.sign(centre[real]) == training_set.polarity[real])
    assert np.all(training_set.snr[real] >= 3.0)
    assert set(training_set.kind[real]) <= {
        "resampled+isolated",
        "resampled+galaxy",
        "resampled+star",
        "misaligned+isolated",
        "misaligned+galaxy",
        "misaligned+star",
    }
    # Every fake is counted, with whether it sits on the subtraction's mask (where
    # detection does not look): few of those are detected, most of the others are.
    fakes = training_set.fakes
    masked, detected = fakes["masked"], fakes["detected"]
    assert len(masked) == len(detected) == manifest["n_fakes_injected"]
    assert manifest["n_fakes_masked"] == int(masked.sum())
    assert 0 < masked.sum() < len(masked)
    assert detected[masked].mean() < 0.5 < detected[~masked].mean()
    assert detected[~masked & (fakes["snr"] >= 10)].mean() > 0.9
    # Fakes went into both images: positive and negative real candidates.
    assert set(training_set.polarity[real].tolist()) == {-1, 1}
    assert training_set.triplets.shape[1:] == (3, 63, 63)


def test_no_field_in_two_splits(built: tuple[TrainingSet, dict, Path]) -> None:
    training_set, manifest, _ = built
    for group in set(training_set.groups.tolist()):
        assert len(set(training_set.split[training_set.groups == group].tolist())) == 1
    assert set(training_set.split.tolist()) == {0, 1}
    assert manifest["fields_per_split"]["train"] != manifest["fields_per_split"]["validation"]


def test_files_cache_and_content_hash(built: tuple[TrainingSet, dict, Path]) -> None:
    training_set, manifest, folder = built
    loaded = load_training_set(folder / "tiny.npz")
    digest = loaded.content_hash()
    assert digest == training_set.content_hash() == manifest["content_sha256"]
    written = json.loads((folder / "tiny.manifest.json").read_text())
    assert written["content_sha256"] == digest and written["n_examples"] == len(loaded)
    assert len(list((folder / "cache").glob("*.npz"))) == 2
    # Any change to the data gives another hash.
    loaded.triplets[0, 0, 31, 31] += 1.0
    assert loaded.content_hash() != digest
    # A rebuild reads the cache: the same data, the same hash.
    config = TrainingSetConfig(
        name="again",
        fractions=(0.5, 0.5, 0.0),
        real_pairs=False,
        difference=few_star_difference_config(),
    )
    specs = [_spec("sim-a", "resampled", 10), _spec("sim-b", "misaligned", 40)]
    again, _ = build_training_set(config, folder, specs=specs)
    assert again.content_hash() == digest


def test_mapped_load_gives_the_same_set(
    built: tuple[TrainingSet, dict, Path], tmp_path: Path
) -> None:
    training_set, manifest, folder = built
    mapped = load_training_set(folder / "tiny.npz", mmap=True)
    # The stamps are a read-only map of the file, not a copy in memory.
    assert isinstance(mapped.triplets.base, np.memmap) or isinstance(mapped.triplets, np.memmap)
    assert not mapped.triplets.flags.writeable
    assert mapped.content_hash() == manifest["content_sha256"]
    np.testing.assert_array_equal(mapped.triplets, training_set.triplets)
    for name in TrainingSet.column_names():
        np.testing.assert_array_equal(getattr(mapped, name), getattr(training_set, name))
    assert mapped.fakes.keys() == training_set.fakes.keys()
    # Normalising for training works from the map.
    normalised = mapped.to_triplet_dataset(indices=np.flatnonzero(mapped.split == 0))
    assert np.isfinite(normalised.triplets).all()
    # A compressed archive (not written by save_training_set) is read whole instead.
    arrays = {name: getattr(training_set, name) for name in TrainingSet.column_names()}
    np.savez_compressed(tmp_path / "packed.npz", **arrays)
    packed = load_training_set(tmp_path / "packed.npz", mmap=True)
    assert packed.content_hash() == manifest["content_sha256"]


def test_drawn_specs_span_detectors_and_recipes() -> None:
    specs = simulated_pair_specs(TrainingSetConfig(n_fields=40, pairs_per_field=3))
    fwhm_pixels = [s.science.fwhm / s.field_config.pixel_scale for s in specs]
    assert min(fwhm_pixels) < 2.0 and max(fwhm_pixels) > 5.0
    assert {s.profile for s in specs} == {"ztf", "decam", "rubin", "generic"}
    assert {s.recipe for s in specs} == {"resampled", "misaligned", "psf-mismatch"}
    assert len({s.key() for s in specs}) == len(specs)
    assert simulated_pair_specs(TrainingSetConfig(n_fields=2))[0] == specs[0]


def test_satellite_trails_cross_a_share_of_epochs_and_change_nothing_else() -> None:
    config = TrainingSetConfig(n_fields=60, pairs_per_field=3)
    specs = simulated_pair_specs(config)
    plain = simulated_pair_specs(replace(config, trail_fractions=(0.0, 0.0)))
    science = np.mean([s.science.satellite_trails for s in specs])
    reference = np.mean([s.reference.satellite_trails for s in specs])
    assert 0.12 < science < 0.28 and 0.0 < reference < 0.12
    assert not any(s.science.satellite_trails or s.reference.satellite_trails for s in plain)
    for a, b in zip(specs, plain, strict=True):
        untrailed = replace(
            a,
            science=replace(a.science, satellite_trails=0),
            reference=replace(a.reference, satellite_trails=0),
        )
        assert untrailed == b


def _hosts(star_hosts: str, seed: int = 3) -> np.ndarray:
    """Magnitudes of the stars hosting 30 fakes among 2,000 stars of a steep luminosity function."""
    from astropy.table import Table

    from astrid.pipeline.training_set import _choose_positions

    rng = np.random.default_rng(seed)
    n = 2000
    mags = 23.5 - rng.exponential(1.5, n)  # many faint stars, few bright ones
    stars = Table(
        {"x": rng.uniform(5, 995, n), "y": rng.uniform(5, 995, n), "flux": 10 ** (-0.4 * mags)}
    )
    galaxies = Table({"x": np.zeros(0), "y": np.zeros(0)})
    x, y, where = _choose_positions(
        rng, 30, (1000, 1000), 4.0, galaxies, stars, (0.0, 0.0, 1.0), 1.0, 2.0, star_hosts
    )
    assert where == ["star"] * len(x) and len(x) == 30
    nearest = np.argmin(
        np.hypot(x[:, None] - stars["x"][None], y[:, None] - stars["y"][None]), axis=1
    )
    return np.asarray(mags[nearest])


def test_variable_star_hosts_uniform_in_magnitude() -> None:
    visible_limit = np.percentile(23.5 - np.random.default_rng(3).exponential(1.5, 2000), 20)
    by_mag, uniform = _hosts("magnitude"), _hosts("uniform")
    assert by_mag.max() <= visible_limit + 0.05 and uniform.max() <= visible_limit + 0.05
    # A steep luminosity function puts almost every uniformly drawn host near the
    # visible limit. Drawn in magnitude, a good share are more than halfway to the
    # brightest (fewer than half: each bright star hosts at most one fake).
    bright = by_mag.min() + 0.5 * (visible_limit - by_mag.min())
    assert np.mean(by_mag < bright) > 0.25
    assert np.mean(uniform < bright) < 0.1
    assert np.median(by_mag) < np.median(uniform) - 1.5
    with pytest.raises(ValueError, match="star_hosts"):
        FakeConfig(star_hosts="brightest")  # type: ignore[arg-type]


def test_fakes_outweighed_by_a_star_residual_are_left_out(
    built: tuple[TrainingSet, dict, Path], tmp_path: Path
) -> None:
    # Faint fakes on the stars of a pair misaligned by a pixel: each star leaves a
    # dipole the pipeline finds with or without the fake.
    base = _spec("sim-c", "misaligned", 40)
    spec = replace(
        base,
        science=replace(base.science, dx=1.0, dy=0.6),
        fakes=FakeConfig(n_fakes=(12, 12), snr_range=(3.0, 6.0), placement=(0.0, 0.0, 1.0)),
    )
    kept = replace(spec, fakes=replace(spec.fakes, dominated_snr=None))
    config = TrainingSetConfig(
        name="stars",
        fractions=(1.0, 0.0, 0.0),
        real_pairs=False,
        difference=few_star_difference_config(),
    )
    with threadpool_limits(1):
        ruled, manifest = build_training_set(config, tmp_path, specs=[spec])
        plain, _ = build_training_set(replace(config, name="plain"), tmp_path, specs=[kept])
    fakes = ruled.fakes
    dominated = fakes["dominated"]
    assert manifest["n_fakes_dominated"] == int(dominated.sum()) > 0
    assert set(fakes["where"].tolist()) == {"star"}
    # A dominated fake was matched, and its candidate measures far more than the fake.
    assert np.all(fakes["detected"][dominated])
    excess = fakes["measured_snr"][dominated] - fakes["snr"][dominated]
    assert np.all(excess >= np.maximum(5.0, fakes["snr"][dominated]))
    assert np.all(np.isnan(fakes["measured_snr"][~fakes["detected"]]))
    # Without the rule the same candidates are real; nothing else changes.
    assert int(np.sum(plain.labels == REAL)) == int(np.sum(ruled.labels == REAL)) + int(
        dominated.sum()
    )
    assert int(np.sum(plain.labels == BOGUS)) == int(np.sum(ruled.labels == BOGUS))
    assert not plain.fakes["dominated"].any()
    # On the earlier pairs (fakes anywhere), a detected fake's measured S/N follows the
    # injected one.
    earlier = built[0].fakes
    bright = earlier["detected"] & (earlier["snr"] >= 20) & (earlier["where"] == "isolated")
    ratio = earlier["measured_snr"][bright] / earlier["snr"][bright]
    assert bright.sum() >= 5 and 0.8 < np.median(ratio) < 1.2


def test_near_pixels_looks_within_the_radius_only() -> None:
    pixels = np.zeros((20, 30), dtype=bool)
    pixels[12, 10] = True
    x = np.array([10.0, 12.9, 13.1, 10.0, np.nan, -2.5, 10.0])
    y = np.array([12.0, 12.0, 12.0, 14.9, 12.0, 12.0, 40.0])
    near = _near_pixels(pixels, x, y, 3.0)
    np.testing.assert_array_equal(near, [True, True, False, True, False, False, False])
    edge = np.zeros((20, 30), dtype=bool)
    edge[12, 0] = True  # a position off the grid sees the pixels on it
    assert _near_pixels(edge, np.array([-1.5]), np.array([12.0]), 2.0).tolist() == [True]


def test_fakes_on_a_cosmic_ray_bad_column_or_trail_are_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from astrid.pipeline import training_set

    base = _spec("sim-a", "misaligned", 50)
    clean = replace(
        base,
        field_config=replace(FIELD, cosmic_ray_rate=0.0, n_bad_columns=0),
        reference_cosmic_ray_rate=0.0,
    )
    config = TrainingSetConfig(
        name="clean",
        fractions=(1.0, 0.0, 0.0),
        real_pairs=False,
        difference=few_star_difference_config(),
    )
    with threadpool_limits(1):
        clean_set, _ = build_training_set(config, tmp_path, specs=[clean])
    on = clean_set.fakes["on_artefact"]
    assert on.dtype == bool and len(on) > 0 and not on.any()
    # Which pixels count comes from the simulated truth of each epoch: where it flags the
    # science's every pixel, every fake is on one (the positions' geometry is tested above).
    truth = training_set._artefact_pixels
    calls: list[int] = []

    def flag_science(epoch: Any) -> NDArray[np.bool_]:
        calls.append(epoch.epoch)
        flags = truth(epoch)
        return np.ones_like(flags) if epoch.epoch == 1 else flags

    monkeypatch.setattr(training_set, "_artefact_pixels", flag_science)
    with threadpool_limits(1):
        # A fresh folder: the pair is not read back from the first build's cache.
        flagged, _ = build_training_set(config, tmp_path / "flagged", specs=[clean])
    assert sorted(calls) == [0, 1]  # science (epoch 1) and reference (epoch 0)
    assert flagged.fakes["on_artefact"].all()
    np.testing.assert_array_equal(flagged.labels, clean_set.labels)  # labels untouched


def test_fakes_on_artefacts_left_out_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from astrid.pipeline import training_set

    truth = training_set._artefact_pixels

    def left_half(epoch: Any) -> NDArray[np.bool_]:
        # The science's left half counts as an artefact, so some fakes are on one and
        # some are not.
        flags = truth(epoch)
        if epoch.epoch == 1:
            flags = flags.copy()
            flags[:, : flags.shape[1] // 2] = True
        return flags

    monkeypatch.setattr(training_set, "_artefact_pixels", left_half)
    spec = _spec("sim-a", "resampled", 10)
    config = TrainingSetConfig(
        name="labelled",
        fractions=(1.0, 0.0, 0.0),
        real_pairs=False,
        difference=few_star_difference_config(),
    )
    left_out = replace(spec, fakes=replace(spec.fakes, on_artefact="ambiguous"))
    with threadpool_limits(1):
        kept, kept_manifest = build_training_set(config, tmp_path, specs=[spec])
        dropped, manifest = build_training_set(
            replace(config, name="dropped"), tmp_path, specs=[left_out]
        )
    fakes = dropped.fakes
    np.testing.assert_array_equal(fakes["on_artefact"], kept.fakes["on_artefact"])
    real_on = fakes["detected"] & fakes["on_artefact"] & ~fakes["dominated"]
    real_clear = fakes["detected"] & ~fakes["on_artefact"] & ~fakes["dominated"]
    assert real_on.sum() > 0 and real_clear.sum() > 0
    assert manifest["n_fakes_on_artefact"] == int(fakes["on_artefact"].sum())
    # Each real candidate matches one fake: those on an artefact are gone, the rest stay.
    assert int(np.sum(kept.labels == REAL)) == int(real_on.sum() + real_clear.sum())
    assert int(np.sum(dropped.labels == REAL)) == int(real_clear.sum())
    assert manifest["n_ambiguous_dropped"] == kept_manifest["n_ambiguous_dropped"] + int(
        real_on.sum()
    )
    # The bogus class is the same, stamp for stamp.
    np.testing.assert_array_equal(
        dropped.triplets[dropped.labels == BOGUS], kept.triplets[kept.labels == BOGUS]
    )
    with pytest.raises(ValueError, match="on_artefact"):
        FakeConfig(on_artefact="bogus")  # type: ignore[arg-type]


def test_a_source_that_changed_between_real_visits_is_not_bogus(shared_data: Path) -> None:
    # The sfft DECam pair holds a source that brightened between the visits (found in
    # every exposure pair); its candidate is left out, the rest of the pair is unchanged.
    spec = next(
        s
        for s in real_pair_specs(TrainingSetConfig(real_runs=1))
        if s.group == "sfft-decam" and s.science.endswith("04a.mini.fits")
    )
    assert spec.known_sources == SFFT_DECAM_KNOWN_SOURCES and spec.keep_bogus
    with threadpool_limits(1):
        ruled = run_real_pair(spec, shared_data)
        plain = run_real_pair(replace(spec, known_sources=()), shared_data)
    assert ruled.status == plain.status == "ok"
    labels, plain_labels = ruled.arrays["labels"], plain.arrays["labels"]
    assert np.sum(plain_labels == BOGUS) == np.sum(labels == BOGUS) + 1
    assert np.sum(plain_labels == REAL) == np.sum(labels == REAL) > 0
    assert ruled.n_ambiguous == plain.n_ambiguous + 1
    # The one left out is the positive source at the stamp centre.
    kept = {t.tobytes() for t in ruled.arrays["triplets"]}
    gone = [i for i, t in enumerate(plain.arrays["triplets"]) if t.tobytes() not in kept]
    assert len(gone) == 1 and plain_labels[gone[0]] == BOGUS
    assert plain.arrays["polarity"][gone[0]] == 1 and plain.arrays["snr"][gone[0]] > 10
