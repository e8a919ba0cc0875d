"""Shipped evidence (data/reference/) is read-only unless asked, and every shipped record, run or
audit, is checked against the committed manifest when it is read."""

import json
import shutil

import pytest

from dpeq_utils import shipped
from dpeq_utils.cli import CommandFailed
from dpeq_utils.config import RunConfig
from dpeq_utils.paths import REPO_ROOT
from dpeq_utils.records import read_record, record_digest, record_path
from dpeq_utils.runs import main as train_main
from dpeq_utils.runs import run

SHIPPED = REPO_ROOT / "data" / "reference"
TINY = RunConfig(profile="teach", dataset="synthetic", train_size=64, test_size=32, model="resnet9", widths=(4, 4, 4),
                 batch_size=16, physical_batch_size=16, update_steps=1, lr=0.5, device="cpu")


def test_the_manifest_lists_every_shipped_record_and_its_hash():
    manifest = json.loads((SHIPPED / shipped.MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(SHIPPED).as_posix(): shipped.file_sha256(p) for p in shipped.shipped_files(SHIPPED)}
    assert manifest == on_disk, "rewrite it with: python -m dpeq_utils manifest (after checking what changed)"
    assert any(name.startswith("teach/audit/") for name in manifest), "audit records are covered too"


def test_every_shipped_record_keeps_its_key():
    """A change to what the key hashes (a field added, its role changed in the config's metadata)
    would silently re-key every record: each shipped run and audit record still hashes to its key,
    and the default config's key is pinned, so the change cannot pass unseen."""
    from dpeq_utils.audit import audit_key
    from dpeq_utils.mechanism import MECHANISM_SCHEMA, along_training_key
    from dpeq_utils.records import config_key

    records = [json.loads(p.read_text()) for p in shipped.shipped_files(SHIPPED)]
    audits = [r for r in records if "canaries" in r]
    mechanisms = [r for r in records if r.get("schema") == MECHANISM_SCHEMA]
    runs = [r for r in records if "canaries" not in r and "config" in r and r not in mechanisms]
    assert len(runs) >= 60 and len(audits) >= 4 and len(mechanisms) >= 1
    for record in mechanisms:
        config = RunConfig(**record["config"])
        assert record["run_key"] == config_key(config)
        assert along_training_key(config, [p["step"] for p in record["points"]], record["probes"],
                                  record["probe_size"]) == record["key"]
    for record in runs:
        assert config_key(RunConfig(**record["config"])) == record["key"]
    for record in audits:
        gradient = (record.get("gradient_canaries") or {}).get("count", 0)
        assert audit_key(RunConfig(**record["config"]), record["canaries"], record["seed"], record["breakage"],
                         gradient) == record["key"]
    assert config_key(RunConfig()) == "c246ef9ac5ade6d6"
    assert config_key(RunConfig(validation_size=100, ema_horizons=(0.9,), secure_noise=True)) == "acec4ccd599bbdc0"
    assert config_key(RunConfig(device="cuda", physical_batch_size=7, per_sample_engine="vmap", checkpoint_every=3,
                                profile="x")) == "c246ef9ac5ade6d6", "performance settings and the label stay out"


@pytest.fixture
def reference_copy(tmp_path, monkeypatch):
    """The shipped records with their manifest, copied to a folder the tests may damage."""
    copy = tmp_path / "reference"
    shutil.copytree(SHIPPED, copy)
    monkeypatch.setenv("DPEQ_REFERENCE_DIR", str(copy))
    return copy


def test_an_edited_shipped_record_with_a_recomputed_digest_is_refused(reference_copy):
    path = sorted((reference_copy / "teach").glob("eq_resnet9-*.json"))[0]
    assert read_record(path)["key"]  # intact: accepted
    record = json.loads(path.read_text())
    record["test_accuracy"] = 0.99
    record["digest"] = record_digest(record)  # what a careful forger does
    path.write_text(json.dumps(record, indent=1))
    with pytest.raises(shipped.ShippedRecordError, match="differs from the shipped record.*git checkout"):
        read_record(path)


def test_zeroed_scores_in_a_shipped_audit_record_are_refused(reference_copy):
    from dpeq_utils.audit import load_or_audit

    path = next((reference_copy / "teach" / "audit").glob("eq_resnet9-no_noise-*.json"))
    record = json.loads(path.read_text())
    config = RunConfig(**record["config"])
    white = record.get("gradient_canaries", {}).get("count", 0)
    assert load_or_audit(config, record["canaries"], record["seed"], "no_noise",
                         gradient_canaries=white).source == str(path)
    record["scores"] = [0.0] * len(record["scores"])  # the broken trainer would now look private
    path.write_text(json.dumps(record))
    with pytest.raises(shipped.ShippedRecordError, match=str(path)):
        load_or_audit(config, record["canaries"], record["seed"], "no_noise", gradient_canaries=white)


def test_a_record_that_is_not_shipped_is_refused_in_the_reference_folder(reference_copy):
    stray = reference_copy / "teach" / record_path(TINY).name
    run(TINY, reference_copy.parent / "mine", progress=False)
    shutil.copy(record_path(TINY, reference_copy.parent / "mine"), stray)
    with pytest.raises(shipped.ShippedRecordError, match="not one of the shipped records"):
        read_record(stray)


def test_force_into_the_reference_folder_needs_an_explicit_flag(reference_copy, capsys):
    folder = reference_copy / "teach"
    args = ["--profile", "teach", "--runs-dir", str(folder), "--force", "--no-progress", "--set", "dataset=synthetic",
            "--set", "train_size=64", "--set", "test_size=32", "--set", "model=resnet9", "--set", "widths=[4,4,4]",
            "--set", "batch_size=16", "--set", "physical_batch_size=16", "--set", "update_steps=1", "--set", "device=cpu"]
    before = {p.name: p.read_bytes() for p in folder.glob("*.json")}
    with pytest.raises(CommandFailed):
        train_main(args)
    err = capsys.readouterr().err
    assert "records shipped with dpeq" in err and "--write-reference" in err
    assert {p.name: p.read_bytes() for p in folder.glob("*.json")} == before, "nothing was written"
    assert train_main(args + ["--write-reference"]) == 0
    written = set(p.name for p in folder.glob("*.json")) - set(before)
    assert len(written) == 1
    read_record(folder / written.pop())  # the manifest was updated with it: it reads back as shipped


def test_a_study_and_an_audit_write_into_the_reference_folder_only_when_asked(reference_copy):
    from dpeq_utils.audit import load_or_audit

    with pytest.raises(shipped.ShippedRecordError):
        run(TINY, reference_copy / "teach", progress=False)
    with pytest.raises(shipped.ShippedRecordError):
        load_or_audit(TINY.replace(update_steps=1), 8, runs_dir=reference_copy / "teach")
    assert not list((reference_copy / "teach").glob(".*.tmp"))


@pytest.mark.parametrize("link", ["the record", "its folder"])
def test_a_symlink_in_the_reference_folder_is_refused(reference_copy, tmp_path, link):
    """A shipped record replaced by a link to an edited copy elsewhere (digest recomputed), or the
    profile's folder replaced by a link to an edited copy of it: the manifest vouches for files in the
    folder, so a link there is refused, and nothing reads the edited accuracy."""
    from dpeq_utils.records import find_records

    path = sorted((reference_copy / "teach").glob("eq_resnet9-*.json"))[0]
    record = json.loads(path.read_text())
    record["test_accuracy"] = 0.99
    record["digest"] = record_digest(record)
    if link == "the record":
        edited = tmp_path / "elsewhere" / path.name
        edited.parent.mkdir()
        edited.write_text(json.dumps(record, indent=1))
        path.unlink()
        path.symlink_to(edited)
    else:
        edited = tmp_path / "elsewhere"
        shutil.copytree(reference_copy / "teach", edited)
        (edited / path.name).write_text(json.dumps(record, indent=1))
        shutil.rmtree(reference_copy / "teach")
        (reference_copy / "teach").symlink_to(edited, target_is_directory=True)
    with pytest.raises(shipped.ShippedRecordError, match="symbolic link"):
        read_record(path)
    with pytest.raises(shipped.ShippedRecordError, match="symbolic link"):
        find_records("teach")
    with pytest.raises(shipped.ShippedRecordError, match="symbolic link"):
        shipped.write_manifest(reference_copy, accept=True)


def test_the_manifest_command_lists_changes_and_writes_only_when_accepted(reference_copy, capsys):
    manifest = (reference_copy / shipped.MANIFEST).read_bytes()
    assert shipped.main([]) == 0 and "nothing to write" in capsys.readouterr().out
    path = sorted((reference_copy / "teach").glob("eq_resnet9-*.json"))[0]
    record = json.loads(path.read_text())
    record["test_accuracy"] = 0.99
    record["digest"] = record_digest(record)
    path.write_text(json.dumps(record, indent=1))
    (reference_copy / "teach" / "new.json").write_text("{}")
    with pytest.raises(CommandFailed):
        shipped.main([])
    err = capsys.readouterr().err
    assert f"changed  teach/{path.name}" in err and "added    teach/new.json" in err and "--accept" in err
    assert (reference_copy / shipped.MANIFEST).read_bytes() == manifest, "nothing was written"
    assert shipped.main(["--accept"]) == 0
    assert f"changed  teach/{path.name}" in capsys.readouterr().out
    assert read_record(path)["test_accuracy"] == 0.99  # accepted on purpose


def test_a_reference_folder_without_a_manifest_is_refused(reference_copy):
    """DPEQ_REFERENCE_DIR naming a copy without a manifest: its records are not read unchecked."""
    from dpeq_utils.records import find_records

    (reference_copy / shipped.MANIFEST).unlink()
    with pytest.raises(shipped.ShippedRecordError, match="has no MANIFEST.json.*manifest --accept"):
        find_records("teach")
