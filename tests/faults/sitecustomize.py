"""Test-only fault injection, kept out of the package: put this folder on PYTHONPATH and set
CURATION_FAULT_DIR, and every shard task of the executor crashes its worker process once per
(stage, shard), just before it writes anything, to prove that Ray's retries and reruns give
byte-identical results. Python imports `sitecustomize` at start-up in every process (the CLI
driver and each Ray worker), so the patched task body is the one the workers import by name.
"""

import os

FAULT_DIR = os.environ.get("CURATION_FAULT_DIR")

if FAULT_DIR:
    import functools

    import curation.executor.runner as _runner

    _original = _runner._shard_task

    @functools.wraps(_original)
    def _shard_task(shard, stage_dir, box, part_options):  # noqa: ANN001, ANN202
        stage = _runner._set_up(box)
        sentinel = os.path.join(FAULT_DIR, f"{stage.name}-{shard.name}")
        if not os.path.exists(sentinel):
            with open(sentinel, "w") as f:
                f.write("crashed once\n")
            os._exit(1)
        return _original(shard, stage_dir, box, part_options)

    _runner._shard_task = _shard_task

FLAKY_DIR = os.environ.get("CURATION_FLAKY_DIR")

if FLAKY_DIR:
    # `flaky://PATH` reads local files, but the first read past CURATION_FLAKY_AFTER bytes of
    # each file raises an OSError once (across processes: a sentinel per file), as a storage
    # blip mid-stream would. Registered in every process, so Ray workers resolve it too.
    import hashlib

    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    AFTER = int(os.environ.get("CURATION_FLAKY_AFTER", "65536"))

    class _FlakyFile:
        def __init__(self, f, path):  # noqa: ANN001
            self._f, self._path, self._pos = f, path, 0

        def read(self, n=-1):  # noqa: ANN001, ANN202
            data = self._f.read(n)
            self._pos += len(data)
            if self._pos > AFTER:
                key = hashlib.sha1(self._path.encode()).hexdigest()
                sentinel = os.path.join(FLAKY_DIR, key)
                if not os.path.exists(sentinel):
                    with open(sentinel, "w") as s:
                        s.write(self._path + "\n")
                    raise ConnectionResetError(f"injected storage error reading {self._path}")
            return data

        def __getattr__(self, name):  # noqa: ANN001, ANN204
            return getattr(self._f, name)

        def __enter__(self):  # noqa: ANN204
            return self

        def __exit__(self, *exc):  # noqa: ANN002, ANN204
            self._f.close()

    class FlakyFileSystem(LocalFileSystem):
        protocol = "flaky"

        @classmethod
        def _strip_protocol(cls, path):  # noqa: ANN001, ANN206
            path = str(path)
            if path.startswith("flaky://"):
                path = path[len("flaky://") :]
            return LocalFileSystem._strip_protocol(path)

        def unstrip_protocol(self, name):  # noqa: ANN001, ANN201
            return "flaky://" + name

        def _open(self, path, mode="rb", **kwargs):  # noqa: ANN001, ANN003, ANN202
            f = super()._open(path, mode, **kwargs)
            return _FlakyFile(f, path) if "r" in mode else f

    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
