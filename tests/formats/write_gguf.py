#!/usr/bin/env python3
"""An independent GGUF v3 writer and reader (pure Python, struct only) for cross-checking the C++
implementation in src/formats/gguf.cc against a second reading of the spec (ggml/docs/gguf.md).

  write_gguf.py write OUT   writes the fixed file described in FIXTURE below to OUT
  write_gguf.py dump FILE   parses FILE and prints one canonical line per item (see dump())

The C++ test (tests/formats/gguf_test.cc) knows the FIXTURE values and checks that its reader
sees exactly them; it also writes a file with GgufWriter and compares this script's dump of it
with the values it put in.
"""
import struct
import sys

GGUF_MAGIC = b"GGUF"
# value type id -> (name, struct format); string = 8, array = 9
SCALARS = {
    0: ("u8", "<B"), 1: ("i8", "<b"), 2: ("u16", "<H"), 3: ("i16", "<h"),
    4: ("u32", "<I"), 5: ("i32", "<i"), 6: ("f32", "<f"), 7: ("bool", "<?"),
    10: ("u64", "<Q"), 11: ("i64", "<q"), 12: ("f64", "<d"),
}
TYPE_ID = {name: tid for tid, (name, _) in SCALARS.items()}
TYPE_ID["string"] = 8
TYPE_ID["array"] = 9
TYPE_NAME = {v: k for k, v in TYPE_ID.items()}

# ggml type id -> (elements per block, bytes per block), for the types used here
GGML_TYPES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 8: (32, 34), 12: (256, 144), 14: (256, 210),
              15: (256, 292), 26: (1, 4), 30: (1, 2)}

ALIGNMENT = 64


def pattern(n, seed):
    """Deterministic bytes; the C++ test computes the same: byte j = (j * 37 + seed) & 0xff."""
    return bytes((j * 37 + seed) & 0xFF for j in range(n))


def f32_values(n):
    return [j * 0.5 - 1.0 for j in range(n)]  # exact in f32 and f16


# The fixture: (key, type, value) and (name, ggml type, ne, data bytes). Keep in sync with
# PythonWrittenFileReadsBack in gguf_test.cc.
def fixture():
    kvs = [
        ("general.architecture", "string", "llama"),
        ("general.alignment", "u32", ALIGNMENT),
        ("test.u8", "u8", 200),
        ("test.i8", "i8", -100),
        ("test.u16", "u16", 60000),
        ("test.i16", "i16", -30000),
        ("test.u32", "u32", 4000000000),
        ("test.i32", "i32", -2000000000),
        ("test.f32", "f32", 0.15625),
        ("test.bool_t", "bool", True),
        ("test.bool_f", "bool", False),
        ("test.str", "string", "h\u00e9llo w\u00f6rld"),
        ("test.empty_str", "string", ""),
        ("test.u64", "u64", 2**63 + 5),
        ("test.i64", "i64", -(2**62) - 7),
        ("test.f64", "f64", -2.5e300),
        ("test.arr_str", "array", ("string", ["a", "", "bc", "\u00fcber"])),
        ("test.arr_f32", "array", ("f32", [1.5, -0.25, 3e38])),
        ("test.arr_i32", "array", ("i32", [-1, 0, 2147483647, -2147483648])),
        ("test.arr_u32", "array", ("u32", [0, 7, 4294967295])),
        ("test.arr_u8", "array", ("u8", [1, 255])),
        ("test.arr_i16", "array", ("i16", [-5, 5])),
        ("test.arr_bool", "array", ("bool", [True, False, True])),
        ("test.arr_f64", "array", ("f64", [0.1])),
        ("test.arr_empty", "array", ("i32", [])),
        ("llama.block_count", "u32", 3),
        ("llama.attention.head_count", "array", ("i32", [4, 8, 4])),
    ]
    tensors = [
        ("a.f32", 0, [4, 3], struct.pack("<12f", *f32_values(12))),
        ("b.f16", 1, [8], struct.pack("<8e", *f32_values(8))),
        ("c.q8_0", 8, [64, 2], pattern(2 * 2 * 34, 11)),
        ("d.i32", 26, [5], struct.pack("<5i", -2, -1, 0, 1, 2)),
        ("e.bf16", 30, [3, 2, 1, 1], pattern(12, 200)),
        ("f.q4_K", 12, [256, 1, 2], pattern(2 * 144, 3)),
    ]
    return kvs, tensors


def pack_string(s):
    if isinstance(s, str):
        s = s.encode("utf-8")
    return struct.pack("<Q", len(s)) + s


def pack_value(tname, v):
    if tname == "string":
        return pack_string(v)
    if tname == "array":
        etype, items = v
        out = struct.pack("<IQ", TYPE_ID[etype], len(items))
        for it in items:
            out += pack_value(etype, it)
        return out
    return struct.pack(SCALARS[TYPE_ID[tname]][1], v)


def pad(n, a):
    return (n + a - 1) // a * a


def write(path):
    kvs, tensors = fixture()
    out = bytearray(GGUF_MAGIC)
    out += struct.pack("<IQQ", 3, len(tensors), len(kvs))
    for key, tname, v in kvs:
        out += pack_string(key) + struct.pack("<I", TYPE_ID[tname]) + pack_value(tname, v)
    offset = 0
    for name, gtype, ne, data in tensors:
        block, block_bytes = GGML_TYPES[gtype]
        n = ne[0] // block * block_bytes
        for d in ne[1:]:
            n *= d
        assert n == len(data), name
        out += pack_string(name) + struct.pack("<I", len(ne))
        out += struct.pack("<%dQ" % len(ne), *ne)
        out += struct.pack("<IQ", gtype, offset)
        offset += pad(len(data), ALIGNMENT)
    out += bytes(pad(len(out), ALIGNMENT) - len(out))
    for _, _, _, data in tensors:
        out += data + bytes(pad(len(data), ALIGNMENT) - len(data))
    with open(path, "wb") as f:
        f.write(out)


class Reader:
    def __init__(self, data):
        self.d = data
        self.p = 0

    def take(self, fmt):
        n = struct.calcsize(fmt)
        if self.p + n > len(self.d):
            raise ValueError("truncated at %d" % self.p)
        v = struct.unpack_from(fmt, self.d, self.p)
        self.p += n
        return v[0] if len(v) == 1 else v

    def string(self):
        n = self.take("<Q")
        if self.p + n > len(self.d):
            raise ValueError("string past end at %d" % self.p)
        s = self.d[self.p:self.p + n]
        self.p += n
        return s


def fnv1a64(b):
    h = 0xCBF29CE484222325
    for c in b:
        h = ((h ^ c) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def fmt_scalar(tid, raw_reader):
    """Canonical text of one scalar: integers decimal, floats as hex of their bits."""
    name, fmt = SCALARS[tid]
    if name == "f32":
        return "0x%08x" % raw_reader.take("<I")
    if name == "f64":
        return "0x%016x" % raw_reader.take("<Q")
    if name == "bool":
        b = raw_reader.take("<B")
        if b > 1:
            raise ValueError("bool byte %d" % b)
        return str(b)
    return str(raw_reader.take(fmt))


def fmt_value(tid, r):
    if tid == 8:
        return r.string().hex()
    if tid == 9:
        etype = r.take("<I")
        count = r.take("<Q")
        if etype == 8:
            items = [r.string().hex() for _ in range(count)]
        else:
            items = [fmt_scalar(etype, r) for _ in range(count)]
        return "%s %d %s" % (TYPE_NAME[etype], count, ",".join(items))
    return fmt_scalar(tid, r)


def dump(path):
    """Prints: 'header <n_tensors> <n_kv>', one 'kv <key> <type> <value>' per key in file order,
    'data <data section offset>', one 'tensor <name> <ggml type> <ne,..> <offset> <fnv1a64 of
    data>' per tensor, and 'size <file size>'. Also checks offsets, padding and bounds."""
    with open(path, "rb") as f:
        d = f.read()
    r = Reader(d)
    if d[:4] != GGUF_MAGIC:
        raise ValueError("bad magic")
    r.p = 4
    version, n_tensors, n_kv = r.take("<IQQ")
    if version != 3:
        raise ValueError("version %d" % version)
    lines = ["header %d %d" % (n_tensors, n_kv)]
    alignment = 32
    for _ in range(n_kv):
        key = r.string().decode("utf-8")
        tid = r.take("<I")
        start = r.p
        text = fmt_value(tid, r)
        if key == "general.alignment":
            if tid != 4:
                raise ValueError("general.alignment type %d" % tid)
            alignment = struct.unpack_from("<I", d, start)[0]
        lines.append("kv %s %s %s" % (key, TYPE_NAME[tid], text))
    infos = []
    for _ in range(n_tensors):
        name = r.string().decode("utf-8")
        n_dims = r.take("<I")
        ne = [r.take("<Q") for _ in range(n_dims)]
        gtype, offset = r.take("<IQ")
        infos.append((name, gtype, ne, offset))
    data_start = pad(r.p, alignment)
    if any(d[r.p:data_start]):
        raise ValueError("non-zero padding before the data section")
    lines.append("data %d" % data_start)
    expected = 0
    for name, gtype, ne, offset in infos:
        block, block_bytes = GGML_TYPES[gtype]
        n = ne[0] // block * block_bytes
        for x in ne[1:]:
            n *= x
        if offset != expected:
            raise ValueError("tensor %s offset %d expected %d" % (name, offset, expected))
        start = data_start + offset
        if start + n > len(d):
            raise ValueError("tensor %s past end" % name)
        padding = d[start + n:data_start + offset + pad(n, alignment)]
        if any(padding):
            raise ValueError("tensor %s: non-zero padding" % name)
        expected += pad(n, alignment)
        lines.append("tensor %s %d %s %d %016x" % (name, gtype, ",".join(map(str, ne)), offset,
                                                   fnv1a64(d[start:start + n])))
    lines.append("size %d" % len(d))
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "dump"):
        sys.exit("usage: write_gguf.py write OUT | dump FILE")
    (write if sys.argv[1] == "write" else dump)(sys.argv[2])
