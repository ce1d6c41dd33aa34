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
