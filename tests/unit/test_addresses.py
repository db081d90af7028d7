"""SMTP path parsing: the forms that could turn the gateway into an open relay are refused."""

from __future__ import annotations

import pytest

from gateway.addresses import parse_mail_params, parse_path, parse_rcpt_params
from gateway.errors import PermanentFailure


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("<dr.martin@chu-test.fr>", "dr.martin@chu-test.fr"),
        ("<Dr.Martin@CHU-TEST.FR>", "Dr.Martin@chu-test.fr"),  # domain folded, local part kept
        ("<user@chu-test.fr.>", "user@chu-test.fr"),  # trailing dot removed before routing
        ("<@relay.example,@other.example:user@chu-test.fr>", "user@chu-test.fr"),  # route ignored
        ('<"jean dupont"@chu-test.fr>', '"jean dupont"@chu-test.fr'),
        ("<jean.dupont+lab@chu-test.fr>", "jean.dupont+lab@chu-test.fr"),
    ],
)
def test_accepted_paths(text: str, address: str) -> None:
    path, rest = parse_path(text, allow_null=False)
    assert path.address == address
    assert rest == ""


@pytest.mark.parametrize(
    "text",
    [
        "<user%evil.example@chu-test.fr>",
        "<evil.example!user@chu-test.fr>",
        '<"user@evil.example"@chu-test.fr>',
        "user@chu-test.fr",  # no angle brackets
        "<user@chu-test.fr",
        "<user>",
        "<user@>",
        "<@chu-test.fr>",
        "<user@@chu-test.fr>",
        "<user@chu-test.fr>x",
        "<" + "a" * 65 + "@chu-test.fr>",
    ],
)
def test_refused_paths(text: str) -> None:
    with pytest.raises(PermanentFailure) as caught:
        parse_path(text, allow_null=False)
    assert caught.value.smtp_code == 553
    assert caught.value.enhanced == "5.1.3"


def test_source_route_does_not_hide_the_final_domain() -> None:
    path, _ = parse_path("<@chu-test.fr:user@evil.example>", allow_null=False)
    assert path.domain == "evil.example"


def test_null_path_only_as_sender() -> None:
    path, _ = parse_path("<>", allow_null=True)
    assert path.null and path.address == ""
    with pytest.raises(PermanentFailure):
        parse_path("<>", allow_null=False)


def test_address_literal_is_flagged() -> None:
    path, _ = parse_path("<user@[192.0.2.1]>", allow_null=False)
    assert path.literal


def test_mail_parameters() -> None:
    _path, rest = parse_path("<a@chu-test.fr> SIZE=1000 RET=HDRS ENVID=Abc+2Bdef BODY=8BITMIME",
                            allow_null=True)
    params = parse_mail_params(rest)
    assert params.size == 1000 and params.ret == "HDRS" and params.body == "8BITMIME"
    assert params.envid == "Abc+2Bdef"  # xtext keeps its case
    for bad in ("SIZE=x", "RET=ALL", "BODY=BINARYMIME", "FOO=1", "SIZE=1 SIZE=2", "ENVID=a b"):
        with pytest.raises(PermanentFailure):
            parse_mail_params(bad)


def test_rcpt_parameters() -> None:
    params = parse_rcpt_params("NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Dr.Martin@chu-test.fr")
    assert params.notify == ("SUCCESS", "FAILURE")
    assert params.orcpt == "rfc822;Dr.Martin@chu-test.fr"
    assert parse_rcpt_params("NOTIFY=NEVER").notify == ("NEVER",)
    for bad in ("NOTIFY=NEVER,SUCCESS", "NOTIFY=SOMETIMES", "ORCPT=nosemicolon", "XFOO"):
        with pytest.raises(PermanentFailure):
            parse_rcpt_params(bad)
