"""Bad GAR files are named at open, every per-row failure is skipped and counted, images of any mode decode
right (part of issue H: 'every failure a named error; nothing lost')."""

import io
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sa2va_rl.data.gar import BadRow, DataFileError, GARReader, mask_to_rle
from sa2va_rl.data.synthetic import synthetic_row, write_arrow


def rows(n=4):
    return [synthetic_row(random.Random(i)) for i in range(n)]


def test_truncated_arrow_named_at_open(tmp_path):
    path = tmp_path / "d" / "data-00000-of-00001.arrow"
    write_arrow(str(path), rows(8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataFileError, match=r"data-00000-of-00001\.arrow: cannot be read .*truncated"):
        GARReader(str(tmp_path / "d"))


def test_missing_column_named_at_open(tmp_path):
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "mask_rle"} for r in rows()])
    (tmp_path / "d").mkdir()
    pq.write_table(table, tmp_path / "d" / "x.parquet")
    with pytest.raises(DataFileError, match=r"x\.parquet: column\(s\) \['mask_rle'\] missing"):
        GARReader(str(tmp_path / "d"))


def test_mistyped_column_named_at_open(tmp_path):
    table = pa.Table.from_pylist([dict(r, image=7) for r in rows()])
    (tmp_path / "d").mkdir()
    pq.write_table(table, tmp_path / "d" / "x.parquet")
    with pytest.raises(DataFileError, match=r"x\.parquet: column 'image' has type int64"):
        GARReader(str(tmp_path / "d"))


def test_any_row_failure_is_skipped_counted_and_named(tmp_path):
    """A row whose image is an int makes os.path raise TypeError: skipped and counted under 'skip', named with its
    row and line under 'error' (it used to stop the run with a bare TypeError)."""
    (tmp_path / "j").mkdir()
    with open(tmp_path / "j" / "x.jsonl", "w") as f:
        for i, r in enumerate(rows(3)):
            Image.open(io.BytesIO(r["image"]["bytes"])).save(tmp_path / "j" / f"img{i}.png")
            f.write(json.dumps(dict(r, image=7 if i == 1 else f"img{i}.png")) + "\n")
    reader = GARReader(str(tmp_path / "j"))
    got = [reader.get(i) for i in range(3)]
    assert got[0] is not None and got[1] is None and got[2] is not None
    assert dict(reader.bad_counts) == {("x.jsonl", "<row>"): 1}
    strict = GARReader(str(tmp_path / "j"), bad_rows="error")
    with pytest.raises(BadRow, match=r"x\.jsonl: row 1 \(line 2\): field '<row>': TypeError"):
        strict.get(1)


def test_jsonl_rows_and_lines_are_told_apart(tmp_path):
    (tmp_path / "j").mkdir()
    with open(tmp_path / "j" / "x.jsonl", "w") as f:
        f.write("\n" + json.dumps({"a": 1}) + "\n\n{not json\n")
    with pytest.raises(BadRow, match=r"x\.jsonl: row 1 \(line 4\): field '<line>': not valid JSON"):
        GARReader(str(tmp_path / "j"))


def test_non_utf8_jsonl_named_with_its_line(tmp_path):
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "x.jsonl").write_bytes(b'{"a": 1}\n{"caption": "caf\xe9"}\n')
    with pytest.raises(DataFileError, match=r"x\.jsonl: line 2: not UTF-8"):
        GARReader(str(tmp_path / "j"))


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def _row_with(image_bytes: bytes, hw) -> dict:
    mask = np.zeros(hw, bool)
    mask[1:3, 1:3] = True
    return {"image": {"bytes": image_bytes, "path": None}, "mask_rle": mask_to_rle(mask),
            "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a thing"}]}


@pytest.mark.parametrize("mode", ["I;16", "P", "CMYK", "LA", "RGBA", "L"])
def test_image_modes_decode_to_the_right_8_bit_values(mode, tmp_path):
    gray = np.array([[0, 64, 128, 255]] * 4, dtype=np.uint8)
    if mode == "I;16":
        im, fmt = Image.fromarray(gray.astype(np.uint16) * 257), "PNG"  # 16-bit: 255 -> 65535
    elif mode == "CMYK":
        im, fmt = Image.fromarray(gray).convert("CMYK"), "JPEG"
    else:
        im, fmt = Image.fromarray(gray).convert(mode), "PNG"
    write_arrow(str(tmp_path / "d" / "x.arrow"), [_row_with(_png(im, format=fmt), (4, 4))])
    got = GARReader(str(tmp_path / "d"), bad_rows="error").get(0).image
    assert got.dtype == np.uint8 and got.shape == (4, 4, 3)
    tolerance = 3 if fmt == "JPEG" else 0
    assert np.abs(got[..., 0].astype(int) - gray).max() <= tolerance  # not solid white, not clipped


def test_exif_rotated_image_follows_its_mask(tmp_path):
    im = Image.fromarray(np.arange(6 * 4 * 3, dtype=np.uint8).reshape(4, 6, 3))  # raw 4x6 (h x w)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 on display: shown as 6x4
    raw = _png(im, exif=exif)
    write_arrow(str(tmp_path / "a" / "x.arrow"), [_row_with(raw, (6, 4))])  # mask drawn on the displayed image
    write_arrow(str(tmp_path / "b" / "x.arrow"), [_row_with(raw, (4, 6))])  # mask drawn on the raw pixels
    assert GARReader(str(tmp_path / "a"), bad_rows="error").get(0).image.shape == (6, 4, 3)
    assert GARReader(str(tmp_path / "b"), bad_rows="error").get(0).image.shape == (4, 6, 3)
