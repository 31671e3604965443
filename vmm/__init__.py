"""iommu-lab: a userspace hypervisor harness for IOMMU device models.

``vmm.Machine.from_board("rcar-virt")`` builds the default board; ``m.run(image)`` boots a PVH
payload on KVM or the emulated CPU, ``m.replay(trace)`` replays a qtest-language trace with no
CPU, and ``m.mmio_read``/``m.mmio_write``/``m.dma`` drive devices directly from tests.
"""
from vmm.machine import Machine

__all__ = ["Machine"]
