"""The on-disk records folder is bounded: ``persist`` keeps the newest files only."""

import os

from compile_affine import record_store as records


def test_prune_keeps_the_newest_by_mtime(tmp_path):
    for i in range(6):
        path = tmp_path / f"k{i}.json"
        path.write_text("[]")
        os.utime(path, (1000 + i, 1000 + i))
    (tmp_path / "other.txt").write_text("not a record")
    assert records.prune_records(str(tmp_path), keep=4) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k2.json", "k3.json", "k4.json", "k5.json", "other.txt"]
    assert records.prune_records(str(tmp_path), keep=4) == 0
    assert records.prune_records(str(tmp_path / "missing")) == 0


def test_persist_prunes(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "_records_dir", lambda: str(tmp_path))
    monkeypatch.setattr(records, "MAX_RECORDS", 3)
    for i in range(5):
        records.persist(f"key{i}", [])
        os.utime(tmp_path / f"key{i}.json", (1000 + i, 1000 + i))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key2.json", "key3.json", "key4.json"]
    assert records.restore("key4") == []
