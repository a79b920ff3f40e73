"""The domain of ferry: hosts, instances, migrations and their phases.

Plain dataclasses and enums; no I/O and no imports from the rest of ferry.
"""
from ferry.model.errors import FerryError, NotFound, Conflict, InvalidInput, NoCapacity
from ferry.model.workload import Workload, parse_workload
from ferry.model.host import Host, HostState
from ferry.model.instance import Instance, InstanceSpec, InstanceState, validate_name
from ferry.model.migration import Migration, MigrationStats, Phase, TERMINAL_PHASES
from ferry.model.maintenance import (EventSource, EventState, HostProgress, MaintenanceEvent, Urgency,
                                     OPEN_STATES)

__all__ = [
    "FerryError", "NotFound", "Conflict", "InvalidInput", "NoCapacity",
    "Workload", "parse_workload",
    "Host", "HostState",
    "Instance", "InstanceSpec", "InstanceState", "validate_name",
    "Migration", "MigrationStats", "Phase", "TERMINAL_PHASES",
    "EventSource", "EventState", "HostProgress", "MaintenanceEvent", "Urgency", "OPEN_STATES",
]
