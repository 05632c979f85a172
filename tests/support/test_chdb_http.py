#!/usr/bin/env python3
"""Self test for tests/support/chdb_http.py (plain Python, no pytest).

Run:  .venv-test/bin/python tests/support/test_chdb_http.py
Exits non-zero on any failure; the last line is `N passed, N failed`.

The client side here is written independently of the server module and
mimics what the Rust `clickhouse` crate 0.15 sends: chunked POSTs whose
chunks are ClickHouse LZ4 blocks (`decompress=1`), RowBinary /
RowBinaryWithNamesAndTypes bodies, `compress=1` responses whose block
checksums are verified in the one order ClickHouse (and the crate) use.
"""

import base64
import datetime as dt
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse

import lz4.block
from clickhouse_cityhash.cityhash import CityHash128

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.path.join(HERE, "chdb_http.py")
M64 = (1 << 64) - 1

# ------------------------------------------------------------ block codec
# The crate: checksum = cityhash_102_128(header+data).rotate_right(64), put as
# u128 little-endian. Verified below against the crate's own test vector.


def crate_checksum(buf):
    h = CityHash128(buf)
    return struct.pack("<QQ", h >> 64, h & M64)


def crate_compress(data):
    comp = lz4.block.compress(data, store_size=False)
    body = struct.pack("<BII", 0x82, 9 + len(comp), len(data)) + comp
    return crate_checksum(body) + body


def crate_decompress(data):
    """Decode a sequence of blocks; strict about the checksum byte order."""
    out, pos, blocks = bytearray(), 0, 0
    while pos < len(data):
        checksum = data[pos:pos + 16]
        magic, csize, usize = struct.unpack_from("<BII", data, pos + 16)
        assert magic == 0x82, f"magic {magic:#x}"
        body = data[pos + 16:pos + 16 + csize]
        assert len(body) == csize, "truncated block"
        assert crate_checksum(body) == checksum, "checksum mismatch"
        out += lz4.block.decompress(body[9:], uncompressed_size=usize)
        pos += 16 + csize
        blocks += 1
    return bytes(out), blocks


# Test vector from clickhouse-rs src/compression/lz4.rs (`it_compresses`).
VEC_SRC = bytes([1, 0, 2, 255, 255, 255, 255, 0, 1, 1, 1, 115, 6, 83, 116, 114, 105, 110, 103,
                 3, 97, 98, 99])
VEC_OUT = bytes([245, 5, 222, 235, 225, 158, 59, 108, 225, 31, 65, 215, 66, 66, 36, 92, 130,
                 34, 0, 0, 0, 23, 0, 0, 0, 240, 8, 1, 0, 2, 255, 255, 255, 255, 0, 1, 1, 1,
                 115, 6, 83, 116, 114, 105, 110, 103, 3, 97, 98, 99])

# ------------------------------------------------------------ RowBinary


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def rb_str(s):
    b = s.encode() if isinstance(s, str) else s
    return varint(len(b)) + b


class Reader:
    def __init__(self, data):
        self.d, self.p = data, 0

    def take(self, n):
        assert self.p + n <= len(self.d), "short read"
        b = self.d[self.p:self.p + n]
        self.p += n
        return b

    def varint(self):
        shift = n = 0
        while True:
            b = self.take(1)[0]
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    def str(self):
        return self.take(self.varint()).decode()

    def i64(self):
        return struct.unpack("<q", self.take(8))[0]

    def u64(self):
        return struct.unpack("<Q", self.take(8))[0]

    def f64(self):
        return struct.unpack("<d", self.take(8))[0]

    def done(self):
        return self.p == len(self.d)


COLUMNS = [
    ("ts", "DateTime64(9)"),
    ("kind", "LowCardinality(String)"),
    ("attrs", "Map(LowCardinality(String), String)"),
    ("value", "Float64"),
    ("n", "UInt64"),
]


def make_rows(start, count):
    base = 1_700_000_000_123_456_789
    rows = []
    for i in range(start, start + count):
        rows.append({
            "ts": base + i * 1_000_000_007,
            "kind": ["order", "payment", "ship"][i % 3],
            "attrs": {"k": f"v{i}", "tab\t": "quote'\"é"} if i % 2 else {},
            "value": i * 1.5 - 0.25,
            "n": (1 << 63) + i,
        })
    return rows


def encode_row(r):
    out = struct.pack("<q", r["ts"]) + rb_str(r["kind"]) + varint(len(r["attrs"]))
    for k, v in r["attrs"].items():
        out += rb_str(k) + rb_str(v)
    return out + struct.pack("<d", r["value"]) + struct.pack("<Q", r["n"])


def rbwnat_header(columns):
    out = varint(len(columns))
    for name, _ in columns:
        out += rb_str(name)
    for _, typ in columns:
        out += rb_str(typ)
    return out


def decode_row(rd):
    r = {"ts": rd.i64(), "kind": rd.str()}
    attrs = {}
    for _ in range(rd.varint()):
        k = rd.str()
        attrs[k] = rd.str()
    r["attrs"] = attrs
    r["value"] = rd.f64()
    r["n"] = rd.u64()
    return r


def ns_to_text(ns):
    secs, frac = divmod(ns, 1_000_000_000)
    t = dt.datetime.fromtimestamp(secs, dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M:%S") + f".{frac:09d}"

# ------------------------------------------------------------ HTTP client


class Resp:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def request(port, params, body=b"", method="POST", headers=None, chunks=None):
    url = "/"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    hdrs = {"User-Agent": "clickhouse-rs/0.15.1 (lv:rust/1.89; os:linux)"}
    hdrs.update(headers or {})
    try:
        if chunks is not None:
            hdrs["Transfer-Encoding"] = "chunked"
            conn.putrequest(method, url, skip_accept_encoding=True)
            for k, v in hdrs.items():
                conn.putheader(k, v)
            conn.endheaders()
            for c in chunks:
                conn.send(b"%x\r\n" % len(c) + c + b"\r\n")
            conn.send(b"0\r\n\r\n")
        else:
            if isinstance(body, str):
                body = body.encode()
            conn.request(method, url, body=body if method == "POST" else None, headers=hdrs)
        r = conn.getresponse()
        return Resp(r.status, r.getheaders(), r.read())
    finally:
        conn.close()


def query(port, sql, **params):
    return request(port, params, sql)


def ok(r, what=""):
    assert r.status == 200 and r.header("X-ClickHouse-Exception-Code") is None, \
        f"{what}: HTTP {r.status} {r.body[:500]!r}"
    return r


class ServerProc:
    def __init__(self, data_dir, extra=()):
        self.port_file = os.path.join(data_dir + "-port")
        if os.path.exists(self.port_file):
            os.unlink(self.port_file)
        self.stderr = open(data_dir + "-stderr.log", "ab")
        self.p = subprocess.Popen(
            [sys.executable, SERVER, "--port", "0", "--data-dir", data_dir,
             "--port-file", self.port_file, *extra],
            stdout=subprocess.PIPE, stderr=self.stderr)
        line = self.p.stdout.readline().decode()
        assert line.startswith("LISTENING "), f"server did not start: {line!r}"
        self.port = int(line.split()[1])
        with open(self.port_file) as f:
            assert int(f.read().strip()) == self.port, "port file mismatch"

    def stop(self):
        self.p.send_signal(signal.SIGTERM)
        rc = self.p.wait(timeout=30)
        self.p.stdout.close()
        self.stderr.close()
        return rc

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()

# ------------------------------------------------------------ tests


DB = "bizsig"
TABLE = "events"
INSERT_SQL_RB = f"INSERT INTO {TABLE}(ts,kind,attrs,value,n) FORMAT RowBinary"
INSERT_SQL_RBWNAT = f"INSERT INTO {TABLE}(ts,kind,attrs,value,n) FORMAT RowBinaryWithNamesAndTypes"


def insert_like_crate(port, sql, payload, chunk_size=64 * 1024, extra=None):
    params = [("database", DB), ("query", sql), ("decompress", "1")]
    params += list((extra or {}).items())
    chunks = [crate_compress(payload[i:i + chunk_size])
              for i in range(0, len(payload), chunk_size)]
    return request(port, params, chunks=chunks,
                   headers={"X-ClickHouse-User": "default"}), len(chunks)


def fetch_rows(port, sql, fmt="RowBinary", **extra):
    params = {"default_format": fmt, "database": DB, "compress": "1"}
    params.update(extra)
    r = ok(request(port, params, sql), sql)
    plain, blocks = crate_decompress(r.body)
    return r, plain, blocks


def t_checksum_vector(ctx):
    assert crate_compress(VEC_SRC) == VEC_OUT, "test-side codec != crate vector"
    assert crate_decompress(VEC_OUT)[0] == VEC_SRC


def t_ping(ctx):
    for path in ("/", "/ping"):
        conn = http.client.HTTPConnection("127.0.0.1", ctx["port"], timeout=10)
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.status == 200 and r.read() == b"Ok.\n", path
        conn.close()


def t_create(ctx):
    p = ctx["port"]
    ok(query(p, f"CREATE DATABASE IF NOT EXISTS {DB}"), "create db")
    cols = ", ".join(f"{n} {t}" for n, t in COLUMNS)
    # No db prefix: must land in `database`.
    ok(query(p, f"CREATE TABLE {TABLE} ({cols}) ENGINE = MergeTree ORDER BY (kind, ts)",
             database=DB), "create table")
    r = ok(query(p, "SELECT database FROM system.tables WHERE name = {t:String} AND database != 'system'",
                 param_t=TABLE))
    assert r.body == f"{DB}\n".encode(), r.body


def t_describe_like_crate(ctx):
    r, plain, _ = fetch_rows(ctx["port"], f"DESCRIBE TABLE {TABLE}",
                             fmt="RowBinaryWithNamesAndTypes", describe_include_subcolumns="0")
    rd = Reader(plain)
    ncol = rd.varint()
    names = [rd.str() for _ in range(ncol)]
    types = [rd.str() for _ in range(ncol)]
    assert names[:2] == ["name", "type"] and ncol == 7, names
    assert all(t == "String" for t in types), types
    got = []
    while not rd.done():
        row = [rd.str() for _ in range(ncol)]
        got.append((row[0], row[1]))
    assert got == COLUMNS, got
    ctx["types"] = got


def t_insert_rowbinary(ctx):
    rows = make_rows(0, 5000)  # ~ 300 KiB -> several chunks/blocks
    payload = b"".join(encode_row(r) for r in rows)
    r, nchunks = insert_like_crate(ctx["port"], INSERT_SQL_RB, payload)
    ok(r, "insert RowBinary")
    assert nchunks > 1, nchunks
    summary = json.loads(r.header("X-ClickHouse-Summary"))
    assert summary["written_rows"] == "5000", summary
    ctx["rows"] = rows


def t_insert_rbwnat(ctx):
    rows = make_rows(5000, 10)
    payload = rbwnat_header(ctx["types"]) + b"".join(encode_row(r) for r in rows)
    r, _ = insert_like_crate(ctx["port"], INSERT_SQL_RBWNAT, payload,
                             extra={"async_insert": "1", "wait_for_async_insert": "1",
                                    "insert_deduplication_token": "tok-1"})
    ok(r, "insert RowBinaryWithNamesAndTypes (async)")
    ctx["rows"] += rows


def t_select_rowbinary(ctx):
    r, plain, _ = fetch_rows(ctx["port"], f"SELECT ts, kind, attrs, value, n FROM {TABLE} "
                                          "ORDER BY n")
    assert r.header("X-ClickHouse-Format") == "RowBinary", r.headers
    rd = Reader(plain)
    got = []
    while not rd.done():
        got.append(decode_row(rd))
    assert got == ctx["rows"], (len(got), got[:2], ctx["rows"][:2])


def t_select_rbwnat(ctx):
    _, plain, _ = fetch_rows(ctx["port"], f"SELECT ?fields FROM {TABLE} ORDER BY n LIMIT 3"
                             .replace("?fields", "ts, kind, attrs, value, n"),
                             fmt="RowBinaryWithNamesAndTypes")
    rd = Reader(plain)
    ncol = rd.varint()
    names = [rd.str() for _ in range(ncol)]
    types = [rd.str() for _ in range(ncol)]
    assert list(zip(names, types)) == COLUMNS, (names, types)
    got = [decode_row(rd) for _ in range(3)]
    assert rd.done() and got == ctx["rows"][:3]


def t_select_json(ctx):
    _, plain, _ = fetch_rows(ctx["port"], f"SELECT * FROM {TABLE} ORDER BY n LIMIT 4",
                             fmt="JSONEachRow", output_format_json_quote_64bit_integers="0")
    lines = [json.loads(x) for x in plain.decode().splitlines()]
    assert len(lines) == 4
    for got, want in zip(lines, ctx["rows"][:4]):
        assert got["ts"] == ns_to_text(want["ts"]), (got["ts"], want["ts"])
        assert got["kind"] == want["kind"] and got["attrs"] == want["attrs"], got
        assert got["value"] == want["value"] and got["n"] == want["n"], got


def t_large_result_multiblock(ctx):
    _, plain, blocks = fetch_rows(ctx["port"], "SELECT number FROM numbers(300000)")
    assert len(plain) == 300000 * 8 and blocks >= 2, (len(plain), blocks)
    assert struct.unpack_from("<Q", plain, 8 * 299999)[0] == 299999


def t_params(ctx):
    r = ok(query(ctx["port"], "SELECT {a:UInt64} + 1 AS x, {s:String} AS s, "
                              "count() FROM {tbl:Identifier} WHERE kind = {k:String} "
                              "FORMAT JSONEachRow",
                 database=DB, param_a="41", param_s="it's\\ta", param_tbl=TABLE,
                 param_k="ship"))
    row = json.loads(r.body)
    want = sum(1 for x in ctx["rows"] if x["kind"] == "ship")
    assert row == {"x": 42, "s": "it's\ta", "count()": want}, row


def t_settings_are_per_request(ctx):
    p = ctx["port"]
    sql = "SELECT getSetting('date_time_input_format'), getSetting('max_threads') > 0"
    base = ok(query(p, sql)).body
    r = ok(query(p, sql, date_time_input_format="best_effort"))
    assert r.body.startswith(b"best_effort\t"), r.body
    assert ok(query(p, sql)).body == base, "URL setting leaked into the next request"
    ok(query(p, "SET date_time_input_format = 'best_effort'"))
    assert ok(query(p, sql)).body == base, "SET statement leaked into the next request"
    assert ok(query(p, "SELECT currentDatabase()")).body == b"default\n"


def t_errors(ctx):
    p = ctx["port"]
    r = query(p, "SELECT * FROM no_such_table", database=DB)
    assert r.status == 404, r.status
    assert r.header("X-ClickHouse-Exception-Code") == "60", r.headers
    assert r.body.startswith(b"Code: 60. DB::Exception: ") and b"UNKNOWN_TABLE" in r.body, r.body
    r = query(p, "SELEC 1")
    assert r.status == 400 and r.header("X-ClickHouse-Exception-Code") == "62", (r.status, r.body)
    r = query(p, "SELECT 1", database="no_such_db")
    assert r.header("X-ClickHouse-Exception-Code") == "81", r.body
    r = query(p, "SELECT 1", no_such_setting="1")
    assert r.header("X-ClickHouse-Exception-Code") == "115", r.body
    r = query(p, "")
    assert r.header("X-ClickHouse-Exception-Code") == "62", r.body
    # insert into a missing table, crate style
    r = request(p, [("database", DB), ("query", "INSERT INTO nope(a) FORMAT RowBinary"),
                    ("decompress", "1")], chunks=[crate_compress(b"\x01")])
    assert r.header("X-ClickHouse-Exception-Code") == "60" and r.status == 404, r.body
    # corrupt checksum
    blk = bytearray(crate_compress(encode_row(make_rows(0, 1)[0])))
    blk[3] ^= 0xFF
    r = request(p, [("database", DB), ("query", INSERT_SQL_RB), ("decompress", "1")],
                chunks=[bytes(blk)])
    assert r.header("X-ClickHouse-Exception-Code") == "40", r.body
    # truncated RowBinary
    r, _ = insert_like_crate(p, INSERT_SQL_RB, encode_row(make_rows(0, 1)[0])[:-3])
    assert r.status == 500 and r.header("X-ClickHouse-Exception-Code") == "33", r.body
    # garbage path and junk request must not kill the server
    conn = socket.create_connection(("127.0.0.1", p), timeout=10)
    conn.sendall(b"POST /?query=SELECT+1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    conn.close()
    assert ok(query(p, "SELECT 1")).body == b"1\n"


def t_aborted_insert(ctx):
    p = ctx["port"]
    payload = b"".join(encode_row(r) for r in make_rows(9000, 10))
    conn = socket.create_connection(("127.0.0.1", p), timeout=10)
    q = urllib.parse.urlencode([("database", DB), ("query", INSERT_SQL_RB), ("decompress", "1")])
    blk = crate_compress(payload)
    conn.sendall(f"POST /?{q} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 .encode() + b"%x\r\n" % len(blk) + blk + b"\r\n")
    conn.close()  # like the crate's abort: drop the connection mid-body
    time.sleep(0.3)
    r = ok(query(p, f"SELECT count() FROM {TABLE}", database=DB))
    assert int(r.body) == len(ctx["rows"]), r.body


def t_gzip_response(ctx):
    import gzip
    r = ok(request(ctx["port"], {"enable_http_compression": "1"}, "SELECT 'hello'",
                   headers={"Accept-Encoding": "gzip"}))
    assert r.header("Content-Encoding") == "gzip" and gzip.decompress(r.body) == b"hello\n"


def t_concurrent(ctx):
    import threading
    p = ctx["port"]
    errors = []

    def worker(k):
        try:
            for i in range(15):
                fmt = "best_effort" if (k + i) % 2 else None
                extra = {"date_time_input_format": fmt} if fmt else {}
                r = ok(request(p, dict(param_v=str(k * 100 + i), **extra),
                               "SELECT {v:UInt32}, getSetting('date_time_input_format')"))
                want_fmt = fmt or "basic"
                assert r.body == f"{k * 100 + i}\t{want_fmt}\n".encode(), r.body
        except Exception as e:  # collected and re-raised below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]


def t_keep_alive(ctx):
    """Several requests on one connection, as hyper's pool does."""
    p = ctx["port"]
    conn = http.client.HTTPConnection("127.0.0.1", p, timeout=30)
    try:
        payload = b"".join(encode_row(r) for r in make_rows(20000, 3))
        q = urllib.parse.urlencode([("database", DB), ("query", INSERT_SQL_RB),
                                    ("decompress", "1")])
        conn.putrequest("POST", "/?" + q)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        blk = crate_compress(payload)
        conn.send(b"%x\r\n" % len(blk) + blk + b"\r\n0\r\n\r\n")
        r = conn.getresponse()
        assert r.status == 200, r.read()
        r.read()
        conn.request("POST", "/?database=" + DB, body=b"SELECT * FROM nope")
        r = conn.getresponse()
        assert r.status == 404 and b"Code: 60" in r.read()
        conn.request("POST", "/?compress=1&database=" + DB,
                     body=f"SELECT count() FROM {TABLE}".encode())
        r = conn.getresponse()
        assert r.status == 200
        body, _ = crate_decompress(r.read())
        assert int(body) == len(ctx["rows"]) + 3, body
        conn.request("GET", "/ping")
        assert conn.getresponse().read() == b"Ok.\n"
    finally:
        conn.close()
    ctx["rows"] += make_rows(20000, 3)


def run_all():
    results = []
    tmp = tempfile.mkdtemp(prefix="chdb-http-test-")
    data_dir = os.path.join(tmp, "data")
    ctx = {}

    def check(name, fn):
        t0 = time.monotonic()
        try:
            fn(ctx)
            results.append((name, True))
            print(f"ok   {name} ({time.monotonic() - t0:.2f}s)", flush=True)
        except Exception:
            results.append((name, False))
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)

    check("checksum_vector", t_checksum_vector)
    srv = ServerProc(data_dir)
    try:
        ctx["port"] = srv.port
        for name, fn in [
            ("ping", t_ping), ("create", t_create),
            ("describe_like_crate", t_describe_like_crate),
            ("insert_rowbinary_lz4", t_insert_rowbinary),
            ("insert_rbwnat_async", t_insert_rbwnat),
            ("select_rowbinary_lz4", t_select_rowbinary),
            ("select_rbwnat_lz4", t_select_rbwnat),
            ("select_jsoneachrow_lz4", t_select_json),
            ("large_result_multiblock", t_large_result_multiblock),
            ("params", t_params),
            ("settings_per_request", t_settings_are_per_request),
            ("errors", t_errors),
            ("aborted_insert", t_aborted_insert),
            ("gzip_response", t_gzip_response),
            ("concurrent_requests", t_concurrent),
            ("keep_alive", t_keep_alive),
        ]:
            check(name, fn)
    finally:
        rc = srv.stop()
        srv.kill()

    def t_sigterm(c):
        assert rc == 0, f"exit code {rc}"

    check("sigterm_clean_exit", t_sigterm)

    srv = ServerProc(data_dir)
    try:
        ctx["port"] = srv.port

        def t_persist(c):
            t_select_rowbinary(c)

        check("persistence_after_restart", t_persist)
    finally:
        srv.stop()
        srv.kill()

    srv = ServerProc(data_dir, ["--password", "s3cret"])
    try:
        p = srv.port

        def t_password(c):
            r = query(p, "SELECT 1")
            assert r.status == 403 and r.header("X-ClickHouse-Exception-Code") == "516", \
                (r.status, r.body)
            assert r.body.startswith(b"Code: 516. DB::Exception: ") and \
                b"AUTHENTICATION_FAILED" in r.body, r.body
            r = request(p, {}, "SELECT 1", headers={"X-ClickHouse-User": "default",
                                                    "X-ClickHouse-Key": "wrong"})
            assert r.status == 403, r.status
            r = request(p, {}, "SELECT 1", headers={"X-ClickHouse-User": "default",
                                                    "X-ClickHouse-Key": "s3cret"})
            assert ok(r).body == b"1\n"
            basic = base64.b64encode(b"default:s3cret").decode()
            assert ok(request(p, {}, "SELECT 2",
                              headers={"Authorization": f"Basic {basic}"})).body == b"2\n"
            assert ok(request(p, {"user": "default", "password": "s3cret"},
                              "SELECT 3")).body == b"3\n"
            conn = http.client.HTTPConnection("127.0.0.1", p, timeout=10)
            conn.request("GET", "/ping")
            assert conn.getresponse().status == 200
            conn.close()
            with open(os.path.join(tmp, "data-stderr.log"), "rb") as f:
                assert b"s3cret" not in f.read(), "password leaked into the log"

        check("password", t_password)
    finally:
        srv.stop()
        srv.kill()

    passed = sum(1 for _, good in results if good)
    failed = len(results) - passed
    if failed:
        print(f"server log: {os.path.join(tmp, 'data-stderr.log')}")
    else:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run_all())
