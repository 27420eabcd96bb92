"""The header rules of `deid`: PS3.15 Table E.1-1 (Basic Profile), then a safety net.

Why a table file and a net: the Basic Application Level Confidentiality Profile lists
several hundred attributes by tag, and the standard grows every edition, so the table is
kept as data (``ps3_15_e1_1.csv`` beside this module, written by
``scripts/ps3_15_table.py`` from the standard; its header names the edition) and loaded at
run time. What no table lists (vendor text in a standard attribute the profile does not
name, a private tag, an attribute newer than the table) is caught by the net below.

Order of the rules for one attribute (also inside every sequence item, recursively):

1. group length (gggg,0000): removed (it is recomputed on writing);
2. private (odd group): removed (the table's "(gggg,eeee)" row), unless on
   ``SAFE_PRIVATE``; a private creator stays only while one of its attributes does;
3. UN (an unknown VR, whose value cannot be judged or replaced): removed;
4. the table's action, with combined actions resolved by ``resolve``; curve (50xx) and
   overlay (60xx) groups are removed whole (overlays can carry burned-in text);
5. the safety net, by value representation: person names, free text and AE titles or URIs
   (PN, LO, SH, LT, ST, UT, UC, AE, UR) are removed unless on ``TEXT_KEEP`` (kept) or
   ``TEXT_EMPTY`` (emptied); dates, times and ages (DA, DT, TM, AS) are removed; binary
   values (OB, OD, OF, OL, OV, OW) are removed unless on ``BINARY_KEEP``; public
   attributes missing from the data dictionary are removed; a UID gets a new
   UID unless it names a definition (``uid_is_definition``) or is a well-known DICOM UID;
   a sequence is kept and its items cleaned by these same rules; what is left (CS, numbers,
   AT) is kept: coded strings hold defined terms (Modality, ImageType,
   PhotometricInterpretation...) that reading and validating the image need;
6. two IOD conditions the table alone would break: ``DEPENDS_ON`` (a Type 1C attribute
   goes with the attribute it depends on) and ``ANIMAL_TYPE_2`` (emptied, not removed,
   for an animal patient).
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

__all__ = [
    "BINARY_KEEP",
    "SAFE_PRIVATE",
    "TEXT_EMPTY",
    "TEXT_KEEP",
    "ProfileTable",
    "apply_profile",
    "load_table",
    "resolve",
]

TABLE_FILE = "ps3_15_e1_1.csv"
PRIVATE_ROW = "(gggg,eeee)"

#: How a combined action of Table E.1-1a is resolved. The profile lets a de-identifier pick
#: the stronger choice unless the IOD needs the attribute ("X/Z: X unless Z is required to
#: keep the IOD conformant", Type 3 vs 2 vs 1). The files deid writes are US Image and US
#: Multi-frame Image instances (PS3.3 A.6, A.7), where no X/Z, X/D, X/Z/D or X/Z/U*
#: attribute is Type 1 or 2 and every Z/D one is Type 2 or 3: so X and Z are always enough
#: (dciodvfy on the output confirms it, see tests/test_deid.py). C (clean) is not
#: implemented and means X; K keeps.
RESOLVED: dict[str, str] = {
    "D": "D", "Z": "Z", "X": "X", "U": "U", "K": "K", "C": "X",
    "Z/D": "Z", "X/Z": "X", "X/D": "X", "X/Z/D": "X", "X/Z/U*": "X",
}  # fmt: skip

#: Text attributes kept as they are, with why. Everything else of VR PN, LO, SH, LT, ST,
#: UT, UC, AE or UR that the table does not name is removed.
TEXT_KEEP: dict[str, str] = {
    "Manufacturer": "Type 2 in General Equipment; names the vendor, not a person or site",
    "ManufacturerModelName": "the scanner model; image appearance depends on it",
    "CodeValue": "Type 1 in every coded item (anatomy, view, transducer codes)",
    "CodingSchemeDesignator": "Type 1 in every coded item: names the terminology",
    "CodingSchemeVersion": "the terminology's version, part of a coded item",
    "CodeMeaning": "Type 1 in every coded item: the term's text from the terminology",
    "LongCodeValue": "the long form of CodeValue (Type 1C)",
    "URNCodeValue": "the URN form of CodeValue (Type 1C)",
}
#: Text attributes kept but emptied: Type 2 in the US IODs, so they must stay present.
TEXT_EMPTY: dict[str, str] = {
    "PositionReferenceIndicator": "Type 2 in the Frame of Reference module",
}
#: Binary attributes kept, with why: all are needed to display the pixels.
BINARY_KEEP: dict[str, str] = {
    **dict.fromkeys(
        (f"{c}PaletteColorLookupTableData" for c in ("Red", "Green", "Blue", "Alpha")),
        "PALETTE COLOR pixels cannot be shown without it",
    ),
    **dict.fromkeys(
        (f"Segmented{c}PaletteColorLookupTableData" for c in ("Red", "Green", "Blue", "Alpha")),
        "the segmented form of the palette",
    ),
    "ICCProfile": "colour management of the pixels",
    "LUTData": "modality or VOI lookup table of the pixels",
}
#: Private attributes kept: (private creator, group, element offset 0x00-0xFF) -> why.
#: Empty on purpose: no ultrasound vendor attribute has been vetted as free of identity
#: (PS3.15 Table E.3.10-1 lists safe private attributes of other modalities). Only
#: numeric values are ever kept (text on this list is still removed); when one is kept,
#: the Retain Safe Private Option (113111) is recorded.
SAFE_PRIVATE: dict[tuple[str, int, int], str] = {}

#: Type 1C attributes allowed only while another one has a value: when the rules remove
#: or empty every attribute one depends on, it goes too (else the file breaks its IOD).
DEPENDS_ON: dict[str, tuple[str, ...]] = {
    "ResponsiblePersonRole": ("ResponsiblePerson",),
    "PatientAlternativeCalendar": (
        "PatientBirthDateInAlternativeCalendar",
        "PatientDeathDateInAlternativeCalendar",
    ),
    "ClinicalTrialProtocolEthicsCommitteeName": (
        "ClinicalTrialProtocolEthicsCommitteeApprovalNumber",
    ),
}
#: Type 2C in the Patient and Patient Study modules when the patient is an animal: the
#: table's X (or X/Z) becomes Z then, so the attribute stays, empty.
ANIMAL_TYPE_2: frozenset[str] = frozenset(
    {"PatientSexNeutered", "ResponsiblePerson", "ResponsibleOrganization"}
)
_ANIMAL_MARKS = ("PatientSpeciesDescription", "PatientSpeciesCodeSequence")

_TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC", "AE", "UR"})
_TEMPORAL_VRS = frozenset({"DA", "DT", "TM", "AS"})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW"})
_NUMBER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "DS", "IS", "AT"})
_DICOM_ROOT = "1.2.840.10008."
_UID_DEFINITIONS = frozenset({
    "TransferSyntaxUID", "ReferencedTransferSyntaxUIDInFile", "CodingSchemeUID",
    "MappingResourceUID",
})  # fmt: skip
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY = {
    "DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000D", "DS": "0",
    "IS": "0", "UR": "urn:anonymized",
}  # fmt: skip
_BINARY_UNIT = {"OB": 2, "OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8, "UN": 2}


@dataclass(frozen=True)
class ProfileTable:
    """Table E.1-1 as loaded: rows (tag, keyword, name, action) and lookups."""

    edition: str
    source: str
    rows: tuple[tuple[str, str, str, str], ...]
    by_tag: dict[int, str] = field(repr=False)
    repeating: tuple[tuple[int, int, str], ...] = field(repr=False)  # (mask, value, action)

    def action(self, tag: int) -> str | None:
        """The table's (unresolved) action for ``tag``, or None when it has no row."""
        if tag in self.by_tag:
            return self.by_tag[tag]
        for mask, value, action in self.repeating:
            if tag & mask == value:
                return action
        return None


@functools.cache
def load_table() -> ProfileTable:
    """Read ``ps3_15_e1_1.csv`` (package data) once; refuses a file whose row count is off."""
    text = resources.files("fetalplanes.tools").joinpath(TABLE_FILE).read_text("utf-8")
    lines = text.splitlines()
    meta = dict(line[1:].split(":", 1) for line in lines if line.startswith("#") and ":" in line)
    meta = {k.strip(): v.strip() for k, v in meta.items()}
    rows = tuple(
        (r["tag"], r["keyword"], r["name"], r["action"])
        for r in csv.DictReader(line for line in lines if not line.startswith("#"))
    )
    if str(len(rows)) != meta.get("rows"):
        raise RuntimeError(f"{TABLE_FILE}: {len(rows)} rows, its header says {meta.get('rows')}")
    by_tag, repeating = {}, []
    for tag, _, _, action in rows:
        if tag == PRIVATE_ROW:
            continue  # private tags are handled before any lookup (always X, see above)
        if "x" in tag:
            digits = tag[1:5] + tag[6:10]
            mask = int("".join("0" if c == "x" else "F" for c in digits), 16)
            repeating.append((mask, int(digits.replace("x", "0"), 16), action))
        else:
            by_tag[int(tag[1:5] + tag[6:10], 16)] = action
    edition, source = meta.get("edition", "unknown"), meta.get("source", "")
    return ProfileTable(edition, source, rows, by_tag, tuple(repeating))


def resolve(action: str) -> str:
    """One of X, Z, D, U, K for a table action (see ``RESOLVED``)."""
    return RESOLVED[action]


def uid_is_definition(keyword: str) -> bool:
    """Whether a UI attribute names a definition (a class, a syntax, a coding scheme)
    rather than an instance, so that replacing it would break the file's meaning."""
    return keyword.endswith("ClassUID") or keyword in _UID_DEFINITIONS


@dataclass
class ProfileRun:
    """State shared by every file of one run: the UID map and what was done."""

    new_uid: Callable[[str], str]
    kept_private: bool = False


def apply_profile(ds: Dataset, run: ProfileRun) -> None:
    """Apply the table and the safety net to ``ds`` and every sequence item in it."""
    animal = any(ds.get(keyword) for keyword in _ANIMAL_MARKS)
    _clean(ds, run, animal)


def _clean(ds: Dataset, run: ProfileRun, animal: bool = False) -> None:
    table = load_table()
    safe = _safe_private_tags(ds)
    present = {keyword for keyword in DEPENDS_ON if keyword in ds}
    for elem in list(ds):
        tag = elem.tag
        if tag.element == 0 or (tag.is_private and tag not in safe):
            del ds[tag]
            continue
        if tag.is_private:
            run.kept_private = True
            continue
        action = _action(elem, table)
        if action == "X" and animal and elem.keyword in ANIMAL_TYPE_2:
            action = "Z"
        if action == "X":
            del ds[tag]
        elif action == "Z":
            elem.value = _empty(elem.VR)
        elif action == "D":
            _dummy(elem, run)
        elif action == "U":
            _new_uids(elem, run)
        elif elem.VR == "SQ":
            for item in elem.value:
                _clean(item, run)
    for keyword in present:
        if keyword in ds and not any(ds.get(anchor) for anchor in DEPENDS_ON[keyword]):
            delattr(ds, keyword)


def _action(elem: DataElement, table: ProfileTable) -> str:
    """X, Z, D, U or K for a public attribute."""
    tag, vr = elem.tag, _vr(elem)
    if vr == "UN":
        return "X"  # an unknown VR: its value cannot be judged, emptied or replaced
    listed = table.action(tag)
    if listed is not None:
        action = resolve(listed)
        return "X" if action == "D" and vr == "SQ" else action
    if tag.group >> 8 in (0x50, 0x60) or not elem.keyword or vr in _TEMPORAL_VRS:
        return "X"
    if vr in _TEXT_VRS:
        return "K" if elem.keyword in TEXT_KEEP else "Z" if elem.keyword in TEXT_EMPTY else "X"
    if vr in _BINARY_VRS:
        return "K" if elem.keyword in BINARY_KEEP else "X"
    if vr == "UI" and not uid_is_definition(elem.keyword):
        return "U"
    return "K"


def _vr(elem: DataElement) -> str:
    """The element's VR; an unresolved 'OB or OW' counts as binary, 'US or SS' as a number."""
    vr = str(elem.VR)
    if " or " not in vr:
        return vr
    options = vr.split(" or ")
    return next((o for o in options if o in _BINARY_VRS), options[0])


def _safe_private_tags(ds: Dataset) -> set[BaseTag]:
    """The private tags of ``ds`` on ``SAFE_PRIVATE`` (numeric values only) and their
    creators."""
    if not SAFE_PRIVATE:
        return set()
    keep: set[BaseTag] = set()
    for elem in ds:
        tag = elem.tag
        if not tag.is_private or tag.is_private_creator or _vr(elem) not in _NUMBER_VRS:
            continue
        creator_tag = Tag(tag.group, tag.element >> 8)
        creator = ds.get(creator_tag)
        if creator is None:
            continue
        if (str(creator.value).strip(), tag.group, tag.element & 0xFF) in SAFE_PRIVATE:
            keep.update((tag, creator_tag))
    return keep


def _empty(vr: str) -> object:
    if vr == "SQ":
        return []
    if vr in _TEXT_VRS or vr in _TEMPORAL_VRS or vr in {"CS", "DS", "IS", "UI"}:
        return ""
    if vr in _BINARY_VRS or vr == "UN":
        return b""
    return None


def _dummy(elem: DataElement, run: ProfileRun) -> None:
    """A non-empty value of the element's VR that says nothing (PS3.15 action D)."""
    vr = _vr(elem)
    if vr == "UI":
        _new_uids(elem, run)
    elif vr in _DUMMY:
        elem.value = _DUMMY[vr]
    elif vr in _TEXT_VRS or vr == "CS":
        elem.value = _DUMMY_TEXT
    elif vr in _BINARY_UNIT:
        elem.value = bytes(_BINARY_UNIT[vr])
    elif vr in {"FL", "FD"}:
        elem.value = 0.0
    else:
        elem.value = 0


def _new_uids(elem: DataElement, run: ProfileRun) -> None:
    """Replace each UID by its run-wide new UID; well-known DICOM UIDs stay."""
    if not elem.value:
        return
    values = elem.value if isinstance(elem.value, MultiValue) else [elem.value]
    new = [str(v) if str(v).startswith(_DICOM_ROOT) else run.new_uid(str(v)) for v in values]
    elem.value = new if len(new) > 1 else new[0]
