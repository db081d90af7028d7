"""The demo's example traffic (examples/): what examples/README.md says about each file holds."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import re
import zipfile
from pathlib import Path

from gateway.demo_traffic import XDM_FILES, leaves, load_examples, read_receipt, xdm_zip

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
NOW = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)


def test_hprim_report_is_iso_8859_1_with_its_markers() -> None:
    body = leaves(load_examples(EXAMPLES, "t", NOW)["hprim"].content)[0]
    assert body.charset == "iso-8859-1"
    lines = body.data.split(b"\r\n")
    assert lines.index(b"****LAB****") == 13  # 12 header lines, one line of text
    assert any(line.startswith(b"RES|") for line in lines)
    assert body.data.endswith(b"****FIN****\r\n****FINFICHIER****\r\n")
    assert "µmol/l".encode("iso-8859-1") in body.data


def test_xdm_zip_is_deterministic_and_its_metadata_describes_the_document() -> None:
    folder = EXAMPLES / "ihe-xdm"
    archive = xdm_zip(folder)
    assert archive == xdm_zip(folder)
    with zipfile.ZipFile(io.BytesIO(archive)) as opened:
        assert tuple(opened.namelist()) == XDM_FILES
        document = opened.read("IHE_XDM/SUBSET01/DOC0001.XML")
        metadata = opened.read("IHE_XDM/SUBSET01/METADATA.XML").decode()
    slot = dict(re.findall(r'<rim:Slot name="(\w+)"><rim:ValueList><rim:Value>([^<]*)<', metadata))
    assert slot["hash"] == hashlib.sha1(document).hexdigest()
    assert slot["size"] == str(len(document))


def test_each_run_gets_fresh_message_ids_and_the_letter_its_zip() -> None:
    first, second = load_examples(EXAMPLES, "a", NOW), load_examples(EXAMPLES, "b", NOW)
    assert first.keys() == {"hprim", "discharge", "smime", "tampered", "stranger"}
    for key, example in first.items():
        assert example.message_id != second[key].message_id
        assert example.message_id.encode() in example.content
    names = [leaf.filename for leaf in leaves(first["discharge"].content)]
    assert names == [None, "IHE_XDM.ZIP"]


def test_read_receipt_answers_the_disposition_notification_to() -> None:
    letter = load_examples(EXAMPLES, "r", NOW)["discharge"]
    mdn = read_receipt(letter.content, "dr.martin@medecin.fr", NOW, lambda: "<mdn@medecin.fr>")
    assert b"To: <dr.durand@chu-exemple.fr>" in mdn
    assert b"report-type=disposition-notification" in mdn
    assert b"Original-Message-ID: " + letter.message_id.encode() in mdn
    assert read_receipt(load_examples(EXAMPLES, "r", NOW)["smime"].content, "x@y", NOW,
                        lambda: "<z@y>") == b""
