"""Write src/fetalplanes/tools/ps3_15_e1_1.csv: DICOM PS3.15 Table E.1-1, Basic Profile column.

`fetalplanes deid` loads that CSV at run time. Refresh it when a new edition of the
standard comes out, from either source (both are read as text; nothing in them is run):

  python scripts/ps3_15_table.py part15.xml
      NEMA's DocBook source of PS3.15 (the authoritative copy; the edition is read from
      its title). Rows are taken from the table whose xml:id is "table_E.1-1"; the columns
      by their header text ("Attribute Name", "Tag", "Basic Prof.").

  python scripts/ps3_15_table.py dicomfields_2026c.py --edition 2026c --source "..."
      A tag list in the layout of the dicom-anonymizer package's
      dicom_anonymization_databases/dicomfields_<edition>.py: one Python list per Basic
      Profile action (D_TAGS, X_Z_TAGS, X_Z_U_STAR_TAGS, ...) of `(0xGGGG, 0xEEEE),  # Name`
      entries, `(0xGGGG, 0xEEEE, 0xGMSK, 0xEMSK)` for repeating groups. That layout has
      no row for private attributes; the table's "(gggg,eeee) odd group: X" row is added.

Keywords come from pydicom's data dictionary; a tag newer than the installed pydicom gets
a keyword made from its name (written with a note in the metadata).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from pydicom.datadict import keyword_for_tag

OUT = Path(__file__).resolve().parents[1] / "src" / "fetalplanes" / "tools" / "ps3_15_e1_1.csv"
ACTIONS = {"D", "Z", "X", "K", "C", "U", "Z/D", "X/Z", "X/D", "X/Z/D", "X/Z/U*"}
PRIVATE_TAG = "(gggg,eeee)"
PRIVATE_ROW = (PRIVATE_TAG, "", "Private Attributes (gggg odd)", "X")
_LIST_ACTIONS = {  # dicom-anonymizer list name -> table action
    "D": "D", "Z": "Z", "X": "X", "U": "U", "K": "K", "C": "C", "Z_D": "Z/D", "X_Z": "X/Z",
    "X_D": "X/D", "X_Z_D": "X/Z/D", "X_Z_U_STAR": "X/Z/U*",
}  # fmt: skip
_ENTRY = re.compile(
    r"\(\s*0x([0-9A-Fa-f]{4})\s*,\s*0x([0-9A-Fa-f]{4})\s*"
    r"(?:,\s*0x([0-9A-Fa-f]{4})\s*,\s*0x([0-9A-Fa-f]{4})\s*)?,?\s*\)\s*,?[ \t]*#[ \t]*([^\n]*)"
)
Row = tuple[str, str, str, str]  # tag, keyword, name, action


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="part15.xml, or a dicomfields_<ed>.py list")
    parser.add_argument("--edition", help="e.g. 2026c (read from part15.xml when omitted)")
    parser.add_argument("--source", dest="note", help="where the source file came from")
    parser.add_argument("-o", "--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    text = args.source.read_text(encoding="utf-8")
    if args.source.suffix.lower() == ".xml":
        edition, rows = read_docbook(text)
        edition = args.edition or edition
    else:
        if not args.edition:
            parser.error("--edition is needed for a tag list (it does not state one)")
        edition, rows = args.edition, read_tag_lists(text)
    note = args.note or f"{args.source.name}"
    write_csv(args.out, rows, edition, note)
    print(f"{args.out}: {len(rows)} rows, edition {edition}")
    return 0


def read_docbook(text: str) -> tuple[str, list[Row]]:
    """(edition, rows) from NEMA's DocBook part15.xml."""
    root = ET.fromstring(text)
    found = re.search(r"PS3\.15\s+(\d{4}[a-z])", " ".join(_texts(root, "subtitle")))
    edition = found.group(1) if found else "unknown"
    table = next(
        (el for el in root.iter() if _local(el.tag) == "table" and _xml_id(el) == "table_E.1-1"),
        None,
    )
    if table is None:
        raise SystemExit("no table with xml:id table_E.1-1 in this file")
    header = [_cell_text(c) for c in _first(table, "thead").iter() if _local(c.tag) == "th"]
    col = {name: _column(header, name) for name in ("Attribute Name", "Tag", "Basic Prof")}
    rows = []
    for tr in (el for el in _first(table, "tbody").iter() if _local(el.tag) == "tr"):
        cells = [_cell_text(c) for c in tr if _local(c.tag) == "td"]
        if len(cells) < len(header):
            continue  # a spanning note row
        name, tag = cells[col["Attribute Name"]], _normal_tag(cells[col["Tag"]])
        rows.append(_row(tag, name, cells[col["Basic Prof"]]))
    return edition, rows


def read_tag_lists(text: str) -> list[Row]:
    """Rows from a dicom-anonymizer style file: ``X_Z_TAGS = [ (0x0008, 0x0022),  # Name``."""
    rows: list[Row] = []
    blocks = re.split(r"^([A-Z_]+)_TAGS\s*=\s*\[", text, flags=re.MULTILINE)
    for name, body in zip(blocks[1::2], blocks[2::2], strict=True):
        if name not in _LIST_ACTIONS:
            continue  # ALL_TAGS and the like
        body = body.split("]\n", 1)[0]
        for g, e, gmask, emask, label in _ENTRY.findall(body):
            tag = f"({_masked(g, gmask)},{_masked(e, emask)})"
            rows.append(_row(tag, label, _LIST_ACTIONS[name]))
    if not any(r[0] == PRIVATE_TAG for r in rows):
        rows.append(PRIVATE_ROW)
    return rows


def write_csv(path: Path, rows: list[Row], edition: str, note: str) -> None:
    tags = [r[0] for r in rows]
    duplicates = sorted({t for t in tags if tags.count(t) > 1})
    if duplicates:
        raise SystemExit(f"duplicate rows for {', '.join(duplicates)}")
    derived = sorted(r[1] for r in rows if r[1] and not keyword_for_tag(_tag_int(r[0])))
    rows = sorted(rows, key=lambda r: r[0].lower())
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        f.write(
            "# DICOM PS3.15 Table E.1-1 (Application Level Confidentiality Profile "
            "Attributes), Basic Profile column\n"
        )
        f.write(f"# edition: {edition}\n")
        f.write(f"# source: {note}\n")
        f.write(
            "# generated by: scripts/ps3_15_table.py; keywords from pydicom's dictionary, "
            f"made from the name for {len(derived)} tags it lacks: {' '.join(derived)}\n"
        )
        f.write(f"# rows: {len(rows)}\n")
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["tag", "keyword", "name", "action"])
        writer.writerows(rows)


def _row(tag: str, name: str, action: str) -> Row:
    action = action.replace(" ", "").strip()
    if action not in ACTIONS:
        raise SystemExit(f"{tag} {name}: unknown action {action!r}")
    name = re.sub(r"\s*\(see Note \d+\)\s*$", "", " ".join(name.split()))
    return tag, _keyword(tag, name), name, action


def _keyword(tag: str, name: str) -> str:
    """pydicom's keyword for a single public tag, else one made from the name."""
    if tag == PRIVATE_TAG or "x" in tag.lower():
        return ""
    keyword = keyword_for_tag(_tag_int(tag))
    if keyword:
        return keyword
    words = re.sub(r"[^0-9A-Za-z ]", " ", name.replace("'", "")).split()
    return "".join(w[0].upper() + w[1:] for w in words)


def _tag_int(tag: str) -> int:
    return int(tag[1:5] + tag[6:10], 16)


def _masked(digits: str, mask: str) -> str:
    """Hex digits with the nibbles a repeating-group mask leaves out written as 'x'."""
    if not mask:
        return digits.upper()
    return "".join(d.upper() if m != "0" else "x" for d, m in zip(digits, mask, strict=True))


def _normal_tag(text: str) -> str:
    text = text.replace(" ", "")
    if text.lower().startswith(PRIVATE_TAG):
        return PRIVATE_TAG
    m = re.match(r"\(([0-9A-Fa-fxX]{4}),([0-9A-Fa-fxX]{4})\)", text)
    if not m:
        raise SystemExit(f"cannot read the tag {text!r}")
    return "(" + ",".join(_upper_hex(p) for p in m.groups()) + ")"


def _upper_hex(part: str) -> str:
    return "".join("x" if c in "xX" else c.upper() for c in part)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _xml_id(el: ET.Element) -> str | None:
    return next((v for k, v in el.attrib.items() if _local(k) == "id"), None)


def _first(el: ET.Element, name: str) -> ET.Element:
    found = next((c for c in el.iter() if _local(c.tag) == name), None)
    if found is None:
        raise SystemExit(f"table_E.1-1 has no <{name}>")
    return found


def _texts(root: ET.Element, name: str) -> list[str]:
    return [_cell_text(el) for el in root.iter() if _local(el.tag) == name]


def _cell_text(el: ET.Element) -> str:
    return " ".join("".join(el.itertext()).split())


def _column(header: list[str], name: str) -> int:
    for index, text in enumerate(header):
        if text.startswith(name):
            return index
    raise SystemExit(f"table_E.1-1 has no column {name!r} (columns: {header})")


if __name__ == "__main__":
    sys.exit(main())
