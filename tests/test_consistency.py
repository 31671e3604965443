"""The C payloads and the models cannot drift: the guest headers agree with the board and the
register declarations.

The ``#define``s of ``guest_images/include/*.h`` are parsed and evaluated as C constant
expressions (function-like macros included: ``IMUCTR(u)``, ``DMA_ENGINE(n)``, ...) and compared
with what the models declare: addresses, IRQs and master IDs with the board TOML, window sizes
with the machine's bus, register offsets, field masks and reset values with the ``Reg``
declarations (devices/regs.py), and a few encodings with the model's own decoding. Every
register-related ``#define`` must have a counterpart here: a new one fails until it is checked.
The declarations themselves are checked against their ``construct`` layouts at import; the last
tests show that check fires too.
"""
from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path

import construct as cs
import pytest

from devices import dma_engine, hyp, ipmmu_regs, sysinfo, virtio_iommu, virtio_mmio, virtqueue
from devices.ipmmu import S1_START_LEVEL, S2_START_LEVEL
from devices.regs import RO, W0C, W1C, WO, Bank, LayoutError, Reg, RegisterFile, layout_fields
from vmm import Machine
from vmm import dma as vdma
from vmm.machine import ram_ranges

REPO = Path(__file__).resolve().parents[1]
INCLUDE = REPO / "guest_images" / "include"
HEADERS = ("board.h", "dma.h", "ipmmu.h", "virtio.h")
BOARD = REPO / "vmm" / "boards" / "rcar-virt.toml"

# Which #defines of a header are register/board facts that must be checked (the rest -- page
# table formats, virtqueue and virtio-iommu request encodings -- belong to other tests).
IN_SCOPE = {
    "board.h": re.compile(r".*"),
    "dma.h": re.compile(r".*"),
    "ipmmu.h": re.compile(r"IM|IPMMU_"),
    "virtio.h": re.compile(r"VIRTIO_(MMIO_|STATUS_|INT_|F_|IOMMU_F_|IOMMU_FEATURES_|IOMMU_CFG_)"),
}


# -- a C constant-expression evaluator for #defines ------------------------------------------------

DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)(\([^)]*\))?(.*)$", re.M)
TOKEN = re.compile(r"\s*(?:(0[xX][0-9a-fA-F]+|\d+)[uUlL]*"          # a number (suffixes dropped)
                   r"|([A-Za-z_]\w*)"                                  # an identifier
                   r"|(<<|>>|<=|>=|==|!=|&&|\|\||[-+*/%&|^~!?:(),<>]))")  # an operator
BINARY: dict[str, tuple[int, Callable[[int, int], int]]] = {
    "||": (1, lambda a, b: int(bool(a) or bool(b))), "&&": (2, lambda a, b: int(bool(a) and bool(b))),
    "|": (3, lambda a, b: a | b), "^": (4, lambda a, b: a ^ b), "&": (5, lambda a, b: a & b),
    "==": (6, lambda a, b: int(a == b)), "!=": (6, lambda a, b: int(a != b)),
    "<": (7, lambda a, b: int(a < b)), "<=": (7, lambda a, b: int(a <= b)),
    ">": (7, lambda a, b: int(a > b)), ">=": (7, lambda a, b: int(a >= b)),
    "<<": (8, lambda a, b: a << b), ">>": (8, lambda a, b: a >> b),
    "+": (9, lambda a, b: a + b), "-": (9, lambda a, b: a - b),
    "*": (10, lambda a, b: a * b), "/": (10, lambda a, b: a // b), "%": (10, lambda a, b: a % b),
}
CAST_BITS = {"uint8_t": 8, "uint16_t": 16, "uint32_t": 32, "uint64_t": 64, "unsigned": 32, "int": 32,
             "long": 64, "char": 8, "uintptr_t": 64}


class Macros:
    """The ``#define``s of some headers: ``value(name)`` and ``call(name, *args)`` evaluate them."""

    def __init__(self, texts: dict[str, str]) -> None:
        self.defs: dict[str, tuple[list[str] | None, str]] = {}
        self.names: dict[str, list[str]] = {}        # header -> its macro names, in order
        self.clashes: list[str] = []
        for header, text in texts.items():
            text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
            text = re.sub(r"//[^\n]*", "", text).replace("\\\n", " ")
            self.names[header] = []
            for m in DEFINE.finditer(text):
                name, params, body = m.group(1), m.group(2), m.group(3).strip()
                plist = [p.strip() for p in params[1:-1].split(",")] if params else None
                if name in self.defs and self.defs[name] != (plist, body):
                    self.clashes.append(f"{header}: {name} is defined differently in two headers")
                self.defs[name] = (plist, body)
                self.names[header].append(name)

    def value(self, name: str) -> int:
        params, body = self.defs[name]
        assert params is None, f"{name} is a function-like macro"
        return _Expr(self, body, {}).parse()

    def call(self, name: str, *args: int) -> int:
        params, body = self.defs[name]
        assert params is not None and len(params) == len(args), f"{name} takes {params}"
        return _Expr(self, body, dict(zip(params, args, strict=True))).parse()


class _Expr:
    """One expansion: a precedence-climbing parser that evaluates as it goes."""

    def __init__(self, macros: Macros, text: str, env: dict[str, int]) -> None:
        self.macros, self.env, self.text = macros, env, text
        self.toks: list[tuple[str, object]] = []
        pos = 0
        while pos < len(text.rstrip()):
            m = TOKEN.match(text, pos)
            if m is None or m.end() == pos:
                raise ValueError(f"cannot tokenize {text[pos:]!r} in {text!r}")
            num, ident, op = m.groups()
            if num is not None:
                base = 16 if num[:2].lower() == "0x" else 8 if len(num) > 1 and num[0] == "0" else 10
                self.toks.append(("num", int(num, base)))
            else:
                self.toks.append(("id", ident) if ident is not None else ("op", op))
            pos = m.end()
        self.i = 0

    def parse(self) -> int:
        v = self.expr()
        if self.i != len(self.toks):
            raise ValueError(f"trailing tokens in {self.text!r}")
        return v

    def peek(self, op: str) -> bool:
        return self.i < len(self.toks) and self.toks[self.i] == ("op", op)

    def take(self) -> tuple[str, object]:
        if self.i >= len(self.toks):
            raise ValueError(f"unexpected end of {self.text!r}")
        self.i += 1
        return self.toks[self.i - 1]

    def expect(self, op: str) -> None:
        if self.take() != ("op", op):
            raise ValueError(f"expected {op!r} in {self.text!r}")

    def expr(self) -> int:
        cond = self.binary(1)
        if self.peek("?"):
            self.take()
            a = self.expr()
            self.expect(":")
            b = self.expr()
            return a if cond else b
        return cond

    def binary(self, min_prec: int) -> int:
        left = self.unary()
        while self.i < len(self.toks) and self.toks[self.i][0] == "op" and self.toks[self.i][1] in BINARY:
            prec, fn = BINARY[self.toks[self.i][1]]
            if prec < min_prec:
                break
            self.take()
            left = fn(left, self.binary(prec + 1))
        return left

    def unary(self) -> int:
        for op, fn in (("-", lambda v: -v), ("+", lambda v: v), ("~", lambda v: ~v), ("!", lambda v: int(not v))):
            if self.peek(op):
                self.take()
                return fn(self.unary())
        return self.primary()

    def primary(self) -> int:
        kind, tok = self.take()
        if kind == "num":
            return tok
        if kind == "op" and tok == "(":
            words = []
            while self.i < len(self.toks) and self.toks[self.i][0] == "id" and self.toks[self.i][1] in CAST_BITS:
                words.append(self.take()[1])
            if words:                                  # a cast: keep the type's width
                self.expect(")")
                bits = max(CAST_BITS[w] for w in words)
                return self.unary() & ((1 << bits) - 1)
            v = self.expr()
            self.expect(")")
            return v
        if kind == "id":
            if tok in self.env:
                return self.env[tok]
            if tok not in self.macros.defs:
                raise ValueError(f"unknown identifier {tok} in {self.text!r}")
            if self.macros.defs[tok][0] is None:
                return self.macros.value(tok)
            self.expect("(")
            args = [self.expr()]
            while self.peek(","):
                self.take()
                args.append(self.expr())
            self.expect(")")
            return self.macros.call(tok, *args)
        raise ValueError(f"unexpected {tok!r} in {self.text!r}")


# -- what the models say --------------------------------------------------------------------------

def _board() -> dict:
    return tomllib.loads(BOARD.read_text())


def _devices(board: dict, kind: str) -> list[dict]:
    return sorted((d for d in board["device"] if d["type"] == kind), key=lambda d: d["base"])


def _snake(camel: str) -> str:
    """virtio register names as the spec's C headers spell them: QueueNumMax -> QUEUE_NUM_MAX."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", camel).upper()


def _field_masks(prefix: str, regs: Iterable[Reg]) -> dict[str, int]:
    """``<prefix><REG>_<FIELD>`` and ``..._MASK`` -> field mask, for every declared field."""
    out = {}
    for reg in regs:
        for f in reg.fields.values():
            out[f"{prefix}{reg.name}_{f.name}"] = out[f"{prefix}{reg.name}_{f.name}_MASK"] = f.mask
    return out


def expected_values(m: Machine) -> dict[str, tuple[int, str]]:
    """Every object-like #define the models have a value for: name -> (value, where it comes from)."""
    board = _board()
    by_name = {d["name"]: d for d in board["device"]}
    windows = {name: size for _, size, name in m.mmio.ranges()}
    exp: dict[str, tuple[int, str]] = {}

    def put(name: str, value: int, where: str) -> None:
        exp[name] = (value, where)

    low, high = ram_ranges(1 << 33)
    put("RAM_BASE", low[0], "vmm.machine.ram_ranges")
    put("RAM_LOW_LIMIT", low[0] + low[1], "vmm.machine.ram_ranges")
    put("RAM_HIGH_BASE", high[0], "vmm.machine.ram_ranges")

    si = _devices(board, "sysinfo")[0]
    put("SYSINFO_BASE", si["base"], "board sysinfo base")
    put("SYSINFO_SIZE", windows[si["name"]], "sysinfo bus window")
    for reg in sysinfo.LAYOUT:
        put(f"SYSINFO_{reg.name}", reg.offset, f"sysinfo {reg.name} offset")
    put("SYSINFO_MAGIC_VALUE", sysinfo.LAYOUT["MAGIC"].reset, "sysinfo MAGIC reset")
    put("SYSINFO_IPA_BITS_VALUE", m.mmio_read(si["base"] + sysinfo.LAYOUT.offset("IPA_BITS"), 4),
        "sysinfo IPA_BITS as the machine reads it")
    put("SYSINFO_F_DIRECT", sysinfo.FLAGS.DIRECT.mask, "sysinfo FLAGS.DIRECT")
    put("SYSINFO_F_NOT_DIRECT", sysinfo.FLAGS.NOT_DIRECT.mask, "sysinfo FLAGS.NOT_DIRECT")
    put("SYSINFO_F_SECURE", sysinfo.FLAGS.SECURE.mask, "sysinfo FLAGS.SECURE")

    hw = _devices(board, "hyp")[0]
    put("HYP_BASE", hw["base"], "board hyp base")
    put("HYP_SIZE", windows[hw["name"]], "hyp bus window")
    for reg in hyp.LAYOUT:
        put(f"HYP_{reg.name}", reg.offset, f"hyp {reg.name} offset")
    for name in ("SHARE", "UNSHARE", "TRANSLATE", "EXCHANGE"):
        put(f"HYP_CMD_{name}", getattr(hyp, f"CMD_{name}"), f"devices.hyp.CMD_{name}")
    for name in ("OK", "BAD_RANGE", "NOT_SECURE", "NO_MEMORY", "BAD_COMMAND"):
        put(f"HYP_STATUS_{name}", getattr(hyp, f"STATUS_{name}"), f"devices.hyp.STATUS_{name}")
    put("HYP_ADDR_BITS_DEFAULT", hyp.LAYOUT["ADDR_BITS"].reset, "hyp ADDR_BITS reset")

    slots = _devices(board, "virtio-mmio")
    put("VIRTIO_MMIO_BASE", slots[0]["base"], "board virtio0 base")
    put("VIRTIO_MMIO_STRIDE", virtio_mmio.SLOT_SIZE, "virtio_mmio.SLOT_SIZE")
    put("VIRTIO_MMIO_SLOTS", len(slots), "virtio-mmio entries on the board")
    put("VIRTIO_IOMMU_SLOT", next(i for i, d in enumerate(slots) if d.get("backend") == "virtio-iommu"),
        "the board's virtio-iommu slot")
    put("VIRTIO_ID_IOMMU", virtio_iommu.DEVICE_ID, "virtio_iommu.DEVICE_ID")

    engines = _devices(board, "dma")
    put("DMA_BASE", engines[0]["base"], "board dma0 base")
    put("DMA_STRIDE", engines[1]["base"] - engines[0]["base"], "board dma1 - dma0 base")
    put("DMA_COUNT", len(engines), "dma entries on the board")
    for reg in dma_engine.LAYOUT:
        put(f"DMA_{reg.name}", reg.offset, f"dma engine {reg.name} offset")
    for name, mask in _field_masks("DMA_", dma_engine.LAYOUT).items():
        put(name, mask, "dma engine field")
    put("DMA_ID_VALUE", dma_engine.LAYOUT["ID"].reset, "dma engine ID reset")
    put("DMA_LEN_MAX", dma_engine.MAX_LEN, "dma_engine.MAX_LEN")
    for c_name, status in (("OK", vdma.STATUS_OK), ("XLATE_FAULT", vdma.STATUS_TRANSLATION),
                           ("PERM_FAULT", vdma.STATUS_PERMISSION), ("BAD_LEN", vdma.STATUS_BAD_LENGTH),
                           ("REFUSED", vdma.STATUS_REFUSED), ("DMA_MASK", vdma.STATUS_DMA_MASK),
                           ("PRIVATE", vdma.STATUS_PRIVATE), ("ISOLATION", vdma.STATUS_ISOLATION)):
        put(f"DMA_STATUS_{c_name}", status, "vmm.dma STATUS_*")
    for n, d in enumerate(engines):
        iommu = by_name.get(d.get("iommu"), {})
        if iommu.get("type") == "ipmmu":
            put(f"DMA{n}_{d['iommu'].upper()}_UTLB", d["master"], f"board {d['name']} master behind {d['iommu']}")
        elif iommu.get("backend") == "virtio-iommu" and d["master"] in iommu.get("endpoints", []):
            put(f"DMA{n}_VIOMMU_ENDPOINT", d["master"], f"board {d['name']} endpoint on {d['iommu']}")

    ipmmus = _devices(board, "ipmmu")
    for d in ipmmus:
        put(f"{d['name'].upper()}_BASE", d["base"], f"board {d['name']} base")
    put("IPMMU_SIZE", ipmmu_regs.WINDOW, "ipmmu_regs.WINDOW")
    if {windows[d["name"]] for d in ipmmus} != {ipmmu_regs.WINDOW}:
        put("IPMMU_SIZE", -1, "the IPMMU bus windows differ from ipmmu_regs.WINDOW")
    roots = [d for d in ipmmus if d.get("role", "root") == "root"]
    caches = [d for d in ipmmus if d.get("role") == "cache"]
    if len({d["utlbs"] for d in caches}) == 1:
        put("IPMMU_NUM_UTLBS", caches[0]["utlbs"], "board cache utlbs")
    if len(roots) == 1:
        put("IPMMU_NUM_CTX", roots[0]["contexts"], "board root contexts")
        put(f"{roots[0]['name'].upper()}_IRQ", roots[0]["irq"], "board root irq")

    prr = by_name["prr"]
    put("PRR_ADDR", prr["base"], "board prr base")
    put("PRR_VALUE", prr["value"], "board prr value")

    # ipmmu.h: offsets, fields, encodings
    put("IM_CTX_SIZE", ipmmu_regs.CTX_STRIDE, "ipmmu_regs.CTX_STRIDE")
    for reg in (*ipmmu_regs.CONTEXT, *ipmmu_regs.GLOBALS):
        put(reg.name, reg.offset, f"IPMMU {reg.name} offset")
    for name, mask in _field_masks("", ipmmu_regs.REGS.values()).items():
        put(name, mask, "IPMMU field")
    imctr, imttbcr = ipmmu_regs.IMCTR, ipmmu_regs.IMTTBCR
    put("IMCTR_COMMON_MASK", imctr.INTEN.mask | imctr.FLUSH.mask | imctr.MMUEN.mask,
        "IMCTR INTEN|FLUSH|MMUEN (the bits every instance implements)")
    put("IMTTBCR_SL0_TWOBIT_LVL_1", imttbcr.SL0.encode(next(k for k, v in S1_START_LEVEL.items() if v == 1)),
        "the SL0 the model starts a stage-1 walk at level 1 with")
    put("IMTTBCR_SL0_LVL_1", imttbcr.SL0.encode(next(k for k, v in S2_START_LEVEL.items() if v == 1)),
        "the SL0 the model starts a stage-2 walk at level 1 with")
    put("IMSTR_ERR_MASK", ipmmu_regs.IMSTR_ERR_MASK, "ipmmu_regs.IMSTR_ERR_MASK")
    for code in ("TLB_FORMAT", "ACCESS_PERM", "SECURE_ACCESS"):
        put(f"IMSTR_ERRCODE_{code}", getattr(ipmmu_regs, f"ERRCODE_{code}"), f"ipmmu_regs.ERRCODE_{code}")

    # virtio.h: the transport's registers and feature bits
    for reg in virtio_mmio.LAYOUT:
        put(f"VIRTIO_MMIO_{_snake(reg.name)}", reg.offset, f"virtio-mmio {reg.name} offset")
    put("VIRTIO_MMIO_CONFIG", virtio_mmio.CONFIG_OFFSET, "virtio_mmio.CONFIG_OFFSET")
    put("VIRTIO_MMIO_MAGIC", virtio_mmio.LAYOUT["MagicValue"].reset, "virtio-mmio MagicValue reset")
    for f in virtio_mmio.STATUS.fields.values():
        put(f"VIRTIO_STATUS_{f.name.removeprefix('DEVICE_')}", f.mask, f"virtio-mmio Status.{f.name}")
    for f in virtio_mmio.INTERRUPT.fields.values():
        put(f"VIRTIO_INT_{f.name}", f.mask, f"virtio-mmio InterruptStatus.{f.name}")
    for name in ("INDIRECT_DESC", "EVENT_IDX", "VERSION_1"):
        put(f"VIRTIO_F_{name}", getattr(virtqueue, f"F_{name}").bit_length() - 1, f"virtqueue.F_{name} bit")
    for name in ("INPUT_RANGE", "DOMAIN_RANGE", "MAP_UNMAP", "BYPASS", "PROBE", "MMIO", "BYPASS_CONFIG",
                 "ATTACH_TABLE"):
        put(f"VIRTIO_IOMMU_F_{name}", getattr(virtio_iommu, f"F_{name}").bit_length() - 1,
            f"virtio_iommu.F_{name} bit")
    put("VIRTIO_IOMMU_FEATURES_LO", virtio_iommu.FEATURES & 0xFFFFFFFF, "virtio_iommu.FEATURES[31:0]")
    put("VIRTIO_IOMMU_FEATURES_HI", virtio_iommu.FEATURES >> 32, "virtio_iommu.FEATURES[63:32]")
    for name, (offset, _) in layout_fields(virtio_iommu.CONFIG_LAYOUT).items():
        put(f"VIRTIO_IOMMU_CFG_{name.upper()}", offset, f"virtio-iommu config {name} offset")
    return exp


def expected_calls(m: Machine) -> dict[str, list[tuple[tuple[int, ...], int]]]:
    """Every function-like #define with the argument/value pairs the models give it."""
    board = _board()
    slots, engines = _devices(board, "virtio-mmio"), _devices(board, "dma")
    imstr, imuctr = ipmmu_regs.IMSTR, ipmmu_regs.IMUCTR
    samples = [0, 0xFFFFFFFF, *(1 << i for i in range(32)), 0x12345678]
    return {
        "VIRTIO_MMIO_SLOT": [((n,), d["base"]) for n, d in enumerate(slots)],
        "VIRTIO_MMIO_IRQ": [((n,), d["irq"]) for n, d in enumerate(slots)],
        "DMA_ENGINE": [((n,), d["base"]) for n, d in enumerate(engines)],
        "DMA_IRQ": [((n,), d["irq"]) for n, d in enumerate(engines)],
        "IMUCTR": [((u,), ipmmu_regs.utlb_reg_offset(u, "IMUCTR")) for u in range(ipmmu_regs.MAX_UTLBS)],
        "IMUASID": [((u,), ipmmu_regs.utlb_reg_offset(u, "IMUASID")) for u in range(ipmmu_regs.MAX_UTLBS)],
        "IMUCTR_TTSEL_MMU": [((c,), imuctr.TTSEL.encode(c)) for c in range(16)],
        "IMSTR_ERRCODE": [((v,), imstr.ERRCODE(v)) for v in samples],
        "IMSTR_ERRLVL": [((v,), imstr.ERRLVL(v)) for v in samples],
        "IPMMU_CTX_REG": [((c, reg.offset), ipmmu_regs.ctx_offset(c, reg.name))
                          for c in range(ipmmu_regs.MAX_CONTEXTS) for reg in ipmmu_regs.CONTEXT],
    }


def problems(texts: dict[str, str], m: Machine) -> list[str]:
    """Every disagreement between the headers' #defines and the models, one line each."""
    macros = Macros(texts)
    out = list(macros.clashes)
    values, calls = expected_values(m), expected_calls(m)
    for header, names in macros.names.items():
        guard = f"IOMMU_LAB_{header.removesuffix('.h').upper()}_H"
        for name in names:
            if name == guard or not IN_SCOPE[header].match(name):
                continue
            try:
                if name in calls:
                    for args, want in calls[name]:
                        got = macros.call(name, *args)
                        if got != want:
                            shown = ", ".join(str(a) for a in args)
                            out.append(f"{header}: {name}({shown}) = {got:#x}, the model has {want:#x}")
                elif name in values:
                    want, where = values[name]
                    got = macros.value(name)
                    if got != want:
                        out.append(f"{header}: {name} = {got:#x}, but {where} is {want:#x}")
                else:
                    out.append(f"{header}: {name} has no model counterpart: check it in tests/test_consistency.py")
            except (ValueError, AssertionError) as e:
                out.append(f"{header}: {name} does not evaluate: {e}")
    return out


@pytest.fixture(scope="module")
def machine():
    m = Machine.from_board("rcar-virt")
    yield m
    m.close()


def _headers() -> dict[str, str]:
    return {h: (INCLUDE / h).read_text() for h in HEADERS}


def test_headers_agree_with_the_board_and_the_register_declarations(machine):
    texts = _headers()
    found = problems(texts, machine)
    assert not found, "\n".join(found)
    for header, names in Macros(texts).names.items():       # the scope really covers the headers
        assert header == "dma.h" or sum(1 for n in names if IN_SCOPE[header].match(n)) > 20, header


@pytest.mark.parametrize("header, old, new, complaint", [
    ("ipmmu.h", "#define IMTTBCR_PMB             (1u << 30)", "#define IMTTBCR_PMB (1u << 29)",
     "IMTTBCR_PMB = 0x20000000, but IPMMU field is 0x40000000"),
    ("ipmmu.h", "(u) * 16 : 0x0600", "(u) * 16 : 0x0700", "IMUCTR(32) = 0x700, the model has 0x600"),
    ("board.h", "#define DMA_IRQ(n)              (8 + (n))", "#define DMA_IRQ(n) (9 + (n))",
     "DMA_IRQ(0) = 0x9, the model has 0x8"),
    ("board.h", "#define DMA4_IPMMU_DS0_UTLB     0", "#define DMA4_IPMMU_DS0_UTLB 1",
     "DMA4_IPMMU_DS0_UTLB = 0x1, but board dma4 master behind ipmmu_ds0 is 0x0"),
    ("board.h", "#define IPMMU_MM_BASE           0xE67B0000ULL", "#define IPMMU_MM_BASE 0xE67C0000ULL",
     "IPMMU_MM_BASE = 0xe67c0000, but board ipmmu_mm base is 0xe67b0000"),
    ("virtio.h", "#define VIRTIO_MMIO_QUEUE_READY         0x044", "#define VIRTIO_MMIO_QUEUE_READY 0x040",
     "VIRTIO_MMIO_QUEUE_READY = 0x40, but virtio-mmio QueueReady offset is 0x44"),
    ("board.h", "#define DMA_IRQ_STATUS_RAISED   (1u << 0)",
     "#define DMA_IRQ_STATUS_RAISED (1u << 0)\n#define DMA_IRQ_STATUS_DONE (1u << 1)",
     "DMA_IRQ_STATUS_DONE has no model counterpart"),
])
def test_a_drifted_define_is_reported(machine, header, old, new, complaint):
    texts = _headers()
    assert old in texts[header], f"the test's anchor vanished from {header}: update it"
    texts[header] = texts[header].replace(old, new)
    found = problems(texts, machine)
    assert any(complaint in p for p in found), found


def test_the_evaluator_reads_c_as_c():
    mac = Macros({"t.h": "#define A (1u << 4) /* c */\n#define B(x, y) ((x) < 2 ? (A | (y)) : 0x10ULL)\n"
                         "#define C ((uint32_t)(0x1FFFFFFFFull))\n#define D B(1, 3) + 010\n"})
    assert (mac.value("A"), mac.call("B", 1, 2), mac.call("B", 5, 2)) == (16, 18, 16)
    assert (mac.value("C"), mac.value("D")) == (0xFFFFFFFF, 19 + 8)


# -- declarations vs their construct layout ------------------------------------------------------

TWO = cs.Struct("A" / cs.Int32ul, "_gap" / cs.Padding(4), "B" / cs.Int64ul)


@pytest.mark.parametrize("regs, complaint", [
    ([Reg("A", 0x0), Reg("B", 0x4, width=8)], "B is declared at 0x4 (8 bytes); the layout has it at 0x8"),
    ([Reg("A", 0x0), Reg("B", 0x8)], "B is declared at 0x8 (4 bytes); the layout has it at 0x8 (8 bytes)"),
    ([Reg("A", 0x0)], "layout registers without a declaration: B"),
    ([Reg("A", 0x0), Reg("B", 0x8, width=8), Reg("C", 0x10)], "C is declared but not in the layout"),
    ([Reg("A", 0x0), Reg("A", 0x0), Reg("B", 0x8, width=8)], "A is declared twice"),
])
def test_a_declaration_that_disagrees_with_its_layout_fails_at_import(regs, complaint):
    with pytest.raises(LayoutError, match=re.escape(complaint)):
        Bank(TWO, regs, "t")


@pytest.mark.parametrize("kwargs, complaint", [
    ({"fields": {"X": (30, 4)}}, "X: bits 30+4 are outside a 4-byte register"),
    ({"fields": {"X": (0, 4), "Y": (2, 4)}}, "Y overlaps R.X"),
    ({"fields": {"X": 0}, "self_clearing": ["Y"]}, "self-clearing Y is not a field"),
    ({"access": "RW1C"}, "access 'RW1C' is not one of"),
    ({"reset": 1 << 32}, "wider than 4 bytes"),
])
def test_a_malformed_register_declaration_is_refused(kwargs, complaint):
    with pytest.raises(LayoutError, match=re.escape(complaint)):
        Reg("R", 0, **kwargs)


def test_declared_access_kinds_act_on_the_stored_value():
    class Dev:
        def __init__(self) -> None:
            self.seen: list[tuple[int, int]] = []

        def _go(self, old: int, value: int) -> None:
            self.seen.append((old, value))

    bank = Bank(cs.Struct(*(n / cs.Int32ul for n in "ABCDEF"), "G" / cs.Int64ul), [
        Reg("A", 0x00, fields={"GO": 0, "MODE": (4, 2)}, self_clearing=["GO"], on_write="_go"),
        Reg("B", 0x04, access=RO, reset=7),
        Reg("C", 0x08, access=W1C, reset=0xF),
        Reg("D", 0x0C, access=W0C, reset=0xF),
        Reg("E", 0x10, access=WO),
        Reg("F", 0x14, wmask=0xF0),
        Reg("G", 0x18, width=8),
    ])
    dev = Dev()
    regs = RegisterFile(bank, dev)
    regs.write(0x00, 4, 0x21)
    assert regs.read(0x00, 4) == 0x20 and dev.seen == [(0, 0x21)] and bank["A"].MODE(0x20) == 2
    regs.write(0x04, 4, 0)
    regs.write(0x08, 4, 0x5)
    regs.write(0x0C, 4, 0x5)
    regs.write(0x10, 4, 0x99)
    regs.write(0x14, 4, 0xFF)
    assert [regs.read(o, 4) for o in (0x04, 0x08, 0x0C, 0x10, 0x14)] == [7, 0xA, 0x5, 0, 0xF0]
    assert regs["E"] == 0x99                       # write-only: latched, reads 0
    regs.write(0x1C, 4, 0xAABBCCDD)                     # the high half of an 8-byte register
    regs.write(0x18, 4, 0x11223344)
    assert regs.read(0x18, 8) == 0xAABBCCDD_11223344 and regs.read(0x1C, 4) == 0xAABBCCDD
    assert regs.read(0x1A, 2) == 0 and regs.read(0x30, 4) == 0      # no such access: reads 0
    regs.reset()
    assert regs.read(0x08, 4) == 0xF and regs.read(0x18, 8) == 0
    assert bank.constants() == {(0x04, 4): 7}
