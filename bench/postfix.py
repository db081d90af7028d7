"""Postfix as the plain route's baseline: a private instance in a scratch directory (see
../shared/notes/postfix-baseline.md), default durability, relaying everything from
127.0.0.0/8 to the benchmark's sink."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

MAIN_CF = Path("/etc/postfix/main.cf")
# One fixed place, so that the line naming it in the default main.cf is added once, not per run.
DIRECTORY = Path("/var/tmp/passerelle-bench-postfix")


def available() -> bool:
    return shutil.which("postfix") is not None and MAIN_CF.exists()


def _postfix(directory: Path, *args: str) -> None:
    subprocess.run(["postfix", "-c", str(directory / "etc"), *args], check=True,
                   capture_output=True, timeout=60)


def _name_config_directory(etc: Path) -> None:
    """A non-default config directory must be named in the default main.cf. Merge it into the
    value Postfix reads (an appended second assignment would hide every earlier one, such as
    the test suite's own instance)."""
    named = subprocess.run(["postconf", "-c", str(MAIN_CF.parent), "-h",
                            "alternate_config_directories"], capture_output=True, check=True,
                           timeout=60).stdout.decode().replace(",", " ").split()
    if str(etc) not in named:
        setting = "alternate_config_directories = " + " ".join([*named, str(etc)])
        subprocess.run(["postconf", "-c", str(MAIN_CF.parent), "-e", setting],
                       capture_output=True, check=True, timeout=60)


def start(directory: Path, port: int, sink_port: int) -> None:
    stop(directory)  # a previous run that was interrupted
    shutil.rmtree(directory, ignore_errors=True)
    etc = directory / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (directory / "spool").mkdir()
    (directory / "data").mkdir()
    shutil.chown(directory / "data", "postfix")
    _name_config_directory(etc)
    (etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {directory}/spool
data_directory = {directory}/data
maillog_file = {directory}/maillog
maillog_file_prefixes = {directory}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.bench
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
message_size_limit = 67108864
default_destination_concurrency_limit = 20
# One transaction per message at the sink, as the gateway sends it (the default of 50 would
# split the 100-recipient cells in two and the sink would count each message twice).
default_destination_recipient_limit = 1000
""")
    lines = []
    for raw in Path("/etc/postfix/master.cf").read_text().splitlines():
        fields = raw.split()
        if raw and not raw[0].isspace() and not raw.startswith("#") and len(fields) >= 8:
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = str(port)
            fields[4] = "n"  # no chroot: the scratch queue lives outside /var/spool/postfix
            raw = "  ".join(fields)
        lines.append(raw)
    (etc / "master.cf").write_text("\n".join(lines) + "\n")
    _postfix(directory, "check")
    _postfix(directory, "start")
    for _ in range(100):
        try:
            import socket
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"postfix did not listen; see {directory}/maillog")


def relay_to(directory: Path, sink_port: int) -> None:
    """Point the running instance at another next hop (the latency cells' sink), then reload;
    its delivery agents pick the change up as they restart."""
    _postfix_tool("postconf", directory, "-e", f"relayhost = [127.0.0.1]:{sink_port}")
    _postfix(directory, "reload")
    time.sleep(2)


def _postfix_tool(tool: str, directory: Path, *args: str) -> None:
    subprocess.run([tool, "-c", str(directory / "etc"), *args], check=True,
                   capture_output=True, timeout=60)


def queued(directory: Path) -> int:
    """Messages still in Postfix's queue (files in its queue folders)."""
    spool = directory / "spool"
    return sum(1 for name in ("maildrop", "incoming", "active", "deferred")
               for path in (spool / name).rglob("*") if path.is_file())


def stop(directory: Path) -> None:
    if not (directory / "etc" / "main.cf").exists():
        return
    subprocess.run(["postfix", "-c", str(directory / "etc"), "stop"], capture_output=True,
                   timeout=60, check=False)
