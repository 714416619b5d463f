"""Driving a QEMU VM's live migration: migrator moves the guest RAM, QEMU the device state.

    qmp.py          a small QMP client (unix socket): commands, events
    source.py       guest RAM discovery, QMP pauser, device-state migration, migrate_vm()
    destination.py  the destination QEMU on the received image (-incoming defer)
    handoff.py      receiver hooks that start and resume the destination QEMU
    testguest.py    the project's boot-sector test guest and its RAM pattern check
    vm.py           starting a source VM (tests, bench, demos)
"""

from .destination import DestinationConfig as DestinationConfig
from .destination import DestinationVM as DestinationVM
from .handoff import DestinationHandoff as DestinationHandoff
from .qmp import QMP as QMP
from .qmp import QmpError as QmpError
from .qmp import QmpEvent as QmpEvent
from .source import GuestRam as GuestRam
from .source import QemuMigrationReport as QemuMigrationReport
from .source import QmpPauser as QmpPauser
from .source import find_guest_ram as find_guest_ram
from .source import migrate_vm as migrate_vm
from .source import DeviceStateMigration as DeviceStateMigration
from .testguest import GuestLayout as GuestLayout
from .testguest import boot_sector as boot_sector
from .testguest import check_pattern as check_pattern
from .vm import SourceVM as SourceVM
from .vm import qemu_available as qemu_available

__all__ = ["QMP", "QmpError", "QmpEvent", "GuestRam", "QmpPauser", "QemuMigrationReport",
           "find_guest_ram", "migrate_vm", "DeviceStateMigration", "DestinationConfig", "DestinationVM",
           "DestinationHandoff", "GuestLayout", "boot_sector", "check_pattern", "SourceVM",
           "qemu_available"]
