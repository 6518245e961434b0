"""Each storage's own key rules, as `pipeline validate` applies them (no I/O)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import PermanentError
from pipeline.storage import LocalStorage, S3Storage


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("a/b.png", None),
        ("é" * 122 + ".png", None),  # 248 bytes, + '.json' = 253
        ("a/" + "x" * 256, "longer than 255 bytes"),
        ("x" * 251 + "/b.png", None),
        ("é" * 124 + ".png", "longer than 250 bytes"),  # fits alone, not with its sidecar
        (".meta/a.png", "reserved"),
        (".staging/put-1", "reserved"),
        ("a/.meta/b.png", None),  # only the top-level folders are the storage's own
        ("../a.png", "'..'"),
        ("k" * 1025, "longer than 1024 bytes"),
    ],
)
def test_local_key_rules(tmp_path: Path, key: str, problem: str | None) -> None:
    found = LocalStorage(tmp_path / "assets").key_problem(key)
    assert (found is None) if problem is None else (found is not None and problem in found)
    assert not (tmp_path / "assets").exists()  # a rule check creates nothing


def test_local_path_length_counts_the_root(tmp_path: Path) -> None:
    key = "/".join(["d" * 200] * 19)  # 3,819 bytes: fine under a short root
    assert LocalStorage(tmp_path).key_problem(key[:1000]) is None
    deep_root = tmp_path.joinpath(*["r" * 200] * 16)
    assert "longer than 4095 bytes" in (LocalStorage(deep_root).key_problem(key[:1000]) or "")


def test_s3_counts_the_prefix_in_its_1024_bytes() -> None:
    key = "k" * 1000
    assert S3Storage("bucket").key_problem(key) is None
    assert "S3's 1024 bytes" in (S3Storage("bucket", "p" * 30).key_problem(key) or "")
    assert "reserved" in (S3Storage("bucket").key_problem(".staging/x") or "")


def test_put_refuses_a_key_the_filesystem_would_refuse_as_permanent(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    with pytest.raises(PermanentError, match="255 bytes") as caught:
        storage.put("x" * 300, [b"data"], content_type="image/png", metadata={})
    assert len(str(caught.value)) < 300
