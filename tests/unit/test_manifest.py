import pytest

from ferry.controller.manifest import ManifestError, outdated_hosts, parse_manifest, up_to_date
from tests.unit.fleet import host

GOOD = """
[groups.blue]
bios = "2.7"
hypervisor = "7.2.22"

[groups.green]
bios = "1.0"
hypervisor = "7.2.22"
"""


def test_outdated_hosts_are_exactly_those_whose_versions_differ():
    m = parse_manifest(GOOD, {"blue", "green"})
    hosts = [host("a", group="blue"), host("b", group="blue", versions={"bios": "2.7", "hypervisor": "7.2.22"}),
             host("c", group="green"), host("d", group="other")]
    assert outdated_hosts(m, hosts) == {"a": {"bios": "2.7", "hypervisor": "7.2.22"}}
    assert not up_to_date(m, hosts[0]) and up_to_date(m, hosts[1]) and up_to_date(m, hosts[3])


@pytest.mark.parametrize("text, words", [
    ("[groups.blue\nbios=1", "syntax error"),
    ('[groups.purple]\nbios = "1"\nhypervisor = "2"', "unknown group 'purple'"),
    ('[groups.blue]\nbios = "1"', "missing field(s): hypervisor"),
    ('[groups.blue]\nbios = "1"\nhypervisor = "2"\ncolour = "red"', "unknown field(s): colour"),
    ('[groups.blue]\nbios = 2\nhypervisor = "2"', "must be non-empty strings"),
    ('title = "x"', "unknown top-level keys"),
    ("", "no [groups.NAME]"),
])
def test_invalid_manifests_are_refused_with_a_reason(text, words):
    with pytest.raises(ManifestError) as exc:
        parse_manifest(text, {"blue", "green"})
    assert words in str(exc.value)
