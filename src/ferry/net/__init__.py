"""ferry.net: lab namespaces, the routed fabric, and the host side of VM links.

Modules: ``addressing`` (pure address plan), ``lab`` (LabNetwork), ``vmnet``
(VM taps), ``fabric`` (Fabric, LabFabric, NullFabric), ``ipcmd`` (iproute2
subprocess layer), ``errors``.
"""
