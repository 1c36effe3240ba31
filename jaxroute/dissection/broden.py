"""The Broden data-set format (Bau et al. 2017): a validating, streaming reader and a writer.

A Broden folder holds::

    index.csv       image, split, ih, iw, sh, sw, then one column per category: a
                    ";"-separated list of PNG mask paths (pixel-level labels) or of
                    integer label numbers (image-level labels); empty = none
    label.csv       number, name, category (e.g. ``color(120);object(3)``: the
                    categories the label occurs in, with counts), frequency,
                    coverage, syns
    category.csv    name, first, last, count, frequency
    c_<cat>.csv     code, number, name, frequency, coverage (one per category)
    images/         the images and the masks (paths in index.csv are relative to images/)

A mask pixel's label number is ``R + 256 * G`` of its RGB PNG; 0 means no label.
Each mask has the index row's size ``sh x sw`` (Broden: 112 for 224-pixel
images, 113 for 227).

:func:`read_broden` parses and checks the CSV files at once (missing files,
unknown categories, labels outside ``label.csv``) and returns a
:class:`Broden` whose :meth:`Broden.records` decodes images and masks one row
at a time, checking each mask's size and labels as it is read; memory does not
grow with the number of images.  :func:`write_broden` streams records to disk
and writes the CSV files, with Broden's frequency/coverage statistics, at the
end (``index.csv`` last, so a folder with an ``index.csv`` is complete).

Deviation: images are written as PNG (Broden uses JPEG) so that pixels survive
the round trip exactly.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from jaxroute.utils.io import atomic_write_bytes, atomic_write_text

INDEX_FIELDS = ("image", "split", "ih", "iw", "sh", "sw")
LABEL_FIELDS = ("number", "name", "category", "frequency", "coverage", "syns")
CATEGORY_FIELDS = ("name", "first", "last", "count", "frequency")
CODE_FIELDS = ("code", "number", "name", "frequency", "coverage")
_CAT_ENTRY = re.compile(r"^\s*([^()]+?)\s*\((\d+)\)\s*$")


class BrodenError(ValueError):
    """A Broden folder that does not follow the format (the message names the file and the problem)."""


@dataclasses.dataclass(frozen=True)
class Label:
    number: int
    name: str
    categories: Mapping[str, int]    # category -> count as listed in label.csv
    frequency: int = 0
    coverage: float = 0.0
    syns: str = ""


@dataclasses.dataclass(frozen=True)
class Record:
    """One image with its labels.

    ``image``: uint8 (ih, iw, 3); ``masks``: {category: [int (sh, sw) label maps]};
    ``scalars``: {category: [label numbers]} (image-level labels).
    """

    image: np.ndarray
    masks: Mapping[str, Sequence[np.ndarray]]
    scalars: Mapping[str, Sequence[int]]
    split: str = "train"
    sh: int | None = None
    sw: int | None = None
    name: str | None = None   # file name under images/ (the reader sets it; the writer numbers images)

    @property
    def mask_shape(self) -> tuple[int, int]:
        if self.sh is not None:
            return (self.sh, self.sw)
        for ms in self.masks.values():
            for m in ms:
                return tuple(m.shape)
        return tuple(self.image.shape[:2])


def _read_csv(path: Path, fields: Sequence[str]) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"Broden folder {path.parent} has no {path.name}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in fields if k not in (reader.fieldnames or ())]
        if missing:
            raise BrodenError(f"{path}: missing column(s) {missing} (has {reader.fieldnames})")
        return list(reader)


def _int(value: str, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise BrodenError(f"{where}: expected an integer, got {value!r}") from None


def _float(value: str, where: str) -> float:
    try:
        return float(value) if value not in ("", None) else 0.0
    except ValueError:
        raise BrodenError(f"{where}: expected a number, got {value!r}") from None


def parse_label_categories(text: str, where: str = "label.csv") -> dict[str, int]:
    """``"material(36);object(3)"`` -> ``{"material": 36, "object": 3}`` (``""`` or ``"-"`` -> {})."""
    out: dict[str, int] = {}
    for part in (text or "").split(";"):
        if part.strip() in ("", "-"):
            continue
        m = _CAT_ENTRY.match(part)
        if m:
            out[m.group(1)] = int(m.group(2))
        else:
            out[part.strip()] = 0
    return out


def format_label_categories(cats: Mapping[str, int]) -> str:
    return ";".join(f"{c}({n})" for c, n in cats.items())


def decode_mask(rgb: np.ndarray) -> np.ndarray:
    """Label numbers ``R + 256 * G`` of an RGB(A) mask array (H, W, >= 2) as int32 (H, W)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] < 2:
        raise BrodenError(f"a Broden mask must be an RGB image, got an array of shape {rgb.shape}")
    return rgb[..., 0].astype(np.int32) + 256 * rgb[..., 1].astype(np.int32)


def encode_mask(labels: np.ndarray) -> np.ndarray:
    """uint8 RGB (H, W, 3) with ``R + 256 * G = labels`` (labels in [0, 65535])."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"a mask must be a 2-D integer label map, got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= 65536):
        raise ValueError(f"mask labels must lie in [0, 65535], got [{labels.min()}, {labels.max()}]")
    out = np.zeros(labels.shape + (3,), np.uint8)
    out[..., 0] = labels % 256
    out[..., 1] = labels // 256
    return out


def _load_png(path: Path) -> np.ndarray:
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"Broden image or mask {path} is missing")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


@dataclasses.dataclass(frozen=True, eq=False)
class Broden:
    """A parsed Broden folder; :meth:`records` streams its images and masks."""

    root: Path
    labels: tuple[Label, ...]                 # sorted by number
    categories: tuple[str, ...]               # category.csv order
    category_rows: tuple[dict, ...]
    codes: Mapping[str, tuple[dict, ...]]     # c_<cat>.csv rows per category
    index: tuple[dict, ...]                   # raw index.csv rows

    @property
    def num_labels(self) -> int:
        """Size of a dense label axis: the largest label number + 1 (0 = none)."""
        return max((lab.number for lab in self.labels), default=0) + 1

    def label_names(self) -> list[str]:
        names = ["-"] * self.num_labels
        for lab in self.labels:
            names[lab.number] = lab.name
        return names

    def __len__(self) -> int:
        return len(self.index)

    def coverage_table(self) -> np.ndarray:
        """(num_labels, num_categories) coverage of each label in each category's c_<cat>.csv (0 where absent)."""
        cov = np.zeros((self.num_labels, len(self.categories)))
        for ci, cat in enumerate(self.categories):
            for row in self.codes[cat]:
                cov[int(row["number"]), ci] = float(row["coverage"] or 0)
        return cov

    def primary_categories(self) -> np.ndarray:
        """Each label's primary category (NetDissect-Lite): the one whose c_<cat>.csv gives it the
        largest coverage; ties (also labels in no category) go to the later category, as Lite's
        ``max((coverage, index))`` does."""
        cov = self.coverage_table()
        k = len(self.categories)
        return (k - 1 - np.argmax(cov[:, ::-1], axis=1)).astype(np.int64)

    def mask_shape(self) -> tuple[int, int]:
        """The one (sh, sw) of every row; BrodenError if the rows differ."""
        shapes = {(int(r["sh"]), int(r["sw"])) for r in self.index}
        if len(shapes) != 1:
            raise BrodenError(f"{self.root}: rows have different mask sizes {sorted(shapes)}; dissection needs one")
        return shapes.pop()

    def image_shape(self) -> tuple[int, int]:
        shapes = {(int(r["ih"]), int(r["iw"])) for r in self.index}
        if len(shapes) != 1:
            raise BrodenError(f"{self.root}: rows have different image sizes {sorted(shapes)}")
        return shapes.pop()

    def fingerprint(self) -> str:
        """CRC-32 of the CSV files: identifies the data a cached result was computed on."""
        import zlib

        crc = 0
        for name in ["index.csv", "label.csv", "category.csv"] + [f"c_{c}.csv" for c in self.categories]:
            crc = zlib.crc32((self.root / name).read_bytes(), crc)
        return f"{crc:08x}-{len(self.index)}"

    def records(self, start: int = 0, end: int | None = None, *, images: bool = True) -> Iterator[Record]:
        """Decode rows ``start:end`` one at a time, checking each mask's size and labels."""
        known = np.zeros(self.num_labels, bool)
        for lab in self.labels:
            known[lab.number] = True
        known[0] = True
        for i in range(start, len(self.index) if end is None else end):
            row = self.index[i]
            where = f"{self.root / 'index.csv'} row {i + 2}"
            sh, sw = int(row["sh"]), int(row["sw"])
            masks: dict[str, list[np.ndarray]] = {}
            scalars: dict[str, list[int]] = {}
            for cat in self.categories:
                for item in (row.get(cat) or "").split(";"):
                    item = item.strip()
                    if not item:
                        continue
                    if item.lstrip("-").isdigit():
                        n = int(item)
                        if not 0 < n < len(known) or not known[n]:
                            raise BrodenError(f"{where}: image-level label {n} in column {cat!r} is not in label.csv")
                        scalars.setdefault(cat, []).append(n)
                        continue
                    m = decode_mask(_load_png(self.root / "images" / item))
                    if m.shape != (sh, sw):
                        raise BrodenError(f"{where}: mask {item} has size {m.shape[0]}x{m.shape[1]}, the row says "
                                          f"sh x sw = {sh}x{sw}")
                    bad = np.unique(m[(m >= len(known)) | ~known[np.minimum(m, len(known) - 1)]])
                    if bad.size:
                        raise BrodenError(f"{where}: mask {item} has label(s) {bad[:5].tolist()} not in label.csv")
                    masks.setdefault(cat, []).append(m)
            image = _load_png(self.root / "images" / row["image"]) if images else None
            if image is not None and image.shape[:2] != (int(row["ih"]), int(row["iw"])):
                raise BrodenError(f"{where}: image {row['image']} is {image.shape[0]}x{image.shape[1]}, the row says "
                                  f"{row['ih']}x{row['iw']}")
            yield Record(image, masks, scalars, row["split"], sh, sw, row["image"])


def read_broden(root) -> Broden:
    """Parse and check a Broden folder's CSV files (images and masks are checked as they are read)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Broden folder {root} does not exist")
    cat_rows = _read_csv(root / "category.csv", CATEGORY_FIELDS)
    categories = tuple(r["name"] for r in cat_rows)
    if len(set(categories)) != len(categories):
        raise BrodenError(f"{root / 'category.csv'}: repeated category names {categories}")
    labels = []
    for i, r in enumerate(_read_csv(root / "label.csv", LABEL_FIELDS)):
        where = f"{root / 'label.csv'} row {i + 2}"
        n = _int(r["number"], where)
        if n == 0:
            continue  # the optional "no label" row
        if n < 0:
            raise BrodenError(f"{where}: label numbers must be > 0, got {n}")
        cats = parse_label_categories(r["category"], where)
        unknown = [c for c in cats if c not in categories]
        if unknown:
            raise BrodenError(f"{where}: label {r['name']!r} names unknown category {unknown[0]!r} "
                              f"(category.csv has {list(categories)})")
        labels.append(Label(n, r["name"], cats, _int(r["frequency"] or "0", where), _float(r["coverage"], where),
                            r.get("syns") or ""))
    labels.sort(key=lambda lab: lab.number)
    numbers = [lab.number for lab in labels]
    if len(set(numbers)) != len(numbers):
        raise BrodenError(f"{root / 'label.csv'}: repeated label numbers")
    known = set(numbers)
    codes = {}
    for cat in categories:
        rows = _read_csv(root / f"c_{cat}.csv", CODE_FIELDS)
        for i, r in enumerate(rows):
            n = _int(r["number"], f"{root / f'c_{cat}.csv'} row {i + 2}")
            if n not in known:
                raise BrodenError(f"{root / f'c_{cat}.csv'} row {i + 2}: label {n} is not in label.csv")
        codes[cat] = tuple(rows)
    index_path = root / "index.csv"
    index = _read_csv(index_path, INDEX_FIELDS)
    if index:
        with open(index_path, newline="") as f:
            header = next(csv.reader(f))
        extra = [c for c in header if c not in INDEX_FIELDS and c not in categories]
        if extra:
            raise BrodenError(f"{index_path}: column {extra[0]!r} is not a category of category.csv "
                              f"({list(categories)})")
    for i, r in enumerate(index):
        where = f"{index_path} row {i + 2}"
        for k in INDEX_FIELDS[2:]:
            if _int(r[k], where) <= 0:
                raise BrodenError(f"{where}: {k} must be > 0, got {r[k]}")
    return Broden(root, tuple(labels), categories, tuple(cat_rows), codes, tuple(index))


def write_broden(root, records: Iterable[Record], labels: Sequence[tuple[int, str]], categories: Sequence[str]) -> Broden:
    """Write ``records`` as a Broden folder at ``root`` and return it read back.

    ``labels``: ``(number, name)`` pairs (numbers > 0, any size: masks hold up
    to 65535); ``categories``: the category names, in order.  Statistics as
    Broden defines them: a label's frequency is the number of images it
    occurs in (per category in ``label.csv``'s category column and in
    ``c_<cat>.csv``), its coverage the mean fraction of those images it covers
    (1 for an image-level label); a category's frequency is the number of
    images with any of its labels.  Labels that never occur are kept in
    ``label.csv`` with frequency 0 and belong to no category.
    """
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    categories = list(categories)
    if len(set(categories)) != len(categories) or not categories:
        raise ValueError(f"categories must be distinct names, got {categories}")
    names = {}
    for n, name in labels:
        if not isinstance(n, (int, np.integer)) or not 0 < n < 65536:
            raise ValueError(f"label numbers must be integers in [1, 65535], got {n!r}")
        if n in names:
            raise ValueError(f"label number {n} given twice")
        names[int(n)] = str(name)
    freq = {c: {} for c in categories}      # cat -> label -> images
    cover = {c: {} for c in categories}     # cat -> label -> summed fraction
    cat_freq = {c: 0 for c in categories}
    total_freq: dict[int, int] = {}
    total_cover: dict[int, float] = {}
    rows = []

    def save_png(rel: str, arr: np.ndarray) -> None:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        atomic_write_bytes(root / "images" / rel, buf.getvalue())

    for i, rec in enumerate(records):
        unknown = [c for c in list(rec.masks) + list(rec.scalars) if c not in categories]
        if unknown:
            raise ValueError(f"record {i}: unknown category {unknown[0]!r} (categories: {categories})")
        img = np.asarray(rec.image)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
            raise ValueError(f"record {i}: image must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
        sh, sw = rec.mask_shape
        stem = f"{i:06d}"
        save_png(f"{stem}.png", img)
        row = {"image": f"{stem}.png", "split": rec.split, "ih": img.shape[0], "iw": img.shape[1], "sh": sh, "sw": sw}
        seen_in_image: dict[int, float] = {}
        for cat in categories:
            items = []
            present: dict[int, float] = {}
            for j, m in enumerate(rec.masks.get(cat, ())):
                m = np.asarray(m)
                if m.shape != (sh, sw):
                    raise ValueError(f"record {i}: {cat} mask {j} has shape {m.shape}, expected {(sh, sw)}")
                bad = sorted({int(v) for v in np.unique(m)} - set(names) - {0})
                if bad:
                    raise ValueError(f"record {i}: {cat} mask {j} has label(s) {bad[:5]} not in labels")
                rel = f"{stem}_{cat}_{j}.png"
                save_png(rel, encode_mask(m))
                items.append(rel)
                vals, counts = np.unique(m[m > 0], return_counts=True)
                for v, c in zip(vals.tolist(), counts.tolist()):
                    present[v] = present.get(v, 0.0) + c / (sh * sw)
            for n in rec.scalars.get(cat, ()):
                if int(n) not in names:
                    raise ValueError(f"record {i}: {cat} image-level label {n} not in labels")
                items.append(str(int(n)))
                present[int(n)] = 1.0
            row[cat] = ";".join(items)
            if present:
                cat_freq[cat] += 1
            for n, frac in present.items():
                freq[cat][n] = freq[cat].get(n, 0) + 1
                cover[cat][n] = cover[cat].get(n, 0.0) + min(frac, 1.0)
                seen_in_image[n] = max(seen_in_image.get(n, 0.0), min(frac, 1.0))
        for n, frac in seen_in_image.items():
            total_freq[n] = total_freq.get(n, 0) + 1
            total_cover[n] = total_cover.get(n, 0.0) + frac
        rows.append(row)

    def text(fields, table) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
        w.writeheader()
        w.writerows(table)
        return buf.getvalue()

    label_rows = [{"number": 0, "name": "-", "category": "-", "frequency": 0, "coverage": 0.0, "syns": ""}]
    for n in sorted(names):
        cats = {c: freq[c][n] for c in categories if n in freq[c]}
        f = total_freq.get(n, 0)
        label_rows.append({"number": n, "name": names[n], "category": format_label_categories(cats), "frequency": f,
                           "coverage": round(total_cover.get(n, 0.0) / f, 6) if f else 0.0, "syns": ""})
    atomic_write_text(root / "label.csv", text(LABEL_FIELDS, label_rows))
    cat_rows = []
    for cat in categories:
        members = sorted(freq[cat])
        code_rows = [{"code": k + 1, "number": n, "name": names[n], "frequency": freq[cat][n],
                      "coverage": round(cover[cat][n] / freq[cat][n], 6)} for k, n in enumerate(members)]
        atomic_write_text(root / f"c_{cat}.csv", text(CODE_FIELDS, code_rows))
        cat_rows.append({"name": cat, "first": min(members, default=0), "last": max(members, default=0),
                         "count": len(members), "frequency": cat_freq[cat]})
    atomic_write_text(root / "category.csv", text(CATEGORY_FIELDS, cat_rows))
    atomic_write_text(root / "index.csv", text(list(INDEX_FIELDS) + categories, rows))
    return read_broden(root)
