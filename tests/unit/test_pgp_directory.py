"""The OpenPGP directory index: built once per Directory, answers in directory order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pysequoia

from adapters.base import Directory
from adapters.pgpkeys import generate_identity, key_index

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)


def public(user_id: str, days: int) -> bytes:
    secret = generate_identity(user_id, created=NOW - timedelta(days))
    return str(pysequoia.Tsk.from_bytes(secret).extract_certificate()).encode()


def test_lookups_answer_in_directory_order_whatever_the_case() -> None:
    older, other, newer = (public("Dr A <dr.a@cabinet.test>", 9),
                           public("Dr B <dr.b@cabinet.test>", 5),
                           public("Dr A <Dr.A@Cabinet.test>", 1))
    directory = Directory(openpgp=(older, other, newer))
    index = key_index(directory)
    assert key_index(directory) is index  # parsed once per Directory
    first, second, third = index.certs
    assert index.for_address("DR.A@cabinet.TEST") == [first, third]
    assert index.for_address("nobody@cabinet.test") == []
    handles = sorted(second.key_handles)
    assert index.lookup([handles[0].upper(), handles[-1], "0" * 16]) == [second]
    assert index.lookup([*sorted(third.key_handles), *sorted(first.key_handles)]) == [first, third]
    assert index.with_fingerprint(third.fingerprint.lower()) == [third]
