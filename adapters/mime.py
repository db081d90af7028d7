"""The `mime` adapter: plain RFC 5322 / MIME, for networks whose confidentiality comes from TLS.

Hospital mail systems and MSSanté operators peer over mutually authenticated TLS and exchange
ordinary MIME. Nothing is signed or encrypted at the message level, so unwrap and wrap both pass
the content through byte for byte; the gateway's trace headers are added by the pipeline.

MSSanté convention: a message the gateway sends into the MSSanté space carries `X-MSS-NIL`, the
reference of the sending product, set per network with the `x_mss_nil` option. A message that
already carries one keeps it untouched, as every other `X-MSS-*` header.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from adapters.base import UnwrapContext, Unwrapped, Verdict, WrapContext, Wrapped

__all__ = ["MimeAdapter"]

_HAS_NIL = re.compile(rb"(?im)^x-mss-nil[ \t]*:")
_SAFE_VALUE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,196}[\x21-\x7e])?")


class MimeAdapter:
    name = "mime"
    method = "none"

    def option_problems(self, options: Mapping[str, object]) -> list[str]:
        known = {"x_mss_nil"}
        problems = [
            f"option {key!r} is not known to the mime adapter (known: {', '.join(sorted(known))})"
            for key in options
            if key not in known
        ]
        nil = options.get("x_mss_nil")
        if nil is not None and not (isinstance(nil, str) and _SAFE_VALUE.fullmatch(nil)):
            problems.append("option 'x_mss_nil' must be the product reference as printable "
                            "ASCII text on one line, e.g. x_mss_nil: \"PASSERELLE-1.0\"")
        return problems

    def unwrap(self, raw: bytes, context: UnwrapContext) -> Unwrapped:
        return Unwrapped(content=raw, signature=Verdict.unsigned(), source_format=self.name)

    def wrap(self, message: Unwrapped, context: WrapContext) -> Wrapped:
        nil = context.options.get("x_mss_nil")
        content = message.content
        if isinstance(nil, str) and _SAFE_VALUE.fullmatch(nil):
            end = content.find(b"\r\n\r\n")
            head = content[: end if end >= 0 else len(content)]
            if not _HAS_NIL.search(head):
                content = b"X-MSS-NIL: " + nil.encode("ascii") + b"\r\n" + content
        return Wrapped(content=content)
