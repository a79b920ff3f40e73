"""Target choice: pure functions over hosts, instances and migrations in flight."""
from __future__ import annotations

from ferry.model import Host, HostState, Instance, InstanceSpec, InstanceState, Migration, NoCapacity


def memory_in_use(hosts: list[Host], instances: list[Instance], migrations: list[Migration]) -> dict[str, int]:
    """MiB taken on each host: its VMs, plus the reservation of every migration heading there."""
    by_name = {i.name: i for i in instances}
    used = {h.name: 0 for h in hosts}
    for inst in instances:
        if inst.host in used and inst.state is not InstanceState.STOPPED:
            used[inst.host] += inst.spec.memory_mib
    for m in migrations:
        if not m.done and m.target in used and m.vm in by_name:
            used[m.target] += by_name[m.vm].spec.memory_mib
    return used


def free_memory(host: Host, used: dict[str, int]) -> int:
    return host.memory_mib - used.get(host.name, 0)


def check_fits(spec: InstanceSpec, host: Host, used: dict[str, int], vm_name: str) -> None:
    if host.state != HostState.ACTIVE:
        raise NoCapacity(f"host {host.name} is {host.state.value} and accepts no VMs")
    free = free_memory(host, used)
    if spec.memory_mib > free:
        raise NoCapacity(
            f"host {host.name} has {free} MiB free of {host.memory_mib} MiB; {vm_name} needs {spec.memory_mib} MiB")
    if spec.vcpus > host.vcpus:
        raise NoCapacity(f"host {host.name} has {host.vcpus} vCPUs; {vm_name} needs {spec.vcpus}")


def choose_host(spec: InstanceSpec, hosts: list[Host], used: dict[str, int], vm_name: str,
                exclude: frozenset[str] = frozenset()) -> Host:
    """The eligible host with the most free memory (spreads load); ties by name."""
    candidates = []
    reasons = []
    for host in hosts:
        if host.name in exclude:
            continue
        try:
            check_fits(spec, host, used, vm_name)
        except NoCapacity as exc:
            reasons.append(str(exc))
            continue
        candidates.append(host)
    if not candidates:
        detail = "; ".join(reasons) if reasons else "no hosts registered"
        raise NoCapacity(f"no host can take {vm_name} ({spec.memory_mib} MiB, {spec.vcpus} vCPU): {detail}")
    return max(candidates, key=lambda h: (free_memory(h, used), [-ord(c) for c in h.name]))
