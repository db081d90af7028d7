"""The operator guide documents every key, option, reason, metric and command the code knows.

The lists are read from the code itself (the keys each `routing.yaml` section accepts, the
adapters' option names, the closed list of failure reasons, the metric names, the CLI), so a
new key cannot land without its line in docs/operator-guide.md.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from adapters.apicrypt import _KNOWN as APICRYPT_OPTIONS
from adapters.smime import _CHOICES as SMIME_OPTIONS
from gateway.cli import parser
from gateway.errors import Reason
from gateway.events import Metrics

ROOT = Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "docs" / "operator-guide.md").read_text()
_FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
# Code spans outside the fenced blocks, and the fenced blocks themselves.
DOCUMENTED = set(re.findall(r"`([^`\n]+)`", _FENCED.sub("", GUIDE))) | set(_FENCED.findall(GUIDE))


def words_in_code_spans() -> set[str]:
    """Every word that appears inside a `code span` of the guide (keys may share a span)."""
    found: set[str] = set()
    for span in DOCUMENTED:
        found.update(re.findall(r"[A-Za-z_][A-Za-z0-9_.-]*", span))
    return found


def config_keys() -> set[str]:
    """Key names routing.yaml accepts: the tuples given to the config reader's `mapping`."""
    tree = ast.parse((ROOT / "gateway" / "config.py").read_text())
    keys: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            if any(n in ("_TOP", "_GATEWAY", "_NETWORK") for n in names):
                keys.update(e.value for e in node.value.elts if isinstance(e, ast.Constant))
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "mapping" and len(node.args) >= 3
                and isinstance(node.args[2], ast.Tuple)):
            keys.update(e.value for e in node.args[2].elts if isinstance(e, ast.Constant))
    keys.discard("name")  # a network's name is the mapping key, not a field operators write
    return {k for k in keys if isinstance(k, str)}


def test_every_routing_yaml_key_is_documented() -> None:
    words = words_in_code_spans()
    missing = sorted(k for k in config_keys() if k not in words)
    assert not missing, f"routing.yaml keys missing from the operator guide: {missing}"


def test_every_adapter_option_is_documented() -> None:
    words = words_in_code_spans()
    options = set(SMIME_OPTIONS) | set(APICRYPT_OPTIONS) | {"x_mss_nil"}
    for values in SMIME_OPTIONS.values():
        options.update(values)
    missing = sorted(o for o in options if o not in words)
    assert not missing, f"adapter options missing from the operator guide: {missing}"


def test_every_failure_reason_has_a_troubleshooting_line() -> None:
    table = GUIDE[GUIDE.index("## 5."):GUIDE.index("## 6.")]
    missing = [r.value for r in Reason if f"| `{r.value}` |" not in table]
    assert not missing, f"reasons without a line in §5: {missing}"


def test_every_metric_is_documented() -> None:
    names = set()
    for collector in Metrics().registry.collect():
        kind = collector.type
        names.add(collector.name + ("_total" if kind == "counter" else ""))
    missing = sorted(n for n in names if n not in GUIDE)
    assert not missing, f"metrics missing from the operator guide: {missing}"


def test_every_command_is_documented() -> None:
    top = parser()
    commands = next(a for a in top._actions if a.dest == "command")
    missing = []
    for name, sub in commands.choices.items():  # type: ignore[attr-defined]
        if f"gateway {name}" not in GUIDE:
            missing.append(name)
        for action in sub._actions:
            if action.dest == "action":
                missing += [f"{name} {verb}" for verb in action.choices
                            if f"gateway {name} {verb}" not in GUIDE
                            and not re.search(rf"gateway {name} [a-z|]*\b{verb}\b", GUIDE)]
    assert not missing, f"commands missing from the operator guide: {missing}"
