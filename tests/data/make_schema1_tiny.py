"""Write tests/data/schema1_tiny.h5: a tiny schema-1 cache that later readers must keep reading.

It was written by this script at commit f2ef491, whose store wrote schema 1, and committed;
`tests/test_store.py::TestSchema1File` checks every value in it. Its point is to be old: a later
store writes its own schema, so the script refuses to run unless ``store.SCHEMA == 1``. To see how
the file was made, run the script of that commit against that commit's package::

    git worktree add /tmp/schema1 f2ef491 && cd /tmp/schema1 && python tests/data/make_schema1_tiny.py
"""
from pathlib import Path

import numpy as np

from headcache import store
from headcache.store import CacheWriter

OUT = Path(__file__).with_name("schema1_tiny.h5")

ATTRS = {
    "backbone_fingerprint": "0123456789abcdef" * 4,
    "spec": "demo",
    "checkpoint_sha256": "fedcba9876543210" * 4,
    "hidden_dim": 3,
    "dtype": "float16",
    "load_report": {"path": "demo.ckpt", "format": "lightning", "loaded": 2, "values": 12, "key_map": {},
                    "unexpected": ["cls_head.0.weight"], "fingerprint": "0123456789abcdef" * 4,
                    "checkpoint_sha256": "fedcba9876543210" * 4},
}


def main() -> None:
    if store.SCHEMA != 1:
        raise SystemExit(f"this store writes schema {store.SCHEMA}, not 1: {OUT} must stay as committed (see the "
                         "docstring for how it was made)")
    # Chunk sizes are a layout choice, not part of the schema: small ones keep the committed file small.
    store.CHUNK_BYTES, store.ID_CHUNK = 12, 2
    # Quarters are exact in float16, so the stored values are known exactly.
    tokens = np.arange(9, dtype=np.float32).reshape(3, 3) / 4  # rows 0..2
    with CacheWriter(OUT, ATTRS, overwrite=True) as writer:
        train = writer.split("train", 3, ["last", "mean"])
        val = writer.split("val", 2, ["last", "mean"])
        # train: lengths 2, 0, 1, written in two blocks; complete
        train.write([tokens[:2], tokens[:0]], np.array([0, 1]), ["p-1", "p-2"],
                    {"mean": np.array([[0.375, 0.625, 0.875], [0, 0, 0]]), "last": np.array([tokens[1], [0, 0, 0]])})
        train.write([tokens[2:]], np.array([1]), ["pé-3"], {"mean": tokens[2:], "last": tokens[2:]})
        train.finish()
        # val: 1 of 2 sequences written; incomplete, as after an interrupted extraction
        val.write([-tokens[:1]], np.array([0]), ["v-1"], {"mean": -tokens[:1], "last": -tokens[:1]})


if __name__ == "__main__":
    main()
