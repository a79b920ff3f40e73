"""Small builders of fleet data for the tests of pure decisions."""
from ferry.model import (EventSource, Host, HostProgress, HostState, Instance, InstanceSpec, InstanceState,
                         MaintenanceEvent, Migration, Urgency, Workload)


def host(name, memory=4096, rack="r1", zone="z1", group="blue", state=HostState.ACTIVE, versions=None, vcpus=4):
    return Host(name=name, agent_url=f"unix:/{name}", underlay_ip="10.0.0.1", memory_mib=memory, vcpus=vcpus,
                state=state, labels={"rack": rack, "zone": zone, "group": group},
                inventory={"versions": versions or {"bios": "1.0", "hypervisor": "7.2.22"}})


def vm(name, on, memory=512, state=InstanceState.RUNNING, policy="migrate"):
    return Instance(name=name, spec=InstanceSpec(memory, 1, Workload(), policy), ip="10.200.0.10",
                    mac="52:54:00:00:00:01", host=on, state=state)


def event(eid, hosts, urgency=Urgency.PLANNED, created=0.0, progress=None, notices=None, not_before=0.0):
    return MaintenanceEvent(id=eid, source=EventSource.OPERATOR, hosts=hosts, reason="test", urgency=urgency,
                            created_at=created, not_before=not_before,
                            progress=progress or {h: HostProgress.WAITING.value for h in hosts},
                            notices=notices or {})


def migration(vm_name, source, target, done=False):
    m = Migration(id=f"m-{vm_name}", vm=vm_name, source=source, target=target)
    if done:
        from ferry.model import Phase
        m.enter(Phase.COMPLETED, 1.0)
    return m
