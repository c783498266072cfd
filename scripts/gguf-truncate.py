#!/usr/bin/env python3
"""Writes a GGUF model cut to its first N transformer blocks (tensors blk.<i>.* for i >= N
dropped, <arch>.block_count set to N), everything else byte for byte. For the GPU check,
whose files must travel in 64 MiB: the model's text gets worse, but the same file runs on the
CPU and the GPU, which is what is compared.  Usage: gguf-truncate.py IN OUT N"""
import struct
import sys

# GGUF value types: fixed sizes; 8 = string, 9 = array
FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class Reader:
    def __init__(self, b):
        self.b, self.o = b, 0

    def take(self, n):
        s = self.b[self.o:self.o + n]
        self.o += n
        return s

    def u32(self):
        return struct.unpack("<I", self.take(4))[0]

    def u64(self):
        return struct.unpack("<Q", self.take(8))[0]

    def string(self):
        return self.take(self.u64()).decode()

    def skip_value(self, t):
        if t in FIXED:
            self.take(FIXED[t])
        elif t == 8:
            self.take(self.u64())
        elif t == 9:
            et, n = self.u32(), self.u64()
            for _ in range(n):
                self.skip_value(et)
        else:
            raise SystemExit(f"unknown GGUF value type {t}")


def pstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def main():
    src, dst, keep = sys.argv[1], sys.argv[2], int(sys.argv[3])
    b = open(src, "rb").read()
    r = Reader(b)
    if r.take(4) != b"GGUF":
        raise SystemExit("not a GGUF file")
    version, n_t, n_kv = r.u32(), r.u64(), r.u64()
    kvs, align, arch = [], 32, None
    for _ in range(n_kv):
        start = r.o
        key = r.string()
        t = r.u32()
        vstart = r.o
        r.skip_value(t)
        raw = b[start:r.o]
        if key == "general.alignment":
            align = struct.unpack("<I", b[vstart:vstart + 4])[0]
        if key == "general.architecture":
            arch = b[vstart + 8:r.o].decode()
        kvs.append((key, t, raw))
    infos = []
    for _ in range(n_t):
        name = r.string()
        nd = r.u32()
        dims = [r.u64() for _ in range(nd)]
        ty, off = r.u32(), r.u64()
        infos.append((name, dims, ty, off))
    data0 = (r.o + align - 1) // align * align
    ends = sorted(off for *_, off in infos) + [len(b) - data0]
    size = {off: ends[i + 1] - off for i, off in enumerate(ends[:-1])}
    kept = [i for i in infos
            if not (i[0].startswith("blk.") and int(i[0].split(".")[1]) >= keep)]
    out = bytearray(b"GGUF" + struct.pack("<IQQ", version, len(kept), len(kvs)))
    for key, t, raw in kvs:
        if key == f"{arch}.block_count":
            raw = pstr(key) + struct.pack("<II", 4, keep)
        out += raw
    off, blobs = 0, []
    for name, dims, ty, old in kept:
        out += pstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", ty, off)
        n = size[old]
        blobs.append(b[data0 + old:data0 + old + n])
        off += (n + align - 1) // align * align
    out += b"\0" * ((-len(out)) % align)
    for blob in blobs:
        out += blob + b"\0" * ((-len(blob)) % align)
    open(dst, "wb").write(out)
    print(f"{dst}: {keep} blocks of {arch}, {len(kept)} tensors, {len(out) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
