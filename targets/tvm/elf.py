"""A small reader of 64-bit little-endian ELF shared libraries (standard library only), and the static check that
an aarch64 library is loadable by Android's dynamic linker.

What Android's linker (bionic) refuses or mis-loads, and what is checked here:
- symbols versioned against glibc (``GLIBC_2.17`` ...): bionic has no such versions;
- DT_NEEDED libraries a phone lacks: only ``libc.so``, ``libm.so`` and ``libdl.so`` are allowed;
- text relocations (DT_TEXTREL, DF_TEXTREL): refused for API 23 and later;
- load segments aligned below 16 KB: Android 15 devices may use 16 KB pages.

This is a static check: there is no bionic here to load the library on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from toolchain.core.errors import InfraError

PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_NEEDED, DT_STRTAB, DT_STRSZ, DT_TEXTREL, DT_FLAGS = 0, 1, 5, 10, 22, 30
DT_VERNEED, DT_VERNEEDNUM = 0x6FFFFFFE, 0x6FFFFFFF
DF_TEXTREL = 0x4
EM_AARCH64 = 183
ANDROID_PAGE = 16384
ANDROID_ALLOWED_NEEDED = frozenset({"libc.so", "libm.so", "libdl.so"})


@dataclass(frozen=True)
class Segment:
    offset: int
    vaddr: int
    filesz: int
    align: int


@dataclass
class ElfInfo:
    machine: int
    loads: list[Segment] = field(default_factory=list)
    needed: list[str] = field(default_factory=list)
    textrel: bool = False
    # (library, version) pairs the library's undefined symbols require (.gnu.version_r)
    version_needs: list[tuple[str, str]] = field(default_factory=list)


def read_elf(path: Path) -> ElfInfo:
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise InfraError(f"{path} is not a 64-bit little-endian ELF file")
    machine = struct.unpack_from("<H", data, 18)[0]
    phoff = struct.unpack_from("<Q", data, 32)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    info = ElfInfo(machine)
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        p_type, _flags, off, vaddr, _paddr, filesz, _memsz, align = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == PT_LOAD:
            info.loads.append(Segment(off, vaddr, filesz, align))
        elif p_type == PT_DYNAMIC:
            dynamic = (off, filesz)
    if dynamic is None:
        return info

    def file_offset(vaddr: int) -> int:
        for s in info.loads:
            if s.vaddr <= vaddr < s.vaddr + s.filesz:
                return vaddr - s.vaddr + s.offset
        raise InfraError(f"{path}: dynamic address {vaddr:#x} lies in no load segment")

    entries: list[tuple[int, int]] = []
    off, size = dynamic
    for pos in range(off, off + size, 16):
        tag, val = struct.unpack_from("<qQ", data, pos)
        if tag == DT_NULL:
            break
        entries.append((tag, val))
    tags = dict(entries)
    strtab = file_offset(tags[DT_STRTAB]) if DT_STRTAB in tags else 0

    def name(o: int) -> str:
        end = data.index(b"\0", strtab + o)
        return data[strtab + o:end].decode("utf-8", "replace")

    info.needed = [name(v) for t, v in entries if t == DT_NEEDED]
    info.textrel = DT_TEXTREL in tags or bool(tags.get(DT_FLAGS, 0) & DF_TEXTREL)
    if DT_VERNEED in tags:
        pos = file_offset(tags[DT_VERNEED])
        for _ in range(tags.get(DT_VERNEEDNUM, 0)):
            _ver, cnt, vn_file, vn_aux, vn_next = struct.unpack_from("<HHIII", data, pos)
            aux = pos + vn_aux
            for _ in range(cnt):
                _hash, _fl, _other, vna_name, vna_next = struct.unpack_from("<IHHII", data, aux)
                info.version_needs.append((name(vn_file), name(vna_name)))
                aux += vna_next
            if not vn_next:
                break
            pos += vn_next
    return info


def android_problems(path: Path) -> list[str]:
    """Why Android's dynamic linker would refuse ``path`` (empty: none found by this static check)."""
    info = read_elf(path)
    out = []
    if info.machine != EM_AARCH64:
        out.append(f"e_machine {info.machine}, not aarch64 ({EM_AARCH64})")
    glibc = sorted({f"{lib}:{ver}" for lib, ver in info.version_needs if ver.startswith("GLIBC")})
    if glibc:
        out.append(f"glibc-versioned symbols ({', '.join(glibc)})")
    extra = sorted(set(info.needed) - ANDROID_ALLOWED_NEEDED)
    if extra:
        out.append(f"DT_NEEDED beyond libc/libm/libdl ({', '.join(extra)})")
    if info.textrel:
        out.append("text relocations")
    bad = [s for s in info.loads if s.align < ANDROID_PAGE or (s.offset - s.vaddr) % ANDROID_PAGE]
    if bad:
        out.append("load segments not 16 KB-aligned (" + ", ".join(f"vaddr {s.vaddr:#x} align {s.align:#x}"
                                                                  for s in bad) + ")")
    return out
