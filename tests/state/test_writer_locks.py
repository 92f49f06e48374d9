"""One writer lock per SQLite file per process, whatever path spells the file."""

from __future__ import annotations

import os

from labctl.writer_locks import writer_lock


def test_every_spelling_of_one_file_shares_one_lock(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    db = real / "state.db"
    spellings = [db, str(db), tmp_path / "link" / "state.db", f"{real}/../real/state.db"]
    locks = {id(writer_lock(p)) for p in spellings}
    assert len(locks) == 1
    assert writer_lock(db) is writer_lock(str(tmp_path / "link" / "state.db"))  # asked again: the same object


def test_two_files_have_two_locks(tmp_path):
    first, second = writer_lock(tmp_path / "a.db"), writer_lock(tmp_path / "b.db")
    assert first is not second
    with first:
        assert second.acquire(blocking=False)  # another file's writers are not held up
        second.release()
