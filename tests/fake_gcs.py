"""A read-only fake Google Cloud Storage on 127.0.0.1, for reading a TFDS data_dir at gs://.

TFDS reads a ``gs://`` data_dir two ways, and both reach this one fake:

* the ArrayRecord shards through ArrayRecord's own C++ GCS client (google-cloud-cpp), which
  talks to ``$CLOUD_STORAGE_EMULATOR_ENDPOINT`` (without credentials) when that is set:
  :class:`FakeGcsServer` serves the JSON API calls it makes (object download, ranged);
* the metadata (``dataset_info.json``, ``features.json``, directory listings) through etils
  ``epath``: with TensorFlow installed that is ``tf.io.gfile``, whose GCS endpoint is compiled in
  (``https://www.googleapis.com``), so it cannot be pointed here; with ``EPATH_USE_TF=false`` it
  is fsspec's ``gs`` filesystem, which :func:`register_fsspec` sets to :class:`FakeGcsFileSystem`,
  a minimal client of the same JSON API (object metadata, listing, ranged download).

Buckets map to local directories. Only GET is served; every request is logged in
``FakeGcsServer.requests``.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import urllib.error
import urllib.parse
import urllib.request

ENDPOINT_ENV = "CLOUD_STORAGE_EMULATOR_ENDPOINT"


class FakeGcsServer:
    """``with FakeGcsServer({'bucket': '/local/dir'}) as server:`` serves at ``server.endpoint``."""

    def __init__(self, buckets: dict[str, str]):
        self.buckets = {name: os.path.abspath(path) for name, path in buckets.items()}
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802 (http.server's name)
                owner.requests.append(self.path)
                status, headers, body = owner._get(self.path, self.headers.get("Range"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _refuse(self):
                owner.requests.append(f"{self.command} {self.path}")
                self.send_response(405)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeGcsServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def _local(self, bucket: str, name: str) -> str | None:
        root = self.buckets.get(bucket)
        if root is None:
            return None
        path = os.path.normpath(os.path.join(root, name))
        return path if path.startswith(root + os.sep) or path == root else None

    def _get(self, raw_path: str, range_header: str | None):
        url = urllib.parse.urlsplit(raw_path)
        query = urllib.parse.parse_qs(url.query)
        parts = url.path.split("/")
        # [..., 'storage', 'v1', 'b', BUCKET, 'o'(, OBJECT)]; downloads may start with /download.
        if parts[:1] == [""] and parts[1:2] == ["download"]:
            parts = [""] + parts[2:]
        if parts[1:4] != ["storage", "v1", "b"] or len(parts) < 6 or parts[5] != "o":
            return _error(404, f"unknown path {url.path}")
        bucket = parts[4]
        if bucket not in self.buckets:
            return _error(404, f"no bucket {bucket}")
        if len(parts) == 6:
            return self._list(bucket, query.get("prefix", [""])[0], query.get("delimiter", [""])[0])
        name = urllib.parse.unquote("/".join(parts[6:]))
        path = self._local(bucket, name)
        if path is None or not os.path.isfile(path):
            return _error(404, f"no object {name}")
        size = os.path.getsize(path)
        if query.get("alt") != ["media"]:
            return 200, {"Content-Type": "application/json"}, json.dumps(
                _metadata(bucket, name, size)).encode()
        start, end = 0, size - 1
        if range_header:  # bytes=a-b | bytes=a- | bytes=-n
            first, last = range_header.split("=", 1)[1].split("-", 1)
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            else:
                start = max(size - int(last), 0)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(max(end - start + 1, 0))
        headers = {"Content-Type": "application/octet-stream", "x-goog-generation": "1",
                   "x-goog-stored-content-length": str(size)}
        if range_header:
            headers["Content-Range"] = f"bytes {start}-{start + len(body) - 1}/{size}"
        return (206 if range_header else 200), headers, body

    def _list(self, bucket: str, prefix: str, delimiter: str):
        root = self.buckets[bucket]
        items, prefixes = [], set()
        for directory, _, files in os.walk(root):
            for file in files:
                name = os.path.relpath(os.path.join(directory, file), root).replace(os.sep, "/")
                if not name.startswith(prefix):
                    continue
                rest = name[len(prefix):]
                if delimiter and delimiter in rest:
                    prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
                else:
                    items.append(_metadata(bucket, name, os.path.getsize(os.path.join(directory, file))))
        body = {"kind": "storage#objects", "items": sorted(items, key=lambda i: i["name"]),
                "prefixes": sorted(prefixes)}
        return 200, {"Content-Type": "application/json"}, json.dumps(body).encode()


def _metadata(bucket: str, name: str, size: int) -> dict:
    return {"kind": "storage#object", "bucket": bucket, "name": name, "size": str(size),
            "generation": "1", "metageneration": "1", "contentType": "application/octet-stream"}


def _error(status: int, message: str):
    body = json.dumps({"error": {"code": status, "message": message}}).encode()
    return status, {"Content-Type": "application/json"}, body


# ----------------------------------------------------------------------------- fsspec client


def _fsspec_classes():
    from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

    class FakeGcsFile(AbstractBufferedFile):
        def _fetch_range(self, start, end):
            if start >= end:
                return b""
            return self.fs._request(self.path, media=True, byte_range=(start, end - 1))

    class FakeGcsFileSystem(AbstractFileSystem):
        """fsspec ``gs``/``gcs`` filesystem over :class:`FakeGcsServer`'s JSON API, read-only."""

        protocol = ("gs", "gcs")
        root_marker = ""

        def __init__(self, *args, **kwargs):
            kwargs.pop("finalize_on_close", None)  # what etils passes to gcsfs
            super().__init__(*args, **kwargs)
            self.endpoint = os.environ[ENDPOINT_ENV]

        @classmethod
        def _strip_protocol(cls, path):
            path = path[0] if isinstance(path, list) else path
            for prefix in ("gs://", "gcs://"):
                if path.startswith(prefix):
                    path = path[len(prefix):]
            return path.rstrip("/")

        def _url(self, path, query=None):
            bucket, _, name = self._strip_protocol(path).partition("/")
            url = f"{self.endpoint}/storage/v1/b/{bucket}/o"
            if name and query is None:
                url += "/" + urllib.parse.quote(name, safe="")
            return url + ("?" + urllib.parse.urlencode(query) if query else "")

        def _request(self, path, media=False, byte_range=None, query=None):
            url = self._url(path, query)
            if media:
                url += "?alt=media"
            request = urllib.request.Request(url)
            if byte_range:
                request.add_header("Range", f"bytes={byte_range[0]}-{byte_range[1]}")
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    body = response.read()
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    raise FileNotFoundError(path) from None
                raise
            return body if media else json.loads(body)

        def ls(self, path, detail=True, **kwargs):
            path = self._strip_protocol(path)
            bucket, _, name = path.partition("/")
            prefix = name + "/" if name else ""
            listing = self._request(bucket, query={"prefix": prefix, "delimiter": "/"})
            entries = [{"name": f"{bucket}/{p.rstrip('/')}", "size": 0, "type": "directory"}
                       for p in listing.get("prefixes", [])]
            entries += [self._file_entry(item) for item in listing.get("items", [])]
            if not entries:
                entries = [self.info(path)]  # a file lists as itself; raises if absent
                if entries[0]["type"] == "directory":
                    entries = []
            return entries if detail else [e["name"] for e in entries]

        def info(self, path, **kwargs):
            path = self._strip_protocol(path)
            bucket, _, name = path.partition("/")
            if not name:
                return {"name": bucket, "size": 0, "type": "directory"}
            try:
                return self._file_entry(self._request(path))
            except FileNotFoundError:
                listing = self._request(bucket, query={"prefix": name + "/", "maxResults": 1})
                if listing.get("items") or listing.get("prefixes"):
                    return {"name": path, "size": 0, "type": "directory"}
                raise

        @staticmethod
        def _file_entry(item):
            return {"name": f"{item['bucket']}/{item['name']}", "size": int(item["size"]),
                    "type": "file"}

        def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None,
                  **kwargs):
            if mode != "rb":
                raise PermissionError(f"the fake bucket is read-only: open({path!r}, {mode!r})")
            return FakeGcsFile(self, self._strip_protocol(path), mode, block_size or 1 << 20,
                               cache_options=cache_options, size=self.info(path)["size"])

    return FakeGcsFileSystem


def register_fsspec() -> None:
    """Makes fsspec's ``gs``/``gcs`` protocols :class:`FakeGcsFileSystem` (this process only)."""
    import fsspec

    cls = _fsspec_classes()
    for protocol in cls.protocol:
        fsspec.register_implementation(protocol, cls, clobber=True)
