#!/usr/bin/env python3
"""A small stand-in for ClickHouse's HTTP interface, backed by chDB (PyPI `chdb-core`).

It serves the part of the HTTP interface that the official Rust `clickhouse`
crate (v0.15, HTTP + RowBinary, LZ4 on) uses, so integration tests can point
the crate at a real ClickHouse engine (chDB 26.9, in-process) without a server.

Usage:
    python tests/support/chdb_http.py --port 0 --data-dir DIR [--port-file FILE]
                                      [--user NAME] [--password PW]

Prints `LISTENING <port>` on stdout once it accepts connections; binds
127.0.0.1 only; keeps its tables in DIR across restarts; exits cleanly on
SIGTERM/SIGINT. Needs the packages in tests/support/requirements.txt.

What the crate sends (read from ClickHouse/clickhouse-rs 0.15.1, src/query.rs,
src/insert.rs, src/insert_formatted.rs, src/headers.rs, src/response.rs,
src/compression/lz4.rs, src/lib.rs):

* Queries (`Query::execute/fetch/fetch_bytes`): `POST /?<params>` with the SQL
  text as the (uncompressed, Content-Length) body. URL params, in this order:
  `default_format=RowBinaryWithNamesAndTypes` for `fetch()` (validation is ON
  by default since 0.14; `RowBinary` only when validation is disabled; any
  format for `fetch_bytes(fmt)`; none for `execute()`), `database=<db>` if
  set on the client, `compress=1` when compression is enabled (the default
  with the `lz4` feature), then every client/query setting as `name=value`
  (query parameters are settings named `param_<name>`, values already in
  ClickHouse's escaped text form), then `role=<r>` per role.
* Inserts (`Insert`/`Inserter`/`InsertFormatted`): `POST /?database=<db>&
  query=INSERT INTO <table>(<cols>) FORMAT RowBinaryWithNamesAndTypes
  &decompress=1&<settings>` (format `RowBinary` when validation is off). The
  body is streamed with `Transfer-Encoding: chunked`; each chunk (about 256
  KiB of rows) is one ClickHouse compressed block. With validation on, the
  crate first runs `DESCRIBE TABLE <table>` (setting
  `describe_include_subcolumns=0`, RowBinaryWithNamesAndTypes) and the insert
  body starts with the RowBinaryWithNamesAndTypes header. The insert response
  is read without decompression. An aborted insert just drops the connection.
* Auth: headers `X-ClickHouse-User` / `X-ClickHouse-Key` (or `Authorization:
  Bearer <jwt>` for JWT); never URL params. A `User-Agent: clickhouse-rs/...`
  header. `Accept-Encoding: zstd` + `enable_http_compression=1` only with the
  `zstd` compression mode (not used here), never gzip.
* Responses: success = HTTP 200 without `X-ClickHouse-Exception-Code`;
  otherwise the body (decompressed if it can be, raw otherwise) is the error
  text. `X-ClickHouse-Summary` is parsed as a JSON object of string values.
  Mid-stream errors are detected by a trailing `Code: N. DB::Exception: ...`
  (or the 25.11+ `__exception__` tag format); this server buffers whole
  results so it never needs that.
* Compressed block format (both directions): 16-byte checksum, then the
  9-byte header: method byte (0x82 = LZ4), uint32 LE size of header+data,
  uint32 LE uncompressed size, then the raw LZ4 block. The checksum is
  CityHash v1.0.2 128-bit of header+data, written as the two 64-bit halves
  `first` (low64) then `second`, each little-endian. The crate computes
  `cityhash_102_128(buf).rotate_right(64)` and compares it with the first 16
  bytes read as a u128 LE, i.e. exactly ClickHouse's order. With PyPI
  `clickhouse-cityhash` (`clickhouse_cityhash.cityhash.CityHash128`, which
  returns a Python int) the wire bytes are `struct.pack('<QQ', h >> 64,
  h & (2**64 - 1))` -- checked against the crate's own test vector
  (`it_compresses` in src/compression/lz4.rs). A plain `h.to_bytes(16,
  'little')` is the swapped (wrong) order; we accept that on input too.

chDB details this relies on (chdb-core 26.9.0, engine 26.9.2.1):

* `Session.send_insert("INSERT INTO t (cols)", fmt)` + `append(bytes)` +
  `finish()` streams binary data into an INSERT (RowBinary,
  RowBinaryWithNamesAndTypes, any input format); `FROM INFILE` is not needed.
  `SETTINGS ...` inside the INSERT prefix works.
* `Session.query(sql, fmt, params={...})` supports `{name:Type}` query
  parameters natively (values in ClickHouse's escaped text form, like the
  HTTP interface). `send_insert` has no params argument, so for data inserts
  the params are set with `SET param_<name>=...` (they then linger in the
  session, harmless).
* A FORMAT clause in the SQL wins over the `fmt` argument. The Python wrapper
  treats the format names DataFrame/DataStore/ArrowTable/Debug specially; they
  are rejected here as UNKNOWN_FORMAT.
* chDB's built-in defaults differ from a server's for date_time_input_format
  (best_effort), async_insert (1) and implicit_select (1); they are SET to
  the server values (basic, 0, 0) at startup and form the baseline below.
* The session is one shared ClickHouse context: `USE db` and `SET x=...`
  persist across calls. So every request does `USE <database or default>`,
  applies its URL settings with `SET`, and afterwards the changed settings
  are put back to the startup baseline (`SET x = <old>` / `SET x = DEFAULT`).
  A client `SET ...` statement is undone the same way (as on a real server
  without session_id). chDB allows multi-statement queries (ClickHouse's
  HTTP does not); not policed here.
* Errors are `ChdbError`/`RuntimeError` whose text contains
  `Code: N. DB::Exception: ... (NAME)`; HTTP statuses follow ClickHouse's
  src/Server/HTTP/exceptionCodeToHTTPStatus.cpp (e.g. 60 UNKNOWN_TABLE ->
  404, 62 SYNTAX_ERROR -> 400, 516 AUTHENTICATION_FAILED -> 403, else 500),
  with the numeric codes looked up from the engine via errorCodeToName().

Not supported: HTTP sessions (`session_id` is ignored), `readonly` (ignored:
setting it would lock the shared session), ZSTD blocks/encodings,
`INSERT ... SELECT ... FROM input() FORMAT X` with data, streaming of
results (each result is buffered, then sent with Content-Length).
"""

import argparse
import base64
import gzip
import json
import os
import re
import signal
import socket
import struct
import sys
import threading
import time
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

import lz4.block
import lz4.frame
from chdb import session as chdb_session
from clickhouse_cityhash.cityhash import CityHash128

M64 = (1 << 64) - 1
METHOD_NONE = 0x02
METHOD_LZ4 = 0x82
METHOD_ZSTD = 0x90
BLOCK_SIZE = 1 << 20  # ClickHouse's DBMS_DEFAULT_BUFFER_SIZE
MAX_BLOCK = 1 << 30

# URL params the ClickHouse HTTP handler consumes itself (not settings).
RESERVED_PARAMS = {
    "query", "database", "default_format", "compress", "decompress", "user",
    "password", "quota_key", "query_id", "stacktrace", "role", "buffer_size",
    "wait_end_of_query", "session_id", "session_timeout", "session_check",
    "client_protocol_version", "close_session", "readonly",
}
# Settings whose chDB default differs from a ClickHouse server's (checked with
# `SELECT name, value, default FROM system.settings` on chdb-core 26.9.0).
SERVER_DEFAULTS = {
    "date_time_input_format": "basic",  # chDB: best_effort
    "async_insert": "0",                # chDB: 1
    "implicit_select": "0",             # chDB: 1 (bare `1+1` would run)
}
# chDB Python wrapper formats that are not ClickHouse formats.
PY_ONLY_FORMATS = {"dataframe", "datastore", "arrowtable", "debug"}

# Status mapping from ClickHouse src/Server/HTTP/exceptionCodeToHTTPStatus.cpp.
STATUS_BY_NAME = {}
for _n in ["REQUIRED_PASSWORD"]:
    STATUS_BY_NAME[_n] = 401
for _n in ["UNKNOWN_USER", "WRONG_PASSWORD", "AUTHENTICATION_FAILED",
           "SET_NON_GRANTED_ROLE", "ACCESS_DENIED"]:
    STATUS_BY_NAME[_n] = 403
for _n in ["BAD_ARGUMENTS", "CANNOT_COMPILE_REGEXP", "CANNOT_PARSE_TEXT",
           "CANNOT_PARSE_ESCAPE_SEQUENCE", "CANNOT_PARSE_QUOTED_STRING",
           "CANNOT_PARSE_DATE", "CANNOT_PARSE_DATETIME", "CANNOT_PARSE_NUMBER",
           "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING", "CANNOT_PARSE_IPV4",
           "CANNOT_PARSE_IPV6", "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
           "CANNOT_PARSE_UUID", "DUPLICATE_COLUMN", "ILLEGAL_COLUMN",
           "UNKNOWN_ELEMENT_IN_AST", "UNKNOWN_TYPE_OF_AST_NODE",
           "THERE_IS_NO_COLUMN", "TOO_DEEP_AST", "TOO_BIG_AST",
           "UNEXPECTED_AST_STRUCTURE", "SYNTAX_ERROR", "INCORRECT_DATA",
           "TYPE_MISMATCH", "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE"]:
    STATUS_BY_NAME[_n] = 400
for _n in ["UNKNOWN_TABLE", "UNKNOWN_FUNCTION", "UNKNOWN_IDENTIFIER",
           "UNKNOWN_TYPE", "UNKNOWN_STORAGE", "UNKNOWN_DATABASE",
           "UNKNOWN_SETTING", "UNKNOWN_DIRECTION_OF_SORTING",
           "UNKNOWN_AGGREGATE_FUNCTION", "UNKNOWN_FORMAT",
           "UNKNOWN_DATABASE_ENGINE", "UNKNOWN_TYPE_OF_QUERY", "UNKNOWN_ROLE"]:
    STATUS_BY_NAME[_n] = 404
STATUS_BY_NAME.update({
    "QUERY_IS_TOO_LARGE": 413, "NOT_IMPLEMENTED": 501, "SOCKET_TIMEOUT": 503,
    "CANNOT_OPEN_FILE": 503, "HTTP_LENGTH_REQUIRED": 411,
    "TIMEOUT_EXCEEDED": 408, "CANNOT_SCHEDULE_TASK": 503,
    "UNSUPPORTED_MEDIA_TYPE": 415,
})

# Codes this server raises itself (stable ClickHouse numbers).
SYNTAX_ERROR = (62, "SYNTAX_ERROR")
BAD_ARGUMENTS = (36, "BAD_ARGUMENTS")
UNKNOWN_FORMAT = (73, "UNKNOWN_FORMAT")
UNKNOWN_SETTING = (115, "UNKNOWN_SETTING")
CHECKSUM_DOESNT_MATCH = (40, "CHECKSUM_DOESNT_MATCH")
UNKNOWN_COMPRESSION_METHOD = (89, "UNKNOWN_COMPRESSION_METHOD")
CANNOT_DECOMPRESS = (271, "CANNOT_DECOMPRESS")
AUTHENTICATION_FAILED = (516, "AUTHENTICATION_FAILED")
STD_EXCEPTION = (1001, "STD_EXCEPTION")

CONTENT_TYPES = {
    "tabseparated": "text/tab-separated-values; charset=UTF-8",
    "tsv": "text/tab-separated-values; charset=UTF-8",
    "tabseparatedwithnames": "text/tab-separated-values; charset=UTF-8",
    "tabseparatedwithnamesandtypes": "text/tab-separated-values; charset=UTF-8",
    "csv": "text/csv; charset=UTF-8; header=absent",
    "csvwithnames": "text/csv; charset=UTF-8; header=present",
    "json": "application/json; charset=UTF-8",
    "jsoncompact": "application/json; charset=UTF-8",
    "jsoneachrow": "application/x-ndjson; charset=UTF-8",
    "jsoncompacteachrow": "application/x-ndjson; charset=UTF-8",
    "rowbinary": "application/octet-stream",
    "rowbinarywithnames": "application/octet-stream",
    "rowbinarywithnamesandtypes": "application/octet-stream",
    "native": "application/octet-stream",
    "parquet": "application/octet-stream",
    "arrow": "application/octet-stream",
    "arrowstream": "application/octet-stream",
}

ENGINE_VERSION = "unknown"


class CHError(Exception):
    """An error to report the ClickHouse way."""

    def __init__(self, code, name, message, text=None):
        super().__init__(message)
        self.code = code
        self.name = name
        self.message = message
        self.text = text  # full "Code: N. DB::Exception: ..." text, if known

    def body(self):
        if self.text:
            text = self.text.strip()
        else:
            text = f"Code: {self.code}. DB::Exception: {self.message}. ({self.name})"
        if "(version " not in text:
            text += f" (version {ENGINE_VERSION})"
        return (text + "\n").encode("utf-8", "replace")


def err(kind, message):
    return CHError(kind[0], kind[1], message)


def from_engine_error(exc):
    """Turn a chDB exception into a CHError, keeping ClickHouse's text."""
    msg = str(exc)
    m = re.search(r"Code: (\d+)\. ", msg)
    if not m:
        return CHError(STD_EXCEPTION[0], STD_EXCEPTION[1], msg.strip() or type(exc).__name__)
    text = msg[m.start():].strip()
    names = re.findall(r"\(([A-Z][A-Z0-9_]+)\)", text)
    return CHError(int(m.group(1)), names[-1] if names else "", text, text=text)


# ---------------------------------------------------------------- compression

def block_checksum(data):
    """ClickHouse's on-wire checksum of header+data (see module docstring)."""
    h = CityHash128(data)
    return struct.pack("<QQ", h >> 64, h & M64)


def compress_blocks(data, block_size=BLOCK_SIZE):
    out = bytearray()
    for off in range(0, len(data), block_size):
        chunk = data[off:off + block_size]
        comp = lz4.block.compress(chunk, store_size=False)
        head = struct.pack("<BII", METHOD_LZ4, 9 + len(comp), len(chunk))
        body = head + comp
        out += block_checksum(body) + body
    return bytes(out)


def decompress_blocks(data, verify=True):
    out = bytearray()
    pos = 0
    n = len(data)
    while pos < n:
        if n - pos < 25:
            raise err(CANNOT_DECOMPRESS, "Cannot decompress: truncated block header")
        checksum = data[pos:pos + 16]
        method, csize, usize = struct.unpack_from("<BII", data, pos + 16)
        if csize < 9 or csize > MAX_BLOCK or usize > MAX_BLOCK:
            raise err(CANNOT_DECOMPRESS, f"Too large size of compressed block: {csize}")
        end = pos + 16 + csize
        if end > n:
            raise err(CANNOT_DECOMPRESS, "Cannot decompress: truncated block")
        body = data[pos + 16:end]
        if verify:
            h = CityHash128(body)
            ok = checksum in (struct.pack("<QQ", h >> 64, h & M64),
                              struct.pack("<QQ", h & M64, h >> 64))
            if not ok:
                raise err(CHECKSUM_DOESNT_MATCH,
                          "Checksum doesn't match: corrupted data. Size of compressed "
                          f"block: {csize}")
        payload = body[9:]
        if method == METHOD_LZ4:
            try:
                plain = lz4.block.decompress(payload, uncompressed_size=usize)
            except Exception as e:  # lz4.block.LZ4BlockError
                raise err(CANNOT_DECOMPRESS, f"Cannot decompress LZ4 block: {e}")
            if len(plain) != usize:
                raise err(CANNOT_DECOMPRESS, "Cannot decompress LZ4 block: size mismatch")
        elif method == METHOD_NONE:
            plain = payload
            if len(plain) != usize:
                raise err(CANNOT_DECOMPRESS, "Uncompressed block size mismatch")
        else:
            raise err(UNKNOWN_COMPRESSION_METHOD,
                      f"Unknown compression method: {method:#x} (only LZ4 and NONE)")
        out += plain
        pos = end
    return bytes(out)


def decode_content_encoding(body, encoding):
    enc = (encoding or "").strip().lower()
    if enc in ("", "identity", "none"):
        return body
    try:
        if enc in ("gzip", "x-gzip"):
            return gzip.decompress(body)
        if enc == "deflate":
            return zlib.decompress(body)
        if enc == "lz4":
            return lz4.frame.decompress(body)
    except Exception as e:
        raise err(CANNOT_DECOMPRESS, f"Cannot decode body with Content-Encoding {enc}: {e}")
    raise err(UNKNOWN_COMPRESSION_METHOD, f"Unsupported Content-Encoding: {enc}")


def pick_accept_encoding(header):
    offered = [p.split(";")[0].strip().lower() for p in (header or "").split(",")]
    for enc in ("gzip", "deflate", "lz4"):
        if enc in offered:
            return enc
    return None


def encode_content(body, enc):
    if enc == "gzip":
        return gzip.compress(body, 3)
    if enc == "deflate":
        return zlib.compress(body, 3)
    if enc == "lz4":
        return lz4.frame.compress(body)
    return body


# ---------------------------------------------------------------- SQL lexing

_WS = b" \t\n\r\f\v"


def sql_tokens(buf):
    """Yield (kind, start, end, depth) for SQL text in bytes `buf`.

    kind: 'word', 'string', 'quoted', 'sym'. Comments are skipped. Enough to
    find top-level keywords without being fooled by literals.
    """
    i, n, depth = 0, len(buf), 0
    while i < n:
        c = buf[i]
        if c in _WS:
            i += 1
            continue
        if buf.startswith(b"--", i) or buf.startswith(b"#", i):
            j = buf.find(b"\n", i)
            i = n if j < 0 else j + 1
            continue
        if buf.startswith(b"/*", i):
            j = buf.find(b"*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        if c in b"'\"`":
            j = i + 1
            while j < n:
                if buf[j] == 0x5C:  # backslash escape
                    j += 2
                    continue
                if buf[j] == c:
                    if j + 1 < n and buf[j + 1] == c:  # doubled quote
                        j += 2
                        continue
                    break
                j += 1
            yield ("string" if c == 0x27 else "quoted", i, min(j + 1, n), depth)
            i = j + 1
            continue
        if chr(c).isalpha() or c == 0x5F or c >= 0x80:
            j = i + 1
            while j < n and (chr(buf[j]).isalnum() or buf[j] == 0x5F or buf[j] >= 0x80):
                j += 1
            yield ("word", i, j, depth)
            i = j
            continue
        if c in b"([{":
            yield ("sym", i, i + 1, depth)
            depth += 1
        elif c in b")]}":
            depth = max(0, depth - 1)
            yield ("sym", i, i + 1, depth)
        else:
            yield ("sym", i, i + 1, depth)
        i += 1


def first_keyword(buf):
    for kind, s, e, _ in sql_tokens(buf):
        return buf[s:e].upper() if kind == "word" else b""
    return b""


def split_insert(buf):
    """For `INSERT ... FORMAT Fmt<data>` return (prefix_sql_bytes, fmt, data).

    Returns None when the statement is not an INSERT carrying inline data in a
    named format (e.g. INSERT ... VALUES / INSERT ... SELECT, or not INSERT).
    Data starts after the format name: spaces/tabs are skipped, then one
    optional CR and one optional LF (like ClickHouse's ParserInsertQuery).
    """
    toks = sql_tokens(buf)
    first = next(toks, None)
    if not first or first[0] != "word" or buf[first[1]:first[2]].upper() != b"INSERT":
        return None
    for kind, s, e, depth in toks:
        if kind != "word" or depth != 0:
            continue
        w = buf[s:e].upper()
        if w in (b"VALUES", b"SELECT", b"WITH"):
            return None
        if w == b"FORMAT":
            nxt = next(toks, None)
            if not nxt or nxt[0] != "word":
                return None
            fmt = buf[nxt[1]:nxt[2]].decode("ascii", "replace")
            p = nxt[2]
            while p < len(buf) and buf[p] in b" \t\f":
                p += 1
            if p < len(buf) and buf[p] == 0x0D:
                p += 1
            if p < len(buf) and buf[p] == 0x0A:
                p += 1
            return buf[:s], fmt, buf[p:]
    return None


def trailing_format(buf):
    """The format named by a top-level `FORMAT X` clause (last one), if any."""
    found = None
    prev_format = False
    for kind, s, e, depth in sql_tokens(buf):
        if prev_format and kind == "word":
            found = buf[s:e].decode("ascii", "replace")
        prev_format = kind == "word" and depth == 0 and buf[s:e].upper() == b"FORMAT"
    return found


def quote_ident(name):
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def quote_str(value):
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


_SETTING_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ---------------------------------------------------------------- engine

class Engine:
    """The chDB session, used by one request at a time."""

    def __init__(self, data_dir):
        global ENGINE_VERSION
        os.makedirs(data_dir, exist_ok=True)
        self.lock = threading.Lock()
        self.sess = chdb_session.Session(os.path.abspath(data_dir))
        ENGINE_VERSION = self._scalar("SELECT version()")
        self.timezone = self._scalar("SELECT timezone()")
        # chDB's compiled-in defaults differ from a ClickHouse server's for a
        # few settings that matter to clients; put the server's back.
        for name, value in SERVER_DEFAULTS.items():
            self.sess.query(f"SET {name} = {quote_str(value)}")
        self.baseline = self._changed_settings()
        names = sorted(set(STATUS_BY_NAME))
        rows = self.sess.query(
            "SELECT number, errorCodeToName(number) FROM numbers(2000) "
            "WHERE errorCodeToName(number) IN (" + ",".join(quote_str(n) for n in names) + ")",
            "TabSeparated").bytes().decode()
        self.status_by_code = {}
        for line in rows.splitlines():
            code, name = line.split("\t")
            self.status_by_code[int(code)] = STATUS_BY_NAME[name]

    def _scalar(self, sql):
        return self.sess.query(sql, "TabSeparated").bytes().decode().strip()

    def _changed_settings(self):
        out = {}
        raw = self.sess.query(
            "SELECT name, value FROM system.settings WHERE changed", "JSONEachRow").bytes()
        for line in raw.decode().splitlines():
            if line.strip():
                row = json.loads(line)
                out[row["name"]] = row["value"]
        out.pop("database", None)
        return out

    def _restore_settings(self):
        now = self._changed_settings()
        for name, value in now.items():
            if self.baseline.get(name) == value:
                continue
            if name in self.baseline:
                self.sess.query(f"SET {name} = {quote_str(self.baseline[name])}")
            else:
                self.sess.query(f"SET {name} = DEFAULT")
        for name, value in self.baseline.items():
            if name not in now:
                self.sess.query(f"SET {name} = {quote_str(value)}")

    def http_status(self, code):
        return self.status_by_code.get(code, 500)

    def close(self):
        with self.lock:
            try:
                self.sess.close()
            except Exception:
                pass

    def run(self, database, settings, params, sql_bytes, out_format):
        """Execute one request. Returns (body, summary, format_used)."""
        ins = split_insert(sql_bytes)
        if ins is None:
            try:
                sql = sql_bytes.decode("utf-8")
            except UnicodeDecodeError:
                raise err(SYNTAX_ERROR, "Query is not valid UTF-8")
            fmt = trailing_format(sql_bytes) or out_format
            if fmt.lower() in PY_ONLY_FORMATS:
                raise err(UNKNOWN_FORMAT, f"Unknown output format {fmt}")
        else:
            prefix, fmt, data = ins
            if fmt.lower() in PY_ONLY_FORMATS:
                raise err(UNKNOWN_FORMAT, f"Unknown input format {fmt}")
            try:
                prefix_sql = prefix.decode("utf-8").rstrip()
            except UnicodeDecodeError:
                raise err(SYNTAX_ERROR, "Query is not valid UTF-8")

        restore = bool(settings) or bool(params and ins is not None) \
            or first_keyword(sql_bytes) == b"SET"
        with self.lock:
            try:
                self.sess.query(f"USE {quote_ident(database or 'default')}")
                for name, value in settings:
                    if not _SETTING_NAME.match(name):
                        raise err(UNKNOWN_SETTING, f"Unknown setting '{name}'")
                    self.sess.query(f"SET {name} = {quote_str(value)}")
                if ins is None:
                    res = self.sess.query(sql, fmt, params=params or None)
                    body = res.bytes()
                    summary = {
                        "read_rows": res.rows_read(), "read_bytes": res.bytes_read(),
                        "written_rows": res.rows_written(),
                        "written_bytes": res.bytes_written(),
                        "total_rows_to_read": res.rows_read(),
                        "result_rows": 0, "result_bytes": len(body),
                        "elapsed_ns": int(res.elapsed() * 1e9),
                    }
                    return body, summary, fmt
                for name, value in (params or {}).items():
                    if not _SETTING_NAME.match(name):
                        raise err(BAD_ARGUMENTS, f"Bad query parameter name '{name}'")
                    self.sess.query(f"SET param_{name} = {quote_str(value)}")
                inserter = self.sess.send_insert(prefix_sql, fmt)
                try:
                    if data:
                        inserter.append(data)
                    res = inserter.finish()
                except BaseException:
                    try:
                        inserter.cancel()
                    except Exception:
                        pass
                    raise
                summary = {
                    "read_rows": res.rows_written, "read_bytes": res.bytes_written,
                    "written_rows": res.rows_written, "written_bytes": res.bytes_written,
                    "total_rows_to_read": 0, "result_rows": res.rows_written,
                    "result_bytes": res.bytes_written,
                    "elapsed_ns": int(res.elapsed * 1e9),
                }
                return b"", summary, fmt
            except CHError:
                raise
            except Exception as e:
                raise from_engine_error(e)
            finally:
                if restore:
                    try:
                        self._restore_settings()
                    except Exception as e:  # keep serving; report loudly
                        log(f"WARNING: could not restore session settings: {e}")


# ---------------------------------------------------------------- HTTP

LOG_LOCK = threading.Lock()


def log(line):
    with LOG_LOCK:
        sys.stderr.write(time.strftime("%H:%M:%S ") + line + "\n")
        sys.stderr.flush()


class BodyError(Exception):
    pass


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "chdb-http"
    sys_version = ""
    timeout = 120  # idle keep-alive / slow body; the crate's pool idles 2 s

    # Set on the class by main().
    engine = None
    auth_user = None
    auth_password = None

    def log_message(self, format, *args):  # silence default logging
        pass

    def version_string(self):
        return "chdb-http"

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (ConnectionError, socket.timeout, TimeoutError):
            self.close_connection = True

    # -- body

    def _read_body(self):
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            parts = []
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise BodyError("connection closed inside chunked body")
                size_s = line.split(b";")[0].strip()
                try:
                    size = int(size_s, 16)
                except ValueError:
                    raise BodyError("bad chunk size")
                if size == 0:
                    while True:  # trailers
                        t = self.rfile.readline(65537)
                        if not t or t in (b"\r\n", b"\n"):
                            break
                    break
                chunk = self.rfile.read(size)
                if len(chunk) != size:
                    raise BodyError("connection closed inside chunk")
                parts.append(chunk)
                self.rfile.readline(3)  # CRLF after chunk
            return b"".join(parts)
        length = self.headers.get("Content-Length")
        if length:
            try:
                n = int(length)
            except ValueError:
                raise BodyError("bad Content-Length")
            data = self.rfile.read(n)
            if len(data) != n:
                raise BodyError("connection closed inside body")
            return data
        return b""

    # -- responses

    def _send(self, status, body, headers=(), content_type="text/plain; charset=UTF-8"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Keep-Alive", "timeout=30")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()

    def _send_error(self, e, query_id):
        status = 500
        if self.engine is not None:
            status = self.engine.http_status(e.code)
        self._send(status, e.body(), [
            ("X-ClickHouse-Exception-Code", str(e.code)),
            ("X-ClickHouse-Query-Id", query_id),
            ("X-ClickHouse-Server-Display-Name", "chdb-http"),
        ])
        return status

    # -- dispatch

    def do_HEAD(self):
        self._dispatch()

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def _dispatch(self):
        started = time.monotonic()
        parts = urlsplit(self.path)
        path = parts.path
        params = parse_qsl(parts.query, keep_blank_values=True)
        pmap = {}
        for k, v in params:
            pmap[k] = v
        query_id = pmap.get("query_id") or str(uuid.uuid4())
        self._sql_head = pmap.get("query", "")[:160].replace("\n", " ")
        status = 0
        size = 0
        note = ""
        try:
            try:
                body = self._read_body() if self.command == "POST" else b""
            except BodyError as e:
                self.close_connection = True
                log(f"{self.command} {path} body error: {e}")
                return
            if path in ("/ping", "/replicas_status") or (
                    path == "/" and self.command in ("GET", "HEAD") and "query" not in pmap):
                status, size = 200, 4
                self._send(200, b"Ok.\n")
                return
            if path != "/":
                status, size = 404, 0
                self._send(404, f"There is no handle {path}\n\n"
                                "Use / or /ping for health checks.\n".encode())
                return
            status, size = self._query(pmap, params, body, query_id)
        except CHError as e:
            status = self._send_error(e, query_id)
            note = e.body().decode("utf-8", "replace").strip().replace("\n", " ")[:300]
        except (ConnectionError, socket.timeout, TimeoutError):
            self.close_connection = True
            status = 499
        except Exception as e:  # never crash a request thread silently
            ce = err(STD_EXCEPTION, f"{type(e).__name__}: {e}")
            try:
                status = self._send_error(ce, query_id)
            except Exception:
                self.close_connection = True
            note = f"internal error: {type(e).__name__}: {e}".replace("\n", " ")
        finally:
            if status:
                ms = (time.monotonic() - started) * 1000
                shown = [(k, v) for k, v in params if k not in ("password", "query")]
                log(f"{self.command} {path} {status} {size}B {ms:.1f}ms "
                    f"params={shown} sql={self._sql_head!r} {note}".rstrip())

    def _check_auth(self, pmap):
        user = self.headers.get("X-ClickHouse-User")
        key = self.headers.get("X-ClickHouse-Key")
        auth = self.headers.get("Authorization") or ""
        if auth.lower().startswith("basic "):
            try:
                u, _, p = base64.b64decode(auth[6:].strip()).decode("utf-8").partition(":")
                user = user or u
                key = key if key is not None else p
            except Exception:
                pass
        if user is None:
            user = pmap.get("user")
        if key is None:
            key = pmap.get("password")
        user = user or "default"
        if self.auth_password is None and self.auth_user is None:
            return user
        ok = (self.auth_password is None or (key or "") == self.auth_password) and (
            self.auth_user is None or user == self.auth_user)
        if not ok:
            raise CHError(AUTHENTICATION_FAILED[0], AUTHENTICATION_FAILED[1], "",
                          text=f"Code: 516. DB::Exception: {user}: Authentication failed: "
                               "password is incorrect, or there is no user with such name. "
                               "(AUTHENTICATION_FAILED)")
        return user

    def _query(self, pmap, params, body, query_id):
        self._check_auth(pmap)
        body = decode_content_encoding(body, self.headers.get("Content-Encoding"))
        settings = []
        qparams = {}
        for k, v in params:
            if k.startswith("param_"):
                qparams[k[len("param_"):]] = v
            elif k not in RESERVED_PARAMS:
                settings.append((k, v))
        verify = pmap.get("http_native_compression_disable_checksumming_on_decompress") \
            not in ("1", "true")
        if pmap.get("decompress") in ("1", "true") and body:
            body = decompress_blocks(body, verify=verify)
        q = pmap.get("query")
        if q is not None:
            sql = q.encode("utf-8") + (b"\n" + body if body else b"")
        else:
            sql = body
        head = q[:160] if q is not None else sql[:160].decode("utf-8", "replace")
        self._sql_head = head.replace("\n", " ")
        if not sql.strip():
            raise err(SYNTAX_ERROR, "Empty query")
        database = pmap.get("database") or self.headers.get("X-ClickHouse-Database") or None
        out_format = pmap.get("default_format") or self.headers.get("X-ClickHouse-Format") \
            or "TabSeparated"
        result, summary, fmt = self.engine.run(database, settings, qparams, sql, out_format)
        headers = [
            ("X-ClickHouse-Query-Id", query_id),
            ("X-ClickHouse-Format", fmt),
            ("X-ClickHouse-Timezone", self.engine.timezone),
            ("X-ClickHouse-Server-Display-Name", "chdb-http"),
            ("X-ClickHouse-Summary", json.dumps({k: str(v) for k, v in summary.items()},
                                                separators=(",", ":"))),
        ]
        if pmap.get("compress") in ("1", "true") and result:
            result = compress_blocks(result)
        if pmap.get("enable_http_compression") in ("1", "true"):
            enc = pick_accept_encoding(self.headers.get("Accept-Encoding"))
            if enc:
                result = encode_content(result, enc)
                headers.append(("Content-Encoding", enc))
        ctype = CONTENT_TYPES.get(fmt.lower(), "text/plain; charset=UTF-8")
        self._send(200, result, headers, content_type=ctype)
        return 200, len(result)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--port-file")
    ap.add_argument("--user", default=None,
                    help="if set, only this user name is accepted")
    ap.add_argument("--password", default=None,
                    help="if set, requests must carry this password")
    args = ap.parse_args(argv)

    engine = Engine(args.data_dir)
    Handler.engine = engine
    Handler.auth_user = args.user
    Handler.auth_password = args.password
    server = Server(("127.0.0.1", args.port), Handler)
    port = server.server_address[1]

    stopping = threading.Event()

    def on_signal(signum, frame):
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, args.port_file)
    print(f"LISTENING {port}", flush=True)
    log(f"chdb-http listening on 127.0.0.1:{port}, data dir {os.path.abspath(args.data_dir)}, "
        f"engine {ENGINE_VERSION}, auth={'on' if args.password is not None else 'off'}")
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        engine.close()
        log("chdb-http stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
