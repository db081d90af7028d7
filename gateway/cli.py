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
    commands.add_parser("reload", help="check routing.yaml, then make the running server apply it")
    explain = commands.add_parser(
        "explain", help="which networks, policy and keys a message would get (sends nothing)")
    explain.add_argument("--from", dest="sender", required=True, help="envelope sender")
    explain.add_argument("--to", dest="recipients", action="append", required=True,
                         help="recipient (repeat for several)")
    explain.add_argument("--peer-address", default="127.0.0.1", help="the sending peer's IP")
    explain.add_argument("--peer-certificate", type=Path,
                         help="PEM file of the certificate the peer would present")
    commands.add_parser("demo", help="the gateway between simulated networks, on loopback")
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
    keys = commands.add_parser("keys", help="list, generate or import keys and certificates")
    key_actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    key_actions.add_parser("list", help="identities and directory entries, with expiry")
    generate = key_actions.add_parser("generate", help="a new key pair")
    generate.add_argument("kind", choices=["x509", "openpgp"])
    generate.add_argument("--out", type=Path, required=True,
                          help="path without extension, e.g. pki/medecin")
    generate.add_argument("--subject",
                          help="X.509: the subject DN, e.g. 'CN=Passerelle,O=CHU,C=FR'")
    generate.add_argument("--email", action="append", default=[], help="X.509: mail address")
    generate.add_argument("--dns", action="append", default=[], help="X.509: host name")
    generate.add_argument("--csr", action="store_true", help="X.509: a CSR instead of self-signed")
    generate.add_argument("--rsa", action="store_true", help="X.509: RSA-3072 instead of P-256")
    generate.add_argument("--days", type=int, default=365, help="X.509: validity of self-signed")
    generate.add_argument("--uid", help='OpenPGP: user ID, e.g. "Passerelle <gw@example.org>"')
    imported = key_actions.add_parser("import", help="add a correspondent's certificate or key")
    imported.add_argument("file", type=Path)
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
    listing = commands.add_parser("whitelist", help="who may send for a domain (MSSanté list)")
    listing_actions = listing.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing_actions.add_parser("show", help="operator certificates listed for DOMAIN").add_argument(
        "domain")
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


def cmd_whitelist(config: Path, domain: str) -> int:
    """`gateway whitelist show DOMAIN`: the operator certificates the MSSanté list names."""
    from gateway.config import ConfigError, load
    from gateway.whitelist import (
        WhitelistError,
        load_whitelist,
        normalise_domain,
        verify_checksum,
    )

    try:
        settings = load(config)
    except ConfigError as error:
        raise Failure(f"{config} has errors ({error}); run gateway check") from None
    except OSError as error:
        raise Failure(f"cannot read {config}: {error.strerror}") from None
    path = settings.trust.mssante_whitelist
    if path is None:
        raise Failure(f"{config} names no MSSanté list; add trust.mssante_whitelist: "
                      "data/listeblanchemssante.xml")
    try:
        whitelist = load_whitelist(path)
    except WhitelistError as error:
        raise Failure(f"{path}: {error}; download it again from "
                      "https://espacedeconfiance.mssante.fr/listeblanchemssante.xml") from None
    normalised = normalise_domain(domain)
    if normalised is None:
        raise Failure(f"{domain!r} is not a domain name")
    checksum = verify_checksum(path, whitelist)
    print(f"list:      {path} (generated {whitelist.generated or 'at an unknown date'}, "
          f"{len(whitelist)} entries; checksum: {checksum.message})")
    network = settings.network_for_domain(normalised)
    if network is None:
        print(f"network:   none in {config} claims {normalised}")
    else:
        uses = "checks the list" if network.peers.whitelist else "does not check the list"
        print(f"network:   {network.name} ({uses})")
    entries = whitelist.show(normalised)
    if not entries:
        raise Failure(f"{normalised} is not in the MSSanté list: no operator may send for it "
                      "through a peers: {whitelist: mssante} network")
    def shown(text: object) -> str:  # the list is downloaded: no control characters to a tty
        return "".join(c if c.isprintable() else "?" for c in str(text))

    for entry in entries:
        print(f"operator:  {shown(entry.operator)}")
        if entry.description:
            print(f"           {shown(entry.description)}")
        if entry.updated:
            print(f"           updated {shown(entry.updated)}")
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


def cmd_explain(config: Path, args: argparse.Namespace) -> int:
    from cryptography import x509

    from gateway.explain import explain
    from gateway.runtime import ConfigurationRefused, Runtime

    try:
        runtime = Runtime.load(config)
    except ConfigurationRefused as error:
        print(error, file=sys.stderr)
        raise Failure(f"{config} has errors; run gateway check -c {config} and fix them") from None
    certificate = None
    if args.peer_certificate is not None:
        try:
            certificate = x509.load_pem_x509_certificate(args.peer_certificate.read_bytes())
        except (OSError, ValueError) as error:
            raise Failure(
                f"cannot read {args.peer_certificate} as a PEM certificate: {error}"
            ) from None
    result = explain(runtime, args.sender, args.recipients, args.peer_address, certificate)
    print(result)
    return 0


def cmd_keys(config: Path, args: argparse.Namespace) -> int:
    from gateway import keys
    from gateway.config import ConfigError, load

    now = dt.datetime.now(dt.UTC)
    try:
        if args.action == "generate":
            if args.kind == "x509":
                if not args.subject:
                    raise Failure("--subject is needed, e.g. --subject 'CN=Passerelle,O=CHU,C=FR'")
                written = keys.generate_x509(args.out, args.subject, args.email, args.dns,
                                             csr=args.csr, rsa_key=args.rsa, days=args.days,
                                             now=now)
            else:
                if not args.uid:
                    raise Failure('--uid is needed, e.g. --uid "Passerelle <gw@example.org>"')
                written = keys.generate_openpgp(args.out, args.uid, now)
            for path in written:
                print(f"wrote {path}")
            return 0
        try:
            settings = load(config)
        except ConfigError as error:
            raise Failure(f"{config} has errors ({error}); run gateway check") from None
        if args.action == "import":
            if not settings.directory:
                raise Failure("routing.yaml has no directory: folder to import into; add one")
            target, lines = keys.import_key(args.file, settings.directory[0], now)
            for line in lines:
                print(line)
            print(f"imported as {target}; run gateway reload to use it")
            return 0
        from gateway.pki import KeyMaterialError, load_keyring

        try:
            keyring = load_keyring(settings, now)
        except KeyMaterialError as error:
            raise Failure(f"key material has errors ({error}); run gateway check") from None
        for line in keys.list_keys(keyring, now):
            print(line)
        return 0
    except keys.KeyCommandError as error:
        raise Failure(str(error)) from None


def cmd_reload(config: Path) -> int:
    """Check first, so a broken file is reported here rather than only in the server's log."""
    import os
    import signal

    cmd_check(config)
    _spool_object, root = _spool(config)
    pidfile = root / "passerelle.pid"
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        raise Failure(
            f"no running gateway found ({pidfile}); start it with gateway serve"
        ) from None
    print(f"reload signalled to process {pid}")
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
        if location != "active" and location != "deferred":
            hint = "gateway queue release" if location == "hold" else "gateway queue show"
            raise Failure(f"{queue_id} is in {location}, not waiting for delivery; see {hint}")
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
        if args.command == "keys":
            return cmd_keys(config, args)
        if args.command == "explain":
            return cmd_explain(config, args)
        if args.command == "reload":
            return cmd_reload(config)
        if args.command == "serve":
            return cmd_serve(config)
        if args.command == "queue":
            return cmd_queue(config, args.action, getattr(args, "queue_id", None))
        if args.command == "audit":
            return cmd_audit(config, args)
        if args.command == "whitelist":
            return cmd_whitelist(config, args.domain)
        if args.command == "demo":
            from gateway.demo import run_demo

            return run_demo(config)
        raise Failure(f"unknown command {args.command}; see gateway --help")
    except Failure as failure:
        print(f"gateway: {failure}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
