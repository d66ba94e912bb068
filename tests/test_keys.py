"""Site and domain keys, site certificates, signed manifests and recovery bundles."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
import struct
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import FUSE_REASON, fuse_available, run_cli
from tests.powerloss.process import LayerProcess
from tierfs import config
from tierfs.data import domain as domain_mod
from tierfs.errors import ExitCode, TierfsError
from tierfs.snap import keys
from tierfs.snap import manifest as mf
from tierfs.snap.keys import DomainKeys, SiteKeys, VerificationError
from tierfs.snap.manifest import Manifest, SignedManifest

ROOT = "ab" * 32


def assert_one_line_error(result: object, code: ExitCode) -> None:
    rc = result.returncode  # type: ignore[attr-defined]
    err = result.stderr  # type: ignore[attr-defined]
    assert rc == code, f"exit {rc}, expected {int(code)}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tierfs: error: "), err


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@dataclasses.dataclass
class Domain:
    """A domain with its signing key, and a directory per site."""

    domain: domain_mod.Domain
    keys: DomainKeys
    root: Path

    def site(self, name: str, domain_keys: DomainKeys | None = None) -> SiteKeys:
        directory = self.root / name
        directory.mkdir()
        return keys.create_site_keys(directory, name, str(uuid.uuid4()), domain_keys or self.keys)


def make_domain(root: Path, name: str = "acme") -> Domain:
    root.mkdir(parents=True, exist_ok=True)
    domain = domain_mod.generate(name)
    return Domain(domain, keys.generate_domain_keys(domain.domain_id), root)


@pytest.fixture
def acme(tmp_path: Path) -> Domain:
    return make_domain(tmp_path / "acme")


def manifest_for(site: SiteKeys, **fields: object) -> Manifest:
    values: dict[str, object] = {
        "snapshot_id": "snap-1",
        "counter": 1,
        "root": ROOT,
        "time_ns": time.time_ns(),
        "schedule": "nightly",
        "stats": {"files": 3, "bytes": 12345, "pause_ms": 1.5},
    }
    values.update(fields)
    return Manifest.create(site, **values)  # type: ignore[arg-type]


def expect_verify_error(
    signed: SignedManifest | bytes, domain_key: bytes, match: str
) -> VerificationError:
    with pytest.raises(VerificationError, match=match) as info:
        mf.verify(signed, domain_key)
    assert info.value.exit_code == ExitCode.VERIFY_FAILED
    assert int(info.value.exit_code) == 12
    return info.value


# --- keys made by mkfs ---------------------------------------------------------------------


def test_mkfs_creates_site_and_domain_keys(data_dir: Path) -> None:
    directory = data_dir / "keys"
    assert mode(directory) == 0o700
    assert mode(directory / "site.key") == 0o600
    assert mode(directory / "domain.key") == 0o600
    assert mode(directory / "site.cert") == 0o644
    assert not list(directory.glob("*.tmp")) and not list(directory.glob(".*"))
    site = keys.load_site_keys(data_dir)
    domain = domain_mod.load(data_dir / "domain.json")
    domain_keys = keys.load_domain_keys(data_dir)
    assert site.site_name == "test-site" and site.epoch == 1
    assert site.domain_id == domain.domain_id == domain_keys.domain_id
    keys.verify_certificate(site.certificate, domain_keys.public_key, domain_id=domain.domain_id)
    # the domain signing key is its own key: neither the id key nor the secret
    raw = json.loads((directory / "domain.key").read_text())
    assert raw["private_key"] not in (domain.id_key.hex(), domain.secret.hex())
    assert raw["magic"] == "tierfs-domain-key" and raw["format_version"] == 1


def test_keys_survive_a_power_cut(tmp_path: Path) -> None:
    """Once mkfs or key import returned, the keys are durable (the power-loss layer keeps only
    what was fsynced)."""
    if not fuse_available():
        pytest.skip(FUSE_REASON)
    layer = LayerProcess(tmp_path)
    try:
        layer.start()
        data, imported = layer.mnt / "data", layer.mnt / "imported"
        run_cli("mkfs", data, "--site", "test-site")
        bundle = tmp_path / "site.bundle"
        run_cli("key", "export", "--no-passphrase", data, bundle)
        run_cli("key", "import", bundle, imported)
        layer.cut_power()
        layer.restart()
        for directory in (data, imported):
            site = keys.load_site_keys(directory)
            domain_keys = keys.load_domain_keys(directory)
            keys.verify_certificate(site.certificate, domain_keys.public_key)
            assert domain_mod.load(directory / "domain.json").domain_id == site.domain_id
    finally:
        try:
            layer.stop()
        finally:
            layer.kill()


def test_mkfs_force_makes_new_keys(data_dir: Path) -> None:
    before = keys.load_site_keys(data_dir)
    run_cli("mkfs", data_dir, "--force", "--site", "test-site")
    after = keys.load_site_keys(data_dir)
    assert after.public_key != before.public_key and after.site_uuid != before.site_uuid


def test_mkfs_joins_a_domain_from_a_bundle_or_a_domain_file_and_key(
    data_dir: Path, tmp_path: Path
) -> None:
    domain_keys = keys.load_domain_keys(data_dir)
    bundle = tmp_path / "acme.bundle"
    run_cli("key", "export", "--domain-only", "--no-passphrase", data_dir, bundle)
    assert json.loads(bundle.read_text())["contents"]["site_key"] is None
    run_cli("mkfs", tmp_path / "b", "--site", "b", "--domain", bundle)
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    secret_bundle = tmp_path / "acme-secret.bundle"
    run_cli("key", "export", "--passphrase-file", pw, data_dir, secret_bundle)
    run_cli(
        "mkfs", tmp_path / "c", "--site", "c", "--domain", secret_bundle, "--passphrase-file", pw
    )
    result = run_cli("mkfs", tmp_path / "d", "--domain", data_dir / "domain.json", check=False)
    assert_one_line_error(result, ExitCode.USAGE)
    assert "--domain-key" in result.stderr and not (tmp_path / "d").exists()
    run_cli(
        "mkfs", tmp_path / "d", "--site", "d", "--domain", data_dir / "domain.json",
        "--domain-key", data_dir / "keys" / "domain.key",
    )  # fmt: skip
    first = keys.load_site_keys(data_dir)
    for name in ("b", "c", "d"):
        site = keys.load_site_keys(tmp_path / name)
        assert site.site_name == name and site.public_key != first.public_key
        keys.verify_certificate(site.certificate, domain_keys.public_key, domain_id=first.domain_id)
        assert keys.load_domain_keys(tmp_path / name).public_key == domain_keys.public_key


def test_mkfs_refuses_a_domain_key_of_another_domain(data_dir: Path, tmp_path: Path) -> None:
    other = keys.generate_domain_keys(str(uuid.uuid4()))
    keys.write_domain_keys(tmp_path, other)
    result = run_cli(
        "mkfs", tmp_path / "x", "--domain", data_dir / "domain.json",
        "--domain-key", tmp_path / "keys" / "domain.key", check=False,
    )  # fmt: skip
    assert_one_line_error(result, ExitCode.CONFIG)
    assert_one_line_error(
        run_cli("mkfs", tmp_path / "y", "--domain-key", tmp_path / "k", check=False),
        ExitCode.USAGE,
    )


# --- signing and verifying manifests -------------------------------------------------------


def test_sign_verify_round_trip(acme: Domain) -> None:
    site = acme.site("store-042")
    manifest = manifest_for(site, parent="snap-0", name="before upgrade")
    signed = mf.sign(manifest, site)
    assert mf.verify(signed, acme.keys.public_key) == manifest
    data = signed.encode()
    assert data[:4] == b"TFMF" and data[4] == 1
    again = mf.verify(data, acme.keys.public_key, domain_id=acme.domain.domain_id)
    assert again == manifest and again.encode() == manifest.encode()
    assert SignedManifest.decode(data) == signed
    assert manifest.object_name == (
        f"sites/{site.site_uuid}/manifests/00000001-000000000001-snap-1"
    )


def test_tampered_manifest_is_rejected(acme: Domain) -> None:
    site = acme.site("store-042")
    signed = mf.sign(manifest_for(site), site)
    forged = signed.manifest.replace(ROOT.encode(), ("cd" * 32).encode())
    assert forged != signed.manifest
    expect_verify_error(
        dataclasses.replace(signed, manifest=forged), acme.keys.public_key, "altered"
    )
    data = bytearray(signed.encode())
    data[-1] ^= 1  # the signature
    expect_verify_error(bytes(data), acme.keys.public_key, "signature does not verify")
    expect_verify_error(signed.encode()[:-3], acme.keys.public_key, "truncated")
    expect_verify_error(signed.encode() + b"x", acme.keys.public_key, "trailing")
    expect_verify_error(b"XXXX" + signed.encode()[4:], acme.keys.public_key, "bad magic")


def test_manifest_of_another_domain_is_rejected(acme: Domain, tmp_path: Path) -> None:
    site = acme.site("store-042")
    signed = mf.sign(manifest_for(site), site)
    other = make_domain(tmp_path / "other", "other")
    expect_verify_error(signed, other.keys.public_key, "not by this domain's key")
    with pytest.raises(VerificationError, match="belongs to domain"):
        mf.verify(signed, acme.keys.public_key, domain_id=other.domain.domain_id)


def test_key_outside_the_domain_is_rejected(acme: Domain, tmp_path: Path) -> None:
    """A site certified by another domain key, or a certificate forged to name this domain's
    key, does not verify, even though the manifest matches its own signature."""
    outsider_domain = keys.generate_domain_keys(acme.domain.domain_id)  # same id, other key
    outsider = acme.site("intruder", outsider_domain)
    signed = mf.sign(manifest_for(outsider), outsider)
    expect_verify_error(signed, acme.keys.public_key, "issued by domain key")
    forged = dataclasses.replace(outsider.certificate, domain_public_key=acme.keys.public_key)
    expect_verify_error(
        dataclasses.replace(signed, certificate=forged.encode()),
        acme.keys.public_key,
        "domain key's signature does not verify",
    )


def test_certificate_of_another_site_is_rejected(acme: Domain) -> None:
    a, b = acme.site("store-a"), acme.site("store-b")
    genuine = mf.sign(manifest_for(a), a)
    # a's manifest and signature with b's certificate: b's key did not sign it
    swapped = dataclasses.replace(genuine, certificate=b.certificate.encode())
    expect_verify_error(swapped, acme.keys.public_key, "signature does not verify")
    # b signs a manifest that claims to be a's: b's certificate names b
    claim = manifest_for(a).encode()
    forged = SignedManifest(claim, b.certificate.encode(), b.sign(claim, mf.MANIFEST_PURPOSE))
    expect_verify_error(forged, acme.keys.public_key, "but its certificate is for")
    with pytest.raises(TierfsError, match="certified for") as info:
        mf.sign(manifest_for(a), b)
    assert info.value.exit_code == ExitCode.CONFIG


def test_signature_for_another_purpose_does_not_verify(acme: Domain) -> None:
    site = acme.site("store-042")
    body = manifest_for(site).encode()
    raw = SignedManifest(body, site.certificate.encode(), site.sign(body))
    expect_verify_error(raw, acme.keys.public_key, "signature does not verify")


def test_new_epoch_certificate(acme: Domain) -> None:
    site = acme.site("store-042")
    directory = acme.root / "store-042"
    old = mf.sign(manifest_for(site), site)
    renewed = keys.renew_certificate(directory, acme.keys)
    assert renewed.epoch == 2 and keys.load_site_keys(directory).epoch == 2
    assert renewed.public_key == site.public_key
    new = mf.sign(manifest_for(renewed, counter=1), renewed)
    assert mf.verify(new, acme.keys.public_key).site_epoch == 2
    assert mf.verify(old, acme.keys.public_key).site_epoch == 1
    assert new.encode() != old.encode()
    assert mf.decode(new.manifest).object_name != mf.decode(old.manifest).object_name
    # an epoch-1 manifest signed with the same key but carrying the epoch-2 certificate
    mixed = SignedManifest(old.manifest, new.certificate, old.signature)
    expect_verify_error(mixed, acme.keys.public_key, "but its certificate is for")


def test_expired_certificate(acme: Domain) -> None:
    site = acme.site("store-042")
    cert = acme.keys.certify(
        site.site_name, site.site_uuid, site.public_key, valid_until="2020-01-01T00:00:00+00:00"
    )
    expired = dataclasses.replace(site, certificate=cert)
    with pytest.raises(TierfsError, match="expired") as info:
        mf.sign(manifest_for(expired), expired)
    assert info.value.exit_code == ExitCode.CONFIG
    late = manifest_for(expired).encode()
    signed = SignedManifest(late, cert.encode(), expired.sign(late, mf.MANIFEST_PURPOSE))
    expect_verify_error(signed, acme.keys.public_key, "after its certificate expired")
    early = manifest_for(expired, time_ns=1_500_000_000 * 10**9)
    assert mf.verify(mf.sign(early, expired), acme.keys.public_key) == early


# --- the canonical manifest encoding -------------------------------------------------------


def test_manifest_encoding_is_canonical(acme: Domain) -> None:
    site = acme.site("store-042")
    manifest = manifest_for(
        site,
        stats={"z": 1, "a": [1, (2, 3)], "é": "ünïcode", "f": 0.1},
        time_ns=1_700_000_000_000_000_005,
    )
    data = manifest.encode()
    assert mf.decode(data).encode() == data
    assert mf.decode(data) == manifest
    assert data.isascii() and b" " not in data.replace(b"before upgrade", b"")
    doc = json.loads(data)
    assert list(doc) == sorted(doc)
    assert doc["magic"] == "tierfs-manifest" and doc["format_version"] == 1
    assert (
        doc["time"] == "2023-11-14T22:13:20.000000005Z"
        and doc["time_ns"] == 1_700_000_000_000_000_005
    )
    assert doc["root"] == ROOT and doc["site_epoch"] == 1 and doc["counter"] == 1
    for variant in (
        json.dumps(doc).encode(),  # spaces
        json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(),
        data.replace(b'"counter":1', b'"counter":1.0'),
        data[:-1] + b',"counter":1}',  # a duplicate key
    ):
        with pytest.raises(VerificationError, match=r"canonical|malformed"):
            mf.decode(variant)
    wrong_time = data.replace(b'"time_ns":1700000000000000005', b'"time_ns":1700000000000000006')
    with pytest.raises(VerificationError, match="canonical"):
        mf.decode(wrong_time)


def test_manifest_drops_secrets(acme: Domain) -> None:
    site = acme.site("store-042")
    raw = config.defaults("store-042").values | {
        ("regional", "url"): "s3://bucket/prefix",
        ("regional", "endpoint"): "http://admin:hunter2@10.0.0.5:8333/",
        ("regional", "access_key_id"): "AKIAEXAMPLE",
        ("regional", "secret_access_key"): "wJalrXUtnFEMI/K7MDENG",
    }
    cfg = config.Config(raw)
    manifest = manifest_for(site, config=cfg)
    data = manifest.encode()
    for secret in (b"AKIAEXAMPLE", b"wJalrXUtnFEMI", b"hunter2", b"admin", b"access_key"):
        assert secret not in data
    regional = mf.decode(data).config["regional"]
    assert regional["url"] == "s3://bucket/prefix"
    assert regional["endpoint"] == "http://10.0.0.5:8333/"
    assert mf.decode(data).config["seal"]["zstd_level"] == cfg.get("seal", "zstd_level")
    assert mf.public_config({"a": {"api_token": "x", "db_password": "y", "keep_last": 3}}) == {
        "a": {"keep_last": 3}
    }
    # a manifest that carries a secret anyway is not canonical, hence refused
    doc = json.loads(data)
    doc["config"]["regional"]["secret_access_key"] = "leak"
    with pytest.raises(VerificationError):
        mf.decode(keys.canonical_json(doc))


def test_manifest_versions_and_features(acme: Domain) -> None:
    site = acme.site("store-042")
    doc = json.loads(manifest_for(site).encode())
    with pytest.raises(TierfsError, match="not supported") as info:
        mf.decode(keys.canonical_json(doc | {"format_version": 2}))
    assert info.value.exit_code == ExitCode.VERSION
    with pytest.raises(TierfsError, match="newer tierfs") as info:
        mf.decode(keys.canonical_json(doc | {"features": ["encrypted-trees"]}))
    assert info.value.exit_code == ExitCode.VERSION
    with pytest.raises(VerificationError, match="unexpected fields"):
        mf.decode(keys.canonical_json(doc | {"surprise": 1}))
    signed = mf.sign(manifest_for(site), site).encode()
    future = signed[:4] + bytes([2]) + signed[5:]
    with pytest.raises(TierfsError) as info:
        mf.verify(future, acme.keys.public_key)
    assert info.value.exit_code == ExitCode.VERSION


def test_manifest_validation() -> None:
    site_uuid, domain_id = str(uuid.uuid4()), str(uuid.uuid4())
    base = {
        "domain_id": domain_id,
        "site_name": "s",
        "site_uuid": site_uuid,
        "site_epoch": 1,
        "counter": 0,
        "snapshot_id": "x",
        "time_ns": 0,
        "root": ROOT,
    }
    Manifest(**base)  # type: ignore[arg-type]
    for bad in (
        {"root": "AB" * 32},
        {"root": "ab"},
        {"snapshot_id": "../x"},
        {"snapshot_id": ".hidden"},
        {"site_uuid": site_uuid.upper()},
        {"site_epoch": 0},
        {"counter": -1},
        {"counter": True},
        {"stats": {"x": float("nan")}},
        {"stats": {"x": b"bytes"}},
        {"stats": {1: "int key"}},
        {"features": ("b", "a")},
        {"schedule": ""},
        {"parent": 5},
    ):
        with pytest.raises((ValueError, TypeError)):
            Manifest(**(base | bad))  # type: ignore[arg-type]


def test_manifest_object_names() -> None:
    site_uuid = str(uuid.uuid4())
    names = [mf.manifest_name(site_uuid, e, c, "s") for e, c in [(1, 9), (1, 10), (2, 1)]]
    assert names == sorted(names)
    assert names[1] == f"sites/{site_uuid}/manifests/00000001-000000000010-s"
    assert mf.parse_manifest_name(names[2]) == (site_uuid, 2, 1, "s")
    assert names[0].startswith(mf.manifests_prefix(site_uuid))
    for bad in ("sites/x/manifests/1-2-s", names[0] + "/x", f"sites/{site_uuid}/other/1"):
        with pytest.raises(ValueError):
            mf.parse_manifest_name(bad)


def test_canonical_json_refuses_what_json_would_convert() -> None:
    assert keys.canonical_json({"b": [1, 2.5, None, True], "a": "é"}) == (
        b'{"a":"\\u00e9","b":[1,2.5,null,true]}'
    )
    for bad in ({1: 2}, {"x": float("inf")}, {"x": {1, 2}}, {"x": b"b"}):
        with pytest.raises((TypeError, ValueError)):
            keys.canonical_json(bad)


# --- certificates and key files ------------------------------------------------------------


def test_certificate_encoding(acme: Domain) -> None:
    site = acme.site("store-042")
    data = site.certificate.encode()
    assert data[:4] == b"TFSC" and data[4:8] == b"\x01\0\0\0"
    (size,) = struct.unpack_from(">I", data, 8)
    body = data[12 : 12 + size]
    assert json.loads(body)["site_public_key"] == site.public_key.hex()
    assert data[12 + size : 16 + size] == struct.pack(">I", 64) and len(data) == 16 + size + 64
    assert keys.Certificate.decode(data) == site.certificate
    keys.verify_certificate(data, acme.keys.public_key)


def test_site_key_and_certificate_must_belong_together(acme: Domain) -> None:
    acme.site("a")
    b = acme.site("b")
    (acme.root / "a" / "keys" / "site.cert").write_bytes(b.certificate.encode())
    with pytest.raises(TierfsError, match="certificate is for site 'b'") as info:
        keys.load_site_keys(acme.root / "a")
    assert info.value.exit_code == ExitCode.CONFIG
    with pytest.raises(TierfsError, match="site key missing") as info:
        keys.load_site_keys(acme.root)
    assert info.value.exit_code == ExitCode.CONFIG


def test_key_file_checks(acme: Domain) -> None:
    site = acme.site("a")
    path = acme.root / "a" / "keys" / "site.key"
    doc = json.loads(path.read_text())
    for change, code in (
        ({"format_version": 2}, ExitCode.VERSION),
        ({"magic": "nope"}, ExitCode.CONFIG),
        ({"public_key": "00" * 32}, ExitCode.CONFIG),
        ({"private_key": "zz"}, ExitCode.CONFIG),
        ({"algorithm": "rsa"}, ExitCode.CONFIG),
    ):
        path.write_text(json.dumps(doc | change))
        with pytest.raises(TierfsError) as info:
            keys.load_site_keys(acme.root / "a")
        assert info.value.exit_code == code, change
    path.write_text(json.dumps(doc))
    assert keys.load_site_keys(acme.root / "a").public_key == site.public_key


# --- recovery bundles ----------------------------------------------------------------------


def setup_site_dir(acme: Domain, name: str = "store-042") -> Path:
    """A data directory's key material without a filesystem (import does not need one)."""
    site = acme.site(name)
    directory = acme.root / name
    domain_mod.write(directory / "domain.json", acme.domain)
    keys.write_domain_keys(directory, acme.keys)
    assert site.site_name == name
    return directory


def same_keys(a: Path, b: Path) -> None:
    assert domain_mod.load(a / "domain.json") == domain_mod.load(b / "domain.json")
    assert keys.load_domain_keys(a).to_json() == keys.load_domain_keys(b).to_json()
    sa, sb = keys.load_site_keys(a), keys.load_site_keys(b)
    assert sa.to_json() == sb.to_json() and sa.certificate == sb.certificate


@pytest.mark.parametrize("passphrase", [None, "pässword"])
def test_bundle_round_trip(acme: Domain, tmp_path: Path, passphrase: str | None) -> None:
    source = setup_site_dir(acme)
    out = tmp_path / "site.bundle"
    bundle = keys.export_bundle(source, out, passphrase)
    assert mode(out) == 0o600 and bundle.site is not None
    doc = json.loads(out.read_text())
    assert doc["magic"] == "tierfs-key-bundle" and doc["format_version"] == 1
    assert doc["site_name"] == "store-042" and doc["domain_id"] == acme.domain.domain_id
    private = keys.load_site_keys(source).to_json()["private_key"]
    assert (private in out.read_text()) == (passphrase is None)
    target = tmp_path / "restored" / "data"
    keys.import_bundle(out, target, passphrase)
    same_keys(source, target)
    assert mode(target / "keys" / "site.key") == 0o600
    assert mode(target / "domain.json") == 0o600
    keys.import_bundle(out, target, passphrase)  # the same keys again: nothing to refuse


def test_bundle_passphrase_errors(acme: Domain, tmp_path: Path) -> None:
    out = tmp_path / "site.bundle"
    keys.export_bundle(setup_site_dir(acme), out, "right")
    with pytest.raises(VerificationError, match="wrong passphrase"):
        keys.read_bundle(out, "wrong")
    with pytest.raises(TierfsError, match="encrypted") as info:
        keys.read_bundle(out)
    assert info.value.exit_code == ExitCode.USAGE
    asked: list[bool] = []

    def ask() -> str:
        asked.append(True)
        return "right"

    keys.read_bundle(out, ask)
    assert asked == [True]
    # the readable header is authenticated: renaming the site breaks decryption
    doc = json.loads(out.read_text())
    out.write_text(json.dumps(doc | {"site_name": "other"}))
    with pytest.raises(VerificationError):
        keys.read_bundle(out, "right")
    out.write_text(json.dumps(doc | {"format_version": 9}))
    with pytest.raises(TierfsError, match="not supported") as info:
        keys.read_bundle(out, "right")
    assert info.value.exit_code == ExitCode.VERSION
    out.write_text("{}")
    with pytest.raises(TierfsError, match="not a tierfs key bundle") as info:
        keys.read_bundle(out)
    assert info.value.exit_code == ExitCode.CONFIG


def test_bundle_import_refuses_other_keys(acme: Domain, tmp_path: Path) -> None:
    out = tmp_path / "a.bundle"
    keys.export_bundle(setup_site_dir(acme, "a"), out)
    b = setup_site_dir(acme, "b")
    with pytest.raises(TierfsError, match="already exist") as info:
        keys.import_bundle(out, b)
    assert info.value.exit_code == ExitCode.ALREADY_EXISTS
    keys.import_bundle(out, b, force=True)
    assert keys.load_site_keys(b).site_name == "a"
    with pytest.raises(TierfsError, match="already exists") as info:
        keys.export_bundle(b, out)
    assert info.value.exit_code == ExitCode.ALREADY_EXISTS
    other = make_domain(tmp_path / "other", "other")
    (tmp_path / "fs" / "meta").mkdir(parents=True)
    domain_mod.write(tmp_path / "fs" / "domain.json", other.domain)
    with pytest.raises(TierfsError, match="holds a filesystem of domain") as info:
        keys.import_bundle(out, tmp_path / "fs", force=True)
    assert info.value.exit_code == ExitCode.CONFIG


def test_bundle_with_a_foreign_certificate_is_refused(acme: Domain, tmp_path: Path) -> None:
    out = tmp_path / "a.bundle"
    keys.export_bundle(setup_site_dir(acme, "a"), out)
    doc = json.loads(out.read_text())
    outsider = acme.site("x", keys.generate_domain_keys(acme.domain.domain_id))
    cert = dataclasses.replace(
        outsider.certificate, site_name="a", site_uuid=doc["site_uuid"]
    ).encode()
    doc["contents"]["site_certificate"] = keys._b64(cert)
    out.write_text(json.dumps(doc))
    with pytest.raises(VerificationError, match="site_certificate"):
        keys.read_bundle(out)


# --- the CLI -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["key", "key export", "key import", "key show", "mkfs"])
def test_key_help_has_examples(command: str) -> None:
    out = run_cli(*command.split(), "--help").stdout
    assert "Example" in out and f"tierfs {command}" in out


def test_cli_export_import_show(data_dir: Path, tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret passphrase\n")
    bundle = tmp_path / "site.bundle"
    out = run_cli("key", "export", "--passphrase-file", pw, data_dir, bundle).stdout
    assert "encrypted bundle" in out and "test-site" in out and mode(bundle) == 0o600
    assert_one_line_error(
        run_cli("key", "export", "--passphrase-file", pw, data_dir, bundle, check=False),
        ExitCode.ALREADY_EXISTS,
    )
    assert_one_line_error(
        run_cli("key", "export", data_dir, tmp_path / "x.bundle", check=False), ExitCode.USAGE
    )
    assert_one_line_error(
        run_cli("key", "import", bundle, tmp_path / "new", check=False), ExitCode.USAGE
    )
    wrong = tmp_path / "wrong"
    wrong.write_text("not it\n")
    result = run_cli(
        "key", "import", "--passphrase-file", wrong, bundle, tmp_path / "new", check=False
    )
    assert_one_line_error(result, ExitCode.VERIFY_FAILED)
    assert "wrong passphrase" in result.stderr
    out = run_cli("key", "import", "--passphrase-file", pw, bundle, tmp_path / "new").stdout
    assert "test-site" in out
    same_keys(data_dir, tmp_path / "new")

    doc = json.loads(run_cli("key", "show", data_dir, "--json").stdout)
    site = keys.load_site_keys(data_dir)
    assert doc["site"]["fingerprint"] == site.fingerprint
    assert doc["site"]["public_key"] == site.public_key.hex()
    assert doc["certificate"]["verified"] is True and doc["certificate"]["epoch"] == 1
    assert doc["certificate"]["valid_until"] is None
    assert (
        doc["domain"]["signing_key"]["fingerprint"] == keys.load_domain_keys(data_dir).fingerprint
    )
    assert "private" not in json.dumps(doc)
    table = run_cli("key", "show", data_dir).stdout
    assert site.fingerprint in table and "verified" in table


def test_cli_show_reports_a_certificate_that_does_not_verify(data_dir: Path) -> None:
    domain = domain_mod.load(data_dir / "domain.json")
    keys.write_domain_keys(data_dir, keys.generate_domain_keys(domain.domain_id))
    result = run_cli("key", "show", data_dir, check=False)
    assert_one_line_error(result, ExitCode.VERIFY_FAILED)
    assert "FAILED" in result.stdout


def test_cli_import_refuses_other_site_and_other_keys(data_dir: Path, tmp_path: Path) -> None:
    run_cli("mkfs", tmp_path / "other", "--site", "other")
    bundle = tmp_path / "other.bundle"
    run_cli("key", "export", "--no-passphrase", tmp_path / "other", bundle)
    result = run_cli("key", "import", bundle, data_dir, check=False)
    assert_one_line_error(result, ExitCode.CONFIG)
    assert "domain" in result.stderr
    run_cli("mkfs", tmp_path / "same", "--site", "other")
    assert_one_line_error(
        run_cli("key", "import", bundle, tmp_path / "same", check=False), ExitCode.CONFIG
    )
    os.remove(tmp_path / "same" / "domain.json")
    assert_one_line_error(
        run_cli("key", "import", bundle, tmp_path / "same", check=False), ExitCode.ALREADY_EXISTS
    )


def test_cli_show_of_a_data_directory_without_keys(data_dir: Path, tmp_path: Path) -> None:
    assert_one_line_error(run_cli("key", "show", tmp_path, check=False), ExitCode.NOT_A_FILESYSTEM)
    (data_dir / "keys" / "site.cert").unlink()
    result = run_cli("key", "show", data_dir, check=False)
    assert_one_line_error(result, ExitCode.CONFIG)
    assert "site certificate missing" in result.stderr
    assert_one_line_error(
        run_cli("key", "export", "--no-passphrase", data_dir, tmp_path / "b", check=False),
        ExitCode.CONFIG,
    )
