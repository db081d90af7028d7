"""The `mime` adapter: plain RFC 5322 / MIME, for networks whose confidentiality comes from TLS.

Hospital mail systems and MSSanté operators peer over mutually authenticated TLS and exchange
ordinary MIME. Nothing is signed or encrypted at the message level, so unwrap and wrap both pass
the content through byte for byte; the gateway's trace headers are added by the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping

from adapters.base import UnwrapContext, Unwrapped, Verdict, WrapContext, Wrapped

__all__ = ["MimeAdapter"]


class MimeAdapter:
    name = "mime"
    method = "none"

    def option_problems(self, options: Mapping[str, object]) -> list[str]:
        known = {"x_mss_nil"}
        return [
            f"option {key!r} is not known to the mime adapter (known: {', '.join(sorted(known))})"
            for key in options
            if key not in known
        ]

    def unwrap(self, raw: bytes, context: UnwrapContext) -> Unwrapped:
        return Unwrapped(content=raw, signature=Verdict.unsigned(), source_format=self.name)

    def wrap(self, message: Unwrapped, context: WrapContext) -> Wrapped:
        return Wrapped(content=message.content)
