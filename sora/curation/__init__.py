"""Curation of real footage: per-clip measurements that decide what a dataset keeps.

Each module is a pure function (or a small class that loads its model once) over decoded frames
`(T, H, W, 3)` uint8 RGB; the Ray ingest stage turns the results into columns of `clips`.

- `letterbox`: black bars (letterbox / pillarbox) -> the content box.
"""
