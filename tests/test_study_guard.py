"""A damaged, empty, foreign or older study.db is never resumed into (issue 30, item 2): each is refused
in one line with exit 2 before anything in the folder changes, and --resume on a missing folder is an
error. The trust, write-path and malformed-input parts of issue 30 are in test_trust.py,
test_write_faults.py and test_malformed.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from test_faults import finished, one_line, rows, study, write_spec  # noqa: F401 - module-scoped 2-trial study

from autoprune.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of the results folder (locks aside), by relative path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def resume(spec: Path, out: Path, *extra: str) -> int:
    return main(["search", str(spec), "--out", str(out), "--resume", "--max-trials", "3", "--no-progress", *extra])


def test_an_empty_study_db_is_refused_and_nothing_is_rewritten(study, capsys):  # noqa: F811
    spec, out = study
    (out / "study.db").write_bytes(b"")  # `: > study.db`
    before = snapshot(out)
    assert resume(spec, out) == 2
    one_line(capsys, "study.db is empty", "trials.csv (2 trials) is intact")
    assert snapshot(out) == before


def test_garbled_pages_behind_a_valid_header_are_refused(study, capsys):  # noqa: F811
    spec, out = study
    db = out / "study.db"
    data = bytearray(db.read_bytes())
    page = 4096 if len(data) > 3 * 4096 else 1024
    data[page:len(data) - page] = bytes(i * 37 % 251 for i in range(len(data) - 2 * page))
    db.write_bytes(bytes(data))
    before = snapshot(out)
    assert resume(spec, out) == 2
    one_line(capsys, "study.db", "trials.csv (2 trials) is intact")
    assert snapshot(out) == before


def test_a_foreign_study_db_is_refused(study, tmp_path, capsys):  # noqa: F811
    spec, out = study
    other = write_spec(tmp_path / "other", None, study="other", base_epochs=1, budget={"max_trials": 1})
    assert main(["search", str(other), "--out", str(tmp_path / "other_out"), "--no-progress"]) == 0
    shutil.copy(tmp_path / "other_out" / "study.db", out / "study.db")
    before = snapshot(out)
    capsys.readouterr()
    assert resume(spec, out) == 2
    one_line(capsys, "holds study 'other', not 't'")
    assert snapshot(out) == before


def test_an_older_copy_of_the_same_study_db_is_refused(study, tmp_path, capsys):  # noqa: F811
    spec, out = study
    older = (out / "study.db").read_bytes()
    assert resume(spec, out) == 0  # one more trial: 3 in study.db and trials.csv
    assert len(rows(out)) == 3
    (out / "study.db").write_bytes(older)
    before = snapshot(out)
    capsys.readouterr()
    assert resume(spec, out, "--max-trials", "4") == 2
    one_line(capsys, "study.db is older than trials.csv", "holds 2 trials, trials.csv lists 3", "[2] are missing")
    assert snapshot(out) == before and len(rows(out)) == 3


def test_a_study_db_made_by_another_spec_is_refused(study, tmp_path, capsys):  # noqa: F811
    """spec.yaml replaced together with the spec: only the hash recorded in study.db can tell."""
    spec, out = study
    changed = yaml.safe_load(spec.read_text())
    changed["space"]["target"] = {"low": 0.4, "high": 0.9}
    new_spec = tmp_path / "changed.yaml"
    new_spec.write_text(yaml.safe_dump(changed))
    from autoprune.search.spec import dump_spec, load_spec

    dump_spec(load_spec(new_spec), out / "spec.yaml")  # as the changed search would have written it
    before = snapshot(out)
    assert resume(new_spec, out) == 2
    one_line(capsys, "was made by a different spec")
    assert snapshot(out) == before


def test_resume_on_a_missing_folder_is_an_error(finished, tmp_path, capsys):  # noqa: F811
    spec, _ = finished
    missing = tmp_path / "typo"
    assert resume(spec, missing) == 2
    one_line(capsys, "--resume", "does not exist", "drop --resume")
    assert not missing.exists()
