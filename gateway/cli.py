"""The `gateway` command (DESIGN.md §7).

Every command takes `-c FILE` (default ./routing.yaml) anywhere on its command line, exits 0 on
success and otherwise prints one sentence that says what to do, and exits non-zero.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


class Failure(Exception):
    """A command failed; the message is the sentence for the operator."""


def split_config(argv: Sequence[str]) -> tuple[Path, list[str]]:
    """Take `-c FILE` / `--config FILE` / `--config=FILE` out of argv, wherever it stands."""
    rest: list[str] = []
    config = Path("routing.yaml")
    words = list(argv)
    index = 0
    while index < len(words):
        word = words[index]
        if word in ("-c", "--config"):
            if index + 1 >= len(words):
                raise Failure(f"{word} needs a file name, as in: gateway check -c routing.yaml")
            config = Path(words[index + 1])
            index += 2
            continue
        if word.startswith("--config="):
            config = Path(word.partition("=")[2])
        elif word.startswith("-c") and len(word) > 2 and not word.startswith("--"):
            config = Path(word[2:])
        else:
            rest.append(word)
        index += 1
    return config, rest


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="gateway",
        description="Passerelle: SMTP gateway between secure health-messaging networks. "
        "Every command takes -c FILE (default ./routing.yaml).",
    )
    top.add_argument("--log-format", choices=["text", "json"], default="text")
    top.add_argument("-v", "--verbose", action="store_true")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("serve", help="run the relay (SIGHUP reloads, SIGTERM drains)")
    commands.add_parser("check", help="validate routing.yaml, keys, certificates, whitelist")
    queue = commands.add_parser("queue", help="inspect and act on the spool")
    actions = queue.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="one line per message")
    for action, text in (
        ("show", "envelope and per-recipient state of a message"),
        ("retry", "try the message's unfinished recipients now"),
        ("hold", "keep the message from being delivered until released"),
        ("release", "release a held message"),
        ("delete", "remove the message from the spool (no DSN is sent)"),
    ):
        actions.add_parser(action, help=text).add_argument("queue_id")
    audit = commands.add_parser("audit", help="verify or search the audit trail")
    audit_actions = audit.add_subparsers(dest="action", required=True, metavar="ACTION")
    audit_actions.add_parser("verify", help="check the SHA-256 chain of every record")
    found = audit_actions.add_parser("search", help="what happened to a message or an address")
    found.add_argument("--message-id")
    found.add_argument("--queue-id")
    found.add_argument("--address")
    found.add_argument("--since", type=dt.datetime.fromisoformat, help="ISO date or time")
    found.add_argument("--until", type=dt.datetime.fromisoformat, help="ISO date or time")
    found.add_argument("--json", action="store_true", help="one JSON record per line")
    return top


def _audit_folder(config: Path) -> Path:
    from gateway.config import ConfigError, load

    try:
        return load(config).gateway.audit.path
    except ConfigError as error:
        raise Failure(f"{config} has errors ({error}); run gateway check") from None
    except OSError as error:
        raise Failure(f"cannot read {config}: {error.strerror}") from None


def _aware(moment: dt.datetime | None) -> dt.datetime | None:
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=dt.UTC)
    return moment


def cmd_audit(config: Path, args: argparse.Namespace) -> int:
    from gateway import audit

    folder = _audit_folder(config)
    if args.action == "verify":
        count, broken = audit.verify(folder)
        if broken is not None:
            print(f"BROKEN after {count} good record(s): {broken}")
            raise Failure("the audit trail was altered; keep a copy of it and investigate")
        print(f"OK: {count} record(s), chain intact ({folder})")
        return 0
    if not (args.message_id or args.queue_id or args.address or args.since or args.until):
        raise Failure("say what to look for: --message-id, --queue-id, --address, --since, --until")
    records = list(audit.search(
        folder, message_id=args.message_id, queue_id=args.queue_id, address=args.address,
        since=_aware(args.since), until=_aware(args.until),
    ))
    for record in records:
        record = {
            k: v for k, v in record.items() if not k.startswith("_") and k not in ("prev", "hash")
        }
        if args.json:
            print(json.dumps(record, sort_keys=True))
            continue
        time_text, event = record.pop("time", "?"), record.pop("event", "?")
        details = " ".join(f"{k}={v}" for k, v in sorted(record.items()))
        print(f"{time_text}  {event:<10} {details}")
    if not records:
        raise Failure("no audit record matches; check the identifier or widen --since/--until")
    return 0


def _configure_logging(fmt: str, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if fmt == "json":
        class JsonFormatter(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                return json.dumps({
                    "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
                    "level": record.levelname.lower(),
                    "logger": record.name,
                    "message": record.getMessage(),
                })
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter


def cmd_check(config: Path) -> int:
    from gateway.check import run_check

    report = run_check(config, dt.datetime.now(dt.UTC))
    for problem in report.problems:
        print(problem)
    if not report.ok:
        errors = sum(1 for p in report.problems if p.severity == "error")
        raise Failure(f"{config}: {errors} error(s) above; fix them and run gateway check again")
    print(report.summary())
    return 0


def cmd_serve(config: Path) -> int:
    from gateway.runtime import ConfigurationRefused
    from gateway.server import serve

    try:
        asyncio.run(serve(config))
    except ConfigurationRefused as error:
        print(error, file=sys.stderr)
        raise Failure(f"{config} has errors; run gateway check -c {config} and fix them") from None
    return 0


def _spool(config: Path) -> tuple[object, Path]:
    from gateway.config import ConfigError, load
    from gateway.spool import Spool

    try:
        settings = load(config)
    except ConfigError as error:
        raise Failure(f"{config} has errors ({error}); run gateway check") from None
    except OSError as error:
        raise Failure(f"cannot read {config}: {error.strerror}") from None
    key = None
    if settings.gateway.spool.encryption_key is not None:
        key = settings.gateway.spool.encryption_key.read_bytes()
    return Spool(settings.gateway.spool.path, key), settings.gateway.spool.path


def _when(timestamp: float) -> str:
    if not timestamp:
        return "now"
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def cmd_queue(config: Path, action: str, queue_id: str | None) -> int:
    from gateway.qmgr import request_attention
    from gateway.spool import Spool

    spool, root = _spool(config)
    assert isinstance(spool, Spool)
    if action == "list":
        count = 0
        for entry in spool.entries():
            count += 1
            env = entry.envelope
            if env is None:
                print(f"{entry.queue_id}  {entry.location:9}  (unreadable)")
                continue
            states = entry.state.recipients if entry.state else ()
            pending = [r for r in states if not r.status.final]
            arrival = _when(env.received_at)
            print(f"{entry.queue_id}  {entry.location:9}  {arrival}  {env.size:>9}  "
                  f"<{env.sender}>  {len(pending)}/{len(env.recipients)} pending")
        print(f"{count} message(s)")
        return 0
    assert queue_id is not None
    location = spool.locate(queue_id)
    if location is None:
        raise Failure(f"no message {queue_id} in the spool; see gateway queue list")
    if action == "show":
        for entry in spool.entries():
            if entry.queue_id != queue_id:
                continue
            env = entry.envelope
            print(f"queue id:   {queue_id} ({entry.location})")
            if env is not None:
                subject = env.peer.certificate_subject or "no certificate"
                print(f"received:   {_when(env.received_at)} from {env.peer.address}"
                      f" ({subject}) network {env.source_network}")
                print(f"sender:     <{env.sender}>   size {env.size}   message-id {env.message_id}")
            for r in entry.state.recipients if entry.state else ():
                print(f"  <{r.address}>  {r.status.value}  attempts={r.attempts}  "
                      f"next={_when(r.next_attempt) if not r.status.final else '-'}  "
                      f"last={r.last_reply or '-'}")
            return 0
        raise Failure(f"message {queue_id} vanished while reading; run the command again")
    if action == "retry":
        state = spool.read_state(queue_id)
        for r in state.recipients:
            if not r.status.final:
                state = state.update(r.address, next_attempt=0.0)
        spool.write_state(queue_id, state)
        request_attention(root, queue_id)
        print(f"{queue_id}: will be tried now")
    elif action == "hold":
        spool.hold(queue_id)
        print(f"{queue_id}: held")
    elif action == "release":
        spool.release(queue_id)
        request_attention(root, queue_id)
        print(f"{queue_id}: released")
    elif action == "delete":
        spool.delete(queue_id)
        print(f"{queue_id}: deleted")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, rest = split_config(sys.argv[1:] if argv is None else argv)
        args = parser().parse_args(rest)
        _configure_logging(args.log_format, args.verbose)
        if args.command == "check":
            return cmd_check(config)
        if args.command == "serve":
            return cmd_serve(config)
        if args.command == "queue":
            return cmd_queue(config, args.action, getattr(args, "queue_id", None))
        if args.command == "audit":
            return cmd_audit(config, args)
        raise Failure(f"unknown command {args.command}; see gateway --help")
    except Failure as failure:
        print(f"gateway: {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
