"""The fleet manifest: desired software versions per host group (TOML). Pure.

    [groups.blue]
    bios = "2.7"
    hypervisor = "7.2.22"

A host belongs to the group named by its `group` label. Every group needs
`bios` and `hypervisor`; `firmware` and `kernel` are optional. Anything else,
a group no host belongs to, or a syntax error makes the whole manifest
invalid: the last valid one stays in force, so a typo never drains a host.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass

from ferry.model import Host, InvalidInput

REQUIRED = ("bios", "hypervisor")
OPTIONAL = ("firmware", "kernel")


class ManifestError(InvalidInput):
    pass


@dataclass(frozen=True)
class Manifest:
    groups: dict[str, dict[str, str]]

    def desired_for(self, host: Host) -> dict[str, str] | None:
        return self.groups.get(host.labels.get("group", ""))


def parse_manifest(text: str, known_groups: set[str]) -> Manifest:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"manifest syntax error: {exc}") from None
    extra = set(doc) - {"groups"}
    if extra:
        raise ManifestError(f"manifest has unknown top-level keys: {', '.join(sorted(extra))} (expected [groups.NAME])")
    groups = doc.get("groups")
    if not isinstance(groups, dict) or not groups:
        raise ManifestError("manifest defines no [groups.NAME] tables")
    out: dict[str, dict[str, str]] = {}
    for name, fields in groups.items():
        if not isinstance(fields, dict):
            raise ManifestError(f"manifest group {name!r} must be a table")
        if known_groups and name not in known_groups:
            raise ManifestError(f"manifest names unknown group {name!r} (the fleet has: {', '.join(sorted(known_groups))})")
        missing = [f for f in REQUIRED if f not in fields]
        if missing:
            raise ManifestError(f"manifest group {name!r} is missing field(s): {', '.join(missing)}")
        unknown = set(fields) - set(REQUIRED) - set(OPTIONAL)
        if unknown:
            raise ManifestError(f"manifest group {name!r} has unknown field(s): {', '.join(sorted(unknown))}")
        bad = [k for k, v in fields.items() if not isinstance(v, str) or not v.strip()]
        if bad:
            raise ManifestError(f"manifest group {name!r}: {', '.join(bad)} must be non-empty strings")
        out[name] = {k: v.strip() for k, v in fields.items()}
    return Manifest(out)


def outdated_hosts(manifest: Manifest, hosts: list[Host]) -> dict[str, dict[str, str]]:
    """Hosts whose reported versions differ from their group's desired ones -> those desired versions."""
    result = {}
    for host in hosts:
        desired = manifest.desired_for(host)
        if desired is None:
            continue
        reported = (host.inventory or {}).get("versions", {})
        if any(reported.get(k) != v for k, v in desired.items()):
            result[host.name] = desired
    return result


def up_to_date(manifest: Manifest | None, host: Host) -> bool:
    if manifest is None:
        return True
    desired = manifest.desired_for(host)
    reported = (host.inventory or {}).get("versions", {})
    return desired is None or all(reported.get(k) == v for k, v in desired.items())
