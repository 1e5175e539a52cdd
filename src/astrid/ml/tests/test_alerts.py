"""Reading real ZTF and Rubin alert packets, their cutout triplets, and bad input."""

from __future__ import annotations

import base64
import copy
import csv
import gzip
import json
import math
import shutil
import warnings
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import pytest
from typer.testing import CliRunner

from astrid.cli import app
from astrid.errors import AlertFormatError
from astrid.ml.alerts import Alert, alert_triplet, normalise_triplet, read_alerts

runner = CliRunner()

#: Alert folders with a manifest.csv, and the alert count their README states.
MANIFEST_FOLDERS = {
    "ztf_alerts_fink_broker": 311,
    "ztf_alerts_kowalski": 12,
    "ztf_alerts_ampel": 37,
    "rubin_alerts_fink_broker": 33,
}
BANDS = {"1": "g", "2": "r", "3": "i"}


def _manifest(folder: Path) -> list[dict[str, str]]:
    with open(folder / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def shared_alerts(shared_data: Path) -> dict[str, list[Alert]]:
    """Every alert of each shared alert folder, read once."""
    folders = [*MANIFEST_FOLDERS, "ztf_alerts_braai_json"]
    return {name: list(read_alerts([shared_data / name])) for name in folders}


def _kowalski_packet(shared_data: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The schema and first record of a real ZTF Avro packet."""
    path = sorted((shared_data / "ztf_alerts_kowalski").rglob("*.avro"))[0]
    with open(path, "rb") as handle:
        reader = fastavro.reader(handle)
        record = next(iter(reader))
        schema = reader.writer_schema
    assert isinstance(record, dict) and isinstance(schema, dict)
    return schema, record


def _write_avro(path: Path, schema: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    with open(path, "wb") as handle:
        fastavro.writer(handle, fastavro.parse_schema(schema), records)
    return path


def _synthetic_alert(
    science: np.ndarray, reference: np.ndarray | None = None, difference: np.ndarray | None = None
) -> Alert:
    return Alert(
        alert_id=1,
        id_name="candid",
        object_id="ZTF00aaaaaaa",
        survey="ZTF",
        ra=10.0,
        dec=-5.0,
        mjd=60000.0,
        time_scale="utc",
        band="r",
        scores={},
        science=science.astype(np.float32),
        reference=(science if reference is None else reference).astype(np.float32),
        difference=(science if difference is None else difference).astype(np.float32),
        source="synthetic",
    )


# --- the shared real packets -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MANIFEST_FOLDERS))
def test_every_shared_packet_reads_and_matches_manifest(
    shared_data: Path, shared_alerts: dict[str, list[Alert]], name: str
) -> None:
    rows = _manifest(shared_data / name)
    alerts = shared_alerts[name]
    assert len(rows) == len(alerts) == MANIFEST_FOLDERS[name]
    by_id = {alert.alert_id: alert for alert in alerts}
    assert len(by_id) == len(alerts)
    for row in rows:
        if name.startswith("rubin"):
            alert = by_id[int(row["diaSourceId"])]
            identity = (alert.survey, alert.id_name, alert.time_scale)
            assert identity == ("Rubin", "diaSourceId", "tai")
            assert alert.object_id == int(row["diaObjectId"])
            assert alert.mjd == pytest.approx(float(row["midpointMjdTai"]), abs=1e-9)
            assert alert.band == row["band"]
            assert alert.ra == pytest.approx(float(row["ra"]), abs=1e-10)
            assert alert.dec == pytest.approx(float(row["dec"]), abs=1e-10)
            assert dict(alert.scores) == pytest.approx({"reliability": float(row["reliability"])})
        else:
            alert = by_id[int(row["candid"])]
            assert (alert.survey, alert.id_name, alert.time_scale) == ("ZTF", "candid", "utc")
            assert alert.object_id == row["objectId"]
            assert alert.mjd == pytest.approx(float(row["jd"]) - 2400000.5, abs=1e-8)
            assert alert.band == BANDS[row["fid"]]
            expected = {"rb": float(row["rb"])}
            if row["drb"]:
                expected["drb"] = float(row["drb"])
            assert dict(alert.scores) == pytest.approx(expected)
        assert alert.source.endswith(row["file"])
        for cutout in (alert.science, alert.reference, alert.difference):
            assert cutout.dtype == np.float32 and cutout.ndim == 2
            assert not cutout.flags.writeable


def test_manifest_facts_hold(shared_alerts: dict[str, list[Alert]]) -> None:
    ampel = shared_alerts["ztf_alerts_ampel"]
    assert all("drb" not in alert.scores for alert in ampel)
    shapes = {alert.science.shape for alert in ampel}
    assert shapes == {(63, 63), (63, 55)}
    fink = shared_alerts["ztf_alerts_fink_broker"]
    assert all(set(alert.scores) == {"rb", "drb"} for alert in fink)
    rubin = shared_alerts["rubin_alerts_fink_broker"]
    assert sum(alert.scores["reliability"] < 0.5 for alert in rubin) == 25
    assert {alert.science.shape for alert in rubin} >= {(30, 30), (71, 71)}
    # Rubin midpointMjdTai 60924.33 is 2025-09-06 UT; TAI runs 37 s ahead of UTC.
    time = rubin[0].time
    assert time.scale == "tai"
    assert (time.tai.mjd - time.utc.mjd) * 86400 == pytest.approx(37.0, abs=1e-3)
    assert time.utc.iso.startswith("2025-09-06")


def test_braai_json_exports(shared_alerts: dict[str, list[Alert]]) -> None:
    alerts = {alert.alert_id: alert for alert in shared_alerts["ztf_alerts_braai_json"]}
    assert sorted(alerts) == [714287740515015072, 893215910715010007]
    first, second = alerts[714287740515015072], alerts[893215910715010007]
    assert first.object_id == "ZTF18acrkaks" and first.band == "r"
    assert second.object_id == "ZTF19aazgdzh" and second.band == "g"
    assert first.scores == pytest.approx({"rb": 0.4333333373069763})
    assert second.scores == pytest.approx({"rb": 0.04857143014669418})
    assert first.time.utc.iso.startswith("2018-12-16")
    assert first.detection["magpsf"] == pytest.approx(20.034793853759766)
    for alert in (first, second):
        assert alert.science.shape == alert.reference.shape == alert.difference.shape == (63, 63)


def test_triplets_of_every_shared_alert(shared_alerts: dict[str, list[Alert]]) -> None:
    alerts = [alert for group in shared_alerts.values() for alert in group]
    assert len(alerts) == 311 + 12 + 37 + 33 + 2
    triplets = np.stack([alert_triplet(alert) for alert in alerts])
    assert triplets.shape == (len(alerts), 3, 63, 63)
    assert triplets.dtype == np.float32
    assert np.all(np.isfinite(triplets))
    # Robust z-score: every plane's median is 0 and its typical pixel is of order 1.
    planes = triplets.reshape(-1, 63 * 63)
    assert np.all(np.abs(np.median(planes, axis=1)) < 0.05)
    assert 0.5 < np.median(np.median(np.abs(planes), axis=1)) < 1.0


def test_edge_clipped_ztf_stamp_is_padded_centred(shared_alerts: dict[str, list[Alert]]) -> None:
    (alert,) = [a for a in shared_alerts["ztf_alerts_ampel"] if a.science.shape == (63, 55)]
    raw = alert_triplet(alert, normalise=False)
    assert raw.shape == (3, 63, 63)
    # Stamp column 27 (its centre) lands on column 31: four padded columns on each side.
    assert np.array_equal(raw[0, :, 4:59], alert.science, equal_nan=True)
    assert np.array_equal(raw[2, :, 4:59], alert.difference, equal_nan=True)
    assert np.all(np.isnan(raw[:, :, :4])) and np.all(np.isnan(raw[:, :, 59:]))
    normalised = alert_triplet(alert)
    assert np.all(normalised[:, :, :4] == 0) and np.all(normalised[:, :, 59:] == 0)
    assert np.array_equal(normalised, normalise_triplet(raw))


def test_larger_rubin_stamp_is_cropped_around_its_centre(
    shared_alerts: dict[str, list[Alert]],
) -> None:
    (alert, *_) = [a for a in shared_alerts["rubin_alerts_fink_broker"] if a.science.shape[0] > 63]
    n = alert.science.shape[0]
    start = n // 2 - 31
    raw = alert_triplet(alert, normalise=False)
    assert np.array_equal(raw[1], alert.reference[start : start + 63, start : start + 63])


# --- padding, cropping and normalisation worked by hand -------------------------------------------


def test_padding_and_cropping_put_the_centre_pixel_at_the_centre() -> None:
    for shape, size in [((5, 5), 9), ((4, 6), 9), ((5, 5), 8), ((9, 7), 5), ((1, 1), 63)]:
        stamp = np.zeros(shape)
        stamp[shape[0] // 2, shape[1] // 2] = 1.0
        raw = alert_triplet(_synthetic_alert(stamp), size=size, normalise=False)
        peak = np.unravel_index(np.nanargmax(raw[0]), raw[0].shape)
        assert peak == (size // 2, size // 2)
        assert np.sum(np.isfinite(raw[0])) == min(shape[0], size) * min(shape[1], size)


def test_normalise_triplet_by_hand() -> None:
    plane = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 100.0]])
    # median 5; absolute deviations 4 3 2 1 0 1 2 3 95 have median 2.
    expected = (plane - 5.0) / (1.482602218505602 * 2.0)
    result = normalise_triplet(plane[None])
    assert result.dtype == np.float32 and result.shape == (1, 3, 3)
    np.testing.assert_allclose(result[0], expected, rtol=1e-6)
    np.testing.assert_allclose(
        normalise_triplet(plane[None], clip=3.0)[0], np.clip(expected, -3, 3)
    )


def test_normalise_triplet_invariances_and_degenerate_planes() -> None:
    rng = np.random.default_rng(3)
    triplet = rng.normal(200.0, 5.0, size=(3, 21, 21))
    result = normalise_triplet(triplet)
    # Independent of the sky level and the flux units of each plane.
    rescaled = (
        triplet * np.array([3.0, 0.01, 1e4])[:, None, None] + np.array([-50, 7, 1e3])[:, None, None]
    )
    np.testing.assert_allclose(normalise_triplet(rescaled), result, atol=2e-5)
    # NaN pixels become 0 and do not enter the statistics of the others.
    holed = triplet.copy()
    holed[0, :3, :] = np.nan
    holed[1, 5, 5] = np.inf
    out = normalise_triplet(holed)
    assert np.all(out[0, :3, :] == 0) and out[1, 5, 5] == 0
    rest = triplet[0, 3:, :]
    mad = np.median(np.abs(rest - np.median(rest)))
    np.testing.assert_allclose(
        out[0, 3:, :], (rest - np.median(rest)) / (1.482602218505602 * mad), rtol=1e-5
    )
    # Constant, all-NaN and mostly-constant planes give finite output without warnings.
    degenerate = np.stack(
        [np.full((5, 5), 7.0), np.full((5, 5), np.nan), np.pad(np.ones((1, 1)), 2) * 10.0]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = normalise_triplet(degenerate)
    assert np.all(out[:2] == 0)
    # More than half the pixels equal (MAD 0): the plain standard deviation scales it.
    assert out[2, 2, 2] == pytest.approx(10.0 / np.std(degenerate[2]))
    assert out[2, 0, 0] == 0
    # A batch is normalised plane by plane.
    batch = np.stack([triplet, rescaled])
    np.testing.assert_allclose(normalise_triplet(batch)[1], result, atol=2e-5)


def test_fast_path_matches_the_nan_aware_float64_path() -> None:
    """Partial-sort medians (float32, batched, NaN as +-inf) equal NaN-aware float64 ones."""
    from astrid.ml.alerts import _normalise_rows_nan_aware

    rng = np.random.default_rng(7)
    for shape in [(4, 3, 63, 63), (2, 3, 30, 30), (3, 3, 7, 8), (1, 1, 1, 2)]:
        planes = rng.normal(150.0, 4.0, size=shape).astype(np.float32)
        planes[0, 0, :, :5] = np.nan  # a padded edge
        planes[-1, -1].flat[:: max(1, planes[-1, -1].size // 5)] = np.inf  # scattered masks
        fast = normalise_triplet(planes)
        flat = planes.reshape(-1, shape[-2] * shape[-1]).astype(np.float64)
        slow = _normalise_rows_nan_aware(flat).reshape(shape)
        np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)


def test_bad_arguments() -> None:
    alert = _synthetic_alert(np.ones((5, 5)))
    with pytest.raises(ValueError, match="size"):
        alert_triplet(alert, size=0)
    with pytest.raises(ValueError, match="clip"):
        normalise_triplet(np.ones((2, 2)), clip=0.0)
    with pytest.raises(ValueError, match="errors"):
        read_alerts([], errors="ignore")  # type: ignore[arg-type]


# --- several records per container, and bad files --------------------------------------------


def test_avro_container_with_several_records(shared_data: Path, tmp_path: Path) -> None:
    schema, record = _kowalski_packet(shared_data)
    records = []
    for offset in range(3):
        clone = copy.deepcopy(record)
        clone["candid"] += offset
        clone["candidate"]["drb"] = None if offset == 2 else clone["candidate"]["drb"]
        records.append(clone)
    path = _write_avro(tmp_path / "three.packets", schema, records)
    alerts = list(read_alerts(path))
    assert [a.alert_id for a in alerts] == [record["candid"] + k for k in range(3)]
    assert "drb" in alerts[0].scores and "drb" not in alerts[2].scores
    assert all(a.source == str(path) for a in alerts)


def test_truncated_and_foreign_files_raise(shared_data: Path, tmp_path: Path) -> None:
    good = sorted((shared_data / "ztf_alerts_kowalski").rglob("*.avro"))[0].read_bytes()
    truncated = tmp_path / "truncated.avro"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(AlertFormatError, match="truncated") as caught:
        list(read_alerts([truncated]))
    assert caught.value.path == str(truncated)
    text = tmp_path / "notes.avro"
    text.write_text("not an alert\n")
    with pytest.raises(AlertFormatError, match="neither an Avro container nor JSON"):
        list(read_alerts(text))
    other_avro = _write_avro(
        tmp_path / "other.avro",
        {"type": "record", "name": "point", "fields": [{"name": "x", "type": "double"}]},
        [{"x": 1.0}],
    )
    with pytest.raises(AlertFormatError, match="not a ZTF alert"):
        list(read_alerts(other_avro))
    with pytest.raises(AlertFormatError, match="no such file"):
        list(read_alerts(tmp_path / "absent.avro"))


def test_missing_and_corrupt_cutouts_raise(shared_data: Path, tmp_path: Path) -> None:
    schema, record = _kowalski_packet(shared_data)
    missing = copy.deepcopy(record)
    missing["cutoutTemplate"] = None
    path = _write_avro(tmp_path / "missing.avro", schema, [missing])
    with pytest.raises(AlertFormatError, match="cutoutTemplate is missing"):
        list(read_alerts(path))

    bad_gzip = copy.deepcopy(record)
    stamp = bad_gzip["cutoutDifference"]["stampData"]
    bad_gzip["cutoutDifference"]["stampData"] = stamp[: len(stamp) // 2]
    path = _write_avro(tmp_path / "bad_gzip.avro", schema, [bad_gzip])
    with pytest.raises(AlertFormatError, match="cutoutDifference: corrupt gzip"):
        list(read_alerts(path))

    fits_bytes = gzip.decompress(stamp)
    bad_fits = copy.deepcopy(record)
    bad_fits["cutoutScience"]["stampData"] = gzip.compress(fits_bytes[:4000])
    path = _write_avro(tmp_path / "bad_fits.avro", schema, [bad_fits])
    with pytest.raises(AlertFormatError, match="cutoutScience: corrupt FITS"):
        list(read_alerts(path))

    not_fits = copy.deepcopy(record)
    not_fits["cutoutScience"]["stampData"] = gzip.compress(b"\x89PNG" + bytes(100))
    path = _write_avro(tmp_path / "png.avro", schema, [not_fits])
    with pytest.raises(AlertFormatError, match="stamp is not FITS"):
        list(read_alerts(path))


def test_json_export_variants(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "ztf_alerts_braai_json" / "714287740515015072.json"
    packet = json.loads(source.read_text())
    # MongoDB extended JSON v2 wrappers for the id and the binary stamps, in a list.
    variant = copy.deepcopy(packet)
    variant["candid"] = {"$numberLong": str(packet["candid"])}
    for key in ("cutoutScience", "cutoutTemplate", "cutoutDifference"):
        encoded = variant[key]["stampData"]["$binary"]
        variant[key]["stampData"] = {"$binary": {"base64": encoded, "subType": "00"}}
    path = tmp_path / "variant.json"
    path.write_text(json.dumps([variant]))
    (alert,) = read_alerts(path)
    (original,) = read_alerts(source)
    assert alert.alert_id == original.alert_id
    assert np.array_equal(alert.difference, original.difference, equal_nan=True)

    broken = copy.deepcopy(packet)
    broken["cutoutScience"]["stampData"]["$binary"] = base64.b64encode(b"\x1f\x8bnot gzip").decode()
    path.write_text(json.dumps(broken))
    with pytest.raises(AlertFormatError, match="corrupt gzip"):
        list(read_alerts(path))
    path.write_text(json.dumps(packet)[:-50])
    with pytest.raises(AlertFormatError, match="invalid JSON"):
        list(read_alerts(path))


def test_folder_scan_skips_bad_files_and_records_them(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "alerts"
    shutil.copytree(shared_data / "ztf_alerts_kowalski", folder)
    (folder / "20200202" / "zz_truncated.avro").write_bytes(b"Obj\x01" + bytes(30))
    (folder / "broken.json").write_text("{ not json")
    reader = read_alerts([folder], errors="skip")
    alerts = list(reader)
    assert len(alerts) == 12
    skipped = sorted(Path(failure.path).name for failure in reader.failures)
    assert skipped == ["broken.json", "zz_truncated.avro"]
    assert all(f.reason for f in reader.failures)
    with pytest.raises(AlertFormatError):
        list(read_alerts([folder]))


# --- the command line ----------------------------------------------------------------------


def test_cli_alerts_info_prints_and_writes_csv(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "alerts.csv"
    folders = [shared_data / "ztf_alerts_kowalski", shared_data / "rubin_alerts_fink_broker"]
    result = runner.invoke(app, ["alerts-info", *map(str, folders), "--csv", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "reliability" in lines[0] and "drb" in lines[0]
    assert len(lines) == 3 + 12 + 33  # names, units, dashes, one row per alert
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 45
    ztf = [row for row in rows if row["survey"] == "ZTF"]
    rubin = [row for row in rows if row["survey"] == "Rubin"]
    assert len(ztf) == 12 and len(rubin) == 33
    manifest = {row["candid"]: row for row in _manifest(shared_data / "ztf_alerts_kowalski")}
    for row in ztf:
        assert float(row["rb"]) == pytest.approx(float(manifest[row["alert_id"]]["rb"]))
        assert row["reliability"] == "" and row["science"] == "63 x 63"
    assert all(row["rb"] == row["drb"] == "" and row["time_scale"] == "tai" for row in rubin)
    assert not math.isnan(float(rubin[0]["reliability"]))


def test_cli_alerts_info_bad_file(shared_data: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.avro"
    bad.write_bytes(b"Obj\x01" + bytes(30))
    result = runner.invoke(app, ["alerts-info", str(bad)])
    assert result.exit_code == 3
    assert "AlertFormatError" in result.output
    braai = shared_data / "ztf_alerts_braai_json"
    result = runner.invoke(app, ["alerts-info", str(bad), str(braai), "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 3 + 2
    assert f"skipped {bad}" in result.output
