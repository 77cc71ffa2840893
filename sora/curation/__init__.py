"""Curation of real footage: per-clip measurements that decide what a dataset keeps.

Each module is a pure function (or a small class that loads its model once) over decoded frames
`(T, H, W, 3)` uint8 RGB; the ingest stage turns the results into columns of `clips`.

- `letterbox`: black bars (letterbox / pillarbox) -> the content box.
- `shots`: the frame-difference cut rule; transitions -> shots.
- `transnetv2`: the pretrained TransNetV2 shot-transition detector (cuts, dissolves, fades).
- `text`: on-screen text area from PP-OCR (subtitles, watermarks).
- `clip_scores`: aesthetic score and caption-image alignment from a local CLIP model.
- `dedup`: perceptual-hash signatures of clips and the near-duplicate rule.
"""
