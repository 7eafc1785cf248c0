"""A small reader of the kernel's BTF (``/sys/kernel/btf/vmlinux``).

Enough of the BPF Type Format to answer "what is the layout of struct X in
the running kernel": every member's name, byte offset, size and type name,
with anonymous unions and structs flattened into their parent.  Used to check
the model's ``struct kvm_mmu_page`` (and friends) against the host kernel.

Format (include/uapi/linux/btf.h): a header (magic 0xeb9f, version, flags,
hdr_len, then type/string section offsets and lengths), a type section of
variable-length records (name_off, info, size_or_type, then kind-specific
data) numbered from 1, and a string section.  Only the kinds' sizes are
needed to walk the type section; only structs, unions, arrays, typedefs and
qualifiers are interpreted.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

VMLINUX = "/sys/kernel/btf/vmlinux"
BTF_MAGIC = 0xEB9F

# BTF_KIND_*
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, \
    FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(1, 20)

# Bytes of kind-specific data after the 12-byte common record: (fixed, per vlen item).
_EXTRA = {
    INT: (4, 0), PTR: (0, 0), ARRAY: (12, 0), STRUCT: (0, 12), UNION: (0, 12),
    ENUM: (0, 8), FWD: (0, 0), TYPEDEF: (0, 0), VOLATILE: (0, 0), CONST: (0, 0),
    RESTRICT: (0, 0), FUNC: (0, 0), FUNC_PROTO: (0, 8), VAR: (4, 0), DATASEC: (0, 12),
    FLOAT: (0, 0), DECL_TAG: (4, 0), TYPE_TAG: (0, 0), ENUM64: (0, 12),
}
_QUALIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)


class BtfError(ValueError):
    """The file is not BTF this reader understands, or a type is missing."""


@dataclass(frozen=True)
class Member:
    """One member of a struct as laid out in memory."""
    name: str           # "" for an anonymous member that is not flattened
    offset: int         # bytes from the start of the outermost struct
    size: int           # bytes (0 for a bitfield narrower than a byte)
    bit_offset: int     # bits from the start of the outermost struct
    bitfield_size: int  # 0 unless a bitfield
    type_name: str


class Btf:
    """Parsed BTF: look structs up by name with :meth:`struct_layout`."""

    def __init__(self, data: bytes):
        if len(data) < 24:
            raise BtfError("BTF data shorter than its header")
        magic, version, _flags, hdr_len = struct.unpack_from("<HBBI", data, 0)
        if magic != BTF_MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x} (little-endian BTF expected)")
        if version != 1:
            raise BtfError(f"BTF version {version} is not supported")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", data, 8)
        self._data = data
        self._str0 = hdr_len + str_off
        self._str_end = self._str0 + str_len
        if self._str_end > len(data) or hdr_len + type_off + type_len > len(data):
            raise BtfError("BTF sections extend past the end of the data")
        # types[i] = (kind, name_off, info, size_or_type, data offset of the extra part)
        self._types = [None]
        self._by_name: dict[tuple[int, str], int] = {}
        pos, end = hdr_len + type_off, hdr_len + type_off + type_len
        while pos < end:
            name_off, info, sot = struct.unpack_from("<III", data, pos)
            kind = (info >> 24) & 0x1F
            vlen = info & 0xFFFF
            if kind not in _EXTRA:
                raise BtfError(f"unknown BTF kind {kind} at type {len(self._types)}")
            fixed, per = _EXTRA[kind]
            self._types.append((kind, name_off, info, sot, pos + 12))
            if kind in (STRUCT, UNION) and name_off:
                self._by_name.setdefault((kind, self._str(name_off)), len(self._types) - 1)
            pos += 12 + fixed + per * vlen

    @classmethod
    def from_file(cls, path: str = VMLINUX) -> "Btf":
        with open(path, "rb") as f:
            return cls(f.read())

    @staticmethod
    def available(path: str = VMLINUX) -> bool:
        return os.access(path, os.R_OK)

    def _str(self, off: int) -> str:
        start = self._str0 + off
        end = self._data.index(b"\0", start, self._str_end)
        return self._data[start:end].decode()

    def _resolve(self, tid: int) -> int:
        """Skip typedefs and qualifiers."""
        for _ in range(64):
            kind = self._types[tid][0]
            if kind not in _QUALIFIERS:
                return tid
            tid = self._types[tid][3]
        raise BtfError("typedef chain too long")

    def type_size(self, tid: int) -> int:
        tid = self._resolve(tid)
        kind, _n, _i, sot, extra = self._types[tid]
        if kind in (INT, STRUCT, UNION, ENUM, ENUM64, FLOAT, DATASEC):
            return sot
        if kind == PTR:
            return 8
        if kind == ARRAY:
            elem, _idx, nelems = struct.unpack_from("<III", self._data, extra)
            return nelems * self.type_size(elem)
        return 0

    def type_name(self, tid: int) -> str:
        if tid == 0:
            return "void"
        kind, name_off, _i, sot, extra = self._types[tid]
        name = self._str(name_off) if name_off else ""
        if kind == PTR:
            return self.type_name(sot) + " *"
        if kind == ARRAY:
            elem, _idx, nelems = struct.unpack_from("<III", self._data, extra)
            return f"{self.type_name(elem)}[{nelems}]"
        if kind in (CONST, VOLATILE, RESTRICT, TYPE_TAG):
            return self.type_name(sot)
        prefix = {STRUCT: "struct ", UNION: "union ", ENUM: "enum ", ENUM64: "enum "}.get(kind, "")
        return prefix + (name or "<anon>")

    def find(self, name: str, kind: int = STRUCT) -> int:
        try:
            return self._by_name[(kind, name)]
        except KeyError:
            raise BtfError(f"no {'struct' if kind == STRUCT else 'union'} {name} in BTF") from None

    def struct_size(self, name: str) -> int:
        return self.type_size(self.find(name))

    def members(self, tid: int):
        """Direct members of struct/union `tid`: (name, type id, bit offset, bitfield size)."""
        kind, _n, info, _s, extra = self._types[self._resolve(tid)]
        if kind not in (STRUCT, UNION):
            raise BtfError(f"type {tid} is not a struct or union")
        kflag = info >> 31
        out = []
        for i in range(info & 0xFFFF):
            name_off, mtype, off = struct.unpack_from("<III", self._data, extra + 12 * i)
            bits, bsize = (off & 0xFFFFFF, off >> 24) if kflag else (off, 0)
            out.append((self._str(name_off) if name_off else "", mtype, bits, bsize))
        return out

    def struct_layout(self, name: str, flatten_anonymous: bool = True) -> list[Member]:
        """Members of ``struct name`` in declaration order, anonymous
        unions/structs flattened (their members appear in place, at their
        absolute offsets)."""
        out: list[Member] = []
        self._layout(self.find(name), 0, flatten_anonymous, out)
        return out

    def _layout(self, tid, base_bits, flatten, out):
        for mname, mtype, bits, bsize in self.members(tid):
            rt = self._resolve(mtype)
            if not mname and flatten and self._types[rt][0] in (STRUCT, UNION):
                self._layout(rt, base_bits + bits, flatten, out)
                continue
            total = base_bits + bits
            size = bsize // 8 if bsize else self.type_size(mtype)
            out.append(Member(mname, total // 8, 0 if bsize and bsize % 8 else size,
                              total, bsize, self.type_name(mtype)))
