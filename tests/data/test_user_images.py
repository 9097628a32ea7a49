"""A user's own images and masks (celldiff.data.user_images)."""

from __future__ import annotations

import pytest

from celldiff.data.user_images import UserImageDataset
from celldiff.errors import DataError


def test_missing_predict_folders_say_so(tmp_path):
    (tmp_path / "masks").mkdir()
    (tmp_path / "img.txt").write_text("")
    with pytest.raises(DataError, match="data.predict_images .*nope does not exist"):
        UserImageDataset(tmp_path / "nope", tmp_path / "masks", 16)
    with pytest.raises(DataError, match="data.predict_images .*img.txt is a file, not a folder"):
        UserImageDataset(tmp_path / "img.txt", tmp_path / "masks", 16)
