"""The machine's map, as QEMU's ``info mtree`` shows one: the address map (RAM, every device window,
IRQs) and the DMA topology (each master, its IOMMU, uTLB or endpoint, domain and DMA width), with the
unprotected masters marked. ``vmm info --board B`` prints it; ``--json`` gives tools the same data.
"""
from __future__ import annotations

from typing import Any

from vmm.machine import Machine


def machine_map(m: Machine) -> dict[str, Any]:
    """The map of a built machine, as data."""
    ram = []
    for name, dom in m.domains.items():
        for gpa, size in dom.ram_ranges:
            ram.append({"domain": name, "gpa": gpa, "size": size, "direct": dom.direct})
    specs = {d["name"]: d for d in m.board.devices}
    windows = []
    for base, size, name in m.mmio.ranges():
        spec = specs.get(name, {})
        entry = {"name": name, "base": base, "size": size, "type": spec.get("type", "?")}
        if spec.get("irq") is not None:
            entry["irq"] = spec["irq"]
        if spec.get("backend"):
            entry["backend"] = spec["backend"]
        windows.append(entry)
    ports = [{"name": name, "port": base, "size": size} for base, size, name in m.pio.ranges()]
    masters = []
    for spec in m.masters:
        iommu = spec.get("iommu")
        entry = {"name": spec["name"], "type": spec["type"], "domain": spec.get("domain", "dom0"),
                 "iommu": iommu, "master": spec.get("master", 0)}
        if "dma_bits" in spec:
            entry["dma_bits"] = spec["dma_bits"]
        if iommu is None:
            entry["unprotected"] = m.board.unprotected
        else:
            kind = specs.get(iommu, {}).get("type")
            entry["via"] = "uTLB" if kind == "ipmmu" else "endpoint" if kind == "virtio-mmio" else "port"
        masters.append(entry)
    return {"board": m.board.name, "p2m": m.board.p2m, "isolation": m.board.isolation,
            "unprotected_policy": m.board.unprotected, "ram": ram, "mmio": windows, "pio": ports,
            "masters": masters}


def format_map(info: dict[str, Any]) -> str:
    out = [f"board {info['board']} (p2m {info['p2m']}, unprotected masters: {info['unprotected_policy']}, "
           f"isolation watchdog: {info['isolation']})", "", "address-space: guest-physical"]
    rows = [(r["gpa"], r["size"], f"ram ({r['domain']}{', direct-mapped' if r['direct'] else ''})")
            for r in info["ram"] if r["domain"] == "dom0"]
    for w in info["mmio"]:
        what = w["type"] + (f" [{w['backend']}]" if w.get("backend") else "")
        if "irq" in w:
            what += f", irq {w['irq']}"
        rows.append((w["base"], w["size"], f"{w['name']}: {what}"))
    for base, size, what in sorted(rows):
        out.append(f"  {base:016x}-{base + size - 1:016x} {what}")
    others = [r for r in info["ram"] if r["domain"] != "dom0"]
    for r in others:
        out.append(f"  domain {r['domain']}: ram {r['gpa']:016x}-{r['gpa'] + r['size'] - 1:016x} (no CPU)")
    out += ["", "address-space: I/O ports"]
    for p in info["pio"]:
        out.append(f"  {p['port']:04x}-{p['port'] + p['size'] - 1:04x} {p['name']}")
    out += ["", "dma topology"]
    for mst in info["masters"]:
        width = f", {mst['dma_bits']}-bit" if "dma_bits" in mst else ""
        if mst["iommu"] is None:
            how = f"behind no IOMMU ({mst['unprotected']})  <-- UNPROTECTED"
        else:
            how = f"-> {mst['iommu']} {mst['via']} {mst['master']}"
        out.append(f"  {mst['name']:8} ({mst['type']}, domain {mst['domain']}{width}) {how}")
    return "\n".join(out)
